"""``poc-lora plan``: a training recipe's GPU memory, FLOPs and steps per ensemble strategy, without a GPU.

:func:`plan_recipe` traces the recipe on the meta device (:mod:`poc_lora.metatrace`) and adds
what a GPU holds besides the step:

    GiB per GPU = base weights (stored dtype, or 4/8-bit by formula)
                + LoRA parameters of the members the GPU trains at once
                + NoisyAdamW's state (two moments, a step counter per tensor, one noise chunk
                  per optimizer: :data:`poc_lora.optim.NOISE_CHUNK_NUMEL`)
                + the traced peak of one micro-batch (activations, logits, temporaries, gradients)

A GPU "fits" when that plus :data:`CUDA_RESERVE_GIB` (CUDA context, allocator slack) is within
``gpu_memory``. Strategies (:mod:`poc_lora.ensemble`): ``sequential`` (one GPU, one member at a
time, M runs one after another), ``parallel`` (``gpus`` GPUs, one member each at a time),
``batched`` (one GPU, all M members over one copy of the base). Steps as Trainer counts them,
from the training records (counted when the data are here, else :data:`KNOWN_DATASETS`).
Sizes are GiB (2^30 bytes). :mod:`poc_lora.plancheck` measures the same step on a CPU.

Example:
    >>> plan = plan_recipe("configs/train/llama2_7b_commonsense.yaml", num_adapters=8)  # doctest: +SKIP
    >>> print(plan.markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .architectures import architecture_config
from .config import STRATEGIES, TrainConfig
from .data.suites import SUITES
from .data.synthetic import SYNTHETIC_KINDS
from .errors import ConfigError
from .metatrace import LoraSizes, Recipe, StepTrace, stored_dtype, load_recipe, trace_recipe
from .optim import NOISE_CHUNK_NUMEL
from .train import uses_checkpointing

GIB = 2**30
CUDA_RESERVE_GIB = 1.0  # CUDA context and allocator slack: on the GPU, not in torch's allocated bytes
KNOWN_DATASETS = {"commonsense_170k": 170_420}  # records, for a data file not on this machine


# --------------------------------------------------------------------------- the static bytes
def optimizer_bytes(lora: LoraSizes, cfg: TrainConfig) -> int:
    """NoisyAdamW's state for one member: exp_avg and exp_avg_sq (the parameters' dtype), a
    float32 step per tensor, and one noise chunk (float32) of ``NOISE_CHUNK_NUMEL``."""
    numel = lora.numel
    moments = 2 * lora.bytes
    device = "cpu" if cfg.training.use_cpu else "default"
    chunk = min(NOISE_CHUNK_NUMEL.get(device, NOISE_CHUNK_NUMEL["default"]), numel)
    return moments + 4 * lora.tensors + 4 * chunk


def train_records(cfg: TrainConfig) -> int | None:
    """Training records per epoch (after ``val_set_size``): counted when the data are here or
    synthetic, from :data:`KNOWN_DATASETS` by file name otherwise; None when unknown."""
    from .data.instructions import load_training_records

    data = cfg.data
    path = str(data.data_path)
    if path in SYNTHETIC_KINDS:
        n = data.synthetic_train_per_suite * len(SUITES)
    elif Path(path).exists():
        n = len(load_training_records(data))
    else:
        n = next((v for k, v in KNOWN_DATASETS.items() if k in Path(path).name), None)
        if n is None:
            return None
    return n - data.val_set_size


# --------------------------------------------------------------------------- the plan
@dataclass
class StrategyPlan:
    """One strategy's figures per GPU (bytes; flops per optimizer step of the members a GPU
    trains at once; steps in the order a GPU runs them)."""

    strategy: str
    gpus: int
    members_at_once: int
    weights: int
    lora: int
    optimizer: int
    step: StepTrace
    other_checkpointing: StepTrace | None
    flops_per_step: int
    steps_per_epoch: int | None
    steps_per_member: int | None
    serial_steps: int | None
    fits: bool = False
    total: int = 0
    total_other_checkpointing: int | None = None
    measured: int | None = None  # poc_lora.plancheck: the same step run on the CPU, torch-allocated bytes

    def __post_init__(self) -> None:
        static = self.weights + self.lora + self.optimizer
        self.total = static + self.step.peak
        if self.other_checkpointing is not None:
            self.total_other_checkpointing = static + self.other_checkpointing.peak


@dataclass
class MemoryPlan:
    """The plan of a recipe: per strategy a :class:`StrategyPlan`; :meth:`markdown`, :meth:`to_dict`."""

    config: str
    model: str
    architecture: dict[str, Any]
    num_adapters: int
    data_order: str
    micro_batch: int
    cutoff_len: int
    gradient_accumulation_steps: int
    precision: str
    checkpointing: bool
    gpu_memory_gib: float
    train_records: int | None
    rows: list[StrategyPlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: sizes in GiB (3 decimals), FLOPs as numbers."""
        def gib(x: int | None) -> float | None:
            return None if x is None else round(x / GIB, 3)

        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "rows"}
        out["cuda_reserve_gib"] = CUDA_RESERVE_GIB
        out["strategies"] = [{
            "strategy": r.strategy, "gpus": r.gpus, "members_at_once": r.members_at_once,
            "gib_per_gpu": gib(r.total), "fits": r.fits, "weights_gib": gib(r.weights), "lora_gib": gib(r.lora),
            "optimizer_gib": gib(r.optimizer), "step_peak_gib": gib(r.step.peak),
            "forward_end_gib": gib(r.step.forward_end), "saved_activations_gib": gib(r.step.saved),
            "gib_per_gpu_other_checkpointing": gib(r.total_other_checkpointing),
            "saved_activations_other_checkpointing_gib": gib(r.other_checkpointing.saved
                                                             if r.other_checkpointing else None),
            "flops_per_step": r.flops_per_step, "steps_per_epoch": r.steps_per_epoch,
            "steps_per_member": r.steps_per_member, "serial_steps": r.serial_steps,
            "total_flops": None if r.serial_steps is None else r.flops_per_step * r.serial_steps * r.gpus,
            "measured_gib": gib(r.measured),
        } for r in self.rows]
        return out

    def markdown(self) -> str:
        """The plan as Markdown: what was traced, then one table row per strategy."""
        other = "without" if self.checkpointing else "with"
        measured = any(r.measured for r in self.rows)
        arch = self.architecture
        lines = [f"Plan of {self.config} (model {self.model}: {arch['num_hidden_layers']} layers, hidden "
                 f"{arch['hidden_size']}, vocabulary {arch['vocab_size']}), M = {self.num_adapters}; micro-batch "
                 f"{self.micro_batch} x {self.cutoff_len} tokens, {self.gradient_accumulation_steps} accumulation "
                 f"step(s), {self.precision}, activation checkpointing {'on' if self.checkpointing else 'off'}; "
                 f"{self.train_records if self.train_records is not None else 'unknown'} training records.", "",
                 f"| strategy | GPUs | members at once | GiB per GPU | fits {self.gpu_memory_gib:g} GiB | weights | "
                 f"LoRA + optimizer | step peak | saved activations | GiB {other} checkpointing | "
                 "TFLOP per step | steps per epoch | steps per GPU |" + (" measured GiB |" if measured else ""),
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if measured else "")]
        for r in self.rows:
            def g(x: int | None) -> str:
                return "n/a" if x is None else f"{x / GIB:.3g}"

            lines.append(f"| {r.strategy} | {r.gpus} | {r.members_at_once} | {g(r.total)} | "
                         f"{'yes' if r.fits else 'no'} | {g(r.weights)} | {g(r.lora + r.optimizer)} | {g(r.step.peak)} | "
                         f"{g(r.step.saved)} | {g(r.total_other_checkpointing)} | {r.flops_per_step / 1e12:.4g} | "
                         f"{r.steps_per_epoch if r.steps_per_epoch is not None else 'n/a'} | "
                         f"{r.serial_steps if r.serial_steps is not None else 'n/a'} |"
                         + (f" {g(r.measured)} ({r.total / r.measured - 1:+.1%}) |" if measured and r.measured else
                            " |" if measured else ""))
        lines += ["", f"GiB per GPU = weights + LoRA + NoisyAdamW state + the traced step peak (activations, "
                  f"logits, gradients); fits = that + {CUDA_RESERVE_GIB:g} GiB of CUDA context <= the GPU. "
                  "Saved activations: what autograd keeps outside checkpointed layers. TFLOP per optimizer step "
                  "of the members a GPU trains at once (forward + backward + recomputation), counted by "
                  "torch's FLOP formulas (torch.utils.flop_counter)."]
        return "\n".join(lines)


def _steps(cfg: TrainConfig, records: int | None) -> tuple[int | None, int | None]:
    """(optimizer steps per epoch, steps per member) as Trainer counts them for one process."""
    tr = cfg.training
    per_epoch = None
    if records is not None:
        batches = math.ceil(records / tr.per_device_train_batch_size)
        per_epoch = max(math.ceil(batches / tr.gradient_accumulation_steps), 1)
    if tr.max_steps and tr.max_steps > 0:
        return per_epoch, tr.max_steps
    return per_epoch, None if per_epoch is None else math.ceil(tr.num_train_epochs * per_epoch)


def plan_recipe(config: str | os.PathLike | Recipe, num_adapters: int | None = None,
                strategies: Sequence[str] | None = None, gpus: int | None = None, gpu_memory: float = 80.0,
                data_order: str | None = None, compare_checkpointing: bool = True,
                updates: dict[str, Any] | None = None) -> MemoryPlan:
    """The memory and compute plan of a training or pipeline config, per ensemble strategy.

    Args:
        config: a YAML path (training or pipeline config) or a :class:`Recipe`.
        num_adapters: M (default: the pipeline's, else 8, the paper's).
        strategies: subset of ``sequential``, ``parallel``, ``batched`` (default: all three).
        gpus: GPUs for ``parallel`` (default: M, one member per GPU); the others use one.
        gpu_memory: GiB per GPU that "fits" is judged against.
        data_order: batched members' ``shared`` or ``per_member`` micro-batches (default: the
            pipeline's, else per_member).
        compare_checkpointing: also trace with the recipe's activation checkpointing switched.
        updates: training keys over the config (``{"per_device_train_batch_size": 8}``).

    Raises :class:`ConfigError` for an unreadable config, an architecture it cannot find, or a
    LoRA the architecture cannot take (:func:`check_recipe`).

    Example:
        >>> plan_recipe("configs/train/tiny_cpu.yaml", num_adapters=4, strategies=["batched"]).rows[0].fits  # doctest: +SKIP
        True
    """
    recipe = config if isinstance(config, Recipe) else load_recipe(config, updates)
    cfg = recipe.cfg
    m = num_adapters or recipe.num_adapters
    if m < 1:
        raise ConfigError(f"num_adapters must be >= 1, got {m}")
    order = data_order or recipe.data_order
    chosen = list(strategies or STRATEGIES)
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r}; valid: {', '.join(STRATEGIES)}")
    if gpus is not None and gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    arch = architecture_config(cfg.model.model_name_or_path)
    stored = stored_dtype(cfg, arch)
    ckpt = uses_checkpointing(cfg)
    records = train_records(cfg)
    per_epoch, per_member = _steps(cfg, records)
    accumulation = cfg.training.gradient_accumulation_steps
    plan = MemoryPlan(str(recipe.source), str(cfg.model.model_name_or_path),
                      {k: getattr(arch, k, None) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                           "num_attention_heads", "num_key_value_heads",
                                                           "vocab_size")},
                      m, order, cfg.training.per_device_train_batch_size, cfg.data.cutoff_len, accumulation,
                      recipe.precision or str(stored).replace("torch.", ""), ckpt, gpu_memory, records)
    traces: dict[int, tuple[StepTrace, StepTrace | None, LoraSizes, int]] = {}
    for strategy in chosen:
        members = m if strategy == "batched" else 1
        if members not in traces:
            step, lora, base_bytes = trace_recipe(recipe, members, order, ckpt, arch)
            other = trace_recipe(recipe, members, order, not ckpt, arch)[0] if compare_checkpointing else None
            traces[members] = (step, other, lora, base_bytes)
        step, other, lora, base_bytes = traces[members]
        n_gpus = min(gpus or m, m) if strategy == "parallel" else 1
        serial = None if per_member is None else per_member * (1 if strategy == "batched" else math.ceil(m / n_gpus))
        row = StrategyPlan(strategy, n_gpus, members, base_bytes, lora.bytes * members,
                           optimizer_bytes(lora, cfg) * members, step, other, step.flops * accumulation,
                           per_epoch, per_member, serial)
        row.fits = row.total / GIB + CUDA_RESERVE_GIB <= gpu_memory
        plan.rows.append(row)
    return plan


__all__ = ["CUDA_RESERVE_GIB", "GIB", "KNOWN_DATASETS", "MemoryPlan", "StrategyPlan", "load_recipe", "optimizer_bytes",
           "plan_recipe", "train_records"]
