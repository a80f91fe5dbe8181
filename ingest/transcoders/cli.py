"""``circuitscope transcoders``: train, evaluate, sweep, describe and convert transcoders.

    circuitscope transcoders train --model DIR --out DIR [--kind K] [--arch A]
        [--width N | --expansion F] [--sparsity S] [--layers 0,1|all] [--steps N]
        [--prompts SPEC] [--device D] [--seed S] [--resume]
    circuitscope transcoders eval SET --model DIR [--prompts SPEC] [--windows N]
        [--task-examples N] [--split eval|train] [--json PATH]
    circuitscope transcoders pareto --model DIR --out DIR --sparsities 4,8,16 [--seeds 0,1,2]
        [--sae-sparsities 0.3,0.5]
    circuitscope transcoders stats SET --model DIR [--prompts SPEC] [--windows N] [--top-k K]
    circuitscope transcoders convert SRC DST --to saelens|sparsify|circuit_tracer

Architecture and kind choices come from :data:`ingest.transcoders.config.ARCHITECTURES`
and :data:`~ingest.transcoders.config.KINDS`. Prompt sources: ``zoo`` (default for zoo
models), ``text:PATH``, ``jsonl:PATH[:FIELD]``, ``hf:NAME[:CONFIG]``. Torch is imported
only when a subcommand runs.
"""

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingest.errors import InvalidArgumentError
from ingest.paths import check_output
from ingest.transcoders.config import (
    ARCHITECTURES,
    CLI_FIELDS,
    DEFAULT_BALANCE_RATE,
    KINDS,
    TrainConfig,
)

FORMAT_NAMES = ("circuit_tracer", "saelens", "sparsify")
#: The trainer's defaults, which the train and pareto flags default to.
DEFAULTS = TrainConfig()


def _layers(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first:
                raise ValueError(part)
            out.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers must look like 'all', '0,2' or '0-3' (ranges ascending), got {text!r}"
        ) from None
    return tuple(out)


def _list_of(convert: Callable[[str], Any], example: str) -> Callable[[str], list[Any]]:
    """An argparse type for comma-separated values, e.g. ``_list_of(int, "0,1,2")``."""

    def parse(text: str) -> list[Any]:
        try:
            return [convert(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected values like {example}, got {text!r}"
            ) from None

    return parse


_floats = _list_of(float, "4,8,16")
_ints = _list_of(int, "0,1,2")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (or hub id)")
    p.add_argument("--prompts", default=None, help="zoo | text:PATH | jsonl:PATH | hf:NAME")
    p.add_argument("--context-len", type=int, default=64, help="tokens per window (text)")
    p.add_argument("--max-tokens", type=int, default=None, help="read at most N tokens")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def _add_train_args(p: argparse.ArgumentParser, *, kind: bool = True) -> None:
    """The training flags; ``kind=False`` leaves out ``--kind`` (pareto trains both)."""
    if kind:
        p.add_argument("--kind", choices=KINDS, default=DEFAULTS.kind)
    p.add_argument(
        "--arch",
        choices=ARCHITECTURES.names(),
        default=DEFAULTS.arch,
        help=f"activation and sparsity mechanism ({DEFAULTS.arch}; docs/transcoders.md)",
    )
    p.add_argument(
        "--width", type=int, default=None, help="latents per layer (default: --expansion x d_model)"
    )
    p.add_argument(
        "--expansion",
        type=int,
        default=DEFAULTS.expansion,
        help=f"latents per layer per model dimension ({DEFAULTS.expansion})",
    )
    p.add_argument("--layers", type=_layers, default=None, help="'all', '0,2' or '0-3'")
    p.add_argument(
        "--skip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a skip connection W_skip (default: on for transcoders and CLTs, off for SAEs)",
    )
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="tokens per step")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument(
        "--buffer-mb",
        type=float,
        default=DEFAULTS.buffer_mb,
        help="activation buffer memory bound (MiB)",
    )
    p.add_argument(
        "--buffer-rows",
        type=int,
        default=DEFAULTS.buffer_rows,
        help="rows per layer (0: as many as fit --buffer-mb)",
    )
    dead = p.add_argument_group("dead latents (AuxK and resampling)")
    dead.add_argument(
        "--dead-after-tokens",
        type=int,
        default=DEFAULTS.dead_after_tokens,
        help="a latent idle this long is dead",
    )
    dead.add_argument(
        "--aux-k-coefficient", type=float, default=DEFAULTS.aux_k_coefficient, help="AuxK weight"
    )
    dead.add_argument(
        "--aux-k-rows",
        type=int,
        default=DEFAULTS.aux_k_rows,
        help="AuxK rows when every latent is dead, more as fewer are (0: every row)",
    )
    dead.add_argument(
        "--resample-every",
        type=int,
        default=DEFAULTS.resample_every,
        help="steps between resamplings (0: never)",
    )
    dead.add_argument(
        "--balance-rate",
        type=float,
        default=DEFAULTS.balance_rate,
        help="batchtopk's firing floor: per step, a latent whose firing count (averaged "
        "over ~10 batches) is under 1/32 of the mean has its encoder bias raised by this "
        "fraction of the threshold, taken back once it fires at the mean "
        f"(0: off; default {DEFAULT_BALANCE_RATE} for batchtopk)",
    )
    p.add_argument(
        "--answer-weight",
        type=float,
        default=DEFAULTS.answer_weight,
        help="loss weight of the position that predicts the answer, for prompt sources "
        "scored only at the answer (zoo tasks); 1: every token weighs the same",
    )
    e2e = p.add_argument_group("end-to-end phase (after the reconstruction steps)")
    e2e.add_argument(
        "--kl-steps",
        type=int,
        default=DEFAULTS.kl_steps,
        help="steps that add the KL of the model with every covered MLP replaced to the "
        "loss, after --steps (0: none)",
    )
    e2e.add_argument("--kl-lr", type=float, default=DEFAULTS.kl_lr, help="their learning rate")
    e2e.add_argument(
        "--kl-coefficient", type=float, default=DEFAULTS.kl_coefficient, help="the KL's weight"
    )
    e2e.add_argument(
        "--kl-batch", type=int, default=DEFAULTS.kl_batch, help="training windows per step"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the training step with torch.compile (CUDA graphs on a GPU); AuxK "
        "then runs on a fixed --aux-k-rows rows (docs/transcoders.md)",
    )
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--out", type=Path, required=True, help="output directory")


def register(subparsers: argparse._SubParsersAction) -> None:
    tc = subparsers.add_parser(
        "transcoders",
        help="train, evaluate and convert transcoders",
        description="Sparse replacements of MLP layers: per-layer, cross-layer, SAE baseline.",
    )
    commands = tc.add_subparsers(dest="tc_command", metavar="TC_COMMAND", required=True)

    train = commands.add_parser("train", help="train a transcoder set on a model")
    _add_model_args(train)
    _add_train_args(train)
    train.add_argument("--sparsity", type=float, default=None, help="k / L1 / L0 coefficient")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    train.set_defaults(handler=_train)

    ev = commands.add_parser("eval", help="L0, FVU, CE loss recovered, KL, task metric")
    ev.add_argument("set", type=Path, help="transcoder set directory")
    _add_model_args(ev)
    ev.add_argument(
        "--windows",
        type=int,
        default=None,
        help="eval windows / prompts (default 64, or up to 4096 prompts scored at the answer)",
    )
    ev.add_argument(
        "--dead-tokens", type=int, default=65_536,
        help="eval tokens over which a latent that never fires counts as dead",
    )  # fmt: skip
    ev.add_argument(
        "--split", choices=("eval", "train"), default="eval",
        help="the prompt source's split to measure on: held out (eval) or the training "
        "split, to see how much of the error is generalization",
    )  # fmt: skip
    ev.add_argument(
        "--task-examples", type=int, default=512,
        help="examples of a zoo model's task metric (of --split), clean and spliced",
    )  # fmt: skip
    ev.add_argument("--json", type=Path, default=None, help="also write the report here")
    ev.set_defaults(handler=_eval)

    pareto = commands.add_parser("pareto", help="sweep sparsity; transcoders vs SAEs")
    _add_model_args(pareto)
    _add_train_args(pareto, kind=False)
    pareto.add_argument("--sparsities", type=_floats, required=True, help="e.g. 4,8,16,32")
    pareto.add_argument(
        "--sae-sparsities", type=_floats, default=None,
        help="the SAEs' own values (default: --sparsities): under --arch relu or jumprelu "
        "the kinds reach a given L0 at different coefficients",
    )  # fmt: skip
    pareto.add_argument(
        "--seeds", type=_ints, default=None,
        help="train every point at each of these seeds (e.g. 0,1,2) and report the spread; "
        "default: --seed",
    )  # fmt: skip
    pareto.set_defaults(handler=_pareto)

    stats = commands.add_parser("stats", help="per-latent statistics (feature_stats.json)")
    stats.add_argument("set", type=Path, help="transcoder set directory")
    _add_model_args(stats)
    stats.add_argument("--windows", type=int, default=128, help="eval windows (at least 1)")
    stats.add_argument("--top-k", type=int, default=10, help="top examples per latent (0: none)")
    stats.set_defaults(handler=_stats)

    convert = commands.add_parser("convert", help="convert between transcoder file formats")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--to", choices=FORMAT_NAMES, required=True)
    convert.add_argument(
        "--from", dest="src_format", choices=("auto", *FORMAT_NAMES), default="auto"
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a transcoder set already in dst"
    )
    convert.set_defaults(handler=_convert)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from ingest.models import load_model
    from ingest.transcoders.sources import resolve_source

    loaded = load_model(str(args.model), device=args.device)
    source = resolve_source(
        args.prompts, args.model, loaded.tokenizer, args.context_len, args.max_tokens
    )
    return loaded, source


def _train_config(args: argparse.Namespace, sparsity: float | None) -> TrainConfig:
    """The run's config from every flag that sets a TrainConfig field (``CLI_FIELDS``),
    at ``sparsity`` (the pareto command sweeps it)."""
    fields = {name: getattr(args, name) for name in CLI_FIELDS if name not in ("sparsity", "kind")}
    # pareto has no --kind: it trains both kinds
    return TrainConfig(**fields, kind=vars(args).get("kind", DEFAULTS.kind), sparsity=sparsity)


#: Below this change of the loss under zero-ablation (nats), a layer's CE recovered is
#: flagged as ill-conditioned in the printed report (IOI's layer 1: 1.35e-3).
FRAGILE_ABLATION_NATS = 0.01


def _interval(bounds: list[float]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _print_report(report: dict[str, Any]) -> None:
    from ingest.transcoders.evaluation import describe_task

    print(
        f"set {report['set_id']} on {report['tokens']} tokens of the {report['split']} split; "
        "CE and KL over "
        f"{report['ce_predictions']} predictions ({report['ce_positions']} positions)"
    )
    print(
        "layer      l0      fvu fvu@pred   dead  ce_rec  ce_rec 95% interval  ablate_dCE"
        "   d_loss       kl   top1"
    )
    fragile, inverted = [], []
    for layer, r in report["layers"].items():
        effect = r["ce_ablate"] - r["ce_clean"]
        print(
            f"{layer:>5} {r['l0']:7.2f} {r['fvu']:8.4f} {r['fvu_predicting']:8.4f} "
            f"{r['dead_fraction']:6.3f} {r['ce_loss_recovered']:7.4f} "
            f"{_interval(r['ce_loss_recovered_95']):>19} {effect:11.2e} "
            f"{r['delta_loss']:8.1e} {r['kl']:8.1e} {r['top1_agreement']:6.4f}"
        )
        if abs(effect) < FRAGILE_ABLATION_NATS:
            fragile.append(f"{layer} ({effect:+.1e} nats)")
        elif effect < 0:
            inverted.append(f"{layer} ({effect:+.1e} nats)")
    if fragile:
        print(
            f"  zero-ablating the MLP of layer {', '.join(fragile)} barely moves the loss, so "
            "ce_rec there is a ratio of small differences (see its interval): read d_loss and kl"
        )
    if inverted:
        print(
            f"  zero-ablating the MLP of layer {', '.join(inverted)} lowers the loss, so ce_rec "
            "there reads the other way (above 1: the splice raises the loss): read d_loss and kl"
        )
    a = report["all_layers"]
    print(
        f"  all layers spliced: ce_rec {a['ce_loss_recovered']:.4f} "
        f"(95% {_interval(a['ce_loss_recovered_95'])}), "
        f"delta loss {a['delta_loss']:.1e}, kl {a['kl']:.1e}, "
        f"top-1 agreement {a['top1_agreement']:.4f}"
    )
    if "task" in report:
        print(f"  {describe_task(report['task'])}")


def _train(args: argparse.Namespace) -> int:
    from ingest.transcoders.checkpoint import has_checkpoint
    from ingest.transcoders.evaluation import evaluate_set
    from ingest.transcoders.formats.common import write_json
    from ingest.transcoders.trainer import train_transcoders

    cfg = _train_config(args, args.sparsity)
    check_output(args.out, "--out", directory=True)
    if args.resume and not has_checkpoint(args.out):
        print(f"no checkpoint in {args.out} to resume: starting a new run", file=sys.stderr)
    loaded, source = _load(args)
    result = train_transcoders(
        loaded.adapter, source, cfg, args.out, model_id=loaded.model_id, resume=args.resume
    )
    mode = "the whole split, collected once" if result.buffer_resident else "streamed"
    size = result.buffer_bytes
    shown = f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{max(1, round(size / 2**10))} KiB"
    print(
        f"activation buffer: {result.buffer_rows} rows per layer in whole windows, {shown} ({mode})"
    )
    print(f"trained {result.steps_done} steps, {result.tokens_per_second:.0f} tokens/s")
    print(f"saved transcoder set to {args.out}")
    if not args.no_eval:
        report = evaluate_set(
            loaded.adapter,
            result.tset,
            source,
            zoo_dir=args.model,
            tokenizer=loaded.tokenizer,
            progress=True,
        )
        write_json(Path(args.out) / "eval.json", report)
        _print_report(report)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ingest.transcoders.evaluation import evaluate_set
    from ingest.transcoders.formats import load_any
    from ingest.transcoders.formats.common import write_json

    if args.windows is not None and args.windows < 1:
        raise InvalidArgumentError(
            f"--windows must be at least 1, got {args.windows} (leave it out for the default)"
        )
    if args.dead_tokens < 1:
        raise InvalidArgumentError(f"--dead-tokens must be at least 1, got {args.dead_tokens}")
    if args.task_examples < 1:
        raise InvalidArgumentError(f"--task-examples must be at least 1, got {args.task_examples}")
    if args.json is not None:
        check_output(args.json, "--json", directory=False)
    loaded, source = _load(args)
    tset = load_any(args.set, device=loaded.adapter.device)
    report = evaluate_set(
        loaded.adapter, tset, source, n_windows=args.windows, zoo_dir=args.model,
        tokenizer=loaded.tokenizer, dead_tokens=args.dead_tokens, split=args.split,
        max_task_examples=args.task_examples, progress=True,
    )  # fmt: skip
    if args.json is not None:
        write_json(args.json, report)
    _print_report(report)
    return 0


def _pareto(args: argparse.Namespace) -> int:
    from ingest.transcoders.pareto import render_markdown, run_pareto

    if not args.sparsities:
        raise InvalidArgumentError("--sparsities needs at least one value, e.g. 4,8,16")
    if args.sae_sparsities is not None and not args.sae_sparsities:
        raise InvalidArgumentError(
            "--sae-sparsities needs at least one value, e.g. 0.3,0.5; leave it out to give "
            "the SAEs --sparsities"
        )
    for flag, values in (
        ("--sparsities", args.sparsities),
        ("--sae-sparsities", args.sae_sparsities),
    ):
        if values and len(set(values)) != len(values):
            raise InvalidArgumentError(f"{flag} needs distinct values, got {values}")
    seeds = args.seeds if args.seeds is not None else [args.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise InvalidArgumentError(f"--seeds needs distinct integers, e.g. 0,1,2; got {seeds}")
    cfg = _train_config(args, None)
    check_output(args.out, "--out", directory=True)
    loaded, source = _load(args)
    tables = run_pareto(
        loaded.adapter, source, cfg, args.sparsities, args.out, model_id=loaded.model_id,
        seeds=seeds, sae_sparsities=args.sae_sparsities,
    )  # fmt: skip
    print(render_markdown(tables))
    print(
        f"wrote {args.out / 'pareto.md'}, {args.out / 'pareto.json'} and {args.out / 'pareto.png'}"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from ingest.transcoders.feature_stats import check_stats_options, compute_feature_stats
    from ingest.transcoders.formats import load_any
    from ingest.transcoders.formats.common import write_json

    check_stats_options(args.windows, args.top_k)
    loaded, source = _load(args)
    tset = load_any(args.set, device=loaded.adapter.device)
    stats = compute_feature_stats(
        loaded.adapter, tset, source, loaded.tokenizer, n_windows=args.windows,
        top_k=args.top_k, progress=True,
    )  # fmt: skip
    path = args.set / "feature_stats.json"
    if not stats:  # never replace a catalog with nothing
        raise InvalidArgumentError(f"no statistics computed: {path} is left as it was")
    write_json(path, stats)
    alive = sum(1 for s in stats if s["density"] > 0)
    print(f"wrote statistics of {len(stats)} latents ({alive} active) to {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ingest.transcoders.formats import detect_format, load_any, save

    check_output(args.dst, "dst", directory=True)
    if args.dst.exists() and args.dst.resolve() == args.src.resolve():
        raise InvalidArgumentError(f"dst {args.dst} is src: convert into another directory")
    replace = args.dst.is_dir() and any(args.dst.iterdir())
    if replace and not args.overwrite:
        raise InvalidArgumentError(
            f"{args.dst} already holds files: choose an empty or new dst, or pass --overwrite"
        )
    if replace:
        try:
            detect_format(args.dst)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"{args.dst} holds files that are not a transcoder set: --overwrite only "
                "replaces a set; choose an empty or new dst"
            ) from None
    tset = load_any(args.src, fmt=args.src_format)
    if replace:
        # Another format's files left in dst would make its layout ambiguous.
        shutil.rmtree(args.dst)
    save(tset, args.dst, args.to)
    print(f"wrote {tset.metadata.set_id} ({args.to}) to {args.dst}")
    return 0
