"""``merge_adapters``: plan -> method (module by module) -> writer, in one atomic output.

Example:
    >>> from poc_lora import merge_adapters
    >>> report = merge_adapters(["runs/a0", "runs/a1"], "runs/merged")  # doctest: +SKIP
    >>> report.overall.spread  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from ..adapters import sha256_file
from ..errors import ConfigError
from ..outputs import atomic_output_dir
from ..runtime import torch_threads
from .base import BaseMerge
from .compute import ModuleMerger
from .plan import make_plan, parse_dtype
from .serving import full_tensor_note, parse_serve_rank, too_big_warning, vllm_max_lora_rank
from .stats import MergeReport, MergeStats
from .writer import write_adapter, write_records, write_template_record

logger = logging.getLogger(__name__)

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
    density: float | None = None,
    majority_sign_method: str | None = None,
    serve_rank: int | str | None = None,
    exact_svd: bool | None = None,
) -> MergeReport:
    """Merge PEFT LoRA adapters into one adapter (or, with ``merge_into_base``, one model).

    ``adapters``: adapter directories, or one directory holding several. ``method``: a name in
    the registry (:func:`poc_lora.merge.methods.method_names`; ``poc``, the paper's exact merge,
    by default). ``weights``: w_j (default 1/M; negative allowed). ``rank``: K for the methods
    that need one (svd, prune, ties, dare_*). ``seed``: for the methods that draw (prune,
    dare_*). ``dtype``: of the written tensors. ``density`` (default 0.5) and
    ``majority_sign_method`` (``"total"`` or ``"frequency"``): for the methods that take them
    (ties, dare_*). ``serve_rank``: ``"auto"`` or N, truncate every module by SVD to the largest
    vLLM ``--max-lora-rank`` value <= N (auto: the smallest >= the merged rank, at most 512).
    ``exact_svd``: ties/dare_* factorise the full update by a full SVD (the earlier, exact and
    slow path) instead of the seeded randomized one (None/False: randomized; True for another
    method is refused). The written adapter has one rank and scale 1 in every module; the report records the vLLM
    ``--max-lora-rank`` it needs. Everything is validated before the output is created; the
    output is built in a temporary sibling and renamed at the end, so a failure leaves nothing
    behind.

    Raises:
        ConfigError, AdapterError, OutputError: naming the adapter, module, key or field.

    Example:
        >>> rep = merge_adapters(["a0", "a1", "a2"], "merged", method="svd", rank=32)  # doctest: +SKIP
        >>> print(rep.summary())  # doctest: +SKIP
    """
    if isinstance(adapters, (str, Path)):
        adapters = [adapters]
    output = Path(output)
    if merge_into_base and base_model is None:
        raise ConfigError("--merge-into-base needs --base-model PATH_OR_ID")
    serve_rank = parse_serve_rank(serve_rank)
    if merge_into_base and serve_rank is not None:
        raise ConfigError("--serve_rank applies to a merged adapter; --merge_into_base writes a full model")
    plan = make_plan(adapters, output, method, weights, rank, seed, dtype, overwrite=overwrite,
                     allow_different_base=allow_different_base, density=density,
                     majority_sign_method=majority_sign_method, serve_rank=serve_rank,
                     exact_svd=exact_svd or None)
    written_rank = None if merge_into_base else plan.written_rank
    vllm_rank = None if written_rank is None else vllm_max_lora_rank(written_rank)
    if written_rank is not None and vllm_rank is None:
        plan.warnings.append(too_big_warning(written_rank))
        logger.warning("%s", plan.warnings[-1])
    if base_model is not None and not merge_into_base:
        plan.warnings.append("base_model is only used with merge_into_base; it was ignored")
    base = None
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        if merge_into_base:
            base = BaseMerge(plan, base_model, parse_dtype(dtype))
        # hashing reads every input once more; a thread overlaps it with the merge
        hashes = [pool.submit(sha256_file, ad.weight_file) for ad in plan.adapters]
        merger = ModuleMerger(plan)
        with atomic_output_dir(output, overwrite) as tmp, torch_threads(1):
            per_module = base.write(tmp, merger) if base is not None else write_adapter(plan, tmp, merger)
            overall = MergeStats.total(list(per_module.values()), len(plan.adapters))
            write_template_record(plan, tmp)
            report = MergeReport(
                output=str(output), method=plan.method.name, weights=plan.weights,
                inputs=[{"path": str(ad.path), "weight_file": ad.weight_file.name, "sha256": h.result(),
                         "r": ad.config.get("r"), "lora_alpha": ad.config.get("lora_alpha"),
                         "use_rslora": bool(ad.config.get("use_rslora", False)),
                         "base_model_name_or_path": ad.config.get("base_model_name_or_path")}
                        for ad, h in zip(plan.adapters, hashes)],
                rank=rank, seed=seed, dtype=str(base.out_dtype if base else plan.out_dtype).replace("torch.", ""),
                merge_into_base=merge_into_base, base_model=str(base_model) if base_model else None,
                output_ranks=dict(plan.out_ranks), modules=per_module,
                overall=overall, warnings=plan.warnings,
                # a merged model holds the full tensors in its weights; an adapter beside its LoRA factors
                notes=base.notes if base is not None else [n for n in [full_tensor_note(plan.full_keys)] if n],
                skipped_inputs=[{"path": str(p), "reason": why} for p, why in plan.skipped],
                params=dict(plan.params), serve_rank=serve_rank, written_rank=written_rank,
                vllm_max_lora_rank=vllm_rank, full_tensors=[] if merge_into_base else list(plan.full_keys),
            )
            write_records(tmp, report)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on failure: do not hash what is left
        plan.close()
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
        density=args.density, majority_sign_method=args.majority_sign_method,
        serve_rank=args.serve_rank, exact_svd=args.exact_svd,
    )
    print(report.summary())
    return 0


__all__ = ["main_merge", "merge_adapters"]
