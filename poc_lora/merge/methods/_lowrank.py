"""Rank-K factors of a full out x in update: the exact truncated SVD, or a seeded randomized one.

The methods that form a module's full merged update (``ties``, ``dare_linear``, ``dare_ties``)
write it back as a LoRA of rank K. The best rank-K approximation (Eckart-Young) is the truncated
SVD; a full ``torch.linalg.svd`` of a Llama-2-7B MLP update (11008 x 4096) costs out * in *
min(out, in) operations, about a minute on one CPU core, so 2-3 hours for the 160 modules of a
merge. :func:`randomized_factorise` gets the same K directions to within a fraction of a percent
of the optimal error from a randomized range finder with power iterations (Halko, Martinsson and
Tropp, SIAM Review 53(2), 2011, Algorithms 4.4 and 5.1): ``Y = (A A^T)^q A Omega`` with a
Gaussian ``Omega`` of K + p columns, re-orthonormalised after every product (QR), then the exact
SVD of the small ``Q^T A``. That costs 2 (q + 1) products with an (in x (K + p)) matrix:
``2 (2q + 2)(K + p)`` operations per entry of A instead of ``min(out, in)``.

Choices (measured on full-size TIES / DARE updates of 8 Llama-2-7B-shaped rank-32 adapters,
``scripts/bench_merge.py``, and on low-rank-plus-noise matrices in the tests): q =
:data:`POWER_ITERATIONS` power iterations and p = :data:`oversampling` (K) extra columns keep the
squared error within 1.01 x the optimum (the bench checks it on full-size modules). The Gaussian
test matrix comes from a fixed seed (:data:`RANGE_FINDER_SEED`) through a private generator:
the result is deterministic, does not depend on ``--seed`` (ties uses none) and draws nothing
from the merge's generator, so DARE's draws are those of the exact path. When K + p reaches
min(out, in) the exact SVD is used (it is then no dearer).

Both functions return ``(b (out x K), a (K x in), squared error, squared norm of dw, rank used,
optimal squared error or None)``; b and a share the square roots of the singular values, and
zero neurons pad them to K when ``min(out, in) < K`` (exact, serving-ready: ``svd`` does the same).
The squared error is measured (``||dw - b a||_F^2``, accumulated in float64 by row blocks), not
estimated; the optimum is known only on the exact path.

Example:
    >>> import torch
    >>> dw = torch.randn(300, 8) @ torch.randn(8, 200)  # rank 8
    >>> b, a, err_sq, norm_sq, used, best = randomized_factorise(dw, 8)
    >>> err_sq / norm_sq < 1e-8, used, best
    (True, 8, None)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ...runtime import available_cores, torch_threads

if TYPE_CHECKING:
    import torch

POWER_ITERATIONS = 4
RANGE_FINDER_SEED = 0
# rows per block when measuring the error: a block of (rows x in) float32 stays a few MB
_BLOCK_ENTRIES = 1 << 20


def oversampling(k: int) -> int:
    """Extra columns p of the range finder for rank ``k``: ``max(10, k)`` (HMT suggest 5-10 for
    a fast-decaying spectrum; merged TIES/DARE updates decay slowly past K, where more columns
    buy accuracy at a cost linear in K + p)."""
    return max(10, k)


class LowRank(NamedTuple):
    """Rank-K factors of a full update and what the factorisation reached."""

    b: torch.Tensor
    a: torch.Tensor
    err_sq: float
    norm_sq: float
    rank_used: int
    optimal_err_sq: float | None


def _pad(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    kk = a.shape[0]
    if kk == k:
        return b, a
    return (torch.cat([b, b.new_zeros(b.shape[0], k - kk)], 1), torch.cat([a, a.new_zeros(k - kk, a.shape[1])], 0))


def squared_residual(dw: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """``(||dw - b a||_F^2, ||dw||_F^2)`` by row blocks (float64 sums, no out x in temporary)."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    rows = max(1, _BLOCK_ENTRIES // max(1, dw.shape[1]))
    err = norm = 0.0
    for r0 in range(0, dw.shape[0], rows):
        blk = dw[r0:r0 + rows]
        norm += float(torch.linalg.vector_norm(blk, dtype=torch.float64) ** 2)
        err += float(torch.linalg.vector_norm(torch.addmm(blk, b[r0:r0 + rows], a, alpha=-1.0),
                                              dtype=torch.float64) ** 2)
    return err, norm


def exact_factorise(dw: torch.Tensor, k: int) -> LowRank:
    """The best rank-``k`` factors of ``dw`` by a full ``torch.linalg.svd`` (``--exact_svd
    true``); the error is the sum of the dropped squared singular values (the optimum)."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    kk = min(k, s.numel())
    root = s[:kk].sqrt()
    b, a = _pad(u[:, :kk] * root[None, :], root[:, None] * vh[:kk], k)
    sq = s.double().square()
    err = float(sq[kk:].sum())
    return LowRank(b, a, err, float(sq.sum()), kk, err)


def _orth(y: torch.Tensor) -> torch.Tensor:
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    return torch.linalg.qr(y).Q


def randomized_factorise(dw: torch.Tensor, k: int, power_iterations: int = POWER_ITERATIONS,
                         oversample: int | None = None) -> LowRank:
    """Rank-``k`` factors of ``dw`` (out x in, float32) by a seeded randomized SVD.

    ``power_iterations`` (q) and ``oversample`` (p; default :func:`oversampling`) as in the
    module docstring. Falls back to :func:`exact_factorise` when k + p >= min(out, in).
    Deterministic: the test matrix comes from its own generator seeded with
    :data:`RANGE_FINDER_SEED`. ``dw`` is not modified.
    """
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    n_out, n_in = dw.shape
    kk = min(k, n_out, n_in)
    cols = kk + (oversampling(kk) if oversample is None else oversample)
    if cols >= min(n_out, n_in):
        return exact_factorise(dw, k)
    gen = torch.Generator().manual_seed(RANGE_FINDER_SEED)
    # the merge runs torch single-threaded (small ops wait for a second thread on a busy machine);
    # these products take 0.1-0.3 s each at Llama size, so they use every core
    with torch_threads(available_cores()):
        q = _orth(dw @ torch.randn(n_in, cols, generator=gen, dtype=dw.dtype))
        for _ in range(power_iterations):
            q = _orth(dw @ _orth(dw.T @ q))
        small = (dw.T @ q).T.double()  # Q^T dw, (K + p) x in
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    root = s[:kk].sqrt()
    b = ((q.double() @ u[:, :kk]) * root[None, :]).to(dw.dtype)
    a = (root[:, None] * vh[:kk]).to(dw.dtype)
    err, norm = squared_residual(dw, b, a)
    b, a = _pad(b, a, k)
    return LowRank(b, a, err, norm, kk, None)


def factorise(dw: torch.Tensor, k: int, exact: bool = False) -> LowRank:
    """:func:`exact_factorise` when ``exact``, else :func:`randomized_factorise`."""
    return exact_factorise(dw, k) if exact else randomized_factorise(dw, k)


__all__ = ["LowRank", "POWER_ITERATIONS", "RANGE_FINDER_SEED", "exact_factorise", "factorise", "oversampling",
           "randomized_factorise", "squared_residual"]
