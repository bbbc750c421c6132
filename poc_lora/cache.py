"""Where generated assets live (the tiny model, converted GGUF models, synthetic data).

A leaf module (no project imports), so the model loader, the GGUF converter, the data layer and
the test assets all read the same location without importing one another.

Example:
    >>> cache_dir().name  # doctest: +SKIP
    'poc-lora'
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated assets live: ``$POC_LORA_CACHE`` or ``~/.cache/poc-lora``."""
    return Path(os.environ.get("POC_LORA_CACHE", Path.home() / ".cache" / "poc-lora"))


__all__ = ["cache_dir"]
