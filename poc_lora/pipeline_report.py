"""The pipeline's report: report.md, report.json and report.png from its evaluations.

The tables (all in %, except calibration): the paper's rows (Base model, LoRA (best), LoRA
(ave.), the adapters' output ensemble, PoC merge and the other merges) per suite; the same rows
in every further scoring (choice mode's acc_norm, further modes); in rank and choice modes the
calibration of each row (NLL, Brier, ECE, confidence: :mod:`eval_harness.calibration`) and every
merge's distance to the ensemble (:mod:`eval_harness.ensemble`); every adapter. Plots:
``report.png`` (accuracy per suite) and ``reliability.png`` (base, best single adapter,
ensemble, PoC merge; rank and choice modes).

Example:
    >>> from poc_lora.pipeline_report import PipelineReport
    >>> PipelineReport.load("results/pipeline/report.json").table[-1]["Method"]  # doctest: +SKIP
    'PoC merge'
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from eval_harness.calibration import reliability_bins, row_probabilities
from eval_harness.data import load_suite
from eval_harness.results import EvalResult
from eval_harness.scoring import candidate_labels
from eval_harness.suites import AVERAGE_COLUMN, SUITES
from eval_harness.summary import (CALIBRATION_COLUMNS, DISTANCE_COLUMNS, calibration_table, distance_table,
                                  read_rows)

from .errors import AdapterError, OutputError
from .merge.methods import get_method
from .outputs import atomic_write_text, write_json
from .report import accuracy_percentages, comparison_rows, markdown_table, plot_grouped_bars, plot_reliability


@dataclass
class PipelineReport:
    """What :func:`run_pipeline` returns; ``to_dict()`` is ``report.json`` (``from_dict``/``load``
    read it back, including reports written by earlier releases). Accuracies are in %."""

    config: dict[str, Any]  # PipelineConfig.to_dict()
    columns: list[str]  # suite columns + the average
    table: list[dict[str, Any]]  # the paper's rows: Base model, LoRA (best), LoRA (ave.), PoC merge, variants
    adapters: list[dict[str, Any]]  # one row per adapter
    merge_spread: dict[str, float | None]  # per merge method, the adapters' mean pairwise relative distance
    what: str  # what was run, e.g. "synthetic suites, tiny model, rank-mode scoring"
    chance: dict[str, float]  # uniform guess per column
    eval_summary: str  # the evaluation's summary.json
    seconds: dict[str, float]  # wall time per stage
    files: dict[str, str]  # report_md, report_png, results_csv
    # The same rows in the other scorings: "<mode>" for each further eval mode, "<mode> acc_norm"
    # for choice mode's length-normalised accuracy (absent in reports of earlier releases).
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # rank/choice modes: NLL, Brier, ECE per row (calibration_table's layout); the output ensemble
    # (label, members, disagreement, each model's distance to it); absent in earlier reports
    calibration: list[dict[str, Any]] = field(default_factory=list)
    ensemble: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline report") -> "PipelineReport":
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default_factory is dataclasses.MISSING
                   and f.default is dataclasses.MISSING]
        if missing:
            raise OutputError(f"{where}: not a pipeline report (missing {', '.join(missing)})")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PipelineReport":
        """Read a ``report.json``; raises :class:`OutputError` naming the file if it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read the pipeline report {path}: {exc}") from None
        if not isinstance(data, dict):
            raise OutputError(f"{path}: not a pipeline report")
        return cls.from_dict(data, str(path))


def _adapter_rank(adapter: Path) -> int:
    path = adapter / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot read the LoRA rank 'r' from {path}: {exc}") from None


def _label(method: str, merged: Path) -> str:
    """The report label of the merge in ``merged`` (the method registry's), with the rank of the
    adapter written there and the parameters its ``merge_report.json`` records."""
    try:
        params = json.loads((merged / "merge_report.json").read_text()).get("params") or {}
    except (OSError, ValueError):
        params = {}
    return get_method(method).row_label(_adapter_rank(merged), **params)


# Above this mean pairwise relative distance the adapters' updates are closer to orthogonal than
# to equal; when such a merge underperforms, that is the first thing to look at.
FAR_APART_SPREAD = 0.5


def _spread_line(spreads: dict[str, Any]) -> str:
    """The adapters' spread from the merge report, with what it means for the merge."""
    spread = spreads.get("poc", next(iter(spreads.values()), None)) if spreads else None
    if spread is None:
        return ""
    line = f"Spread of the adapters (mean pairwise relative distance of their ΔW; 0 = identical): {spread:.3f}."
    if spread >= FAR_APART_SPREAD:
        line += (" The adapters are far apart: if the merge falls short of the single adapters, this is"
                 " the likely cause (they did not land in one basin: the paper's λ = 0 / one-epoch"
                 " failure mode). More training, a higher temperature, or a base model that already"
                 " solves more of the task bring them together.")
    return line


def chance_levels(data_dir: str | os.PathLike, suites: Sequence[str], limit: int | None) -> dict[str, float]:
    """Per suite, the accuracy in % of a uniform guess among each question's options (the
    labels the rank scorer chooses from), averaged over the evaluated questions."""
    chance = {}
    for name in suites:
        records = load_suite(data_dir, name, limit)
        chance[name] = 100 * sum(1 / len(candidate_labels(name, r["instruction"])) for r in records) / len(records)
    return chance


def _rows(evaluation: EvalResult, merges: dict[str, Path], adapters: list[Path], norm: bool = False
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The paper's rows (Base model, LoRA (best), LoRA (ave.), merges) and one row per adapter,
    in %, from one evaluation (``norm``: choice mode's acc_norm instead of the accuracy)."""
    suites = evaluation.tasks
    columns = [SUITES[s].column for s in suites] + [AVERAGE_COLUMN]
    acc = {key: accuracy_percentages({SUITES[s].column: (m.suites[s].acc_norm if norm else m.suites[s].accuracy)
                                      for s in suites}, m.average_norm if norm else m.average, AVERAGE_COLUMN)
           for key, m in evaluation.models.items()}
    # the paper's merge and its variants first, the baselines (soup, ties, dare_*) under them
    merge_keys = _merge_labels(evaluation, merges)
    by_path = {Path(m.adapter).resolve(): key for key, m in evaluation.models.items() if m.adapter}
    singles = {by_path[a.resolve()] for a in adapters}
    base = [k for k, m in evaluation.models.items() if m.kind == "base"]
    base_rows = [{"Method": "Base model", **acc[k], "Model": k} for k in base]
    ens = evaluation.ensemble
    acc = {k: v for k, v in acc.items() if k in singles or k in merge_keys or (ens and k == ens.key)}
    rows = base_rows + comparison_rows(acc, columns, merge_keys, AVERAGE_COLUMN,
                                       ensemble=(ens.key, ens.label) if ens else None)
    return rows, [{"Method": f"LoRA {k}", **acc[k], "Model": k} for k in sorted(singles)]


def _other_tables(evaluations: dict[str, EvalResult], merges: dict[str, Path], adapters: list[Path]
                  ) -> dict[str, list[dict[str, Any]]]:
    """The report's further tables: choice mode's acc_norm, and each further mode's accuracy."""
    tables = {}
    for k, (mode, evaluation) in enumerate(evaluations.items()):
        if k:
            tables[mode] = _rows(evaluation, merges, adapters)[0]
        if mode == "choice":
            tables[f"{mode} acc_norm"] = _rows(evaluation, merges, adapters, norm=True)[0]
    return tables


def _table_title(name: str) -> str:
    """``"rank"`` -> "Scored in rank mode"; ``"choice acc_norm"`` -> "... choice mode, acc_norm ..."."""
    mode, _, metric = name.partition(" ")
    return f"Scored in {mode} mode" + (", acc_norm (lm-evaluation-harness's length-normalised accuracy)"
                                       if metric else "")


def _merge_labels(evaluation: EvalResult, merges: dict[str, Path]) -> dict[str, str]:
    """Model key -> report label of each merge, the paper's merge and its variants first."""
    by_path = {Path(m.adapter).resolve(): key for key, m in evaluation.models.items() if m.adapter}
    ordered = sorted(merges.items(), key=lambda kv: get_method(kv[0]).title != "PoC merge")
    return {by_path[p.resolve()]: _label(meth, p) for meth, p in ordered}


def _calibration_section(evaluation: EvalResult, merges: dict[str, Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """The report's calibration and merge-to-ensemble lines (Markdown) and the calibration rows."""
    labels = _merge_labels(evaluation, merges)
    rows = calibration_table(evaluation.models, evaluation.ensemble, labels)
    if not rows:
        return [], []
    md = ["## Calibration (option softmax; averaged over the suites)", "",
          "Accuracy and confidence (mean top probability) in %, NLL in nats, Brier score and ECE (15 bins) "
          "as fractions; lower NLL, Brier and ECE are better (definitions: poc-lora's docs/evaluation.md).", "",
          markdown_table(CALIBRATION_COLUMNS, rows, floatfmt=".4f"), ""]
    ens = evaluation.ensemble
    if ens is not None:
        names = {**labels, **{k: f"LoRA {k}" for k in ens.members}}
        dist = distance_table(ens, names)
        md += [f"## Distance to the {ens.label}", "",
               "How close each model is to the output ensemble of the adapters it was merged from (the "
               "language-model analogue of the paper's distance to the mean-field limit, Figure 1): "
               "agreement of the predictions in %, mean KL(ensemble ‖ model) in nats (0 = the same "
               f"distributions). The members disagree with each other on "
               f"{100 * ens.disagreement['average']:.2f} % of the questions (mean over pairs).", "",
               markdown_table(DISTANCE_COLUMNS, dist, floatfmt=".4f"), ""]
    return md, rows


def _reliability(evaluation: EvalResult, merges: dict[str, Path], out: Path, what: str) -> Path | None:
    """reliability.png: accuracy against confidence (15 bins, every suite's questions pooled) for
    the base, the best single adapter, the ensemble and the PoC merge, where present."""
    models = evaluation.models
    if not any(m.nll is not None for m in models.values()):
        return None
    eval_dir = Path(evaluation.files["summary"]).parent
    picks: dict[str, str] = {}
    picks.update({"Base model": k for k, m in models.items() if m.kind == "base"})
    singles = {k: m for k, m in models.items() if m.kind == "adapter"}
    if singles:
        best = max(singles, key=lambda k: singles[k].average)
        picks[f"LoRA (best): {best}"] = best
    if evaluation.ensemble:
        picks[evaluation.ensemble.label] = evaluation.ensemble.key
    poc = [k for k, label in _merge_labels(evaluation, merges).items() if label == "PoC merge"]
    if poc:
        picks["PoC merge"] = poc[0]
    curves = {}
    for label, key in picks.items():
        conf, correct = [], []
        for suite in evaluation.tasks:
            for row in read_rows(eval_dir / key / suite):
                probs = row_probabilities(row)
                conf.append(max(probs.values()))
                correct.append(bool(row["correct"]))
        curves[label] = reliability_bins(conf, correct)
    return plot_reliability(curves, out / "reliability.png", title=f"Reliability ({what})")


def write_report(out: Path, evaluations: dict[str, EvalResult], merges: dict[str, Path], adapters: list[Path],
                 timing: dict[str, float], *, config: dict[str, Any], what: str, methods: Sequence[str],
                 limit: int | None) -> PipelineReport:
    """Write report.md / report.json / report.png (and reliability.png in rank and choice modes)
    under ``out`` from the evaluations' results (the first mode's table first; the other modes'
    and choice mode's acc_norm below it; then calibration and the distance to the ensemble).

    Args:
        out: the pipeline's output directory.
        evaluations: mode -> its :class:`EvalResult` (first = the report's main mode).
        merges: merge method -> merged adapter directory; adapters: the single adapters.
        config: the pipeline's settings (``PipelineConfig.to_dict()``), kept in report.json.
        what: what was run, e.g. "synthetic suites, tiny model, rank-mode scoring".
        methods: the merge methods, as configured; limit: the evaluation's per-suite limit.
    """
    evaluation = next(iter(evaluations.values()))
    suites = evaluation.tasks
    columns = [SUITES[s].column for s in suites] + [AVERAGE_COLUMN]
    chance = chance_levels(evaluation.data_dir, suites, limit)
    chance_row = {**{SUITES[s].column: chance[s] for s in suites}, AVERAGE_COLUMN: sum(chance.values()) / len(suites)}
    rows, per_adapter = _rows(evaluation, merges, adapters)
    tables = _other_tables(evaluations, merges, adapters)
    spreads = {}
    for meth, p in merges.items():
        rep = json.loads((p / "merge_report.json").read_text())
        spreads[meth] = rep.get("overall", {}).get("spread")
    calibration_md, calibration_rows = _calibration_section(evaluation, merges)
    table_cols = ["Method", *columns]
    md = [
        f"# poc-lora pipeline report: {what}",
        "",
        f"{len(adapters)} adapters (seeds seed+j), merged with {', '.join(methods)}; "
        f"evaluation mode `{evaluation.mode}` on {len(suites)} suites "
        f"({'first ' + str(limit) if limit else 'all'} examples each). Accuracy in %; "
        f"chance is a uniform guess among each question's options.",
        "",
        markdown_table(table_cols, [*rows, {"Method": "Chance", **chance_row}]),
        "",
        *[line for name, table in tables.items()
          for line in (f"## {_table_title(name)}", "", markdown_table(table_cols, table), "")],
        *calibration_md,
        "## Every adapter",
        "",
        markdown_table(table_cols, per_adapter),
        "",
        _spread_line(spreads),
        "",
        f"Wall time: {', '.join(f'{k} {v:.1f} s' for k, v in timing.items())}.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    series = {r["Method"]: [r[c] for c in columns] for r in rows}
    png = plot_grouped_bars(columns, series, out / "report.png", ylabel="accuracy (%)",
                            title=f"Single adapters vs. their merge ({what})",
                            reference=[chance_row[c] for c in columns], reference_label="chance")
    files = {"report_md": str(out / "report.md"), "report_png": str(png),
             "results_csv": evaluation.files["results_csv"]}
    reliability = _reliability(evaluation, merges, out, what)
    if reliability is not None:
        files["reliability_png"] = str(reliability)
    ens = evaluation.ensemble
    report = PipelineReport(
        config=config,
        columns=columns,
        table=rows,
        adapters=per_adapter,
        merge_spread=spreads,
        what=what,
        chance=chance_row,
        eval_summary=evaluation.files["summary"],
        seconds=timing,
        files=files,
        tables=tables,
        calibration=calibration_rows,
        ensemble=({"label": ens.label, "members": ens.members, "disagreement": ens.disagreement,
                   "distances": distance_table(ens, _merge_labels(evaluation, merges))} if ens else None),
    )
    write_json(out / "report.json", report.to_dict())
    return report


__all__ = ["FAR_APART_SPREAD", "PipelineReport", "chance_levels", "write_report"]
