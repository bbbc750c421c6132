"""Merge statistics as typed objects, and the report of a merge (``merge_report.json``).

All norms come from r x r Gram blocks, never an out x in matrix:
``<B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T))``. :class:`ModuleStats` holds one
module's numbers (plus the Gram matrix and squared norms the totals are summed from, which are
not written); :class:`MergeStats` the totals over all modules; :class:`MergeReport` everything a
merge did. Each has ``to_dict()`` (the JSON written) and read access by JSON key
(``report.overall["spread"]``) besides attribute access (``report.overall.spread``).

Example:
    >>> import torch
    >>> spread(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # two orthogonal updates of norm 1
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from .methods import Factors, LoraStack, get_method, gram_inner


class _ByKey:
    """Read access by the JSON key, as ``merge_report.json`` spells it."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()


def spread(p: torch.Tensor) -> float:
    """Mean over pairs of ``||dW_i - dW_j|| / sqrt(||dW_i||^2 + ||dW_j||^2)`` from the M x M
    inner products ``p``: 0 for identical updates, 1 for orthogonal ones (independent
    directions), up to sqrt(2) for opposite ones; 0 for one adapter."""
    m = p.shape[0]
    vals = []
    for i in range(m):
        for j in range(i + 1, m):
            den = float(p[i, i] + p[j, j])
            vals.append(math.sqrt(max(den - 2 * float(p[i, j]), 0.0) / den) if den > 0 else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def _sqrt(x: float) -> float:
    return math.sqrt(max(x, 0.0))


@dataclass
class ModuleStats(_ByKey):
    """One module: input ranks r_j and scales s_j, output rank K, ``rank_used`` (the neurons
    whose A row and B column are both non-zero: fewer than K where zero neurons pad), ``norm_dW`` (||s_j B_j A_j||_F
    per adapter), ``norm_merged`` (||dW_merged||_F of the exact merge), ``spread``, ``rel_error``
    (||written - exact||_F / ||exact||_F; 0 for an exact method), ``truncation_error``
    (||written - X||_F / ||X||_F, X the method's own full result before the rank-K SVD of the
    full-update methods or the ``--serve_rank`` truncation; 0 when nothing was truncated).

    ``extra``: the method's own per-module numbers (:attr:`Factors.extra`: Model Stock's ``t``
    and ``cos``, the rank actually used and the squared truncation errors of the full-update
    methods), written beside the others.

    ``pairwise_inner`` (M x M, float64), ``err_sq``, ``norm_sq``, ``trunc_sq`` and
    ``target_sq`` are what the totals are summed from; they are not written per module."""

    rank_in: list[int]
    scale_in: list[float]
    rank_out: int
    rank_used: int
    norm_dW: list[float]
    norm_merged: float
    spread: float
    rel_error: float
    pairwise_inner: torch.Tensor = field(repr=False)
    err_sq: float = field(repr=False)
    norm_sq: float = field(repr=False)
    truncation_error: float = 0.0
    trunc_sq: float = field(default=0.0, repr=False)
    target_sq: float = field(default=0.0, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rank_in": list(self.rank_in), "scale_in": list(self.scale_in), "rank_out": self.rank_out,
                "rank_used": self.rank_used,
                "norm_dW": list(self.norm_dW), "norm_merged": self.norm_merged, "spread": self.spread,
                "rel_error": self.rel_error, "truncation_error": self.truncation_error, **self.extra}


def module_stats(stack: LoraStack, out: Factors, exact: bool, scales: Sequence[float]) -> ModuleStats:
    """The statistics of one module's merge.

    The inner products of the inputs come from the stack's Gram matrices
    (:attr:`LoraStack.inner_products`, shared with the method); ``out`` the method's factors.
    The squared error is ``out.err_sq`` when the method gives it, 0 for an exact method, else
    ``||out||^2 + ||target||^2 - 2 <out, target>`` from small Gram products. The truncation
    error comes from ``out.trunc_sq`` / ``out.target_sq`` (0 when None).
    """
    p = stack.inner_products
    w = stack.weight_tensor.double()
    norm_sq = float(w @ p @ w)
    out_sq = None
    if out.err_sq is not None:
        err_sq = out.err_sq
    elif exact:
        err_sq = 0.0
    else:
        bw, a = stack.weighted_b, stack.a
        out_sq = float(((out.b.T @ out.b) * (out.a @ out.a.T)).sum())
        cross = float(((out.b.T @ bw) * (out.a @ a.T)).sum())
        err_sq = max(out_sq + norm_sq - 2 * cross, 0.0)
    if out.trunc_sq is not None and out.target_sq is not None:
        trunc_sq, target_sq = out.trunc_sq, out.target_sq
    else:  # nothing truncated: the method's result is what is written
        trunc_sq = 0.0
        target_sq = norm_sq if exact else (out_sq if out_sq is not None else
                                           float(((out.b.T @ out.b) * (out.a @ out.a.T)).sum()))
    # neurons with both factors non-zero: below rank_out where zero neurons pad a module with
    # fewer directions than K (svd, ties, dare_*) or an input left a module untouched (B_j = 0)
    used = int(((out.b != 0).any(0) & (out.a != 0).any(1)).sum())
    return ModuleStats(
        rank_in=list(stack.sizes), scale_in=list(scales), rank_out=int(out.a.shape[0]), rank_used=used,
        norm_dW=[_sqrt(float(x)) for x in p.diagonal()], norm_merged=_sqrt(norm_sq), spread=spread(p),
        rel_error=math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
        pairwise_inner=p, err_sq=err_sq, norm_sq=norm_sq,
        truncation_error=math.sqrt(trunc_sq / target_sq) if target_sq > 0 else 0.0,
        trunc_sq=trunc_sq, target_sq=target_sq, extra=dict(out.extra or {}),
    )


@dataclass
class MergeStats(_ByKey):
    """Totals over all modules: ``norm_dW`` (||dW_j||_F over the whole model, per adapter),
    ``norm_merged``, ``merged_to_mean_norm`` (norm_merged / mean_j norm_dW: near 1/sqrt(M) for
    unrelated adapters, near 1 for similar ones), ``spread``, ``pairwise_inner`` (the M x M
    matrix <dW_i, dW_j>_F), ``rel_error`` (overall relative Frobenius error vs the exact merge)
    and ``truncation_error`` (overall relative error of the rank truncations, see ModuleStats)."""

    norm_dW: list[float]
    norm_merged: float
    merged_to_mean_norm: float
    spread: float
    pairwise_inner: list[list[float]]
    rel_error: float
    truncation_error: float = 0.0

    @classmethod
    def total(cls, per_module: Sequence[ModuleStats], num_adapters: int) -> "MergeStats":
        """The totals of ``per_module`` (inner products and squared norms add over modules)."""
        p_tot = torch.zeros(num_adapters, num_adapters, dtype=torch.float64)
        err_sq = norm_sq = trunc_sq = target_sq = 0.0
        for st in per_module:
            p_tot += st.pairwise_inner.double()
            err_sq += st.err_sq
            norm_sq += st.norm_sq
            trunc_sq += st.trunc_sq
            target_sq += st.target_sq
        norms = [_sqrt(float(x)) for x in p_tot.diagonal()]
        mean_norm = sum(norms) / num_adapters
        return cls(
            norm_dW=norms,
            norm_merged=_sqrt(norm_sq),
            merged_to_mean_norm=_sqrt(norm_sq) / mean_norm if mean_norm > 0 else 0.0,
            spread=spread(p_tot),
            pairwise_inner=p_tot.tolist(),
            rel_error=math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
            truncation_error=math.sqrt(trunc_sq / target_sq) if target_sq > 0 else 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class MergeReport(_ByKey):
    """What a merge did; written as ``merge_report.json`` in the output directory.

    ``params``: the method's parameters (density, majority_sign_method). ``serve_rank``: as
    asked (None, "auto" or N); ``written_rank``: the rank of every module of the written
    adapter; ``vllm_max_lora_rank``: the smallest vLLM ``--max-lora-rank`` that loads it (None
    above 512, and for a merge into the base model); ``full_tensors``: the keys of the written
    adapter's full (non-LoRA) tensors, modules_to_save and trained biases, which only PEFT serves
    (``notes`` says what the other engines do)."""

    output: str
    method: str
    weights: list[float]
    inputs: list[dict[str, Any]]
    rank: int | None
    seed: int
    dtype: str
    merge_into_base: bool
    base_model: str | None
    output_ranks: dict[str, int] = field(default_factory=dict)
    modules: dict[str, ModuleStats] = field(default_factory=dict)
    overall: MergeStats | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done beyond the merge itself (untying...)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)  # directory children left out
    params: dict[str, Any] = field(default_factory=dict)
    serve_rank: int | str | None = None
    written_rank: int | None = None
    vllm_max_lora_rank: int | None = None
    full_tensors: list[str] = field(default_factory=list)  # non-LoRA tensors of the written adapter

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(weights=list(self.weights), inputs=[dict(i) for i in self.inputs],
                   output_ranks=dict(self.output_ranks), modules={k: v.to_dict() for k, v in self.modules.items()},
                   overall=self.overall.to_dict() if self.overall is not None else {},
                   warnings=list(self.warnings), notes=list(self.notes),
                   skipped_inputs=[dict(s) for s in self.skipped_inputs], params=dict(self.params),
                   full_tensors=list(self.full_tensors))
        return out

    def summary(self) -> str:
        """A few lines for people (the CLI prints them)."""
        o, method = self.overall, get_method(self.method)
        ranks = sorted(set(self.output_ranks.values()))
        lines = [
            f"merged {len(self.inputs)} adapters with method={self.method} into {self.output}",
            *(f"  input {j}: {inp['path']} (weight {w:g})"
              for j, (inp, w) in enumerate(zip(self.inputs, self.weights))),
            *(f"  skipped: {s['path']} ({s['reason']})" for s in self.skipped_inputs),
            f"  modules: {len(self.modules)}, output rank: {ranks[0] if len(ranks) == 1 else ranks}, "
            f"dtype: {self.dtype}",
            *([f"  parameters: {', '.join(f'{k}={v}' for k, v in self.params.items())}"] if self.params else []),
            f"  weights: {', '.join(f'{w:g}' for w in self.weights)}",
            f"  ||dW_j||_F: {', '.join(f'{n:.4g}' for n in o.norm_dW)}; ||dW_merged||_F: {o.norm_merged:.4g}",
            f"  spread (mean pairwise relative distance, 0 = identical, 1 = orthogonal): {o.spread:.3f}",
        ]
        if not method.exact or o.rel_error > 0:
            lines.append(f"  relative error of the written update vs the exact merge: {o.rel_error:.4g}")
        if o.truncation_error > 0:
            lines.append(f"  relative error of the rank truncation (SVD): {o.truncation_error:.4g}")
        for key, what in method.summary_extras:  # the method's own per-module numbers (Model Stock's t)
            values = [st.extra[key] for st in self.modules.values() if st.extra.get(key) is not None]
            if values:
                lines.append(f"  {what}: mean {sum(values) / len(values):.4g}, "
                             f"range {min(values):.4g} to {max(values):.4g}")
        if self.written_rank is not None:
            serve = (f"vLLM: --max-lora-rank {self.vllm_max_lora_rank}" if self.vllm_max_lora_rank is not None
                     else "vLLM cannot load it (rank > 512; see the warning)")
            lines.append(f"  serving: rank {self.written_rank} in every module, one scale; {serve}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


__all__ = ["MergeReport", "MergeStats", "ModuleStats", "gram_inner", "module_stats", "spread"]
