"""The model card of a trained adapter (:func:`write_training_card`, called by ``poc_lora.train``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ..adapters import sha256_file
from ..citation import PAPER
from ._common import (PAPER_LORA, TRAINING_KEY, _adapter_metadata, _base_card, _card, _citation, _hub_dataset,
                      _num, _read_json, _table, _usage, _write, _yaml_block)

logger = logging.getLogger(__name__)


def training_values(cfg: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """The training essentials a card records (exact values): λ, lr, steps, seeds, data and its sha256.

    ``cfg``: the run's :class:`~poc_lora.config.TrainConfig`; ``record``: its ``poc_lora_train.json``.
    ``data_sha256`` is None when the data are not a local file (a hub dataset id).

    Example:
        >>> training_values(cfg, json.loads(Path("runs/a0/poc_lora_train.json").read_text()))["temperature"]  # doctest: +SKIP
        1e-05
    """
    tr, lo, data = cfg.training, cfg.lora, cfg.data
    data_file = record.get("data_file")
    is_file = bool(data_file) and Path(data_file).is_file()
    metrics = record.get("metrics") or {}
    world = int(getattr(tr, "world_size", 1) or 1)
    return {
        "base_model": cfg.model.model_name_or_path,
        "optimizer": "NoisyAdamW",
        "temperature": cfg.poc.temperature,
        "learning_rate": tr.learning_rate,
        "lr_scheduler_type": str(getattr(tr.lr_scheduler_type, "value", tr.lr_scheduler_type)),
        "warmup_steps": tr.warmup_steps,
        "weight_decay": tr.weight_decay,
        "max_steps": tr.max_steps,
        "num_train_epochs": tr.num_train_epochs,
        "global_step": record.get("global_step"),
        "per_device_train_batch_size": tr.per_device_train_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "world_size": world,
        "seed": tr.seed,
        "noise_seed": cfg.noise_seed,
        "data_seed": tr.data_seed,
        "lora_r": lo.lora_r,
        "lora_alpha": lo.lora_alpha,
        "lora_dropout": lo.lora_dropout,
        "lora_target_modules": list(lo.lora_target_modules),
        "use_rslora": lo.use_rslora,
        "data_path": data.data_path,
        "data_file": str(data_file) if data_file else None,
        "data_sha256": sha256_file(Path(data_file)) if is_file else None,
        "prompt_template": data.prompt_template,
        "cutoff_len": data.cutoff_len,
        "train_on_inputs": data.train_on_inputs,
        "train_records": record.get("train_records"),
        "val_records": record.get("val_records"),
        "train_loss": metrics.get("train_loss"),
    }


def training_card(directory: str | Path, cfg: Any, record: Mapping[str, Any]) -> Any:
    """The card of a trained adapter in ``directory`` (which holds its ``adapter_config.json``).

    Example:
        >>> training_card("runs/a0", cfg, record).data.tags  # doctest: +SKIP
        ['base_model:adapter:poc-lora/tiny-llama', 'lora', 'noisy-adamw', 'transformers', 'poc-lora']
    """
    directory = Path(directory)
    name = Path(cfg.training.output_dir).name  # ``directory`` may be the temporary sibling
    adapter_config = _read_json(directory / "adapter_config.json") or {}
    v = training_values(cfg, record)
    base = adapter_config.get("base_model_name_or_path") or v["base_model"]
    base_card = _base_card(base)
    tags = ["noisy-adamw"] if v["temperature"] > 0 else ["adamw"]
    meta = _adapter_metadata({**adapter_config, "base_model_name_or_path": base}, tags)
    meta.update(license=getattr(getattr(base_card, "data", None), "license", None), datasets=_hub_dataset(v["data_path"]))
    batch = v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] * v["world_size"]
    steps = v["global_step"] if v["global_step"] is not None else v["max_steps"]
    data = v["data_path"] if v["data_path"] != "synthetic" else "synthetic commonsense suites (offline)"
    rows = [
        ("base model", base),
        ("optimizer", f"Noisy AdamW, temperature λ = {_num(v['temperature'])}" + (" (= AdamW)" if v["temperature"] == 0 else "")),
        ("learning rate", f"{_num(v['learning_rate'])} ({v['lr_scheduler_type']}, {_num(v['warmup_steps'])} warm-up steps)"),
        ("steps", f"{steps} " + (f"(max_steps {v['max_steps']})" if v["max_steps"] and v["max_steps"] > 0
                                 else f"({_num(v['num_train_epochs'])} epochs)")),
        ("batch", f"{batch} = {v['per_device_train_batch_size']} per device × {v['gradient_accumulation_steps']} "
                  f"accumulation × {v['world_size']} process(es)"),
        ("seed / noise seed", f"{v['seed']} / {v['noise_seed']}"),
        ("LoRA", f"r = {v['lora_r']}, α = {_num(v['lora_alpha'])}, dropout {_num(v['lora_dropout'])}, rsLoRA "
                 f"{'yes' if v['use_rslora'] else 'no'}, on {', '.join(v['lora_target_modules'])}"),
        ("data", f"{data}; {v['train_records']} training / {v['val_records']} validation records"),
        ("data file sha256", f"`{v['data_sha256']}`" if v["data_sha256"] else "n/a (not a local file)"),
        ("prompt template", f"{v['prompt_template']} (cutoff {v['cutoff_len']} tokens)"),
        ("final training loss", _num(v["train_loss"])),
    ]
    body = f"""
# LoRA adapter for {base}, trained with Noisy AdamW

A PEFT LoRA adapter trained by poc-lora with **Noisy AdamW**: after every AdamW update each
trainable parameter receives Gaussian noise `sqrt(2·λ·η_k)·N(0, 1)` (η_k the learning rate of
step k), the mean-field Langevin training of {PAPER} ({PAPER_LORA}).
Several adapters trained like this with different seeds are meant to be combined by the PoC
merge (`poc-lora merge`), which averages their updates ΔW = (1/M) Σ_j s_j B_j A_j.

## Training

{_table(("setting", "value"), rows)}

The exact values (`poc_lora_config.yaml` in this directory reruns the training:
`poc-lora train --config {name}/poc_lora_config.yaml`):

{_yaml_block(TRAINING_KEY, v)}

## Usage

{_usage(base, name, adapter=True)}

{_citation()}
"""
    return _card(meta, body)


def write_training_card(directory: str | Path, cfg: Any, record: Mapping[str, Any]) -> Path | None:
    """Write :func:`training_card` as ``directory/README.md`` (replacing PEFT's empty template).

    A card that cannot be built (e.g. the data file became unreadable) is logged and skipped
    (None): the adapter it describes cost hours of training and must not be lost over its card.

    Example:
        >>> write_training_card(tmp, run.cfg, record)  # doctest: +SKIP
        PosixPath('.../README.md')
    """
    try:
        card = training_card(directory, cfg, record)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logger.warning("no model card for %s: %s: %s", cfg.training.output_dir, type(exc).__name__, exc)
        return None
    return _write(Path(directory), card)
