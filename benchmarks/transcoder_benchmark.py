"""Transcoder quality and speed on every task-zoo model and every layer.

For each task-zoo model under ``$CIRCUITSCOPE_HOME/zoo`` (the ``TASK-ARCH`` directories
``zoo train`` writes, named after their ``zoo.json``; not the demo's ``-tiny`` one; never
retrained here), or each of ``--models``, train a
per-layer transcoder and an SAE baseline of the same architecture at the trainer's
default settings (``TrainConfig()``: BatchTopK, width, k, steps, batch; ``--arch`` and the
other flags override them) on every layer, and report

- mean L0, CE loss recovered of each layer spliced alone (the worst layer), CE loss
  recovered with all layers spliced, dead latents: those that never fire on the eval
  split's first 65,536 tokens, or on the whole split when it is smaller (greater-than's
  has 38,024; the table's ``dead tokens`` column gives the count);
- the task metric with every MLP replaced, as a fraction of the clean model's;
- transcoder vs SAE CE loss recovered at equal L0;
- training throughput (tokens/s, activation collection included) and the FLOP/s it
  implies, beside this machine's own matmul FLOP/s measured in the same run at the
  step's shapes; peak memory. ``steps/matmul`` is the same ratio over the training loop's
  time less activation collection (the model forwards that refill the buffer).

FLOPs per trained token and layer are those of the dense formulation of the step:
encoder forward ``2 d w``, encoder weight gradient ``2 d w`` (the input needs no
gradient), decoder forward ``2 d w``, decoder weight and activation gradients ``4 d w``:
``10 d w``. The TopK and BatchTopK step decodes sparsely
(``ingest/transcoders/sparse.py``), so its forward decode is ``2 d k``: it performs
``8 d w + 2 d k`` of the counted FLOPs, and the ratio is the dense-equivalent rate. A
transcoder's skip connection (on by default) adds ``4 d^2``: its forward product and its
weight gradient. The AuxK pass, the model forward
that collects activations and elementwise work are not counted (they are overhead the
ratio charges to the trainer).

Bars (DESIGN 5.1 / the transcoder issue): L0 <= 32 with CE loss recovered >= 0.90 per
layer; all layers spliced keep >= 90% of the task metric; dead latents < 10%; trainer
at >= 30% of the matmul FLOP/s.

    python3 benchmarks/transcoder_benchmark.py [--models DIR,DIR] [--arch topk|batchtopk|...]
        [--steps N] [--batch B] [--lr LR] [--sparsity K] [--width W | --expansion F]
        [--resample-every N] [--device cpu] [--out benchmarks/results/transcoders.md]

``--out`` is checked before any work; the table (machine, date, command) is printed and
written there, the per-layer reports to the same path with ``.json``.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cli import (  # benchmarks/_cli.py
    RESULTS,
    check_out,
    command_line,
    device_name,
    finite,
    int_in,
    path,
    positive,
    run_main,
    write_results,
)
from _machine import cpu_name  # benchmarks/_machine.py

from ingest.errors import NotFoundError
from ingest.models import load_model
from ingest.paths import home
from ingest.transcoders.config import ARCHITECTURES
from ingest.transcoders.evaluation import evaluate_set
from ingest.transcoders.sources import zoo_source
from ingest.transcoders.trainer import TrainConfig, train_transcoders
from ingest.zoo.checkpoint import list_checkpoints, read_manifest

FLOPS_PER_TOKEN_LAYER = 10  # x d_model x width: see the module docstring


def step_flops(d_model: int, width: int, skip: bool) -> int:
    """Counted FLOPs per trained token and layer: ``10 d w``, plus ``4 d^2`` for W_skip
    (its forward product and its weight gradient)."""
    return FLOPS_PER_TOKEN_LAYER * d_model * width + (4 * d_model * d_model if skip else 0)


def matmul_flops(
    batch: int, d: int, d_t: int, device: torch.device, seconds: float = 0.5, windows: int = 4
) -> float:
    """FLOP/s of this machine on the encoder/decoder matmuls of one training step: the
    best of ``windows`` timed windows, so that another job's burst during one window does
    not lower the reference (and flatter the ratio)."""
    a = torch.randn(batch, d, device=device)
    w = torch.randn(d, d_t, device=device)
    for _ in range(3):
        (a @ w) @ w.T
    best = 0.0
    for _ in range(windows):
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            (a @ w) @ w.T
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, n * 2 * (2 * batch * d * d_t) / (time.perf_counter() - start))
    return best


def zoo_models() -> list[Path]:
    """The task zoo's models: the directories under ``home()/zoo`` named TASK-ARCH after
    their ``zoo.json`` (``zoo train``'s default; the demo's ``-tiny`` model is not one)."""
    root = home() / "zoo"
    found = [
        directory
        for directory, manifest in list_checkpoints(root)
        if directory.name == f"{manifest.spec.task}-{manifest.spec.arch}"
    ]
    if not found:
        raise NotFoundError(
            f"no task-zoo models under {root}: train them with benchmarks/zoo_benchmark.py "
            "or `circuitscope zoo train`, or pass --models"
        )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="", help="comma-separated zoo dirs (default: the task zoo's)"
    )
    parser.add_argument(
        "--arch", choices=ARCHITECTURES.names(), default=None, help="default: TrainConfig's"
    )
    parser.add_argument("--steps", type=positive, default=None, help="default: TrainConfig's")
    parser.add_argument(
        "--sparsity",
        "--k",
        type=finite,
        default=None,
        help="k, or the penalty coefficient; default: the architecture's",
    )
    parser.add_argument(
        "--batch", type=positive, default=None, help="tokens per step; default: TrainConfig's"
    )
    parser.add_argument("--lr", type=finite, default=None, help="default: TrainConfig's")
    parser.add_argument(
        "--width", type=positive, default=None, help="default: TrainConfig's expansion x d_model"
    )
    parser.add_argument("--expansion", type=positive, default=None, help="default: TrainConfig's")
    parser.add_argument(
        "--resample-every", type=int_in(0), default=None, help="0: never; default: TrainConfig's"
    )
    parser.add_argument(
        "--balance-rate", type=finite, default=None, help="batchtopk's; default: TrainConfig's"
    )
    parser.add_argument(
        "--compile", action="store_true", help="train with the compiled step (TrainConfig.compile)"
    )
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--out",
        type=path,
        default=RESULTS / "transcoders.md",
        help="results table (and its .json beside it)",
    )
    args = parser.parse_args()
    check_out(args.out)
    check_out(args.out.with_suffix(".json"), "--out (its .json)")

    device = torch.device(args.device)
    work = home() / "benchmarks" / "transcoders"
    overrides = {
        key: value
        for key, value in (
            ("arch", args.arch),
            ("steps", args.steps),
            ("sparsity", args.sparsity),
            ("batch_size", args.batch),
            ("lr", args.lr),
            ("width", args.width),
            ("expansion", args.expansion),
            ("resample_every", args.resample_every),
            ("balance_rate", args.balance_rate),
            ("compile", args.compile or None),
        )
        if value is not None
    }
    base = TrainConfig(**overrides)  # type: ignore[arg-type]
    sparsity = base.module_config(64).sparsity
    model_dirs = [path(m.strip()) for m in args.models.split(",")] if args.models else zoo_models()
    for model_dir in model_dirs:
        read_manifest(model_dir)  # every model exists and is a zoo checkpoint, before any work
    rows = []
    extra = []
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    for model_dir in model_dirs:
        manifest = read_manifest(model_dir)
        loaded = load_model(str(model_dir), device=args.device)
        adapter = loaded.adapter
        source = zoo_source(model_dir, loaded.tokenizer)
        results = {}
        # the reference is measured next to the transcoder's training, before and after it
        width = base.width_for(adapter.d_model)
        reference = [matmul_flops(base.batch_size, adapter.d_model, width, device)]
        for kind in ("transcoder", "sae"):
            cfg = TrainConfig(
                **{**base.to_dict(), "kind": kind, "layers": None,
                   "eval_every": base.steps, "checkpoint_every": base.steps}
            )  # fmt: skip
            out = work / f"{model_dir.name}-{kind}"
            (out / "checkpoint.safetensors").unlink(missing_ok=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result = train_transcoders(
                adapter, source, cfg, out, model_id=str(model_dir), progress=False
            )
            report = evaluate_set(
                adapter, result.tset, source, zoo_dir=model_dir, tokenizer=loaded.tokenizer
            )
            results[kind] = (result, report)
            if kind == "transcoder":
                reference.append(matmul_flops(base.batch_size, adapter.d_model, width, device))
        tc_result, tc = results["transcoder"]
        _, sae = results["sae"]
        per_token_flops = adapter.n_layers * step_flops(adapter.d_model, width, base.uses_skip)
        achieved = tc_result.tokens_per_second * per_token_flops
        peak_matmul = max(reference)
        worst = min(tc["layers"].values(), key=lambda v: v["ce_loss_recovered"])
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append(
            {
                "model": model_dir.name,
                "d_model": adapter.d_model,
                "layers": adapter.n_layers,
                "width": width,
                "L0 (tc)": tc["mean"]["l0"],
                "CE rec min layer (tc)": worst["ce_loss_recovered"],
                "its 95% interval": "[{:.3f}, {:.3f}]".format(*worst["ce_loss_recovered_95"]),
                # that layer's CE change when spliced and when its MLP is zero-ablated (nats):
                # a small ablation change makes its CE recovered a ratio of two small numbers
                "its splice / ablate dCE": f"{worst['delta_loss']:+.2e} / "
                f"{worst['ce_ablate'] - worst['ce_clean']:+.2e}",
                "CE rec all layers (tc)": tc["all_layers"]["ce_loss_recovered"],
                "task metric kept (tc)": tc["task"]["fraction_kept"],
                "dead (tc)": tc["mean"]["dead_fraction"],
                "dead max layer (tc)": max(v["dead_fraction"] for v in tc["layers"].values()),
                "dead tokens": tc["dead_tokens"],
                "L0 (sae)": sae["mean"]["l0"],
                "CE rec mean (sae)": sae["mean"]["ce_loss_recovered"],
                "CE rec mean (tc)": tc["mean"]["ce_loss_recovered"],
                # the sign-safe comparison (CE recovered reads inverted on a layer whose
                # ablation lowers the loss): mean delta loss over layers, lower is better
                "dloss mean (sae)": sae["mean"]["delta_loss"],
                "dloss mean (tc)": tc["mean"]["delta_loss"],
                "dead (sae)": sae["mean"]["dead_fraction"],
                "tokens/s": tc_result.tokens_per_second,
                "matmul GFLOP/s": peak_matmul / 1e9,
                "train/matmul FLOP/s": achieved / peak_matmul,
                "steps/matmul FLOP/s": tc_result.step_tokens_per_second
                * per_token_flops
                / peak_matmul,
                "peak MiB": (tc_result.peak_memory_bytes or peak_rss) / 2**20,
            }
        )
        extra.append(
            {"model": model_dir.name, "transcoder": tc, "sae": sae, "zoo_metrics": manifest.metrics}
        )
        print(json.dumps(rows[-1], indent=1, default=float), file=sys.stderr, flush=True)

    wall = time.perf_counter() - began
    headers = list(rows[0])
    command = command_line()
    lines = [
        "# Transcoder benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} cores shared with other "
        f"users, {torch.get_num_threads()} torch threads, device {device}, torch "
        f"{torch.__version__}",
        f"- 1-minute load average: {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end",
        f"- command: `{command.strip()}`; wall time {wall / 60:.1f} min",
        f"- {base.arch} at sparsity {sparsity:g}, resampling every {base.resample_every} "
        f"steps (0: never), firing floor rate {base.resolved_balance_rate:g} (0: none), "
        f"width {base.width or f'{base.expansion} x d_model'}, "
        f"{base.steps} steps of {base.batch_size} tokens "
        f"(TrainConfig defaults unless the command overrides them), every layer; the "
        f"answer-predicting rows of answer-only tasks weigh {base.answer_weight}",
        "- CE: next-token loss at the predictions each model was trained on (the answer, or "
        "every token for induction), eval's default prompts (up to 4,096 answers, or 64 windows "
        "for induction); `its splice / ablate dCE`: the worst layer's CE change in nats "
        "when spliced and when its MLP is zero-ablated; task metric kept: "
        "(spliced - b) / (clean - b) from the task's no-ability baseline b (0; induction's "
        "loss ratio: 1)",
        "- dead: latents that never fire on the first `dead tokens` tokens of the eval split "
        "(mean over layers, and the worst layer)",
        f"- FLOPs: {FLOPS_PER_TOKEN_LAYER} x d_model x width per token and layer (the dense "
        "formulation's; the sparse step of TopK and BatchTopK decodes sparsely, so it "
        "performs 8 x d_model x width of them in matmuls plus 2 x d_model x k), plus "
        "4 x d_model^2 for the transcoders' "
        f"skip connection (skip: {base.uses_skip}); "
        "matmul GFLOP/s at the step's shapes, the best of 4 half-second windows before and "
        "after the transcoder's training in this run",
        "- steps/matmul FLOP/s: the same ratio without the time spent collecting activations",
        "- peak MiB: resident set of the whole process so far (CPU) or CUDA peak",
        "- bars: L0 <= 32 with CE rec >= 0.90 per layer; task metric kept >= 0.90; "
        "dead < 0.10; train/matmul >= 0.30",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    write_results(args.out, "\n".join(lines) + "\n")
    write_results(args.out.with_suffix(".json"), json.dumps(extra, indent=1, default=float))
    return 0


if __name__ == "__main__":
    run_main(main)
