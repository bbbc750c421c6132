"""The output ensemble of M adapters and how far a merge is from it, from prediction rows alone.

The paper (arXiv:2502.05784, Sections 3-4) merges M networks trained with Langevin noise because
their *ensemble* approximates the mean-field limit; the PoC merge is meant to be that ensemble at
the cost of one model. This module builds the ensemble from the members' prediction rows (what
the runner writes to ``<model>/<suite>/predictions.jsonl``), so it costs no forward pass:

- rank and choice modes: each member's option distribution is the softmax of its option
  log-likelihoods (:func:`~eval_harness.calibration.option_probabilities`); the ensemble's is
  their mean (probability averaging, as deep ensembles do); its prediction is the argmax (the
  option listed first among equal ones). Choice mode's ``prediction_norm`` is the argmax of the
  mean of the members' length-normalised distributions (softmax of score / length), so the
  ensemble has an ``acc_norm`` too;
- generate mode: a majority vote of the members' extracted answers; unparsed answers (None) do
  not vote; a tie goes to the tied answer of the lowest member index; no parsed answer at all
  gives None (unparsed).

And for a model evaluated beside the members (the PoC merge, say):
:func:`distance_to_ensemble` (prediction agreement with the ensemble and the mean
KL(ensemble || model) over the option distributions, the language-model analogue of the paper's
distance to the mean-field limit, Figure 1), and :func:`pairwise_disagreement` of the members.

Example:
    >>> a = [{"index": 0, "label": "answer1", "scores": {"answer1": 0.0, "answer2": -2.0}}]
    >>> b = [{"index": 0, "label": "answer1", "scores": {"answer1": -2.0, "answer2": 0.0}}]
    >>> row = ensemble_rows([a, b], ["a", "b"])[0]
    >>> row["prediction"], round(row["probabilities"]["answer1"], 3)
    ('answer1', 0.5)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from poc_lora.errors import DataError

from .calibration import option_probabilities, row_probabilities, top_prediction

# Copied from each member's rows into the ensemble's (the question's identity and answer).
_SHARED = ("index", "label")


def ensemble_label(size: int) -> str:
    """The table label of an output ensemble of ``size`` members: it is M models, not one."""
    return f"LoRA ensemble (M = {size}, M forward passes)"


def _check_members(members: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str], where: str) -> None:
    if len(members) < 2:
        raise DataError(f"{where}: an ensemble needs at least 2 members, got {len(members)}")
    if len(members) != len(names):
        raise ValueError(f"{len(members)} members but {len(names)} names")
    n = len(members[0])
    for name, rows in zip(names, members):
        if len(rows) != n:
            raise DataError(f"{where}: the ensemble's members were scored on different records ({names[0]}: {n} "
                            f"rows, {name}: {len(rows)}); evaluate them with the same data and limit")
    for i in range(n):
        first = members[0][i]
        for name, rows in zip(names[1:], members[1:]):
            row = rows[i]
            if any(row.get(k) != first.get(k) for k in _SHARED):
                raise DataError(f"{where}: row {i} differs between {names[0]} and {name} (index/label "
                                f"{[first.get(k) for k in _SHARED]} vs {[row.get(k) for k in _SHARED]}): "
                                "the members were scored on different records")
            if "scores" in first and set(row.get("scores", ())) != set(first["scores"]):
                raise DataError(f"{where}: row {i}: {names[0]} and {name} scored different options")


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer (None does not vote); a tie goes to the tied answer given
    by the lowest index; None when no answer was parsed.

    Example:
        >>> majority_vote(["answer2", "answer1", "answer1", "answer2"])
        'answer2'
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def _mean(distributions: Sequence[Mapping[str, float]]) -> dict[str, float]:
    labels = list(distributions[0])
    return {k: sum(d[k] for d in distributions) / len(distributions) for k in labels}


def ensemble_rows(members: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str],
                  where: str = "ensemble") -> list[dict[str, Any]]:
    """The ensemble's prediction rows from its members' rows (one list per member, in the same
    record order, as the runner writes them).

    Rank/choice rows get ``probabilities`` (the mean option distribution), ``prediction``,
    ``correct``, ``member_predictions``; choice rows also ``prediction_norm``/``correct_norm``.
    Generate rows get the vote as ``prediction`` and ``member_predictions``.

    Raises:
        DataError: fewer than 2 members, or members scored on different records (different
            counts, indices, labels or options), naming ``where`` and the members.
    """
    _check_members(members, names, where)
    out = []
    for i, group in enumerate(zip(*members)):
        row: dict[str, Any] = {k: group[0][k] for k in _SHARED if k in group[0]}
        predictions = [r.get("prediction") for r in group]
        if all("scores" in r for r in group):
            probs = _mean([row_probabilities(r) for r in group])  # type: ignore[misc]
            row.update(probabilities=probs, prediction=top_prediction(probs))
            if all("lengths" in r for r in group):
                lengths = group[0]["lengths"]
                normed = _mean([option_probabilities({k: s / max(lengths[k], 1) for k, s in r["scores"].items()})
                                for r in group])
                row["prediction_norm"] = top_prediction(normed)
                row["correct_norm"] = row["prediction_norm"] == row["label"]
        else:
            row["prediction"] = majority_vote(predictions)
        row["correct"] = row["prediction"] == row.get("label")
        row["member_predictions"] = dict(zip(names, predictions))
        out.append(row)
    return out


def kl_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """KL(p || q) = sum_k p_k ln(p_k / q_k) in nats over the labels of ``p``; q_k that underflowed
    to 0 is taken as the smallest positive double (a large, finite value)."""
    return sum(pk * (math.log(pk) - math.log(max(q[k], 5e-324))) for k, pk in p.items() if pk > 0)


@dataclass(frozen=True)
class EnsembleDistance:
    """How close one model's predictions are to the ensemble's on one set of questions."""

    n: int
    agreement: float  # fraction of questions where the model predicts what the ensemble predicts
    kl: float | None  # mean KL(ensemble || model) in nats; None in generate mode (no distributions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distance_to_ensemble(ensemble: Sequence[Mapping[str, Any]], model: Sequence[Mapping[str, Any]],
                         where: str = "model") -> EnsembleDistance:
    """Agreement and mean KL(ensemble || model) between the ensemble's rows and a model's rows of
    the same records.

    Raises:
        DataError: the rows are of different records (count, index or label), naming ``where``.
    """
    if len(ensemble) != len(model):
        raise DataError(f"{where}: {len(model)} rows, the ensemble {len(ensemble)}: not the same records")
    agree, kl, have_kl = 0, 0.0, bool(ensemble)
    for i, (e, m) in enumerate(zip(ensemble, model)):
        if any(e.get(k) != m.get(k) for k in _SHARED):
            raise DataError(f"{where}: row {i} is not the ensemble's record (index/label differ)")
        agree += e.get("prediction") == m.get("prediction")
        p, q = row_probabilities(e), row_probabilities(m)
        if p is None or q is None:
            have_kl = False
        else:
            kl += kl_divergence(p, q)
    n = len(ensemble)
    return EnsembleDistance(n=n, agreement=agree / n if n else 0.0, kl=kl / n if have_kl else None)


def pairwise_disagreement(members: Sequence[Sequence[Mapping[str, Any]]]) -> float:
    """The members' mean pairwise disagreement: over all pairs of members, the fraction of
    questions on which their predictions differ, averaged (0: all members always agree)."""
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    if not pairs or not members[0]:
        return 0.0
    return sum(sum(x.get("prediction") != y.get("prediction") for x, y in zip(a, b)) / len(a)
               for a, b in pairs) / len(pairs)


__all__ = ["EnsembleDistance", "distance_to_ensemble", "ensemble_label", "ensemble_rows", "kl_divergence",
           "majority_vote", "pairwise_disagreement"]
