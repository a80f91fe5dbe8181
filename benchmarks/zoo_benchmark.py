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

    python3 benchmarks/zoo_benchmark.py [--threads 2] [--device cpu] [--only ioi:gpt2 ...]
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

from _machine import cpu_name  # benchmarks/_machine.py (the scripts run as files)

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
RESULTS = Path(__file__).parent / "results"


def train_one(task_name: str, arch: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ingest.paths import home
    from ingest.zoo.tasks import get_task
    from ingest.zoo.trainer import train_zoo_model

    out_root = args.out_root or home() / "zoo"
    load_before = os.getloadavg()[0]
    result = train_zoo_model(
        task_name,
        arch,
        seed=0,
        device=args.device,
        out_dir=out_root / f"{task_name}-{arch}",
        overwrite=True,  # the benchmark rebuilds the zoo
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
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="TASK:ARCH pairs to run")
    parser.add_argument("--out-root", type=Path, default=None, help="checkpoints go here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--run",
        default=datetime.now(UTC).strftime("%Y-%m-%d"),
        help="label shared by the processes of one benchmark run (default: today's date)",
    )
    parser.add_argument("--note", default="", help="a line about the run's conditions")
    parser.add_argument("--report-only", action="store_true", help="only re-render zoo.md")
    args = parser.parse_args(argv)
    jsonl, markdown = args.results_dir / "zoo.jsonl", args.results_dir / "zoo.md"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        runs = RUNS if not args.only else tuple(tuple(p.split(":", 1)) for p in args.only)
        for task_name, arch in runs:
            row = train_one(task_name, arch, args)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task_name}/{arch}: {row['metrics']} in {row['train_seconds']} s", flush=True)
            markdown.write_text(render(read_rows(jsonl, args.run)))
    rows = read_rows(jsonl, None if args.report_only else args.run)
    text = render(rows)
    markdown.write_text(text)
    print(text)
    return 0 if rows and all(r["bar_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
