"""Counting the memory a step holds: on meta tensors (a plan) and on real CPU tensors (a measurement).

Two independent instruments, so that one can check the other:

* :class:`StorageTracker`, a ``TorchDispatchMode``: every tensor an operator returns inside it
  (forward, backward, optimizer) has its storage counted once, from its creation until Python
  frees it (a weak reference's callback). Storages that existed before (parameters, buffers)
  are registered as already there and never counted. It works on the ``meta`` device, where
  operators compute shapes only, so the peak bytes of a Llama-2-7B step come out in seconds on
  a CPU. Two meta-only stand-ins let data-dependent code run: ``Tensor.item()`` of a boolean is
  True, of a number 0, and (torch's own meta option, switched on inside the tracker) ``nonzero``,
  hence boolean indexing, selects every element: an upper bound (every position supervised).
* :func:`allocator_peak`: the peak of bytes allocated by torch's CPU allocator while a callable
  runs, read from the profiler's allocation events (``profile_memory=True``; each event carries
  the allocator's running total). Not the process RSS: only what torch allocated.

:func:`saved_tensor_bytes` counts the activations autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters excluded).

Example:
    >>> import torch
    >>> w = torch.empty(1024, 1024, device="meta", requires_grad=True)
    >>> with StorageTracker(existing=[w]) as tracker:
    ...     (torch.empty(8, 1024, device="meta") @ w).sum().backward()
    >>> tracker.peak >= 1024 * 1024 * 4  # the gradient of w
    True
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

_ITEM = torch.ops.aten._local_scalar_dense.default


def _flop_formulas() -> dict[Any, Any]:
    """torch's FLOP formulas by operator (``torch.utils.flop_counter``), with the CPU fused
    attention kernels counted as the CUDA flash kernels are (same leading arguments)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    formulas = dict(flop_registry)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[aten._scaled_dot_product_flash_attention]
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return formulas


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases counted once).

    Example:
        >>> t = torch.zeros(10)
        >>> storage_bytes([t, t[2:], t.view(2, 5)])
        40
    """
    seen = WeakIdKeyDictionary()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st not in seen:
            seen[st] = True
            total += st.nbytes()
    return total


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages created under this mode (see the module docstring).

    Args:
        existing: tensors whose storages already exist (parameters, buffers, optimizer
            states): seen, never counted.

    Attributes: ``live`` (bytes now), ``peak`` (largest ``live`` since the start or the last
    :meth:`reset_peak`), both in bytes of the tensors' storages (no allocator rounding), and
    ``flops``: floating-point operations of the operators run, by torch's own formulas (those
    of ``FlopCounterMode``, whose module tracking would keep tensors alive that the step frees).
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        for t in existing:
            self._seen[t.untyped_storage()] = 0
        self.live = 0
        self.peak = 0
        self.flops = 0
        self._formulas = _flop_formulas()

    def __enter__(self) -> "StorageTracker":
        from torch.fx.experimental import _config as fx_config

        self._nonzero = fx_config.patch(meta_nonzero_assume_all_nonzero=True)
        self._nonzero.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._nonzero.__exit__(*exc)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.live

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[st] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, nbytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        on_meta = isinstance(first, torch.Tensor) and first.device.type == "meta"
        if on_meta and func is _ITEM:  # data-dependent Python control flow: see the module docstring
            return True if first.dtype == torch.bool else 0
        out = func(*args, **kwargs)
        tree_map_only(torch.Tensor, self._track, out)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for backward inside the block: ``{"bytes": n, "excluded": e}``
    (unique storages; ``exclude``'s, e.g. the parameters, are counted apart in ``e``: what autocast
    would save as casted copies of them).

    Under non-reentrant activation checkpointing the checkpoint's own hooks take the tensors
    saved inside a checkpointed layer (and hold only that layer's inputs), so this counts what
    is saved outside the checkpointed layers.

    Example:
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> with saved_tensor_bytes() as saved:
        ...     y = (x * x).sum()
        >>> saved["bytes"]  # x, saved once for both factors
        128
    """
    seen = WeakIdKeyDictionary()
    excluded = WeakIdKeyDictionary()
    for t in exclude:
        excluded[t.untyped_storage()] = False
    out = {"bytes": 0, "excluded": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st in excluded:
            if not excluded[st]:
                excluded[st] = True
                out["excluded"] += st.nbytes()
        elif st not in seen:
            seen[st] = True
            out["bytes"] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` and return the peak increase, in bytes, of memory allocated by torch's CPU
    allocator during it (over what was allocated when it started), from the profiler's
    allocation events. Memory freed inside ``fn`` counts until it is freed.

    Example:
        >>> allocator_peak(lambda: torch.empty(1 << 20).sum()) >= 4 << 20
        True
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        stack.extend(e.children)
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]  # allocated before the first event
    return max(total for _, _, total in events) - start


__all__ = ["StorageTracker", "allocator_peak", "saved_tensor_bytes", "storage_bytes"]
