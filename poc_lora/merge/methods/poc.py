"""``poc``: the paper's merge, exact. A LoRA of rank sum_j r_j: B' = [w_1 s_1 B_1 ... w_M s_M B_M],
A' = [A_1; ...; A_M], so B' A' = sum_j w_j s_j B_j A_j (Nitanda et al., ICML 2025,
arXiv:2502.05784, §3: the ensemble of mean-field networks is the network of all their neurons;
§5.2 for LoRA). The factors w_j s_j go into B rather than a sqrt split: A is copied bit for bit,
a negative weight needs no special case, and B is rounded once.

Example:
    >>> import torch
    >>> from poc_lora.merge.methods import LoraStack, get_method
    >>> st = LoraStack(torch.ones(2, 3), torch.ones(4, 2), (0.5, 0.5), (1, 1))
    >>> get_method("poc")(st).b.shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Factors, LoraStack, MergeMethod, register

if TYPE_CHECKING:
    import torch


def poc_merge(stack: LoraStack, rank: int | None = None, generator: torch.Generator | None = None) -> Factors:
    """The exact merge: ``(weighted B' (out x N), A' (N x in))``; ``b`` is a new tensor, ``a``
    is ``stack.a`` itself (not copied: nothing is changed)."""
    return Factors(stack.weighted_b, stack.a, 0.0)


METHOD = register(MergeMethod(
    name="poc",
    label="PoC merge",
    description="the paper's merge, exact: B' = [w_j s_j B_j] side by side, A' = [A_j] stacked; rank sum_j r_j",
    reference="Nitanda et al., ICML 2025, arXiv:2502.05784, §3 and §5.2",
    function=poc_merge,
    card_text="the exact PoC merge: a LoRA of rank Σ_j r_j whose B is [w_1 s_1 B_1 … w_M s_M B_M] and whose A "
              "stacks the A_j, written with scale 1 (lora_alpha = r)",
    exact=True,
    peft_equivalent="`cat` with the same weights (plain LoRA inputs; PEFT keeps use_rslora and lora_bias wrong)",
    tags=("poc-merge",),
))
