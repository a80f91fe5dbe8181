"""``circuitscope ingest``: compute graphs for a prompt file and store them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ingest.arguments import finite_at_least, int_in, positive_share
from ingest.store.config import MAX_BATCH_SIZE


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="compute attribution graphs for a JSONL prompt file and write them to the store",
        description=(
            'Reads prompts from a JSONL file (one {"prompt": ...} object per line, with '
            "optional counterfactual, task, id, correct/incorrect), computes each full "
            "attribution graph, saves it as an artifact on disk and writes the pruned graph "
            "to the graph store (NEO4J_URI, or the embedded server when unset). Rerunning "
            "skips finished graphs; several workers may share one file."
        ),
    )
    parser.add_argument("--prompts", required=True, type=Path, help="JSONL prompt file")
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--transcoders", required=True, type=Path, help="transcoder set dir")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="where full-graph artifacts go (default: $CIRCUITSCOPE_HOME/artifacts)",
    )
    parser.add_argument("--node-threshold", type=positive_share, default=0.8, help="(0, 1]")
    parser.add_argument("--edge-threshold", type=positive_share, default=0.98, help="(0, 1]")
    parser.add_argument("--max-feature-nodes", type=int_in(0), default=None)
    parser.add_argument("--batch-size", type=int_in(1), default=64, help="backward batch (rows)")
    parser.add_argument(
        "--store-batch-size",
        type=int_in(1, MAX_BATCH_SIZE),
        default=None,
        help="rows per UNWIND",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--strict", action="store_true", help="abort on the first bad line instead of skipping"
    )
    parser.add_argument(
        "--max-retry-seconds",
        type=finite_at_least(0.0),
        default=300.0,
        help="how long to keep retrying while the store is unreachable",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import sys
    import threading

    from ingest.errors import UnavailableError
    from ingest.paths import check_output, home
    from ingest.store import StoreConfig, open_store
    from ingest.worker.compute import AttributionComputer, feature_records
    from ingest.worker.keys import GraphSettings
    from ingest.worker.prompts import check_prompt_file
    from ingest.worker.worker import IngestOptions, IngestSummary, IngestWorker

    check_prompt_file(args.prompts)
    if args.artifacts is not None:
        check_output(args.artifacts, "--artifacts", directory=True)
    settings = GraphSettings(
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        max_feature_nodes=args.max_feature_nodes,
    )
    options = IngestOptions(
        artifacts_dir=args.artifacts or home() / "artifacts",
        settings=settings,
        strict=args.strict,
        store_batch_size=args.store_batch_size,
        max_retry_s=args.max_retry_seconds,
        progress=not args.no_progress,
    )

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    computer = AttributionComputer.from_paths(
        args.model,
        args.transcoders,
        settings,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    stop = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        # os.write, not print: the signal may arrive inside another write to stderr
        if stop.is_set():
            # a second Ctrl-C: leave now; a graph cut off midway is repaired by a rerun
            os.write(2, b"\ncircuitscope: stopped at once; rerun the same command to finish\n")
            os._exit(130)
        stop.set()
        os.write(2, b"\nstopping after the current prompt (Ctrl-C again stops at once)\n")

    summary = IngestSummary()
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        config = StoreConfig.from_env()
        with open_store(config) as store:
            say(f"graph store: {config.describe(store.config)}")
            worker = IngestWorker(store, computer, options, on_message=say, interrupted=stop.is_set)
            try:
                worker.register(feature_records(args.transcoders, computer.set_id))
                worker.run(args.prompts, summary, stop=stop.is_set)
            except UnavailableError:
                if not stop.is_set():
                    raise  # else: Ctrl-C ended a wait for the store
    finally:
        signal.signal(signal.SIGINT, previous)
    print("\n".join(summary.lines()))
    if stop.is_set():
        say("circuitscope: interrupted; rerun the same command to finish the file")
        return 130
    return 0
