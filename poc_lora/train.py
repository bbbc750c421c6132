"""Train one LoRA adapter with Noisy AdamW through ``transformers.Trainer``.

:func:`train_adapter` takes a :class:`~poc_lora.config.TrainConfig` (or a YAML path + overrides),
checks every input before the model is loaded (template, data file and records, output dir,
checkpoint), then trains with :class:`~poc_lora.trainer.NoisyAdamWTrainer` and writes into
``output_dir`` a standard PEFT adapter directory:

    adapter_config.json, adapter_model.safetensors   (PEFT; base_model_name_or_path as configured)
    poc_lora_template.json                          (template name + hash, read by evaluation)
    poc_lora_config.yaml / .json                    (the resolved config; rerunnable)
    poc_lora_train.json                             (metrics)
    .poc_lora_stage.json                            (stage marker, written last = "this adapter is done")
    checkpoint-<step>/                               (Trainer checkpoints, if save_strategy says so)

``--resume_from_checkpoint true`` (or a checkpoint path) continues an interrupted run and ends
with the same adapter as an uninterrupted one: Trainer restores the model, the scheduler, the
RNG states and the data position, and NoisyAdamW's state dict carries its noise seed and step
(its noise is counter-based, so the stream continues exactly). On a *finished* adapter a resume
changes nothing: it says the adapter is finished and returns (exit 0), like Trainer resuming
a run that has reached ``max_steps``.

The last file written is the stage marker (:mod:`poc_lora.stages`) holding
:func:`train_settings` and the size and sha256 of every adapter file (all but the model card and
the checkpoints), which the ensemble and the pipeline compare to decide whether an existing
adapter is still the one their settings ask for. An adapter whose files are missing, truncated
or changed is *not* finished: a resume rebuilds it from the last checkpoint (the final one holds
the finished weights, so nothing is trained again), and without a resume, or without a
checkpoint, the command names the damaged file and the flag to pass.

Example:
    >>> from poc_lora.train import train_adapter
    >>> path = train_adapter("configs/train/tiny_cpu.yaml", ["--output_dir", "runs/tiny"])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .adapters import SAFETENSORS_NAME, sha256_file
from .cards import write_training_card
from .config import CONFIG_FILE, TrainConfig, load_config
from .data.instructions import build_datasets, data_collator, dataset_train_files, load_training_records, resolve_data_path
from .data.templates import TEMPLATE_RECORD_FILE, get_template, template_record
from .errors import ConfigError, OutputError
from .models import load_model, load_tokenizer, quantization_config, resolve_model_path
from .outputs import staged_files, write_json
from .stages import LIVING_FILES, clear_stage, differing_keys, is_done, read_stage, stage_problems, write_stage
from .trainer import NoisyAdamWTrainer

logger = logging.getLogger(__name__)

DONE_FILE = "poc_lora_train.json"
_CHECKPOINT_PREFIX = "checkpoint-"
_LAST = {"true", "last", "1", "yes"}
AUTO_RESUME = "auto"  # resume from the last checkpoint if there is one, else start fresh


def is_complete(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds a finished adapter: its stage marker (written last) is there
    and every file it vouches for is intact (:func:`poc_lora.stages.stage_problems`)."""
    return is_done(output_dir)


def damage(output_dir: str | os.PathLike) -> list[str]:
    """What is wrong with a finished run in ``output_dir`` whose outputs are no longer intact
    (e.g. ``["adapter_model.safetensors is missing"]``); ``[]`` when it is intact or when there
    is no finished run there at all (a fresh or an interrupted one)."""
    out = Path(output_dir)
    if read_stage(out) is None:
        return ["its stage marker is missing"] if (out / DONE_FILE).is_file() else []
    return stage_problems(out)


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` directory in ``output_dir`` that Trainer can resume, or None."""
    if not Path(output_dir).is_dir():
        return None
    return get_last_checkpoint(str(output_dir))


# TrainingArguments fields that change how a run is logged, saved or loaded, not the adapter it
# trains; left out of train_settings so that changing them does not make an adapter stale.
_NOT_SETTINGS = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "disable_tqdm",
                 "run_name", "project", "skip_memory_metrics", "push_to_hub", "dataloader_num_workers",
                 "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_pin_memory",
                 "dataloader_multiprocessing_context"}
_NOT_SETTINGS_PREFIXES = ("logging_", "log_", "save_", "hub_", "trackio_")


def train_settings(cfg: TrainConfig, data_sha256: str | None = None) -> dict[str, Any]:
    """What a trained adapter depends on: the resolved config without logging/saving/output
    fields, plus the SHA-256 of the training data file (when it is a local file).

    Example:
        >>> train_settings(load_config("configs/train/tiny_cpu.yaml"))["learning_rate"]  # doctest: +SKIP
        0.001
    """
    flat = {k: v for k, v in cfg.to_dict().items()
            if k not in _NOT_SETTINGS and not k.startswith(_NOT_SETTINGS_PREFIXES)}
    return {**flat, "data_sha256": data_sha256}


def data_sha256(data_file: str) -> str | None:
    """SHA-256 of the training data file (of an LLM-Adapters dataset directory: of its suites'
    ``train.json`` hashes); None for a hub dataset id."""
    if Path(data_file).is_dir():
        files = dataset_train_files(data_file)
        return hashlib.sha256(json.dumps({s: sha256_file(p) for s, p in files.items()}).encode()).hexdigest()
    return sha256_file(data_file) if Path(data_file).is_file() else None


def _resume_requested(cfg: TrainConfig) -> bool:
    value = cfg.training.resume_from_checkpoint
    return not (value is None or str(value).lower() in ("", "false", "none", "no", "0"))


def _resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from (None = fresh start), checked before the model loads."""
    out, value = cfg.output_dir, cfg.training.resume_from_checkpoint
    if not _resume_requested(cfg):
        return None
    if str(value).lower() == AUTO_RESUME:
        return last_checkpoint(out)
    if str(value).lower() in _LAST:
        ckpt = last_checkpoint(out)
        if ckpt is None:
            broken = damage(out)
            if broken:
                raise OutputError(f"{out} is not a finished adapter: {'; '.join(broken)}, and it holds no "
                                  "checkpoint-<step> to rebuild it from; run the same command with "
                                  "--overwrite_output_dir true instead of --resume_from_checkpoint to train it again")
            raise ConfigError(f"resume_from_checkpoint={value}: no checkpoint-<step> directory in {out}")
        return ckpt
    if not (Path(value) / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint {value} is not a Trainer checkpoint (no trainer_state.json)")
    return str(value)


def _check_output(cfg: TrainConfig, resume: str | None) -> None:
    out = cfg.output_dir
    if not out.exists() or cfg.poc.overwrite_output_dir:
        return
    if not out.is_dir():
        raise OutputError(f"output_dir {out} exists and is not a directory")
    if is_complete(out) and resume is None:
        raise OutputError(f"output_dir {out} already holds a trained adapter; pass --overwrite_output_dir true "
                          "to train again")
    broken = damage(out)
    if broken:
        ckpt = resume or last_checkpoint(out)
        if resume is None and str(cfg.training.resume_from_checkpoint).lower() != AUTO_RESUME:
            rebuild = f"--resume_from_checkpoint true to rebuild it from {Path(ckpt).name}, or " if ckpt else ""
            raise OutputError(f"output_dir {out} holds a trained adapter whose files are not intact "
                              f"({'; '.join(broken)}); pass {rebuild}--overwrite_output_dir true to train it again")
        logger.warning("%s is not intact (%s); %s", out, "; ".join(broken),
                       f"rebuilding it from {resume}" if resume else "training it again")
        return
    if resume is None and last_checkpoint(out) is not None:
        raise OutputError(f"output_dir {out} holds checkpoints of an unfinished run; pass "
                          "--resume_from_checkpoint true to continue it or --overwrite_output_dir true to restart")


@dataclass
class PreparedRun:
    """A config whose inputs were all checked, plus what the checks produced."""

    cfg: TrainConfig
    records: list[dict[str, str]]
    template: Any
    resume: str | None
    data_file: str
    finished: bool = False  # a resume asked of an adapter that is already finished: nothing to do
    tokenizer: Any = None  # set by tokenize_run
    train_dataset: Any = None
    eval_dataset: Any = None


def load_checked_records(cfg: TrainConfig) -> list[dict[str, str]]:
    """The config's training records, read and validated (``data_path: synthetic`` written first),
    without the ``validation_split`` records, in the config's ``answer_style``."""
    return load_training_records(cfg.data)


def prepare_run(cfg: TrainConfig, records: list[dict[str, str]] | None = None) -> PreparedRun:
    """Every check that can fail on user input, before any model is loaded.

    ``records``: already loaded and validated records (an ensemble reads the data once).
    """
    template = get_template(cfg.data.prompt_template)
    out = cfg.output_dir
    if _resume_requested(cfg) and is_complete(out) and not cfg.poc.overwrite_output_dir:
        if not out.is_dir():
            raise OutputError(f"output_dir {out} exists and is not a directory")
        return PreparedRun(cfg, [], template, None, "", finished=True)
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        quantization_config(cfg.model.load_in_4bit, cfg.model.load_in_8bit)  # bitsandbytes present?
    resume = _resolve_resume(cfg)
    _check_output(cfg, resume)
    if records is None:
        records = load_checked_records(cfg)
    return PreparedRun(cfg, records, template, resume, resolve_data_path(cfg.data))


def load_base_model(cfg: TrainConfig) -> Any:
    """The frozen base model as the config asks (dtype, quantisation, attention; QLoRA prepared)."""
    m, quantized = cfg.model, cfg.model.load_in_4bit or cfg.model.load_in_8bit
    device_map = {"": str(cfg.training.device)} if quantized else None  # bnb layers need their device up front
    model = load_model(
        m.model_name_or_path, m.dtype, load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type, bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=m.bnb_4bit_compute_dtype, attn_implementation=m.attn_implementation,
        device_map=device_map, trust_remote_code=m.trust_remote_code,
    )
    if quantized:
        # casts norms to fp32 and makes the inputs require grad, so checkpointed layers backprop
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=uses_checkpointing(cfg))
    elif uses_checkpointing(cfg) and reentrant_checkpointing(checkpointing_kwargs(cfg)):
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def uses_checkpointing(cfg: TrainConfig) -> bool:
    """Whether the recipe asks for activation checkpointing (either of transformers' spellings)."""
    tr = cfg.training
    return bool(getattr(tr, "activation_checkpointing", False) or getattr(tr, "gradient_checkpointing", False))


def checkpointing_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The kwargs Trainer passes to ``torch.utils.checkpoint`` (without its own two keys)."""
    tr = cfg.training
    kwargs = getattr(tr, "activation_checkpointing_kwargs", None) or getattr(tr, "gradient_checkpointing_kwargs", None)
    return {k: v for k, v in (kwargs or {}).items() if k not in ("every_n_layers", "offload")}


def reentrant_checkpointing(kwargs: dict[str, Any] | None) -> bool:
    """Whether activation checkpointing with these ``activation_checkpointing_kwargs`` runs
    torch's reentrant variant: only when they ask for it (transformers' default, for None or an
    empty dict, is ``use_reentrant: False``; torch's, for a dict without the key, is reentrant).

    Only the reentrant variant needs the embeddings' output to require grad (else a checkpointed
    layer whose input needs no grad returns an output without one, and its LoRA gets no
    gradient). The other variant does not, and making it require grad anyway costs a lot when
    only the top layers are adapted: every frozen layer below them then joins the backward pass
    and, checkpointed, runs its forward twice.
    """
    if not kwargs:
        return False
    return kwargs.get("use_reentrant", True) is not False


def lora_config(cfg: TrainConfig) -> Any:
    """PEFT ``LoraConfig`` from the config's LoRA fields."""
    lo = cfg.lora
    return LoraConfig(
        r=lo.lora_r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout,
        target_modules=list(lo.lora_target_modules), bias=lo.lora_bias, use_rslora=lo.use_rslora,
        layers_to_transform=lo.lora_layers_to_transform, task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, cfg: TrainConfig) -> Any:
    """A fresh LoRA on ``model``, initialised from the training seed (so seed+j differ)."""
    set_seed(cfg.training.seed)
    try:
        peft_model = get_peft_model(model, lora_config(cfg))
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError(f"cannot attach LoRA to {cfg.model.model_name_or_path!r}: {exc}") from None
    # The local directory an embedded id or a GGUF file resolves to, so the adapter loads with
    # AutoPeftModelForCausalLM offline (and PEFT does not look an unknown hub id up at every save).
    peft_model.peft_config["default"].base_model_name_or_path = resolve_model_path(
        cfg.model.model_name_or_path, cfg.model.dtype)
    return peft_model


def _trainable_digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _replicas_identical(model: Any) -> bool | None:
    """Under torch.distributed, whether every rank holds the same trainable weights (None if single)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _trainable_digest(model))
    same = len(set(digests)) == 1
    if not same:
        logger.warning("data-parallel replicas differ after training (digests %s)", digests)
    return same


def _write_adapter(trainer: Any, run: PreparedRun, record: dict[str, Any]) -> Path:
    """Adapter files into a temporary sibling, then moved into output_dir; then the record, and
    last the stage marker vouching for all of them (not for the checkpoints).

    ``trainer``: the Trainer that trained the adapter, or the PEFT model itself."""
    out = run.cfg.output_dir
    model = trainer.model if isinstance(trainer, Trainer) else trainer
    with staged_files(out) as tmp:
        # "auto" would look the base model up (a network call for a hub id) to see whether the
        # embeddings changed; they only can when the LoRA targets them.
        embeddings = any(m in ("embed_tokens", "lm_head") for m in run.cfg.lora.lora_target_modules)
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=embeddings)
        write_json(tmp / TEMPLATE_RECORD_FILE, template_record(run.template))
        run.cfg.save(tmp)
        write_training_card(tmp, run.cfg, record)  # replaces PEFT's empty README.md template
        files = [p.name for p in tmp.iterdir() if p.name not in LIVING_FILES]
    write_json(out / DONE_FILE, record)
    write_stage(out, "train", train_settings(run.cfg, data_sha256(run.data_file)), files=[*files, DONE_FILE])
    return out


def training_record(run: PreparedRun, global_step: int, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The completion record (``poc_lora_train.json``) of a trained run; ``extra`` keys are added.

    Example:
        >>> training_record(run, 150, {"train_loss": 0.4}, strategy="batched")  # doctest: +SKIP
    """
    cfg = run.cfg
    return {
        "adapter": str(cfg.output_dir), "global_step": global_step, "metrics": metrics,
        "seed": cfg.training.seed, "noise_seed": cfg.noise_seed, "temperature": cfg.poc.temperature,
        "train_records": len(run.train_dataset),
        "val_records": 0 if run.eval_dataset is None else len(run.eval_dataset),
        "data_file": run.data_file, "resumed_from": run.resume, "world_size": cfg.training.world_size,
        **extra,
    }


def start_output(run: PreparedRun) -> None:
    """Before training into ``output_dir``: with ``overwrite_output_dir`` (and no resume) drop an
    earlier run's record and checkpoints; remove the stage marker (it is written again last)."""
    if run.cfg.poc.overwrite_output_dir and run.resume is None:
        _clear_previous(run.cfg.output_dir)
    clear_stage(run.cfg.output_dir)
    (run.cfg.output_dir / DONE_FILE).unlink(missing_ok=True)  # an interrupted rebuild then reads as an interrupted run


def write_trained_adapter(peft_model: Any, run: PreparedRun, record: dict[str, Any]) -> Path:
    """Write a trained adapter into ``run.cfg.output_dir``: the PEFT files, template record, config
    and card (staged, then moved in), the completion ``record``, and last the stage marker holding
    :func:`train_settings`. Every strategy finishes its adapters through this one function.

    Example:
        >>> write_trained_adapter(peft_model, run, training_record(run, 150, metrics))  # doctest: +SKIP
    """
    return _write_adapter(peft_model, run, record)  # it writes the stage marker last, vouching for the files


def _clear_previous(out: Path) -> None:
    """--overwrite_output_dir: drop an earlier run's completion record and checkpoints."""
    (out / DONE_FILE).unlink(missing_ok=True)
    for ckpt in out.glob(f"{_CHECKPOINT_PREFIX}*"):
        if ckpt.is_dir():
            shutil.rmtree(ckpt)


def tokenize_run(run: PreparedRun) -> None:
    """Load the tokenizer and tokenise the run's data (before any model is loaded, so data that
    cannot train, such as responses cut away by ``cutoff_len``, fail early)."""
    if run.train_dataset is not None or run.finished:
        return
    run.tokenizer = load_tokenizer(run.cfg.model.model_name_or_path, padding_side="right")
    run.train_dataset, run.eval_dataset = build_datasets(run.records, run.tokenizer, run.template, run.cfg.data)


def _log_finished(cfg: TrainConfig) -> None:
    step = json.loads((cfg.output_dir / DONE_FILE).read_text()).get("global_step", "?")
    logger.warning("%s is already finished (step %s); a resume leaves it unchanged. Pass "
                   "--overwrite_output_dir true (overwrite_output_dir=True) to train it again.", cfg.output_dir, step)


def _final_step(cfg: TrainConfig, checkpoint: str) -> int | None:
    """The step of ``checkpoint`` when it is its run's last one (its ``global_step`` reached the
    run's ``max_steps``, and the config asks for no other ``max_steps``), else None."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        step, total = int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    asked = cfg.training.max_steps
    return step if 0 < total <= step and (asked <= 0 or asked == total) else None


def _previous_record(out: Path) -> dict[str, Any]:
    try:
        record = json.loads((out / DONE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _rebuild(run: PreparedRun, base_model: Any, step: int) -> tuple[Path, Any]:
    """A finished run whose adapter files were damaged, resumed from its last checkpoint: that
    checkpoint holds the finished weights, so they are loaded and the adapter is written again
    (Trainer, resumed at ``max_steps``, would train one step more)."""
    cfg, ckpt = run.cfg, Path(str(run.resume))
    weights = ckpt / SAFETENSORS_NAME
    if not weights.is_file():
        raise OutputError(f"{ckpt} holds no {SAFETENSORS_NAME} to rebuild {cfg.output_dir} from; pass "
                          "--overwrite_output_dir true to train it again")
    marker = read_stage(cfg.output_dir)
    changed = [] if marker is None else differing_keys(marker.get("settings"),
                                                       train_settings(cfg, data_sha256(run.data_file)))
    if changed:  # the checkpoint holds the adapter of those settings, not of this config
        raise OutputError(f"{cfg.output_dir} was trained with other settings ({', '.join(changed[:8])}); pass "
                          "--overwrite_output_dir true to train it again")
    logger.info("rebuilding %s from %s (step %d, its last checkpoint); nothing is trained", cfg.output_dir, ckpt, step)
    peft_model = attach_lora(base_model if base_model is not None else load_base_model(cfg), cfg)
    state = load_file(str(weights))
    expected = set(get_peft_model_state_dict(peft_model))
    if set(state) != expected:
        raise OutputError(f"{weights} does not hold this config's LoRA weights ({len(set(state) ^ expected)} keys "
                          "differ); pass --overwrite_output_dir true to train the adapter again")
    set_peft_model_state_dict(peft_model, state)
    previous = _previous_record(cfg.output_dir)
    if previous.get("global_step") != step:
        previous = {"adapter": str(cfg.output_dir), "global_step": step, "metrics": {}, "seed": cfg.training.seed,
                    "noise_seed": cfg.noise_seed, "temperature": cfg.poc.temperature, "data_file": run.data_file,
                    "world_size": cfg.training.world_size}
    clear_stage(cfg.output_dir)
    (cfg.output_dir / DONE_FILE).unlink(missing_ok=True)
    if cfg.training.should_save:
        _write_adapter(peft_model, run, {**previous, "rebuilt_from": str(ckpt)})
    return cfg.output_dir, peft_model


def run_training(run: PreparedRun, base_model: Any = None) -> tuple[Path, Any]:
    """Train the prepared run (on ``base_model`` if given, else a freshly loaded one).

    Returns the adapter directory and the PEFT model (``.unload()`` gives the clean base back,
    which is how :mod:`poc_lora.ensemble` reuses one base model for several adapters); the model
    is None when the run was already finished (a resume of a finished adapter).
    """
    cfg = run.cfg
    if run.finished:
        _log_finished(cfg)
        return cfg.output_dir, None
    step = _final_step(cfg, run.resume) if run.resume else None
    if step is not None:  # damaged outputs, or a crash between the last checkpoint and the adapter
        return _rebuild(run, base_model, step)
    tokenize_run(run)
    tokenizer, train_ds, eval_ds = run.tokenizer, run.train_dataset, run.eval_dataset
    model = base_model if base_model is not None else load_base_model(cfg)
    peft_model = attach_lora(model, cfg)
    start_output(run)
    trainer = NoisyAdamWTrainer(
        model=peft_model, args=cfg.training, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=data_collator(tokenizer, cfg.data.pad_to_multiple_of),
        temperature=cfg.poc.temperature, noise_seed=cfg.noise_seed,
    )
    if run.resume:
        logger.info("resuming %s from %s", cfg.output_dir, run.resume)
    result = trainer.train(resume_from_checkpoint=run.resume)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    same = _replicas_identical(peft_model)
    if trainer.is_world_process_zero():
        record = training_record(run, trainer.state.global_step, metrics, replicas_identical=same)
        write_trained_adapter(trainer.model, run, record)
        logger.info("adapter written to %s (step %d, train loss %.4f)", cfg.output_dir,
                    trainer.state.global_step, metrics.get("train_loss", float("nan")))
    return cfg.output_dir, peft_model


def train_adapter(
    config: TrainConfig | str | os.PathLike | dict[str, Any], overrides: Sequence[str] = (), *, base_model: Any = None
) -> Path:
    """Train one LoRA adapter with Noisy AdamW; returns its directory (``output_dir``).

    ``config``: a :class:`TrainConfig`, a YAML path or a flat mapping; ``overrides``: ``--key value``
    strings applied on top. ``base_model``: an already loaded base model to attach the LoRA to.

    Raises :class:`~poc_lora.errors.PocLoraError` subclasses for bad input, before the model
    loads: :class:`OutputError` when ``output_dir`` already holds a finished adapter (unless
    ``overwrite_output_dir``; a resume of a finished adapter returns it unchanged) or
    unfinished checkpoints without ``resume_from_checkpoint``, :class:`ConfigError` /
    :class:`DataError` for the config and the data (including data whose responses
    ``cutoff_len`` cuts away entirely).

    Example:
        >>> train_adapter("configs/train/tiny_cpu.yaml", ["--output_dir", "runs/a0", "--seed", "0"])  # doctest: +SKIP
        PosixPath('runs/a0')
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    run = prepare_run(cfg)
    path, _ = run_training(run, base_model)
    return path


def main_train(config_path: str, overrides: Sequence[str]) -> int:
    """``poc-lora train --config CONFIG.yaml [--key value ...]``."""
    path = train_adapter(config_path, overrides)
    logger.info("done: %s (config: %s)", path, path / CONFIG_FILE)
    return 0


__all__ = ["DONE_FILE", "attach_lora", "damage", "data_sha256", "tokenize_run", "train_settings", "is_complete", "last_checkpoint", "load_base_model", "lora_config",
           "load_checked_records", "main_train", "prepare_run", "run_training", "start_output", "train_adapter",
           "training_record", "uses_checkpointing", "checkpointing_kwargs", "write_trained_adapter"]
