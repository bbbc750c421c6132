"""The batched ensemble's model and optimizer: M members' LoRAs over one copy of the base.

:class:`BatchedLoraModel` replaces every LoRA target of the base with a
:class:`~poc_lora.multilora.MultiLoraLinear` holding the M members' factors; its forward pass
returns each member's loss on one batch (shared rows through a shared trunk, or the members'
own rows stacked). :func:`member_lora` takes member j's factors from the LoRA ``attach_lora``
creates for it, so the initialisation is the sequential member's. :class:`MemberOptimizers`
presents the M members' NoisyAdamW to Trainer as one optimizer, clipping each member's gradient
on its own. The training loop around them (Trainer, data order, checkpoints) is
:mod:`poc_lora.batched`; ``poc-lora plan`` traces this model on the meta device.

Example:
    >>> from poc_lora.batched_model import BatchedLoraModel, member_lora
    >>> model = BatchedLoraModel(base, [member_lora(base, cfg) for cfg in members], "shared")  # doctest: +SKIP
    >>> model(input_ids, labels=labels).member_losses.shape  # doctest: +SKIP
    torch.Size([4])
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from .config import DATA_ORDERS, TrainConfig
from .errors import ConfigError, OutputError
from .multilora import MultiLoraLinear, SharedTrunk, first_adapted_layer, supervised_lm_loss
from .trainer import noisy_param_groups
from .train import attach_lora, reentrant_checkpointing

logger = logging.getLogger(__name__)

# Model config fields that change logits after the LM head; the loss here assumes plain logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclasses.dataclass
class BatchedOutput(ModelOutput):
    """What :class:`BatchedLoraModel` returns: ``loss`` (the sum over members, for backward) and
    ``member_losses`` (M,)."""

    loss: torch.Tensor | None = None
    member_losses: torch.Tensor | None = None


def check_data_order(data_order: str) -> str:
    """``data_order`` if valid, else ConfigError naming the valid values."""
    if data_order not in DATA_ORDERS:
        raise ConfigError(f"data_order must be one of {', '.join(DATA_ORDERS)}, got {data_order!r}")
    return data_order


@dataclasses.dataclass
class MemberLora:
    """One member's LoRA as ``attach_lora`` created it: per adapted module (name relative to the
    base model), the factor parameters; plus the member's optimizer groups and LoRA settings."""

    factors: "OrderedDict[str, tuple[nn.Parameter, nn.Parameter]]"
    scaling: float
    dropout: float
    groups: list[dict[str, Any]]


def lora_layers(peft_model: Any) -> Iterator[tuple[str, Any]]:
    """(name relative to the base model, PEFT LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def member_lora(base: nn.Module, cfg: TrainConfig) -> MemberLora:
    """Attach member ``cfg``'s LoRA as a sequential run would (same seed, same init), take its
    factor tensors and optimizer groups, then remove the LoRA again (the base stays clean)."""
    peft_model = attach_lora(base, cfg)
    factors: OrderedDict[str, tuple[nn.Parameter, nn.Parameter]] = OrderedDict()
    scaling = dropout = None
    try:
        for name, layer in lora_layers(peft_model):
            if "default" in getattr(layer, "lora_variant", {}) or getattr(layer, "fan_in_fan_out", False) \
                    or not isinstance(layer.lora_A["default"], nn.Linear) or layer.lora_bias.get("default", False):
                raise ConfigError(f"--strategy batched supports plain LoRA on linear layers; {name!r} is "
                                  f"{type(layer).__name__} (DoRA, embeddings, fan_in_fan_out or lora_bias): use "
                                  "--strategy sequential")
            factors[name] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
            scaling, p = layer.scaling["default"], layer.lora_dropout["default"]
            dropout = p.p if isinstance(p, nn.Dropout) else 0.0
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        if any("lora_" not in n for n in trainable):
            raise ConfigError(f"--strategy batched trains LoRA factors only, but lora_bias={cfg.lora.lora_bias!r} "
                              "also trains the base model's biases, which the members would share; use --strategy "
                              "sequential or lora_bias none")
        groups = noisy_param_groups(peft_model, cfg.training.weight_decay)
    finally:
        peft_model.unload()  # the factor tensors stay alive in `factors` and `groups`
    return MemberLora(factors, float(scaling), float(dropout), groups)


class BatchedLoraModel(nn.Module):
    """A causal LM whose adapted linear layers hold the M members' LoRAs; forward returns each
    member's loss (see the module docstring).

    Args:
        base: the causal LM (a transformers ``PreTrainedModel`` with ``base_model`` and
            ``get_output_embeddings()``), frozen.
        members: the members' LoRAs (:func:`member_lora`).
        data_order: ``shared`` (a batch of b rows read by every member; trunk shared) or
            ``per_member`` (in training, batches of M * b rows, member m's at [m * b, (m + 1) * b)).
    """

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch and does not rescale the loss

    def __init__(self, base: nn.Module, members: Sequence[MemberLora], data_order: str) -> None:
        super().__init__()
        config = getattr(base, "config", None)
        for key in _LOGIT_TRANSFORMS:
            if getattr(config, key, None) not in (None, 1, 1.0):
                raise ConfigError(f"--strategy batched computes the loss from the LM head's logits, but the model "
                                  f"config sets {key}={getattr(config, key)!r}; use --strategy sequential")
        self.base = base
        self.num_members = len(members)
        self.data_order = check_data_order(data_order)
        names = list(members[0].factors)
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = base.get_submodule(parent) if parent else base
            setattr(owner, child, MultiLoraLinear(
                getattr(owner, child), [m.factors[name][0] for m in members], [m.factors[name][1] for m in members],
                scaling=[m.scaling for m in members], dropout=members[0].dropout))
        self.adapted = names
        split = first_adapted_layer(names)
        self.trunk = None
        if split is not None and self.num_members > 1:  # per_member: used for the shared evaluation batches
            self.trunk = SharedTrunk(base.get_submodule(split[0]), split[1], self.num_members)
            logger.info("members share the trunk below %s.%d%s", *split,
                        " (evaluation only: per_member training batches differ)" if data_order == "per_member" else "")

    def restore_base(self) -> nn.Module:
        """Put the plain base layers back (the members' factors are dropped); returns the base."""
        if self.trunk is not None:
            self.trunk.remove()
        for name in self.adapted:
            parent, _, child = name.rpartition(".")
            owner = self.base.get_submodule(parent) if parent else self.base
            setattr(owner, child, getattr(owner, child).base_layer)
        return self.base

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        **kwargs: Any) -> None:
        """Trainer's ``activation_checkpointing``: the base model's own (per decoder layer; the
        trunk hooks run inside each checkpointed layer, so its recomputation tiles the same way).

        transformers also makes the embeddings' output require grad, which only torch's
        reentrant checkpointing needs; with the default (non-reentrant) that hook is removed
        again, so the frozen trunk stays out of the backward pass (see
        :func:`poc_lora.train.reentrant_checkpointing`).
        """
        self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                  **kwargs)
        if not reentrant_checkpointing(activation_checkpointing_kwargs):
            self.base.disable_input_require_grads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | int | None = None,
                **kwargs: Any) -> BatchedOutput:
        """Members' losses on a batch: (b, T) shared, or (M * b, T) stacked in per_member training."""
        m = self.num_members
        inner, head = self.base.base_model, self.base.get_output_embeddings()
        stacked = self.data_order == "per_member" and self.training
        if stacked or self.trunk is None:  # stacked: member m's own rows at [m * b, (m + 1) * b)
            if not stacked:  # no trunk to share (an adapted embedding, say): every member reads the batch
                input_ids = input_ids.repeat(m, 1)
                attention_mask = None if attention_mask is None else attention_mask.repeat(m, 1)
            hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            with self.trunk.share(input_ids.shape[0]):
                hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if labels is None:
            return BatchedOutput()
        losses = supervised_lm_loss(hidden, labels, head, m, num_items_in_batch)
        return BatchedOutput(loss=losses.sum(), member_losses=losses)


class MemberOptimizers(torch.optim.Optimizer):
    """M optimizers, one per ensemble member, presented to Trainer as one.

    ``param_groups`` is the concatenation of the members' group dicts (the same objects, also
    after ``load_state_dict``, which gives the members new ones), so an LR scheduler built on
    this optimizer sets every member's learning rate (each from its own ``initial_lr``).
    ``step()`` clips each member's gradient to its own ``max_grad_norms[j]``
    (0: no clipping), then steps each member. ``state_dict()`` is ``{"members": [...]}`` of the
    members' own state dicts (plain tensors and ints: ``torch.load(weights_only=True)`` reads it).

    Example:
        >>> opt = MemberOptimizers([NoisyAdamW(g0, seed=0), NoisyAdamW(g1, seed=1)], [1.0, 1.0])  # doctest: +SKIP
    """

    def __init__(self, members: Sequence[torch.optim.Optimizer], max_grad_norms: Sequence[float]) -> None:
        self.members = list(members)
        self.max_grad_norms = [float(x) for x in max_grad_norms]
        groups = [g for opt in self.members for g in opt.param_groups]
        super().__init__(groups, dict(self.members[0].defaults))
        if any(a is not b for a, b in zip(self.param_groups, groups)):  # the scheduler must reach the members
            raise RuntimeError("MemberOptimizers: torch copied the members' param groups")
        self.last_grad_norms: list[float | None] = [None] * len(self.members)

    def member_params(self, j: int) -> list[torch.Tensor]:
        """Member ``j``'s parameters in its optimizer's order."""
        return [p for g in self.members[j].param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Clip each member's gradient to its own norm, then step each member's optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for j, (opt, max_norm) in enumerate(zip(self.members, self.max_grad_norms)):
            if max_norm > 0:
                params = [p for p in self.member_params(j) if p.grad is not None]
                self.last_grad_norms[j] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"members": [opt.state_dict() for opt in self.members]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        states = state_dict.get("members")
        if not isinstance(states, list) or len(states) != len(self.members):
            raise OutputError(f"the optimizer state holds {len(states) if isinstance(states, list) else 'no'} "
                              f"members' states, this run has {len(self.members)}")
        for opt, sd in zip(self.members, states):
            opt.load_state_dict(sd)
        # torch's load_state_dict gives each member new group dicts; the scheduler must reach those
        self.param_groups = [g for opt in self.members for g in opt.param_groups]


__all__ = ["BatchedLoraModel", "BatchedOutput", "MemberLora", "MemberOptimizers", "check_data_order", "lora_layers",
           "member_lora"]
