"""From prediction rows to results: pair summaries, model results, the output ensemble, the tables.

The runner (:mod:`eval_harness.runner`) scores; everything computed *from* the prediction rows
lives here, so a finished evaluation can be summarised again without a model:

- :func:`write_pair`: one (model, suite) pair's ``predictions.jsonl`` and ``summary.json``
  (accuracy through the ``commonsense_accuracy`` metric, acc_norm, calibration);
- :func:`model_result`: one model over the suites (means of the suites' metrics);
- :func:`add_ensemble`: the adapters' output ensemble written as one more model
  (:mod:`eval_harness.ensemble`, no forward pass) and every other model's distance to it;
- :func:`results_table`, :func:`calibration_table`, :func:`distance_table`: the rows of
  ``results.md|csv``, ``calibration.md|csv`` and the distance table.

Example:
    >>> from eval_harness.results import EvalResult
    >>> result = EvalResult.load("results/eval/summary.json")  # doctest: +SKIP
    >>> calibration_table(result.models, result.ensemble)[0]["NLL"]  # doctest: +SKIP
    1.93
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from poc_lora.data.suites import AVERAGE_COLUMN, Suite
from poc_lora.errors import OutputError
from poc_lora.outputs import atomic_write_text, write_json
from poc_lora.report import accuracy_percentages, comparison_rows
from poc_lora.stages import write_stage

from .calibration import option_probabilities, rows_calibration
from .ensemble import distance_to_ensemble, ensemble_label, ensemble_rows, pairwise_disagreement
from .metrics import load_metric
from .results import EnsembleResult, ModelResult, SuiteResult

KIND_LABELS = {"base": "Base model", "adapter": "LoRA", "merged": "Merged", "ensemble": "LoRA ensemble"}
CALIBRATION = ("nll", "brier", "ece", "confidence")
# calibration_table's columns: accuracy and confidence in %, NLL in nats, Brier and ECE as fractions
CALIBRATION_COLUMNS = ["Method", "Model", "Acc.", "NLL", "Brier", "ECE", "Conf."]
ENSEMBLE_KEY = "lora-ensemble"
# distance_table's columns: agreement with the ensemble's predictions in %, KL in nats
DISTANCE_COLUMNS = ["Model", "Agreement with ensemble (%)", "KL(ensemble ‖ model)"]


def write_pair(pair_dir: Path, key: str, kind: str, suite: Suite, rows: list[dict[str, Any]],
               settings: dict[str, Any], seconds: float) -> SuiteResult:
    """Write one pair's ``predictions.jsonl`` (rank/choice rows gain ``probabilities``, the option
    softmax) and ``summary.json``, then its stage marker; return the :class:`SuiteResult`."""
    for row in rows:
        if "scores" in row and "probabilities" not in row:
            row["probabilities"] = option_probabilities(row["scores"])
    atomic_write_text(pair_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # The commonsense_accuracy metric scores the generated texts (rank mode: the predicted label
    # words, which it extracts unchanged), so the harness and evaluate users share one rule.
    scored = load_metric(suite.name).compute(
        predictions=[r["generated"] if "generated" in r else (r["prediction"] or "") for r in rows],
        references=[r["label"] for r in rows],
    )
    cal = rows_calibration(rows)
    summary = SuiteResult(
        model=key,
        kind=kind,
        suite=suite.name,
        n=len(rows),
        correct=scored["correct"],
        accuracy=scored["accuracy"],
        unparsed=scored["unparsed"],
        seconds=round(seconds, 3),
        examples_per_second=round(len(rows) / seconds, 3) if seconds > 0 else None,
        settings=settings,
        truncated_prompts=sum(bool(r.get("prompt_truncated")) for r in rows),
        acc_norm=sum(r["correct_norm"] for r in rows) / len(rows) if rows and "correct_norm" in rows[0] else None,
        **({k: getattr(cal, k) for k in CALIBRATION} if cal else {}),
    )
    write_json(pair_dir / "summary.json", summary.to_dict())
    write_stage(pair_dir, "eval", settings, files=["predictions.jsonl", "summary.json"])  # last: the pair is done
    return summary


def _mean(values: Sequence[float | None]) -> float | None:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None  # type: ignore[arg-type]


def model_result(kind: str, adapter: str | None, template: str, template_source: str,
                 summaries: dict[str, SuiteResult]) -> ModelResult:
    """One model's :class:`ModelResult`: each metric the unweighted mean over its suites (as the
    paper's "Ave." column), None where a suite lacks it."""
    suites = list(summaries.values())
    return ModelResult(
        kind=kind, adapter=adapter, template=template, template_source=template_source, suites=summaries,
        average=sum(s.accuracy for s in suites) / len(suites),
        unparsed=sum(s.unparsed for s in suites),
        average_norm=_mean([s.acc_norm for s in suites]),
        **{k: _mean([getattr(s, k) for s in suites]) for k in CALIBRATION},
    )


def read_rows(pair_dir: Path) -> list[dict[str, Any]]:
    """The prediction rows of one finished pair (``predictions.jsonl``)."""
    path = pair_dir / "predictions.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read the prediction rows {path}: {exc}") from None


def add_ensemble(output: Path, models: dict[str, ModelResult], suites: Sequence[Suite], mode: str
                 ) -> EnsembleResult | None:
    """Build the output ensemble of the ``adapter`` models of ``models`` from their prediction
    rows under ``output``, write it as the model ``lora-ensemble`` (its pairs' ``seconds`` are
    the members' sum: it costs M forward passes), add it to ``models`` (after the adapters) and
    return its :class:`EnsembleResult`, with every other model's distance to it. None with fewer
    than two adapters.

    Raises:
        DataError: the members were scored on different records (:func:`ensemble_rows`).
    """
    members = [k for k, m in models.items() if m.kind == "adapter"]
    if len(members) < 2:
        return None
    key = ENSEMBLE_KEY
    while key in models:
        key += "_"
    first = models[members[0]]
    summaries, disagreement = {}, {}
    distances: dict[str, dict[str, Any]] = {k: {"agreement": {}, "kl": {}} for k in models}
    for suite in suites:
        rows = {k: read_rows(output / k / suite.name) for k in models}
        member_rows = [rows[k] for k in members]
        ens = ensemble_rows(member_rows, members, where=f"ensemble of {', '.join(members)} on {suite.name}")
        disagreement[suite.name] = pairwise_disagreement(member_rows)
        settings = {
            "mode": mode,
            "ensemble": "majority vote" if mode == "generate" else "probability averaging",
            "members": {k: models[k].suites[suite.name].settings.get("adapter_sha256") for k in members},
            **{k: first.suites[suite.name].settings.get(k) for k in ("data_file", "data_sha256", "limit")},
        }
        seconds = sum(models[k].suites[suite.name].seconds for k in members)
        summaries[suite.name] = write_pair(output / key / suite.name, key, "ensemble", suite, ens, settings, seconds)
        for k in models:
            d = distance_to_ensemble(ens, rows[k], where=f"{k} on {suite.name}")
            distances[k]["agreement"][suite.name] = d.agreement
            distances[k]["kl"][suite.name] = d.kl
    for d in distances.values():
        for metric in ("agreement", "kl"):
            d[metric]["average"] = _mean(list(d[metric].values()))
        if d["kl"]["average"] is None:
            d["kl"] = None
    disagreement["average"] = sum(disagreement.values()) / len(disagreement)
    ordered = {}
    for k, m in models.items():  # the ensemble row after the last adapter
        ordered[k] = m
        if k == members[-1]:
            ordered[key] = model_result("ensemble", None, first.template, f"ensemble of {len(members)} adapters",
                                        summaries)
    models.clear()
    models.update(ordered)
    return EnsembleResult(key=key, label=ensemble_label(len(members)), members=members, disagreement=disagreement,
                          distances=distances)


def results_table(models: Mapping[str, ModelResult], suites: Sequence[Suite],
                  ensemble: EnsembleResult | None = None) -> list[dict[str, Any]]:
    """``results.md|csv``: one row per model (accuracy in %), then, with adapters and merges, the
    paper's rows (LoRA (best), LoRA (ave.), the ensemble, PoC merge)."""
    pct = {key: accuracy_percentages({s.column: m.suites[s.name].accuracy for s in suites}, m.average,
                                     AVERAGE_COLUMN)
           for key, m in models.items()}
    rows = [{"Method": ensemble.label if ensemble and key == ensemble.key else KIND_LABELS[m.kind], "Model": key,
             **pct[key]} for key, m in models.items()]
    singles = [k for k, m in models.items() if m.kind == "adapter"]
    merges = [k for k, m in models.items() if m.kind == "merged"]
    if singles and merges:
        labels = {k: "PoC merge" if len(merges) == 1 else f"PoC merge ({k})" for k in merges}
        columns = [s.column for s in suites] + [AVERAGE_COLUMN]
        keys = singles + merges + ([ensemble.key] if ensemble else [])
        rows += comparison_rows({k: pct[k] for k in keys}, columns, labels, AVERAGE_COLUMN,
                                ensemble=(ensemble.key, ensemble.label) if ensemble else None)
    return rows


def _calibration_row(method: str, key: str, m: ModelResult) -> dict[str, Any]:
    return {"Method": method, "Model": key, "Acc.": 100 * m.average, "NLL": m.nll, "Brier": m.brier, "ECE": m.ece,
            "Conf.": 100 * m.confidence if m.confidence is not None else None}


def calibration_table(models: Mapping[str, ModelResult], ensemble: EnsembleResult | None = None,
                      labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """``calibration.md|csv`` (:data:`CALIBRATION_COLUMNS`, means over the suites): Base model,
    LoRA (best) (the adapter with the best accuracy), LoRA (ave.) (the adapters' mean of each
    metric), the ensemble, then every other model (``labels``: row label per model key, else its
    kind's). Empty in generate mode (no option distributions)."""
    if not any(m.nll is not None for m in models.values()):
        return []
    labels = dict(labels or {})
    rows = [_calibration_row(labels.get(k, "Base model"), k, m) for k, m in models.items() if m.kind == "base"]
    singles = {k: m for k, m in models.items() if m.kind == "adapter"}
    if singles:
        best = max(singles, key=lambda k: singles[k].average)
        rows.append(_calibration_row("LoRA (best)", best, singles[best]))
        ave = {c: _mean([getattr(m, c) for m in singles.values()]) for c in ("average", *CALIBRATION)}
        rows.append({"Method": "LoRA (ave.)", "Model": f"mean of {len(singles)}", "Acc.": 100 * ave["average"],
                     "NLL": ave["nll"], "Brier": ave["brier"], "ECE": ave["ece"],
                     "Conf.": 100 * ave["confidence"] if ave["confidence"] is not None else None})
    if ensemble:
        rows.append(_calibration_row(ensemble.label, ensemble.key, models[ensemble.key]))
    rows += [_calibration_row(labels.get(k, KIND_LABELS[m.kind]), k, m) for k, m in models.items()
             if m.kind == "merged"]
    return rows


def distance_table(ensemble: EnsembleResult, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per model other than the ensemble: agreement with the ensemble's predictions (%)
    and mean KL(ensemble ‖ model) (nats), averaged over the suites."""
    labels = dict(labels or {})
    model, agreement, kl = DISTANCE_COLUMNS
    return [{model: labels.get(k, k), agreement: 100 * d["agreement"]["average"],
             kl: d["kl"]["average"] if d["kl"] else None}
            for k, d in ensemble.distances.items() if k != ensemble.key]


__all__ = ["CALIBRATION_COLUMNS", "DISTANCE_COLUMNS", "ENSEMBLE_KEY", "KIND_LABELS", "add_ensemble", "calibration_table",
           "distance_table", "model_result", "read_rows", "results_table", "write_pair"]
