"""``dare_linear``: DARE on the full updates dW_j = s_j B_j A_j, weighted sum, rank K.

Per module: drop each entry of each dW_j with probability 1 - ``density`` and rescale the kept
ones by 1/density (seeded), then the weighted sum ``sum_j w_j dW_j`` (w_j = 1/M by default, so
``density`` 1 gives exactly the PoC merge's update), then its rank-K truncated SVD
(randomized; exact with ``exact_svd``) (Yu et al., ICML 2024, arXiv:2311.03099). A baseline.
The steps are in :mod:`._task_ops`.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.randn(4, 3), torch.randn(5, 4), (0.5, 0.5), (2, 2))
    >>> get_method("dare_linear")(st, 2, torch.Generator().manual_seed(0), density=0.5).b.shape
    torch.Size([5, 2])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register
from ._task_ops import dense_merge

if TYPE_CHECKING:
    import torch


def dare_linear_merge(stack: LoraStack, rank: int | None, generator: torch.Generator | None = None, *,
                      density: float = 0.5, exact_svd: bool = False) -> Factors:
    """Random drop and 1/density rescale of the dW_j, weighted sum; rank-``rank`` SVD."""
    return dense_merge(stack, int(rank), generator, sparsify="dare", density=density, elect=False,
                       exact_svd=exact_svd)


METHOD = register(MergeMethod(
    name="dare_linear",
    label="DARE linear (density {density}), rank {rank}",
    description="baseline: DARE on the full dW_j (random drop, 1/density rescale; --seed), weighted sum, "
                "SVD to rank K",
    reference="Yu et al., ICML 2024, arXiv:2311.03099; a baseline",
    function=dare_linear_merge,
    card_text="DARE on the full updates ΔW_j (each entry kept with probability {density} and rescaled by "
              "1/{density}, seed {seed}), their weighted sum written as its rank-{rank} truncated SVD "
              "(exact_svd {exact_svd}: false = randomized, within 1% of the best squared error); a baseline, "
              "NOT the paper's method",
    needs_rank=True,
    uses_seed=True,
    parameters=("density", "exact_svd"),
    dense=True,
    title="DARE merge",
    peft_equivalent="`dare_linear_svd` with the same weights and svd_rank K (with --exact_svd true, the "
                    "same draws under torch.manual_seed(seed) for a one-module adapter; PEFT's `dare_linear` "
                    "works on the factors)",
    tags=("dare",),
))
