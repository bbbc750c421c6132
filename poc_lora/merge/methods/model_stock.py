"""``model_stock``: Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522), per module, exact.

Model Stock merges several fine-tunes of one base by moving their average back towards the
base by a ratio set from the angle between them: with M fine-tunes whose updates from the
base (here ``dW_j = s_j B_j A_j``, the base's own update being zero) meet at a mean pairwise
cosine ``cos``, the merged update is ``t * mean_j dW_j`` with

    t = M cos / (1 + (M - 1) cos).

Unrelated updates (cos near 0) are mostly noise around a common centre, so their mean is
shrunk towards the base; identical ones (cos = 1) give t = 1, the plain average. Here the
"mean" is the weighted merge ``sum_j w_j dW_j`` (w_j = 1/M by default), so t = 1 writes
exactly the PoC merge, and the written update is the PoC concatenation with B scaled by t:
exact (no truncation), rank sum_j r_j, serving-ready like ``poc``.

The cosines come in factored form, ``<B_i A_i, B_j A_j>_F = tr((B_i^T B_j)(A_j A_i^T))``, from
the N x N Gram matrices the report computes anyway (:attr:`LoraStack.inner_products`); no
out x in matrix is formed. Rules where the formula needs one (documented in docs/merging.md):

* ``cos`` is the mean over the M(M-1)/2 pairs of the unweighted updates' cosines; a pair with a
  zero update (an input that left the module untouched) has no angle and counts as 0;
* bitwise-identical inputs have cosine exactly 1 (the Gram route would round it to 1 +- 1e-7),
  so identical members give t = 1 and the PoC merge bit for bit;
* the mean cosine is clamped to [0, 1] before t is computed: a negative mean (members pulling in
  opposite directions) gives t = 0, the base's own weights, never a negative or infinite ratio
  (the formula has a pole at cos = -1/(M-1)); t is then in [0, 1];
* one input: t = 1 (nothing to shrink towards), cos recorded as 1.

Each module's ``t`` and ``cos`` (the mean before clamping) go into ``merge_report.json``.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.ones(2, 3), torch.ones(4, 2), (0.5, 0.5), (1, 1))
    >>> get_method("model_stock")(st).extra["t"]  # two identical members
    1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register

if TYPE_CHECKING:
    import torch


def mean_pairwise_cosine(stack: LoraStack) -> float:
    """The mean over pairs i < j of ``<dW_i, dW_j> / (||dW_i|| ||dW_j||)`` of the unweighted
    updates ``dW_j = s_j B_j A_j``, in factored form (float64 from the stack's Gram matrices).

    A pair with a zero update counts as 0; bitwise-identical inputs count as exactly 1. Not
    clamped (in [-1, 1] up to rounding). One input: 1.0.
    """
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    m = stack.num_adapters
    if m < 2:
        return 1.0
    p = stack.inner_products
    blocks = stack.blocks()
    total = 0.0
    for i in range(m):
        for j in range(i + 1, m):
            bi, bj = blocks[i], blocks[j]
            if (stack.sizes[i] == stack.sizes[j] and torch.equal(stack.a[bi], stack.a[bj])
                    and torch.equal(stack.b[:, bi], stack.b[:, bj]) and float(p[i, i]) > 0):
                total += 1.0
                continue
            den = float(p[i, i]) * float(p[j, j])
            if den > 0:
                total += min(max(float(p[i, j]) / den ** 0.5, -1.0), 1.0)
    return total / (m * (m - 1) / 2)


def model_stock_ratio(cos: float, m: int) -> float:
    """``t = M c / (1 + (M - 1) c)`` with ``c = cos`` clamped to [0, 1]; in [0, 1]. ``m = 1``: 1.

    Example:
        >>> model_stock_ratio(0.5, 3), model_stock_ratio(-0.2, 4), model_stock_ratio(1.0, 8)
        (0.75, 0.0, 1.0)
    """
    if m < 2:
        return 1.0
    c = min(max(cos, 0.0), 1.0)
    return m * c / (1.0 + (m - 1) * c)


def model_stock_merge(stack: LoraStack, rank: int | None = None, generator: torch.Generator | None = None) -> Factors:
    """``t * sum_j w_j dW_j`` as the PoC factors with B scaled by t; ``extra`` holds t and cos;
    ``err_sq = (1 - t)^2 ||exact merge||^2`` (the distance to the PoC merge)."""
    cos = mean_pairwise_cosine(stack)
    t = model_stock_ratio(cos, stack.num_adapters)
    w = stack.weight_tensor.double()
    norm_sq = float(w @ stack.inner_products @ w)
    b = stack.weighted_b if t == 1.0 else stack.weighted_b * t
    return Factors(b, stack.a, (1.0 - t) ** 2 * max(norm_sq, 0.0), extra={"t": t, "cos": cos})


METHOD = register(MergeMethod(
    name="model_stock",
    label="Model Stock",
    description="baseline: t * (the PoC merge), t = M cos / (1 + (M-1) cos) per module from the mean pairwise "
                "cosine of the dW_j (factored, clamped to [0, 1]); rank sum_j r_j",
    reference="Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522; a baseline",
    function=model_stock_merge,
    card_text="Model Stock: per module, the PoC merge (the weighted mean of the ΔW_j) scaled by "
              "t = M·cos / (1 + (M − 1)·cos), cos the mean pairwise cosine of the ΔW_j (clamped to [0, 1]); "
              "written exactly as the PoC concatenation with B scaled by t; a baseline, NOT the paper's method",
    title="Model Stock merge",
    tags=("model-stock",),
    summary_extras=(("t", "Model Stock ratio t per module"),),
))
