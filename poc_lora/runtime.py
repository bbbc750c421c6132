"""Small process-level helpers shared by several modules: derived seeds, torch thread count.

Example:
    >>> from poc_lora.runtime import derive_seed, torch_threads
    >>> derive_seed(0, "draws") == derive_seed(0, "draws")
    True
    >>> with torch_threads(1):  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from ``seed`` and any repr-able keys: well scrambled, stable across runs and
    platforms. Used for counter-based streams (a stream's seed depends only on its key, never
    on how many numbers were drawn before), which is what makes resume and sharding exact."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block, restoring the previous count.

    Small tensor ops (a few MB) are slower multi-threaded on a busy machine: each op waits for
    every thread to be scheduled. Callers that run many such ops use ``torch_threads(1)``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
