"""Train the zoo's reference models with their default configurations and check them
against the quality bars.

Runs every task on GPT-2, and greater-than and modular addition on GPT-NeoX and Llama
(the cross-architecture pairs), each with the task's default shape, schedule and seed 0.
Each finished model appends one JSON line to ``benchmarks/results/zoo.jsonl`` (task,
architecture, parameters, training seconds, held-out metrics, bars, machine, load,
date); after each model the markdown table ``benchmarks/results/zoo.md`` is rewritten
from all rows of the current run, so several processes can share the work
(``--only``) and the table survives an interrupted run. The budget the defaults are
tuned for is 10 minutes per model on 2 CPU cores; training seconds are wall-clock, so
read them with the recorded load average.

Checkpoints go to ``--out-root`` (default ``ingest.paths.home()/zoo``, the zoo the demo
and the transcoder benchmarks read) as ``TASK-ARCH``. A model already there is replaced
only with ``--overwrite`` (transcoder sets trained on it then no longer fit it); without
it the run stops before any training, naming them. Every ``--only`` pair, the device and
the output directories are checked before the first model trains.

    python3 benchmarks/zoo_benchmark.py [--threads 2] [--device cpu] [--only ioi:gpt2 ...]
        [--overwrite | --out-root DIR]
    python3 benchmarks/zoo_benchmark.py --report-only   # re-render zoo.md from zoo.jsonl
"""

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _cli import (  # benchmarks/_cli.py (the scripts run as files)
    RESULTS,
    check_out,
    command_line,
    device_name,
    path,
    positive,
    run_main,
    write_results,
)
from _machine import cpu_name  # benchmarks/_machine.py

from ingest.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError

RUNS: tuple[tuple[str, str], ...] = (
    ("greater_than", "gpt2"),
    ("modular_addition", "gpt2"),
    ("ioi", "gpt2"),
    ("induction", "gpt2"),
    ("greater_than", "neox"),
    ("greater_than", "llama"),
    ("modular_addition", "neox"),
    ("modular_addition", "llama"),
)
HEADERS = [
    "task",
    "arch",
    "params",
    "train s",
    "held-out metrics",
    "bar",
    "bar met",
    "<= 600 s",
    "load (1 min)",
    "machine",
    "date",
]
BUDGET_SECONDS = 600.0


def pair(text: str) -> tuple[str, str]:
    """An argparse type: ``TASK:ARCH``."""
    task, sep, arch = text.partition(":")
    if not sep or not task or not arch:
        raise argparse.ArgumentTypeError(f"{text!r} is not TASK:ARCH (e.g. ioi:gpt2)")
    return task, arch


def check_runs(runs: tuple[tuple[str, str], ...], out_root: Path, overwrite: bool) -> None:
    """Every task and architecture exists and every checkpoint directory may be written
    (an existing model only with ``overwrite``), before the first model trains."""
    from ingest.zoo.checkpoint import CHECKPOINT_FILES, MANIFEST
    from ingest.zoo.trainer import resolve_spec

    # what train_zoo_model may replace: a model's files (a save stages in ".saving-*")
    model_files = {*CHECKPOINT_FILES, "generation_config.json", MANIFEST}
    existing = []
    for task_name, arch in runs:
        resolve_spec(task_name, arch)  # an unknown name: the registries' one-line error
        out = check_out(out_root / f"{task_name}-{arch}", "--out-root", directory=True)
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
        names = {n for n in names if not n.startswith(".saving-")}
        if names - model_files:
            raise FailedPreconditionError(
                f"--out-root {out_root}: {out} holds files that are not a zoo model's "
                f"({', '.join(sorted(names - model_files)[:3])}); choose another --out-root"
            )
        if names:
            existing.append(out.name)
    if existing and not overwrite:
        raise AlreadyExistsError(
            f"--out-root {out_root} already holds {', '.join(existing)}: pass --overwrite to "
            "replace them (the demo and transcoder sets trained on them read these "
            "checkpoints), or train elsewhere with --out-root DIR"
        )


def train_one(task_name: str, arch: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ingest.zoo.tasks import get_task
    from ingest.zoo.trainer import train_zoo_model

    load_before = os.getloadavg()[0]
    result = train_zoo_model(
        task_name,
        arch,
        seed=0,
        device=args.device,
        out_dir=args.out_root / f"{task_name}-{arch}",
        overwrite=args.overwrite,  # checked for every model in check_runs
    )
    return {
        "run": args.run,
        "task": task_name,
        "arch": arch,
        "n_parameters": result.n_parameters,
        "train_seconds": round(result.train_seconds, 1),
        "metrics": result.metrics,
        "bars": [b.describe() for b in get_task(task_name).quality_bars()],
        "bar_met": all(result.passed.values()),
        "load_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
        f"{args.device}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": args.note,
        "command": command_line(),
    }


def render(rows: list[dict[str, Any]]) -> str:
    from ingest.zoo.report import markdown_table, metrics_summary

    order = {pair: i for i, pair in enumerate(RUNS)}
    rows = sorted(rows, key=lambda r: order.get((r["task"], r["arch"]), len(order)))
    table = [
        [
            r["task"],
            r["arch"],
            r["n_parameters"],
            r["train_seconds"],
            metrics_summary(r["metrics"]),
            "; ".join(r["bars"]),
            "pass" if r["bar_met"] else "FAIL",
            "yes" if r["train_seconds"] <= BUDGET_SECONDS else "no",
            " / ".join(str(x) for x in r["load_before_after"]),
            r["machine"],
            r["date"],
        ]
        for r in rows
    ]
    notes = sorted({r["note"] for r in rows if r.get("note")})
    versions = sorted({f"python {r['python']}, torch {r['torch']}" for r in rows})
    commands = sorted({r["command"] for r in rows if r.get("command")})
    lines = [
        "# Zoo benchmark",
        "",
        "Written by `python3 benchmarks/zoo_benchmark.py`: default configurations, seed 0,",
        "held-out metrics over the whole held-out split. 'bar met': every quality bar holds;",
        f"'<= {BUDGET_SECONDS:.0f} s': training fit the budget of 10 minutes on 2 CPU cores.",
        "Training seconds are wall-clock; 'load' is the machine's 1-minute load average",
        "before / after training (other processes sharing the CPUs inflate the seconds).",
        "",
        *[f"- {v}" for v in versions],
        *[f"- command: `{c}`" for c in commands],
        f"- rendered by: `{command_line()}`",
        *[f"- note: {n}" for n in notes],
        "",
        markdown_table(HEADERS, table),
        "",
    ]
    return "\n".join(lines)


def read_rows(path: Path, run: str | None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if run is None and rows:
        run = rows[-1]["run"]
    return [r for r in rows if r["run"] == run]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--only", type=pair, nargs="*", default=None, help="TASK:ARCH pairs")
    parser.add_argument(
        "--out-root",
        type=path,
        default=None,
        help="checkpoints go here (default: $CIRCUITSCOPE_HOME/zoo)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace models already in --out-root"
    )
    parser.add_argument(
        "--results-dir", type=path, default=RESULTS, help="zoo.jsonl and zoo.md go here"
    )
    parser.add_argument(
        "--run",
        default=datetime.now(UTC).strftime("%Y-%m-%d"),
        help="label shared by the processes of one benchmark run (default: today's date)",
    )
    parser.add_argument("--note", default="", help="a line about the run's conditions")
    parser.add_argument("--report-only", action="store_true", help="only re-render zoo.md")
    args = parser.parse_args(argv)
    check_out(args.results_dir, "--results-dir", directory=True)
    jsonl, markdown = args.results_dir / "zoo.jsonl", args.results_dir / "zoo.md"
    if not args.report_only:
        import torch

        from ingest.paths import home

        args.out_root = args.out_root or home() / "zoo"
        runs = tuple(args.only) if args.only else RUNS
        check_runs(runs, args.out_root, args.overwrite)
        torch.set_num_threads(args.threads)
        for task_name, arch in runs:
            row = train_one(task_name, arch, args)
            args.results_dir.mkdir(parents=True, exist_ok=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{task_name}/{arch}: {row['metrics']} in {row['train_seconds']} s",
                file=sys.stderr,
                flush=True,
            )
            markdown.write_text(render(read_rows(jsonl, args.run)))
    rows = read_rows(jsonl, None if args.report_only else args.run)
    if not rows:
        raise NotFoundError(
            f"no rows in {jsonl} to render: run the benchmark (without --report-only) "
            "first, or give the --results-dir that holds its zoo.jsonl"
        )
    text = render(rows)
    print(text)
    write_results(markdown, text)
    return 0 if all(r["bar_met"] for r in rows) else 1


if __name__ == "__main__":
    run_main(main)
