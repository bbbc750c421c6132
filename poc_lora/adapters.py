"""PEFT LoRA adapter directories: reading, validating, lazy tensor access, streaming writing.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``). :func:`load_adapter` reads the config, refuses anything whose
update is not ``s * B @ A`` on the unmodified base (an allowlist of config fields and
``init_lora_weights`` values: DoRA, KaSA, PiSSA, LoftQ, other PEFT types... are refused),
parses the tensor keys into :class:`LoraModule` records (rank, alpha, scale resolved per
module, ``rank_pattern`` / ``alpha_pattern`` / rsLoRA included; keys with or without PEFT's
``base_model.model.`` prefix) and gives lazy access to the tensors.
:func:`expand_adapter_inputs` turns the user's arguments into adapter directories by one
documented rule. :func:`read_adapter_config` and :func:`load_adapter_state` are the safe
readers for other commands (every failure is an :class:`AdapterError` naming the file).
The tensor files themselves are read and written by :mod:`poc_lora.safetensors_io`.

Example:
    >>> from poc_lora.adapters import load_adapter
    >>> ad = load_adapter("runs/adapter_0")  # doctest: +SKIP
    >>> m = ad.modules["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    >>> A, B = ad.read(m.a_key), ad.read(m.b_key)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .data.templates import TEMPLATE_RECORD_FILE
from .errors import AdapterError, OutputError
from .outputs import sha256_file  # re-exported: the one file hash, used by stage markers too
from .safetensors_io import TensorFile, TensorInfo

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# adapter_config.json is checked against an allowlist: a field is accepted only if it is known
# to leave the update a plain s * B @ A on the unmodified base (or only selects where it goes).
# A field that is not listed is accepted only when it is off (null / false / empty), so a
# feature added by a later PEFT release is refused until someone checks what it does.
_PLAIN_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
    "bias", "lora_bias", "modules_to_save", "runtime_config", "megatron_core", "qalora_group_size",
    "alora_invocation_tokens",  # checked equal across inputs; refused for merge_into_base
    # parameters of an initialisation; what matters is init_lora_weights (checked below)
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",
})
# Fields that must be off; the reason is given when one is on.
_OFF_FIELDS = {
    "use_dora": "DoRA rescales W0 + s*B@A column-wise by a learned magnitude",
    "kasa_config": "KaSA inserts a learned diagonal between A and B and edits W0",
    "use_qalora": "QALoRA pools the input before A",
    "monteclora_config": "MonteCLoRA samples its update",
    "use_bdlora": "BD-LoRA constrains A or B to be block-diagonal",
    "arrow_config": "Arrow routes between adapters per token",
    "velora_config": "VeLoRA changes how the LoRA path is computed",
    "trainable_token_indices": "trainable tokens are a separate, non-LoRA update",
    "target_parameters": "LoRA on nn.Parameter (MoE experts) uses another key layout",
    "layer_replication": "layer replication changes the base model's layer stack",
    "megatron_config": "Megatron parallel layers store sharded LoRA factors",
    "ensure_weight_tying": "it ties modules_to_save / trainable tokens across tied modules",
}
# init_lora_weights values verified in PEFT's LoraLayer.update_layer to leave the base weight
# untouched (so the trained adapter is s*B@A on the original base): True (kaiming A, zero B),
# False (random B), "gaussian", "eva" (zero B, A set from activations), "orthogonal" (A, B from
# a random orthogonal matrix). PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA subtract an initial update
# from the base (or quantize it) and re-run that at load time; MiCA is a LoRA variant.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_CONVERTIBLE_INITS = ("pissa", "olora", "corda")
_CONVERSION_RECIPE = (
    "convert it to a plain LoRA first, as PEFT does: save the adapter right after get_peft_model "
    "(before training) to INIT_DIR, then save the trained one with "
    "model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT_DIR); OUT is a plain "
    "LoRA of rank 2r on the original base that merges exactly"
)


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and not value)


def check_plain_lora_config(cfg: dict[str, Any], label: str, cfg_path: Path | str) -> None:
    """Refuse a LoRA config whose update is not ``s * B @ A`` on the unmodified base.

    An allowlist: fields in ``_PLAIN_FIELDS`` are accepted, fields in ``_OFF_FIELDS`` and any
    unknown field only when off (null/false/empty), and ``init_lora_weights`` only with a
    value in :data:`PLAIN_INITS`. PiSSA/OLoRA/CorDA adapters get PEFT's conversion recipe.

    Raises:
        AdapterError: naming ``label``, the file and the field.
    """
    init = cfg.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
        where = f"{label}: init_lora_weights={init!r} in {cfg_path}"
        if isinstance(init, str) and init.lower().startswith(_CONVERTIBLE_INITS):
            raise AdapterError(
                f"{where}: this initialisation subtracts an initial update from the base weights, and PEFT "
                f"re-runs it when loading, so the adapter's tensors are not an update of the original base "
                f"and cannot be merged as they are; {_CONVERSION_RECIPE}"
            )
        raise AdapterError(
            f"{where}: only adapters initialised with {', '.join(map(repr, PLAIN_INITS))} are known to be "
            f"a plain s*B@A on the unmodified base (LoftQ, LoRA-GA, MiCA and unknown initialisations are "
            f"not); for PiSSA/OLoRA/CorDA {_CONVERSION_RECIPE}"
        )
    for name, value in cfg.items():
        if name in _PLAIN_FIELDS or name == "init_lora_weights" or _is_off(value):
            continue
        why = _OFF_FIELDS.get(name, "this field is not known to leave the update a plain s*B@A")
        raise AdapterError(
            f"{label}: field {name}={value!r} in {cfg_path}: {why}, so its update is not "
            f"s*B@A and cannot be merged by concatenating (B, A)"
        )


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)


@dataclass
class LoraModule:
    """One adapted module of one adapter: ``delta W = scale * B @ A`` (+ ``scale * bias``)."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" (incl. Conv1D / conv) or "embedding"
    a_key: str
    b_key: str
    bias_key: str | None
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float

    def peft_key(self, part: str) -> str:
        """The key of ``part`` ("A", "B" or "bias") in PEFT's canonical layout."""
        if part == "bias":
            return f"{PEFT_PREFIX}{self.name}.lora_B.bias"
        return f"{PEFT_PREFIX}{self.name}." + (f"lora_embedding_{part}" if self.kind == "embedding"
                                               else f"lora_{part}.weight")


@dataclass
class Adapter:
    """One PEFT LoRA adapter directory, parsed and validated, tensors not yet read."""

    path: Path
    label: str
    config: dict[str, Any]
    weight_file: Path
    tensors: TensorFile
    modules: dict[str, LoraModule]
    full_keys: list[str]  # modules_to_save weights, trained bias terms, saved embeddings (PEFT layout)
    template_record: dict[str, Any] | None = None
    key_map: dict[str, str] = field(default_factory=dict)  # PEFT-layout key -> key in the file

    def info(self, key: str) -> TensorInfo:
        """dtype/shape of ``key`` (a key in PEFT's layout or in the file)."""
        return self.tensors.info[self.key_map.get(key, key)]

    def read(self, key: str) -> torch.Tensor:
        return self.tensors.read(self.key_map.get(key, key))

    def read_checked(self, key: str) -> torch.Tensor:
        t = self.read(key)
        check_finite(t, self.label, key)
        return t

    def close(self) -> None:
        self.tensors.close()


def check_finite(t: torch.Tensor, label: str, key: str) -> None:
    """Raise :class:`AdapterError` if ``t`` holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{label}: tensor {key} contains NaN or Inf values")


MERGE_REPORT_NAME = "merge_report.json"  # marks a directory written by poc-lora merge
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


def _natural_key(p: Path) -> list[Any]:
    """adapter_2 before adapter_10: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def expand_adapter_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand the user's adapter arguments by one predictable rule.

    * A directory holding ``adapter_config.json`` is one input, whatever its name (an
      explicitly named Trainer ``checkpoint-N`` or earlier merge is used as asked).
    * Any other directory stands for its immediate children that hold ``adapter_config.json``,
      in natural order (``adapter_2`` before ``adapter_10``), except Trainer ``checkpoint-N``
      folders, earlier merge outputs (they hold ``merge_report.json``) and hidden folders.
      A child with adapter weights but no ``adapter_config.json`` is an error (a broken
      adapter is never skipped or replaced by one of its checkpoints); other children are
      ignored. Nothing below the immediate children is looked at.

    Returns ``(inputs, skipped)``; ``skipped`` lists ``(path, reason)`` for the children left
    out, so a caller can show them.

    Raises:
        AdapterError: a path does not exist, is a file, a child is a broken adapter, or a
            directory expands to no adapter (its checkpoints are named in the message).

    Example:
        >>> dirs, skipped = expand_adapter_inputs(["runs/"])  # doctest: +SKIP
    """
    out: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise AdapterError(f"adapter directory {p} does not exist")
        if not p.is_dir():
            raise AdapterError(f"{p} is a file, not an adapter directory (pass the directory holding {CONFIG_NAME})")
        if (p / CONFIG_NAME).exists():
            out.append(p)
            continue
        found: list[Path] = []
        checkpoints: list[Path] = []
        for d in sorted((d for d in p.iterdir() if d.is_dir()), key=_natural_key):
            if d.name.startswith("."):
                continue
            if _CHECKPOINT_DIR.match(d.name):
                checkpoints.append(d)
                skipped.append((d, "a Trainer checkpoint"))
            elif (d / MERGE_REPORT_NAME).exists():
                skipped.append((d, f"an earlier merge output ({MERGE_REPORT_NAME})"))
            elif (d / CONFIG_NAME).exists():
                found.append(d)
            elif (d / SAFETENSORS_NAME).exists() or (d / BIN_NAME).exists():
                raise AdapterError(f"{d} holds adapter weights but no {CONFIG_NAME}: a broken adapter; repair or "
                                   f"remove it, or list the adapters to merge explicitly")
        if not found:
            hint = (f"; its Trainer checkpoints ({', '.join(c.name for c in checkpoints)}) are never used in place "
                    f"of an adapter, pass one explicitly if you mean it") if checkpoints else ""
            raise AdapterError(f"{p} has no {CONFIG_NAME} and holds no adapter directories{hint}")
        out.extend(found)
    return out, skipped


def resolve_adapter_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The inputs of :func:`expand_adapter_inputs`, without the skipped list."""
    return expand_adapter_inputs(paths)[0]


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """Value of PEFT's ``rank_pattern``/``alpha_pattern`` for ``module`` (PEFT's own matcher)."""
    if not pattern:
        return default
    # lazy: peft (seconds to import) is needed only for adapters with rank/alpha patterns
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(pattern.keys(), module)
    return pattern.get(key, default)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def read_adapter_config(path: str | Path, label: str | None = None) -> dict[str, Any]:
    """Read and check ``<path>/adapter_config.json`` of a LoRA adapter directory.

    Raises:
        AdapterError: naming the directory or file when ``path`` is not a directory, the
            config is missing, a directory, empty, not JSON, not a LORA config, or describes
            an update that is not a plain ``s * B @ A`` (see :func:`check_plain_lora_config`).

    Example:
        >>> cfg = read_adapter_config("runs/adapter_0")  # doctest: +SKIP
        >>> cfg["r"]  # doctest: +SKIP
    """
    path = Path(path)
    label = label or f"adapter {path}"
    if not path.exists():
        raise AdapterError(f"{label}: {path} does not exist")
    if not path.is_dir():
        raise AdapterError(f"{label}: {path} is a file, not an adapter directory (pass the directory holding "
                           f"{CONFIG_NAME} and {SAFETENSORS_NAME})")
    cfg_path = path / CONFIG_NAME
    if cfg_path.is_dir():
        raise AdapterError(f"{label}: {cfg_path} is a directory, not a JSON file")
    if not cfg_path.is_file():
        raise AdapterError(f"{label}: {cfg_path} not found (not a PEFT adapter directory)")
    try:
        text = cfg_path.read_text(encoding="utf-8")
        if not text.strip():
            raise AdapterError(f"{label}: {cfg_path} is empty")
        cfg = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{label}: cannot parse {cfg_path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}: {cfg_path} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{label}: peft_type is {cfg.get('peft_type')!r} in {cfg_path}; only LORA adapters can be merged"
        )
    check_plain_lora_config(cfg, label, cfg_path)
    for name in ("r", "lora_alpha"):
        if not isinstance(cfg.get(name), (int, float)) or cfg[name] <= 0:
            raise AdapterError(f"{label}: field {name} in {cfg_path} must be a positive number, got {cfg.get(name)!r}")
    return cfg


def adapter_weight_file(path: str | Path, label: str | None = None) -> Path:
    """``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` in ``path``.

    Raises:
        AdapterError: naming the file when neither exists or one is not a regular file.
    """
    path = Path(path)
    label = label or f"adapter {path}"
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (path / name).is_file():
            return path / name
        if (path / name).exists():
            raise AdapterError(f"{label}: {path / name} is not a regular file (a directory?)")
    raise AdapterError(f"{label}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found in {path}")


def open_adapter_weights(path: str | Path, label: str | None = None) -> TensorFile:
    """Open the adapter's weight file lazily (safetensors validated, ``.bin`` weights-only).

    Raises:
        AdapterError: naming the file when it is missing, empty, truncated, not safetensors, or
            a pickle holding anything but tensors (nothing in it runs).
    """
    path = Path(path)
    label = label or f"adapter {path}"
    weight_file = adapter_weight_file(path, label)
    if weight_file.stat().st_size == 0:
        raise AdapterError(f"{label}: {weight_file} is empty")
    return TensorFile(weight_file, label)


def load_adapter_state(path: str | Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an adapter directory's weight file, read safely, as a dict.

    Example:
        >>> sd = load_adapter_state("runs/adapter_0")  # doctest: +SKIP

    Raises:
        AdapterError: as :func:`open_adapter_weights`.
    """
    tf = open_adapter_weights(path, label)
    try:
        return {k: tf.read(k) for k in tf.keys()}
    finally:
        tf.close()


def _canonical_layout(keys: list[str], label: str, path: Path) -> dict[str, str]:
    """Map each key to PEFT's canonical layout (``base_model.model.<module>...``).

    PEFT saves every key with the ``base_model.model.`` prefix and loads nothing from keys
    without it (they are reported as unexpected and the LoRA stays at its initial value).
    Files written by other tools often drop the prefix; their keys are then module paths of
    the base model and mean the same thing. A file that mixes both layouts is ambiguous.
    """
    with_prefix = [k for k in keys if k.startswith(PEFT_PREFIX)]
    without = [k for k in keys if not k.startswith(PEFT_PREFIX)]
    if with_prefix and without:
        raise AdapterError(
            f"{label}: {path} mixes keys with the {PEFT_PREFIX!r} prefix (e.g. {with_prefix[0]}) and without it "
            f"(e.g. {without[0]}); PEFT's layout prefixes every key, so this file is ambiguous"
        )
    if without:
        logger.info("%s: keys in %s lack PEFT's %r prefix; read as module paths of the base", label, path, PEFT_PREFIX)
    return {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): k for k in keys}


def attach_peft_adapter(model: Any, path: str | Path, adapter_name: str, label: str | None = None) -> Any:
    """Attach the adapter directory ``path`` to ``model`` with PEFT, reading its weights as the project does.

    ``model`` is a base model (a ``PeftModel`` is returned, as ``PeftModel.from_pretrained``)
    or a ``PeftModel`` (the adapter is added to it, as ``load_adapter``; the same model is
    returned). PEFT builds the adapter's layers from its config; the weights then come from the
    file in PEFT's canonical layout (:func:`_canonical_layout`: keys without the
    ``base_model.model.`` prefix, which PEFT alone would skip, silently leaving the LoRA at its
    initial value, so the model scored as the base). Keys PEFT's layout does not have (such as
    ``lora_A.default.weight``, PEFT's in-memory name) are refused, as :func:`load_adapter` does.

    Raises:
        AdapterError: naming the keys when a LoRA tensor of the file matches no layer PEFT built
            from the config (a renamed or foreign module) or a LoRA layer gets no tensor from the
            file; as :func:`open_adapter_weights` for an unreadable file.

    Example:
        >>> model = attach_peft_adapter(base, "runs/adapter_0", "a0")  # doctest: +SKIP
    """
    import warnings

    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(path)
    label = label or f"adapter {path}"
    tensors = open_adapter_weights(path, label)  # safe reading first: nothing in a pickle runs
    try:
        layout = _canonical_layout(tensors.keys(), label, tensors.path)
        state = {canon: tensors.read(key) for canon, key in layout.items()}
    finally:
        tensors.close()
    with warnings.catch_warnings():  # its missing keys are checked below, against the file's own layout
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name)
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    unmatched = sorted(k for k in state if "lora_" in k and k not in expected)
    missing = sorted(k for k in expected if "lora_" in k and k not in state)
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} LoRA tensor(s) of the file match no layer of the base that its config "
                        f"targets: {', '.join(layout[k] for k in unmatched[:6])}")
    if missing:
        problems.append(f"{len(missing)} LoRA weight(s) get no tensor from the file: {', '.join(missing[:6])}")
    if problems:
        raise AdapterError(f"{label}: {'; '.join(problems)} (a partial adapter would be evaluated as if it were whole)")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    return model


def parse_modules(cfg: dict[str, Any], tensors: TensorFile, label: str) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Group LoRA keys by module and resolve each module's rank, alpha and scale.

    Returns the modules (named by their path in the base model) and the non-LoRA tensors
    (modules_to_save, trained biases, PEFT's saved embedding copies) as a map from the key in
    PEFT's canonical layout to the key in the file.
    """
    parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for canon, key in _canonical_layout(tensors.keys(), label, tensors.path).items():
        m = _LORA_KEY.match(canon)
        if m:
            parts.setdefault(m["module"], {})[m["part"]] = key
        elif "lora_" in canon:
            raise AdapterError(f"{label}: unsupported LoRA tensor {key} (DoRA magnitude, unsaved adapter name, ...)")
        else:
            full[canon] = key
    modules: dict[str, LoraModule] = {}
    use_rslora = bool(cfg.get("use_rslora", False))
    for prefix, p in sorted(parts.items()):
        kind = "embedding" if "lora_embedding_A" in p or "lora_embedding_B" in p else "linear"
        a_part, b_part = (
            ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        )
        if a_part not in p or b_part not in p:
            raise AdapterError(f"{label}: module {prefix} has only one of {a_part} / {b_part}")
        a_shape, b_shape = tensors.info[p[a_part]].shape, tensors.info[p[b_part]].shape
        if len(a_shape) < 2 or len(b_shape) < 2 or b_shape[1] != a_shape[0]:
            raise AdapterError(
                f"{label}: module {prefix}: inconsistent shapes {a_part} {list(a_shape)} and {b_part} {list(b_shape)}"
            )
        name = prefix[len(PEFT_PREFIX):]
        rank = a_shape[0]
        r_cfg = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        if int(r_cfg) != rank:
            raise AdapterError(
                f"{label}: module {name} has rank {rank} in its tensors but r={r_cfg} in adapter_config.json"
            )
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
        modules[name] = LoraModule(
            name=name, kind=kind, a_key=p[a_part], b_key=p[b_part], bias_key=p.get("lora_B.bias"),
            a_shape=a_shape, b_shape=b_shape, rank=rank, alpha=alpha, scale=lora_scale(alpha, rank, use_rslora),
        )
    if not modules:
        raise AdapterError(f"{label}: {tensors.path} holds no LoRA tensors")
    return modules, dict(sorted(full.items()))


def load_adapter(path: str | Path, label: str | None = None) -> Adapter:
    """Read and validate one adapter directory (tensors stay on disk until read).

    Raises:
        AdapterError: naming the directory or file for every unreadable or unsupported input
            (see :func:`read_adapter_config`, :func:`open_adapter_weights`).
    """
    path = Path(path)
    label = label or f"adapter {path}"
    cfg = read_adapter_config(path, label)
    tensors = open_adapter_weights(path, label)
    weight_file = tensors.path
    try:
        modules, full = parse_modules(cfg, tensors, label)
    except BaseException:
        tensors.close()
        raise
    record = None
    rec_path = path / TEMPLATE_RECORD_FILE
    if rec_path.is_file():
        try:
            record = json.loads(rec_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            tensors.close()
            raise AdapterError(f"{label}: cannot parse {rec_path}: {exc}") from None
    return Adapter(path, label, cfg, weight_file, tensors, modules, list(full), record, full)


def is_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or lies below it (after resolving links)."""
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


def check_output_not_input(output: Path, inputs: Iterable[Path]) -> None:
    for p in inputs:
        if is_inside(output, p) or is_inside(p, output):
            raise OutputError(f"output {output} is, lies inside, or contains the input {p}; choose another --output")
