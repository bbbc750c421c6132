"""The plan of a merge: its inputs, read and checked, and everything decided before writing.

:func:`make_plan` expands the adapter arguments, checks the output path, the method and its
rank (through the method registry), the weights and the dtype, opens every adapter (lazily),
checks that they can be merged (same base, task type, target modules, shapes, non-LoRA
tensors) and fixes each module's output rank (the method's, truncated to the ``--serve_rank``
cap) and the one rank R the adapter is written with. Nothing is written; every problem is a
:class:`~poc_lora.errors.PocLoraError` naming the adapter and the module, key or field.

Example:
    >>> plan = make_plan(["runs/a0", "runs/a1"], Path("runs/merged"), "svd", None, 8, 0, None,
    ...                  overwrite=False, allow_different_base=False)  # doctest: +SKIP
    >>> plan.out_ranks["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    8
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..adapters import Adapter, check_output_not_input, expand_adapter_inputs, load_adapter
from ..errors import AdapterError, ConfigError
from ..outputs import check_output_path
from .methods import MergeMethod, check_rank, get_method, resolve_parameters
from .serving import serve_cap

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergePlan:
    """A checked merge: open adapters (close them with :meth:`close`), the method, the weights
    w_j, the seed, the output dtype, the modules in write order and each one's output rank, the
    non-LoRA tensors (PEFT layout), warnings so far and the directory children left out.

    ``params``: the method's parameters (density, majority_sign_method; see
    ``methods.resolve_parameters``). ``method_ranks``: each module's rank as the method writes
    it; ``out_ranks``: after the ``serve_rank`` cap (``serve_cap``, None: none). A merged
    adapter is written with rank :attr:`written_rank` in every module (zero-padded)."""

    adapters: list[Adapter]
    weights: list[float]
    method: MergeMethod
    rank: int | None
    seed: int
    out_dtype: torch.dtype
    module_names: list[str]
    out_ranks: dict[str, int]
    full_keys: list[str]
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (directory child, why it was left out)
    params: dict[str, object] = field(default_factory=dict)
    serve_rank: int | str | None = None
    serve_cap: int | None = None
    method_ranks: dict[str, int] = field(default_factory=dict)

    @property
    def written_rank(self) -> int:
        """The rank of every module of the written adapter: the largest output rank."""
        return max(self.out_ranks.values())

    @property
    def has_lora_bias(self) -> bool:
        return any(m.bias_key for ad in self.adapters for m in ad.modules.values())

    def close(self) -> None:
        for ad in self.adapters:
            ad.close()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; None stays None.

    Raises:
        ConfigError: for any other name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_same(adapters: list[Adapter], field_name: str, what: str) -> None:
    ref = adapters[0].config.get(field_name)
    for ad in adapters[1:]:
        if ad.config.get(field_name) != ref:
            raise AdapterError(
                f"{ad.label}: {field_name} is {ad.config.get(field_name)!r} but {adapters[0].label} has "
                f"{ref!r}; all adapters must share {what}"
            )


def check_compatible(adapters: list[Adapter], allow_different_base: bool) -> None:
    """Refuse adapters that cannot be merged with each other.

    Raises:
        AdapterError: naming the adapter and the field, module or key that differs.
    """
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


def output_ranks(adapters: list[Adapter], method: MergeMethod, rank: int | None,
                 names: list[str]) -> dict[str, int]:
    """Each module's output rank, as ``method`` declares it.

    Raises:
        AdapterError: a method that needs equal ranks gets different ones (naming the adapter).
        ConfigError: ``rank`` exceeds a module's total rank sum_j r_j (methods on the factors).
            A method on the full update (``method.dense``) takes any K: a module whose update
            has fewer than K directions (min(out, in) < K) is padded with zero neurons, as
            ``svd`` pads one whose merge has fewer; the report records each module's
            ``rank_used``.
    """
    out = {}
    for name in names:
        ranks = [ad.modules[name].rank for ad in adapters]
        if method.equal_ranks and len(set(ranks)) != 1:
            j = next(i for i, r in enumerate(ranks) if r != ranks[0])
            raise AdapterError(f"{adapters[j].label}: module {name} has rank {ranks[j]} but {adapters[0].label} "
                               f"has {ranks[0]}; --method {method.name} needs equal ranks")
        if method.needs_rank and not method.dense and rank > sum(ranks):
            raise ConfigError(f"--rank {rank} is larger than the total rank {sum(ranks)} of module {name}")
        out[name] = method.output_rank(ranks, rank)
    return out


def check_zero_sum(adapters: list[Adapter], method: MergeMethod) -> None:
    """Weights summing to 0 leave an average undefined only for an equal-rank average (soup's
    A) and for non-LoRA tensors that differ between the inputs; identical copies (PEFT's saved
    copy of the base embedding, an untrained modules_to_save) are kept as they are.

    Raises:
        ConfigError: naming the method or the tensor.
    """
    if method.equal_ranks:
        raise ConfigError(f"the weights sum to 0, so --method {method.name} cannot average the A matrices")
    for key in adapters[0].full_keys:
        first = adapters[0].read(key)
        for ad in adapters[1:]:
            if not torch.equal(first, ad.read(key)):
                raise ConfigError(f"the weights sum to 0, so tensor {key} (modules_to_save / bias), which differs "
                                  f"between {adapters[0].label} and {ad.label}, cannot be averaged")


def make_plan(adapter_dirs: Sequence[str | Path], output: Path, method: str, weights: Sequence[float] | None,
              rank: int | None, seed: int, dtype: str | torch.dtype | None, *, overwrite: bool,
              allow_different_base: bool, density: float | None = None, majority_sign_method: str | None = None,
              serve_rank: int | str | None = None, exact_svd: bool | None = None) -> MergePlan:
    """Read and check everything a merge needs; the adapters stay open (``plan.close()``).

    ``weights``: w_j (default 1/M). ``dtype``: of the written tensors (default: the inputs'
    dtype, float32 when they differ). ``density``, ``majority_sign_method``, ``exact_svd``: for
    the methods that take them (None: the default). ``serve_rank``: ``"auto"`` or N, the cap on every
    module's rank (``serving.serve_cap``).

    Raises:
        ConfigError, AdapterError, OutputError: before anything is written, naming what is wrong.
    """
    spec = get_method(method)
    dirs, skipped = expand_adapter_inputs(adapter_dirs)
    for d, why in skipped:
        logger.info("skipped %s: %s", d, why)
    logger.info("merging %d adapters: %s", len(dirs), ", ".join(map(str, dirs)))
    check_output_not_input(output, dirs)
    check_output_path(output, overwrite)
    check_rank(spec.name, rank)
    params = resolve_parameters(spec.name, density=density, majority_sign_method=majority_sign_method,
                                exact_svd=exact_svd)
    if weights is None:
        weights = [1.0 / len(dirs)] * len(dirs)
    weights = [float(w) for w in weights]
    if len(weights) != len(dirs):
        raise ConfigError(f"got {len(weights)} weights for {len(dirs)} adapters ({', '.join(map(str, dirs))})")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    if spec.positive_weights and not all(w > 0 for w in weights):
        raise ConfigError(f"--method {spec.name} elects a sign per entry over the weighted updates, so every weight "
                          f"must be > 0, got {weights}")
    out_dtype = parse_dtype(dtype)
    adapters: list[Adapter] = []
    try:
        for j, d in enumerate(dirs):
            adapters.append(load_adapter(d, label=f"adapter {j} ({d})"))
        check_compatible(adapters, allow_different_base)
        names = sorted(adapters[0].modules)
        out_ranks = output_ranks(adapters, spec, rank, names)
        if abs(sum(weights)) < 1e-12:
            check_zero_sum(adapters, spec)
    except BaseException:
        for ad in adapters:
            ad.close()
        raise
    if out_dtype is None:  # the inputs' dtype, or float32 when they disagree
        in_dtypes = {ad.tensors.info[m.a_key].dtype for ad in adapters for m in ad.modules.values()}
        out_dtype = in_dtypes.pop() if len(in_dtypes) == 1 else torch.float32
    cap = serve_cap(serve_rank, max(out_ranks.values()))
    capped = {n: min(k, cap) if cap is not None else k for n, k in out_ranks.items()}
    plan = MergePlan(adapters, weights, spec, rank, seed, out_dtype, names, capped, adapters[0].full_keys,
                     [], list(skipped), params, serve_rank, cap, out_ranks)
    return plan


__all__ = ["DTYPES", "MergePlan", "check_compatible", "check_zero_sum", "make_plan", "output_ranks", "parse_dtype"]
