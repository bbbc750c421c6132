"""The llama.cpp engine: rank and choice modes scored by llama.cpp itself, as a model is served.

``poc-lora eval --engine llama.cpp --base_model BASE.gguf --merged_adapter MERGED.gguf ...``
scores the same records with the same requests as the transformers engine: the prompts, the
candidate completions or lm-evaluation-harness options, their tokenisation and the split into a
context run once and per-candidate continuations all come from :mod:`eval_harness.scoring`
(``_split_pairs``, ``fit_context``); only the forward pass differs. llama.cpp (through
``llama-cpp-python``) runs the context, keeps its KV cache, and runs each candidate's tokens on
it; the log-probabilities are ``log_softmax`` of llama.cpp's float32 logits at the scored
positions, summed as :func:`eval_harness.scoring._score_splits` sums them.

* Token ids come from the Hugging Face tokenizer the transformers engine uses (by default the
  one embedded in the base GGUF, read by transformers; ``tokenizer=`` names another), and are
  fed to llama.cpp as ids: llama.cpp's own text tokenizer never runs, so both engines score the
  same token sequences.
* Adapters are llama.cpp LoRA GGUF files (``poc-lora export``); their prompt template comes from
  the record ``poc-lora export`` stores in the file (:data:`~poc_lora.merge.gguf_export.TEMPLATE_KEY`),
  else ``--template``, else the default.
* The KV cache is float32 (``type_k = type_v = 0``): llama.cpp's default f16 cache alone moves the
  logits by up to ~2e-2 (docs/serving.md), which would hide what the weights do. The base's
  weights are used as stored: a Q4_1 file is scored as the quantized model users deploy.
* Generate mode is refused: this engine gives log-likelihoods, and a model that cannot be scored
  is an error, never a silent switch to another mode.

Example:
    >>> from eval_harness import evaluate
    >>> evaluate("SmolLM2-135M-Instruct.Q4_1.gguf", merged_adapters=["merged.gguf"], engine="llama.cpp",
    ...          data_dir="data", output="out", mode="choice")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from poc_lora.data.templates import get_template
from poc_lora.errors import AdapterError, ConfigError
from poc_lora.gguf import SOURCE_FILE, converted_dir, gguf_file, is_gguf
from poc_lora.merge.gguf_export import TEMPLATE_KEY
from poc_lora.models import load_tokenizer
from poc_lora.outputs import sha256_file

from .loading import DEFAULT_TEMPLATE, ModelSpec, _safe_name, unique_keys
from .scoring import _report_truncated, _Split, fit_context

logger = logging.getLogger(__name__)

ENGINES = ("transformers", "llama.cpp")
_F32 = 0  # ggml_type GGML_TYPE_F32, for llama.cpp's type_k / type_v


def _read_fields(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None
    out = {}
    for name, f in reader.fields.items():
        if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            out[name] = f.contents()
    return out


def _import_llama() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("--engine llama.cpp needs llama-cpp-python: pip install -e .[serve] "
                          "(builds llama.cpp from source, ~5 min on 2 cores)") from None
    return llama_cpp


class LlamaCppModel:
    """A GGUF base, with at most one LoRA GGUF applied, scoring :class:`~eval_harness.scoring._Split`
    lists through llama.cpp (the ``score_splits`` protocol of ``scoring._score_splits``)."""

    def __init__(self, base: Path, lora: Path | None = None, threads: int | None = None):
        self.base, self.lora = base, lora
        self.threads = threads or torch.get_num_threads()
        fields = _read_fields(base)
        arch = fields.get("general.architecture")
        self.context = int(fields.get(f"{arch}.context_length") or 0) or None  # max_position_embeddings
        self._llm: Any = None
        self._n_ctx = 0

    def _model(self, n_ctx: int) -> Any:
        """The llama.cpp model with a context of at least ``n_ctx`` tokens (re-created when too small)."""
        if self._llm is None or self._n_ctx < n_ctx:
            llama_cpp = _import_llama()
            size = -(-max(n_ctx, 64) // 64) * 64
            size = min(size, self.context) if self.context else size
            self._llm = None
            try:
                self._llm = llama_cpp.Llama(model_path=str(self.base), lora_path=str(self.lora) if self.lora else None,
                                            n_ctx=size, n_batch=size, n_ubatch=size, logits_all=True, type_k=_F32,
                                            type_v=_F32, n_threads=self.threads, verbose=False)
            except (ValueError, RuntimeError) as exc:
                what = f"{self.base}" + (f" with the LoRA {self.lora}" if self.lora else "")
                raise AdapterError(f"llama.cpp cannot load {what}: {exc}") from None
            self._n_ctx = size
        return self._llm

    def _logprobs(self, llm: Any, start: int, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens`` after the first ``start`` cached tokens; log-softmax of the logits at
        positions ``start - 1 .. start + len(tokens) - 1`` (each predicts the next token)."""
        llm.n_tokens = start  # llama-cpp-python drops the KV cache past n_tokens before evaluating
        if tokens:
            llm.eval(list(tokens))
        logits = np.asarray(llm.scores[max(start - 1, 0): start + len(tokens)], dtype=np.float32)
        if logits.size == 0 or not np.isfinite(logits).all():
            raise ConfigError(f"llama.cpp returned no usable logits for {self.base}: it must be loaded with "
                              f"logits_all=True to give log-probabilities")
        return torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()

    def score_splits(self, tokenizer: Any, split: Sequence[_Split], progress: Callable[[int], Any] | None = None,
                     truncated: list[int] | None = None) -> list[list[float]]:
        """Summed log-probabilities of each candidate's scored tokens, ``[example][candidate]``:
        the same quantity, from the same splits, as ``scoring._score_splits`` on one model."""
        fitted = [dataclasses.replace(s, shared=fit_context(s.shared, self.context, max(map(len, s.rest)),
                                                            tokenizer.bos_token_id)) for s in split]
        _report_truncated([i for i, (a, b) in enumerate(zip(split, fitted)) if len(a.shared) != len(b.shared)],
                          len(split), self.context, truncated)
        llm = self._model(max(len(s.shared) + max(map(len, s.rest)) for s in fitted))
        out: list[list[float]] = []
        for s in fitted:
            n = len(s.shared)
            shared = self._logprobs(llm, 0, s.shared)  # rows: positions 0 .. n-1
            # the common completion tokens at the end of the shared part (rank mode), scored once
            common = sum(float(shared[t - 1, s.shared[t]]) for t in range(n - s.scored, n))
            scores = []
            for rest, skip in zip(s.rest, s.skip):
                total = common + (float(shared[n - 1, rest[0]]) if skip == 0 else 0.0)
                if len(rest) > 1:
                    logp = self._logprobs(llm, n, rest[:-1])  # row t predicts rest[t]
                    total += sum(float(logp[t, rest[t]]) for t in range(max(skip, 1), len(rest)))
                scores.append(total)
            out.append(scores)
            if progress:
                progress(1)
        return out


def _adapter_template(path: Path, fallback: str | None) -> tuple[Any, str]:
    record = _read_fields(path).get(TEMPLATE_KEY)
    if record:
        try:
            return get_template(json.loads(record)["prompt_template"]), f"{path}:{TEMPLATE_KEY}"
        except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
            raise AdapterError(f"{path}: cannot use its {TEMPLATE_KEY}: {exc}") from None
    return get_template(fallback or DEFAULT_TEMPLATE), "--template" if fallback else "default"


def gguf_model_specs(base_model: str, adapters: Sequence[str | Path], merged: Sequence[str | Path],
                     template: str | None, include_base: bool | None) -> list[ModelSpec]:
    """The runner's model list for GGUF files: the base (``include_base``, or no adapter given)
    and every LoRA GGUF, each checked to be a llama.cpp LoRA adapter before anything loads; keys
    unique as the transformers engine's (:func:`~eval_harness.loading.unique_keys`).

    Raises:
        AdapterError: an adapter path is missing, not a GGUF file, or not a LoRA adapter GGUF.
    """
    specs = []
    if include_base or (include_base is None and not adapters and not merged):
        specs.append(ModelSpec(_safe_name(Path(base_model).stem), "base", None,
                               get_template(template or DEFAULT_TEMPLATE), "--template" if template else "default"))
    for kind, paths in (("adapter", adapters), ("merged", merged)):
        for p in map(Path, paths):
            if not p.is_file():
                raise AdapterError(f"{p}: the llama.cpp engine takes LoRA GGUF files (poc-lora export), "
                                   f"{'a directory' if p.is_dir() else 'not found'}")
            fields = _read_fields(p)
            if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
                raise AdapterError(f"{p} is not a llama.cpp LoRA adapter (general.type={fields.get('general.type')!r}, "
                                   f"adapter.type={fields.get('adapter.type')!r}); write one with poc-lora export")
            tpl, source = _adapter_template(p, template)
            specs.append(ModelSpec(_safe_name(p.stem), kind, p, tpl, source, sha256_file(p)))
    return unique_keys(specs)


class LlamaCppHolder:
    """The runner's model holder for llama.cpp: one :class:`LlamaCppModel` per model, the tokenizer
    of the transformers engine. Models are never scored together (``multi`` is None)."""

    def __init__(self, base_model: str, tokenizer: str | None, mode: str):
        if mode == "generate":
            raise ConfigError("--engine llama.cpp scores log-likelihoods: use --mode rank or choice (generate "
                              "mode runs on the transformers engine)")
        _import_llama()
        self.base = gguf_file(base_model)
        self.tokenizer_source = tokenizer or str(self.base)
        self.tokenizer: Any = None
        self.load_seconds = 0.0
        self._current: tuple[Any, LlamaCppModel] | None = None

    def multi(self, specs: Sequence[Any]) -> None:
        return None

    def release_multi(self) -> None:
        return None

    def get(self, spec: Any, index: int) -> LlamaCppModel:
        start = time.perf_counter()
        if self.tokenizer is None:
            self.tokenizer = _tokenizer(self.tokenizer_source)
        if self._current is None or self._current[0] != spec.adapter:
            self._current = (spec.adapter, LlamaCppModel(self.base, spec.adapter, threads=_threads()))
        self.load_seconds += time.perf_counter() - start
        return self._current[1]


def _tokenizer(source: str) -> Any:
    """The transformers engine's tokenizer for ``source``. For a GGUF file not converted yet it is
    read straight from the file, as the conversion would (a whole dequantized copy of a large model
    just for its tokenizer would take minutes and gigabytes); no padding is used here."""
    if is_gguf(source) and not (converted_dir(gguf_file(source)) / SOURCE_FILE).is_file():
        from transformers import AutoTokenizer

        path = gguf_file(source)
        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read the tokenizer of the GGUF file {path} (give --tokenizer): {exc}") from None
    return load_tokenizer(source, padding_side="left")


def _threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or torch.get_num_threads()


__all__ = ["ENGINES", "LlamaCppHolder", "LlamaCppModel", "gguf_model_specs"]
