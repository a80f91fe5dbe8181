"""``circuitscope zoo``: train, list and evaluate task-zoo models.

    circuitscope zoo train TASK --arch ARCH [--steps N] [--seed S] [--device D] [--out DIR] [--tiny]
    circuitscope zoo list
    circuitscope zoo eval DIR [--device D] [--max-examples N]

Task and architecture names come from the registries (``ingest.zoo.tasks.TASKS``,
``ingest.zoo.architectures.ARCHITECTURES``); an unknown name, a directory that is not a
zoo checkpoint or a missing device raises an ``ingest.errors`` exception, which the
console script prints as one line with exit code 2. Torch is imported only when a
subcommand runs.
"""

import argparse

from ingest.arguments import int_in, path


def register(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser(
        "zoo",
        help="train, list and evaluate task-zoo models",
        description="Small transformers trained on synthetic tasks with known circuits.",
    )
    commands = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)

    train = commands.add_parser("train", help="train a task-zoo model and save it")
    train.add_argument("task", help="task name (see 'circuitscope zoo list')")
    train.add_argument(
        "--arch",
        default="gpt2",
        help="architecture, e.g. gpt2, neox or llama (all: 'circuitscope zoo list'; default: gpt2)",
    )
    train.add_argument(
        "--steps", type=int_in(1), default=None, help="training steps (the task's default)"
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    train.add_argument(
        "--out",
        type=path,
        default=None,
        help="output directory (default: $CIRCUITSCOPE_HOME/zoo/TASK-ARCH, with -tiny "
        "appended for --tiny)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace a zoo model already in --out"
    )
    train.add_argument("--tiny", action="store_true", help="tiny model, a few seconds")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    listing = commands.add_parser("list", help="tasks, architectures and trained checkpoints")
    listing.set_defaults(handler=_list)

    ev = commands.add_parser("eval", help="held-out task metrics of a checkpoint directory")
    ev.add_argument("directory", type=path, help="a directory made by 'circuitscope zoo train'")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ev.add_argument(
        "--max-examples",
        type=int_in(1),
        default=None,
        help="evaluate on at most N held-out examples, spread evenly over the split",
    )
    ev.set_defaults(handler=_eval)


def _train(args: argparse.Namespace) -> int:
    from ingest.devices import resolve_device
    from ingest.zoo.report import bar_table
    from ingest.zoo.trainer import train_zoo_model

    resolve_device(args.device)
    result = train_zoo_model(
        args.task,
        args.arch,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        out_dir=args.out,
        tiny=args.tiny,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"saved {result.spec.task} on {result.spec.arch} to {result.out_dir}")
    print(f"{result.n_parameters} parameters, trained in {result.train_seconds:.1f} s")
    print(bar_table(result.spec.task, result.metrics))
    return 0


def _list(args: argparse.Namespace) -> int:
    from ingest.zoo.architectures import ARCHITECTURES
    from ingest.zoo.checkpoint import default_root, list_checkpoints
    from ingest.zoo.report import metrics_summary, text_table
    from ingest.zoo.tasks import TASKS

    task_rows: list[list[object]] = []
    for name in TASKS:
        task = TASKS.get(name)
        bars = "; ".join(b.describe() for b in task.quality_bars())
        task_rows.append([name, task.description, bars])
    print("tasks:")
    print(text_table(["task", "prompt -> answer", "quality bar"], task_rows))
    print()
    arch_rows: list[list[object]] = [[n, ARCHITECTURES.get(n).model_type] for n in ARCHITECTURES]
    print("architectures:")
    print(text_table(["arch", "HF model_type"], arch_rows))
    print()
    root = default_root()
    found = list_checkpoints(root)
    print(f"checkpoints under {root}:")
    if not found:
        print("  none yet: train one with 'circuitscope zoo train TASK --arch ARCH'")
        return 0
    rows: list[list[object]] = [
        [d.name, m.spec.task, m.spec.arch, m.n_parameters, metrics_summary(m.metrics)]
        for d, m in found
    ]
    print(text_table(["directory", "task", "arch", "params", "held-out metrics"], rows))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ingest.devices import resolve_device
    from ingest.zoo.checkpoint import evaluate_checkpoint, read_manifest
    from ingest.zoo.report import bar_table

    manifest = read_manifest(args.directory)
    resolve_device(args.device)
    metrics = evaluate_checkpoint(args.directory, args.device, args.max_examples)
    spec = manifest.spec
    sample = "" if args.max_examples is None else f"; on at most {args.max_examples} examples"
    print(f"{args.directory}: {spec.task} on {spec.arch}, seed {spec.seed}{sample}")
    print(bar_table(spec.task, metrics))
    return 0
