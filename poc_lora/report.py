"""Tables (Markdown, CSV, JSON) and plots shared by eval, pipeline and mfnn.

Every human-readable result of the project is produced here, so all commands print and
save tables the same way. Plots use matplotlib's non-interactive Agg backend (the
``plot`` extra); tables need nothing beyond the standard library.

Example:
    >>> from poc_lora.report import markdown_table
    >>> print(markdown_table(["Method", "Ave."], [["LoRA (best)", 78.69]]))
    | Method | Ave. |
    |---|---|
    | LoRA (best) | 78.69 |
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .outputs import atomic_write_text

Row = Sequence[Any] | Mapping[str, Any]


def _cells(row: Row, columns: Sequence[str]) -> list[Any]:
    if isinstance(row, Mapping):
        return [row.get(c, "") for c in columns]
    if len(row) != len(columns):
        raise ValueError(f"row has {len(row)} cells but the table has {len(columns)} columns")
    return list(row)


def _fmt(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return format(value, floatfmt)
    return "" if value is None else str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Row], floatfmt: str = ".2f") -> str:
    """Render rows (sequences or dicts keyed by column) as a GitHub Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in _cells(row, columns)) + " |")
    return "\n".join(lines)


def csv_table(columns: Sequence[str], rows: Sequence[Row], floatfmt: str | None = None) -> str:
    """Render rows as CSV text; floats keep full precision unless ``floatfmt`` is given."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = _cells(row, columns)
        if floatfmt:
            cells = [_fmt(v, floatfmt) for v in cells]
        writer.writerow(cells)
    return buf.getvalue()


def write_table(
    stem: str | os.PathLike,
    columns: Sequence[str],
    rows: Sequence[Row],
    floatfmt: str = ".2f",
    title: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` atomically; returns both paths."""
    stem = Path(stem)
    md = markdown_table(columns, rows, floatfmt)
    if title:
        md = f"# {title}\n\n{md}"
    md_path = atomic_write_text(stem.with_suffix(".md"), md + "\n")
    csv_path = atomic_write_text(stem.with_suffix(".csv"), csv_table(columns, rows))
    return md_path, csv_path


def comparison_rows(
    accuracies: Mapping[str, Mapping[str, float]],
    columns: Sequence[str],
    merges: Mapping[str, str] | None = None,
    average_key: str = "Ave.",
) -> list[dict[str, Any]]:
    """Build the paper's rows from per-model accuracies.

    ``accuracies`` maps a model name to ``{column: accuracy}`` (``average_key`` included).
    Models named in ``merges`` (name -> row label, e.g. ``{"merged": "PoC merge"}``) get one
    row each; the others are the single adapters, summarised as "LoRA (best)" (the adapter
    with the best average, reported on every column) and "LoRA (ave.)" (column-wise mean).
    """
    merges = dict(merges or {})
    singles = {k: v for k, v in accuracies.items() if k not in merges}
    rows: list[dict[str, Any]] = []
    if singles:
        best_name = max(singles, key=lambda k: singles[k][average_key])
        rows.append({"Method": "LoRA (best)", **{c: singles[best_name][c] for c in columns}, "Model": best_name})
        rows.append(
            {
                "Method": "LoRA (ave.)",
                **{c: sum(v[c] for v in singles.values()) / len(singles) for c in columns},
                "Model": f"mean of {len(singles)}",
            }
        )
    for name, label in merges.items():
        if name in accuracies:
            rows.append({"Method": label, **{c: accuracies[name][c] for c in columns}, "Model": name})
    return rows


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'poc-lora[plot]'") from exc
    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG through a temporary file (deterministic metadata)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path
