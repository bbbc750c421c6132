"""Sections added to existing cards later: ensemble membership (``poc_lora.ensemble``) and the
evaluation table with ``model-index`` results (``poc_lora.pipeline``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCardData

from ._common import CARD_NAME, _load_card, _table, _update

logger = logging.getLogger(__name__)


def add_ensemble_section(members: Sequence[str | Path], seeds: Sequence[int], merged: str | Path | None = None) -> None:
    """Note in each member's card that it is member j of an ensemble of M (seed = seed_0 + j).

    Example:
        >>> add_ensemble_section(["runs/e/adapter_0", "runs/e/adapter_1"], [0, 1], "runs/e/merged")  # doctest: +SKIP
    """
    m = len(members)
    for j, (path, seed) in enumerate(zip(members, seeds)):
        text = (f"Member {j} of an ensemble of M = {m} adapters trained independently with the same settings "
                f"and seeds {', '.join(map(str, seeds))} (this one: {seed}), trained by `poc-lora ensemble`."
                + (f" Their PoC merge is `{merged}`." if merged else ""))
        _update(Path(path), "Ensemble", text)


def add_evaluation_cards(
    evaluation: Mapping[str, Any],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    dataset_names: Mapping[str, str] | None = None,
) -> list[Path]:
    """Add the evaluation table (and ``model-index`` results) to the card of every evaluated adapter.

    ``evaluation``: :func:`eval_harness.evaluate`'s result, or its ``summary.json`` mapping (``models[key]["adapter"]`` is the
    directory, ``models[key]["suites"][suite]["accuracy"]`` a fraction); ``columns`` / ``rows``:
    the table to show (accuracy in %, e.g. the pipeline report's); ``dataset_names``: suite ->
    display name for the metadata. Returns the cards written.

    Example:
        >>> add_evaluation_cards(evaluation, report["columns"], report["table"])  # doctest: +SKIP
    """
    if hasattr(evaluation, "to_dict"):  # an eval_harness EvalResult: its summary.json layout
        evaluation = evaluation.to_dict()  # type: ignore[union-attr]
    names = dict(dataset_names or {})
    header = ["Method", *columns]
    table = _table(header, [[r.get(c) for c in header] for r in rows])
    written = []
    for key, model in evaluation.get("models", {}).items():
        if not model.get("adapter"):
            continue
        suites = model.get("suites", {})
        n = sorted({s.get("n") for s in suites.values()})
        text = (f"Evaluated by the poc-lora pipeline (`eval_harness`, mode `{evaluation.get('mode')}`, "
                f"{'/'.join(map(str, n))} examples per suite; this model is `{key}`). Accuracy in %:\n\n{table}")
        results = [EvalResult(task_type="text-generation", dataset_type=suite, dataset_name=names.get(suite, suite),
                              metric_type="accuracy", metric_value=s["accuracy"], metric_name="accuracy")
                   for suite, s in suites.items()]
        card = _load_card(Path(model["adapter"]) / CARD_NAME)
        if card is None:
            logger.warning("%s has no model card; its evaluation is not recorded there", model["adapter"])
            continue
        data = card.data.to_dict()
        data.pop("model-index", None)
        new = ModelCardData(**data, eval_results=results, model_name=Path(model["adapter"]).name)
        path = _update(Path(model["adapter"]), "Evaluation", text, new.to_dict())
        if path is not None:
            written.append(path)
    return written
