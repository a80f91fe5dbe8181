"""Sparsity sweeps: L0 against CE loss recovered, transcoders against SAEs.

For each sparsity value, each kind (``transcoder`` and the ``sae`` baseline, same
architecture, width and steps) and each seed a set is trained and evaluated; each run's
row records the mean over covered layers of L0, FVU, dead fraction, KL, top-1 agreement,
CE loss recovered and delta loss (each layer spliced alone) and the all-layers CE loss
recovered.
Transcoders get the skip connection unless the base config turns it off (``--no-skip``;
rows ``transcoder+skip``), SAEs never: an SAE with one could copy its input.

The loss comparison reads delta loss (the spliced model's loss minus the model's, lower
is better), not CE loss recovered: layer by layer the two agree where zero-ablating the
MLP raises the loss (their means over layers need not: CE recovered weighs each layer by
one over its ablation effect), but where it lowers it (greater-than GPT-2's layer 1 by
0.08 nats) CE recovered ``(CE_ablate - CE_splice) / (CE_ablate - CE_clean)`` has a
negative denominator and grows as the splice gets *worse*, and a mean over layers mixes
the two readings. Each
row's ``loss_lead`` is the SAE's delta loss minus the transcoder's (nats; positive: the
transcoder's splice loses less). Dunefsky et al. (2024) compare the two kinds this way:
at equal L0 the better replacement leaves the lower loss.

On the small zoo tasks the difference between the two kinds is often smaller than the
spread between seeds, so a sweep over several seeds also reports, per (kind, sparsity),
the mean with its range, and per sparsity the paired lead at each seed. The verdict
reads "transcoder ahead" or "SAE ahead" only when every seed agrees, otherwise "level".

Delta loss is signed: a splice's error can raise or lower the loss of the answer, and
where both kinds are within a hundredth of a nat of the model, which one wins can follow
the direction of a tiny error rather than its size. So the comparison also pairs the KL
divergence from the original next-token distribution (mean over layers, each spliced
alone; lower is better) as the ratio transcoder / SAE, with its own verdict.

Equal sparsity is not always equal L0: BatchTopK's inference threshold is calibrated to
fire k latents per token on training rows, and held-out rows land near k, not on it.
``l0_ratio`` (transcoder / SAE, mean over the paired seeds) says how far apart the pair's
L0 are; the plot puts each point at its measured L0. Where equal sparsity is far from
equal L0 (ReLU's L1 and JumpReLU's L0 coefficients set L0 only indirectly, and differently
for the two kinds), the ``equal_l0`` table compares at equal L0 itself: each transcoder
run against the SAE's curve of the same seed read at the transcoder's L0, interpolated
linearly in log L0 (KL in log KL) between the two SAE runs around it on the SAE's Pareto
frontier (an SAE run that a sparser SAE run beats is not read: L1 sweeps are not always
monotone). A transcoder run outside the L0 range of its seed's SAE runs is not compared
(no extrapolation), so the table needs a sweep of several sparsities; ``sae_bracket`` (the
larger L0 of the two SAE runs over the smaller, the widest over the seeds) says how far
the reading is carried: a curve that bends between two runs far apart is misread by a
straight line.

The sweep writes ``pareto.json`` (``runs``, ``summary``, ``comparison``, ``equal_l0``),
``pareto.md`` and ``pareto.png`` (matplotlib, Agg backend: CE recovered with error bars over
the seeds, delta loss, and KL on a log scale, each against L0).
"""

import bisect
import dataclasses
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ingest.transcoders.evaluation import evaluate_set
from ingest.transcoders.formats.common import write_json
from ingest.transcoders.sources import Source
from ingest.transcoders.trainer import TrainConfig, train_transcoders
from ingest.zoo import report

logger = logging.getLogger(__name__)

#: Each run's means over layers (each spliced alone), then CE recovered with all spliced.
LAYER_METRICS = (
    "l0", "fvu", "dead_fraction", "kl", "top1_agreement", "ce_loss_recovered", "delta_loss",
)  # fmt: skip
METRICS = (*LAYER_METRICS, "ce_recovered_all")
COLUMNS = ("kind", "sparsity", "seed", *METRICS)
SUMMARY_COLUMNS = ("kind", "sparsity", "seeds", *METRICS, "ce_min", "ce_max")
COMPARISON_COLUMNS = (
    "sparsity", "seeds", "l0_ratio", "loss_lead_mean", "loss_lead_min", "loss_lead_max", "verdict",
    "kl_ratio_mean", "kl_ratio_min", "kl_ratio_max", "kl_verdict",
)  # fmt: skip
EQUAL_L0_COLUMNS = (
    "sparsity", "seeds", "l0", "sae_bracket", "loss_lead_mean", "loss_lead_min", "loss_lead_max",
    "verdict", "kl_ratio_mean", "kl_ratio_min", "kl_ratio_max", "kl_verdict",
)  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """``columns`` of dict rows as a markdown table (a missing value is left blank)."""
    return report.markdown_table(columns, [[row.get(c, "") for c in columns] for row in rows])


def run_pareto(
    adapter: Any,
    source: Source,
    base: TrainConfig,
    sparsities: Sequence[float],
    out_dir: str | Path,
    *,
    model_id: str,
    seeds: Sequence[int] | None = None,
    kinds: tuple[str, ...] = ("transcoder", "sae"),
    eval_windows: int | None = None,
    progress: bool = True,
    sae_sparsities: Sequence[float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every (kind, sparsity, seed); return and write the tables.

    ``seeds`` defaults to ``[base.seed]``. ``sae_sparsities`` (default: ``sparsities``)
    gives the SAEs their own values: under an L1 or L0 coefficient the two kinds reach a
    given L0 at different coefficients, and the equal-L0 table needs the SAE's curve
    around every transcoder's L0. A run directory that holds a finished run of the same
    config is evaluated again, not retrained.
    """
    out = Path(out_dir)
    runs: list[dict[str, Any]] = []
    for seed in seeds if seeds is not None else [base.seed]:
        for kind in kinds:
            values = sae_sparsities if kind == "sae" and sae_sparsities else sparsities
            for sparsity in values:
                skip = False if kind == "sae" else base.skip
                cfg = dataclasses.replace(base, kind=kind, sparsity=sparsity, skip=skip, seed=seed)
                label = f"{kind}+skip" if cfg.uses_skip else kind
                run_dir = out / f"{label}-{cfg.arch}-{sparsity:g}-seed{seed}"
                result = train_transcoders(
                    adapter, source, cfg, run_dir, model_id=model_id, resume=True,
                    progress=progress,
                )  # fmt: skip
                evaluation = evaluate_set(adapter, result.tset, source, n_windows=eval_windows)
                row = {
                    "kind": label,
                    "sparsity": float(sparsity),
                    "seed": seed,
                    **{k: evaluation["mean"][k] for k in LAYER_METRICS},
                    "ce_recovered_all": evaluation["all_layers"]["ce_loss_recovered"],
                    "dir": str(run_dir),
                }
                runs.append(row)
                logger.info("pareto %s", row)
    tables = {
        "runs": runs,
        "summary": summarize(runs),
        "comparison": compare(runs),
        "equal_l0": compare_at_equal_l0(runs),
    }
    write_json(out / "pareto.json", tables)
    (out / "pareto.md").write_text(render_markdown(tables) + "\n")
    width = base.width_for(adapter.d_model)
    name = Path(model_id).name if Path(model_id).is_absolute() else model_id
    title = f"{name}: {base.arch}, width {width}"
    plot_pareto(tables["summary"], out / "pareto.png", title=title)
    return tables


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kind, sparsity): every metric's mean over seeds, and CE recovered's range."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["kind"], run["sparsity"]), []).append(run)
    summary = []
    for (kind, sparsity), group in groups.items():
        ce = [r["ce_loss_recovered"] for r in group]
        summary.append({
            "kind": kind,
            "sparsity": sparsity,
            "seeds": len(group),
            **{m: statistics.fmean(r[m] for r in group) for m in METRICS},
            "ce_min": min(ce),
            "ce_max": max(ce),
        })  # fmt: skip
    return summary


def _is_transcoder(run: dict[str, Any]) -> bool:
    """A per-layer transcoder run ("transcoder" or "transcoder+skip")."""
    return bool(run["kind"].startswith("transcoder"))


def _is_sae(run: dict[str, Any]) -> bool:
    """An SAE run; other kinds (a CLT) are in no comparison."""
    return bool(run["kind"] == "sae")


def compare(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparsity, paired by seed: the SAE's delta loss minus the transcoder's and
    transcoder / SAE KL, each with a verdict, and the transcoder / SAE L0 ratio.

    Empty unless the sweep holds both kinds. "transcoder ahead" / "SAE ahead" need every
    seed to agree; anything else is "level".
    """
    by_key = {
        (_is_transcoder(r), r["sparsity"], r["seed"]): r
        for r in runs
        if _is_transcoder(r) or _is_sae(r)
    }
    comparison = []
    for sparsity in dict.fromkeys(r["sparsity"] for r in runs):
        pairs = [
            (tc, sae)
            for (is_tc, s, seed), tc in by_key.items()
            if is_tc and s == sparsity and (sae := by_key.get((False, s, seed))) is not None
        ]
        if not pairs:
            continue
        leads = [sae["delta_loss"] - tc["delta_loss"] for tc, sae in pairs]
        ratios = [_kl_ratio(tc["kl"], sae["kl"]) for tc, sae in pairs]
        l0_ratios = [tc["l0"] / sae["l0"] if sae["l0"] > 0 else math.inf for tc, sae in pairs]
        comparison.append({
            "sparsity": sparsity,
            "seeds": len(pairs),
            "l0_ratio": statistics.fmean(l0_ratios),
            **_paired_verdicts(leads, ratios),
        })  # fmt: skip
    return comparison


def compare_at_equal_l0(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per transcoder sparsity, paired by seed: the SAE's delta loss minus the
    transcoder's and its KL over the SAE's, the SAE's figures read off that seed's SAE curve at
    the transcoder's L0 (see the module docstring); ``l0`` is the transcoder's, mean over
    the compared seeds; ``sae_bracket`` the widest L0 ratio of the SAE runs read between.
    Transcoder runs outside their SAE curve's L0 range are left out; a sparsity none of
    whose runs falls inside is not listed."""
    curves: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        if _is_sae(run):
            curves.setdefault(run["seed"], []).append(run)
    rows = []
    for sparsity in dict.fromkeys(r["sparsity"] for r in runs):
        compared = []
        for tc in runs:
            if not _is_transcoder(tc) or tc["sparsity"] != sparsity:
                continue
            sae = _read_curve(curves.get(tc["seed"], []), tc["l0"])
            if sae is not None:
                compared.append((tc, *sae))
        if not compared:
            continue
        leads = [loss - tc["delta_loss"] for tc, loss, _, _ in compared]
        ratios = [_kl_ratio(tc["kl"], kl) for tc, _, kl, _ in compared]
        rows.append({
            "sparsity": sparsity,
            "seeds": len(compared),
            "l0": statistics.fmean(tc["l0"] for tc, _, _, _ in compared),
            "sae_bracket": max(bracket for _, _, _, bracket in compared),
            **_paired_verdicts(leads, ratios),
        })  # fmt: skip
    return rows


def _read_curve(curve: Sequence[dict[str, Any]], l0: float) -> tuple[float, float, float] | None:
    """Delta loss and KL of the runs ``curve`` at ``l0``, each read off its Pareto
    frontier (a run that a sparser run beats is dropped) linearly in log L0 (KL in log KL
    where every KL is positive) between the two frontier runs around it, and the larger
    L0 ratio of the two pairs of runs read between; None outside the runs' L0 range."""
    points = sorted((r["l0"], r["delta_loss"], r["kl"]) for r in curve if r["l0"] > 0)
    if l0 <= 0 or not points or not points[0][0] <= l0 <= points[-1][0]:
        return None
    losses = [(x, loss) for x, loss, _ in points]
    loss, loss_bracket = _read_frontier(losses, l0, higher_is_better=False)
    log_kl = all(kl > 0 for _, _, kl in points)
    kls = [(x, math.log(kl) if log_kl else kl) for x, _, kl in points]
    kl, kl_bracket = _read_frontier(kls, l0, higher_is_better=False)
    return loss, math.exp(kl) if log_kl else kl, max(loss_bracket, kl_bracket)


def _read_frontier(
    points: Sequence[tuple[float, float]], l0: float, higher_is_better: bool
) -> tuple[float, float]:
    """The value at ``l0`` of the frontier of ``points`` ((L0, value), sorted by L0), and
    the L0 ratio of the frontier points read between (1: read at a point, or past the
    last frontier point, whose value a sparser run already reaches)."""
    front: list[tuple[float, float]] = []
    for x, v in points:
        if front and not (v > front[-1][1] if higher_is_better else v < front[-1][1]):
            continue  # a sparser run does as well
        if front and x == front[-1][0]:
            front.pop()
        front.append((x, v))
    xs = [x for x, _ in front]
    value = float(np.interp(math.log(l0), np.log(xs), [v for _, v in front]))
    above = bisect.bisect_left(xs, l0)
    bracket = 1.0 if above == len(xs) or xs[above] == l0 else xs[above] / xs[above - 1]
    return value, bracket


def _kl_ratio(tc: float, sae: float) -> float:
    """Transcoder KL / SAE KL: KL 0 on both sides is a tie; on the SAE's side alone, an
    infinite ratio."""
    return tc / sae if sae > 0 else 1.0 if tc == 0 else math.inf


def _paired_verdicts(leads: Sequence[float], ratios: Sequence[float]) -> dict[str, Any]:
    """The loss leads' (SAE's delta loss minus the transcoder's) and KL ratios' mean and
    range, each with its verdict."""
    return {
        "loss_lead_mean": statistics.fmean(leads),
        "loss_lead_min": min(leads),
        "loss_lead_max": max(leads),
        "verdict": _verdict(leads, min(leads) > 0, max(leads) < 0),
        "kl_ratio_mean": statistics.fmean(ratios),
        "kl_ratio_min": min(ratios),
        "kl_ratio_max": max(ratios),
        "kl_verdict": _verdict(ratios, max(ratios) < 1, min(ratios) > 1),
    }


def _verdict(values: Sequence[float], transcoder_better: bool, sae_better: bool) -> str:
    """A nan among the seeds' figures (a loss no window scored) makes min and max depend
    on its place in the list: no verdict then."""
    if any(math.isnan(v) for v in values):
        return "undetermined"
    return "transcoder ahead" if transcoder_better else "SAE ahead" if sae_better else "level"


def render_markdown(tables: dict[str, list[dict[str, Any]]]) -> str:
    parts = ["## Runs", markdown_table(tables["runs"], COLUMNS)]
    parts += ["## Mean over seeds", markdown_table(tables["summary"], SUMMARY_COLUMNS)]
    if tables["comparison"]:
        parts += [
            "## Transcoder against SAE, paired by seed (loss_lead: the SAE's delta loss minus "
            "the transcoder's, nats, positive when the transcoder's splice loses less; KL: "
            "ratio, lower is better)",
            markdown_table(tables["comparison"], COMPARISON_COLUMNS),
        ]
    if tables.get("equal_l0"):
        parts += [
            "## Transcoder against SAE at equal L0 (the SAE's curve of the same seed read at "
            "the transcoder's L0; loss_lead: the SAE's delta loss minus the transcoder's, KL: "
            "ratio)",
            markdown_table(tables["equal_l0"], EQUAL_L0_COLUMNS),
        ]
    return "\n\n".join(parts)


def plot_pareto(summary: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Three panels against mean L0 per kind: CE loss recovered (error bars span the
    seeds), delta loss and KL to the model (log scale), each layer spliced alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ce_ax, loss_ax, kl_ax) = plt.subplots(1, 3, figsize=(13, 4))
    markers = "os^Dv"
    for i, kind in enumerate(dict.fromkeys(r["kind"] for r in summary)):
        points = sorted((r for r in summary if r["kind"] == kind), key=lambda r: r["l0"])
        xs = [r["l0"] for r in points]
        ys = [r["ce_loss_recovered"] for r in points]
        spread = [[r["ce_loss_recovered"] - r["ce_min"] for r in points],
                  [r["ce_max"] - r["ce_loss_recovered"] for r in points]]  # fmt: skip
        seeds = max(r["seeds"] for r in points)
        label = kind if seeds == 1 else f"{kind} ({seeds} seeds)"
        style = {"marker": markers[i % len(markers)], "label": label}
        ce_ax.errorbar(xs, ys, yerr=spread, capsize=3, **style)
        loss_ax.plot(xs, [r["delta_loss"] for r in points], **style)
        kl_ax.plot(xs, [r["kl"] for r in points], **style)
    ce_ax.set_ylabel("CE loss recovered (layer spliced alone)")
    loss_ax.set_ylabel("delta loss, nats (layer spliced alone)")
    kl_ax.set_ylabel("KL to the model (layer spliced alone)")
    kl_ax.set_yscale("log")
    for ax in (ce_ax, loss_ax, kl_ax):
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
