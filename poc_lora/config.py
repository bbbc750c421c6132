"""The configuration tree and its one override grammar, for every command.

Sections: ``model`` (:class:`ModelArguments`), ``lora`` (:class:`LoraArguments`), ``data``
(:class:`DataArguments`), ``noise`` (:class:`PocArguments`), ``training`` (every field of
``transformers.TrainingArguments``, which stays their only declaration), ``merge``
(:class:`MergeArguments`), ``eval`` (:class:`EvalArguments`), ``pipeline``
(:class:`PipelineArguments`), and ``mfnn`` (the paper settings of :mod:`poc_lora.mfnn.config`).
Each key has one default, its dataclass field's.

Grammar (:data:`~poc_lora.keyparser.GRAMMAR`, :class:`~poc_lora.keyparser.KeyParser`): ``--key value`` or ``--section.key value`` on the
command line; in YAML ``key: value``, ``section.key: value`` or ``section: {key: value}``. The
dotted form is required only where two sections of one command share a key name (the
pipeline's ``merge.seed`` and ``training.seed``). Underscores only; old dashed spellings are
rewritten with a deprecation warning. The names of the training sections follow the
LLM-Adapters reference (``data_path``, ``cutoff_len``, ``lora_r``...). Parsing goes through the
argparse actions that ``transformers.HfArgumentParser`` builds from the dataclasses: YAML values
become defaults converted by the key's type (so ``learning_rate: 3e-4``, which YAML reads as a
string, is a float) and the command line overrides them. An unknown key is a
:class:`~poc_lora.errors.ConfigError` that names it and the closest valid keys. Defaults are
the paper's settings (Nitanda et al., ICML 2025, arXiv:2502.05784).

Example:
    >>> from poc_lora.config import load_config
    >>> cfg = load_config("configs/train/tiny_cpu.yaml", ["--max_steps", "10", "--lora.lora_r", "8"])  # doctest: +SKIP
    >>> cfg.training.max_steps, cfg.lora.lora_r  # doctest: +SKIP
    (10, 8)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .data.choices import ANSWER_STYLES
from .data.validation import validation_count
from .data.synthetic import SYNTHETIC_DATA, SYNTHETIC_KINDS, SYNTHETIC_REASONING_DATA  # noqa: F401 (kept importable here)
from .errors import ConfigError
from .keyparser import KeyParser, RaisingArgumentParser, read_yaml
from .outputs import atomic_write_text, write_json
from .runtime import resolve_bf16

CONFIG_FILE = "poc_lora_config.yaml"
STRATEGIES = ("sequential", "parallel", "batched")  # how an ensemble's members are trained (poc_lora.ensemble)
DATA_ORDERS = ("per_member", "shared")  # which micro-batch sequence each member reads
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
        "help": "JSON/JSONL file, an LLM-Adapters dataset/ directory (<suite>/train.json of each suite present), "
                "hub dataset id, 'synthetic' (the offline cue-word suites, for the tiny model) "
                "or 'synthetic-reasoning' (natural-language questions, for real models); see synthetic_*"})
    validation_split: float | None = field(default=None, metadata={
        "help": "dataset directories: hold out this many records per suite (a whole number) or this fraction "
                "(0-1), seeded by val_split_seed per suite, never trained on; written as <suite>/test.json under "
                "$POC_LORA_CACHE and evaluated by the pipeline when eval.data_dir is not set"})
    answer_style: str = field(default="label", metadata={
        "help": "training target: label ('the correct answer is answer2', the files as they are), text "
                "('the correct answer is <option text>'; BoolQ stays true/false) or lm-eval (the record rendered "
                "as the lm-evaluation-harness request of its correct option, e.g. 'Question: ...\\nAnswer:' + "
                "' <option text>', exactly what choice mode's lm-eval format scores; needs prompt_template plain "
                "and an LLM-Adapters dataset/ directory)"})
    dataset_split: str = field(default="train", metadata={"help": "split to read from a hub dataset"})
    prompt_template: str = field(default="llm-adapters", metadata={
        "help": "alpaca, llm-adapters or plain (the instruction as it is: answer_style lm-eval)"})
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
        if self.answer_style not in ANSWER_STYLES:
            raise ConfigError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {self.answer_style!r}")
        if self.answer_style == "lm-eval" and self.prompt_template != "plain":
            raise ConfigError(f"answer_style lm-eval trains on lm-evaluation-harness's own prompts; set prompt_template "
                              f"plain (got {self.prompt_template!r}, which would wrap them in another prompt)")
        if self.validation_split is not None:
            validation_count(self.validation_split, 10**12, "validation_split")  # count or fraction?


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


@dataclass
class MergeArguments:
    """Merging the M adapters (poc_lora.merge): methods, rank, seed, density, sign election, serve_rank, weights, dtype."""

    methods: list[str] = field(default_factory=lambda: ["poc"], metadata={
        "help": "pipeline: merge methods to run (poc is the paper's; svd, prune for its variants; soup, ties, "
                "dare_linear, dare_ties, model_stock as baselines)"})
    rank: int | None = field(default=None, metadata={
        "help": "target rank K for svd/prune/ties/dare_linear/dare_ties (pipeline default: one adapter's rank)"})
    seed: int = field(default=0, metadata={"help": "seed for the methods that draw (prune, dare_linear, dare_ties)"})
    density: float | None = field(default=None, metadata={
        "help": "ties/dare_*: fraction of each update's entries kept, in (0, 1] (default 0.5)"})
    majority_sign_method: str | None = field(default=None, metadata={
        "help": "ties/dare_ties sign election: total (sign of the weighted sum) or frequency (default total)"})
    exact_svd: bool | None = field(default=None, metadata={
        "help": "ties/dare_*: true = factorise each full merged update by a full SVD (the earlier exact, slow path; "
                "DARE's draws PEFT's); default: a seeded randomized SVD, blocked, within 1.01x the optimal "
                "squared error"})
    serve_rank: str | None = field(default=None, metadata={
        "help": "auto or N: SVD-truncate every module to the largest vLLM max_lora_rank <= N (auto: the smallest "
                "allowed value >= the merged rank, at most 512); default: no truncation"})
    weights: str | None = field(default=None, metadata={
        "help": "comma-separated weights w_j (default 1/M each); negative allowed"})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype of the written tensors: float32, bfloat16 or float16 (default: that of the inputs)"})
    allow_different_base: bool = field(default=False, metadata={
        "help": "merge adapters whose base_model_name_or_path differ"})

    def __post_init__(self) -> None:
        self.methods = _as_list(self.methods)
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"merge dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"merge rank must be >= 1, got {self.rank}")
        # density, majority_sign_method and serve_rank are checked by the merge itself (one place:
        # poc_lora.merge.methods.resolve_parameters, poc_lora.merge.serving.parse_serve_rank)


EVAL_MODES = ("generate", "rank", "choice")
from .data.requests import CHOICE_FORMATS  # noqa: E402 (choice mode's request formats)


@dataclass
class EvalArguments:
    """Evaluation on the commonsense suites (eval_harness); one default per key for every entry point."""

    data_dir: str | None = field(default=None, metadata={
        "help": "directory holding <suite>/test.json (pipeline default: the synthetic test sets)"})
    tasks: str = field(default="all", metadata={
        "help": "all, available (the suites data_dir holds), or comma-separated suite names"})
    mode: str = field(default="generate", metadata={
        "help": "generate (the paper's beam search + label extraction), rank (log-likelihood of each label) or "
                "choice (log-likelihood of each option's text, lm-evaluation-harness's acc/acc_norm); the pipeline "
                "takes a comma-separated list (choice,rank) and scores every model in each mode"})
    choice_format: str = field(default="lm-eval", metadata={
        "help": "choice mode: lm-eval (lm-evaluation-harness's prompt per suite, ' <option text>') or template "
                "(the adapter's prompt template, 'the correct answer is <option text>', as answer_style text trains)"})
    limit: int | None = field(default=None, metadata={"help": "first N examples per suite (default: all)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    num_beams: int = field(default=4, metadata={"help": "beams in generate mode"})
    max_new_tokens: int = field(default=32, metadata={"help": "new tokens in generate mode"})
    template: str | None = field(default=None, metadata={
        "help": "prompt template for adapters that record none (default: llm-adapters)"})
    include_base: bool = field(default=False, metadata={
        "help": "also evaluate the plain base model (eval: default only when no adapter is given)"})
    batch_models: bool = field(default=True, metadata={
        "help": "rank/choice modes: score all models together, one suite at a time (each prompt read once, the "
                "layers below the first adapted layer shared, results equal to one by one); false: one model "
                "at a time (generate mode always is)"})
    ensemble: bool = field(default=True, metadata={
        "help": "with two or more adapters, also report their output ensemble (rank/choice: mean of the members' "
                "option softmax; generate: majority vote), built from their predictions without a forward pass, "
                "and each model's agreement and KL to it"})

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in EVAL_MODES]
        if bad or not self.modes:
            raise ConfigError(f"eval mode must be {', '.join(EVAL_MODES)} (or a comma-separated list of them), "
                              f"got {self.mode!r}")
        if self.choice_format not in CHOICE_FORMATS:
            raise ConfigError(f"eval choice_format must be {' or '.join(CHOICE_FORMATS)}, got {self.choice_format!r}")
        for name in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval {name} must be >= 1, got {getattr(self, name)}")

    @property
    def modes(self) -> list[str]:
        """``mode`` as a list (``"choice,rank"`` -> ``["choice", "rank"]``); the first is the report's."""
        return [m.strip() for m in str(self.mode).split(",") if m.strip()]


@dataclass
class PipelineArguments:
    """The pipeline (poc_lora.pipeline) and ensemble: training config, number of adapters M, strategy."""

    train_config: str | None = field(default=None, metadata={
        "help": "training YAML (configs/train/*.yaml; relative to the pipeline YAML); required"})
    num_adapters: int = field(default=4, metadata={"help": "number of adapters M (seeds seed+j)"})
    strategy: str | None = field(default=None, metadata={
        "help": "sequential (one process, one member after another), parallel (rank g trains j = g mod G) or "
                "batched (one process, all members in one pass over one base); default: by the number of processes"})
    data_order: str = field(default="per_member", metadata={
        "help": "per_member (member j's data order from seed+j, as the paper trains independent adapters) or "
                "shared (every member reads the same micro-batches; batched then computes the frozen layers "
                "below the first adapted one once for all members)"})
    output_dir: str = field(default="results/pipeline", metadata={"help": "pipeline output directory"})

    def __post_init__(self) -> None:
        if self.num_adapters < 1:
            raise ConfigError(f"num_adapters must be >= 1, got {self.num_adapters}")
        if self.strategy not in (None, *STRATEGIES):
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.data_order not in DATA_ORDERS:
            raise ConfigError(f"data_order must be one of {', '.join(DATA_ORDERS)}, got {self.data_order!r}")


# The configuration tree: section name -> its dataclass ("training" is transformers'
# TrainingArguments, imported on use: it pulls in torch). mfnn's section is the dict of paper
# settings in poc_lora.mfnn.config (nested keys, one set per experiment).
SECTIONS: dict[str, type | None] = {
    "model": ModelArguments, "lora": LoraArguments, "data": DataArguments, "noise": PocArguments,
    "training": None, "merge": MergeArguments, "eval": EvalArguments, "pipeline": PipelineArguments,
}
TRAIN_SECTIONS = ("model", "lora", "data", "noise", "training")
_GROUPS = tuple((name, SECTIONS[name]) for name in TRAIN_SECTIONS[:4])
# Keys of TrainingArguments.to_dict() that must not be written to disk or fed back.
_NOT_SAVED = {"hub_token", "local_rank"}

def section_class(name: str) -> type:
    """The dataclass of config section ``name`` (``training``: ``transformers.TrainingArguments``).

    Raises :class:`ConfigError` for an unknown section.
    """
    if name == "training":
        from transformers import TrainingArguments

        return TrainingArguments
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; valid: {', '.join([*SECTIONS, 'mfnn'])}")
    return SECTIONS[name]  # type: ignore[return-value]


@dataclass
class TrainConfig:
    """Everything one adapter's training needs; ``training`` is a ``transformers.TrainingArguments``."""

    model: ModelArguments
    lora: LoraArguments
    data: DataArguments
    poc: PocArguments
    training: Any

    @property
    def noise(self) -> PocArguments:
        """The ``noise`` section of the configuration tree (the same object as ``poc``)."""
        return self.poc

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


def train_key_parser(parser: argparse.ArgumentParser | None = None) -> KeyParser:
    """The keys of ``poc-lora train``/``ensemble``: model, lora, data, noise and training
    (every ``TrainingArguments`` field) sections, added to ``parser`` (default: one whose errors
    are :class:`ConfigError`)."""
    parser = parser if parser is not None else RaisingArgumentParser(prog="poc-lora train", add_help=False, allow_abbrev=False)
    keys = KeyParser(parser, [(name, section_class(name), None) for name in TRAIN_SECTIONS])
    for action in parser._actions:
        if keys.dests.get(action.dest) == ("training", "bf16"):
            action.type, action.metavar = _bool_or_auto, "{true,false,auto}"
            action.help = ("bfloat16 mixed precision (autocast; LoRA weights and optimizer state stay fp32). "
                           "auto: on where the device computes bf16 natively (CUDA bf16, AVX-512 BF16 or AMX "
                           "CPUs), else off")
    return keys


def _bool_or_auto(text: Any) -> bool | str:
    """A boolean key that also takes ``auto`` (resolved by :func:`load_config`)."""
    from transformers.hf_argparser import string_to_bool

    return "auto" if str(text).lower() == "auto" else string_to_bool(text)


def valid_keys() -> list[str]:
    """Every key a training config may set (flat spelling)."""
    keys = []
    for name in TRAIN_SECTIONS:
        keys += [f.name for f in dataclasses.fields(section_class(name)) if f.init]
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


def load_config(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    updates: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Parse a YAML file (or a mapping), ``updates`` and ``--key value`` overrides into a :class:`TrainConfig`.

    Keys may be flat (``lora_r``), dotted (``lora.lora_r``) or nested under their section (see
    :data:`~poc_lora.keyparser.GRAMMAR`); ``updates`` is such a mapping of typed values applied over the file (the
    pipeline's training keys), ``overrides`` the command-line tokens applied last.

    Raises :class:`ConfigError` for an unknown key (listing the valid ones), a value of the wrong
    type, or a missing ``model_name_or_path`` / ``data_path`` / ``output_dir``.

    Example:
        >>> cfg = load_config({"model_name_or_path": "poc-lora/tiny-llama", "data_path": "synthetic",
        ...                    "output_dir": "runs/a"}, ["--learning_rate", "1e-3"])  # doctest: +SKIP
    """
    where = "the config mapping"
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        values, where = read_yaml(config), str(config)
    keys = train_key_parser()
    flat = keys.flatten(values, where)
    flat.update(keys.flatten(updates or {}, "the config updates"))
    if isinstance(flat.get("lora_target_modules"), str):  # list field: argparse would not split a YAML string
        flat["lora_target_modules"] = _as_list(flat["lora_target_modules"])
    try:
        _, sections = keys.parse(list(overrides), flat)
        training = sections["training"]
        if "bf16" in training:  # `auto` -> what the training device computes natively
            training["bf16"] = resolve_bf16(training["bf16"], use_cpu=bool(training.get("use_cpu")))
        groups = {name: section_class(name)(**sections[name]) for name in TRAIN_SECTIONS}
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({where} + overrides)") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid configuration ({where} + overrides): {exc}") from None
    cfg = TrainConfig(groups["model"], groups["lora"], groups["data"], groups["noise"], training=groups["training"])
    missing = [k for k, v in (("model_name_or_path", cfg.model.model_name_or_path),
                              ("data_path", cfg.data.data_path)) if not v]
    if "output_dir" not in sections["training"]:
        missing.append("output_dir")
    if missing:
        raise ConfigError(f"missing required config key(s) {', '.join(missing)} ({where})")
    return cfg


__all__ = [
    "CONFIG_FILE", "DATA_ORDERS", "DataArguments", "EvalArguments", "LoraArguments", "MergeArguments",
    "ModelArguments", "PipelineArguments", "PocArguments", "SECTIONS", "STRATEGIES", "TRAIN_SECTIONS", "TrainConfig",
    "load_config", "section_class", "train_key_parser", "valid_keys",
]
