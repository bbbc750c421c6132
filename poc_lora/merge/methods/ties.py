"""``ties``: TIES-merging of the full updates dW_j = s_j B_j A_j, factorised to rank K.

Per module: trim each dW_j to its top-``density`` magnitudes, elect each entry's sign (the sign
of the weighted sum of the trimmed updates, or of the count of their signs), take the disjoint
mean (the weighted mean over the updates that agree with the elected sign), then its rank-K
truncated SVD (randomized; exact with ``exact_svd``) (Yadav et al., NeurIPS 2023,
arXiv:2306.01708; mergekit's normalised form). A baseline, not the paper's method. The steps
are in :mod:`._task_ops`.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.randn(4, 3), torch.randn(5, 4), (0.5, 0.5), (2, 2))
    >>> get_method("ties")(st, 2, density=0.5).a.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register
from ._task_ops import dense_merge

if TYPE_CHECKING:
    import torch


def ties_merge(stack: LoraStack, rank: int | None, generator: torch.Generator | None = None, *,
               density: float = 0.5, majority_sign_method: str = "total",
               exact_svd: bool = False) -> Factors:
    """Trim, elect sign, disjoint mean of the dW_j; rank-``rank`` SVD of the result."""
    return dense_merge(stack, int(rank), generator, sparsify="trim", density=density, elect=True,
                       majority_sign_method=majority_sign_method, exact_svd=exact_svd)


METHOD = register(MergeMethod(
    name="ties",
    label="TIES (density {density}), rank {rank}",
    description="baseline: TIES on the full dW_j (trim to top-density magnitudes, elect sign, disjoint mean), "
                "SVD to rank K",
    reference="Yadav et al., NeurIPS 2023, arXiv:2306.01708; a baseline",
    function=ties_merge,
    card_text="TIES-merging of the full updates ΔW_j (each trimmed to its top {density} fraction of magnitudes, "
              "sign elected by {majority_sign_method}, disjoint weighted mean), written as its rank-{rank} "
              "truncated SVD (exact_svd {exact_svd}: false = randomized, within 1% of the best squared error); "
              "a baseline, NOT the paper's method",
    needs_rank=True,
    parameters=("density", "majority_sign_method", "exact_svd"),
    dense=True,
    positive_weights=True,
    title="TIES merge",
    peft_equivalent="`ties_svd` with weights 1.0 each and svd_rank K (equal weights w_j only; PEFT's `ties` "
                    "works on the factors instead)",
    tags=("ties",),
))
