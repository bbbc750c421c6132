"""poc-lora: Noisy AdamW training and PoC merging of LoRA adapters.

Public API (imported lazily, so ``import poc_lora`` does not pull in torch):

    >>> from poc_lora import NoisyAdamW, merge_adapters  # doctest: +SKIP

Layers (each imports only those below it; ``[tool.importlinter]`` in ``pyproject.toml`` is the
checked contract, ``tests/test_layers.py`` runs it and also refuses import cycles)::

    cli            poc_lora.cli: a thin argparse front end
    workflows      pipeline (and the demo) > ensemble > train > trainer; mfnn (Figure 1/2, Table 2)
    eval_harness   the commonsense evaluation (a top-level package)
    core           config, merge, cards, models, gguf > testing (the tiny model) >
                   adapters, data (suites, templates, instructions, synthetic data) >
                   optim, report, stages, runtime > outputs, cache, citation > errors
"""

from __future__ import annotations

import importlib
from typing import Any

from .runtime import quiet_hub_kernel_notices

__version__ = "0.1.0"

# Before any module here imports PEFT (which imports bitsandbytes): see quiet_hub_kernel_notices.
quiet_hub_kernel_notices()

# public name -> module that defines it
_LAZY = {
    "NoisyAdamW": "poc_lora.optim",
    "create_noisy_optimizer": "poc_lora.trainer",
    "NoiseScaleCallback": "poc_lora.trainer",
    "NoisyAdamWTrainer": "poc_lora.trainer",
    "noisy_adamw_kwargs": "poc_lora.trainer",
    "merge_adapters": "poc_lora.merge",
    "MergeReport": "poc_lora.merge",
    "train_adapter": "poc_lora.train",
    "train_ensemble": "poc_lora.ensemble",
    "load_config": "poc_lora.config",
    "TrainConfig": "poc_lora.config",
    "run_pipeline": "poc_lora.pipeline",
    "run_figure1": "poc_lora.mfnn.experiments",
    "run_figure2": "poc_lora.mfnn.experiments",
    "run_table2": "poc_lora.mfnn.experiments",
    "PocLoraError": "poc_lora.errors",
    "ConfigError": "poc_lora.errors",
    "DataError": "poc_lora.errors",
    "AdapterError": "poc_lora.errors",
    "OutputError": "poc_lora.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'poc_lora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
