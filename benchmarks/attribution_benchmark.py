"""Attribution benchmark: seconds per graph against prompt length and active features.

Builds a 4-layer task-zoo GPT-2 architecture (d_model 64, 4 heads, d_mlp 256, random
weights: the cost of attribution does not depend on training) with a random TopK
per-layer transcoder set (d_transcoder 512, k active latents per token, so about
``T * n_layers * k`` active features), and times :func:`ingest.attribution.attribute.attribute`
for prompt lengths 16 .. 512. Each length runs in a fresh subprocess, so the peak
resident memory (CPU) or the peak CUDA memory is that of one graph. Reports seconds,
active features, backward passes and peak memory: prints the table (machine, date,
command) and writes it to ``--out`` (default ``benchmarks/results/attribution.md``).

    python3 benchmarks/attribution_benchmark.py                 # 16 .. 512 tokens, CPU
    python3 benchmarks/attribution_benchmark.py --lengths 16 64 --device cuda

Target: a 64-token prompt on the 4-layer model in under 2 s.

With ``--faithfulness-model ZOO_DIR ... --faithfulness-transcoders DIR ...`` (one
transcoder set per checkpoint) it runs the MIB faithfulness protocol (DESIGN 5.5)
instead, on held-out examples of each checkpoint's zoo task drawn at random: one graph
per example for a logit difference (IOI, modular addition: correct minus counterfactual
answer; greater-than: the most likely later minus the most likely earlier year), f(k) of
every edge scoring method under edge and node patching, with the task metric (the
probability difference for greater-than); prints the tables and writes them to ``--out``
(default ``benchmarks/results/attribution_faithfulness.md``), the plot beside it
(``--out`` with the suffix ``.png``; with ``--no-write`` neither is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _cli import (
    REPO,
    RESULTS,
    check_out,
    command_line,
    device_name,
    finite_at_least,
    path,
    positive,
    run_main,
    write_results,
)
from _machine import cpu_name

TARGET_SECONDS = 2.0


def build(n_ctx: int, d_transcoder: int, k: int, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from ingest.models import adapter_from_hf
    from ingest.transcoders.config import TranscoderConfig
    from ingest.transcoders.transcoder import Transcoder
    from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet
    from ingest.zoo.architectures import SpecialIds, get_architecture
    from ingest.zoo.task import ModelShape

    torch.manual_seed(0)
    shape = ModelShape(d_model=64, n_layers=4, n_heads=4, d_mlp=256, n_ctx=n_ctx)
    config = get_architecture("gpt2").config(shape, 128, SpecialIds(pad=0, bos=1, eos=2))
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config).eval().to(device)
    adapter = adapter_from_hf(hf)
    cfg = TranscoderConfig(arch="topk", d_in=64, d_out=64, d_transcoder=d_transcoder,
                           sparsity=k)  # fmt: skip
    meta = SetMetadata(kind="transcoder", model_id="bench", model_fingerprint="",
                       n_layers=4, d_model=64, layers=[0, 1, 2, 3], config=cfg)  # fmt: skip
    modules = {layer: Transcoder(cfg) for layer in range(4)}
    return adapter, TranscoderSet(meta, modules).to(device)


def measure_one(length: int, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from ingest.attribution.attribute import attribute

    torch.set_num_threads(args.threads)
    adapter, tcs = build(max(length, 16), args.d_transcoder, args.k, args.device)
    prompt = torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(length))
    attribute(adapter, tcs, prompt[: min(length, 8)], batch_size=args.batch_size)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = attribute(adapter, tcs, prompt, batch_size=args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    return {
        "tokens": length,
        "seconds": seconds,
        "active_features": result.stats["n_active_features"],
        "nodes": result.n_nodes,
        "edges": int((result.adjacency != 0).sum()),
        "backward_passes": result.stats["n_backward_passes"],
        "peak_mb": peak_mb,
    }


FAITH_PATCHINGS = ("edge", "node")


def _task_metric(task_name: str, tok, example, clean_logits):
    """(graph target tokens, metric, metric name) of one zoo example.

    Greater-than: the probability difference P(later years) - P(earlier or equal years)
    (Hanna et al. 2023; DESIGN 5.5), its graph explaining the logit difference between the
    most likely later and the most likely earlier year on the prompt. Other tasks: the
    logit difference between the answer and the counterfactual prompt's answer.
    """
    from ingest.attribution.faithfulness import logit_diff_metric, prob_diff_metric

    def first_id(word: str) -> int:
        return int(tok(word, add_special_tokens=False)["input_ids"][0])

    if task_name == "greater_than":
        right = [first_id(w) for w in example.answers]
        wrong = [first_id(w) for w in example.wrong_answers]
        last = clean_logits[0, -1]
        top_right = max(right, key=lambda i: float(last[i]))
        top_wrong = max(wrong, key=lambda i: float(last[i]))
        return (top_right, top_wrong), prob_diff_metric(right, wrong), "probability difference"
    correct = first_id(example.answers[0])
    wrong_id = first_id(example.counterfactual_answers[0])
    return (correct, wrong_id), logit_diff_metric(correct, wrong_id), "logit difference"


def faithfulness_task(model_dir: Path, tc_dir: Path, args: argparse.Namespace) -> dict:
    """Curves per (patching, method) over held-out examples of one zoo checkpoint."""
    import torch

    from ingest.attribution.attribute import attribute
    from ingest.attribution.faithfulness import (
        EDGE_SCORERS,
        FaithfulnessSetup,
        faithfulness_curve,
        method_scores,
    )
    from ingest.attribution.targets import LogitDiffTarget
    from ingest.errors import InvalidArgumentError
    from ingest.models import load_model
    from ingest.transcoders.formats import load_any
    from ingest.zoo.checkpoint import read_manifest, task_for_spec

    loaded = load_model(str(model_dir), device=args.device)
    tcs = load_any(tc_dir)
    tcs.check_fits(loaded.adapter)
    task = task_for_spec(read_manifest(model_dir).spec)
    tok, adapter = loaded.tokenizer, loaded.adapter

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([tok(text)["input_ids"]], device=adapter.device)

    curves: dict[tuple[str, str], list] = {}
    gaps: list[tuple[float, float, float]] = []  # m(N), linearized m(empty), real m(empty)
    n_edges: list[int] = []
    checks: list[tuple[float, float, float]] = []
    used, skipped = 0, 0
    metric_name = ""
    start = time.perf_counter()
    examples = list(task.examples("heldout"))
    random.Random(0).shuffle(examples)  # held-out lists are ordered (greater-than by year)
    for example in examples:
        if used >= args.examples:
            break
        clean, counter = ids(example.prompt), ids(example.counterfactual_prompt)
        if clean.shape != counter.shape:
            skipped += 1
            continue
        with torch.no_grad():
            clean_logits = adapter(clean)
        (correct, wrong), metric, metric_name = _task_metric(task.name, tok, example, clean_logits)
        result = attribute(loaded, tcs, clean[0], target=LogitDiffTarget(correct, wrong))
        try:
            first = FaithfulnessSetup.build(
                adapter, tcs, result, clean, counter, metric, FAITH_PATCHINGS[0]
            )
            setups = {p: first.with_patching(p) for p in FAITH_PATCHINGS}
        except InvalidArgumentError:
            skipped += 1  # the metric does not change on this pair
            continue
        edge, node = setups["edge"], setups["node"]
        if abs(node.m_full - node.m_empty) < args.min_gap * abs(node.m_full):
            skipped += 1  # f's denominator is too small to read
            continue
        gaps.append((edge.m_full, edge.m_empty, node.m_empty))
        n_edges.append(int((result.adjacency != 0).sum()))
        checks.extend(_linearization_check(edge, node))
        for method in EDGE_SCORERS:
            for patching, setup in setups.items():
                scores = method_scores(setup, method, seed=used)
                curve = faithfulness_curve(setup, scores, method=method)
                curves.setdefault((patching, method), []).append(curve)
        used += 1
    return {
        "task": task.name,
        "model": model_dir,
        "transcoders": tc_dir,
        "metric": metric_name,
        "curves": curves,
        "gaps": gaps,
        "checks": checks,
        "n_edges": n_edges,
        "used": used,
        "skipped": skipped,
        "seconds": time.perf_counter() - start,
    }


def _linearization_check(edge, node) -> list[tuple[float, float, float]]:
    """(f linearized, f direct frozen, f direct attention free) of source-closed circuits.

    A circuit keeping every out-edge of a node set S, and no other edge, is node patching
    of the graph nodes outside S; in the frozen replacement model with features inactive
    on the prompt held off it equals edge patching exactly (up to TopK re-selection).
    """
    import torch

    from ingest.attribution.faithfulness import attribution_scores
    from ingest.attribution.interventions import ReplacementRunner, ablation_inputs
    from ingest.graph import NodeKind

    result = edge.result
    n_sources = result.layout.n_sources
    order = torch.argsort(attribution_scores(result).sum(dim=0)[:n_sources], descending=True)
    runner = ReplacementRunner(edge.adapter, edge.transcoders, edge.clean)
    out = []
    for fraction in (0.05, 0.2, 0.5):
        inside = torch.zeros(result.layout.n, dtype=torch.bool)
        inside[order[: max(1, int(fraction * n_sources))]] = True
        f_lin = edge.faithfulness(edge.linear.metric((result.adjacency != 0) & inside[None, :],
                                                     edge.metric))  # fmt: skip
        outside = [n for i, n in enumerate(result.nodes)
                   if n.kind is not NodeKind.LOGIT and not bool(inside[i])]  # fmt: skip
        over, errors, resid0 = ablation_inputs(edge.clean, outside, "patch", edge.counterfactual)
        free = runner.run(overrides=over, errors=errors, resid0=resid0, freeze_attention=False)
        for layer, act in edge.clean.activations.items():
            over.set_mask[layer] |= act == 0
            over.set_values[layer][act == 0] = 0.0
        frozen = runner.run(overrides=over, errors=errors, resid0=resid0, freeze_attention=True)
        out.append((f_lin, edge.faithfulness(float(edge.metric(frozen.logits))),
                    node.faithfulness(float(edge.metric(free.logits)))))  # fmt: skip
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _plot_tasks(studies: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(FAITH_PATCHINGS), len(studies), squeeze=False,
                             figsize=(4.5 * len(studies), 3.6 * len(FAITH_PATCHINGS)))  # fmt: skip
    try:
        for col, study in enumerate(studies):
            for row, patching in enumerate(FAITH_PATCHINGS):
                ax = axes[row][col]
                for (p, method), cs in study["curves"].items():
                    if p != patching:
                        continue
                    ks = [100 * k for k in cs[0].fractions]
                    mean_f = [_mean([c.faithfulness[i] for c in cs]) for i in range(len(ks))]
                    ax.plot(ks, mean_f, marker="o", ms=3,
                            label=f"{method} ({_mean([c.cpr for c in cs]):.2f} / "
                            f"{_mean([c.cmd for c in cs]):.2f})")  # fmt: skip
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_xscale("log")
                ax.set_xlabel("edges kept (%)" if patching == "edge" else "graph nodes kept (%)")
                ax.set_ylabel("mean f(k)")
                ax.set_title(f"{study['task']}, {patching} patching", fontsize=9)
                ax.legend(fontsize=6, title="CPR / CMD", title_fontsize=6)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)


def _training_command(model_dir: Path, tc_dir: Path) -> str:
    """The ``circuitscope transcoders train`` line that made ``tc_dir`` (from its metadata)."""
    meta = json.loads((Path(tc_dir) / "circuitscope.json").read_text())
    cfg, train = meta.get("config", {}), meta.get("extra", {}).get("train_config", {})
    return (
        f"circuitscope transcoders train --model {model_dir} --prompts zoo "
        f"--kind {meta.get('kind', '?')} --arch {cfg.get('arch', '?')} "
        f"--width {cfg.get('d_transcoder', '?')} --sparsity {cfg.get('sparsity', 0):g} "
        f"--steps {train.get('steps', '?')} --out {tc_dir}"
    )


def faithfulness_study(args: argparse.Namespace) -> int:
    import torch

    from ingest.attribution.faithfulness import DEFAULT_FRACTIONS

    torch.set_num_threads(args.threads)
    studies = []
    for model_dir, tc_dir in zip(args.faithfulness_model, args.faithfulness_transcoders,
                                 strict=True):  # fmt: skip
        study = faithfulness_task(model_dir, tc_dir, args)
        print(f"{study['task']}: {study['used']} examples in {study['seconds']:.0f} s",
              file=sys.stderr)  # fmt: skip
        if study["used"]:
            studies.append(study)
    if not studies:
        print("no usable example", file=sys.stderr)
        return 1
    plot_path = args.out.with_suffix(".png")
    if args.no_write:
        with tempfile.TemporaryDirectory(prefix="attribution-faithfulness-") as tmp:
            _plot_tasks(studies, Path(tmp) / plot_path.name)  # drawn, not kept
        plot_line = "Plot: not kept (`--no-write`)."
    else:
        _plot_tasks(studies, plot_path)
        plot_line = f"Plot: `{plot_path.name}` (beside this file)."
    load1 = os.getloadavg()[0]
    lines = [
        "# Attribution faithfulness (MIB protocol)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
        f"device {args.device}, {args.threads} torch thread(s), 1-minute load average "
        f"{load1:.2f} at the end.",
        "",
        "Circuits: the top `int(k * E)` of a graph's E edges by each scoring method, "
        "k = 0.1 ... 100 %. f = (m(C) - m(empty)) / (m(N) - m(empty)), not clipped. "
        "CPR / CMD: MIB's areas, trapezoids over k itself (linear, 0.001 to 1, "
        "x-range 0.999; random circuits score about 0.25 / 0.75 in MIB); "
        "log-k: the same over ln k scaled to [0, 1] (every decade of sizes weighs alike). "
        "MIB takes CPR from the signed ranking (`eap_signed`) and CMD from the absolute one "
        "(`eap`). Each figure is the mean over examples (areas are linear in f, so the "
        "area of the mean curve is the same).",
        "",
        "- edge patching: in the prompt's linearized replacement model (attention and norms "
        "frozen on the prompt), edges outside the circuit carry their source's "
        "counterfactual contribution; m(N) and m(empty) are the clean and the linearized "
        "counterfactual metric.",
        "- node patching: the top k of the graph's features, errors and token embeddings "
        "(ranked by their summed outgoing edge scores; random: a random order) stay clean "
        "and every other graph node takes its counterfactual value in the replacement "
        "model, attention free; m(N) and m(empty) are the real runs.",
        "",
    ]
    for study in studies:
        gaps = study["gaps"]
        lines += [
            f"## {study['task']}",
            "",
            f"Model `{study['model']}`, transcoders `{study['transcoders']}`; metric: "
            f"{study['metric']}; {study['used']} held-out examples, drawn at random "
            f"({study['skipped']} skipped: different token counts, or a metric that changes "
            f"by less than {args.min_gap:g} of its clean value on the counterfactual), "
            f"{study['seconds']:.0f} s; graphs have {_mean(study['n_edges']):.0f} edges on "
            f"average (k = 0.1 % keeps {int(0.001 * min(study['n_edges']))} to "
            f"{int(0.001 * max(study['n_edges']))}).",
            "",
            f"Mean m(N) {_mean([g[0] for g in gaps]):.3f}; m(empty): linearized "
            f"{_mean([g[1] for g in gaps]):.3f}, real counterfactual run "
            f"{_mean([g[2] for g in gaps]):.3f}.",
            "",
            "Linearization check: on circuits that keep every out-edge of the top 5, 20 "
            "and 50 % of graph nodes by attribution ({} circuits), edge patching's f "
            "against a direct run of the replacement model with the other nodes patched: "
            "attention and norms frozen, features inactive on the prompt held off "
            "(mean |difference| {:.4f}); attention free, f from the real m(N) and m(empty) "
            "({:.3f}; mean f {:.2f} linearized, {:.2f} direct).".format(
                len(study["checks"]),
                _mean([abs(c[0] - c[1]) for c in study["checks"]]),
                _mean([abs(c[0] - c[2]) for c in study["checks"]]),
                _mean([c[0] for c in study["checks"]]),
                _mean([c[2] for c in study["checks"]]),
            ),
            "",
            "| patching | method | CPR | CMD | CPR log-k | CMD log-k | "
            + " | ".join(f"f({100 * k:g}%)" for k in DEFAULT_FRACTIONS)
            + " |",
            "|---|---|---:|---:|---:|---:|" + "---:|" * 10,
        ]
        for (patching, method), cs in study["curves"].items():
            mean_f = [_mean([c.faithfulness[i] for c in cs]) for i in range(len(cs[0].fractions))]
            lines.append(
                f"| {patching} | {method} | {_mean([c.cpr for c in cs]):.3f} | "
                f"{_mean([c.cmd for c in cs]):.3f} | {_mean([c.cpr_log_k for c in cs]):.3f} | "
                f"{_mean([c.cmd_log_k for c in cs]):.3f} | "
                + " | ".join(f"{v:.2f}" for v in mean_f)
                + " |"
            )
        lines.append("")
    lines += ["Transcoders were trained with:", ""]
    for study in studies:
        lines.append(f"    {_training_command(study['model'], study['transcoders'])}")
    lines += ["", plot_line, "", f"Command (from the repository root): `{command_line()}`", ""]
    print("\n".join(lines))
    if not args.no_write:
        write_results(args.out, "\n".join(lines))
        print(f"wrote {plot_path}", file=sys.stderr)
    return 0


def check_faithfulness_inputs(args: argparse.Namespace) -> None:
    """Every checkpoint and transcoder set loads and fits, before any graph."""
    from ingest.errors import InvalidArgumentError
    from ingest.models import load_model
    from ingest.transcoders.formats import load_any
    from ingest.zoo.checkpoint import read_manifest

    if len(args.faithfulness_model) != len(args.faithfulness_transcoders):
        raise InvalidArgumentError(
            f"{len(args.faithfulness_model)} --faithfulness-model directories but "
            f"{len(args.faithfulness_transcoders)} --faithfulness-transcoders: give one "
            "transcoder set per model, in the same order"
        )
    for model_dir, tc_dir in zip(args.faithfulness_model, args.faithfulness_transcoders,
                                 strict=True):  # fmt: skip
        read_manifest(model_dir)
        load_any(tc_dir).check_fits(load_model(str(model_dir)).adapter)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=positive, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="prompt tokens")  # fmt: skip
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--d-transcoder", type=positive, default=512)
    parser.add_argument("--k", type=positive, default=4, help="TopK active latents per token")
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--single", type=positive, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=path, default=None,
                        help="results file (default: benchmarks/results/attribution.md, or "
                        "attribution_faithfulness.md with --faithfulness-model)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument("--faithfulness-model", type=path, nargs="+", default=None,
                        help="zoo checkpoints")  # fmt: skip
    parser.add_argument("--faithfulness-transcoders", type=path, nargs="+", default=None,
                        help="one transcoder set per checkpoint")  # fmt: skip
    parser.add_argument("--examples", type=positive, default=8, help="faithfulness examples")
    parser.add_argument("--min-gap", type=finite_at_least(0.0), default=0.1,
                        help="skip examples whose metric changes by less than this "
                        "fraction of the clean metric on the counterfactual")  # fmt: skip
    args = parser.parse_args()
    if args.single is not None:
        print(json.dumps(measure_one(args.single, args)))
        return 0
    faithfulness = args.faithfulness_model is not None
    if faithfulness and args.faithfulness_transcoders is None:
        parser.error("--faithfulness-model needs --faithfulness-transcoders")
    name = "attribution_faithfulness.md" if faithfulness else "attribution.md"
    args.out = args.out or RESULTS / name
    if not args.no_write:
        check_out(args.out)
        if faithfulness:
            check_out(args.out.with_suffix(".png"), "--out (its .png plot)")
    if faithfulness:
        check_faithfulness_inputs(args)
        return faithfulness_study(args)

    from ingest.errors import InvalidArgumentError
    from ingest.transcoders.config import TranscoderConfig

    try:  # the set's configuration is refused here, not in the first subprocess
        TranscoderConfig(arch="topk", d_in=64, d_out=64, d_transcoder=args.d_transcoder,
                         sparsity=args.k)  # fmt: skip
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(
            f"--k {args.k}, --d-transcoder {args.d_transcoder}: {exc}"
        ) from None
    rows = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--single", str(length), "--device", args.device,
               "--batch-size", str(args.batch_size), "--d-transcoder", str(args.d_transcoder),
               "--k", str(args.k), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['tokens']:>5} tokens  {row['seconds']:8.2f} s  {row['active_features']:>6} "
            f"features  {row['backward_passes']:>4} backward  {row['peak_mb']:8.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    lines = [
        "# Attribution benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
        f"device {args.device}, {args.threads} threads, batch size {args.batch_size}.",
        "",
        "Model: 4-layer GPT-2 zoo architecture (d_model 64, 4 heads, d_mlp 256, random "
        f"weights); transcoders: per-layer TopK, d_transcoder {args.d_transcoder}, "
        f"k = {args.k}. The frozen forward on up to 4 prompt prefixes (each when a batch "
        "first needs it), then one backward pass per batch of target rows, through the "
        "shortest prefix that holds its reads.",
        "Peak memory: maximum resident set of the measuring process (CPU) or peak CUDA allocation.",
        "",
        "| tokens | seconds | active features | nodes | edges | backward passes | peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['seconds']:.2f} | {r['active_features']} | {r['nodes']} | "
            f"{r['edges']} | {r['backward_passes']} | {r['peak_mb']:.0f} |"
        )
    at64 = next((r for r in rows if r["tokens"] == 64), None)
    if at64 is not None:
        verdict = "met" if at64["seconds"] < TARGET_SECONDS else "NOT met"
        lines += ["", f"Target (64 tokens under {TARGET_SECONDS:g} s): {verdict} "
                  f"({at64['seconds']:.2f} s)."]  # fmt: skip
    lines += ["", f"Command: `{command_line()}`", ""]
    print("\n".join(lines))
    if not args.no_write:
        write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    run_main(main)
