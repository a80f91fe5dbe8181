"""Transcoder quality and speed on task-zoo models.

For each task: train (or reuse) the default-size zoo model, train a per-layer TopK
transcoder and a TopK SAE baseline at the same k on its MLPs, and report

- mean L0, per-layer CE loss recovered (each layer spliced alone), dead latents;
- the task metric with every MLP replaced, as a fraction of the clean model's;
- transcoder vs SAE CE loss recovered at equal L0;
- training throughput (tokens/s) and the FLOP/s it implies, beside this machine's own
  matmul FLOP/s measured in the same run at the transcoder's shapes; peak memory.

Bars (DESIGN 5.1 / the transcoder issue): L0 <= 32 with CE loss recovered >= 0.90 per
layer; all layers spliced keep >= 90% of the task metric; dead latents < 10%.

    python3 benchmarks/transcoder_benchmark.py [--tasks greater_than,ioi] [--steps 2000]
        [--device cpu] [--out benchmarks/results/transcoders.md]
"""

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.models import load_model
from ingest.paths import home
from ingest.transcoders.evaluation import evaluate_set
from ingest.transcoders.sources import zoo_source
from ingest.transcoders.trainer import TrainConfig, train_transcoders
from ingest.zoo.checkpoint import read_manifest
from ingest.zoo.trainer import train_zoo_model


def matmul_flops(batch: int, d: int, d_t: int, device: torch.device, seconds: float = 2.0) -> float:
    """FLOP/s of this machine on the encoder/decoder matmuls of one training step."""
    a = torch.randn(batch, d, device=device)
    w = torch.randn(d, d_t, device=device)
    for _ in range(3):
        (a @ w) @ w.T
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        (a @ w) @ w.T
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * 2 * (2 * batch * d * d_t) / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="greater_than,ioi")
    parser.add_argument(
        "--models", default="", help="comma-separated zoo checkpoint dirs to use instead of --tasks"
    )
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--expansion", type=int, default=8, help="width = expansion * d_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transcoders.md"))
    args = parser.parse_args()

    device = torch.device(args.device)
    work = home() / "benchmarks" / "transcoders"
    rows = []
    extra = []
    if args.models:
        model_dirs = [Path(m) for m in args.models.split(",")]
    else:
        model_dirs = [
            train_zoo_model(task, args.arch, device=args.device, reuse=True, progress=False).out_dir
            for task in args.tasks.split(",")
        ]
    for model_dir in model_dirs:
        manifest = read_manifest(model_dir)
        task = manifest.spec.task
        loaded = load_model(str(model_dir), device=args.device)
        adapter = loaded.adapter
        source = zoo_source(model_dir, loaded.tokenizer)
        width = args.expansion * adapter.d_model
        results = {}
        for kind in ("transcoder", "sae"):
            cfg = TrainConfig(
                kind=kind, arch="topk", width=width, sparsity=args.k, steps=args.steps,
                eval_every=max(1, args.steps // 4), checkpoint_every=args.steps,
            )  # fmt: skip
            out = work / f"{model_dir.name}-{kind}-k{args.k}-s{args.steps}"
            for stale in (out / "checkpoint.safetensors",):
                stale.unlink(missing_ok=True)
            result = train_transcoders(
                adapter, source, cfg, out, model_id=str(model_dir), progress=False
            )
            report = evaluate_set(
                adapter, result.tset, source, n_windows=256, zoo_dir=model_dir,
                tokenizer=loaded.tokenizer,
            )  # fmt: skip
            results[kind] = (result, report)
        tc_result, tc = results["transcoder"]
        _, sae = results["sae"]
        per_token_flops = adapter.n_layers * 6 * 2 * adapter.d_model * width
        achieved = tc_result.tokens_per_second * per_token_flops
        peak_matmul = matmul_flops(256, adapter.d_model, width, device)
        layer_rec = [v["ce_loss_recovered"] for v in tc["layers"].values()]
        rows.append(
            {
                "task": f"{task} ({manifest.spec.arch})",
                "d_model": adapter.d_model,
                "layers": adapter.n_layers,
                "width": width,
                "L0 (tc)": tc["mean"]["l0"],
                "CE rec min layer (tc)": min(layer_rec),
                "CE rec all layers (tc)": tc["all_layers"]["ce_loss_recovered"],
                "task metric kept (tc)": tc["task"]["fraction_kept"],
                "dead (tc)": tc["mean"]["dead_fraction"],
                "L0 (sae)": sae["mean"]["l0"],
                "CE rec mean (sae)": sae["mean"]["ce_loss_recovered"],
                "CE rec mean (tc)": tc["mean"]["ce_loss_recovered"],
                "tokens/s": tc_result.tokens_per_second,
                "train/matmul FLOP/s": achieved / peak_matmul,
            }
        )
        extra.append({"task": task, "transcoder": tc, "sae": sae, "zoo_metrics": manifest.metrics})
        print(json.dumps(rows[-1], indent=1), flush=True)

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_cuda = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    headers = list(rows[0])
    lines = [
        "# Transcoder benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"device {device}, torch {torch.__version__}",
        "- command: python3 benchmarks/transcoder_benchmark.py "
        + (f"--models {args.models} " if args.models else f"--tasks {args.tasks} ")
        + f"--steps {args.steps} --k {args.k} --device {args.device}",
        f"- TopK k={args.k}, width {args.expansion} x d_model, {args.steps} steps of 256 tokens",
        f"- peak memory: {peak_rss / 2**20:.0f} MiB resident"
        + (f", {peak_cuda / 2**20:.0f} MiB CUDA" if peak_cuda else ""),
        "- bars: L0 <= 32 with CE rec >= 0.90 per layer; task metric kept >= 0.90; dead < 0.10",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(extra, indent=1, default=float))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
