"""One TopK or BatchTopK training step: the dense formulation against the sparse step.

Both run the trainer's step on the same modules and synthetic batches: loss, backward,
removal of the decoder-parallel gradient, fused Adam, decoder renormalization, the
dead-latent counters. "dense" is ``Transcoder.dense_loss`` (the activation module's
dense (batch, width) activations, a dense decoder matmul and ``aux_k_loss``, autograd
through gather/scatter/index_select); "sparse" is ``Transcoder.loss``
(``ingest/transcoders/sparse.py``). Rounds alternate between the two so that another
job's load falls on both; the table gives the best round of each.

``ratio`` divides the dense formulation's FLOPs (``10 d w`` per token and layer, plus
``4 d^2`` for the default skip connection: ``transcoder_benchmark.step_flops``) by the
step time and by this machine's matmul FLOP/s at the step's shapes
(``transcoder_benchmark.matmul_flops``, best window of the run).

``--compile`` adds a third column: the trainer's compiled step (``TrainConfig.compile``:
the loss in fixed shapes compiled whole by ``torch.compile``, as CUDA graphs on a GPU),
with AuxK on a fixed ``--aux-rows`` rows.

``--device cuda`` times the steps on a GPU (synchronized before each clock reading).
``--profile N`` then profiles N sparse steps at the first dead fraction with
``torch.profiler`` and appends the operators that took the most time (device time on a
GPU, CPU time otherwise), with their call counts: where a step at small shapes spends
its time (launches, synchronizations, small reductions) rather than what it costs.

    python3 benchmarks/transcoder_step.py [--arch topk|batchtopk] [--d-model 64] [--layers 2]
        [--width 512] [--dead 0,0.65] [--aux-rows 0,256] [--rounds 6] [--steps 30]
        [--device cpu|cuda] [--compile] [--profile 20]
        [--out benchmarks/results/transcoder_step[_batchtopk][_cuda].md]
"""

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cli import (  # benchmarks/_cli.py
    RESULTS,
    check_out,
    command_line,
    device_name,
    int_in,
    int_list,
    path,
    positive,
    run_main,
    share_list,
    write_results,
)
from _machine import cpu_name  # benchmarks/_machine.py
from transcoder_benchmark import (  # benchmarks/transcoder_benchmark.py
    matmul_flops,
    step_flops,
)

from ingest.devices import resolve_device, retain_freed_cpu_memory
from ingest.transcoders.trainable import Trainable, compiled_loss
from ingest.transcoders.trainer import TrainConfig
from ingest.transcoders.transcoder import Transcoder


def build_step(
    args: argparse.Namespace,
    data_x: torch.Tensor,
    data_y: torch.Tensor,
    dead_fraction: float,
    aux_rows: int,
) -> Callable[[int, str], None]:
    """A fresh set of modules and its training step ``step(i, form)`` on batch ``i``
    (``form``: one of ``FORMS``), with the first ``dead_fraction`` of every layer's
    latents counted dead."""
    n_layers, d, width, batch = args.layers, args.d_model, args.width, args.batch
    cfg = TrainConfig(arch=args.arch, width=width, batch_size=batch, aux_k_rows=aux_rows)
    device = data_x.device
    trainable = Trainable(cfg.module_config(d), n_layers, False)
    trainable.reset(torch.Generator().manual_seed(0))
    trainable.to(device)
    modules = trainable.modules_list()
    optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-3, fused=True)
    dead = torch.zeros(n_layers, width, dtype=torch.bool, device=device)
    dead[:, : int(dead_fraction * width)] = True
    since = torch.zeros(n_layers, width, dtype=torch.long, device=device)
    compiled = compiled_loss(trainable, device) if args.compile else None

    def step(i: int, form: str) -> None:
        rows = torch.arange(i * batch, (i + 1) * batch, device=device) % data_x.shape[1]
        x, y = data_x.index_select(1, rows), data_y.index_select(1, rows)
        optimizer.zero_grad(set_to_none=True)
        if form == "compiled":
            assert compiled is not None
            parts = compiled(x, y, dead, None)
            (parts.mse + parts.aux).backward()
            fired = parts.fired
        else:
            loss = Transcoder.dense_loss if form == "dense" else Transcoder.loss
            per_layer = [loss(m, x[j], y[j], dead[j]) for j, m in enumerate(modules)]
            torch.stack([p.mse + p.aux for p in per_layer]).sum().backward()
            fired = torch.stack([p.fired for p in per_layer])
        for m in modules:
            m.remove_parallel_grad_()
        optimizer.step()
        for m in modules:
            m.after_step_()
        since.add_(batch).masked_fill_(fired, 0)

    return step


def measure(
    step: Callable[[int, str], None],
    forms: list[str],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """Best seconds per step of each form over alternating rounds."""
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(args.rounds):
        for form in forms:
            for i in range(5):
                step(i, form)
            synchronize(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step(i, form)
            synchronize(device)
            best[form] = min(best[form], (time.perf_counter() - start) / args.steps)
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[int, str], None], form: str, n: int, device: torch.device) -> str:
    """The top operators of ``n`` steps of ``form`` (after 5 unprofiled ones) as a table."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(5):
        step(i, form)
    synchronize(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for i in range(n):
            step(i, form)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort_by, row_limit=25))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument("--d-model", type=positive, default=64)
    parser.add_argument("--layers", type=positive, default=2)
    parser.add_argument("--width", type=positive, default=512)
    parser.add_argument("--batch", type=positive, default=1024)
    parser.add_argument(
        "--dead", type=share_list, default="0,0.65", help="fractions of latents counted dead"
    )
    parser.add_argument(
        "--aux-rows", type=int_list(0), default="0,256", help="AuxK rows per batch (0: all)"
    )
    parser.add_argument("--rounds", type=positive, default=6)
    parser.add_argument("--steps", type=positive, default=30, help="timed steps per round")
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N or auto"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the trainer's compiled step"
    )
    parser.add_argument(
        "--profile",
        type=int_in(0),
        default=0,
        help="profile this many sparse (with --compile: compiled) steps (0: none)",
    )
    parser.add_argument(
        "--out",
        type=path,
        default=None,
        help="default: benchmarks/results/transcoder_step[_ARCH][_DEV].md",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    suffix = ("" if args.arch == "topk" else f"_{args.arch}") + (
        "" if device.type == "cpu" else f"_{device.type}"
    )
    args.out = check_out(args.out or RESULTS / f"transcoder_step{suffix}.md")
    # the module configuration (k against the width) is refused here, before any data
    module_cfg = TrainConfig(arch=args.arch, width=args.width).module_config(args.d_model)
    retain_freed_cpu_memory()  # as the trainer does
    d, n_layers, width, batch = args.d_model, args.layers, args.width, args.batch
    gen = torch.Generator().manual_seed(0)
    data_x = torch.randn(n_layers, 16 * batch, d, generator=gen).to(device)
    data_y = torch.randn(n_layers, 16 * batch, d, generator=gen).to(device)
    dead_fractions: list[float] = args.dead
    aux_row_counts: list[int] = args.aux_rows
    forms = ["dense", "sparse", *(["compiled"] if args.compile else [])]
    rows = []
    reference = 0.0
    for dead_fraction in dead_fractions:
        for aux_rows in aux_row_counts:
            if dead_fraction == 0 and aux_rows != aux_row_counts[0]:
                continue  # without dead latents AuxK never runs: one row is enough
            step = build_step(args, data_x, data_y, dead_fraction, aux_rows)
            best = measure(step, forms, args, device)
            reference = max(reference, matmul_flops(batch, d, width, device))
            rows.append((dead_fraction, aux_rows, best))
            print(rows[-1], file=sys.stderr, flush=True)

    flops = step_flops(d, width, module_cfg.skip) * batch * n_layers
    lines = [
        f"# {args.arch} training step: dense formulation against the sparse step",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
        f"- command: `{command_line()}`",
        f"- d_model {d}, {n_layers} layers, width {width}, batch {batch}, k {module_cfg.k}, "
        f"AuxK k {module_cfg.k_aux}; best of {args.rounds} alternating rounds of "
        f"{args.steps} steps; "
        f"matmul reference {reference / 1e9:.0f} GFLOP/s",
        "",
        "| dead fraction | AuxK rows | "
        + " | ".join(f"{form} ms/step" for form in forms)
        + " | sparse speed-up | "
        + " | ".join(f"{form} ratio" for form in forms)
        + " |",
        "|---|---|" + "---|" * (2 * len(forms) + 1),
    ]
    for dead_fraction, aux_rows, best in rows:
        times = " | ".join(f"{best[form] * 1e3:.2f}" for form in forms)
        ratios = " | ".join(f"{flops / best[form] / reference:.3f}" for form in forms)
        lines.append(
            f"| {dead_fraction:.2f} | {aux_rows or 'all'} | {times} | "
            f"{best['dense'] / best['sparse']:.2f} | {ratios} |"
        )
    if args.profile:
        first, aux_rows = dead_fractions[0], aux_row_counts[0]
        step = build_step(args, data_x, data_y, first, aux_rows)
        form = forms[-1] if args.compile else "sparse"
        table = profile_steps(step, form, args.profile, device)
        lines += [
            "",
            f"## Profile: {args.profile} {form} steps, dead fraction {first:.2f}, "
            f"AuxK rows {aux_rows or 'all'}",
            "",
            "```",
            table.rstrip(),
            "```",
        ]
    print("\n".join(lines))
    write_results(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
