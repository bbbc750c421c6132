"""Small process-level helpers shared by several modules: derived seeds, torch thread count and
the CLI's CPU thread defaults.

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
import os
import sys
from typing import Any, Iterator

from .errors import ConfigError


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
    import torch  # lazy: configure_threads() in this module must run before torch is imported

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


DEFAULT_CPU_THREADS = 1


def configure_threads(threads: int | None = None) -> int:
    """Set the process's CPU thread defaults before torch is imported; returns the intra-op count.

    Order: ``threads`` (``poc-lora --threads N``), else ``$OMP_NUM_THREADS`` when the user set it,
    else :data:`DEFAULT_CPU_THREADS` (1). ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``. Why: with
    OpenMP's default spin-waiting, every small kernel on a machine whose cores are busy with other
    work waits a scheduler time slice for its threads, which multiplies the wall time of the small
    models this project runs on CPUs; one thread and passive waiting cost little on an idle machine. The environment variables are inherited by child processes (torchrun workers,
    dataloader workers); if torch is already imported, its thread count is set directly too.

    Example:
        >>> configure_threads(2)  # doctest: +SKIP
        2
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    env = os.environ
    if threads is None:
        try:
            threads = int(env.get("OMP_NUM_THREADS", "")) or DEFAULT_CPU_THREADS
        except ValueError:
            threads = DEFAULT_CPU_THREADS
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
