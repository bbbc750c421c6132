"""Task-vector operations shared by the ``ties``, ``dare_linear`` and ``dare_ties`` methods.

These baselines act entry by entry on each module's full update ``dW_j = s_j B_j A_j``
(out x in), not on the LoRA factors, then factorise the merged update back into a LoRA of rank
K (:mod:`._lowrank`: a seeded randomized SVD by default, the full SVD with ``exact_svd``). The
pure functions here are the steps of TIES (Yadav et al., NeurIPS 2023, arXiv:2306.01708) and
DARE (Yu et al., ICML 2024, arXiv:2311.03099), on a stack ``t`` of shape (M, rows, in) holding
the M inputs' updates of ONE module, or a block of its rows:

* :func:`trim`: keep each ``t[j]``'s top-``density`` entries by magnitude, zero the others;
* :func:`dare_drop`: drop each entry with probability 1 - density, rescale the kept by 1/density;
* :func:`elect_sign`: per entry, the sign of the weighted sum (``total``) or of the count of
  signs (``frequency``); 0 counts as +;
* :func:`disjoint_mean`: per entry, the weighted mean over the inputs whose sign agrees with
  the elected one, ``sum_j w_j m_j t_j / sum_j w_j m_j`` (0 where none agrees): mergekit's
  normalised TIES;
* :func:`dense_merge`: the driver the three methods call.

Two drivers compute the same merged update:

* with ``exact_svd`` (the reference path, as before): the M full updates at once (M x out x in),
  :func:`trim` or :func:`dare_drop` on them, the election and mean, then the full SVD. DARE's
  draws are ``torch.bernoulli(torch.full_like(t_j, density))``, which is also what PEFT's
  ``random_pruning`` draws from the global generator, so both can be compared seed for seed.
* by default (blocked): one block of rows at a time (:data:`BLOCK_ENTRIES` entries of each
  input, so the M blocks stay in the CPU cache), never holding more than the merged update.
  TIES' per-input threshold (the k-th largest magnitude of the whole ``dW_j``) is found first,
  exactly (:func:`magnitude_threshold`); then each block of each input is recomputed from the
  factors, trimmed or dropped, elected and averaged with the same functions. DARE keeps an
  entry where a uniform 32-bit integer is below ``round(density * 2^32)`` (probability density
  to within 2^-33), drawn row-major from numpy's SFC64 generator of that input, seeded from the
  merge's generator (one seed per input and module): the same distribution as the reference
  path, not the same draws, and independent of the block size. ``torch.bernoulli`` of a
  p-tensor costs 40 ns per entry on these CPUs, 25 minutes for the 36 G draws of a Llama-2-7B
  merge of 8 adapters; ``torch.rand`` 5-8 ns; SFC64's 32-bit integers 2 ns.

The functions change ``t`` in place (the driver's own scratch tensor, never a
:class:`LoraStack`'s factors). Randomness only from the generator passed in.

Example:
    >>> import torch
    >>> t = torch.tensor([[[1.0, -3.0]], [[-2.0, 1.0]]])  # two 1 x 2 updates
    >>> sign = elect_sign(t, torch.tensor([0.5, 0.5]), "total")
    >>> disjoint_mean(t, torch.tensor([0.5, 0.5]), sign)
    tensor([[-2., -3.]])
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ...runtime import available_cores, release_memory
from . import Factors, LoraStack
from ._lowrank import factorise

if TYPE_CHECKING:
    import torch

# entries of one input's update per block of rows in the blocked driver (1 MiB of float32 each)
BLOCK_ENTRIES = 1 << 18
# the grid sample that brackets TIES' threshold: about SAMPLE_SIDE^2 entries of each update
SAMPLE_SIDE = 256


def stack_updates(stack: LoraStack) -> torch.Tensor:
    """``t[j] = s_j B_j A_j`` (M, out, in), float32, unweighted; a new tensor."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    t = torch.empty(stack.num_adapters, stack.b.shape[0], stack.a.shape[1], dtype=torch.float32)
    for j, blk in enumerate(stack.blocks()):
        torch.matmul(stack.b[:, blk], stack.a[blk], out=t[j])
    return t


def kth_largest(mag: torch.Tensor, k: int) -> float:
    """The ``k``-th largest value (1 <= k <= n) of ``mag`` (any shape), by an in-place partial
    sort of its storage (numpy's introselect): ``mag`` is scratch and is reordered.
    torch.kthvalue (and topk) of a 2.8M-entry matrix raised the peak RSS by 7.5 copies of it."""
    flat = mag.reshape(-1).numpy()
    n = flat.size
    flat.partition(n - k)
    return float(flat[n - k])


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
        threshold = kth_largest(tj.abs(), k)
        tj.masked_fill_(tj.abs() < threshold, 0.0)
    return t


def keep_at_least(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries of ``t`` (float32) with ``|x| < threshold``, in place; returns ``t``.

    ``torch.hardshrink`` with lambda = the float32 just below the threshold keeps exactly the
    ``|x| >= threshold`` (float32 values): one vectorised pass, 30x faster than ``masked_fill_``
    of ``t.abs() < threshold`` (measured on 64 x 4096 blocks)."""
    import numpy as np
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    if threshold == float("inf"):
        return t.zero_()
    if threshold <= 0:
        return t
    lam = float(np.nextafter(np.float32(threshold), np.float32(0)))
    return torch.hardshrink(t, lam, out=t)


def _row_blocks(n_out: int, n_in: int) -> list[slice]:
    rows = max(1, BLOCK_ENTRIES // max(1, n_in))
    return [slice(r0, min(n_out, r0 + rows)) for r0 in range(0, n_out, rows)]


def magnitude_threshold(b: torch.Tensor, a: torch.Tensor, k: int) -> float:
    """The ``k``-th largest ``|entry|`` of ``b @ a`` (out x in), exactly, without forming it.

    A grid sample (every out/256-th row, in/256-th column) brackets the value; one pass over
    blocks of rows counts the entries below the bracket and collects those inside it, and
    ``torch.kthvalue`` of those gives the exact value. Should the sample miss (the count shows
    the value outside the bracket), the whole product is formed and partially sorted. ``k <= 0``:
    +inf (nothing kept); ``k >= out * in``: 0 (everything kept).
    """
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    n_out, n_in = b.shape[0], a.shape[1]
    n = n_out * n_in
    if k <= 0:
        return float("inf")
    if k >= n:
        return 0.0
    sample = (b[::max(1, n_out // SAMPLE_SIDE)] @ a[:, ::max(1, n_in // SAMPLE_SIDE)]).abs_().flatten().sort().values
    ns, target = sample.numel(), n - k  # the 0-based ascending index of the k-th largest
    pos, margin = int(target / n * ns), int(4 * ns ** 0.5) + 16
    lo = float(sample[pos - margin]) if pos - margin >= 0 else float("-inf")
    hi = float(sample[pos + margin]) if pos + margin < ns else float("inf")
    below, band = 0, []
    buf = torch.empty(min(n_out, max(1, BLOCK_ENTRIES // n_in)), n_in, dtype=b.dtype)
    for rows in _row_blocks(n_out, n_in):
        mag = torch.matmul(b[rows], a, out=buf[:rows.stop - rows.start]).abs_()
        below += int(torch.count_nonzero(mag < lo))
        band.append(mag[(mag >= lo) & (mag <= hi)])
    inside = torch.cat(band)
    if 0 <= target - below < inside.numel():
        return float(torch.kthvalue(inside, target - below + 1).values)
    # the sample missed: the whole product, computed by the same blocks (the same rounding)
    full = torch.empty(n_out, n_in, dtype=b.dtype)
    for rows in _row_blocks(n_out, n_in):
        torch.matmul(b[rows], a, out=full[rows])
    return kth_largest(full.abs_(), k)


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
    refuse others). Shape (rows, in), a new tensor.

    Computed by blocks of rows as ``sign * (w . p) / (w . [p > 0])`` with ``p_j = max(t_j * sign,
    0)`` (the magnitude of an agreeing entry, else 0): the same numbers as the mask-and-add
    definition, in half the passes over memory, with temporaries of one block.
    """
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    out = torch.empty(t.shape[1:], dtype=t.dtype)
    w = weights.to(t.dtype)
    for rows in _row_blocks(t.shape[1], math.prod(t.shape[2:]) * t.shape[0]):
        sgn = sign[rows]
        p = torch.mul(t[:, rows], sgn).clamp_(min=0)
        num = torch.tensordot(w, p, 1)
        den = torch.tensordot(w, p.sign_(), 1)
        # where no input agrees, num is 0 too: dividing by 1 there leaves the 0
        out[rows] = num.div_(den.masked_fill_(den == 0, 1.0)).mul_(sgn)
    return out


def _reference_update(stack: LoraStack, generator: torch.Generator | None, sparsify: str, density: float,
                      elect: bool, majority_sign_method: str) -> torch.Tensor:
    """The merged update from the M full updates at once (the ``exact_svd`` path)."""
    t = stack_updates(stack)
    if sparsify == "trim":
        trim(t, density)
    else:
        dare_drop(t, density, generator)
    w = stack.weight_tensor
    if elect:
        return disjoint_mean(t, w, elect_sign(t, w, majority_sign_method))
    merged = t.new_zeros(t.shape[1:])
    for wj, tj in zip(w.tolist(), t):
        merged.add_(tj, alpha=wj)
    return merged


def _blocked_update(stack: LoraStack, generator: torch.Generator | None, sparsify: str, density: float,
                    elect: bool, majority_sign_method: str) -> torch.Tensor:
    """The merged update block of rows by block of rows (the default path; see the module docstring).

    The work is spread over the cores (:func:`poc_lora.runtime.available_cores`) by Python
    threads (torch and numpy release the GIL): the inputs' thresholds in parallel, then for each
    block of rows the inputs' blocks in parallel (each input's generator is used by one task at a
    time, in block order, so the draws do not depend on the threads) and the election and mean
    over two halves of the rows. The result does not depend on the number of threads.
    """
    import numpy as np
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    n_out, n_in, blocks = stack.b.shape[0], stack.a.shape[1], stack.blocks()
    thresholds = gens = keep_below = None
    w = stack.weight_tensor
    merged = torch.empty(n_out, n_in, dtype=torch.float32)
    row_blocks = _row_blocks(n_out, n_in)
    t_buf = torch.empty(len(blocks), row_blocks[0].stop, n_in, dtype=torch.float32)
    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        if density < 1 and sparsify == "trim":
            k = int(density * n_out * n_in)
            thresholds = list(pool.map(lambda blk: magnitude_threshold(stack.b[:, blk], stack.a[blk], k), blocks))
        elif density < 1:  # one generator per input, seeded from the merge's: masks independent of the blocks
            seeds = torch.randint(0, 2**62, (len(blocks),), generator=generator).tolist()
            gens = [np.random.Generator(np.random.SFC64(sd)) for sd in seeds]
            keep_below = np.uint32(min(round(density * 2**32), 2**32 - 1))

        def input_block(j: int, rows: slice) -> None:
            blk, h = blocks[j], rows.stop - rows.start
            tj = torch.matmul(stack.b[rows, blk], stack.a[blk], out=t_buf[j, :h])
            if thresholds is not None:
                keep_at_least(tj, thresholds[j])
            elif gens is not None:
                drop = gens[j].integers(0, 2**32, size=(h, n_in), dtype=np.uint32) >= keep_below
                tj.masked_fill_(torch.from_numpy(drop), 0.0).div_(density)

        def combine(rows: slice, part: slice) -> None:
            t = t_buf[:, part]
            out = merged[rows][part]
            if elect:
                out.copy_(disjoint_mean(t, w, elect_sign(t, w, majority_sign_method)))
            else:
                out.zero_()
                for wj, tj in zip(w.tolist(), t):
                    out.add_(tj, alpha=wj)

        for rows in row_blocks:
            list(pool.map(input_block, range(len(blocks)), [rows] * len(blocks)))
            h = rows.stop - rows.start
            halves = [slice(0, h // 2), slice(h // 2, h)] if h > 1 else [slice(0, h)]
            list(pool.map(combine, [rows] * len(halves), halves))
    return merged


def dense_merge(stack: LoraStack, rank: int, generator: torch.Generator | None, *, sparsify: str,
                density: float, elect: bool, majority_sign_method: str = "total", exact_svd: bool = False) -> Factors:
    """The full-update merges: sparsify each ``dW_j`` (``"trim"`` or ``"dare"``), then either the
    weighted sum ``sum_j w_j dW_j`` (``elect=False``) or the sign election and disjoint mean,
    factorised to rank ``rank`` (zero neurons pad it where the update has fewer directions).

    ``exact_svd``: the reference path and the full SVD (the results of earlier releases, DARE's
    draws PEFT's); else the blocked path and the seeded randomized SVD (module docstring).
    ``Factors.trunc_sq`` / ``target_sq``: the squared error reached and ``||merged||^2``;
    ``Factors.extra``: ``truncation_sq`` (the same error), ``truncation_sq_optimum`` (when the
    SVD was exact: then equal) and ``svd`` (``"exact"`` or ``"randomized"``).

    Raises:
        ValueError: an unknown ``sparsify`` (a programming error).
    """
    if sparsify not in ("trim", "dare"):
        raise ValueError(f"sparsify must be trim or dare, got {sparsify!r}")
    build = _reference_update if exact_svd else _blocked_update
    merged = build(stack, generator, sparsify, density, elect, majority_sign_method)
    low = factorise(merged, int(rank), exact=exact_svd)
    del merged
    # The full updates (tens to hundreds of MB) are freed after every module; glibc raises its mmap
    # threshold to the last freed mapping's size, so later ones come from a heap whose holes were not
    # reused and the peak RSS grew with the layers (bench_merge.py, 3 adapters, hidden 1024: 343 MiB
    # for one layer, 392-466 MiB for two). Trimming after each module keeps it flat.
    release_memory(collect_garbage=False)
    extra = {"svd": "exact" if low.optimal_err_sq is not None else "randomized", "truncation_sq": low.err_sq}
    if low.optimal_err_sq is not None:
        extra["truncation_sq_optimum"] = low.optimal_err_sq
    return Factors(low.b, low.a, None, low.err_sq, low.norm_sq, extra)


__all__ = ["BLOCK_ENTRIES", "dare_drop", "dense_merge", "disjoint_mean", "elect_sign", "keep_at_least", "kth_largest",
           "magnitude_threshold", "stack_updates", "trim"]
