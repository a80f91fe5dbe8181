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
    args = parser.parse_args()
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
