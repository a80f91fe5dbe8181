"""Train the zoo's reference models with their default configurations and check them
against the quality bars.

Runs every task on GPT-2, and greater-than and modular addition on GPT-NeoX and Llama
(the cross-architecture pairs), each with the task's default shape, schedule and seed 0.
Prints a table (task, architecture, parameters, training seconds, held-out metrics,
pass/fail against the bar, machine, date) and writes it as markdown to
``benchmarks/results/zoo.md``. The budget the defaults are tuned for is 10 minutes per
model on 2 CPU cores; training seconds are wall-clock, so note the machine's load
(recorded in the file) when comparing.

    python3 benchmarks/zoo_benchmark.py [--threads 2] [--device cpu] [--only ioi:gpt2 ...]
"""

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from ingest.paths import home
from ingest.zoo.report import markdown_table, metrics_summary, text_table
from ingest.zoo.tasks import get_task
from ingest.zoo.trainer import train_zoo_model

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
HEADERS = ["task", "arch", "params", "train s", "held-out metrics", "bar", "bar met", "<= 600 s"]
BUDGET_SECONDS = 600.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="TASK:ARCH pairs to run")
    parser.add_argument("--out-root", type=Path, default=None, help="checkpoints go here")
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent / "results" / "zoo.md"
    )
    parser.add_argument("--note", default="", help="a line about the run's conditions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = RUNS if not args.only else tuple(tuple(p.split(":", 1)) for p in args.only)
    out_root = args.out_root or home() / "zoo"
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores visible, {args.threads} torch threads, "
        f"device {args.device}"
    )
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    rows: list[list[object]] = []
    for task_name, arch in runs:
        task = get_task(task_name)
        t0 = time.perf_counter()
        result = train_zoo_model(
            task_name, arch, seed=0, device=args.device, out_dir=out_root / f"{task_name}-{arch}"
        )
        wall = time.perf_counter() - t0
        met = all(result.passed.values())
        rows.append(
            [
                task_name,
                arch,
                result.n_parameters,
                round(result.train_seconds, 1),
                metrics_summary(result.metrics),
                "; ".join(b.describe() for b in task.quality_bars()),
                "pass" if met else "FAIL",
                "yes" if result.train_seconds <= BUDGET_SECONDS else "no",
            ]
        )
        print(f"{task_name}/{arch}: {rows[-1][4]} ({wall:.0f} s with evaluation)", flush=True)
    load_after = os.getloadavg()
    print(text_table(HEADERS, rows))
    lines = [
        "# Zoo benchmark",
        "",
        "Written by `python3 benchmarks/zoo_benchmark.py`: default configurations, seed 0,",
        "held-out metrics over the whole held-out split. 'bar met': every quality bar holds;",
        f"'<= {BUDGET_SECONDS:.0f} s': training fit the time budget (10 minutes on 2 cores).",
        "",
        f"- date: {started.isoformat(timespec='seconds')}",
        f"- machine: {machine}",
        f"- load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}"
        " (other processes sharing the CPUs inflate the training seconds)",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        markdown_table(HEADERS, rows),
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print(f"wrote {args.results}")
    return 0 if all(r[-2] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
