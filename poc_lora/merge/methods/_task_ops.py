"""Task-vector operations shared by the ``ties``, ``dare_linear`` and ``dare_ties`` methods.

These baselines act entry by entry on each module's full update ``dW_j = s_j B_j A_j``
(out x in), not on the LoRA factors, then factorise the merged update back into a LoRA of rank
K by truncated SVD (the best rank-K approximation, Eckart-Young). The pure functions here are
the steps of TIES (Yadav et al., NeurIPS 2023, arXiv:2306.01708) and DARE (Yu et al., ICML 2024,
arXiv:2311.03099), on a stack ``t`` of shape (M, out, in) holding the M inputs' updates of ONE
module (a merge streams module by module, so at most one module's full update per input is in
memory):

* :func:`trim`: keep each ``t[j]``'s top-``density`` entries by magnitude, zero the others;
* :func:`dare_drop`: drop each entry with probability 1 - density, rescale the kept by 1/density;
* :func:`elect_sign`: per entry, the sign of the weighted sum (``total``) or of the count of
  signs (``frequency``); 0 counts as +;
* :func:`disjoint_mean`: per entry, the weighted mean over the inputs whose sign agrees with
  the elected one, ``sum_j w_j m_j t_j / sum_j w_j m_j`` (0 where none agrees): mergekit's
  normalised TIES;
* :func:`dense_merge`: the driver the three methods call.

The functions change ``t`` in place (it is the driver's own scratch tensor, never a
:class:`LoraStack`'s factors). Randomness only from the generator passed in; the Bernoulli
draws are those of ``torch.bernoulli(torch.full_like(t_j, density))``, which is also what
PEFT's ``random_pruning`` draws from the global generator, so both can be compared seed for seed.

Example:
    >>> import torch
    >>> t = torch.tensor([[[1.0, -3.0]], [[-2.0, 1.0]]])  # two 1 x 2 updates
    >>> sign = elect_sign(t, torch.tensor([0.5, 0.5]), "total")
    >>> disjoint_mean(t, torch.tensor([0.5, 0.5]), sign)
    tensor([[-2., -3.]])
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from typing import TYPE_CHECKING

from . import Factors, LoraStack

if TYPE_CHECKING:
    import torch


def stack_updates(stack: LoraStack) -> torch.Tensor:
    """``t[j] = s_j B_j A_j`` (M, out, in), float32, unweighted; a new tensor."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    t = torch.empty(stack.num_adapters, stack.b.shape[0], stack.a.shape[1], dtype=torch.float32)
    for j, blk in enumerate(stack.blocks()):
        torch.matmul(stack.b[:, blk], stack.a[blk], out=t[j])
    return t


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = int(density * n)`` largest magnitudes of each ``t[j]`` (n = out * in, as
    PEFT's ``magnitude_based_pruning`` counts them) and zero the rest, in place; returns ``t``.
    Entries tied with the k-th magnitude are all kept. ``density >= 1`` keeps everything."""
    if density >= 1:
        return t
    n = t[0].numel()
    k = int(density * n)
    for tj in t:
        if k == 0:
            tj.zero_()
            continue
        # the k-th largest magnitude by an in-place partial sort of one copy: torch.kthvalue (and
        # topk) of a 2.8M-entry matrix raised the peak RSS by 7.5 copies of it (measured)
        mag = tj.abs().reshape(-1).numpy()
        mag.partition(n - k)
        threshold = float(mag[n - k])
        del mag
        tj.masked_fill_(tj.abs() < threshold, 0.0)
    return t


def dare_drop(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Drop each entry of each ``t[j]`` with probability ``1 - density`` and multiply the kept
    ones by ``1 / density`` (so E[result] = t), in place, ``t[0]`` first; returns ``t``.
    ``density >= 1`` keeps everything and draws nothing."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    if density >= 1:
        return t
    for tj in t:
        # torch.bernoulli of a full tensor of p (not Tensor.bernoulli_(p)): the same stream as PEFT's draws
        keep = torch.bernoulli(torch.full_like(tj, density), generator=generator)
        tj.mul_(keep).div_(density)
    return t


def elect_sign(t: torch.Tensor, weights: torch.Tensor, method: str = "total") -> torch.Tensor:
    """The elected sign of each entry, +1 or -1 (out, in), float32.

    ``total``: the sign of ``sum_j w_j t_j``; ``frequency``: the sign of ``sum_j sign(w_j t_j)``
    (which input signs are in the majority). A sum of 0 elects +1 (as PEFT and mergekit do).

    Raises:
        ValueError: an unknown ``method`` (user input is checked before, in resolve_parameters).
    """
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    total = torch.zeros(t.shape[1:], dtype=t.dtype)
    for wj, tj in zip(weights.tolist(), t):
        if method == "total":
            total.add_(tj, alpha=wj)
        elif method == "frequency":
            total.add_(torch.sign(tj), alpha=math.copysign(1.0, wj))
        else:
            raise ValueError(f"majority_sign_method must be total or frequency, got {method!r}")
    return total.ge_(0).mul_(2).sub_(1)  # in place: one full update less at the peak


def disjoint_mean(t: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j m_j t_j / sum_j w_j m_j`` per entry, ``m_j = [sign(t_j) == sign]`` (an entry
    of 0 agrees with neither sign); 0 where no input agrees. Weights must be > 0 (the methods
    refuse others). Shape (out, in), a new tensor."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    num = torch.zeros(t.shape[1:], dtype=t.dtype)
    den = torch.zeros_like(num)
    for wj, tj in zip(weights.tolist(), t):
        agree = (torch.sign(tj) == sign).to(t.dtype)
        num.addcmul_(agree, tj, value=wj)
        den.add_(agree, alpha=wj)
        del agree
    # where no input agrees, num is 0 too: dividing by 1 there leaves the 0 (in place, no new tensors)
    return num.div_(den.masked_fill_(den == 0, 1.0))


def factorise(dw: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``k`` factors of ``dw`` (out x in) by SVD: ``(b (out x k), a (k x in),
    squared error, squared norm of dw)``; b and a share sqrt(singular values); zero neurons pad
    them when k exceeds min(out, in). The error is the sum of the dropped squared singular values."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    kk = min(k, s.numel())
    root = s[:kk].sqrt()
    b, a = u[:, :kk] * root[None, :], root[:, None] * vh[:kk]
    if kk < k:
        b = torch.cat([b, b.new_zeros(b.shape[0], k - kk)], 1)
        a = torch.cat([a, a.new_zeros(k - kk, a.shape[1])], 0)
    sq = s.double().square()
    return b, a, float(sq[kk:].sum()), float(sq.sum())


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only; a no-op elsewhere).

    The full updates are tens to hundreds of MB each and freed after every module. glibc raises
    its mmap threshold to the size of the last freed mapping, so from the second module on they
    come from the heap, whose holes were not reused: the peak RSS grew with the number of layers
    (``scripts/bench_merge.py``, 3 adapters, hidden 1024: 343 MiB for one layer, 392-466 MiB for
    two; 336 MiB with a fixed threshold). Trimming after each module keeps it flat.
    """
    trim_fn = _libc_malloc_trim()
    if trim_fn is not None:
        trim_fn(0)


def dense_merge(stack: LoraStack, rank: int, generator: torch.Generator | None, *, sparsify: str,
                density: float, elect: bool, majority_sign_method: str = "total") -> Factors:
    """The full-update merges: sparsify each ``dW_j`` (``"trim"`` or ``"dare"``), then either the
    weighted sum ``sum_j w_j dW_j`` (``elect=False``) or the sign election and disjoint mean,
    factorised to rank ``rank`` with the truncation error in ``Factors.trunc_sq``."""
    t = stack_updates(stack)
    if sparsify == "trim":
        trim(t, density)
    elif sparsify == "dare":
        dare_drop(t, density, generator)
    else:
        raise ValueError(f"sparsify must be trim or dare, got {sparsify!r}")
    w = stack.weight_tensor
    if elect:
        merged = disjoint_mean(t, w, elect_sign(t, w, majority_sign_method))
    else:
        merged = t.new_zeros(t.shape[1:])
        for wj, tj in zip(w.tolist(), t):
            merged.add_(tj, alpha=wj)
    del t
    b, a, trunc_sq, target_sq = factorise(merged, int(rank))
    del merged
    release_freed_memory()
    return Factors(b, a, None, trunc_sq, target_sq)


__all__ = ["dare_drop", "dense_merge", "disjoint_mean", "elect_sign", "factorise", "release_freed_memory",
           "stack_updates", "trim"]
