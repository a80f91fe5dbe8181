"""Device parity: the accelerator paths checked against the CPU on zoo models.

For every zoo checkpoint given (default: the task zoo's, the ``TASK-ARCH`` directories
under ``ingest.paths.home()/zoo``):

1. **zoo training**: ``circuitscope zoo train TASK --arch ARCH --tiny --device D`` runs
   and its held-out metrics come back finite;
2. **transcoder training**: ``circuitscope transcoders train --device D`` (a short run)
   completes, with resumable checkpoints, and ``transcoders eval --device D`` reports;
   the sparse TopK and BatchTopK steps' gradients on the device against the dense
   formulation's (``Transcoder.dense_loss``) on the same device, with AuxK, as the
   largest difference relative to the gradient's scale (float32 rounding: 1.5e-7 (TopK)
   and 1.3e-7 (BatchTopK) on this CPU at d_model 64; the two columns not 0 in the
   ``--device cpu`` self-check, as they compare two formulations, not two devices);
3. **adapter**: the model's logits on the device against the CPU, as a fraction of the
   logit scale (float32);
4. **attribution**: the graph of a held-out task prompt through the transcoders of
   step 2, on the device and on the CPU, in float32 and float64: same nodes, the
   adjacency's largest difference relative to its largest entry, and the replacement
   and completeness scores on both;
5. **determinism and resumption on the device**: a short training run (per-layer
   BatchTopK with its firing floor and skip, eager and compiled (``--compile``, CUDA
   graphs on a GPU), and a cross-layer TopK) twice with one seed,
   and once killed mid-run and resumed; the largest weight difference of each against
   the first (0: bit-identical, as the CPU tests require);
6. **exactness on the device**: on a float64 graph computed there, row completeness and
   intervention agreement (DESIGN 5.4), the test suite's own checks at 1e-5 relative;
7. **interventions and faithfulness**: feature interventions (attention frozen and free),
   ablations (zero, mean, patch from the counterfactual) and the f(k) curves of edge and
   node patching (attribution and EAP rankings), float64, device against CPU.

A check that raises gets its error in the table and the script exits 1 after the
others; each row is printed as it completes.

Prints a Markdown table and writes it to ``--out`` (default
``benchmarks/results/device_<device>.md``) with the machine, date and command. Run on a
GPU machine as ``python3 benchmarks/device_check.py --device cuda``; with ``--device
cpu`` it checks itself (every device-against-CPU difference must be 0; the sparse step
columns read float32 rounding), which is how it is kept working on machines without an
accelerator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from _cli import (  # noqa: E402  (benchmarks/_cli.py)
    RESULTS,
    check_out,
    command_line,
    device_name,
    path,
    positive,
    run_main,
    write_results,
)

from ingest.attribution.attribute import attribute  # noqa: E402
from ingest.attribution.prompts import tokenize  # noqa: E402
from ingest.attribution.replacement import build_replacement  # noqa: E402
from ingest.errors import NotFoundError  # noqa: E402
from ingest.models import load_model  # noqa: E402
from ingest.paths import home  # noqa: E402
from ingest.transcoders.config import TranscoderConfig  # noqa: E402
from ingest.transcoders.formats import load_any  # noqa: E402
from ingest.transcoders.sources import zoo_source  # noqa: E402
from ingest.transcoders.trainer import TrainConfig, train_transcoders  # noqa: E402
from ingest.transcoders.transcoder import Transcoder  # noqa: E402
from ingest.zoo.checkpoint import list_checkpoints, read_manifest  # noqa: E402
from ingest.zoo.tasks import get_task  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def run_cli(args: list[str], log: Path) -> float:
    """Run ``circuitscope ARGS``; return its wall seconds, or raise with its log tail."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "service", *args], stdout=out, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"circuitscope {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return time.perf_counter() - started


def zoo_spec(model_dir: Path) -> tuple[str, str]:
    spec = json.loads((model_dir / "zoo.json").read_text())["spec"]
    return str(spec["task"]), str(spec["arch"])


def sparse_step_difference(device: str, d_model: int, arch: str) -> float:
    """Largest |sparse - dense| gradient entry over the largest dense one, with AuxK."""
    gen = torch.Generator().manual_seed(0)
    cfg = TranscoderConfig(arch=arch, d_in=d_model, d_out=d_model, d_transcoder=256, sparsity=8)
    module = Transcoder(cfg)
    module.reset_parameters(gen)
    module.to(device)
    x = torch.randn(512, d_model, generator=gen).to(device)
    y = torch.randn(512, d_model, generator=gen).to(device)
    dead = (torch.rand(256, generator=gen) < 0.5).to(device)
    worst = 0.0
    grads = []
    for loss in (module.loss, module.dense_loss):
        module.zero_grad()
        parts = loss(x, y, dead)
        (parts.mse + parts.aux).backward()
        # BatchTopK's threshold is a running average, not trained by gradient
        trained = [p.grad for p in module.parameters() if p.grad is not None]
        grads.append([g.detach().double().cpu() for g in trained])
    for sparse, dense in zip(*grads, strict=True):
        worst = max(worst, float((sparse - dense).abs().max() / dense.abs().max()))
    return worst


def determinism_differences(model_dir: Path, device: str, work: Path) -> dict[str, float]:
    """Largest |weight| difference of a same-seed rerun and of a killed-and-resumed run
    against one uninterrupted run, per configuration (0.0: bit-identical). The end-to-end
    configuration is killed inside its end-to-end steps (24 reconstruction steps, then 12)."""
    loaded = load_model(str(model_dir), device=device)
    source = zoo_source(model_dir, loaded.tokenizer)
    configs: dict[str, dict[str, Any]] = {
        "tc batchtopk+skip+floor": dict(kind="transcoder", arch="batchtopk", skip=True,
                                        balance_rate=0.2),
        "tc batchtopk compiled": dict(kind="transcoder", arch="batchtopk", skip=True,
                                      balance_rate=0.2, compile=True),
        "clt topk": dict(kind="clt", arch="topk"),
        "sae batchtopk end-to-end": dict(kind="sae", arch="batchtopk", kl_steps=12, kl_batch=16),
    }  # fmt: skip
    out: dict[str, float] = {}
    for name, extra in configs.items():
        cfg = TrainConfig(
            width=128, sparsity=4, steps=24, batch_size=256, buffer_rows=2048,
            warmup_steps=4, seed=5, eval_every=24, checkpoint_every=8, eval_windows=16,
            resample_every=6, dead_after_tokens=512, **extra,
        )  # fmt: skip

        def run(
            tag: str, cfg: TrainConfig = cfg, name: str = name, **kw: Any
        ) -> dict[str, torch.Tensor]:
            result = train_transcoders(
                loaded.adapter, source, cfg, work / f"{name}-{tag}".replace(" ", "_"),
                model_id=str(model_dir), progress=False, **kw,
            )  # fmt: skip
            return result.tset.state_dict()

        first, again = run("first"), run("again")
        run("killed", stop_after=30 if cfg.kl_steps else 13)
        resumed = run("killed", resume=True)
        for tag, other in (("rerun", again), ("resumed", resumed)):
            out[f"{name} {tag} diff"] = max(
                float((first[k].double() - other[k].double()).abs().max()) for k in first
            )
    return out


def zoo_training(task_name: str, arch: str, device: str, scratch: Path) -> dict[str, Any]:
    row: dict[str, Any] = {}
    zoo_out = scratch / "zoo-tiny"
    row["zoo train s"] = run_cli(
        ["zoo", "train", task_name, "--arch", arch, "--tiny", "--device", device,
         "--out", str(zoo_out), "--overwrite"],
        scratch / "zoo.log",
    )  # fmt: skip
    metrics = json.loads((zoo_out / "zoo.json").read_text()).get("metrics", {})
    row["zoo metrics finite"] = bool(metrics) and all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()
    )
    return row


def parity(
    model_dir: Path, task_name: str, device: str, scratch: Path, steps: int
) -> dict[str, Any]:
    """Transcoder training and eval on the device, the sparse step, logits and graphs."""
    row: dict[str, Any] = {}
    tc_dir = scratch / "transcoders"
    row["transcoders train s"] = run_cli(
        ["transcoders", "train", "--model", str(model_dir), "--out", str(tc_dir),
         "--prompts", "zoo", "--width", "128", "--steps", str(steps),
         "--eval-every", str(steps), "--checkpoint-every", str(max(1, steps // 2)),
         "--device", device],
        scratch / "transcoders.log",
    )  # fmt: skip
    report = scratch / "eval.json"
    run_cli(
        ["transcoders", "eval", str(tc_dir), "--model", str(model_dir), "--prompts", "zoo",
         "--device", device, "--windows", "16", "--json", str(report)],
        scratch / "eval.log",
    )  # fmt: skip
    row["tc ce_rec"] = json.loads(report.read_text())["mean"]["ce_loss_recovered"]
    d_model = load_any(tc_dir).d_model
    for arch in ("topk", "batchtopk"):
        row[f"{arch} sparse step grad diff / max"] = sparse_step_difference(device, d_model, arch)

    example = get_task(task_name).examples("heldout")[0]
    cpu = load_model(str(model_dir), device="cpu")
    dev = load_model(str(model_dir), device=device)
    ids = cpu.tokenizer(example.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = cpu.adapter(ids)
        got = dev.adapter(ids.to(dev.adapter.device)).cpu()
    row["logits diff / scale"] = float((got - ref).abs().max() / ref.abs().max())

    for name, dtype in DTYPES.items():
        graphs = {}
        for where in ("cpu", device):
            loaded = load_model(str(model_dir), device=where, dtype=dtype)
            graphs[where] = attribute(loaded, load_any(tc_dir), example.prompt, batch_size=32)
        a, b = graphs["cpu"], graphs[device]
        same_nodes = [n.node_id for n in a.nodes] == [n.node_id for n in b.nodes]
        row[f"{name} same nodes"] = same_nodes
        if same_nodes:
            ref_adj = a.adjacency.double()
            diff = (b.adjacency.double().cpu() - ref_adj).abs().max()
            row[f"{name} adj diff / max"] = float(diff / ref_adj.abs().max())
        ga, gb = a.to_graph(), b.to_graph()
        row[f"{name} replacement (cpu / dev)"] = (
            f"{ga.metadata.replacement_score:.4f} / {gb.metadata.replacement_score:.4f}"
        )
    return row


def exactness(model_dir: Path, device: str, tc_dir: Path) -> dict[str, Any]:
    """DESIGN 5.4's identities on the device, float64: every target's incoming edges plus
    its bias terms equal its value, and adding a source's vector in the frozen model moves
    every target by that source's edge (the test suite's checks, 1e-5 relative)."""
    from tests.ingest.attribution.checks import assert_interventions, assert_row_completeness

    task_name, _ = zoo_spec(model_dir)
    prompt = get_task(task_name).examples("heldout")[1].prompt
    loaded = load_model(str(model_dir), device=device, dtype=torch.float64)
    tcs = load_any(tc_dir)
    result = attribute(loaded, tcs, prompt, batch_size=16)  # moves tcs to the device
    adp = loaded.adapter
    ids = tokenize(loaded.tokenizer, prompt, adp.vocab_size, adp.n_ctx).to(adp.device)
    state = build_replacement(adp, tcs, ids)
    assert_row_completeness(adp, tcs, state, result, 1e-5)
    assert_interventions(adp, tcs, state, result, 1e-5)
    return {"float64 rows complete, interventions = edges": True}


def interventions(model_dir: Path, device: str, tc_dir: Path) -> dict[str, Any]:
    """Interventions, ablations and MIB faithfulness (DESIGN 5.5) on the device against the
    CPU, float64, on a held-out example with its counterfactual: the largest logit
    difference of each run as a fraction of the logit scale, and of the f(k) curves."""
    from ingest.attribution.faithfulness import compare_methods, logit_diff_metric
    from ingest.attribution.interventions import (
        AblationMode,
        FeatureIntervention,
        ablate,
        intervene,
    )
    from ingest.attribution.targets import LogitDiffTarget
    from ingest.graph import NodeKind

    task_name, _ = zoo_spec(model_dir)
    example = get_task(task_name).examples("heldout")[2]
    if example.counterfactual_prompt is None:
        return {"interventions": "no counterfactual in this task"}
    runs: dict[str, dict[str, torch.Tensor]] = {}
    for where in ("cpu", device):
        loaded = load_model(str(model_dir), device=where, dtype=torch.float64)
        adp, tok = loaded.adapter, loaded.tokenizer
        tcs = load_any(tc_dir)
        other = (example.counterfactual_answers or example.wrong_answers)[0]
        correct, wrong = (int(tok(w, add_special_tokens=False)["input_ids"][0])
                          for w in (example.answers[0], other))  # fmt: skip
        target = LogitDiffTarget(correct, wrong)
        result = attribute(loaded, tcs, example.prompt, batch_size=32, target=target)
        ids = tokenize(tok, example.prompt, adp.vocab_size, adp.n_ctx).to(adp.device)
        cf_ids = tokenize(tok, example.counterfactual_prompt, adp.vocab_size, adp.n_ctx)
        cf_ids = cf_ids.to(adp.device)
        features = [n for n in result.nodes if n.kind is NodeKind.FEATURE][:4]
        ablated = features + [n for n in result.nodes if n.kind is NodeKind.ERROR][:2]
        out: dict[str, torch.Tensor] = {}
        for frozen in (True, False):
            ivs = [FeatureIntervention(int(n.layer or 0), n.pos, int(n.feature or 0), scale=0.0)
                   for n in features[:2]]  # fmt: skip
            ivs.append(FeatureIntervention(int(features[2].layer or 0), features[2].pos,
                                           int(features[2].feature or 0), value=3.0))  # fmt: skip
            run = intervene(adp, tcs, ids, ivs, freeze_attention=frozen)
            out[f"intervene frozen={frozen}"] = run.logits
        modes: tuple[AblationMode, ...] = ("zero", "mean", "patch")
        for mode in modes:
            run = ablate(adp, tcs, ids, ablated, mode=mode,
                         counterfactual_ids=cf_ids if mode == "patch" else None)  # fmt: skip
            out[f"ablate {mode}"] = run.logits
        for patching in ("edge", "node"):
            curves = compare_methods(adp, tcs, result, ids, cf_ids,
                                     logit_diff_metric(correct, wrong), patching=patching,
                                     methods=("attribution", "eap"))  # fmt: skip
            out[f"f(k) {patching}"] = torch.tensor([v for c in curves for v in c.faithfulness])
        runs[where] = {k: v.double().cpu() for k, v in out.items()}
    row: dict[str, Any] = {}
    for key, ref in runs["cpu"].items():
        diff = (runs[device][key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        row[f"{key} diff / scale"] = float(diff)
    return row


def check_model(
    model_dir: Path, device: str, work: Path, steps: int, only: list[str] | None = None
) -> dict[str, Any]:
    """Every check on one zoo model; a check that raises puts its error in the row and
    the others still run."""
    task_name, arch = zoo_spec(model_dir)
    row: dict[str, Any] = {"model": f"{task_name}-{arch}"}
    scratch = work / row["model"]
    scratch.mkdir(parents=True, exist_ok=True)
    checks = {
        "zoo": lambda: zoo_training(task_name, arch, device, scratch),
        "parity": lambda: parity(model_dir, task_name, device, scratch, steps),
        "exactness": lambda: exactness(model_dir, device, scratch / "transcoders"),
        "interventions": lambda: interventions(model_dir, device, scratch / "transcoders"),
        "determinism": lambda: determinism_differences(model_dir, device, scratch / "det"),
    }
    for name, check in checks.items():
        if only and name not in only:
            continue
        try:
            row.update(check())
        except Exception as err:  # reported in the table; main() exits 1
            row[f"{name} error"] = f"{type(err).__name__}: {err}"
    return row


def cell(value: Any, limit: int = 400) -> str:
    """One table cell on one line: floats to 3 digits; text with its newlines as spaces,
    ``|`` escaped and, past ``limit`` characters, its middle cut (an error's type
    leads it, and the reason is at its end)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    text = " ".join(str(value).split())
    if len(text) > limit:
        head = limit // 4
        text = f"{text[:head]} ... {text[-(limit - head - 5) :]}"
    return text.replace("|", "\\|")


def render(rows: list[dict[str, Any]], header: str) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def default_models() -> list[Path]:
    """The task zoo's checkpoints under ``home()/zoo``: directories named TASK-ARCH after
    their ``zoo.json`` (not the demo's ``-tiny`` ones)."""
    return [
        directory
        for directory, manifest in list_checkpoints(home() / "zoo")
        if directory.name == f"{manifest.spec.task}-{manifest.spec.arch}"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", type=device_name, default="cuda", help="the device checked against cpu"
    )
    parser.add_argument("--models", nargs="*", type=path, default=None, help="zoo model dirs")
    parser.add_argument("--steps", type=positive, default=200, help="transcoder training steps")
    parser.add_argument(
        "--out", type=path, default=None, help="default: benchmarks/results/device_DEVICE.md"
    )
    parser.add_argument(
        "--checks",
        nargs="*",
        choices=["zoo", "parity", "exactness", "interventions", "determinism"],
        default=None,
        help="run only these (exactness and interventions need parity's transcoders; default: all)",
    )
    args = parser.parse_args()
    out = check_out(args.out or RESULTS / f"device_{args.device.replace(':', '')}.md")
    models = args.models or default_models()
    if not models:
        raise NotFoundError(
            f"no zoo models under {home() / 'zoo'}: train some with `circuitscope zoo train`, "
            "or pass --models"
        )
    for model_dir in models:
        read_manifest(model_dir)  # a missing or foreign directory: one line, before any work
    rows = []
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        for model_dir in models:
            print(f"checking {model_dir} on {args.device} ...", file=sys.stderr, flush=True)
            row = check_model(model_dir, args.device, Path(tmp), args.steps, args.checks)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    header = (
        f"# Device parity: {args.device} against cpu\n\n"
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, GPU {gpu}, "
        f"torch {torch.__version__}\n"
        f"- command: `{command_line()}`\n"
        "- columns: wall seconds of the CLI runs; logits and adjacency differences relative "
        "to the CPU's largest magnitude; replacement scores of the full graph on both"
    )
    text = render(rows, header)
    print(text)
    write_results(out, text)
    return 1 if any(key.endswith("error") for row in rows for key in row) else 0


if __name__ == "__main__":
    run_main(main)
