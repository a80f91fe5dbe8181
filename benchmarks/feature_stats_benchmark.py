"""Feature statistics benchmark: the memory and time of choosing each latent's top
examples in one batch (``ingest.transcoders.feature_stats._best_per_context``).

For each shape (latents, positions in a batch) it makes ReLU'd random activations and
random context keys (1,500 distinct contexts) and, in a fresh subprocess, times the
selection of the 10 best distinct contexts per latent and measures the peak resident
memory above the activations themselves. Prints the table (machine, date, command) and
writes it to ``--out`` (default ``benchmarks/results/feature_stats.md``).

    python3 benchmarks/feature_stats_benchmark.py
    PYTHONPATH=OTHER_TREE python3 benchmarks/feature_stats_benchmark.py --no-write

The second form measures another checkout of the package (old against new).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import RESULTS, check_out, command_line, path, run_main, write_results
from _machine import cpu_name

SHAPES = [(4096, 2048), (16384, 2048), (16384, 4096)]

_CHILD = """
import json, resource, sys, time, torch
from ingest.transcoders.feature_stats import _best_per_context
d_t, n = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
acts = torch.randn(n, d_t).relu_().T  # (d_t, N), as compute_feature_stats passes it
keys = torch.randint(0, 1500, (n,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
_best_per_context(acts, keys, 10)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "extra_mib": (peak - base) / 1024,
                  "acts_mib": acts.numel() * 4 / 2**20}))
"""


def _measure(d_t: int, n: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-P", "-c", _CHILD, str(d_t), str(n)],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=path, default=RESULTS / "feature_stats.md", help="results file"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    if not args.no_write:
        check_out(args.out)
    lines = [
        "| latents | positions | activations (MiB) | peak above them (MiB) | ratio | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for d_t, n in SHAPES:
        r = _measure(d_t, n)
        lines.append(
            f"| {d_t} | {n} | {r['acts_mib']:.0f} | {r['extra_mib']:.0f} | "
            f"{r['extra_mib'] / r['acts_mib']:.2f} | {r['seconds']:.2f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    header = (
        f"# Feature statistics: top-example selection per batch\n\n"
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s). "
        f"`{command_line()}`\n\n"
    )
    text = header + "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_results(args.out, text)
    return 0


if __name__ == "__main__":
    run_main(main)
