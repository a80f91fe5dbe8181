"""Ingest benchmark: end-to-end prompts/s of the ingest worker on the demo model.

Trains (or reuses) the demo's greater-than GPT-2 model and its transcoders through the
demo's own stages, then ingests N held-out prompts into a fresh embedded graph server
(temporary directory) and reports prompts/s with the split between attribution
(including the artifact write) and store writes, plus a rerun that finds every graph
done. Prints a table and writes ``benchmarks/results/ingest.md``.

    python3 benchmarks/ingest_benchmark.py               # demo model, 32 prompts
    python3 benchmarks/ingest_benchmark.py --tiny -n 8   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from ingest.store import open_store
from ingest.store.embedded import embedded_server
from ingest.worker.compute import AttributionComputer
from ingest.worker.keys import GraphSettings
from ingest.worker.worker import IngestOptions, IngestWorker
from ingest.zoo.tasks import get_task
from service import demo_pipeline
from service.demo_cli import STAGES, DemoContext

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--prompts", type=int, default=32)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    ctx = DemoContext(device="cpu", tiny=args.tiny, progress=False)
    STAGES[0].run(ctx)
    demo_pipeline.transcoders_stage(ctx)
    computer = AttributionComputer(
        ctx.results["loaded_model"], ctx.results["transcoder_set"], GraphSettings()
    )
    examples = get_task("greater_than").examples("heldout")[: args.prompts]
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
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"torch threads {args.threads}, model {'tiny' if args.tiny else 'demo'} greater-than GPT-2"
    )
    tiny_flag = " --tiny" if args.tiny else ""
    lines = [
        "# Ingest benchmark",
        "",
        f"`python3 benchmarks/ingest_benchmark.py{tiny_flag} -n {args.prompts}`",
        "",
        f"- {stamp}",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
