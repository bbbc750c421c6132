"""A base model's architecture (its Hugging Face config) without its weights, offline where possible.

:func:`architecture_config` is what a memory plan builds a meta-device model from. Sources, in order:

* built-in cards (:data:`ARCHITECTURE_CARDS`) for the paper's bases, so planning needs neither
  the hub nor the gated weights: Llama-2-7B and Llama-3-8B (the few numbers of their
  ``config.json``: hidden 4096, intermediate 11008 / 14336, 32 layers, 32 heads, 32 / 8 KV
  heads, vocabulary 32000 / 128256, context 4096 / 8192, RoPE theta 1e4 / 5e5, RMSNorm eps 1e-5,
  untied embeddings), also under their chat / instruct ids;
* the embedded ids: the tiny model's ``config.json`` (built once, :mod:`poc_lora.testing.tiny_model`)
  and SmolLM2's (its converted directory in the cache if there, else the GGUF file's metadata,
  read without dequantizing);
* a local directory holding ``config.json``, or a ``.gguf`` file (its metadata);
* else ``AutoConfig.from_pretrained`` (the hub, or its local cache); never remote code.

Example:
    >>> cfg = architecture_config("meta-llama/Llama-2-7b-hf")
    >>> cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    (32, 11008, 32000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError
from .gguf import converted_dir, gguf_file, is_gguf
from .models import SMOLLM2_MODEL_ID, TINY_MODEL_ID, smollm2_gguf_file, tiny_model_path

_LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16",
                  bos_token_id=1, eos_token_id=2)
_LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
                  bos_token_id=128000, eos_token_id=128001)
# hub id -> LlamaConfig keyword arguments (the numbers of the model's config.json)
ARCHITECTURE_CARDS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
}


def _card(kwargs: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    kwargs = dict(kwargs)
    theta = kwargs.pop("rope_theta")
    cfg = LlamaConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return cfg


def architecture_config(name_or_path: str) -> Any:
    """The ``transformers`` config of ``name_or_path``'s architecture (see the module docstring).

    Raises :class:`ConfigError` naming the model when no source has its config (an unknown hub
    id offline: give a local directory with its ``config.json``).

    Example:
        >>> architecture_config("meta-llama/Meta-Llama-3-8B").num_key_value_heads
        8
    """
    from transformers import AutoConfig

    name = str(name_or_path)
    if name in ARCHITECTURE_CARDS:
        return _card(ARCHITECTURE_CARDS[name])
    try:
        if name == TINY_MODEL_ID:
            return AutoConfig.from_pretrained(tiny_model_path())
        if name == SMOLLM2_MODEL_ID or is_gguf(name):
            path = smollm2_gguf_file() if name == SMOLLM2_MODEL_ID else gguf_file(name)
            converted = converted_dir(path)
            if (converted / "config.json").is_file():
                return AutoConfig.from_pretrained(converted)
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
            raise ConfigError(f"model directory {name} holds no config.json")
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        cards = ", ".join(ARCHITECTURE_CARDS)
        raise ConfigError(f"no architecture for model {name!r} ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); give a local directory holding its "
                          f"config.json, or one of the built-in cards: {cards}") from None


__all__ = ["ARCHITECTURE_CARDS", "architecture_config"]
