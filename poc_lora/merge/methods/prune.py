"""``prune``: K of the N = sum_j r_j neurons of the exact merge, drawn uniformly without
replacement and scaled by N/K, so the expected update is the merge (the paper's random-pruning
remark of Nitanda et al., ICML 2025, arXiv:2502.05784: a random subset of the neurons of a
mean-field network obeys the same kind of bound). Reproducible from the generator's seed.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.ones(4, 3), torch.ones(5, 4), (0.5, 0.5), (2, 2))
    >>> get_method("prune")(st, 3, torch.Generator().manual_seed(0)).b.shape
    torch.Size([5, 3])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register

if TYPE_CHECKING:
    import torch


def prune_merge(stack: LoraStack, rank: int | None, generator: torch.Generator | None = None) -> Factors:
    """Columns ``idx`` of the weighted B' times N/K and rows ``idx`` of A', ``idx`` the sorted
    first K of a random permutation of the N neurons drawn from ``generator``."""
    import torch  # at call time: the CLI reads this registry at start-up (see methods/__init__.py)

    n, k = stack.total_rank, int(rank)
    idx = torch.randperm(n, generator=generator)[:k].sort().values
    return Factors(stack.weighted_b[:, idx] * (n / k), stack.a[idx])


METHOD = register(MergeMethod(
    name="prune",
    label="PoC merge, pruned to {rank}",
    description="K of the sum_j r_j neurons drawn without replacement, B scaled by N/K: unbiased (--seed)",
    reference="the random-pruning remark of Nitanda et al., ICML 2025, arXiv:2502.05784",
    function=prune_merge,
    card_text="a random subset of {rank} of the Σ_j r_j neurons of the PoC merge, scaled by N/K "
              "(random pruning, seed {seed}), whose expectation is the merge",
    needs_rank=True,
    uses_seed=True,
    tags=("poc-merge", "random-pruning"),
))

