"""``circuitscope demo``: the project's end-to-end demonstration, as named stages.

Each stage is a small function that reads and extends a shared :class:`DemoContext`
and returns the lines it reports; stages run in order and are timed (:data:`STAGES`):

1. ``zoo-model``: train the demo model (greater-than on GPT-2, the task's default
   configuration, seed 0) into ``ingest.paths.home()/zoo/greater_than-gpt2``, or reuse
   the checkpoint there when it was trained with the same configuration and seed, and
   report its held-out task metrics. ``--tiny`` uses the task's tiny configuration
   (``greater_than-gpt2-tiny``), a seconds-long smoke run.

2. ``transcoders``, 3. ``ingest``, 4. ``queries``, 5. ``serve``: per-layer transcoders
   for that model, attribution of held-out prompts into the graph store, queries over the
   stored circuits, and a background gRPC server (``service.demo_pipeline``).

New stages are appended to :data:`STAGES`. Torch is imported only when the command runs.
"""

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import demo_pipeline

DEMO_TASK = "greater_than"
DEMO_ARCH = "gpt2"
DEMO_SEED = 0


@dataclass
class DemoContext:
    """What the stages share: settings from the command line and each stage's results."""

    device: str
    retrain: bool = False
    tiny: bool = False
    progress: bool = True
    port: int = 50051
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One named step of the demo."""

    name: str
    description: str
    run: Callable[[DemoContext], list[str]]


def _zoo_model(ctx: DemoContext) -> list[str]:
    from ingest.zoo.report import bar_table
    from ingest.zoo.trainer import default_out_dir, train_zoo_model

    out_dir = default_out_dir(DEMO_TASK, DEMO_ARCH, tiny=ctx.tiny)
    result = train_zoo_model(
        DEMO_TASK,
        DEMO_ARCH,
        seed=DEMO_SEED,
        tiny=ctx.tiny,
        device=ctx.device,
        out_dir=out_dir,
        reuse=not ctx.retrain,
        overwrite=ctx.retrain,
        progress=ctx.progress,
    )
    ctx.results["zoo_model"] = result
    how = "reused" if result.reused else f"trained in {result.train_seconds:.1f} s"
    table = bar_table(DEMO_TASK, result.metrics)
    lines = [
        f"model: {DEMO_TASK} on {DEMO_ARCH}, {result.n_parameters} parameters, {how}",
        f"checkpoint: {Path(result.out_dir)}",
        *table.splitlines(),
    ]
    if ctx.tiny:
        lines.append("(a --tiny model trains for seconds: the bars are for the full model)")
    return lines


STAGES: tuple[Stage, ...] = (
    Stage("zoo-model", "train or reuse the greater-than GPT-2 model", _zoo_model),
    Stage("transcoders", "train or reuse per-layer transcoders", demo_pipeline.transcoders_stage),
    Stage("ingest", "attribute held-out prompts into the graph store", demo_pipeline.ingest_stage),
    Stage("queries", "query the stored circuits", demo_pipeline.queries_stage),
    Stage("serve", "serve the store over gRPC in the background", demo_pipeline.serve_stage),
)


def run_demo(ctx: DemoContext, write: Callable[[str], object] | None = None) -> DemoContext:
    """Run every stage in order, writing (to stdout by default) a header, the stage's
    lines and its time."""
    write = write or sys.stdout.write
    for i, stage in enumerate(STAGES, start=1):
        write(f"[{i}/{len(STAGES)}] {stage.name}: {stage.description}\n")
        started = time.perf_counter()
        for line in stage.run(ctx):
            write(f"    {line}\n")
        write(f"    ({stage.name} took {time.perf_counter() - started:.1f} s)\n")
    return ctx


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo",
        description=(
            "Train (or reuse) the demo model, then run the pipeline stages on it: "
            "transcoders, attribution into the graph store, queries, gRPC serving."
        ),
    )
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    demo.add_argument(
        "--port",
        type=int,
        default=50051,
        help="port of the demo gRPC server (default 50051; 0: a free one)",
    )
    demo.add_argument(
        "--retrain", action="store_true", help="train again even if a matching model exists"
    )
    demo.add_argument(
        "--tiny",
        action="store_true",
        help="use tiny models (seconds; a smoke test, not a meaningful model)",
    )
    demo.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from ingest.devices import resolve_device
    from ingest.errors import InvalidArgumentError

    resolve_device(args.device)
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must lie in 0..65535, got {args.port}")
    run_demo(DemoContext(device=args.device, retrain=args.retrain, tiny=args.tiny, port=args.port))
    return 0
