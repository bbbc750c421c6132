"""The batched ensemble strategy: M members trained together on one copy of the base model.

``poc-lora ensemble --strategy batched`` (and the pipeline's ``strategy: batched``) trains the M
members in one process, in one pass per micro-batch, through ``transformers.Trainer`` (so
checkpoints, resume, gradient accumulation, schedulers, logging and RNG state are Trainer's):

* Model: the base with every LoRA target replaced by a :class:`~poc_lora.multilora.MultiLoraLinear`
  holding the M members' factors (memory: one base plus M adapters and their activations).
* Initialisation: member j's factors are the very tensors ``attach_lora`` creates for it in a
  sequential run (seed ``seed + j``), so the LoRA init is the sequential member's.
* Data (``data_order``): ``shared``: every member reads the same micro-batch sequence (the base
  config's data seed); the layers below the first adapted layer run once per micro-batch
  (:class:`~poc_lora.multilora.SharedTrunk`) and the members branch from there as one batched
  computation. ``per_member``: member j reads its own order (from ``seed + j``, as in a
  sequential run); the M micro-batches are stacked and padded to one length, with no trunk sharing.
* Loss: the LM head on the supervised positions only
  (:func:`~poc_lora.multilora.supervised_lm_loss`), each member's loss normalised by its own
  supervised-token count over the accumulated batch, exactly as Trainer normalises one
  adapter's; the backward pass runs on the sum of the members' losses, whose parameters are
  disjoint, so each member gets exactly its own gradient.
* Optimizer: :class:`MemberOptimizers`, one :class:`~poc_lora.optim.NoisyAdamW` per member
  (its parameters grouped as in a sequential run, its own noise seed, learning rate, temperature),
  presented to Trainer as one optimizer whose ``param_groups`` are the members' groups (so one LR
  scheduler drives them all). Gradient clipping is per member (``max_grad_norm`` of the member's
  own gradient), never a norm across members.
* Outputs: the same ``adapter_<j>/`` PEFT directories as the other strategies (written by
  :func:`poc_lora.train.write_trained_adapter`), each completion record holding the member's own
  loss log; Trainer checkpoints of the whole ensemble in ``output_dir/batched/checkpoint-<step>``
  (the members' LoRA factors, the M optimizer states with their noise counters, scheduler, RNG
  and data position), which a rerun resumes.

With ``data_order: shared`` and ``lora_dropout: 0`` member j equals the sequential strategy's
member j (same seeds) up to floating-point reduction order. With ``lora_dropout > 0`` the
members draw their dropout masks from one generator, so they are equal in distribution, not
bit for bit. No Python loop over members runs in the forward or backward pass, on any device.

Example:
    >>> from poc_lora.ensemble import train_ensemble
    >>> train_ensemble("configs/train/tiny_cpu.yaml", 4, strategy="batched", data_order="shared",
    ...                overrides=["--output_dir", "runs/ens"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, RandomSampler, Sampler
from transformers import Trainer, TrainingArguments

from .batched_model import BatchedLoraModel, MemberOptimizers, check_data_order, lora_layers, member_lora
from .config import TrainConfig
from .data.instructions import data_collator
from .errors import ConfigError, OutputError
from .optim import NoisyAdamW
from .outputs import write_json
from .stages import settings_hash
from .trainer import noise_scales, noisy_adamw_kwargs
from .train import (PreparedRun, attach_lora, data_sha256, last_checkpoint, load_base_model, start_output,
                    tokenize_run, train_settings, training_record, write_trained_adapter)

logger = logging.getLogger(__name__)

BATCHED_DIR = "batched"  # under the ensemble's output_dir: the Trainer checkpoints of the whole ensemble
MEMBERS_FILE = "poc_lora_batched.json"  # which members (and settings) the checkpoints hold
WEIGHTS_FILE = "multi_lora.safetensors"  # the members' LoRA factors in a checkpoint
# Keys in which members of one batched run may differ (optimizer hyperparameters are per member).
PER_MEMBER_KEYS = {"output_dir", "seed", "data_seed", "noise_seed", "learning_rate", "temperature", "weight_decay",
                   "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "overwrite_output_dir",
                   "resume_from_checkpoint", "logging_dir", "run_name"}
# --------------------------------------------------------------------------- per-member data order
class _MemberRows(Dataset):
    """The training set indexed by a tuple of M row indices: item = the M members' examples."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, ...]) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in index]


class MemberOrderSampler(Sampler):
    """Yields, per position in the epoch, the M members' dataset indices.

    Member m's order is exactly the one Trainer (through accelerate's seedable sampler) gives a
    single run with data seed ``seeds[m]``: ``randperm`` of a generator seeded with
    ``epoch + seeds[m]``.
    """

    def __init__(self, num_rows: int, seeds: Sequence[int]) -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator() for _ in self.seeds]
        self.samplers = [RandomSampler(range(num_rows), generator=g) for g in self.generators]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samplers[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for g, seed in zip(self.generators, self.seeds):
            g.manual_seed(self.epoch + seed)
        yield from zip(*self.samplers)
        self.epoch += 1  # as accelerate's SeedableRandomSampler does after a full pass


def _member_major(collate: Any, num_members: int) -> Any:
    """A collator for _MemberRows items (member 0's examples first, then member 1's, ...); plain
    examples (the evaluation set, read by all members) are collated as they are."""
    def collate_stacked(items: list[Any]) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], list):
            items = [item[m] for m in range(num_members) for item in items]
        return collate(items)
    return collate_stacked


# --------------------------------------------------------------------------- the trainer
class BatchedTrainer(Trainer):
    """Trainer for :class:`BatchedLoraModel` with :class:`MemberOptimizers`.

    Besides Trainer's own logs it logs, per member, ``member_<j>/loss`` (and ``grad_norm``,
    ``noise_scale``, and ``learning_rate`` where it differs from member 0's), which Trainer keeps
    in ``state.log_history`` (so they survive a resume); checkpoints hold the members' factors
    only (``multi_lora.safetensors``), not the base model.
    """

    def __init__(self, *args: Any, member_optimizers: MemberOptimizers, member_seeds: Sequence[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, optimizers=(member_optimizers, None), **kwargs)
        self.num_members = len(member_optimizers.members)
        self.member_seeds = member_seeds
        self._loss_sum = torch.zeros(self.num_members)  # since the last log
        self._loss_total = torch.zeros(self.num_members)  # over this call of train()
        # global step of the last log; None until the first training batch, which sets it to the step
        # train() starts from (the checkpoint's on a resume, so the first log divides by its own steps)
        self._last_logged: int | None = None

    # data -------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        if self.member_seeds is None:
            return super()._get_train_sampler(train_dataset)
        return MemberOrderSampler(len(train_dataset if train_dataset is not None else self.train_dataset),
                                  self.member_seeds)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Each member's supervised-token count over the accumulated batch, (M,)."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        counts = None
        for batch in batch_samples:
            per_row = batch["labels"][:, 1:].ne(-100).sum(dim=1)
            n = per_row.view(self.num_members, -1).sum(1) if self.member_seeds is not None else per_row.sum()
            counts = n if counts is None else counts + n
        return counts.expand(self.num_members).to(device)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """No norm across members (Trainer's ``grad_norm`` log); each member's is ``member_<j>/grad_norm``."""
        return None

    # loss -------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        if model.training and outputs.member_losses is not None:
            if self._last_logged is None:
                self._last_logged = self.state.global_step
            # kept on the model's device: no synchronisation per micro-batch, as Trainer's own tr_loss
            self._loss_sum = self._loss_sum.to(outputs.member_losses.device) + outputs.member_losses.detach().float()
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # backward runs on the members' sum; Trainer's logged loss is the members' mean
        return super().training_step(model, inputs, num_items_in_batch) / self.num_members

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            steps = max(self.state.global_step - (self._last_logged or 0), 1)
            self._last_logged = self.state.global_step
            opt: MemberOptimizers = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            lr0 = float(opt.members[0].param_groups[0]["lr"])
            sums = self._loss_sum.cpu()  # one synchronisation per log
            for j, member in enumerate(opt.members):
                logs[f"member_{j}/loss"] = round(float(sums[j]) / steps, 6)
                lr = float(member.param_groups[0]["lr"])
                if lr != lr0:
                    logs[f"member_{j}/learning_rate"] = lr
                scales = noise_scales(member)
                if scales:
                    logs[f"member_{j}/noise_scale"] = scales[0]
                if opt.last_grad_norms[j] is not None:
                    logs[f"member_{j}/grad_norm"] = opt.last_grad_norms[j]
            self._loss_total = self._loss_total.to(self._loss_sum.device) + self._loss_sum
            self._loss_sum = torch.zeros_like(self._loss_sum)
        super().log(logs, start_time)

    def member_train_losses(self, steps: int) -> list[float]:
        """Each member's mean training loss over the ``steps`` optimizer steps of this train() call
        (Trainer's ``train_loss``, per member)."""
        total = self._loss_total.to(self._loss_sum.device) + self._loss_sum
        return [float(t) / max(steps, 1) for t in total.cpu()]

    @torch.no_grad()
    def member_eval_losses(self) -> list[float]:
        """Each member's evaluation loss on the eval set, averaged over examples as Trainer's
        ``eval_loss`` is (each batch's token-mean loss, weighted by its number of examples)."""
        model = self.model
        was_training = model.training
        model.eval()
        total, rows = 0.0, 0
        try:
            for batch in self.get_eval_dataloader():
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    out = model(**batch)
                b = batch["input_ids"].shape[0]
                total = total + out.member_losses.float() * b
                rows += b
        finally:
            model.train(was_training)
        if rows == 0:
            return [float("nan")] * self.num_members
        return [float(t) / rows for t in total.cpu()]

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-member evaluation losses (``eval_loss`` is their mean), logged like Trainer's."""
        if eval_dataset is not None:
            raise ConfigError("BatchedTrainer.evaluate evaluates the trainer's own eval_dataset")
        losses = self.member_eval_losses()
        metrics = {f"{metric_key_prefix}_loss": sum(losses) / len(losses)}
        metrics.update({f"member_{j}/{metric_key_prefix}_loss": v for j, v in enumerate(losses)})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # checkpoints ------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """The members' LoRA factors (not the frozen base) and the training arguments."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        torch.save(self.args, out / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = Path(resume_from_checkpoint) / WEIGHTS_FILE
        if not path.is_file():
            raise OutputError(f"{resume_from_checkpoint} is not a checkpoint of a batched run (no {WEIGHTS_FILE})")
        saved = load_file(str(path))
        params = {n: p for n, p in (model or self.model).named_parameters() if p.requires_grad}
        if set(saved) != set(params):
            raise OutputError(f"{path} holds other LoRA tensors than this run ({len(saved)} vs {len(params)}); "
                              "train again with --overwrite_output_dir true")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


# --------------------------------------------------------------------------- the workflow
def check_members_compatible(members: Sequence[TrainConfig]) -> None:
    """Raise ConfigError unless the members' configs differ only in per-member keys (seeds,
    output dir, optimizer hyperparameters): one batched run shares the base, LoRA shape, data,
    batch size and schedule."""
    first = members[0].to_dict()
    for j, m in enumerate(members[1:], start=1):
        other = m.to_dict()
        diff = sorted(k for k in set(first) | set(other)
                      if first.get(k) != other.get(k) and k not in PER_MEMBER_KEYS)
        if diff:
            raise ConfigError(f"--strategy batched trains members that differ only in seeds and optimizer "
                              f"hyperparameters; member {j} differs from member 0 in {', '.join(diff[:8])}")


def _batched_args(members: Sequence[TrainConfig], root: Path) -> TrainingArguments:
    """The ensemble's TrainingArguments: member 0's, checkpoints into ``root/batched``, Trainer's
    global gradient clipping off (the members clip their own gradients)."""
    tr = members[0].training
    return dataclasses.replace(tr, output_dir=str(root / BATCHED_DIR), max_grad_norm=0.0,
                               resume_from_checkpoint=None)


def _members_record(runs: Sequence[PreparedRun], data_sha: str | None, data_order: str) -> dict[str, Any]:
    # directory names, not paths: a copy of the output dir (or a moved one) still resumes
    return {"data_order": data_order,
            "members": [{"output_dir": r.cfg.output_dir.name,
                         "settings_sha256": settings_hash(train_settings(r.cfg, data_sha))} for r in runs]}


def _resolve_batched_resume(runs: Sequence[PreparedRun], root: Path, record: dict[str, Any],
                            restart: bool) -> str | None:
    """The batched checkpoint to resume from, or None (stale checkpoints are cleared first).

    Resumes when ``root/batched`` holds checkpoints of an unfinished run of the same members
    with the same settings and a resume is asked (the ensemble asks by default). Checkpoints
    left by a finished run are cleared. Raises OutputError for checkpoints of an unfinished run
    of other members or settings (or with no resume asked), unless ``restart``
    (``retrain_stale``) or ``overwrite_output_dir``.
    """
    ckpt_dir = root / BATCHED_DIR
    value = runs[0].cfg.training.resume_from_checkpoint
    requested = value is not None and str(value).lower() not in ("", "false", "none", "no", "0")
    ckpt = last_checkpoint(ckpt_dir)
    if ckpt is not None and not any(r.cfg.poc.overwrite_output_dir for r in runs):
        try:
            recorded = json.loads((ckpt_dir / MEMBERS_FILE).read_text())
        except (OSError, ValueError):
            recorded = {}
        finished = bool(recorded.pop("finished", False))
        same = recorded == json.loads(json.dumps(record))
        if same and requested and not finished:
            return ckpt
        if not finished and not restart:
            why = "other members or settings" if not same else "an unfinished run"
            raise OutputError(f"{ckpt_dir} holds checkpoints of {why}; rerun with the settings it was started "
                              "with to resume, or pass --overwrite_output_dir true to start again")
        logger.info("%s holds checkpoints of %s; starting again", ckpt_dir,
                    "a finished run" if finished else "other members or settings")
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    return None


def train_batched(runs: Sequence[PreparedRun], root: str | Path, data_order: str = "shared",
                  retrain_stale: bool = False) -> list[Path]:
    """Train the prepared members together (see the module docstring); returns their adapter dirs.

    ``runs``: :func:`poc_lora.train.prepare_run` of each member config (:func:`poc_lora.ensemble.
    member_configs`, which gives every member the base data seed when ``data_order`` is
    ``shared``); they may differ only in :data:`PER_MEMBER_KEYS`. ``root``: the ensemble's output
    dir (checkpoints go to ``root/batched``). ``retrain_stale``: start again, instead of refusing,
    when ``root/batched`` holds checkpoints of other members or settings.

    Raises :class:`ConfigError` for an unsupported LoRA (DoRA, embeddings, trainable biases), a
    model whose logits are transformed after the LM head, or members that differ in shared keys;
    :class:`OutputError` for checkpoints of another run.

    Example:
        >>> runs = [prepare_run(m) for m in member_configs(cfg, 4, "shared")]  # doctest: +SKIP
        >>> train_batched(runs, cfg.output_dir, "shared")  # doctest: +SKIP
    """
    check_data_order(data_order)
    runs = list(runs)
    if not runs:
        return []
    members = [r.cfg for r in runs]
    check_members_compatible(members)
    lora = members[0].lora
    if lora.lora_bias != "none":  # checked before the model loads; member_lora checks the layers
        raise ConfigError(f"--strategy batched trains LoRA factors only, but lora_bias={lora.lora_bias!r} also "
                          "trains the base model's biases, which the members would share; use --strategy "
                          "sequential or lora_bias none")
    tr = members[0].training
    if tr.load_best_model_at_end:
        raise ConfigError("--strategy batched keeps each member's last state; load_best_model_at_end would pick one "
                          "checkpoint for all members: use --strategy sequential, or load_best_model_at_end false")
    if data_order == "per_member" and str(getattr(tr.train_sampling_strategy, "value", tr.train_sampling_strategy)) \
            != "random":
        raise ConfigError(f"--strategy batched with data_order per_member draws each member's random order itself; "
                          f"train_sampling_strategy={tr.train_sampling_strategy!r} needs --strategy sequential")
    shared_modules = [t for t in lora.lora_target_modules if t in ("embed_tokens", "lm_head")]
    if shared_modules:
        raise ConfigError(f"--strategy batched adapts linear layers only, not {', '.join(shared_modules)} "
                          "(lora_target_modules); use --strategy sequential")
    root = Path(root)
    first = runs[0]
    tokenize_run(first)  # one tokenisation for all members: same records, template and cutoff
    for run in runs[1:]:
        run.tokenizer, run.train_dataset, run.eval_dataset = first.tokenizer, first.train_dataset, first.eval_dataset
    data_sha = data_sha256(first.data_file)
    record = _members_record(runs, data_sha, data_order)
    resume = _resolve_batched_resume(runs, root, record, restart=retrain_stale)

    base = load_base_model(first.cfg)
    loras = [member_lora(base, m) for m in members]
    model = BatchedLoraModel(base, loras, data_order)
    args = _batched_args(members, root)
    optimizer = MemberOptimizers(
        [NoisyAdamW(lora.groups, **noisy_adamw_kwargs(m.training, m.poc.temperature, m.noise_seed))
         for lora, m in zip(loras, members)],
        [m.training.max_grad_norm or 0.0 for m in members])
    collate = data_collator(first.tokenizer, first.cfg.data.pad_to_multiple_of)
    per_member = data_order == "per_member"
    seeds = [m.training.data_seed if m.training.data_seed is not None else m.training.seed for m in members]
    trainer = BatchedTrainer(
        model=model, args=args, train_dataset=_MemberRows(first.train_dataset) if per_member else first.train_dataset,
        eval_dataset=first.eval_dataset,
        data_collator=_member_major(collate, len(members)) if per_member else collate,
        member_optimizers=optimizer, member_seeds=seeds if per_member else None,
    )
    for run in runs:
        run.resume = resume
        start_output(run)
    if resume is None:
        write_json(Path(args.output_dir) / MEMBERS_FILE, record)
    else:
        logger.info("resuming the batched ensemble from %s", resume)
    logger.info("training %d members together (data order %s) into %s", len(runs), data_order, root)
    result = trainer.train(resume_from_checkpoint=resume)
    steps = trainer.state.global_step - _resumed_step(resume)
    train_losses = trainer.member_train_losses(steps)
    eval_losses = trainer.member_eval_losses() if first.eval_dataset is not None else None
    history = trainer.state.log_history
    base = model.restore_base()
    out = []
    for j, run in enumerate(runs):
        metrics = {**result.metrics, "train_loss": train_losses[j]}
        if eval_losses is not None:
            metrics["eval_loss"] = eval_losses[j]
        rec = training_record(run, trainer.state.global_step, metrics, replicas_identical=None,
                              strategy="batched", data_order=data_order, batched_members=len(runs),
                              log_history=_member_history(history, j))
        peft_model = attach_lora(base, run.cfg)
        with torch.no_grad():
            factors = loras[j].factors
            for name, layer in lora_layers(peft_model):
                layer.lora_A["default"].weight.copy_(factors[name][0])
                layer.lora_B["default"].weight.copy_(factors[name][1])
        out.append(write_trained_adapter(peft_model, run, rec))
        base = peft_model.unload()
        logger.info("adapter %s written (step %d, train loss %.4f)", run.cfg.output_dir,
                    trainer.state.global_step, train_losses[j])
    write_json(Path(args.output_dir) / MEMBERS_FILE, {**record, "finished": True})  # its checkpoints are done with
    return out


def _resumed_step(resume: str | None) -> int:
    if resume is None:
        return 0
    state = json.loads((Path(resume) / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


def _member_history(history: list[dict[str, Any]], j: int) -> list[dict[str, Any]]:
    """Member ``j``'s entries of Trainer's log history, keyed as a single run's would be."""
    prefix = f"member_{j}/"
    out = []
    for entry in history:
        mine = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
        if not mine:
            continue
        shared = {k: v for k, v in entry.items() if "/" not in k and k not in ("loss", "eval_loss", "grad_norm")}
        out.append({**shared, **mine})
    return out


__all__ = ["BATCHED_DIR", "BatchedTrainer", "MemberOrderSampler", "check_members_compatible", "train_batched"]
