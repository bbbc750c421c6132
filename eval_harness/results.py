"""Typed evaluation results: what :func:`eval_harness.runner.evaluate` returns and writes.

Each class maps one-to-one onto the JSON the runner writes (``<model>/<suite>/summary.json`` for
a :class:`SuiteResult`, ``summary.json`` for an :class:`EvalResult`): ``to_dict`` gives that
layout, ``from_dict`` reads it back, so files written by earlier releases load unchanged.
Accuracies are fractions; the ``table`` rows are in % (as ``results.md`` shows them).

Example:
    >>> from eval_harness.results import EvalResult
    >>> result = EvalResult.load("results/eval/summary.json")  # doctest: +SKIP
    >>> result.models["merged"].average  # doctest: +SKIP
    0.61
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from poc_lora.errors import OutputError


def _fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; an OutputError if a required one is missing."""
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise OutputError(f"{where}: not an evaluation result (missing {', '.join(missing)})")
    return {f.name: data[f.name] for f in fields if f.name in data}


@dataclass
class SuiteResult:
    """One model on one suite (``<model>/<suite>/summary.json``)."""

    model: str
    kind: str
    suite: str
    n: int
    correct: int
    accuracy: float
    unparsed: int
    seconds: float
    examples_per_second: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    # prompts left-truncated to fit the model's context (eval_harness.scoring's rule); 0 in older files
    truncated_prompts: int = 0
    acc_norm: float | None = None  # choice mode: lm-evaluation-harness's length-normalised accuracy
    # rank and choice modes: calibration of the option softmax (eval_harness.calibration); None in
    # generate mode and in files of earlier releases
    nll: float | None = None
    brier: float | None = None
    ece: float | None = None
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "suite result") -> "SuiteResult":
        return cls(**_fields(cls, data, where))


@dataclass
class ModelResult:
    """One model (base, adapter or merged adapter) on every suite; ``average`` over the suites."""

    kind: str  # base | adapter | merged | ensemble (the members' output ensemble, M forward passes)
    adapter: str | None
    template: str
    template_source: str
    suites: dict[str, SuiteResult]
    average: float
    unparsed: int
    average_norm: float | None = None  # choice mode: the suites' mean acc_norm
    # rank and choice modes: the suites' mean of each calibration metric (SuiteResult's)
    nll: float | None = None
    brier: float | None = None
    ece: float | None = None
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["suites"] = {k: s.to_dict() for k, s in self.suites.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model result") -> "ModelResult":
        values = _fields(cls, data, where)
        values["suites"] = {k: SuiteResult.from_dict(s, where) for k, s in values["suites"].items()}
        return cls(**values)


@dataclass
class EnsembleResult:
    """The output ensemble of the evaluated adapters (:mod:`eval_harness.ensemble`) and the
    distance of every other model to it; fractions and nats, per suite and averaged over suites."""

    key: str  # its model key in ``EvalResult.models`` (and output sub-directory)
    label: str  # "LoRA ensemble (M = 4, M forward passes)"
    members: list[str]  # the adapters' model keys, in member order (the vote's tie order)
    disagreement: dict[str, float]  # per suite, the members' mean pairwise disagreement; "average" too
    # model key -> {"agreement": {suite: fraction, "average": ...}, "kl": {suite: nats, "average": ...} or None}
    distances: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "ensemble result") -> "EnsembleResult":
        return cls(**_fields(cls, data, where))


@dataclass
class EvalResult:
    """An evaluation run (``summary.json``): every model, the table, the files, the timing."""

    mode: str
    base_model: str
    data_dir: str
    tasks: list[str]
    models: dict[str, ModelResult]
    table: list[dict[str, Any]]
    files: dict[str, str]
    seconds: dict[str, float]
    ensemble: EnsembleResult | None = None  # when two or more adapters were evaluated with ensemble=True
    calibration_table: list[dict[str, Any]] = field(default_factory=list)  # rank/choice: NLL, Brier, ECE rows

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` layout."""
        out = dataclasses.asdict(self)
        out["models"] = {k: m.to_dict() for k, m in self.models.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "evaluation result") -> "EvalResult":
        """Read the ``summary.json`` layout; raises :class:`OutputError` naming ``where`` if it is not one."""
        values = _fields(cls, data, where)
        values["models"] = {k: ModelResult.from_dict(m, where) for k, m in values["models"].items()}
        if values.get("ensemble") is not None:
            values["ensemble"] = EnsembleResult.from_dict(values["ensemble"], where)
        return cls(**values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalResult":
        """Read a ``summary.json`` written by :func:`~eval_harness.runner.evaluate`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read the evaluation summary {path}: {exc}") from None
        if not isinstance(data, dict):
            raise OutputError(f"{path}: not an evaluation result")
        return cls.from_dict(data, str(path))


__all__ = ["EnsembleResult", "EvalResult", "ModelResult", "SuiteResult"]
