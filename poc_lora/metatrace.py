"""A training recipe traced at its real shape on the meta device: the step's bytes and FLOPs, no GPU.

The tracing half of ``poc-lora plan`` (:mod:`poc_lora.planning` turns it into a plan). For a
training or pipeline config (:func:`load_recipe`) and without weights:

1. the base model is built on the ``meta`` device from its architecture (:func:`meta_base`;
   :func:`poc_lora.architectures.architecture_config`: built-in Llama-2-7B / Llama-3-8B cards,
   the embedded models, any local ``config.json``), in the dtype the step computes in (the
   mixed-precision dtype, as autocast computes);
2. what training would trip over later is refused (:func:`check_recipe`): a target module the
   architecture lacks, ``lora_r`` above a module's smaller dimension, layers out of range;
3. the LoRA is attached exactly as training does (:func:`poc_lora.train.attach_lora`, so the
   ``LoraConfig`` of :func:`poc_lora.train.lora_config`; batched: the members of
   :mod:`poc_lora.batched` in a :class:`~poc_lora.batched.BatchedLoraModel`) and the recipe's
   activation checkpointing enabled the way Trainer does (:func:`lora_model`);
4. one micro-batch (``per_device_train_batch_size`` x ``cutoff_len`` tokens, no padding, every
   position supervised) runs forward and backward (:func:`trace_step`) under a
   :class:`~poc_lora.memtrace.StorageTracker` (live and peak bytes of every tensor created, FLOPs
   by torch's formulas) and :func:`~poc_lora.memtrace.saved_tensor_bytes`; the loss is kept and
   the logits dropped before the backward pass, as Trainer does. Meta tensors do no arithmetic.
   Attention is traced as the fused kernel (``_scaled_dot_product_flash_attention_for_cpu``,
   which saves only its output and log-sum-exp, as the GPU kernels do) rather than the math
   path meta would otherwise take. Identical layers are traced at depths 2 and 3 and
   extrapolated (:func:`trace_recipe`), so Llama-2-7B takes seconds.

The base's bytes (:func:`weight_bytes`): the stored dtype, or 4-bit NF4 by formula (half a byte
per weight, one 8-bit absmax per 64 weights and one float32 per 256 absmax blocks with double
quantisation; the other parameters upcast to float32 as ``prepare_model_for_kbit_training`` does).
Float32 weights under 16-bit autocast add the 16-bit copies the backward pass keeps.

Example:
    >>> recipe = load_recipe("configs/train/llama2_7b_commonsense.yaml")  # doctest: +SKIP
    >>> trace, lora, weights = trace_recipe(recipe, 1, "per_member", True,
    ...                                     architecture_config("meta-llama/Llama-2-7b-hf"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import architecture_config
from .batched_model import BatchedLoraModel, member_lora
from .config import TrainConfig, load_config, train_key_parser
from .keyparser import read_yaml
from .ensemble import member_configs
from .errors import ConfigError
from .memtrace import StorageTracker, saved_tensor_bytes
from .models import torch_dtype
from .runtime import resolve_bf16
from .train import attach_lora, checkpointing_kwargs
PAPER_NUM_ADAPTERS = 8  # M in arXiv:2502.05784's Llama experiments
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256


@dataclass
class Recipe:
    """A training config as a plan reads it: the ``TrainConfig``, the ensemble's M, strategy
    and data order (a pipeline config's, else defaults), and the mixed precision asked for
    (``"bf16"``, ``"fp16"`` or None)."""

    cfg: TrainConfig
    source: str
    num_adapters: int
    strategy: str | None
    data_order: str
    precision: str | None


def load_recipe(config: str | os.PathLike, updates: dict[str, Any] | None = None) -> Recipe:
    """Read a training YAML or a pipeline YAML (its ``train_config``) with training-key ``updates``.

    The config is loaded with ``bf16``/``fp16`` off (``TrainingArguments`` refuses them on a
    machine without a GPU) and the precision the recipe asks for is kept aside: ``bf16: auto``
    means bf16 on a GPU recipe and what this CPU computes natively on a ``use_cpu`` one.
    Raises :class:`ConfigError` as :func:`poc_lora.config.load_config` does.
    """
    from .pipeline import PipelineConfig

    raw = read_yaml(config)
    updates = dict(updates or {})
    num_adapters, strategy, data_order = PAPER_NUM_ADAPTERS, None, "per_member"
    train_path: str | os.PathLike = config
    if "pipeline" in raw or "train_config" in raw:
        pipe = PipelineConfig.from_yaml(config)
        train_path, updates = pipe.pipeline.train_config, {**pipe.train_updates, **updates}
        num_adapters, strategy, data_order = (pipe.pipeline.num_adapters, pipe.pipeline.strategy,
                                              pipe.pipeline.data_order)
    keys = train_key_parser()
    asked = {k.rpartition(".")[2]: v for k, v in {**keys.flatten(read_yaml(train_path), str(train_path)),
                                                  **keys.flatten(updates, "the updates")}.items()}
    cfg = load_config(train_path, updates={**updates, "training.bf16": False, "training.fp16": False})
    precision = None
    if str(asked.get("fp16", False)).lower() in ("true", "1", "yes"):
        precision = "fp16"
    bf16 = asked.get("bf16", False)
    bf16 = (resolve_bf16("auto", use_cpu=True) if cfg.training.use_cpu else True) \
        if str(bf16).lower() == "auto" else str(bf16).lower() in ("true", "1", "yes")
    if bf16:
        precision = "bf16"
    return Recipe(cfg, str(config), num_adapters, strategy, data_order, precision)


# --------------------------------------------------------------------------- the model
def stored_dtype(cfg: TrainConfig, arch: Any) -> torch.dtype:
    """The dtype the base's weights are stored in: the config's ``dtype``, for ``auto`` the
    architecture's own (``config.json``'s), else float32."""
    dtype = torch_dtype(cfg.model.dtype)
    if dtype == "auto":
        dtype = getattr(arch, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype


def trace_dtype(recipe: Recipe, arch: Any) -> torch.dtype:
    """The dtype the step computes in: the mixed-precision dtype if any, else the stored one."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision or "", stored_dtype(recipe.cfg, arch))


def meta_base(cfg: TrainConfig, dtype: torch.dtype, arch: Any = None) -> nn.Module:
    """The base causal LM on the meta device (no memory, no weights), ``use_cache`` off."""
    from transformers import AutoModelForCausalLM

    arch = arch if arch is not None else architecture_config(cfg.model.model_name_or_path)
    arch.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def check_recipe(model: nn.Module, cfg: TrainConfig, num_layers: int | None = None) -> None:
    """Refuse a LoRA that training would fail on or silently misapply: a ``lora_target_modules``
    name no module of the model ends with, ``lora_layers_to_transform`` beyond the model's
    layers, or ``lora_r`` larger than the smaller dimension of a targeted linear layer.

    Raises :class:`ConfigError` naming the key, the value and what the architecture has.

    Example:
        >>> check_recipe(meta_base(cfg, torch.bfloat16), cfg)  # doctest: +SKIP
    """
    name = cfg.model.model_name_or_path
    lo = cfg.lora
    modules = dict(model.named_modules())
    linear = sorted({n.rpartition(".")[2] for n, m in modules.items() if isinstance(m, nn.Linear)})
    for target in lo.lora_target_modules:
        if target != "all-linear" and not any(n == target or n.endswith("." + target) for n in modules):
            raise ConfigError(f"lora_target_modules: {name} has no module named {target!r}; its linear layers "
                              f"are {', '.join(linear)}")
    layers = num_layers or getattr(model.config, "num_hidden_layers", None)
    wanted = lo.lora_layers_to_transform or []
    if layers is not None and any(i >= layers for i in wanted):
        raise ConfigError(f"lora_layers_to_transform: layer(s) {[i for i in wanted if i >= layers]} out of range; "
                          f"{name} has {layers} layers (0-{layers - 1})")
    for path, module in modules.items():
        if isinstance(module, nn.Linear) and path.rpartition(".")[2] in lo.lora_target_modules:
            if lo.lora_r > min(module.in_features, module.out_features):
                raise ConfigError(f"lora_r {lo.lora_r} is larger than the smaller dimension of {path} "
                                  f"({module.in_features} -> {module.out_features}) in {name}")


def _attachable(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with a model name that :func:`attach_lora` records as it is (an embedded or GGUF
    id would be converted into the cache just to be written into an adapter config)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_name_or_path="meta-plan"))


def lora_model(recipe: Recipe, base: nn.Module, members: int, data_order: str, checkpointing: bool,
               num_layers: int | None = None) -> tuple[nn.Module, list[nn.Parameter], int]:
    """The model one process trains on ``base`` (a PEFT model, or ``members`` > 1 batched), its
    trainable parameters, and the rows of one micro-batch; checkpointing enabled as Trainer does.
    ``num_layers``: the architecture's depth when ``base`` is a shallower copy (see :func:`trace_recipe`).
    """
    cfg = recipe.cfg
    check_recipe(base, cfg, num_layers)
    kwargs = checkpointing_kwargs(cfg) or None
    rows = cfg.training.per_device_train_batch_size
    if members == 1:
        model = attach_lora(base, _attachable(cfg))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        configs = [_attachable(m) for m in member_configs(cfg, members, data_order)]
        model = BatchedLoraModel(base, [member_lora(base, m) for m in configs], data_order)
        model.to(base.device)  # the members' scaling buffers are made on the CPU
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        rows *= members if data_order == "per_member" else 1
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], rows


@contextlib.contextmanager
def _fused_attention_on_meta() -> Iterator[None]:
    """Trace ``scaled_dot_product_attention`` on meta tensors as the fused kernel (see the module
    docstring); other devices, and calls with an explicit mask, are left to torch."""
    original = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        if query.device.type != "meta" or attn_mask is not None:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernel takes equal heads
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class StepTrace:
    """One micro-batch forward + backward, traced: ``peak`` and ``forward_end`` (bytes live above
    the parameters: at the step's peak, after the forward), ``saved`` (bytes autograd saved,
    unique storages), ``flops`` (forward + backward, recomputation included)."""

    peak: int
    forward_end: int
    saved: int
    flops: int


def trace_step(recipe: Recipe, members: int, data_order: str, checkpointing: bool,
               arch: Any = None, num_layers: int | None = None) -> tuple[StepTrace, list[nn.Parameter]]:
    """Trace one micro-batch of ``members`` members (1: a PEFT model; more: batched) on meta.

    Returns the trace and the LoRA parameters (as attached: their dtype is the stored one).
    """
    cfg = recipe.cfg
    arch = arch if arch is not None else architecture_config(cfg.model.model_name_or_path)
    dtype = trace_dtype(recipe, arch)
    model, trainable, rows = lora_model(recipe, meta_base(cfg, dtype, arch), members, data_order, checkpointing,
                                        num_layers)
    stored = [torch.empty_like(p) for p in trainable]  # their stored dtype (float32), before the cast
    for p in trainable:  # under autocast the LoRA products run in the autocast dtype
        p.data = p.data.to(dtype)
    existing = [*model.parameters(), *model.buffers()]
    ids = torch.zeros(rows, cfg.data.cutoff_len, dtype=torch.long, device="meta")
    with _fused_attention_on_meta(), StorageTracker(existing) as tracker:
        with saved_tensor_bytes(exclude=existing) as saved:
            loss = model(input_ids=ids, labels=ids).loss  # the logits are dropped, as Trainer drops them
        forward_end = tracker.live
        loss.backward()
        del loss
    grads_stored = sum(p.numel() * p.element_size() for p in stored)
    grads_traced = sum(p.numel() * p.element_size() for p in trainable)
    # Autocast over float32 weights computes with 16-bit copies of them, and the matrix products
    # keep the copies of the weights the backward pass goes through (the trace's weights are
    # already 16-bit, so it saves the weights themselves, which cost nothing extra).
    copies = saved["excluded"] if dtype != stored_dtype(cfg, arch) else 0
    trace = StepTrace(tracker.peak + grads_stored - grads_traced + copies, forward_end + copies,
                      saved["bytes"] + copies, tracker.flops)
    return trace, stored


@dataclass
class LoraSizes:
    """One member's LoRA: elements, bytes (stored dtype) and tensors."""

    numel: int
    bytes: int
    tensors: int


def _at_depth(arch: Any, layers: int) -> Any:
    """A copy of ``arch`` with ``layers`` decoder layers (per-layer lists cut to match)."""
    shallow = copy.deepcopy(arch)
    shallow.num_hidden_layers = layers
    if isinstance(getattr(shallow, "layer_types", None), list):
        shallow.layer_types = shallow.layer_types[:layers]
    return shallow


def trace_recipe(recipe: Recipe, members: int, data_order: str, checkpointing: bool,
                 arch: Any) -> tuple[StepTrace, LoraSizes, int]:
    """The step trace, one member's LoRA sizes and the base's weight bytes (stored dtype) at
    the architecture's full depth L.

    When every layer is adapted alike (no ``lora_layers_to_transform``) the decoder layers are
    identical, so bytes and FLOPs are affine in L: they are traced at depths 2 and 3 and
    extrapolated, value(L) = v2 + (v3 - v2)(L - 2) (tests check it against a direct trace).
    Otherwise the full depth is traced.
    """
    cfg, full = recipe.cfg, arch.num_hidden_layers
    stored = stored_dtype(cfg, arch)

    def at(depth_arch: Any) -> tuple[StepTrace, LoraSizes, int]:
        trace, lora = trace_step(recipe, members, data_order, checkpointing, depth_arch, full)
        sizes = LoraSizes(sum(p.numel() for p in lora) // members,
                          sum(p.numel() * p.element_size() for p in lora) // members, len(lora) // members)
        return trace, sizes, weight_bytes(meta_base(cfg, stored, depth_arch), cfg, stored)

    if cfg.lora.lora_layers_to_transform is not None or full <= 3:
        return at(arch)
    (t2, l2, w2), (t3, l3, w3) = at(_at_depth(arch, 2)), at(_at_depth(arch, 3))

    def ex(a: int, b: int) -> int:
        return a + (b - a) * (full - 2)

    trace = StepTrace(*(ex(getattr(t2, f.name), getattr(t3, f.name)) for f in dataclasses.fields(StepTrace)))
    lora = LoraSizes(*(ex(getattr(l2, f.name), getattr(l3, f.name)) for f in dataclasses.fields(LoraSizes)))
    return trace, lora, ex(w2, w3)


# --------------------------------------------------------------------------- the static bytes
def weight_bytes(base: nn.Module, cfg: TrainConfig, stored: torch.dtype) -> int:
    """Bytes of the frozen base on the GPU: ``stored`` dtype, or 4/8-bit by formula (module docstring).

    bitsandbytes quantises every linear layer but the output head; the other parameters are
    then upcast to float32 by ``prepare_model_for_kbit_training``.
    """
    quantized = cfg.model.load_in_4bit or cfg.model.load_in_8bit
    head = base.get_output_embeddings()
    total = 0
    seen: set[int] = set()
    for module in base.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings
                continue
            seen.add(id(p))
            n = p.numel()
            if quantized and isinstance(module, nn.Linear) and module is not head and p is module.weight:
                if cfg.model.load_in_8bit:
                    total += n + 4 * module.out_features  # int8 + a float32 scale per row
                else:
                    blocks = math.ceil(n / NF4_BLOCK)
                    nested = cfg.model.bnb_4bit_use_double_quant
                    total += math.ceil(n / 2) + blocks * (1 if nested else 4) \
                        + (4 * math.ceil(blocks / NF4_NESTED_BLOCK) if nested else 0)
            else:
                total += n * (4 if quantized else torch.empty((), dtype=stored).element_size())
    return total


__all__ = ["LoraSizes", "PAPER_NUM_ADAPTERS", "Recipe", "StepTrace", "check_recipe", "load_recipe", "lora_model",
           "meta_base", "stored_dtype", "trace_dtype", "trace_recipe", "trace_step", "weight_bytes"]
