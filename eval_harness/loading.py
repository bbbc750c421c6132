"""Which models an evaluation scores, and holding them: the base once, adapters attached in turn.

:func:`_model_specs` turns the base, adapter and merged-adapter arguments into
:class:`ModelSpec` s (unique keys, prompt templates, weights checked before any model loads);
:class:`_ModelHolder` loads the base on first use and either builds the many-models pass
(:mod:`eval_harness.multimodel`) or attaches one adapter at a time with PEFT. The runner
(:mod:`eval_harness.runner`) scores what it hands out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from poc_lora.adapters import BIN_NAME, SAFETENSORS_NAME, TensorFile, attach_peft_adapter, sha256_file
from poc_lora.data.templates import TEMPLATE_RECORD_FILE, get_template, template_hash
from poc_lora.errors import AdapterError, ConfigError
from poc_lora.models import float32_logits, load_model, load_tokenizer

from .multimodel import MultiModel, Unsupported, build_multi_model

logger = logging.getLogger(__name__)

# Used when an adapter records no template and none is given: the reference scorer's exact
# strings, which is what adapters trained with the reference implementation (the paper's) expect.
DEFAULT_TEMPLATE = "llm-adapters"


@dataclass
class ModelSpec:
    """One model to evaluate: the base alone, or the base with one adapter attached."""

    key: str  # output sub-directory and table name
    kind: str  # "base" | "adapter" | "merged"
    adapter: Path | None
    template: Any  # PromptTemplate
    template_source: str
    adapter_sha256: str | None = None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _adapter_template(adapter: Path | None, fallback: str | None) -> tuple[Any, str]:
    record_path = adapter / TEMPLATE_RECORD_FILE if adapter else None
    if record_path is not None and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            template = get_template(record["prompt_template"])
        except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
            raise AdapterError(f"{record_path}: cannot use its 'prompt_template': {exc}") from exc
        if record.get("prompt_template_sha256") not in (None, template_hash(template)):
            logger.warning("%s: template %r changed since training (hash differs)", record_path, template.name)
        return template, str(record_path)
    if fallback:
        return get_template(fallback), "--template"
    return get_template(DEFAULT_TEMPLATE), "default"


def _check_weights(adapter: Path) -> None:
    """Refuse, before the base model loads, an adapter whose weights file is missing, truncated, not
    safetensors, or a pickle holding anything but tensors (read with ``weights_only=True``, so no
    code in it runs). Only the file is checked; PEFT decides later whether the adapter fits."""
    label = f"adapter {adapter}"
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (adapter / name).is_file():
            TensorFile(adapter / name, label).close()
            return
    raise AdapterError(f"{label}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found in {adapter}")


def _weights_sha256(adapter: Path) -> str:
    files = sorted(p for p in adapter.iterdir() if p.name.startswith("adapter_model."))
    digest = hashlib.sha256()
    for p in files:
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()


def _model_specs(base_model: str, adapters: Sequence[str | Path], merged: Sequence[str | Path],
                 template: str | None, include_base: bool | None) -> list[ModelSpec]:
    specs: list[ModelSpec] = []
    if include_base or (include_base is None and not adapters and not merged):
        tpl, source = _adapter_template(None, template)
        specs.append(ModelSpec(_safe_name(Path(base_model).name), "base", None, tpl, source))
    for kind, dirs in (("adapter", adapters), ("merged", merged)):
        for d in dirs:
            path = Path(d)
            if not path.is_dir():
                raise AdapterError(f"{path} is not a PEFT adapter directory ({'a file' if path.exists() else 'not found'})")
            if not (path / "adapter_config.json").is_file():
                raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
            _check_weights(path)
            tpl, source = _adapter_template(path, template)
            specs.append(ModelSpec(_safe_name(path.name), kind, path, tpl, source, _weights_sha256(path)))
    return unique_keys(specs)


def unique_keys(specs: list[ModelSpec]) -> list[ModelSpec]:
    """``specs`` with every key made unique in place (``a0/adapter``, ``a1/adapter`` -> ``adapter``,
    ``adapter-2``): each key is an output directory, so two models of one name would overwrite
    each other's results."""
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.key] = seen.get(spec.key, 0) + 1
        if seen[spec.key] > 1:
            spec.key = f"{spec.key}-{seen[spec.key]}"
    return specs


class _ModelHolder:
    """Loads the base model on first use and attaches one adapter at a time (PEFT)."""

    def __init__(self, base_model: str, dtype: str, load_in_4bit: bool):
        self.base_model, self.dtype, self.load_in_4bit = base_model, dtype, load_in_4bit
        self.model: Any = None
        self.tokenizer: Any = None
        self.active: str | None = None
        self.load_seconds = 0.0
        self._multi: MultiModel | None = None
        self._multi_keys: tuple[str, ...] = ()
        self.refused: str | None = None  # why models cannot be evaluated together (then never retried)

    def _load_base(self) -> None:
        start = time.perf_counter()
        device_map = {"": 0} if torch.cuda.is_available() else None
        self.model = float32_logits(load_model(self.base_model, self.dtype, load_in_4bit=self.load_in_4bit,
                                               device_map=device_map))
        self.model.eval()
        self.tokenizer = load_tokenizer(self.base_model, padding_side="left")
        self.load_seconds += time.perf_counter() - start

    def multi(self, specs: Sequence[ModelSpec]) -> MultiModel | None:
        """The base with the LoRAs of ``specs`` as one :class:`MultiModel` (reused while the same
        models are asked for), or None, logged once, when they cannot be evaluated together."""
        if self.model is None:
            self._load_base()
        keys = tuple(spec.key for spec in specs)
        if self._multi is not None and self._multi_keys == keys:
            return self._multi
        self.release_multi()
        if self.refused is None and self.active is not None:
            self.refused = "an adapter is attached with PEFT"
        if self.refused is not None:
            return None
        start = time.perf_counter()
        try:
            self._multi = build_multi_model(self.model, [spec.adapter for spec in specs])
        except Unsupported as exc:
            self.refused = str(exc)
            logger.info("models are evaluated one at a time: %s", exc)
            return None
        self._multi_keys = keys
        self.load_seconds += time.perf_counter() - start
        return self._multi

    def release_multi(self) -> None:
        """Give the base model its own layers back (before PEFT attaches an adapter to it)."""
        if self._multi is not None:
            self.model = self._multi.restore()
            self._multi, self._multi_keys = None, ()

    def get(self, spec: ModelSpec, index: int) -> Any:
        if self.model is None:
            self._load_base()
        self.release_multi()
        name = f"a{index}"
        if self.active == name:
            return self.model
        if spec.adapter is None:
            if self.active is not None:
                raise RuntimeError("the base model is evaluated before any adapter is attached")
            return self.model
        start = time.perf_counter()
        try:
            # PEFT's own loader skips keys outside its layout (no prefix, ".default."): read as the
            # many-models path reads them, or refused, naming the keys
            self.model = attach_peft_adapter(self.model, spec.adapter, name)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            detail = " ".join(str(exc).split())[:400]
            raise AdapterError(
                f"adapter {spec.adapter} does not fit the base model {self.base_model}: {detail}"
            ) from exc
        self.model.set_adapter(name)
        if self.active is not None:
            self.model.delete_adapter(self.active)  # keep one adapter in memory
        self.active = name
        self.model.eval()
        self.load_seconds += time.perf_counter() - start
        return self.model


__all__ = ["DEFAULT_TEMPLATE", "ModelSpec"]
