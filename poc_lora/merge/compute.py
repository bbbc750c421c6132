"""Running a plan module by module: read the factors, call the method, compute the statistics.

:class:`ModuleMerger` reads one module's ``A_j`` and ``s_j B_j`` of every adapter into a
:class:`~poc_lora.merge.methods.LoraStack` (float32 scratch tensors reused from module to
module), checks them for NaN/Inf from the Gram diagonals, calls the plan's method (a pure
function), truncates its result by SVD to the plan's ``--serve_rank`` cap where it is larger,
and returns the written factors with their :class:`~poc_lora.merge.stats.ModuleStats`.
:func:`merged_lora_bias` and :func:`merged_full_tensor` merge lora_B biases and non-LoRA tensors.

Example:
    >>> merger = ModuleMerger(plan)  # doctest: +SKIP
    >>> res = merger.merge("model.layers.0.self_attn.q_proj")  # doctest: +SKIP
    >>> res.stats.rel_error  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import LoraModule, check_finite
from ..errors import AdapterError
from .methods import Factors, LoraStack
from .methods.svd import svd_truncate
from .plan import MergePlan
from .stats import ModuleStats, module_stats


@dataclass
class ModuleResult:
    """One merged module: ``a`` (K, *A trailing dims), ``b`` (out, K, *B trailing dims), float32
    at PEFT scale 1; the merged lora_B ``bias`` (out,) or None; its statistics."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    stats: ModuleStats


def _as_b_matrix(b: torch.Tensor, label: str, key: str) -> torch.Tensor:
    if b.dim() > 2 and math.prod(b.shape[2:]) != 1:
        raise AdapterError(f"{label}: {key} has a kernel of shape {list(b.shape[2:])}; only 1x1 lora_B is supported")
    return b.reshape(b.shape[0], b.shape[1])


class ModuleMerger:
    """Merges the plan's modules one at a time (``merge(name)``), in any order."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.generator = torch.Generator().manual_seed(plan.seed)
        self.weights = tuple(plan.weights)
        # scratch tensors by (tag, shape, parity); modules alternate parity so module i+1 can be
        # read while module i's results are still being written by the background writer
        self._buffers: dict[tuple[str, tuple[int, ...], int], torch.Tensor] = {}
        self._parity = 0

    def _buffer(self, tag: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 scratch tensor reused from module to module: fresh multi-MB allocations are
        fresh pages, and their page faults cost as much as the arithmetic here."""
        key = (tag, shape, self._parity)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape)
        return buf

    def read_stack(self, name: str) -> LoraStack:
        """``A' = [A_1; ...; A_M]`` (N x in) and ``B_s = [s_1 B_1 ... s_M B_M]`` (out x N), float32.
        A_j is read straight into its rows of A'; each B_j is scaled into its column block."""
        self._parity ^= 1
        mods: list[LoraModule] = [ad.modules[name] for ad in self.plan.adapters]
        sizes = tuple(m.rank for m in mods)
        n, n_in, n_out = sum(sizes), math.prod(mods[0].a_shape[1:]), mods[0].b_shape[0]
        a_cat, b_cat = self._buffer("A", (n, n_in)), self._buffer("B", (n_out, n))
        lo = 0
        for ad, m in zip(self.plan.adapters, mods):
            hi = lo + m.rank
            if ad.tensors.info[m.a_key].dtype == torch.float32:
                ad.tensors.read_into(m.a_key, a_cat[lo:hi])
            else:
                a_cat[lo:hi].copy_(ad.read(m.a_key).reshape(m.rank, n_in))
            if ad.tensors.info[m.b_key].dtype == torch.float32:
                b = self._buffer("Bj", m.b_shape)
                ad.tensors.read_into(m.b_key, b)
            else:
                b = ad.read(m.b_key).float()
            torch.mul(_as_b_matrix(b, ad.label, m.b_key), m.scale, out=b_cat[:, lo:hi])
            lo = hi
        return LoraStack(a_cat, b_cat, self.weights, sizes)

    def merge(self, name: str) -> ModuleResult:
        """Merge module ``name`` with the plan's method.

        Raises:
            AdapterError: an input factor holds NaN or Inf (naming the adapter and key).
        """
        plan = self.plan
        mods = [ad.modules[name] for ad in plan.adapters]
        stack = self.read_stack(name)
        ga, gb = stack.gram_a, stack.gram_b  # cached on the stack: the method and the report share them
        if not (torch.isfinite(ga.diagonal()).all() and torch.isfinite(gb.diagonal()).all()):
            # sums of squares are finite iff the factors are (barring 1e19-sized values): name the culprit
            for ad, m in zip(plan.adapters, mods):
                check_finite(ad.read(m.a_key), ad.label, m.a_key)
                check_finite(ad.read(m.b_key), ad.label, m.b_key)
        k = plan.out_ranks[name]
        # a method on the full update is factorised once, straight to the capped rank
        declared = k if plan.method.dense else plan.method_ranks.get(name, k)
        out = plan.method(stack, k if plan.method.dense else plan.rank, self.generator, **plan.params)
        if out.a.shape[0] != declared or out.b.shape[1] != declared:
            raise RuntimeError(f"merge method {plan.method.name} returned rank {out.a.shape[0]} for module {name}, "
                               f"but declared {declared}")
        exact = plan.method.exact
        if declared > k:  # --serve_rank: the best rank-k approximation of what the method wrote
            b, a, trunc_sq, target_sq = svd_truncate(out.b.float(), out.a.float(), k)
            out, exact = Factors(b, a, None, trunc_sq, target_sq, out.extra), False
        stats = module_stats(stack, out, exact, [m.scale for m in mods])
        bias = merged_lora_bias(plan, name) if any(m.bias_key for m in mods) else None
        a_shape, b_shape = mods[0].a_shape, mods[0].b_shape
        return ModuleResult(out.a.float().reshape(k, *a_shape[1:]), out.b.float().reshape(b_shape[0], k, *b_shape[2:]),
                            bias, stats)


def merged_lora_bias(plan: MergePlan, name: str) -> torch.Tensor:
    """``sum_j w_j s_j b_j`` (out,) over the adapters that train a lora_B bias (lora_bias=True)."""
    out = torch.zeros(plan.adapters[0].modules[name].b_shape[0])
    for ad, wj in zip(plan.adapters, plan.weights):
        m = ad.modules[name]
        if m.bias_key:
            out += ad.read_checked(m.bias_key).float() * (wj * m.scale)
    return out


def merged_full_tensor(plan: MergePlan, key: str) -> torch.Tensor:
    """modules_to_save / trained bias tensors: identical copies stay bit-identical, otherwise
    the weighted average ``sum_j w_j t_j / sum_j w_j`` (in the inputs' dtype).

    Raises:
        AdapterError: a non-float tensor differs between the adapters, or holds NaN/Inf.
    """
    ts = [ad.read_checked(key) for ad in plan.adapters]
    if all(torch.equal(ts[0], t) for t in ts[1:]):
        return ts[0]
    if not ts[0].is_floating_point():
        raise AdapterError(f"{plan.adapters[1].label}: non-float tensor {key} differs between adapters")
    wsum = sum(plan.weights)
    return sum((wj / wsum) * t.float() for wj, t in zip(plan.weights, ts)).to(ts[0].dtype)


__all__ = ["ModuleMerger", "ModuleResult", "merged_full_tensor", "merged_lora_bias"]
