"""Where generated assets live (the tiny model, converted GGUF models, synthetic data, validation
splits), and the lock that makes each one built by one process only.

A leaf module (no project imports), so the model loader, the GGUF converter, the data layer and
the test assets all read the same location without importing one another.

Example:
    >>> cache_dir().name  # doctest: +SKIP
    'poc-lora'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock


def cache_dir() -> Path:
    """Where generated assets live: ``$POC_LORA_CACHE`` or ``~/.cache/poc-lora``."""
    return Path(os.environ.get("POC_LORA_CACHE", Path.home() / ".cache" / "poc-lora"))


def build_once(path: Path, is_built: Callable[[Path], bool], build: Callable[[], object]) -> Path:
    """Call ``build()`` unless ``is_built(path)``, holding an inter-process lock on ``path``.

    Every rank of a torchrun job (and every user process sharing the cache) asks for the same
    assets at start-up; without the lock each builds its own copy and the last rename replaces a
    directory another process is already reading. The lock file ``.<name>.lock`` sits beside
    ``path``; the check is repeated under the lock, so the processes that waited reuse the
    winner's result. ``filelock`` (a dependency of huggingface_hub) provides the lock.

    Example:
        >>> build_once(cache_dir() / "thing", lambda p: (p / "done").exists(), make_thing)  # doctest: +SKIP
    """
    path = Path(path)
    if is_built(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not is_built(path):
            build()
    return path


def save_asset_model(model: Any, directory: str | os.PathLike) -> None:
    """``model.save_pretrained(directory)`` from whichever process builds a cached asset.

    Under torchrun, transformers' ``save_pretrained`` writes weights on global rank 0 only
    (``PreTrainedModel.should_save_on_this_rank``), but the process that holds
    :func:`build_once`'s lock may be any rank: left alone, a rank-1 builder writes a model
    directory without its weights. This process is the asset's one writer, so it saves here.
    """
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(directory)
    finally:
        del model.should_save_on_this_rank


__all__ = ["build_once", "cache_dir", "save_asset_model"]
