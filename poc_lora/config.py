"""Training configuration: YAML + ``--key value`` overrides -> dataclasses.

A config is one flat YAML mapping. Its keys are the fields of :class:`ModelArguments`,
:class:`LoraArguments`, :class:`DataArguments`, :class:`PocArguments` and every field of
``transformers.TrainingArguments``; the names follow the LLM-Adapters reference
(``data_path``, ``cutoff_len``, ``train_on_inputs``, ``val_set_size``, ``lora_r``...) so its users
feel at home. Parsing goes through ``transformers.HfArgumentParser``: the YAML values become the
parser's defaults and the command line overrides them, with the parser's own type conversion
(so ``learning_rate: 3e-4``, which YAML reads as a string, is still a float). An unknown key is a
:class:`~poc_lora.errors.ConfigError` that lists the valid keys. Defaults are the paper's
settings (arXiv:2502.05784).

Example:
    >>> from poc_lora.config import load_config
    >>> cfg = load_config("configs/train/tiny_cpu.yaml", ["--max_steps", "10"])  # doctest: +SKIP
    >>> cfg.training.max_steps, cfg.lora.lora_r  # doctest: +SKIP
    (10, 16)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .data.synthetic import SYNTHETIC_DATA, SYNTHETIC_KINDS, SYNTHETIC_REASONING_DATA  # noqa: F401 (kept importable here)
from .errors import ConfigError
from .outputs import atomic_write_text, write_json

CONFIG_FILE = "poc_lora_config.yaml"
PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass
class ModelArguments:
    """The base model: hub id or local path, dtype, optional 4/8-bit quantisation (QLoRA)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "hub id or local path (required)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bits (bitsandbytes)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the base in 8 bits (bitsandbytes)"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "quantise the quantisation constants"})
    bnb_4bit_compute_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the 4-bit matmuls"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the model repo's own code (only if you trust it)"})


@dataclass
class LoraArguments:
    """The LoRA adapter (PEFT ``LoraConfig``); defaults: r=32, alpha=64, dropout 0.05 on q,k,v,up,down."""

    lora_r: int = field(default=32, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=64, metadata={"help": "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGET_MODULES),
                                           metadata={"help": "module names to adapt (list or comma-separated)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha/sqrt(r)"})
    lora_bias: str = field(default="none", metadata={"help": "PEFT bias: none, all or lora_only"})
    # Typed str so the command line takes "20-29"; __post_init__ turns it into a list of ints.
    lora_layers_to_transform: str | None = field(default=None, metadata={
        "help": "PEFT layers_to_transform: only these decoder layers get a LoRA (list, or 'a-b' range; default all)"})

    def __post_init__(self) -> None:
        self.lora_target_modules = _as_list(self.lora_target_modules)
        self.lora_layers_to_transform = _layer_list(self.lora_layers_to_transform)  # type: ignore[assignment]
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")


@dataclass
class DataArguments:
    """Instruction data (commonsense_170k layout) and its tokenisation; LLM-Adapters' names."""

    data_path: str | None = field(default=None, metadata={
        "help": "JSON/JSONL file, hub dataset id, 'synthetic' (the offline cue-word suites, for the tiny model) "
                "or 'synthetic-reasoning' (natural-language questions, for real models); see synthetic_*"})
    dataset_split: str = field(default="train", metadata={"help": "split to read from a hub dataset"})
    prompt_template: str = field(default="llm-adapters", metadata={"help": "alpaca or llm-adapters"})
    cutoff_len: int = field(default=256, metadata={"help": "maximum tokens per example (prompt + response)"})
    train_on_inputs: bool = field(default=True, metadata={"help": "false: mask the prompt tokens from the loss"})
    add_eos_token: bool = field(default=True, metadata={"help": "append EOS when the example fits in cutoff_len"})
    val_set_size: int = field(default=120, metadata={"help": "records held out for evaluation (0 = none)"})
    val_split_seed: int = field(default=42, metadata={
        "help": "seed of the train/validation split (fixed, so all ensemble members see the same split)"})
    pad_to_multiple_of: int = field(default=8, metadata={"help": "pad batches to a multiple of this length"})
    synthetic_train_per_suite: int = field(default=400, metadata={"help": "data_path=synthetic: train records per suite"})
    synthetic_test_per_suite: int = field(default=100, metadata={"help": "data_path=synthetic: test records per suite"})
    synthetic_label_noise: float = field(default=0.1, metadata={"help": "data_path=synthetic: train label flip rate"})
    synthetic_seed: int = field(default=0, metadata={"help": "data_path=synthetic: generator seed"})

    def __post_init__(self) -> None:
        if self.cutoff_len < 2:
            raise ConfigError(f"cutoff_len must be >= 2, got {self.cutoff_len}")
        if self.val_set_size < 0:
            raise ConfigError(f"val_set_size must be >= 0, got {self.val_set_size}")


@dataclass
class PocArguments:
    """Noisy AdamW: Langevin temperature lambda (paper: 1e-5; ablation 0, 1e-5, 1e-4), noise seed, run options."""

    temperature: float = field(default=1e-5, metadata={"help": "Langevin temperature lambda (0 = plain AdamW)"})
    noise_seed: int | None = field(default=None, metadata={"help": "noise seed (default: the training seed)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace a finished adapter / unfinished checkpoints in output_dir (TrainingArguments lost it in v5)"})

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature!r}")


_GROUPS = (("model", ModelArguments), ("lora", LoraArguments), ("data", DataArguments), ("poc", PocArguments))
# Keys of TrainingArguments.to_dict() that must not be written to disk or fed back.
_NOT_SAVED = {"hub_token", "local_rank"}


@dataclass
class TrainConfig:
    """Everything one adapter's training needs; ``training`` is a ``transformers.TrainingArguments``."""

    model: ModelArguments
    lora: LoraArguments
    data: DataArguments
    poc: PocArguments
    training: Any

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    @property
    def noise_seed(self) -> int:
        """The seed NoisyAdamW uses: ``noise_seed`` if set, else the training seed."""
        return self.training.seed if self.poc.noise_seed is None else self.poc.noise_seed

    def to_dict(self) -> dict[str, Any]:
        """The flat, resolved mapping (feed it back to :func:`load_config` to rerun)."""
        flat: dict[str, Any] = {}
        for name, _ in _GROUPS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        training = {k: v for k, v in self.training.to_dict().items() if k not in _NOT_SAVED}
        flat.update(training)
        return flat

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the resolved config as ``poc_lora_config.yaml`` (and ``.json``) into ``directory``."""
        directory = Path(directory)
        flat = json.loads(json.dumps(self.to_dict(), default=str))  # plain types only
        atomic_write_text(directory / CONFIG_FILE, yaml.safe_dump(flat, sort_keys=False))
        write_json(directory / CONFIG_FILE.replace(".yaml", ".json"), flat)
        return directory / CONFIG_FILE

    def for_member(self, j: int, output_dir: str | os.PathLike) -> "TrainConfig":
        """Ensemble member ``j``: seed, data order seed and noise seed all shifted by ``j``."""
        tr = self.training
        training = dataclasses.replace(
            tr, output_dir=str(output_dir), seed=tr.seed + j,
            data_seed=None if tr.data_seed is None else tr.data_seed + j,
        )
        poc = dataclasses.replace(self.poc, noise_seed=None if self.poc.noise_seed is None else self.poc.noise_seed + j)
        return dataclasses.replace(self, training=training, poc=poc)


class _Parser:
    """HfArgumentParser whose errors are ConfigErrors (argparse would print and exit)."""

    def __new__(cls) -> Any:
        # transformers (seconds to import) loads only to parse a training config: `poc-lora mfnn`
        # reads this module for read_yaml and must not pay for it.
        from transformers import HfArgumentParser, TrainingArguments

        class Parser(HfArgumentParser):
            def error(self, message: str) -> None:  # noqa: D102
                raise ConfigError(f"bad config value: {message}")

        return Parser([cls_ for _, cls_ in _GROUPS] + [TrainingArguments], allow_abbrev=False)


def valid_keys() -> list[str]:
    """Every key a training config may set."""
    from transformers import TrainingArguments  # lazy: see _Parser

    keys = []
    for cls in [c for _, c in _GROUPS] + [TrainingArguments]:
        keys += [f.name for f in dataclasses.fields(cls) if f.init]
    return keys


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    out: list[str] = []
    for v in value:
        out += _as_list(v) if isinstance(v, str) else [v]
    return out


def _layer_list(value: Any) -> list[int] | None:
    """``[20, 21]``, ``"20,21"`` or ``"20-29"`` -> a sorted list of layer indices (None stays None)."""
    if value is None or value == [] or value == "":
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    layers: set[int] = set()
    try:
        for item in items:
            for part in str(item).split(","):
                part = part.strip()
                if "-" in part[1:]:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    layers.update(range(lo, hi + 1))
                elif part:
                    layers.add(int(part))
    except ValueError:
        raise ConfigError(f"lora_layers_to_transform must be layer indices or ranges like 20-29, got {value!r}") from None
    if not layers or min(layers) < 0:
        raise ConfigError(f"lora_layers_to_transform must be non-negative layer indices, got {value!r}")
    return sorted(layers)


def _unknown_key_error(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(sorted(valid))}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def _override_keys(overrides: Sequence[str]) -> list[str]:
    keys = []
    for tok in overrides:
        if tok.startswith("--"):
            keys.append(tok[2:].split("=", 1)[0].replace("-", "_"))
    return keys


def load_config(
    config: str | os.PathLike | dict[str, Any] | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """Parse a YAML file (or a mapping) plus ``--key value`` overrides into a :class:`TrainConfig`.

    Raises :class:`ConfigError` for an unknown key (listing the valid ones), a value of the wrong
    type, or a missing ``model_name_or_path`` / ``data_path`` / ``output_dir``.

    Example:
        >>> cfg = load_config({"model_name_or_path": "poc-lora/tiny-llama", "data_path": "synthetic",
        ...                    "output_dir": "runs/a"}, ["--learning_rate", "1e-3"])  # doctest: +SKIP
    """
    where = "the config mapping"
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, dict):
        values = dict(config)
    else:
        values, where = read_yaml(config), str(config)
    valid = valid_keys()
    for key in values:
        if key not in valid:
            raise _unknown_key_error(str(key), where, valid)
    for key in _override_keys(overrides):
        if key not in valid and not (key.startswith("no_") and key[3:] in valid):
            raise _unknown_key_error(key, "the command-line overrides", valid)
    for key in ("lora_target_modules",):  # list fields: argparse would not split a YAML string
        if isinstance(values.get(key), str):
            values[key] = _as_list(values[key])
    parser = _Parser()
    parser.set_defaults(**values)
    try:
        *groups, training, rest = parser.parse_args_into_dataclasses(args=list(overrides), return_remaining_strings=True)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid configuration ({where} + overrides): {exc}") from None
    if rest:
        raise ConfigError(f"cannot parse the overrides {' '.join(rest)!r}: use --key value pairs "
                          f"(valid keys: {', '.join(sorted(valid))})")
    cfg = TrainConfig(*groups[:4], training=training)
    missing = [k for k, v in (("model_name_or_path", cfg.model.model_name_or_path),
                              ("data_path", cfg.data.data_path)) if not v]
    if not values.get("output_dir") and "output_dir" not in _override_keys(overrides):
        missing.append("output_dir")
    if missing:
        raise ConfigError(f"missing required config key(s) {', '.join(missing)} ({where})")
    return cfg


__all__ = [
    "CONFIG_FILE", "DataArguments", "LoraArguments", "ModelArguments", "PocArguments", "TrainConfig",
    "load_config", "read_yaml", "valid_keys",
]
