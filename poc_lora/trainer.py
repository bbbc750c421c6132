"""NoisyAdamW in Hugging Face's Trainer: optimizer factory, noise-scale logging, a small subclass.

Three ways in, from least to most integrated (all give the same optimizer for the same args):

* ``Trainer(..., optimizer_cls_and_kwargs=(NoisyAdamW, noisy_adamw_kwargs(args, temperature=1e-5)))``
  (Trainer groups the parameters; the kwargs carry lr/betas/eps/weight decay from ``args``;
  add ``callbacks=[NoiseScaleCallback()]`` to log the noise scale);
* ``create_noisy_optimizer(model, args)`` for your own loop or ``Trainer(optimizers=(opt, None))``;
* ``NoisyAdamWTrainer(..., temperature=1e-5)``: a Trainer that does both for you.

Checkpoints: Trainer saves ``optimizer.state_dict()`` to ``optimizer.pt`` and reads it back with
``torch.load(weights_only=True)``; NoisyAdamW's extra ``"noise"`` entry holds plain ints (seed,
noise step, chunk size), so ``resume_from_checkpoint`` continues the same noise stream.

Example:
    >>> from transformers import TrainingArguments
    >>> from poc_lora.trainer import NoisyAdamWTrainer
    >>> args = TrainingArguments("out", learning_rate=3e-4, warmup_steps=100)  # doctest: +SKIP
    >>> trainer = NoisyAdamWTrainer(model=peft_model, args=args, train_dataset=ds,
    ...                             temperature=1e-5)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import _get_foreach_kernels_supported_devices
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import ConfigError
from .optim import NoisyAdamW
from .outputs import follow_umask

logger = logging.getLogger(__name__)

NOISE_SCALE_KEY = "noise_scale"


def noisy_adamw_kwargs(args: TrainingArguments, temperature: float = 1e-5, seed: int | None = None) -> dict[str, Any]:
    """NoisyAdamW keyword arguments from TrainingArguments, as Trainer derives AdamW's.

    lr = ``learning_rate``, betas = (``adam_beta1``, ``adam_beta2``), eps = ``adam_epsilon``,
    weight_decay = ``weight_decay`` (Trainer's param groups still set 0 for biases and norms);
    ``optim="adamw_torch_fused"`` (Trainer's default) gives ``fused=True``, ``"adamw_torch"``
    torch's default kernel choice. ``seed=None`` uses ``args.seed``, so a run is reproducible from
    its TrainingArguments and ensemble members with different seeds get different noise.

    Example:
        >>> kw = noisy_adamw_kwargs(TrainingArguments("out", learning_rate=3e-4), temperature=1e-5)  # doctest: +SKIP
        >>> Trainer(model, args, optimizer_cls_and_kwargs=(NoisyAdamW, kw))  # doctest: +SKIP
    """
    optim = str(getattr(args.optim, "value", args.optim))
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        "temperature": temperature,
        "seed": args.seed if seed is None else seed,
    }
    if optim == "adamw_torch_fused":
        kwargs["fused"] = True
    elif optim == "adamw_torch":  # Trainer leaves the choice to torch: foreach on GPUs, else per tensor
        kwargs["foreach"] = args.device.type in _get_foreach_kernels_supported_devices()
    else:
        logger.info("TrainingArguments.optim=%r is replaced by NoisyAdamW (fused where supported)", optim)
    return kwargs


def noisy_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in Trainer's two AdamW groups, in module order.

    Group 0 gets ``weight_decay``, group 1 (biases and norm weights, by Trainer's
    ``get_decay_parameter_names``) gets 0; frozen parameters are left out. Raises
    :class:`ConfigError` when nothing is trainable.

    Example:
        >>> groups = noisy_param_groups(peft_model, 0.0)  # doctest: +SKIP
        >>> NoisyAdamW(groups, **noisy_adamw_kwargs(args))  # doctest: +SKIP
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("create_noisy_optimizer: the model has no trainable parameters "
                          "(requires_grad is False everywhere); attach a LoRA adapter first")
    # Trainer's own rule (layer types and name patterns); the method does not use `self`.
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]


def create_noisy_optimizer(
    model: torch.nn.Module, training_args: TrainingArguments, temperature: float = 1e-5, seed: int | None = None
) -> NoisyAdamW:
    """NoisyAdamW over the trainable parameters, grouped exactly as Trainer groups AdamW's.

    Groups: :func:`noisy_param_groups`; hyperparameters and seed: :func:`noisy_adamw_kwargs`.

    Example:
        >>> opt = create_noisy_optimizer(peft_model, args, temperature=1e-5, seed=0)  # doctest: +SKIP
        >>> trainer = Trainer(model=peft_model, args=args, optimizers=(opt, None))  # doctest: +SKIP
    """
    groups = noisy_param_groups(model, training_args.weight_decay)
    return NoisyAdamW(groups, **noisy_adamw_kwargs(training_args, temperature, seed))


def noise_scales(optimizer: Any) -> list[float]:
    """The noise std sqrt(2 * lr * temperature) applied in the latest step, per non-empty param
    group (empty list for other optimizers or before the first step)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wrapper
    scales = getattr(opt, "last_noise_scales", None)
    if not scales:
        return []
    return [s for s, g in zip(scales, opt.param_groups) if g["params"]]


class NoiseScaleCallback(TrainerCallback):
    """Logs ``noise_scale`` = sqrt(2 * lr * temperature) next to ``learning_rate``.

    The value is the noise std NoisyAdamW applied in the step just logged, i.e. at the logged
    learning rate (Trainer logs the lr of that step, read before the scheduler moves on). If
    param groups differ,
    ``noise_scale`` is group 0's and ``noise_scale/group_<i>`` the others'. Trainer appends a log
    entry to ``state.log_history`` before callbacks run, so the entry is completed here too;
    reporting integrations (TensorBoard, W&B) see the value when this callback runs before
    them, as :class:`NoisyAdamWTrainer` arranges.

    Example:
        >>> Trainer(..., optimizer_cls_and_kwargs=(NoisyAdamW, kw), callbacks=[NoiseScaleCallback()])  # doctest: +SKIP
    """

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):  # noqa: D102
        scales = noise_scales(optimizer)
        if not scales or logs is None or "learning_rate" not in logs:
            return
        extra = {NOISE_SCALE_KEY: scales[0]}
        extra.update({f"{NOISE_SCALE_KEY}/group_{i}": s for i, s in enumerate(scales) if s != scales[0]})
        logs.update(extra)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "learning_rate" in last:
            last.update(extra)


class UmaskCheckpointsCallback(TrainerCallback):
    """Gives every ``checkpoint-<step>`` directory the modes the process umask asks for
    (:func:`poc_lora.outputs.follow_umask`): safetensors writes its files 0600 whatever the
    umask, so without this a checkpoint's ``adapter_model.safetensors`` is private while the
    files beside it are not. :class:`NoisyAdamWTrainer` adds it.

    Example:
        >>> Trainer(..., callbacks=[UmaskCheckpointsCallback()])  # doctest: +SKIP
    """

    def on_save(self, args, state, control, **kwargs):  # noqa: D102
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and path.is_dir():
            follow_umask(path)


class NoisyAdamWTrainer(Trainer):
    """Trainer whose optimizer is NoisyAdamW (built like Trainer's AdamW), which logs
    ``noise_scale`` and writes checkpoints with the umask's modes (:class:`UmaskCheckpointsCallback`).

    Args:
        temperature: Langevin temperature lambda (the paper: 1e-5; 0 = plain AdamW).
        noise_seed: noise seed; ``None`` uses ``args.seed``.
        *args, **kwargs: as :class:`transformers.Trainer` (not ``optimizers`` with an optimizer,
            nor ``optimizer_cls_and_kwargs``: the optimizer is this class's job).

    Example:
        >>> trainer = NoisyAdamWTrainer(model=peft_model, args=args, train_dataset=ds, temperature=1e-5)  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, temperature: float = 1e-5, noise_seed: int | None = None, **kwargs: Any) -> None:
        optimizers = kwargs.get("optimizers") or (None, None)
        if kwargs.get("optimizer_cls_and_kwargs") is not None or optimizers[0] is not None:
            raise ConfigError("NoisyAdamWTrainer builds its own optimizer: do not pass `optimizers` with an "
                              "optimizer or `optimizer_cls_and_kwargs` (use transformers.Trainer for that)")
        if not temperature >= 0:
            raise ConfigError(f"NoisyAdamWTrainer: temperature must be >= 0, got {temperature!r}")
        super().__init__(*args, **kwargs)
        self.temperature, self.noise_seed = temperature, noise_seed
        # first in line, so reporting integrations see noise_scale in the same log call
        self.callback_handler.callbacks.insert(0, NoiseScaleCallback())
        self.add_callback(UmaskCheckpointsCallback())

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's own create_optimizer (its grouping, incl. DTensor meshes) with NoisyAdamW."""
        if self.optimizer is None:
            self.optimizer_cls_and_kwargs = (NoisyAdamW, noisy_adamw_kwargs(self.args, self.temperature,
                                                                             self.noise_seed))
        return super().create_optimizer(model)
