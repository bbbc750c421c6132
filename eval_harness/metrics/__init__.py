"""The commonsense accuracy as an ``evaluate`` metric module, shipped inside the package.

:func:`metric_path` is the directory to give ``evaluate.load``; it is a local path, so loading
needs no hub access (it works with ``HF_HUB_OFFLINE=1`` / ``HF_EVALUATE_OFFLINE=1``). The
extraction rule is :func:`eval_harness.scoring.extract_answer`; the module calls it.

Example:
    >>> import evaluate
    >>> from eval_harness import metric_path
    >>> acc = evaluate.load(metric_path(), "winogrande")  # doctest: +SKIP
    >>> acc.compute(predictions=["option2 fits"], references=["option2"])["accuracy"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import evaluate

METRIC_NAME = "commonsense_accuracy"


def metric_path() -> str:
    """Directory of the ``commonsense_accuracy`` metric module, for ``evaluate.load(path, suite)``.

    The configuration name (second argument of ``evaluate.load``) is the suite, e.g. ``"boolq"``.

    Example:
        >>> metric_path().endswith("commonsense_accuracy")
        True
    """
    return str(Path(__file__).resolve().parent / METRIC_NAME)


@functools.lru_cache(maxsize=None)
def load_metric(suite: str) -> Any:
    """The metric for ``suite``, loaded once per process from :func:`metric_path` (in memory: no
    Arrow cache files are written).

    Raises :class:`~poc_lora.errors.ConfigError` for an unknown suite (at ``compute`` time).

    Example:
        >>> load_metric("boolq").compute(predictions=["true"], references=["true"])["accuracy"]  # doctest: +SKIP
        1.0
    """
    return evaluate.load(metric_path(), suite, keep_in_memory=True)


__all__ = ["METRIC_NAME", "load_metric", "metric_path"]
