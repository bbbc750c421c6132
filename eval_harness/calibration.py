"""Calibration of option distributions: NLL, Brier score, ECE and confidence, as pure functions.

A model's *option distribution* for one multiple-choice question is the softmax of its option
log-likelihoods, the raw sums that ``acc`` takes its argmax of (rank mode: of "the correct answer
is <label>"; choice mode: of each option's text), :func:`option_probabilities`. Over N questions
with correct options y_i, probabilities p_i and top probability c_i = max_k p_ik:

- **NLL**: mean of -ln p_i[y_i] (nats; 0 is perfect, ln K is a uniform guess among K options);
- **Brier score**: mean of sum_k (p_ik - [k = y_i])^2 (0 to 2; a uniform guess among K scores
  1 - 1/K);
- **ECE** (expected calibration error, Guo et al. 2017): the questions binned by c_i into 15
  equal-width bins of [0, 1] (a bin holds (lo, hi]; c_i = 0 cannot occur), then
  sum_b (n_b / N) |acc_b - conf_b|, with acc_b the fraction answered correctly and conf_b the
  mean c_i in bin b (0 is perfect);
- **confidence**: mean c_i; above the accuracy means over-confident.

These are the definitions the LoRA-ensemble literature reports (Laplace-LoRA, BLoB). Caveat for
choice mode: raw sums over multi-token options favour short options, so every model's softmax is
sharp and ECE is high for all of them; compare models row by row, do not read the level alone
(docs/evaluation.md).

Example:
    >>> probs = option_probabilities({"answer1": 0.0, "answer2": -1.0})
    >>> round(probs["answer1"], 4)
    0.7311
    >>> m = calibration([probs], ["answer1"])
    >>> round(m.nll, 4), round(m.brier, 4), round(m.ece, 4)
    (0.3133, 0.1446, 0.2689)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

ECE_BINS = 15  # equal-width bins of the top probability (the number Guo et al. and the LoRA-ensemble papers use)


def option_probabilities(scores: Mapping[str, float]) -> dict[str, float]:
    """The softmax of option log-likelihoods ``{label: log p}`` (any real numbers), in the same
    label order; computed from the maximum so that sums of -1000 nats do not underflow.

    Raises:
        ValueError: ``scores`` is empty or holds a non-finite value.
    """
    if not scores:
        raise ValueError("no options to take a softmax over")
    values = list(scores.values())
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"option log-likelihoods must be finite, got {values}")
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return {label: w / total for label, w in zip(scores, weights)}


def top_prediction(probabilities: Mapping[str, float]) -> str:
    """The label of the largest probability; the label listed first among equal ones (as
    ``acc``'s argmax)."""
    labels = list(probabilities)
    return max(labels, key=lambda k: (probabilities[k], -labels.index(k)))


@dataclass(frozen=True)
class Calibration:
    """Calibration of one model on a set of questions (definitions in the module docstring)."""

    n: int
    nll: float
    brier: float
    ece: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
                     ) -> list[tuple[int, float, float]]:
    """Per equal-width bin of the confidence, ``(count, accuracy, mean confidence)`` (zeros in an
    empty bin); a bin holds (lo, hi], the first one [0, hi]. What ECE sums and a reliability
    diagram draws."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    count = [0] * bins
    hits = [0.0] * bins
    conf = [0.0] * bins
    for c, ok in zip(confidences, correct):
        b = min(bins - 1, max(0, math.ceil(c * bins) - 1))
        count[b] += 1
        hits[b] += bool(ok)
        conf[b] += c
    return [(n, hits[b] / n if n else 0.0, conf[b] / n if n else 0.0) for b, n in enumerate(count)]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width bins: sum_b (n_b / N) |acc_b - conf_b| (0 for no questions)."""
    total = len(confidences)
    if not total:
        return 0.0
    return sum(n / total * abs(acc - conf) for n, acc, conf in reliability_bins(confidences, correct, bins))


def calibration(probabilities: Sequence[Mapping[str, float]], labels: Sequence[str], bins: int = ECE_BINS
                ) -> Calibration:
    """NLL, Brier score, ECE and mean confidence of option distributions against the correct labels.

    Args:
        probabilities: one ``{label: probability}`` per question (each sums to 1).
        labels: the correct label of each question; it must be one of that question's options.

    Raises:
        ValueError: different lengths, no questions, or a label that is not among its options.
    """
    if len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} option distributions but {len(labels)} labels")
    if not labels:
        raise ValueError("calibration of no questions")
    nll = brier = 0.0
    confidences, correct = [], []
    for i, (probs, label) in enumerate(zip(probabilities, labels)):
        if label not in probs:
            raise ValueError(f"question {i}: the correct label {label!r} is not among its options {list(probs)}")
        # a probability that underflowed to 0 costs what the smallest double costs, not infinity
        nll -= math.log(max(probs[label], 5e-324))
        brier += sum((p - (k == label)) ** 2 for k, p in probs.items())
        confidences.append(max(probs.values()))
        correct.append(top_prediction(probs) == label)
    n = len(labels)
    return Calibration(n=n, nll=nll / n, brier=brier / n, ece=expected_calibration_error(confidences, correct, bins),
                       confidence=sum(confidences) / n)


def row_probabilities(row: Mapping[str, Any]) -> dict[str, float] | None:
    """The option distribution of one prediction row: its ``probabilities`` (an ensemble's), or
    the softmax of its ``scores`` (rank and choice modes); None for a generate-mode row."""
    if "probabilities" in row:
        return dict(row["probabilities"])
    if "scores" in row:
        return option_probabilities(row["scores"])
    return None


def rows_calibration(rows: Sequence[Mapping[str, Any]], bins: int = ECE_BINS) -> Calibration | None:
    """:func:`calibration` of a suite's prediction rows (rank and choice modes), or None when the
    rows carry no option scores (generate mode) or none at all."""
    probs = [row_probabilities(r) for r in rows]
    if not rows or any(p is None for p in probs):
        return None
    return calibration(probs, [r["label"] for r in rows], bins)  # type: ignore[arg-type]


__all__ = ["Calibration", "ECE_BINS", "calibration", "expected_calibration_error", "option_probabilities",
           "reliability_bins", "row_probabilities", "rows_calibration", "top_prediction"]
