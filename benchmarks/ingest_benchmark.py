"""Ingest benchmark: end-to-end prompts/s of the ingest worker on the demo model.

Trains (or reuses) the demo's greater-than GPT-2 model and its transcoders through the
demo's own stages, then ingests N held-out prompts into a fresh embedded graph server
(temporary directory) and reports prompts/s with the split between attribution
(including the artifact write) and store writes, plus a rerun that finds every graph
done. Prints the table (machine, date, command) and writes it to ``--out`` (default
``benchmarks/results/ingest.md``).

The demo's model and transcoders are trained into, or reused from,
``ingest.paths.home()`` (``$CIRCUITSCOPE_HOME``), as ``circuitscope demo`` does: the
first run on a fresh home trains them (a few minutes; not part of the figures).

    python3 benchmarks/ingest_benchmark.py               # demo model, 32 prompts
    python3 benchmarks/ingest_benchmark.py --tiny -n 8 --no-write   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _cli import RESULTS, check_out, command_line, path, positive, run_main, write_results
from _machine import cpu_name

from ingest.store import open_store
from ingest.store.embedded import embedded_server
from ingest.worker.compute import AttributionComputer
from ingest.worker.keys import GraphSettings
from ingest.worker.worker import IngestOptions, IngestWorker
from ingest.zoo.tasks import get_task
from service import demo_pipeline
from service.demo_cli import STAGES, DemoContext


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--prompts", type=positive, default=32, help="held-out prompts")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny model (smoke run)")
    parser.add_argument("--threads", type=positive, default=1, help="torch threads")
    parser.add_argument("--out", type=path, default=RESULTS / "ingest.md", help="results file")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    if not args.no_write:
        check_out(args.out)

    import torch

    torch.set_num_threads(args.threads)
    ctx = DemoContext(device="cpu", tiny=args.tiny, progress=False)
    STAGES[0].run(ctx)
    demo_pipeline.transcoders_stage(ctx)
    computer = AttributionComputer(
        ctx.results["loaded_model"], ctx.results["transcoder_set"], GraphSettings()
    )
    examples = get_task("greater_than").examples("heldout")[: args.prompts]
    print(f"ingesting {len(examples)} prompts ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": e.prompt}) + "\n" for e in examples))
        with embedded_server(Path(tmp) / "db") as config, open_store(config) as store:
            options = IngestOptions(artifacts_dir=Path(tmp) / "artifacts", progress=False)
            first = IngestWorker(store, computer, options).run(prompts)
            started = time.perf_counter()
            again = IngestWorker(store, computer, options).run(prompts)
            rerun_s = time.perf_counter() - started
            sizes = [store.get_graph_summary(g) for g in first.computed]
    n = len(first.computed)
    rows = [
        ("prompts ingested", f"{n}"),
        ("prompts/s", f"{n / first.seconds:.2f}"),
        ("attribution + artifact, s/prompt", f"{first.attribution_seconds / n:.3f}"),
        ("store write, s/prompt", f"{first.store_seconds / n:.3f}"),
        ("pruned nodes / edges per graph (mean)",
         f"{sum(s.n_nodes for s in sizes) / n:.0f} / {sum(s.n_edges for s in sizes) / n:.0f}"),
        ("rerun (all skipped), s", f"{rerun_s:.2f} ({again.already_done} already done)"),
    ]  # fmt: skip
    stamp = (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()} {platform.machine()}, "
        f"{cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"torch threads {args.threads}, model {'tiny' if args.tiny else 'demo'} greater-than GPT-2"
    )
    lines = [
        "# Ingest benchmark",
        "",
        f"`{command_line()}`",
        "",
        f"- {stamp}",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_results(args.out, text)
    return 0


if __name__ == "__main__":
    run_main(main)
