"""Sweep one training setting: transcoders and SAEs on a zoo model, per value and seed.

For each value of one ``TrainConfig`` field (``--field``), each kind and each seed, it
trains a set on every layer of the model at the other defaults and evaluates it at
eval's defaults (up to 4,096 held-out answers for answer-only tasks, 64 windows otherwise).
It writes a table of CE loss recovered per layer spliced alone and their mean, all
layers spliced, FVU over every token and at the answer-predicting positions
(``fvu@pred``) and the dead fraction. The figures in docs/transcoders_measurements.md
("Answer weight", "Skip connection", "Resampling against AuxK alone") come from it:

    python3 benchmarks/transcoder_sweep.py --model ~/.cache/circuitscope/zoo/greater_than-gpt2 \\
        --field answer_weight --values 1,2,4,8,16
    python3 benchmarks/transcoder_sweep.py --model ~/.cache/circuitscope/zoo/ioi-gpt2 \\
        --field resample_every --values 0,250 --kinds transcoder

Options: ``--kinds transcoder,sae``, ``--seeds 0``, ``--out`` (default
``benchmarks/results/transcoder_sweep_<model>_<field>.md``). Every setting is checked
before any training; the table (machine, date, command) is rewritten after each
finished row, so an interrupted sweep keeps its rows, and printed at the end.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cli import (  # benchmarks/_cli.py
    RESULTS,
    check_out,
    command_line,
    int_list,
    path,
    run_main,
    write_results,
)
from _machine import cpu_name  # benchmarks/_machine.py

from ingest.errors import InvalidArgumentError
from ingest.models import load_model
from ingest.paths import home
from ingest.transcoders.config import KINDS
from ingest.transcoders.evaluation import evaluate_set
from ingest.transcoders.sources import zoo_source
from ingest.transcoders.trainer import TrainConfig, train_transcoders
from ingest.zoo.checkpoint import read_manifest


def _values(name: str, text: str) -> list[Any]:
    """The comma-separated values, typed like the field: ``bool`` and ``bool | None``
    fields take booleans, ``int | None`` ints, ``float | None`` floats."""
    annotation = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    kinds = typing.get_args(annotation) or (annotation,)  # X | None -> (X, NoneType)
    if bool in kinds:
        return [v.strip().lower() in ("1", "true", "yes") for v in text.split(",")]
    kind = next(k for k in kinds if k is not type(None))
    try:
        return [kind(v.strip()) for v in text.split(",")]
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"--values {text!r}: not values of {name} ({exc}); give comma-separated "
            f"{getattr(kind, '__name__', kind)} values"
        ) from None


def _kinds(text: str) -> list[str]:
    """An argparse type: comma-separated set kinds (``transcoder,sae``)."""
    kinds = [k.strip() for k in text.split(",")]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}"
        )
    return kinds


def _row(kind: str, value: Any, seed: int, report: dict[str, Any], seconds: float) -> str:
    layers = list(report["layers"].values())
    ce = [r["ce_loss_recovered"] for r in layers]

    def joined(key: str, fmt: str) -> str:
        return ", ".join(format(r[key], fmt) for r in layers)

    return (
        f"| {kind} | {value} | {seed} | {', '.join(f'{c:.4f}' for c in ce)} | "
        f"{sum(ce) / len(ce):.4f} | {report['all_layers']['ce_loss_recovered']:.4f} | "
        f"{joined('fvu', '.4f')} | {joined('fvu_predicting', '.4f')} | "
        f"{joined('dead_fraction', '.3f')} | {seconds:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=path, required=True, help="zoo model directory")
    parser.add_argument("--field", required=True, help="a TrainConfig field, e.g. answer_weight")
    parser.add_argument("--values", required=True, help="comma-separated, e.g. 1,4,8")
    parser.add_argument(
        "--kinds", type=_kinds, default="transcoder,sae", help=f"comma-separated: {KINDS}"
    )
    parser.add_argument("--seeds", type=int_list(0), default="0", help="comma-separated")
    parser.add_argument(
        "--out",
        type=path,
        default=None,
        help="default: benchmarks/results/transcoder_sweep_MODEL_FIELD.md",
    )
    args = parser.parse_args()

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if args.field not in fields:
        parser.error(f"--field {args.field!r} is not a TrainConfig field: one of {sorted(fields)}")
    if args.field in ("kind", "seed"):
        parser.error(f"--field {args.field}: the sweep sets it per row; use --{args.field}s")
    values = _values(args.field, args.values)
    kinds: list[str] = args.kinds
    seeds: list[int] = args.seeds
    model_dir = args.model
    read_manifest(model_dir)  # a missing or foreign --model: one line, before any work
    out = check_out(args.out or RESULTS / f"transcoder_sweep_{model_dir.name}_{args.field}.md")
    runs = [
        (value, kind, seed, TrainConfig(kind=kind, seed=seed, **{args.field: value}))
        for value in values
        for kind in kinds
        for seed in seeds
    ]  # every configuration is validated here, before any training
    work = home() / "benchmarks" / "sweep"

    loaded = load_model(str(model_dir), device="cpu")
    source = zoo_source(model_dir, loaded.tokenizer)
    began = time.perf_counter()
    rows: list[str] = []

    def table() -> str:
        lines = [
            f"# Transcoder sweep: {args.field} on {model_dir.name}",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
            f"- machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
            f"- command: `{command_line()}`; wall time "
            f"{(time.perf_counter() - began) / 60:.1f} min"
            + ("" if len(rows) == len(runs) else f"; {len(rows)} of {len(runs)} rows so far"),
            "- every other setting at TrainConfig's defaults; eval at its defaults",
            "- CE rec: CE loss recovered per layer spliced alone, at the predictions the model "
            "was trained on; fvu over every token, fvu@pred at the answer-predicting positions",
            "",
            f"| kind | {args.field} | seed | CE rec per layer | mean | all layers | fvu | "
            "fvu@pred | dead | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
        return "\n".join(lines) + "\n"

    for value, kind, seed, cfg in runs:
        run_dir = work / f"{model_dir.name}-{kind}-{args.field}-{value}-{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        result = train_transcoders(
            loaded.adapter, source, cfg, run_dir, model_id=str(model_dir), progress=False
        )
        report = evaluate_set(
            loaded.adapter, result.tset, source, zoo_dir=model_dir, tokenizer=loaded.tokenizer
        )
        rows.append(_row(kind, value, seed, report, time.perf_counter() - start))
        print(rows[-1], file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table())  # an interrupted sweep keeps its finished rows

    print(table())
    write_results(out, table())
    return 0


if __name__ == "__main__":
    run_main(main)
