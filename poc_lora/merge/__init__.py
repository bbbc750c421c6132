"""PoC merge of M PEFT LoRA adapters into one adapter (or into the base model).

The paper's merge (Nitanda et al., ICML 2025, arXiv:2502.05784, §3 and §5.2) is
``dW = sum_j w_j s_j B_j A_j`` with ``w_j = 1/M``: a LoRA of rank ``sum_j r_j`` whose B is
``[w_1 s_1 B_1 ... w_M s_M B_M]`` and whose A stacks the ``A_j``. A merge runs in three steps:

* :mod:`.plan`: the inputs, read lazily and checked, and the output ranks (:func:`make_plan`);
* :mod:`.methods`: the registry of merge methods (``poc``, ``svd``, ``prune``, ``soup``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``model_stock``, one file each), each a pure function from the
  stacked factors of one module to the written factors;
  :mod:`.compute` feeds them module by module and :mod:`.stats` computes typed statistics;
* :mod:`.writer` (a merged adapter) or :mod:`.base` (the base model plus the merged update):
  streaming, into an atomic output, with ``merge_report.json`` and a model card.

:func:`merge_adapters` (in :mod:`.api`) runs all three. Names load on first use, so reading
the method registry (the CLI's ``--method`` choices) does not import torch.

Example:
    >>> from poc_lora import merge_adapters
    >>> report = merge_adapters(["runs/a0", "runs/a1"], "runs/merged")  # doctest: +SKIP
    >>> report.overall.spread  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from .methods import get_method, method_names, methods_markdown, register, unregister

# public name -> submodule that defines it (imported on first access: it imports torch)
_LAZY = {
    "merge_adapters": "api",
    "main_merge": "api",
    "MergeReport": "stats",
    "MergeStats": "stats",
    "ModuleStats": "stats",
    "MergePlan": "plan",
    "make_plan": "plan",
    "REPORT_NAME": "writer",
}


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered names now (a method registered later appears too)
        return method_names()
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["METHODS", "get_method", "method_names", "methods_markdown", "register", "unregister",
           *_LAZY]
