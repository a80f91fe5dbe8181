"""Sparsity sweeps: L0 against CE loss recovered, transcoders against SAEs.

For each sparsity value and each kind (``transcoder`` and the ``sae`` baseline, same
architecture, width and steps) a set is trained and evaluated; each row records the mean
over covered layers of L0, FVU, dead fraction, CE loss recovered (layer spliced alone)
and the all-layers CE loss recovered. Transcoders get the skip connection unless the
base config turns it off (``--no-skip``; rows ``transcoder+skip``), SAEs never: an SAE
with one could copy its input. The sweep writes ``pareto.json``, ``pareto.md`` and
``pareto.png`` (matplotlib, Agg backend). Dunefsky et al. (2024) compare the two
kinds the same way: at equal L0 the better replacement recovers more loss.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ingest.transcoders.evaluation import evaluate_set
from ingest.transcoders.sources import Source
from ingest.transcoders.trainer import TrainConfig, train_transcoders

logger = logging.getLogger(__name__)

COLUMNS = (
    "kind",
    "sparsity",
    "l0",
    "fvu",
    "dead_fraction",
    "ce_loss_recovered",
    "ce_recovered_all",
)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def run_pareto(
    adapter: Any,
    source: Source,
    base: TrainConfig,
    sparsities: list[float],
    out_dir: str | Path,
    *,
    model_id: str,
    kinds: tuple[str, ...] = ("transcoder", "sae"),
    eval_windows: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for sparsity in sparsities:
            skip = False if kind == "sae" else base.skip
            cfg = dataclasses.replace(base, kind=kind, sparsity=sparsity, skip=skip)
            label = f"{kind}+skip" if cfg.uses_skip else kind
            run_dir = out / f"{label}-{cfg.arch}-{sparsity:g}"
            result = train_transcoders(
                adapter, source, cfg, run_dir, model_id=model_id, resume=True, progress=progress
            )
            report = evaluate_set(adapter, result.tset, source, n_windows=eval_windows)
            row = {
                "kind": label,
                "sparsity": float(sparsity),
                **{k: report["mean"][k] for k in ("l0", "fvu", "dead_fraction")},
                "ce_loss_recovered": report["mean"]["ce_loss_recovered"],
                "ce_recovered_all": report["all_layers"]["ce_loss_recovered"],
                "dir": str(run_dir),
            }
            rows.append(row)
            logger.info("pareto %s", row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(rows, indent=2))
    (out / "pareto.md").write_text(markdown_table(rows) + "\n")
    width = base.width_for(adapter.d_model)
    plot_pareto(rows, out / "pareto.png", title=f"{model_id}: {base.arch}, width {width}")
    return rows


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    markers = "os^Dv"
    for i, kind in enumerate(dict.fromkeys(r["kind"] for r in rows)):
        marker = markers[i % len(markers)]
        points = sorted((r["l0"], r["ce_loss_recovered"]) for r in rows if r["kind"] == kind)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=marker, label=kind)
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("CE loss recovered (layer spliced alone)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
