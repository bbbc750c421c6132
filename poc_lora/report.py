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

from .outputs import atomic_write, atomic_write_text

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


def accuracy_percentages(
    suite_accuracy: Mapping[str, float], average: float, average_key: str = "Ave."
) -> dict[str, float]:
    """One model's row in %: ``{column: 100 * accuracy, average_key: 100 * average}``.

    ``suite_accuracy`` maps a table column to an accuracy in [0, 1]; ``average`` is the mean
    accuracy in [0, 1] as the evaluation stores it. Every table of accuracies (eval
    ``results.md``, the pipeline's ``report.md``) is built through this one function, so the
    same number is computed, and hence rounded, the same way in every file.

    Example:
        >>> accuracy_percentages({"PIQA": 0.5}, 0.5)
        {'PIQA': 50.0, 'Ave.': 50.0}
    """
    return {**{c: 100 * a for c, a in suite_accuracy.items()}, average_key: 100 * average}


def comparison_rows(
    accuracies: Mapping[str, Mapping[str, float]],
    columns: Sequence[str],
    merges: Mapping[str, str] | None = None,
    average_key: str = "Ave.",
    ensemble: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Build the paper's rows from per-model accuracies.

    ``accuracies`` maps a model name to ``{column: accuracy}`` (``average_key`` included).
    Models named in ``merges`` (name -> row label, e.g. ``{"merged": "PoC merge"}``) get one
    row each; the others are the single adapters, summarised as "LoRA (best)" (the adapter
    with the best average, reported on every column) and "LoRA (ave.)" (column-wise mean).
    ``ensemble`` (name, row label) is the adapters' output ensemble: its row follows
    "LoRA (ave.)", before the merges.
    """
    merges = dict(merges or {})
    ens_name = ensemble[0] if ensemble else None
    singles = {k: v for k, v in accuracies.items() if k not in merges and k != ens_name}
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
    if ensemble and ensemble[0] in accuracies:
        rows.append({"Method": ensemble[1], **{c: accuracies[ensemble[0]][c] for c in columns}, "Model": ensemble[0]})
    for name, label in merges.items():
        if name in accuracies:
            rows.append({"Method": label, **{c: accuracies[name][c] for c in columns}, "Model": name})
    return rows


def _pyplot():
    # lazy: matplotlib is the optional `plot` extra; tables need only the standard library
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
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight",
                                                          metadata={"Software": None}), suffix=".png")
    finally:
        plt.close(fig)


def plot_heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    colorbar_label: str = "",
) -> Path:
    """Save a heat map of ``values[row][col]`` (rows bottom to top) with labelled axes and a
    colour bar, as PNG at ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(col_labels) + 2), max(3.0, 0.35 * len(row_labels) + 1.5)))
    image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return save_figure(fig, path)


def plot_lines(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    ncols: int = 3,
    bands: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]] | None = None,
    markers: Mapping[str, Mapping[str, tuple[str, str, float, float]]] | None = None,
) -> Path:
    """Save line plots as PNG: one panel per key of ``panels`` (``ncols`` per row, shared y
    axis), each holding curves ``{label: (x, y)}`` with a legend.

    ``bands[panel][label] = (x, low, high)`` shades a band in the colour of curve ``label``
    (e.g. +-1 sd over seeds); ``markers[panel][name] = (marker, label, x, y)`` draws one
    point with matplotlib marker ``marker`` in the colour of curve ``label``.
    """
    plt = _pyplot()
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), sharey=True, squeeze=False)
    for ax, (panel_title, curves) in zip(axes.flat, panels.items()):
        colours = {}
        for label, (x, y) in curves.items():
            (line,) = ax.plot(list(x), list(y), marker=".", label=str(label))
            colours[label] = line.get_color()
        for label, (x, low, high) in (bands or {}).get(panel_title, {}).items():
            ax.fill_between(list(x), list(low), list(high), color=colours.get(label), alpha=0.2, linewidth=0)
        for marker, label, x, y in (markers or {}).get(panel_title, {}).values():
            ax.scatter([x], [y], marker=marker, color=colours.get(label), zorder=3)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    ylabel: str = "",
    title: str = "",
    reference: Sequence[float] | None = None,
    reference_label: str = "",
) -> Path:
    """Save a grouped bar chart as PNG: one group per entry of ``groups`` (e.g. suites), one bar
    per series (e.g. "LoRA (best)", "LoRA (ave.)", "PoC merge") with a legend.

    ``reference`` (one value per group, e.g. each suite's chance accuracy) is drawn as a
    dashed black segment across the group, labelled ``reference_label`` in the legend."""
    plt = _pyplot()
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 3.8))
    for k, (label, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        ax.bar(xs, list(values), width=width, label=str(label))
    for i, value in enumerate(reference or []):
        ax.hlines(value, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                  label=reference_label if i == 0 else None, zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=0)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    # below the axes, so the legend never hides a bar
    ax.legend(fontsize="small", ncol=min(n + (reference is not None), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    return save_figure(fig, path)


def plot_reliability(
    curves: Mapping[str, Sequence[tuple[int, float, float]]],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Save a reliability diagram as PNG: for each model, accuracy against mean confidence per
    confidence bin (``curves[label]`` = ``(count, accuracy, confidence)`` per bin, as
    :func:`eval_harness.calibration.reliability_bins` gives; empty bins are skipped), with the
    diagonal of perfect calibration. Points on the diagonal are calibrated; below it, over-confident."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], linestyle="dashed", color="black", linewidth=1, label="perfect calibration")
    for label, bins in curves.items():
        points = [(conf, acc) for n, acc, conf in bins if n]
        ax.plot([c for c, _ in points], [a for _, a in points], marker="o", markersize=3, label=str(label))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top option probability)")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return save_figure(fig, path)
