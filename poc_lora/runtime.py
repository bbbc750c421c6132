"""Small process-level helpers shared by several modules: derived seeds, torch thread count, the
CLI's CPU thread defaults, the CPU's bf16 support and the quieting of bitsandbytes' optional Hub
kernel (:func:`quiet_hub_kernel_notices`).

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
import logging
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


def available_cores() -> int:
    """The CPU cores this process may run on (``os.sched_getaffinity``: a container's or
    ``taskset``'s limit, not the machine's count), or ``os.cpu_count()`` where affinity is unknown."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set the process's CPU thread defaults before torch is imported; returns the intra-op count.

    Order: ``threads`` (``poc-lora --threads N``), else ``$OMP_NUM_THREADS`` when the user set it,
    else :func:`available_cores`. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``: with OpenMP's
    default spin-waiting, threads that finished a kernel burn their core while waiting for the
    next one, which slows every other process on a busy machine and, on an oversubscribed one,
    makes each small kernel wait a scheduler time slice for its threads. With passive waiting all
    cores still beat one, idle or busy (docs/training.md, "CPU threads", has the measurements).
    The environment variables are inherited by child processes (torchrun workers, dataloader
    workers); if torch is already imported, its thread count is set directly too.

    Raises :class:`ConfigError` for ``threads < 1``.

    Example:
        >>> configure_threads(2)  # doctest: +SKIP
        2
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    env = os.environ
    if threads is None:
        try:
            threads = int(env.get("OMP_NUM_THREADS", "")) or available_cores()
        except ValueError:
            threads = available_cores()
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` computes bfloat16 matmuls natively (fast), not by emulation.

    CPU: the processor reports AVX-512 BF16 or AMX tiles (as read by torch's cpuinfo, the flags
    ``avx512_bf16`` / ``amx_bf16`` of /proc/cpuinfo on Linux), whatever its vendor; without them
    torch converts bf16 to fp32 around every kernel and bf16 is slower than fp32. CUDA:
    ``torch.cuda.is_bf16_supported()`` (Ampere and newer). Anything else: False.

    Example:
        >>> native_bf16("cpu")  # doctest: +SKIP
        True
    """
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_bf16(value: Any, use_cpu: bool = False) -> bool:
    """``bf16: auto`` -> True exactly where bf16 is native on the training device (CUDA when
    available and not ``use_cpu``, else the CPU); ``True``/``False`` pass through.

    Example:
        >>> resolve_bf16(False)
        False
    """
    if isinstance(value, str) and value.lower() == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
        return native_bf16(device)
    return bool(value)


def release_memory(collect_garbage: bool = True) -> bool:
    """Give the memory freed by the last stage back to the operating system; True if it could.

    A long CPU run (training, then evaluation in the same process) frees GBs of activations,
    but glibc keeps freed heap pages for reuse, and the next stage's differently sized tensors
    fragment them further: the process's peak RSS becomes the sum of both stages rather than
    the larger one. ``malloc_trim(0)`` returns the free pages; it costs milliseconds, unlike
    a low ``MALLOC_MMAP_THRESHOLD_``, which returns them after every tensor but slowed the SmolLM2
    recipe by half (docs/troubleshooting.md). Elsewhere (musl, macOS, Windows) it only collects
    garbage and returns False. ``collect_garbage=False`` skips ``gc.collect()`` for callers in a
    loop whose tensors are freed by reference counting (the merge, after every module).
    """
    import ctypes
    import gc

    if collect_garbage:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


# Importing PEFT imports bitsandbytes (peft/helpers.py), and bitsandbytes >= 0.49 on a CPU with
# AVX512-BF16 asks the `kernels` package, at import time, for an optional 4-bit matmul kernel on
# the Hub (kernels-community/quantization-bitsandbytes). Offline that fails, and two warnings go
# to stderr on every command, quantized or not, though bitsandbytes then falls back to its own
# CPU code (same results, only slower 4-bit matmuls). Neither package offers a switch to skip
# the lookup, so exactly those records are dropped; every other warning of both libraries stays.
_HUB_KERNEL_NOTICES = {
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _HubKernelNoticeFilter(logging.Filter):
    """Drops the optional-Hub-kernel notices of :data:`_HUB_KERNEL_NOTICES`, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = _HUB_KERNEL_NOTICES.get(record.name)
        return prefix is None or not str(record.msg).startswith(prefix)


_HUB_KERNEL_FILTER = _HubKernelNoticeFilter()


def quiet_hub_kernel_notices(quiet: bool = True) -> None:
    """Silence (or, ``quiet=False``, show again) bitsandbytes' notices about its optional Hub kernel.

    Called when :mod:`poc_lora` or :mod:`eval_harness` is imported, before anything imports PEFT
    (and with it bitsandbytes), so neither the CLI nor the Python API prints
    ``Skipping publisher trust check ...`` / ``Failed to load CPU gemm_4bit_forward ...`` when
    the Hub is offline; ``poc-lora -v`` shows them again. Idempotent; no torch is imported.

    Example:
        >>> quiet_hub_kernel_notices()
    """
    for name in _HUB_KERNEL_NOTICES:
        log = logging.getLogger(name)
        if quiet:
            if _HUB_KERNEL_FILTER not in log.filters:
                log.addFilter(_HUB_KERNEL_FILTER)
        else:
            log.removeFilter(_HUB_KERNEL_FILTER)
