"""``dare_ties``: DARE then TIES' sign election and disjoint mean, on the full updates, rank K.

Per module: drop each entry of each dW_j = s_j B_j A_j with probability 1 - ``density`` and
rescale the kept ones by 1/density (seeded), elect each entry's sign and take the disjoint
weighted mean as ``ties`` does, then its rank-K truncated SVD (randomized; exact with
``exact_svd``) (Yu et al., ICML 2024, arXiv:2311.03099, with the election of Yadav et al.,
NeurIPS 2023, arXiv:2306.01708). A baseline. The steps are in :mod:`._task_ops`.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.randn(4, 3), torch.randn(5, 4), (0.5, 0.5), (2, 2))
    >>> get_method("dare_ties")(st, 2, torch.Generator().manual_seed(0), density=0.5).a.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register
from ._task_ops import dense_merge

if TYPE_CHECKING:
    import torch


def dare_ties_merge(stack: LoraStack, rank: int | None, generator: torch.Generator | None = None, *,
                    density: float = 0.5, majority_sign_method: str = "total",
                    exact_svd: bool = False) -> Factors:
    """Random drop and rescale of the dW_j, elect sign, disjoint mean; rank-``rank`` SVD."""
    return dense_merge(stack, int(rank), generator, sparsify="dare", density=density, elect=True,
                       majority_sign_method=majority_sign_method, exact_svd=exact_svd)


METHOD = register(MergeMethod(
    name="dare_ties",
    label="DARE-TIES (density {density}), rank {rank}",
    description="baseline: DARE on the full dW_j (random drop, 1/density rescale; --seed), then TIES' sign "
                "election and disjoint mean, SVD to rank K",
    reference="Yu et al., ICML 2024, arXiv:2311.03099 with TIES' election (arXiv:2306.01708); a baseline",
    function=dare_ties_merge,
    card_text="DARE-TIES on the full updates ΔW_j (each entry kept with probability {density} and rescaled by "
              "1/{density}, seed {seed}; sign elected by {majority_sign_method}, disjoint weighted mean), written "
              "as its rank-{rank} truncated SVD (exact_svd {exact_svd}: false = randomized, within 1% of the best "
              "squared error); a baseline, NOT the paper's method",
    needs_rank=True,
    uses_seed=True,
    parameters=("density", "majority_sign_method", "exact_svd"),
    dense=True,
    positive_weights=True,
    title="DARE-TIES merge",
    peft_equivalent="`dare_ties_svd` with weights 1.0 each and svd_rank K (equal weights w_j only; PEFT's "
                    "`dare_ties` works on the factors)",
    tags=("dare", "ties"),
))
