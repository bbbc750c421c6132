"""Writing a merge: the merged adapter, ``merge_report.json``, the prompt-template record and
the model card, all into the temporary directory of an atomic output (:mod:`poc_lora.outputs`).

The merged adapter is written tensor by tensor as each module is merged
(:class:`~poc_lora.safetensors_io.SafetensorsStreamWriter`), with the first input's
``adapter_config.json`` set to scale 1: every module is written with the same rank R (modules
of a smaller output rank padded with zero neurons, which adds nothing to ``B @ A``),
``r = lora_alpha = R``, no ``rank_pattern`` / ``alpha_pattern``, no rsLoRA. PEFT, vLLM
(``lora_alpha / r``) and llama.cpp's converter (``lora_alpha`` over each tensor's rank) then
all apply exactly the written ``B @ A`` (:mod:`.serving`).

Example:
    >>> with atomic_output_dir(out, overwrite=False) as tmp:  # doctest: +SKIP
    ...     per_module = write_adapter(plan, tmp, ModuleMerger(plan))
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import CONFIG_NAME, MERGE_REPORT_NAME, SAFETENSORS_NAME
from ..cards import write_merge_card
from ..data.templates import TEMPLATE_RECORD_FILE
from ..outputs import write_json
from ..safetensors_io import SafetensorsStreamWriter
from .compute import ModuleMerger, merged_full_tensor
from .methods import get_method
from .plan import MergePlan
from .stats import MergeReport, ModuleStats

logger = logging.getLogger(__name__)

REPORT_NAME = MERGE_REPORT_NAME


def adapter_config(plan: MergePlan) -> dict[str, Any]:
    """The first input's config with scale 1 in every module: r = lora_alpha = the written rank,
    no per-module patterns (vLLM and llama.cpp's converter read only the global values)."""
    cfg = dict(plan.adapters[0].config)
    r = plan.written_rank
    # init_lora_weights=True: the output is a plain LoRA, whatever (allowlisted) init the inputs had;
    # PEFT would otherwise re-run e.g. "orthogonal" (which needs an even rank) when loading it
    cfg.update(r=r, lora_alpha=r, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
               init_lora_weights=True, lora_bias=plan.has_lora_bias, inference_mode=True, velora_config=None)
    return cfg


def pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (k, ...) and ``b`` (out, k, ...) padded with zero neurons to rank ``r`` >= k: the
    product ``b @ a`` is unchanged (exactly: the added terms are 0 x 0)."""
    k = a.shape[0]
    if k == r:
        return a, b
    a_pad = torch.cat([a, a.new_zeros(r - k, *a.shape[1:])], 0)
    b_pad = torch.cat([b, b.new_zeros(b.shape[0], r - k, *b.shape[2:])], 1)
    return a_pad, b_pad


def template_record(plan: MergePlan) -> dict[str, Any] | None:
    """The inputs' prompt-template record (the first one, with a warning when they differ)."""
    records = [ad.template_record for ad in plan.adapters]
    present = [r for r in records if r is not None]
    if not present:
        return None
    if len(present) != len(records) or any(r != present[0] for r in present):
        msg = "the inputs' prompt-template records differ (or some have none); the first one was copied"
        plan.warnings.append(msg)
        logger.warning(msg)
    return present[0]


def _adapter_specs(plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    first = plan.adapters[0]
    specs = []
    k = plan.written_rank
    for name in plan.module_names:
        m = first.modules[name]
        specs.append((m.peft_key("A"), plan.out_dtype, (k, *m.a_shape[1:])))
        specs.append((m.peft_key("B"), plan.out_dtype, (m.b_shape[0], k, *m.b_shape[2:])))
        if any(ad.modules[name].bias_key for ad in plan.adapters):
            specs.append((m.peft_key("bias"), plan.out_dtype, (m.b_shape[0],)))
    for key in plan.full_keys:  # already in PEFT's layout
        info = first.info(key)
        specs.append((key, plan.out_dtype if info.dtype.is_floating_point else info.dtype, info.shape))
    return specs


def write_adapter(plan: MergePlan, tmp: Path, merger: ModuleMerger) -> dict[str, ModuleStats]:
    """Write the merged adapter (weights + config) into ``tmp``; returns each module's statistics."""
    specs = _adapter_specs(plan)
    per_module: dict[str, ModuleStats] = {}
    with SafetensorsStreamWriter(tmp / SAFETENSORS_NAME, specs, {"format": "pt"}, background=True) as writer:
        for name in tqdm(plan.module_names, desc=f"merge ({plan.method.name})", unit="module"):
            res = merger.merge(name)
            m = plan.adapters[0].modules[name]
            a, b = pad_rank(res.a, res.b, plan.written_rank)
            writer.write(m.peft_key("A"), a.to(plan.out_dtype))
            writer.write(m.peft_key("B"), b.to(plan.out_dtype))
            if res.bias is not None:
                writer.write(m.peft_key("bias"), res.bias.to(plan.out_dtype))
            per_module[name] = res.stats
        for key, dtype, _ in specs[len(specs) - len(plan.full_keys):]:
            writer.write(key, merged_full_tensor(plan, key).to(dtype))
    write_json(tmp / CONFIG_NAME, adapter_config(plan))
    return per_module


def write_records(tmp: Path, report: MergeReport) -> None:
    """``merge_report.json`` and the README.md model card, into ``tmp``."""
    write_json(tmp / REPORT_NAME, report.to_dict())
    write_merge_card(tmp, report, get_method(report.method))  # README.md model card, inside the atomic output


def write_template_record(plan: MergePlan, tmp: Path) -> None:
    """Copy the inputs' prompt-template record (``poc_lora_template.json``) when they have one."""
    record = template_record(plan)
    if record is not None:
        write_json(tmp / TEMPLATE_RECORD_FILE, record)


__all__ = ["REPORT_NAME", "adapter_config", "pad_rank", "template_record", "write_adapter", "write_records",
           "write_template_record"]
