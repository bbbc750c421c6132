"""Merge into the base model: the merged update added to the base's safetensors shards.

:class:`BaseMerge` checks everything before the output exists (the base is a safetensors
checkpoint and not quantized, every adapter tensor's shape fits the base tensor it updates),
then writes the base one tensor of one shard at a time: ``W + b @ a`` for adapted modules (the
plan's method gives ``b``, ``a``), the merged lora_B bias added to the base bias, merged
``modules_to_save`` tensors in place of the base's. Tied input/output embeddings are untied in
the written model when the adapter changes one of them (PEFT's loaded adapter changes only that
side; keeping the tie would apply the change to both). The written ``config.json`` describes the
written tensors (dtype, tying); tokenizer and generation files are copied.

Example:
    >>> base = BaseMerge(plan, "meta-llama/Llama-2-7b-hf", None)  # doctest: +SKIP
    >>> per_module = base.write(tmp_dir, ModuleMerger(plan))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm

from ..adapters import PEFT_PREFIX
from ..errors import AdapterError, ConfigError
from ..outputs import write_json
from ..safetensors_io import SafetensorsStreamWriter, TensorFile
from .compute import ModuleMerger, merged_full_tensor, merged_lora_bias
from .plan import MergePlan
from .stats import ModuleStats

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5",
                    ".safetensors.index.json", ".bin.index.json")
_INDEX_NAME = "model.safetensors.index.json"


def _resolve_base(base_model: str | Path) -> Path:
    """A local model directory, or a hub id fetched with ``snapshot_download`` (which honours
    HF_HUB_OFFLINE and the local cache). Embedded ids and .gguf files resolve to their local copy."""
    # lazy: poc_lora.models imports transformers and datasets (about 250 MiB of RSS, seconds), which
    # a plain adapter merge never needs (scripts/bench_merge.py: 223 vs 469 MiB at import)
    from ..models import resolve_model_path

    p = Path(resolve_model_path(str(base_model)))
    if p.is_dir():
        return p
    if p.exists():
        raise AdapterError(f"base model {base_model}: {p} is a file, not a model directory")
    try:
        return Path(snapshot_download(str(base_model), allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, no network...
        raise ConfigError(f"base model {base_model!r} is not a local directory and could not be fetched "
                          f"from the hub ({type(exc).__name__}: {exc})") from None


def _drop_first(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else key


# bitsandbytes (LLM.int8 .SCB/weight_format; 4-bit .absmax/.quant_map/.quant_state.*, nested_* with
# double quantization) and GPTQ/AWQ (.qweight/.qzeros/.g_idx) state saved beside the weights
_QUANT_KEY_SUFFIXES = (".SCB", ".weight_format", ".absmax", ".quant_map", ".qweight", ".qzeros", ".g_idx")
_QUANT_KEY_PARTS = (".quant_state", ".nested_absmax", ".nested_quant_map")
_QUANT_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
_BASE_CONFIG = "config.json"


def _read_base_config(d: Path, label: str) -> dict[str, Any]:
    path = d / _BASE_CONFIG
    if not path.is_file():
        raise AdapterError(f"{label}: {path} not found (not a transformers model directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{label}: cannot parse {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}: {path} is not a JSON object")
    return cfg


def _config_quantization(cfg: dict[str, Any]) -> str | None:
    for c in (cfg, cfg.get("text_config")):
        q = c.get("quantization_config") if isinstance(c, dict) else None
        if q:
            if not isinstance(q, dict):
                return f"quantization_config={q!r} in config.json"
            bits = [k for k in ("load_in_8bit", "load_in_4bit") if q.get(k)]
            return (f"quantization_config with quant_method={q.get('quant_method', 'unknown')!r}"
                    + (f" ({', '.join(bits)})" if bits else "") + " in config.json")
    return None


def _tensor_quantization(files: dict[str, TensorFile]) -> str | None:
    for f in files.values():
        for key, info in f.info.items():
            if key.endswith(_QUANT_KEY_SUFFIXES) or any(part in key for part in _QUANT_KEY_PARTS):
                return f"quantization state tensor {key} in {f.path.name}"
            if key.endswith(".weight") and info.dtype in _QUANT_DTYPES:
                return f"weight {key} stored as {str(info.dtype).replace('torch.', '')} in {f.path.name}"
    return None


def _refuse_quantized(label: str, what: str) -> None:
    raise ConfigError(
        f"{label} is quantized ({what}): adding the merged update to quantized weights would round it away "
        f"or corrupt them, so nothing was written. Dequantize the base first (e.g. load it with transformers, "
        f"call model.dequantize() and save_pretrained it in bfloat16/float32) and merge into that, or keep the "
        f"merged adapter unmerged (drop --merge-into-base) and load it on the quantized base with PEFT"
    )


def _tied_embedding_keys(d: Path, cfg: dict[str, Any], label: str) -> tuple[str, str] | None:
    """``(input embedding key, output embedding key)`` when the base ties them, else None.

    Which modules are the embeddings is asked of transformers: the model class is built on the
    meta device (no weights, no memory) from the local config, without remote code.
    """
    # imported here: transformers takes 2.7 s to import (measured, loaded 2-core machine) and only
    # a merge into a base with tied embeddings needs it, not every adapter merge
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(d), trust_remote_code=False)
        tied = getattr(config, "tie_word_embeddings", None)
        if tied is None:
            tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        if not tied:
            return None
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
        names = {id(m): n for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is None or out is None:
            return None
        return f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"
    except Exception as exc:  # an architecture this transformers does not know
        if cfg.get("tie_word_embeddings") is False:
            return None
        raise ConfigError(f"{label}: cannot tell whether (and which) input and output embeddings are tied, "
                          f"since transformers cannot build its architecture ({type(exc).__name__}: {exc})") from None


def _set_everywhere(cfg: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``cfg`` with ``values`` set at the top level and in a nested ``text_config`` that has them."""
    cfg = dict(cfg, **values)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = dict(cfg["text_config"], **{k: v for k, v in values.items() if k in cfg["text_config"]})
    return cfg


class BaseMerge:
    """Adds the merged update to the base model's safetensors shards, one tensor at a time.

    Everything is checked here, before the output exists: the base is not quantized, every
    adapter tensor's shape fits the base tensor it updates, and tied input/output embeddings
    are untied in the written model when the adapter changes one of them (PEFT's loaded
    adapter changes only that side; keeping the tie would apply the change to both).
    """

    def __init__(self, plan: MergePlan, base_model: str | Path, dtype: torch.dtype | None):
        self.plan, self.dir, self.dtype = plan, _resolve_base(base_model), dtype
        self.files: dict[str, TensorFile] = {}
        try:
            self._check_and_map(f"base model {base_model}")
        except BaseException:
            self.close()
            raise

    def _check_and_map(self, label: str) -> None:
        plan = self.plan
        self.label = label
        first = plan.adapters[0]
        if first.config.get("alora_invocation_tokens"):
            raise ConfigError(f"{first.label}: an aLoRA adapter acts only after its invocation tokens; merged "
                              f"into the weights it would act on every token. Keep the merged adapter unmerged")
        self.config = _read_base_config(self.dir, label)
        quant = _config_quantization(self.config)
        if quant:
            _refuse_quantized(label, quant)
        index_path = self.dir / _INDEX_NAME
        if index_path.is_file():
            try:
                self.index = json.loads(index_path.read_text(encoding="utf-8"))
                shard_names = sorted(set(self.index["weight_map"].values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise AdapterError(f"{label}: cannot parse {index_path}: {type(exc).__name__}: {exc}") from None
        elif (self.dir / "model.safetensors").is_file():
            self.index, shard_names = None, ["model.safetensors"]
        else:
            raise AdapterError(f"{label}: {self.dir} holds no model.safetensors or {_INDEX_NAME} "
                               f"(only safetensors checkpoints can be merged into)")
        for n in shard_names:
            self.files[n] = TensorFile(self.dir / n, label)
        quant = _tensor_quantization(self.files)
        if quant:
            _refuse_quantized(label, quant)
        where = {k: n for n, f in self.files.items() for k in f.keys()}
        self.info = {k: self.files[n].info[k] for k, n in where.items()}
        self.extra: dict[str, list[str]] = {}  # shard -> keys written that the base does not store
        self.tied_src: dict[str, str | None] = {}  # untied key -> adapter key of its pre-update value (None: base)
        self.notes: list[str] = []
        full_targets = {a: a[len(PEFT_PREFIX):].replace(".base_layer.", ".") for a in plan.full_keys}
        # building the model class on the meta device takes seconds for a 7B config: only when an
        # adapter tensor has the vocabulary size in its shape can it touch a (tied) embedding
        text_cfg = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else {}
        vocab = self.config.get("vocab_size", text_cfg.get("vocab_size"))
        maybe = vocab is None or any(vocab in m.a_shape + m.b_shape for m in first.modules.values()) or any(
            vocab in first.info(a).shape for a in plan.full_keys)
        tie = _tied_embedding_keys(self.dir, self.config, label) if maybe else None
        if tie is not None:
            touched = {f"{n}.weight" for n in plan.module_names} | set(full_targets.values())
            if touched & set(tie):
                self._untie(tie, where, full_targets)

        def find(key: str, what: str) -> str:
            for cand in (key, _drop_first(key)):
                if cand in self.info:
                    return cand
            raise AdapterError(f"{first.label}: {what} {key} has no counterpart in {label}")

        self.lora: dict[str, str] = {}  # base key -> module (weight += dW)
        self.bias: dict[str, str] = {}  # base key -> module (bias += merged lora_B bias)
        self.full: dict[str, str] = {}  # base key -> adapter key (replaced)
        fan = bool(first.config.get("fan_in_fan_out"))
        for name in plan.module_names:
            m = first.modules[name]
            key = find(f"{name}.weight", "module")
            shape = self.info[key].shape
            rows, cols = m.b_shape[0], math.prod(m.a_shape[1:])
            if m.kind == "embedding" or fan:
                rows, cols = cols, rows
            if math.prod(shape) != rows * cols or shape[0] != rows:
                raise AdapterError(
                    f"{first.label}: {m.a_key} {list(m.a_shape)} and {m.b_key} {list(m.b_shape)} make an update "
                    f"of shape [{rows}, {cols}] but {label} has {key} of shape {list(shape)} (an adapter for a "
                    f"resized vocabulary or another base?)")
            self.lora[key] = name
            if any(ad.modules[name].bias_key for ad in plan.adapters):
                bkey = find(f"{name}.bias", "lora_bias of module")
                if self.info[bkey].shape != (m.b_shape[0],):
                    raise AdapterError(f"{first.label}: the lora_B bias of {name} has shape [{m.b_shape[0]}] but "
                                       f"{label} has {bkey} of shape {list(self.info[bkey].shape)}")
                self.bias[bkey] = name
        for akey, target in full_targets.items():
            if target in self.tied_src:
                continue
            key = find(target, "tensor")
            if first.info(akey).shape != self.info[key].shape:
                raise AdapterError(
                    f"{first.label}: tensor {akey} has shape {list(first.info(akey).shape)} but {label} has {key} "
                    f"of shape {list(self.info[key].shape)} (an adapter for a resized vocabulary or another base?)")
            self.full[key] = akey
        self.where = where
        self.out_dtype = self.dtype or next(iter(self.files.values())).info[next(iter(where))].dtype

    def _untie(self, tie: tuple[str, str], where: dict[str, str], full_targets: dict[str, str]) -> None:
        """Write both embeddings explicitly: each gets the value PEFT's loaded adapter gives it.

        PEFT saves a copy of a tied embedding it wraps with LoRA (``...base_layer.weight``) and
        loads it into the shared tensor, so it reaches both sides; a ``modules_to_save`` copy
        replaces one side only; a LoRA update applies to its own side only.
        """
        stored = [k for k in tie if k in where]
        if not stored:
            raise AdapterError(f"{self.label}: neither tied embedding ({', '.join(tie)}) is in its safetensors files")
        shared_copy = next((a for a, t in full_targets.items() if t in tie and ".base_layer." in a), None)
        for key in tie:
            own = next((a for a, t in full_targets.items() if t == key and ".base_layer." not in a), None)
            self.tied_src[key] = src = own or shared_copy  # None: the base's own tensor
            if src is not None and self.plan.adapters[0].info(src).shape != self.info[stored[0]].shape:
                raise AdapterError(
                    f"{self.plan.adapters[0].label}: tensor {src} has shape "
                    f"{list(self.plan.adapters[0].info(src).shape)} but {self.label} has {stored[0]} of shape "
                    f"{list(self.info[stored[0]].shape)} (an adapter for a resized vocabulary?)")
        for key in tie:
            if key not in where:  # written beside the tensor it was tied to
                where[key] = where[stored[0]]
                self.info[key] = self.info[stored[0]]
                self.extra.setdefault(where[key], []).append(key)
        self.shared_key = stored[0]
        msg = (f"untied {tie[0]} and {tie[1]} in the written model (tie_word_embeddings=false, both stored): the "
               f"adapter changes them differently, as the PEFT-loaded adapter does, which a tied model cannot express")
        self.notes.append(msg)
        logger.warning(msg)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _dtype(self, info) -> torch.dtype:
        return self.dtype if self.dtype is not None and info.dtype.is_floating_point else info.dtype

    def _source(self, key: str, f: TensorFile) -> torch.Tensor:
        """The tensor ``key`` before the merged update is added."""
        if key in self.tied_src:
            src = self.tied_src[key]
            if src is not None:
                return merged_full_tensor(self.plan, src)
            return f.read(key if key in f.info else self.shared_key)
        return merged_full_tensor(self.plan, self.full[key]) if key in self.full else f.read(key)

    def write(self, tmp: Path, merger: ModuleMerger) -> dict[str, ModuleStats]:
        """Write the merged model into ``tmp`` (the atomic output's temporary directory);
        returns each module's statistics."""
        per_module: dict[str, ModuleStats] = {}
        total = 0
        bar = tqdm(total=len(self.lora), desc=f"merge into base ({self.plan.method.name})", unit="module")
        for shard, f in self.files.items():
            keys = sorted(f.keys(), key=lambda k: f.info[k].start) + self.extra.get(shard, [])
            specs = [(k, self._dtype(self.info[k]), self.info[k].shape) for k in keys]
            total += sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for _, d, s in specs)
            with SafetensorsStreamWriter(tmp / shard, specs, f.metadata or {"format": "pt"}, background=True) as writer:
                for key, dtype, shape in specs:
                    t = self._source(key, f)
                    if key in self.lora:
                        res = merger.merge(self.lora[key])
                        per_module[self.lora[key]] = res.stats
                        kind = self.plan.adapters[0].modules[self.lora[key]].kind
                        delta = res.b.reshape(res.b.shape[0], -1) @ res.a.reshape(res.a.shape[0], -1)
                        if kind == "embedding" or self.plan.adapters[0].config.get("fan_in_fan_out"):
                            delta = delta.T
                        t = t.float() + delta.reshape(shape)
                        bar.update(1)
                    if key in self.bias:
                        t = t.float() + merged_lora_bias(self.plan, self.bias[key])
                    writer.write(key, t.to(dtype))
            f.close()
        bar.close()
        if self.index is not None:
            weight_map = dict(self.index["weight_map"], **{k: s for s, ks in self.extra.items() for k in ks})
            index = dict(self.index, weight_map=weight_map,
                         metadata=dict(self.index.get("metadata") or {}, total_size=total))
            write_json(tmp / _INDEX_NAME, index)
        # the written config describes the written tensors: their dtype and whether they are tied
        changes: dict[str, Any] = {}
        if self.dtype is not None:
            name = str(self.dtype).replace("torch.", "")
            changes["dtype"] = name
            if "torch_dtype" in self.config:
                changes["torch_dtype"] = name
        if self.tied_src:
            changes["tie_word_embeddings"] = False
        write_json(tmp / _BASE_CONFIG, _set_everywhere(self.config, **changes))
        for src in sorted(self.dir.iterdir()):
            if src.is_file() and src.name != _BASE_CONFIG and not src.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(src, tmp / src.name)  # copyfile: modes from the umask, as save_pretrained
        return per_module
