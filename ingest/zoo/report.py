"""Plain-text and markdown tables for the zoo's command-line output and benchmark."""

from collections.abc import Sequence


def format_value(value: object) -> str:
    """Floats to 4 significant digits; everything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned with spaces, a dashed rule under the header."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def bar_table(task_name: str, metrics: dict[str, float]) -> str:
    """Held-out metrics beside the task's quality bars and whether each passes."""
    from ingest.zoo.tasks import get_task

    bars = {b.metric: b for b in get_task(task_name).quality_bars()}
    rows: list[list[object]] = []
    for name, value in metrics.items():
        bar = bars.get(name)
        verdict = ("pass" if bar.passes(metrics) else "FAIL") if bar else ""
        rows.append([name, value, bar.describe() if bar else "", verdict])
    return text_table(["metric", "held-out", "bar", "verdict"], rows)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_summary(metrics: dict[str, float]) -> str:
    """``name=value`` pairs on one line."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in metrics.items())
