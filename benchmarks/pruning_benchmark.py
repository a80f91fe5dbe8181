"""Pruning benchmark: seconds and peak memory of turning a full graph into a pruned one.

What the ingest worker does after attributing a prompt: ``AttributionResult.to_graph()``
(influence, node and edge pruning, the full graph's scores, the pruned graph's node and
edge lists). The graphs are real attribution graphs of the attribution benchmark's model
(a 4-layer zoo GPT-2 architecture with random weights and a TopK transcoder set of width
512, k 4; ``benchmarks/attribution_benchmark.py``), one per prompt length, saved as
artifacts. Each is then pruned in a fresh subprocess, so the peak resident memory it
reports is that of the pruning alone, as a rise over the loaded artifact, and as a
multiple of the float32 adjacency's size. Prints the table (machine, date, command) and
writes it to ``--out`` (default ``benchmarks/results/pruning.md``).

    python3 benchmarks/pruning_benchmark.py                   # 64, 128, 256 tokens
    python3 benchmarks/pruning_benchmark.py --lengths 512     # about 12 minutes to attribute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _cli import REPO, RESULTS, check_out, command_line, path, positive, run_main, write_results
from _machine import cpu_name


def make_graph(length: int, directory: Path) -> None:
    """Attribute a random prompt of ``length`` tokens and save the full graph."""
    import torch
    from attribution_benchmark import build

    from ingest.attribution.artifact import save_artifact
    from ingest.attribution.attribute import attribute

    torch.manual_seed(0)
    adapter, transcoders = build(max(length, 16), 512, 4, "cpu")
    prompt = torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(length))
    save_artifact(attribute(adapter, transcoders, prompt, batch_size=64), directory)


def measure(directory: Path) -> dict[str, float]:
    """Prune the saved graph as the ingest worker does; time and peak memory."""
    import torch

    from ingest.attribution.artifact import load_artifact

    torch.set_num_threads(1)
    result = load_artifact(directory)
    result.adjacency.sum()  # page the memory-mapped file in: the worker holds it in memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    graph = result.to_graph(pruned=True)
    seconds = time.perf_counter() - start
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    adjacency_mb = result.adjacency.numel() * 4 / 2**20
    return {
        "nodes": result.n_nodes,
        "adjacency_mb": adjacency_mb,
        "seconds": seconds,
        "rise_mb": rise,
        "ratio": rise / adjacency_mb,
        "kept_nodes": len(graph.nodes),
        "kept_edges": graph.n_edges,
    }


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO, env=env
    )
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=positive, nargs="+", default=[64, 128, 256], help="prompt tokens"
    )
    parser.add_argument("--out", type=path, default=RESULTS / "pruning.md", help="results file")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make is not None:
        make_graph(int(args.make[0]), Path(args.make[1]))
        return 0
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return 0
    if not args.no_write:
        check_out(args.out)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            directory = Path(tmp) / f"graph-{length}"
            _run("--make", str(length), str(directory))
            row = {"tokens": length, **json.loads(_run("--measure", str(directory)))}
            rows.append(row)
            print(
                f"{length:>4} tokens  {row['nodes']:>6} nodes  {row['seconds']:7.2f} s  "
                f"peak +{row['rise_mb']:.0f} MB ({row['ratio']:.1f}x the adjacency)",
                file=sys.stderr,
                flush=True,
            )
    lines = [
        "# Pruning benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} cores, "
        "1 torch thread, CPU.",
        "",
        "`AttributionResult.to_graph()` on real attribution graphs of the attribution "
        "benchmark's model (4-layer zoo GPT-2 architecture, random weights, TopK transcoders "
        "of width 512, k 4), at the default thresholds (nodes 0.8, edges 0.98). Peak memory: "
        "the rise of the measuring process's maximum resident set over the loaded artifact, "
        "and that rise as a multiple of the float32 adjacency.",
        "",
        "| tokens | nodes | adjacency MB | seconds | peak rise MB | x adjacency | kept nodes "
        "| kept edges |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['nodes']} | {r['adjacency_mb']:.0f} | {r['seconds']:.2f} | "
            f"{r['rise_mb']:.0f} | {r['ratio']:.1f} | {r['kept_nodes']} | {r['kept_edges']} |"
        )
    lines += ["", f"Command: `{command_line()}`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(args.out, text)
    return 0


if __name__ == "__main__":
    run_main(main)
