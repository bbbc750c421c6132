"""Many models of one base in one forward pass: the base, M adapters and K merges, scored together.

:func:`build_multi_model` reads each model's LoRA factors from its adapter directory (the safe
readers of :mod:`poc_lora.adapters`: the same rank, alpha, rsLoRA, ``rank_pattern`` /
``alpha_pattern`` resolution as the merge) and replaces every adapted linear layer of the loaded
base by a :class:`~poc_lora.multilora.MultiLoraLinear` holding one member per model. The plain
base is the all-zero member, and so is every module an adapter does not adapt (adapters may
target different layers and have different ranks: the merge of M rank-r adapters has rank M r).

The layers below the first adapted layer of *all* models are the same for every model, so they
run once on a batch of b rows; from that layer on, the rows are tiled once per model
(:class:`~poc_lora.multilora.SharedTrunk`) and the models' LoRA updates are one batched matrix
product. Scoring (:mod:`eval_harness.scoring`) gathers the KV cache per layer: b rows below the
split, ``num_models * b`` above it.

Exactness: each model's rows compute ``base(x) + s B A x``. On a float32 base this is PEFT's
LoRA layer exactly, and the results equal one-by-one evaluation up to floating-point summation
order (tested: predictions identical, scores within 1e-4). On a bfloat16 (or float16) base the
LoRA products run in the base's dtype, as they do under autocast, where PEFT's unmerged layer
upcasts the input to its float32 factors: on a CPU the float32 products of M + K models (zero-
padded to the largest rank, the merge's M r) cost as much as the bfloat16 base layers beneath
them. The difference is bfloat16 rounding of an update that is added to a bfloat16 output anyway
(tested against one-by-one evaluation in bfloat16: scores within bfloat16 tolerance, predictions
equal but for near-ties). ``--batch_models false`` evaluates one by one with PEFT's own layers.

What it refuses (:class:`Unsupported`, and the runner then evaluates one model at a time):
adapters that are not a plain ``s * B @ A`` (DoRA and the other variants
:func:`poc_lora.adapters.read_adapter_config` refuses), LoRA on embeddings or the LM head, trained
biases (``lora_bias``, ``bias``), ``modules_to_save``, ``fan_in_fan_out`` (GPT-2's Conv1D),
activated LoRA (``alora_invocation_tokens``), quantized bases, and modules that are not a plain
``nn.Linear`` of the base.

Memory: one base plus every model's LoRA factors (float32), plus the activations of
``num_models`` times the batch above the split.

Example:
    >>> multi = build_multi_model(model, [None, "runs/a0", "runs/merged"])  # doctest: +SKIP
    >>> scores = rank_scores(multi, tok, prompts, candidates)  # doctest: +SKIP  (one list per model)
    >>> base = multi.restore()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from poc_lora.adapters import Adapter, load_adapter
from poc_lora.errors import AdapterError
from poc_lora.multilora import MultiLoraLinear, SharedTrunk, first_adapted_layer

logger = logging.getLogger(__name__)


class Unsupported(Exception):
    """These models cannot be evaluated in one pass exactly; the message says why."""


class MultiModel:
    """The loaded base model with ``num_models`` models' LoRAs in its adapted linear layers.

    Attributes:
        model: the causal LM (the base, modified in place; :meth:`restore` undoes it).
        num_models: K; model k's rows are block k of every batch above the split.
        split: ``(layer list, index)`` of the first adapted layer of any model.
        trunk: the :class:`~poc_lora.multilora.SharedTrunk` that tiles the rows at the split.

    Use ``with multi.share(b):`` around a forward on b rows: the result has ``K * b`` rows,
    model k's at ``[k * b, (k + 1) * b)``.
    """

    def __init__(self, model: nn.Module, names: list[str], split: tuple[str, int], num_models: int) -> None:
        self.model, self.adapted, self.split, self.num_models = model, names, split, num_models
        self.trunk = SharedTrunk(model.get_submodule(split[0]), split[1], num_models)

    @property
    def first_layer(self) -> int:
        """Index of the first decoder layer that runs once per model (KV cache: K * b rows from it)."""
        return self.split[1]

    def share(self, rows: int) -> Any:
        """Context manager: a forward on ``rows`` rows runs the trunk once, the rest per model."""
        return self.trunk.share(rows)

    def restore(self) -> nn.Module:
        """Put the base's own linear layers back and remove the hooks; returns the base model."""
        self.trunk.remove()
        for name in self.adapted:
            self.model.set_submodule(name, self.model.get_submodule(name).base_layer)
        return self.model


def _refusal(adapter: Adapter) -> str | None:
    """Why ``adapter``'s update is not a plain ``s * B @ A`` on linear layers (None when it is)."""
    cfg = adapter.config
    if cfg.get("fan_in_fan_out"):
        return "fan_in_fan_out (Conv1D layers)"
    if cfg.get("alora_invocation_tokens"):
        return "activated LoRA (alora_invocation_tokens) adapts only the tokens after its invocation"
    if adapter.full_keys:
        return f"it saves full tensors ({adapter.full_keys[0]}, ...: modules_to_save or trained biases)"
    for m in adapter.modules.values():
        if m.kind != "linear" or len(m.a_shape) != 2:
            return f"module {m.name} is an {m.kind} LoRA"
        if m.bias_key is not None:
            return f"module {m.name} has a LoRA bias (lora_bias)"
    return None


def _read_adapters(paths: Sequence[str | Path | None]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per model: adapted module name -> (A (r, in), B (out, r), scale), float32; {} for the base."""
    out = []
    for path in paths:
        if path is None:
            out.append({})
            continue
        try:
            adapter = load_adapter(path)
        except AdapterError as exc:
            raise Unsupported(str(exc)) from None
        try:
            why = _refusal(adapter)
            if why:
                raise Unsupported(f"adapter {path}: {why}")
            # float32 factors, as PEFT keeps a loaded adapter (autocast_adapter_dtype)
            out.append({name: (adapter.read_checked(m.a_key).float(), adapter.read_checked(m.b_key).float(), m.scale)
                        for name, m in adapter.modules.items()})
        finally:
            adapter.close()
    return out


def build_multi_model(model: nn.Module, adapters: Sequence[str | Path | None]) -> MultiModel:
    """Put the LoRAs of ``adapters`` (None: the plain base) into ``model``'s linear layers.

    Args:
        model: a loaded causal LM without any PEFT adapter attached (modified in place; call
            :meth:`MultiModel.restore` to get the plain base back).
        adapters: one entry per model, in the order of the score lists: an adapter directory
            (single or merged LoRA) or None for the base itself.

    Returns:
        A :class:`MultiModel` of ``len(adapters)`` models.

    Raises:
        Unsupported: the models cannot be evaluated together exactly (module docstring); the
            model is left unchanged.
    """
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise Unsupported("the base model is quantized")
    if hasattr(model, "peft_config"):
        raise Unsupported("the model already has a PEFT adapter attached")
    factors = _read_adapters(adapters)
    names = sorted({name for f in factors for name in f})
    if not names:
        raise Unsupported("no model adapts any layer")
    split = first_adapted_layer(names)
    if split is None:
        raise Unsupported(f"the adapted modules ({names[0]}, ...) do not all sit in one list of decoder layers")
    layers: dict[str, nn.Linear] = {}
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise Unsupported(f"the base model has no module {name}") from None
        if type(layer) is not nn.Linear:  # a quantized or otherwise special layer: PEFT's own path
            raise Unsupported(f"module {name} is a {type(layer).__name__}, not a plain torch Linear")
        for k, f in enumerate(factors):
            if name in f and (f[name][0].shape[1] != layer.in_features or f[name][1].shape[0] != layer.out_features):
                raise Unsupported(f"model {k}: module {name}: LoRA shapes {tuple(f[name][0].shape)}, "
                                  f"{tuple(f[name][1].shape)} do not fit {layer}")
        layers[name] = layer
    for name, layer in layers.items():
        device = layer.weight.device
        # a model that does not adapt this module is an all-zero rank-1 member: it adds exactly 0
        zero_a, zero_b = torch.zeros(1, layer.in_features), torch.zeros(layer.out_features, 1)
        a = [f[name][0] if name in f else zero_a for f in factors]
        b = [f[name][1] if name in f else zero_b for f in factors]
        scale = [f[name][2] if name in f else 0.0 for f in factors]
        multi = MultiLoraLinear(layer, [t.to(device) for t in a], [t.to(device) for t in b], scaling=scale,
                                trainable=False, compute_dtype=layer.weight.dtype)
        model.set_submodule(name, multi.to(device).eval())
    logger.info("%d models in one pass: layers below %s.%d shared", len(adapters), *split)
    return MultiModel(model, names, split, len(adapters))


__all__ = ["MultiModel", "Unsupported", "build_multi_model"]
