"""A plan checked against a measurement: the same training step, run for real on the CPU.

:func:`measure_step` loads the recipe's real base model (the tiny model, SmolLM2, any model that
fits in RAM), attaches the LoRA as training does (:func:`poc_lora.planning.lora_model`), builds
NoisyAdamW as the trainers do, runs one warm-up optimizer step (so the optimizer state exists,
as in every step after the first), then measures a second step: forward, backward and
optimizer step of one micro-batch of the plan's shape (``per_device_train_batch_size`` x
``cutoff_len`` tokens, no padding). What it reports is torch-allocated memory, not RSS: the bytes
of the storages held before the step (parameters, buffers, optimizer state and noise buffer)
plus the peak increase the CPU allocator saw during it (:func:`poc_lora.memtrace.allocator_peak`).

Example:
    >>> from poc_lora.metatrace import load_recipe
    >>> measure_step(load_recipe("configs/train/tiny_cpu.yaml"), members=1)["total"]  # doctest: +SKIP
    75431936
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .batched_model import MemberOptimizers
from .memtrace import allocator_peak, storage_bytes
from .optim import NoisyAdamW
from .metatrace import Recipe, lora_model
from .train import load_base_model, uses_checkpointing
from .trainer import noisy_adamw_kwargs, noisy_param_groups


def _optimizer(model: Any, recipe: Recipe, members: int) -> Any:
    tr = recipe.cfg.training
    kwargs = noisy_adamw_kwargs(tr, recipe.cfg.poc.temperature, recipe.cfg.noise_seed)
    if members == 1:
        return NoisyAdamW(noisy_param_groups(model, tr.weight_decay), **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]  # member j's: every M-th, as built
    return MemberOptimizers([NoisyAdamW(params[j::members], **kwargs) for j in range(members)],
                            [tr.max_grad_norm or 0.0] * members)


def _held(model: Any, optimizer: Any) -> int:
    """Bytes of the storages a step starts with: parameters, buffers, optimizer state, noise buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    for opt in getattr(optimizer, "members", [optimizer]):
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += list(getattr(opt, "_buffers", {}).values())
    return storage_bytes(tensors)


def measure_step(recipe: Recipe, members: int = 1, data_order: str = "per_member",
                 seed: int = 0) -> dict[str, int]:
    """Measure one training step of ``members`` members (1: one PEFT model, as sequential and
    parallel train; more: batched) on the CPU. Returns bytes: ``held`` (before the step),
    ``step_peak`` (the allocator's peak increase during it) and ``total`` (their sum).

    Runs the step under CPU bf16 autocast when the recipe asks for bf16. Raises what model
    loading raises (:class:`~poc_lora.errors.ConfigError` for a model it cannot load).
    """
    cfg = recipe.cfg
    torch.manual_seed(seed)
    base = load_base_model(cfg)
    model, _, rows = lora_model(recipe, base, members, data_order, uses_checkpointing(cfg))
    optimizer = _optimizer(model, recipe, members)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (rows, cfg.data.cutoff_len), generator=torch.Generator().manual_seed(seed))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if recipe.precision == "bf16" \
        else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state is allocated in the first step
    held = _held(model, optimizer)
    peak = allocator_peak(step)
    return {"held": held, "step_peak": peak, "total": held + peak}


def measure_plan(plan: Any, recipe: Recipe) -> Any:
    """Fill each row's ``measured`` of a :class:`~poc_lora.planning.MemoryPlan` with
    :func:`measure_step` of the same members (one measurement per member count); returns ``plan``.

    Example:
        >>> recipe = load_recipe("configs/train/tiny_cpu.yaml")  # doctest: +SKIP
        >>> measure_plan(plan_recipe(recipe), recipe).rows[0].measured  # doctest: +SKIP
    """
    done: dict[int, int] = {}
    for row in plan.rows:
        if row.members_at_once not in done:
            done[row.members_at_once] = measure_step(recipe, row.members_at_once, plan.data_order)["total"]
        row.measured = done[row.members_at_once]
    return plan


__all__ = ["measure_plan", "measure_step"]
