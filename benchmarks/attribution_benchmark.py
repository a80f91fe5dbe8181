"""Attribution benchmark: seconds per graph against prompt length and active features.

Builds a 4-layer task-zoo GPT-2 architecture (d_model 64, 4 heads, d_mlp 256, random
weights: the cost of attribution does not depend on training) with a random TopK
per-layer transcoder set (d_transcoder 512, k active latents per token, so about
``T * n_layers * k`` active features), and times :func:`ingest.attribution.attribute.attribute`
for prompt lengths 16 .. 512. Each length runs in a fresh subprocess, so the peak
resident memory (CPU) or the peak CUDA memory is that of one graph. Reports seconds,
active features, backward passes and peak memory, and writes
``benchmarks/results/attribution.md``.

    python3 benchmarks/attribution_benchmark.py                 # 16 .. 512 tokens, CPU
    python3 benchmarks/attribution_benchmark.py --lengths 16 64 --device cuda

Target: a 64-token prompt on the 4-layer model in under 2 s.

With ``--faithfulness-model ZOO_DIR --faithfulness-transcoders DIR`` it runs the MIB
faithfulness protocol (DESIGN 5.5) instead, on held-out examples of the checkpoint's zoo
task: one graph per example for its logit difference (correct minus counterfactual
answer), f(k) of attribution, random and EAP circuits, averaged over examples; writes
``benchmarks/results/attribution_faithfulness.md`` and ``attribution_faithfulness.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "attribution.md"
FAITH_RESULTS = ROOT / "benchmarks" / "results" / "attribution_faithfulness.md"
FAITH_PLOT = ROOT / "benchmarks" / "results" / "attribution_faithfulness.png"
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


def faithfulness_study(args: argparse.Namespace) -> int:
    import torch

    from ingest.attribution.attribute import attribute
    from ingest.attribution.faithfulness import (
        FaithfulnessCurve,
        compare_methods,
        logit_diff_metric,
        plot_curves,
    )
    from ingest.attribution.targets import LogitDiffTarget
    from ingest.errors import InvalidArgumentError
    from ingest.models import load_model
    from ingest.transcoders.formats import load_any
    from ingest.zoo.checkpoint import read_manifest, task_for_spec

    torch.set_num_threads(args.threads)
    loaded = load_model(str(args.faithfulness_model), device=args.device)
    tcs = load_any(args.faithfulness_transcoders)
    task = task_for_spec(read_manifest(args.faithfulness_model).spec)
    tok = loaded.tokenizer

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([tok(text)["input_ids"]], device=loaded.adapter.device)

    per_method: dict[str, list[FaithfulnessCurve]] = {}
    used = 0
    start = time.perf_counter()
    for example in task.examples("heldout"):
        if used >= args.examples:
            break
        clean, counter = ids(example.prompt), ids(example.counterfactual_prompt)
        if clean.shape != counter.shape:
            continue
        correct = tok(example.answers[0], add_special_tokens=False)["input_ids"][0]
        wrong = tok(example.counterfactual_answers[0], add_special_tokens=False)["input_ids"][0]
        result = attribute(loaded, tcs, clean[0], target=LogitDiffTarget(correct, wrong))
        try:
            curves = compare_methods(loaded.adapter, tcs, result, clean, counter,
                                     logit_diff_metric(correct, wrong),
                                     patching=args.patching)  # fmt: skip
        except InvalidArgumentError:
            continue  # the metric does not change on this pair
        for curve in curves:
            per_method.setdefault(curve.method, []).append(curve)
        used += 1
    seconds = time.perf_counter() - start
    if not per_method:
        print("no usable example", file=sys.stderr)
        return 1
    mean_curves = []
    for method, curves in per_method.items():
        mean_f = [sum(c.faithfulness[i] for c in curves) / len(curves)
                  for i in range(len(curves[0].fractions))]  # fmt: skip
        mean_curves.append(FaithfulnessCurve(method, curves[0].fractions, mean_f,
                                             curves[0].n_edges, 0.0, 0.0))  # fmt: skip
    plot_path = FAITH_PLOT if not args.no_write else Path("/tmp") / FAITH_PLOT.name
    plot_curves(mean_curves, plot_path,
                title=f"{task.name}: mean f(k) over {used} held-out examples")  # fmt: skip
    lines = [
        "# Attribution faithfulness (MIB protocol)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Model `{args.faithfulness_model}` "
        f"(task {task.name}), transcoders `{args.faithfulness_transcoders}`, "
        f"{used} held-out examples, {seconds:.0f} s in all; graphs have "
        f"{sum(c.n_edges[-1] for c in per_method['random']) / used:.0f} edges on average "
        f"(k = 0.1 % keeps {min(c.n_edges[0] for c in per_method['random'])} to "
        f"{max(c.n_edges[0] for c in per_method['random'])}).",
        "",
        "Metric: logit difference, correct minus counterfactual answer. Circuits: the top "
        "k % of graph edges by each method. "
        + (
            "Edge-level patching in the linearized replacement model: edges outside the "
            "circuit carry their source's counterfactual contribution."
            if args.patching == "edge"
            else "Node-level patching: graph nodes outside the circuit take their "
            "counterfactual values, attention free."
        ),
        "",
        "| method | CPR (mean curve) | CMD (mean curve) | mean CPR | mean CMD | "
        + " | ".join(f"f({100 * k:g}%)" for k in mean_curves[0].fractions)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(mean_curves[0].fractions),
    ]
    for mc in mean_curves:
        curves = per_method[mc.method]
        mean_cpr = sum(c.cpr for c in curves) / len(curves)
        mean_cmd = sum(c.cmd for c in curves) / len(curves)
        lines.append(
            f"| {mc.method} | {mc.cpr:.3f} | {mc.cmd:.3f} | {mean_cpr:.3f} | {mean_cmd:.3f} | "
            + " | ".join(f"{v:.2f}" for v in mc.faithfulness)
            + " |"
        )
    lines += ["", f"Plot: `{FAITH_PLOT.relative_to(ROOT)}`.", "",
              "Command: `python3 benchmarks/attribution_benchmark.py "
              + " ".join(sys.argv[1:]) + "`", ""]  # fmt: skip
    if not args.no_write:
        FAITH_RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--d-transcoder", type=int, default=512)
    parser.add_argument("--k", type=int, default=4, help="TopK active latents per token")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument("--faithfulness-model", type=Path, default=None, help="zoo checkpoint")
    parser.add_argument("--faithfulness-transcoders", type=Path, default=None)
    parser.add_argument("--examples", type=int, default=8, help="faithfulness examples")
    parser.add_argument("--patching", choices=("edge", "node"), default="edge")
    args = parser.parse_args()
    if args.faithfulness_model is not None:
        if args.faithfulness_transcoders is None:
            parser.error("--faithfulness-model needs --faithfulness-transcoders")
        return faithfulness_study(args)
    if args.single is not None:
        print(json.dumps(measure_one(args.single, args)))
        return 0

    rows = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--single", str(length), "--device", args.device,
               "--batch-size", str(args.batch_size), "--d-transcoder", str(args.d_transcoder),
               "--k", str(args.k), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['tokens']:>5} tokens  {row['seconds']:8.2f} s  {row['active_features']:>6} "
            f"features  {row['backward_passes']:>4} backward  {row['peak_mb']:8.0f} MB"
        )
    lines = [
        "# Attribution benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"device {args.device}, {args.threads} threads, batch size {args.batch_size}.",
        "",
        "Model: 4-layer GPT-2 zoo architecture (d_model 64, 4 heads, d_mlp 256, random "
        f"weights); transcoders: per-layer TopK, d_transcoder {args.d_transcoder}, "
        f"k = {args.k}. One forward pass, then one backward pass per batch of target rows.",
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
    lines += ["", "Command: `python3 benchmarks/attribution_benchmark.py "
              + " ".join(sys.argv[1:]) + "`", ""]  # fmt: skip
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(lines))
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
