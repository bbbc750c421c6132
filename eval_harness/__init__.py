"""Commonsense evaluation for poc-lora: the eight suites, generation and ranking modes.

``import eval_harness`` is cheap: each public name below loads its module on first access
(PEP 562, as :mod:`poc_lora` does). :mod:`eval_harness.suites` and :mod:`eval_harness.data` need
neither torch nor transformers; :mod:`eval_harness.scoring` and :mod:`eval_harness.runner` import
them (they score models). This package imports only the core of :mod:`poc_lora` (data formats,
model loading, adapter I/O, outputs), never its workflows (layer contract in ``pyproject.toml``).

Example:
    >>> from eval_harness import extract_answer
    >>> extract_answer("winogrande", "option2 fits")
    'option2'
"""

from __future__ import annotations

import importlib
from typing import Any

import poc_lora  # noqa: F401  (cheap: quiets bitsandbytes' optional Hub kernel before PEFT loads)

# public name -> module that defines it; loaded on first access so that a user of the suites or
# the test-set converters does not pay for torch (measured: about 4 s under load).
_LAZY = {
    "SUITES": "eval_harness.suites",
    "Suite": "eval_harness.suites",
    "get_suite": "eval_harness.suites",
    "parse_tasks": "eval_harness.suites",
    "load_suite": "eval_harness.data",
    "from_hub_record": "eval_harness.data",
    "write_hub_split": "eval_harness.data",
    "extract_answer": "eval_harness.scoring",
    "rank_scores": "eval_harness.scoring",
    "generate_responses": "eval_harness.scoring",
    "evaluate": "eval_harness.runner",
    "metric_path": "eval_harness.metrics",
    "load_metric": "eval_harness.metrics",
    "EvalResult": "eval_harness.results",
    "ModelResult": "eval_harness.results",
    "SuiteResult": "eval_harness.results",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eval_harness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
