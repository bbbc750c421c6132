"""``soup``: A's and B's averaged separately, (sum_j w_j s_j B_j)(sum_j w_j A_j / sum_j w_j).

A model-soup baseline (Wortsman et al., ICML 2022, arXiv:2203.05482), NOT the paper's method:
mean(B) mean(A) != mean(B A). Needs equal ranks; the weights must not sum to 0.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.ones(2, 3), torch.ones(4, 2), (0.5, 0.5), (1, 1))
    >>> get_method("soup")(st).a.shape
    torch.Size([1, 3])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register

if TYPE_CHECKING:
    import torch


def soup_merge(stack: LoraStack, rank: int | None = None, generator: torch.Generator | None = None) -> Factors:
    """``b = sum_j w_j s_j B_j`` (out x r), ``a = sum_j (w_j / sum w) A_j`` (r x in); new tensors."""
    wsum = float(stack.weight_tensor.sum())
    blocks = stack.blocks()
    b = sum(wj * stack.b[:, blk] for wj, blk in zip(stack.weights, blocks))
    a = sum((wj / wsum) * stack.a[blk] for wj, blk in zip(stack.weights, blocks))
    return Factors(b, a)


METHOD = register(MergeMethod(
    name="soup",
    label="Soup (A, B averaged; baseline)",
    description="baseline, not the paper's method: (sum_j w_j s_j B_j)(sum_j w_j A_j / sum_j w_j); equal ranks",
    reference="model soups (Wortsman et al., ICML 2022, arXiv:2203.05482); a baseline",
    function=soup_merge,
    card_text="the average of the A's and of the B's separately (a model-soup baseline; NOT the paper's method, "
              "since mean(B)·mean(A) ≠ mean(B·A))",
    equal_ranks=True,
    title="Soup",
    peft_equivalent="`linear` with weights w/M each (equal weights w and equal scales s_j only: PEFT splits "
                    "√(w_j s_j) onto both factors)",
    tags=("model-soup",),
))
