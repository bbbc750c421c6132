"""PoC merge of M PEFT LoRA adapters into one adapter (or into the base model).

The paper's merge (arXiv:2502.05784) is ``dW = sum_j w_j s_j B_j A_j`` with ``w_j = 1/M``: a
LoRA of rank ``sum_j r_j`` whose B is ``[w_1 s_1 B_1 ... w_M s_M B_M]`` and whose A stacks
the ``A_j``. Methods:

* ``poc`` (default): that concatenation, exact. The factors ``w_j s_j`` go into B, and the
  output config says ``use_rslora=false, lora_alpha=r`` so PEFT's scale is exactly 1. B
  rather than a sqrt split: A is copied bit for bit, the sign of a negative weight needs no
  special case, and B gets one rounding instead of two.
* ``svd``: the best rank-K approximation of ``dW`` (Eckart-Young), from orthogonal
  factorisations of the concatenated B and A^T and an SVD of a small core; ``out x in`` is
  never formed. Relative Frobenius errors are reported per module and overall.
* ``prune``: a uniformly random subset of K of the ``N = sum r_j`` neurons, drawn without
  replacement (each neuron kept with probability K/N) and scaled by N/K, so its expectation
  is ``dW``; reproducible with ``seed``.
* ``soup``: A's and B's averaged separately. A baseline, not the paper's method.

With ``merge_into_base`` the merged update is added to the base weights shard by shard; a
quantized base is refused, and tied input/output embeddings are untied where the adapter
changes one side (so the written model computes what the PEFT-loaded adapter computes).

Example:
    >>> from poc_lora import merge_adapters
    >>> report = merge_adapters(["runs/a0", "runs/a1"], "runs/merged")  # doctest: +SKIP
    >>> report.overall["spread"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .adapters import (
    CONFIG_NAME,
    MERGE_REPORT_NAME,
    PEFT_PREFIX,
    SAFETENSORS_NAME,
    Adapter,
    LoraModule,
    SafetensorsStreamWriter,
    TensorFile,
    check_finite,
    check_output_not_input,
    expand_adapter_inputs,
    load_adapter,
    sha256_file,
)
from .errors import AdapterError, ConfigError
from .outputs import atomic_output_dir, check_output_path, write_json
from .runtime import torch_threads

logger = logging.getLogger(__name__)

METHODS = ("poc", "svd", "prune", "soup")
REPORT_NAME = MERGE_REPORT_NAME
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# eigenvalues of a float64 Gram matrix below this fraction of the largest are rounding noise
_EIG_RTOL = 1e-12


@dataclass
class MergeReport:
    """What a merge did; written as ``merge_report.json`` in the output directory."""

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
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    overall: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done beyond the merge itself (untying...)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)  # directory children left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for people (the CLI prints them)."""
        o = self.overall
        ranks = sorted(set(self.output_ranks.values()))
        lines = [
            f"merged {len(self.inputs)} adapters with method={self.method} into {self.output}",
            *(f"  input {j}: {inp['path']} (weight {w:g})"
              for j, (inp, w) in enumerate(zip(self.inputs, self.weights))),
            *(f"  skipped: {s['path']} ({s['reason']})" for s in self.skipped_inputs),
            f"  modules: {len(self.modules)}, output rank: {ranks[0] if len(ranks) == 1 else ranks}, "
            f"dtype: {self.dtype}",
            f"  weights: {', '.join(f'{w:g}' for w in self.weights)}",
            f"  ||dW_j||_F: {', '.join(f'{n:.4g}' for n in o['norm_dW'])}; ||dW_merged||_F: {o['norm_merged']:.4g}",
            f"  spread (mean pairwise relative distance, 0 = identical, 1 = orthogonal): {o['spread']:.3f}",
        ]
        if self.method != "poc":
            lines.append(f"  relative error of the written update vs the exact merge: {o['rel_error']:.4g}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# ----------------------------------------------------------------------- planning
@dataclass
class _Plan:
    adapters: list[Adapter]
    weights: list[float]
    method: str
    rank: int | None
    seed: int
    out_dtype: torch.dtype
    module_names: list[str]
    out_ranks: dict[str, int]
    full_keys: list[str]
    warnings: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (directory child, why it was left out)
    # scratch tensors by (tag, shape, parity); modules alternate parity so module i+1 can be
    # computed while module i's tensors are still being written by the background writer
    buffers: dict[tuple[str, tuple[int, ...], int], torch.Tensor] = field(default_factory=dict)
    parity: int = 0


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _check_same(adapters: list[Adapter], field_name: str, what: str) -> None:
    ref = adapters[0].config.get(field_name)
    for ad in adapters[1:]:
        if ad.config.get(field_name) != ref:
            raise AdapterError(
                f"{ad.label}: {field_name} is {ad.config.get(field_name)!r} but {adapters[0].label} has "
                f"{ref!r}; all adapters must share {what}"
            )


def _validate(adapters: list[Adapter], allow_different_base: bool) -> None:
    first = adapters[0]
    if not allow_different_base:
        _check_same(adapters, "base_model_name_or_path", "the base model (override with --allow-different-base)")
    _check_same(adapters, "task_type", "one task_type")
    _check_same(adapters, "fan_in_fan_out", "fan_in_fan_out (same layer types)")
    _check_same(adapters, "alora_invocation_tokens", "the aLoRA invocation tokens")
    for ad in adapters[1:]:
        missing = sorted(set(first.modules) ^ set(ad.modules))
        if missing:
            where = first.label if missing[0] not in first.modules else ad.label
            raise AdapterError(
                f"{ad.label}: target modules differ from {first.label}: module {missing[0]} is missing in {where} "
                f"({len(missing)} modules differ)"
            )
        extra = sorted(set(first.full_keys) ^ set(ad.full_keys))
        if extra:
            raise AdapterError(
                f"{ad.label}: non-LoRA tensors (modules_to_save / bias) differ from {first.label}: key {extra[0]} "
                f"is only in one of them"
            )
        for name, m in ad.modules.items():
            ref = first.modules[name]
            b_dims, ref_b_dims = m.b_shape[:1] + m.b_shape[2:], ref.b_shape[:1] + ref.b_shape[2:]
            if m.kind != ref.kind or m.a_shape[1:] != ref.a_shape[1:] or b_dims != ref_b_dims:
                raise AdapterError(
                    f"{ad.label}: module {name} has shapes A {list(m.a_shape)} / B {list(m.b_shape)} but "
                    f"{first.label} has A {list(ref.a_shape)} / B {list(ref.b_shape)}"
                )
        for key in ad.full_keys:
            s, r = ad.info(key).shape, first.info(key).shape
            if s != r:
                raise AdapterError(f"{ad.label}: tensor {key} has shape {list(s)} but {first.label} has {list(r)}")


def _output_ranks(adapters: list[Adapter], method: str, rank: int | None, names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        ranks = [ad.modules[name].rank for ad in adapters]
        if method == "poc":
            out[name] = sum(ranks)
        elif method == "soup":
            if len(set(ranks)) != 1:
                j = next(i for i, r in enumerate(ranks) if r != ranks[0])
                raise AdapterError(f"{adapters[j].label}: module {name} has rank {ranks[j]} but {adapters[0].label} "
                                   f"has {ranks[0]}; --method soup needs equal ranks")
            out[name] = ranks[0]
        else:
            if rank > sum(ranks):
                raise ConfigError(f"--rank {rank} is larger than the total rank {sum(ranks)} of module {name}")
            out[name] = rank
    return out


def _plan(adapter_dirs: Sequence[str | Path], output: Path, method: str, weights, rank, seed, dtype,
          overwrite: bool, allow_different_base: bool) -> _Plan:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    dirs, skipped = expand_adapter_inputs(adapter_dirs)
    for d, why in skipped:
        logger.info("skipped %s: %s", d, why)
    logger.info("merging %d adapters: %s", len(dirs), ", ".join(map(str, dirs)))
    check_output_not_input(output, dirs)
    check_output_path(output, overwrite)
    if method in ("svd", "prune"):
        if rank is None or rank <= 0:
            raise ConfigError(f"--method {method} needs a positive --rank K, got {rank}")
    elif rank is not None:
        raise ConfigError(f"--rank is only used by --method svd/prune, not {method}")
    if weights is None:
        weights = [1.0 / len(dirs)] * len(dirs)
    weights = [float(w) for w in weights]
    if len(weights) != len(dirs):
        raise ConfigError(f"got {len(weights)} weights for {len(dirs)} adapters ({', '.join(map(str, dirs))})")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    out_dtype = _parse_dtype(dtype)
    adapters: list[Adapter] = []
    try:
        for j, d in enumerate(dirs):
            adapters.append(load_adapter(d, label=f"adapter {j} ({d})"))
        _validate(adapters, allow_different_base)
        names = sorted(adapters[0].modules)
        out_ranks = _output_ranks(adapters, method, rank, names)
        if abs(sum(weights)) < 1e-12:
            _check_zero_sum(adapters, method)
    except BaseException:
        for ad in adapters:
            ad.close()
        raise
    if out_dtype is None:  # the inputs' dtype, or float32 when they disagree
        in_dtypes = {ad.tensors.info[m.a_key].dtype for ad in adapters for m in ad.modules.values()}
        out_dtype = in_dtypes.pop() if len(in_dtypes) == 1 else torch.float32
    return _Plan(adapters, weights, method, rank, seed, out_dtype, names, out_ranks, adapters[0].full_keys, [],
                 skipped)


def _check_zero_sum(adapters: list[Adapter], method: str) -> None:
    """Weights summing to 0 leave an average undefined only for soup's A and for non-LoRA
    tensors that differ between the inputs; identical copies (PEFT's saved copy of the base
    embedding, an untrained modules_to_save) are kept as they are."""
    if method == "soup":
        raise ConfigError("the weights sum to 0, so --method soup cannot average the A matrices")
    for key in adapters[0].full_keys:
        first = adapters[0].read(key)
        for ad in adapters[1:]:
            if not torch.equal(first, ad.read(key)):
                raise ConfigError(f"the weights sum to 0, so tensor {key} (modules_to_save / bias), which differs "
                                  f"between {adapters[0].label} and {ad.label}, cannot be averaged")


# ----------------------------------------------------------------------- the math
@dataclass
class _ModuleResult:
    a: torch.Tensor  # (K, *A trailing) float32, output scale 1
    b: torch.Tensor  # (out, K, *B trailing)
    bias: torch.Tensor | None
    stats: dict[str, Any]


def _gram_inner(gb: torch.Tensor, ga: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``P[i, j] = <dW_i, dW_j>_F`` from the Gram matrices of the stacked factors:
    ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))`` (r x r blocks, never out x in)."""
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    s = torch.nn.functional.one_hot(owner, len(sizes)).to(gb.dtype)
    return s.T @ (gb * ga) @ s


def _spread(p: torch.Tensor) -> float:
    """Mean over pairs of ``||dW_i - dW_j|| / sqrt(||dW_i||^2 + ||dW_j||^2)``: 0 for identical
    updates, 1 for orthogonal ones (independent directions), up to sqrt(2) for opposite ones."""
    m = p.shape[0]
    vals = []
    for i in range(m):
        for j in range(i + 1, m):
            den = float(p[i, i] + p[j, j])
            vals.append(math.sqrt(max(den - 2 * float(p[i, j]), 0.0) / den) if den > 0 else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def _eig_factor(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, sigma)`` with ``X = U diag(sigma) V^T`` for the X whose Gram ``X^T X`` is ``g``,
    dropping directions whose eigenvalue is rounding noise."""
    lam, v = torch.linalg.eigh(g)
    keep = lam > _EIG_RTOL * max(float(lam[-1]), 0.0)
    return v[:, keep], lam[keep].sqrt()


def _svd_truncate(bw: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-k factors of ``bw @ a`` (out x N, N x in).

    ``bw = Q1 R1`` and ``a^T = Q2 R2`` with orthonormal Q's, taken from the eigendecomposition of
    the N x N Gram matrices in float64 (R1 = diag(sigma) V^T) instead of Householder QR: this
    costs N^2 (out + in) flops like the Gram matrices the report needs anyway, whereas
    torch.linalg.qr of an 11008 x 256 matrix took 1.6 s on 2 CPU cores (180 s for Llama-7B).
    Then ``bw @ a = Q1 (R1 R2^T) Q2^T`` and the SVD of the small core gives the truncation.
    Returns (b_k, a_k, squared error, squared norm) with b_k, a_k sharing sqrt(singular values).
    """
    b64, a64 = bw.double(), a.double()
    vb, sb = _eig_factor(b64.T @ b64)
    va, sa = _eig_factor(a64 @ a64.T)
    core = (sb[:, None] * (vb.T @ va)) * sa[None, :]
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    kk = min(k, s.numel())
    root = s[:kk].sqrt()
    b_k = b64 @ (vb / sb[None, :]) @ (u[:, :kk] * root[None, :])  # Q1 U_k sqrt(S_k)
    a_k = ((root[:, None] * vh[:kk]) @ (va / sa[None, :]).T) @ a64  # sqrt(S_k) V_k^T Q2^T
    if kk < k:  # numerical rank below k: pad with zero neurons so every module has rank k
        b_k = torch.cat([b_k, b_k.new_zeros(b_k.shape[0], k - kk)], 1)
        a_k = torch.cat([a_k, a_k.new_zeros(k - kk, a_k.shape[1])], 0)
    sq = s.square()
    return b_k.float(), a_k.float(), float(sq[kk:].sum()), float(sq.sum())


def _as_b_matrix(b: torch.Tensor, label: str, key: str) -> torch.Tensor:
    if b.dim() > 2 and math.prod(b.shape[2:]) != 1:
        raise AdapterError(f"{label}: {key} has a kernel of shape {list(b.shape[2:])}; only 1x1 lora_B is supported")
    return b.reshape(b.shape[0], b.shape[1])


def _buffer(plan: _Plan, tag: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 scratch tensor reused from module to module: fresh multi-MB allocations are
    fresh pages, and their page faults cost as much as the arithmetic here."""
    key = (tag, shape, plan.parity)
    buf = plan.buffers.get(key)
    if buf is None:
        buf = plan.buffers[key] = torch.empty(shape)
    return buf


def _read_factors(plan: _Plan, mods: list[LoraModule]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = [A_1; ...; A_M]`` (N x in) and ``B_s = [s_1 B_1 ... s_M B_M]`` (out x N), float32.
    A_j is read straight into its rows of A'; each B_j is scaled into its column block."""
    sizes = [m.rank for m in mods]
    n, n_in, n_out = sum(sizes), math.prod(mods[0].a_shape[1:]), mods[0].b_shape[0]
    a_cat, b_cat = _buffer(plan, "A", (n, n_in)), _buffer(plan, "B", (n_out, n))
    lo = 0
    for ad, m in zip(plan.adapters, mods):
        hi = lo + m.rank
        if ad.tensors.info[m.a_key].dtype == torch.float32:
            ad.tensors.read_into(m.a_key, a_cat[lo:hi])
        else:
            a_cat[lo:hi].copy_(ad.read(m.a_key).reshape(m.rank, n_in))
        if ad.tensors.info[m.b_key].dtype == torch.float32:
            b = _buffer(plan, "Bj", m.b_shape)
            ad.tensors.read_into(m.b_key, b)
        else:
            b = ad.read(m.b_key).float()
        torch.mul(_as_b_matrix(b, ad.label, m.b_key), m.scale, out=b_cat[:, lo:hi])
        lo = hi
    return a_cat, b_cat


def _merge_module(plan: _Plan, name: str, gen: torch.Generator) -> _ModuleResult:
    mods: list[LoraModule] = [ad.modules[name] for ad in plan.adapters]
    a_cat, b_cat = _read_factors(plan, mods)
    ga, gb = a_cat @ a_cat.T, b_cat.T @ b_cat
    if not (torch.isfinite(ga.diagonal()).all() and torch.isfinite(gb.diagonal()).all()):
        # sums of squares are finite iff the factors are (barring 1e19-sized values): name the culprit
        for ad, m in zip(plan.adapters, mods):
            check_finite(ad.read(m.a_key), ad.label, m.a_key)
            check_finite(ad.read(m.b_key), ad.label, m.b_key)
    sizes = [m.rank for m in mods]
    p = _gram_inner(gb, ga, sizes)
    w = torch.tensor(plan.weights)
    col_w = torch.repeat_interleave(w, torch.tensor(sizes))
    if plan.method == "soup":  # (sum_j w_j s_j B_j) (sum_j w_j A_j / sum_j w_j), before B is reweighted
        offsets = [0, *accumulate(sizes)]
        blocks = [slice(lo, hi) for lo, hi in zip(offsets, offsets[1:])]
        wsum = float(w.sum())
        soup_b = sum(wj * b_cat[:, blk] for wj, blk in zip(plan.weights, blocks))
        soup_a = sum((wj / wsum) * a_cat[blk] for wj, blk in zip(plan.weights, blocks))
    bw = b_cat.mul_(col_w[None, :])  # in place: blocks w_j s_j B_j
    norm_sq = float(w @ p @ w)
    k = plan.out_ranks[name]
    stats: dict[str, Any] = {"rank_in": sizes, "scale_in": [m.scale for m in mods], "rank_out": k}
    if plan.method == "poc":
        a_out, b_out, err_sq = a_cat, bw, 0.0
    elif plan.method == "svd":
        b_out, a_out, err_sq, _ = _svd_truncate(bw, a_cat, k)
    else:
        if plan.method == "prune":
            n = a_cat.shape[0]
            idx = torch.randperm(n, generator=gen)[:k].sort().values
            b_out, a_out = bw[:, idx] * (n / k), a_cat[idx]
        else:
            b_out, a_out = soup_b, soup_a
        # ||out - target||^2 = ||out||^2 + ||target||^2 - 2 <out, target>, all via small Grams
        out_sq = float(((b_out.T @ b_out) * (a_out @ a_out.T)).sum())
        cross = float(((b_out.T @ bw) * (a_out @ a_cat.T)).sum())
        err_sq = max(out_sq + norm_sq - 2 * cross, 0.0)
    stats.update(
        norm_dW=[math.sqrt(max(float(x), 0.0)) for x in p.diagonal()],
        norm_merged=math.sqrt(max(norm_sq, 0.0)),
        spread=_spread(p),
        rel_error=math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
        _p=p, _err_sq=err_sq, _norm_sq=norm_sq,
    )
    bias = _merged_lora_bias(plan, name) if any(m.bias_key for m in mods) else None
    a_shape, b_shape = mods[0].a_shape, mods[0].b_shape
    return _ModuleResult(a_out.reshape(k, *a_shape[1:]), b_out.reshape(b_shape[0], k, *b_shape[2:]), bias, stats)


def _merged_lora_bias(plan: _Plan, name: str) -> torch.Tensor:
    """``sum_j w_j s_j b_j`` over the adapters that train a lora_B bias (lora_bias=True)."""
    out = torch.zeros(plan.adapters[0].modules[name].b_shape[0])
    for ad, wj in zip(plan.adapters, plan.weights):
        m = ad.modules[name]
        if m.bias_key:
            out += ad.read_checked(m.bias_key).float() * (wj * m.scale)
    return out


def _merge_full(plan: _Plan, key: str) -> torch.Tensor:
    """modules_to_save / trained bias tensors: identical copies stay bit-identical, otherwise
    the weighted average ``sum_j w_j t_j / sum_j w_j``."""
    ts = [ad.read_checked(key) for ad in plan.adapters]
    if all(torch.equal(ts[0], t) for t in ts[1:]):
        return ts[0]
    if not ts[0].is_floating_point():
        raise AdapterError(f"{plan.adapters[1].label}: non-float tensor {key} differs between adapters")
    wsum = sum(plan.weights)
    return sum((wj / wsum) * t.float() for wj, t in zip(plan.weights, ts)).to(ts[0].dtype)


def _finish_stats(plan: _Plan, per_module: dict[str, dict[str, Any]]) -> dict[str, Any]:
    m = len(plan.adapters)
    p_tot = torch.zeros(m, m, dtype=torch.float64)
    err_sq = norm_sq = 0.0
    for st in per_module.values():
        p_tot += st.pop("_p").double()
        err_sq += st.pop("_err_sq")
        norm_sq += st.pop("_norm_sq")
    norms = [math.sqrt(max(float(x), 0.0)) for x in p_tot.diagonal()]
    mean_norm = sum(norms) / m
    return {
        "norm_dW": norms,
        "norm_merged": math.sqrt(max(norm_sq, 0.0)),
        "merged_to_mean_norm": math.sqrt(max(norm_sq, 0.0)) / mean_norm if mean_norm > 0 else 0.0,
        "spread": _spread(p_tot),
        "pairwise_inner": p_tot.tolist(),
        "rel_error": math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
    }


# ----------------------------------------------------------------------- writing
def _adapter_config(plan: _Plan) -> dict[str, Any]:
    """The first input's config with scale 1 per module: r = lora_alpha = output rank."""
    cfg = dict(plan.adapters[0].config)
    counts = Counter(plan.out_ranks.values())
    r = counts.most_common(1)[0][0]
    # init_lora_weights=True: the output is a plain LoRA, whatever (allowlisted) init the inputs had;
    # PEFT would otherwise re-run e.g. "orthogonal" (which needs an even rank) when loading it
    cfg.update(r=r, lora_alpha=r, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
               init_lora_weights=True,
               lora_bias=any(m.bias_key for ad in plan.adapters for m in ad.modules.values()),
               inference_mode=True, velora_config=None)
    if len(counts) > 1:
        # PEFT matches pattern keys as suffixes and takes the first hit, so list every module,
        # longest name first: each module then finds its own entry before any shorter suffix.
        names = sorted(plan.out_ranks, key=lambda n: (-len(n), n))
        cfg["rank_pattern"] = {n: plan.out_ranks[n] for n in names}
        cfg["alpha_pattern"] = {n: plan.out_ranks[n] for n in names}
    return cfg


def _template_record(plan: _Plan) -> dict[str, Any] | None:
    records = [ad.template_record for ad in plan.adapters]
    present = [r for r in records if r is not None]
    if not present:
        return None
    if len(present) != len(records) or any(r != present[0] for r in present):
        msg = "the inputs' prompt-template records differ (or some have none); the first one was copied"
        plan.warnings.append(msg)
        logger.warning(msg)
    return present[0]


def _adapter_specs(plan: _Plan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    first = plan.adapters[0]
    specs = []
    for name in plan.module_names:
        m, k = first.modules[name], plan.out_ranks[name]
        specs.append((m.peft_key("A"), plan.out_dtype, (k, *m.a_shape[1:])))
        specs.append((m.peft_key("B"), plan.out_dtype, (m.b_shape[0], k, *m.b_shape[2:])))
        if any(ad.modules[name].bias_key for ad in plan.adapters):
            specs.append((m.peft_key("bias"), plan.out_dtype, (m.b_shape[0],)))
    for key in plan.full_keys:  # already in PEFT's layout
        info = first.info(key)
        specs.append((key, plan.out_dtype if info.dtype.is_floating_point else info.dtype, info.shape))
    return specs


def _write_adapter(plan: _Plan, tmp: Path, gen: torch.Generator) -> dict[str, dict[str, Any]]:
    specs = _adapter_specs(plan)
    per_module: dict[str, dict[str, Any]] = {}
    with SafetensorsStreamWriter(tmp / SAFETENSORS_NAME, specs, {"format": "pt"}, background=True) as writer:
        for name in tqdm(plan.module_names, desc=f"merge ({plan.method})", unit="module"):
            plan.parity ^= 1
            res = _merge_module(plan, name, gen)
            m = plan.adapters[0].modules[name]
            writer.write(m.peft_key("A"), res.a.to(plan.out_dtype))
            writer.write(m.peft_key("B"), res.b.to(plan.out_dtype))
            if res.bias is not None:
                writer.write(m.peft_key("bias"), res.bias.to(plan.out_dtype))
            per_module[name] = res.stats
        for key, dtype, _ in specs[len(specs) - len(plan.full_keys):]:
            writer.write(key, _merge_full(plan, key).to(dtype))
    write_json(tmp / CONFIG_NAME, _adapter_config(plan))
    return per_module


# ------------------------------------------------------------------ merge into base
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5",
                    ".safetensors.index.json", ".bin.index.json")
_INDEX_NAME = "model.safetensors.index.json"


def _resolve_base(base_model: str | Path) -> Path:
    """A local model directory, or a hub id fetched with ``snapshot_download`` (which honours
    HF_HUB_OFFLINE and the local cache). Embedded ids and .gguf files resolve to their local copy."""
    from .models import resolve_model_path

    p = Path(resolve_model_path(str(base_model)))
    if p.is_dir():
        return p
    if p.exists():
        raise AdapterError(f"base model {base_model}: {p} is a file, not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base_model), allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, no network...
        raise ConfigError(f"base model {base_model!r} is not a local directory and could not be fetched "
                          f"from the hub ({type(exc).__name__}: {exc})") from None


def _drop_first(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else key


# bitsandbytes (LLM.int8 .SCB/weight_format; 4-bit .absmax/.quant_map/.quant_state.*, nested_* with
# double quantization) and GPTQ/AWQ (.qweight/.qzeros/.g_idx) state saved beside the weights
_QUANT_KEY_SUFFIXES = (".SCB", ".weight_format", ".absmax", ".quant_map", ".qweight", ".qzeros", ".g_idx")
_QUANT_KEY_PARTS = (".quant_state", ".nested_absmax", ".nested_quant_map")
_QUANT_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
_BASE_CONFIG = "config.json"


def _read_base_config(d: Path, label: str) -> dict[str, Any]:
    path = d / _BASE_CONFIG
    if not path.is_file():
        raise AdapterError(f"{label}: {path} not found (not a transformers model directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{label}: cannot parse {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}: {path} is not a JSON object")
    return cfg


def _config_quantization(cfg: dict[str, Any]) -> str | None:
    for c in (cfg, cfg.get("text_config")):
        q = c.get("quantization_config") if isinstance(c, dict) else None
        if q:
            if not isinstance(q, dict):
                return f"quantization_config={q!r} in config.json"
            bits = [k for k in ("load_in_8bit", "load_in_4bit") if q.get(k)]
            return (f"quantization_config with quant_method={q.get('quant_method', 'unknown')!r}"
                    + (f" ({', '.join(bits)})" if bits else "") + " in config.json")
    return None


def _tensor_quantization(files: dict[str, TensorFile]) -> str | None:
    for f in files.values():
        for key, info in f.info.items():
            if key.endswith(_QUANT_KEY_SUFFIXES) or any(part in key for part in _QUANT_KEY_PARTS):
                return f"quantization state tensor {key} in {f.path.name}"
            if key.endswith(".weight") and info.dtype in _QUANT_DTYPES:
                return f"weight {key} stored as {str(info.dtype).replace('torch.', '')} in {f.path.name}"
    return None


def _refuse_quantized(label: str, what: str) -> None:
    raise ConfigError(
        f"{label} is quantized ({what}): adding the merged update to quantized weights would round it away "
        f"or corrupt them, so nothing was written. Dequantize the base first (e.g. load it with transformers, "
        f"call model.dequantize() and save_pretrained it in bfloat16/float32) and merge into that, or keep the "
        f"merged adapter unmerged (drop --merge-into-base) and load it on the quantized base with PEFT"
    )


def _tied_embedding_keys(d: Path, cfg: dict[str, Any], label: str) -> tuple[str, str] | None:
    """``(input embedding key, output embedding key)`` when the base ties them, else None.

    Which modules are the embeddings is asked of transformers: the model class is built on the
    meta device (no weights, no memory) from the local config, without remote code.
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(d), trust_remote_code=False)
        tied = getattr(config, "tie_word_embeddings", None)
        if tied is None:
            tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        if not tied:
            return None
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
        names = {id(m): n for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is None or out is None:
            return None
        return f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"
    except Exception as exc:  # an architecture this transformers does not know
        if cfg.get("tie_word_embeddings") is False:
            return None
        raise ConfigError(f"{label}: cannot tell whether (and which) input and output embeddings are tied, "
                          f"since transformers cannot build its architecture ({type(exc).__name__}: {exc})") from None


def _set_everywhere(cfg: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``cfg`` with ``values`` set at the top level and in a nested ``text_config`` that has them."""
    cfg = dict(cfg, **values)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = dict(cfg["text_config"], **{k: v for k, v in values.items() if k in cfg["text_config"]})
    return cfg


class _BaseMerge:
    """Adds the merged update to the base model's safetensors shards, one tensor at a time.

    Everything is checked here, before the output exists: the base is not quantized, every
    adapter tensor's shape fits the base tensor it updates, and tied input/output embeddings
    are untied in the written model when the adapter changes one of them (PEFT's loaded
    adapter changes only that side; keeping the tie would apply the change to both).
    """

    def __init__(self, plan: _Plan, base_model: str | Path, dtype: torch.dtype | None):
        self.plan, self.dir, self.dtype = plan, _resolve_base(base_model), dtype
        self.files: dict[str, TensorFile] = {}
        try:
            self._check_and_map(f"base model {base_model}")
        except BaseException:
            self.close()
            raise

    def _check_and_map(self, label: str) -> None:
        plan = self.plan
        self.label = label
        first = plan.adapters[0]
        if first.config.get("alora_invocation_tokens"):
            raise ConfigError(f"{first.label}: an aLoRA adapter acts only after its invocation tokens; merged "
                              f"into the weights it would act on every token. Keep the merged adapter unmerged")
        self.config = _read_base_config(self.dir, label)
        quant = _config_quantization(self.config)
        if quant:
            _refuse_quantized(label, quant)
        index_path = self.dir / _INDEX_NAME
        if index_path.is_file():
            try:
                self.index = json.loads(index_path.read_text(encoding="utf-8"))
                shard_names = sorted(set(self.index["weight_map"].values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise AdapterError(f"{label}: cannot parse {index_path}: {type(exc).__name__}: {exc}") from None
        elif (self.dir / "model.safetensors").is_file():
            self.index, shard_names = None, ["model.safetensors"]
        else:
            raise AdapterError(f"{label}: {self.dir} holds no model.safetensors or {_INDEX_NAME} "
                               f"(only safetensors checkpoints can be merged into)")
        for n in shard_names:
            self.files[n] = TensorFile(self.dir / n, label)
        quant = _tensor_quantization(self.files)
        if quant:
            _refuse_quantized(label, quant)
        where = {k: n for n, f in self.files.items() for k in f.keys()}
        self.info = {k: self.files[n].info[k] for k, n in where.items()}
        self.extra: dict[str, list[str]] = {}  # shard -> keys written that the base does not store
        self.tied_src: dict[str, str | None] = {}  # untied key -> adapter key of its pre-update value (None: base)
        self.notes: list[str] = []
        full_targets = {a: a[len(PEFT_PREFIX):].replace(".base_layer.", ".") for a in plan.full_keys}
        # building the model class on the meta device takes seconds for a 7B config: only when an
        # adapter tensor has the vocabulary size in its shape can it touch a (tied) embedding
        text_cfg = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else {}
        vocab = self.config.get("vocab_size", text_cfg.get("vocab_size"))
        maybe = vocab is None or any(vocab in m.a_shape + m.b_shape for m in first.modules.values()) or any(
            vocab in first.info(a).shape for a in plan.full_keys)
        tie = _tied_embedding_keys(self.dir, self.config, label) if maybe else None
        if tie is not None:
            touched = {f"{n}.weight" for n in plan.module_names} | set(full_targets.values())
            if touched & set(tie):
                self._untie(tie, where, full_targets)

        def find(key: str, what: str) -> str:
            for cand in (key, _drop_first(key)):
                if cand in self.info:
                    return cand
            raise AdapterError(f"{first.label}: {what} {key} has no counterpart in {label}")

        self.lora: dict[str, str] = {}  # base key -> module (weight += dW)
        self.bias: dict[str, str] = {}  # base key -> module (bias += merged lora_B bias)
        self.full: dict[str, str] = {}  # base key -> adapter key (replaced)
        fan = bool(first.config.get("fan_in_fan_out"))
        for name in plan.module_names:
            m = first.modules[name]
            key = find(f"{name}.weight", "module")
            shape = self.info[key].shape
            rows, cols = m.b_shape[0], math.prod(m.a_shape[1:])
            if m.kind == "embedding" or fan:
                rows, cols = cols, rows
            if math.prod(shape) != rows * cols or shape[0] != rows:
                raise AdapterError(
                    f"{first.label}: {m.a_key} {list(m.a_shape)} and {m.b_key} {list(m.b_shape)} make an update "
                    f"of shape [{rows}, {cols}] but {label} has {key} of shape {list(shape)} (an adapter for a "
                    f"resized vocabulary or another base?)")
            self.lora[key] = name
            if any(ad.modules[name].bias_key for ad in plan.adapters):
                bkey = find(f"{name}.bias", "lora_bias of module")
                if self.info[bkey].shape != (m.b_shape[0],):
                    raise AdapterError(f"{first.label}: the lora_B bias of {name} has shape [{m.b_shape[0]}] but "
                                       f"{label} has {bkey} of shape {list(self.info[bkey].shape)}")
                self.bias[bkey] = name
        for akey, target in full_targets.items():
            if target in self.tied_src:
                continue
            key = find(target, "tensor")
            if first.info(akey).shape != self.info[key].shape:
                raise AdapterError(
                    f"{first.label}: tensor {akey} has shape {list(first.info(akey).shape)} but {label} has {key} "
                    f"of shape {list(self.info[key].shape)} (an adapter for a resized vocabulary or another base?)")
            self.full[key] = akey
        self.where = where
        self.out_dtype = self.dtype or next(iter(self.files.values())).info[next(iter(where))].dtype

    def _untie(self, tie: tuple[str, str], where: dict[str, str], full_targets: dict[str, str]) -> None:
        """Write both embeddings explicitly: each gets the value PEFT's loaded adapter gives it.

        PEFT saves a copy of a tied embedding it wraps with LoRA (``...base_layer.weight``) and
        loads it into the shared tensor, so it reaches both sides; a ``modules_to_save`` copy
        replaces one side only; a LoRA update applies to its own side only.
        """
        stored = [k for k in tie if k in where]
        if not stored:
            raise AdapterError(f"{self.label}: neither tied embedding ({', '.join(tie)}) is in its safetensors files")
        shared_copy = next((a for a, t in full_targets.items() if t in tie and ".base_layer." in a), None)
        for key in tie:
            own = next((a for a, t in full_targets.items() if t == key and ".base_layer." not in a), None)
            self.tied_src[key] = src = own or shared_copy  # None: the base's own tensor
            if src is not None and self.plan.adapters[0].info(src).shape != self.info[stored[0]].shape:
                raise AdapterError(
                    f"{self.plan.adapters[0].label}: tensor {src} has shape "
                    f"{list(self.plan.adapters[0].info(src).shape)} but {self.label} has {stored[0]} of shape "
                    f"{list(self.info[stored[0]].shape)} (an adapter for a resized vocabulary?)")
        for key in tie:
            if key not in where:  # written beside the tensor it was tied to
                where[key] = where[stored[0]]
                self.info[key] = self.info[stored[0]]
                self.extra.setdefault(where[key], []).append(key)
        self.shared_key = stored[0]
        msg = (f"untied {tie[0]} and {tie[1]} in the written model (tie_word_embeddings=false, both stored): the "
               f"adapter changes them differently, as the PEFT-loaded adapter does, which a tied model cannot express")
        self.notes.append(msg)
        logger.warning(msg)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _dtype(self, info) -> torch.dtype:
        return self.dtype if self.dtype is not None and info.dtype.is_floating_point else info.dtype

    def _source(self, key: str, f: TensorFile, merge_full) -> torch.Tensor:
        """The tensor ``key`` before the merged update is added."""
        if key in self.tied_src:
            src = self.tied_src[key]
            if src is not None:
                return merge_full(src)
            return f.read(key if key in f.info else self.shared_key)
        return merge_full(self.full[key]) if key in self.full else f.read(key)

    def write(self, tmp: Path, merge_module, merge_full) -> dict[str, dict[str, Any]]:
        per_module: dict[str, dict[str, Any]] = {}
        total = 0
        bar = tqdm(total=len(self.lora), desc=f"merge into base ({self.plan.method})", unit="module")
        for shard, f in self.files.items():
            keys = sorted(f.keys(), key=lambda k: f.info[k].start) + self.extra.get(shard, [])
            specs = [(k, self._dtype(self.info[k]), self.info[k].shape) for k in keys]
            total += sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for _, d, s in specs)
            with SafetensorsStreamWriter(tmp / shard, specs, f.metadata or {"format": "pt"}, background=True) as writer:
                for key, dtype, shape in specs:
                    t = self._source(key, f, merge_full)
                    if key in self.lora:
                        res = merge_module(self.lora[key])
                        per_module[self.lora[key]] = res.stats
                        kind = self.plan.adapters[0].modules[self.lora[key]].kind
                        delta = res.b.reshape(res.b.shape[0], -1) @ res.a.reshape(res.a.shape[0], -1)
                        if kind == "embedding" or self.plan.adapters[0].config.get("fan_in_fan_out"):
                            delta = delta.T
                        t = t.float() + delta.reshape(shape)
                        bar.update(1)
                    if key in self.bias:
                        t = t.float() + _merged_lora_bias(self.plan, self.bias[key])
                    writer.write(key, t.to(dtype))
            f.close()
        bar.close()
        if self.index is not None:
            weight_map = dict(self.index["weight_map"], **{k: s for s, ks in self.extra.items() for k in ks})
            index = dict(self.index, weight_map=weight_map,
                         metadata=dict(self.index.get("metadata") or {}, total_size=total))
            write_json(tmp / _INDEX_NAME, index)
        # the written config describes the written tensors: their dtype and whether they are tied
        changes: dict[str, Any] = {}
        if self.dtype is not None:
            name = str(self.dtype).replace("torch.", "")
            changes["dtype"] = name
            if "torch_dtype" in self.config:
                changes["torch_dtype"] = name
        if self.tied_src:
            changes["tie_word_embeddings"] = False
        write_json(tmp / _BASE_CONFIG, _set_everywhere(self.config, **changes))
        for src in sorted(self.dir.iterdir()):
            if src.is_file() and src.name != _BASE_CONFIG and not src.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(src, tmp / src.name)  # copyfile: modes from the umask, as save_pretrained
        return per_module


# Merging runs torch single-threaded (torch_threads(1)): the per-module tensors are a few MB, and
# on a busy 2-core machine every multi-threaded op waited ~8 ms for its second thread (a 1.4 MB
# scaled copy: 3.5 ms with 2 threads, 0.2 ms with 1), which made the merge 2x slower than the
# I/O floor. The Gram products lose at most a factor 2 on an idle machine.


def merge_adapters(
    adapters: Sequence[str | Path] | str | Path,
    output: str | Path,
    *,
    method: str = "poc",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    seed: int = 0,
    base_model: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    allow_different_base: bool = False,
    merge_into_base: bool = False,
) -> MergeReport:
    """Merge PEFT LoRA adapters into one adapter (or, with ``merge_into_base``, one model).

    ``adapters``: adapter directories, or one directory holding several. ``weights``: w_j
    (default 1/M; negative allowed). ``rank``: K for ``svd``/``prune``. Everything is
    validated before the output is created; the output is built in a temporary sibling and
    renamed at the end, so a failure leaves nothing behind.

    Example:
        >>> rep = merge_adapters(["a0", "a1", "a2"], "merged", method="svd", rank=32)  # doctest: +SKIP
        >>> print(rep.summary())  # doctest: +SKIP
    """
    if isinstance(adapters, (str, Path)):
        adapters = [adapters]
    output = Path(output)
    if merge_into_base and base_model is None:
        raise ConfigError("--merge-into-base needs --base-model PATH_OR_ID")
    plan = _plan(adapters, output, method, weights, rank, seed, dtype, overwrite, allow_different_base)
    if base_model is not None and not merge_into_base:
        plan.warnings.append("base_model is only used with merge_into_base; it was ignored")
    base = None
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        if merge_into_base:
            base = _BaseMerge(plan, base_model, _parse_dtype(dtype))
        # hashing reads every input once more; a thread overlaps it with the merge
        hashes = [pool.submit(sha256_file, ad.weight_file) for ad in plan.adapters]
        gen = torch.Generator().manual_seed(seed)
        with atomic_output_dir(output, overwrite) as tmp, torch_threads(1):
            if base is not None:
                per_module = base.write(tmp, lambda name: _merge_module(plan, name, gen),
                                        lambda key: _merge_full(plan, key))
            else:
                per_module = _write_adapter(plan, tmp, gen)
            overall = _finish_stats(plan, per_module)
            record = _template_record(plan)
            if record is not None:
                from .data.templates import TEMPLATE_RECORD_FILE

                write_json(tmp / TEMPLATE_RECORD_FILE, record)
            report = MergeReport(
                output=str(output), method=method, weights=plan.weights,
                inputs=[{"path": str(ad.path), "weight_file": ad.weight_file.name, "sha256": h.result(),
                         "r": ad.config.get("r"), "lora_alpha": ad.config.get("lora_alpha"),
                         "use_rslora": bool(ad.config.get("use_rslora", False)),
                         "base_model_name_or_path": ad.config.get("base_model_name_or_path")}
                        for ad, h in zip(plan.adapters, hashes)],
                rank=rank, seed=seed, dtype=str(base.out_dtype if base else plan.out_dtype).replace("torch.", ""),
                merge_into_base=merge_into_base, base_model=str(base_model) if base_model else None,
                output_ranks=dict(plan.out_ranks), modules=per_module,
                overall=overall, warnings=plan.warnings, notes=base.notes if base is not None else [],
                skipped_inputs=[{"path": str(p), "reason": why} for p, why in plan.skipped],
            )
            write_json(tmp / REPORT_NAME, report.to_dict())
            from .cards import write_merge_card

            write_merge_card(tmp, report)  # README.md model card, inside the atomic output
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on failure: do not hash what is left
        for ad in plan.adapters:
            ad.close()
        if base is not None:
            base.close()
    logger.info("merged %d adapters (%s) into %s", len(plan.adapters), method, output)
    return report


def main_merge(args: argparse.Namespace) -> int:
    """``poc-lora merge`` / ``scripts/merge_adapters.py``: merge, then print a short summary."""
    report = merge_adapters(
        args.adapters, args.output, method=args.method, weights=args.weights, rank=args.rank,
        seed=args.seed, base_model=args.base_model, dtype=args.dtype, overwrite=args.overwrite,
        allow_different_base=args.allow_different_base, merge_into_base=args.merge_into_base,
    )
    print(report.summary())
    return 0


__all__ = ["MergeReport", "merge_adapters", "main_merge", "METHODS"]
