"""GGUF base models: converted once into a plain safetensors model directory in the cache.

transformers reads a ``.gguf`` file with ``from_pretrained(dir, gguf_file=name)`` (needs the
``gguf`` package) and dequantizes every tensor, but the model it returns is marked as quantized
(``quantization_config: gguf``): ``save_pretrained`` refuses it, and PEFT would record a file
name no loader understands as the base of an adapter. So :func:`convert_gguf` copies the
dequantized weights into a plain model built from the same config (no quantization mark, the
same ``tie_word_embeddings``) and writes it, with the GGUF's tokenizer, under
``$POC_LORA_CACHE/gguf/<name>-<sha256[:16]>-<dtype>/``, keyed by the file's hash. That
directory is what training, evaluation and merge-into-base use, and what adapters record as
``base_model_name_or_path``, so ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads
them offline. Its ``README.md`` names the GGUF source.

A GGUF base is given as a local ``.gguf`` path, or as ``<owner>/<repo>/<file>.gguf`` (a hub
repository plus a file name, downloaded with ``huggingface_hub``).

Example:
    >>> from poc_lora.gguf import convert_gguf
    >>> path = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1-3f1c0e5b2a9d8c77-float32'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .adapters import sha256_file
from .cache import build_once, cache_dir, save_asset_model
from .errors import ConfigError
from .outputs import atomic_output_dir, write_json

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "poc_lora_gguf.json"  # written last: "this conversion is complete"
# Bump when the conversion recipe changes so stale cached conversions are not reused.
CONVERSION_VERSION = 1
_DTYPES = ("float32", "bfloat16", "float16")
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: hash a file once per process


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """True for a ``.gguf`` file name (local path or ``<owner>/<repo>/<file>.gguf``)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def gguf_file(name_or_path: str | os.PathLike) -> Path:
    """The local GGUF file: the path itself, or the hub file ``<owner>/<repo>/<file>.gguf``.

    Raises :class:`ConfigError` when the file is neither local nor downloadable.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    parts = str(name_or_path).split("/")
    if len(parts) >= 3 and not path.is_absolute() and not str(name_or_path).startswith("."):
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # offline, missing repo or file: all mean "cannot get it"
            raise ConfigError(f"GGUF base {name_or_path!r}: not a local file, and {filename!r} could not be "
                              f"downloaded from the hub repository {repo!r} ({type(exc).__name__})") from None
    raise ConfigError(f"GGUF base {name_or_path!r} not found (give a local .gguf path or <owner>/<repo>/<file>.gguf)")


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per process for an unchanged file."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def converted_dir(path: Path, dtype: str = "float32") -> Path:
    """Where :func:`convert_gguf` keeps the conversion of ``path`` in ``dtype``."""
    stem = path.name[: -len(GGUF_SUFFIX)] if is_gguf(path.name) else path.name
    return cache_dir() / "gguf" / f"{stem}-{file_sha256(path)[:16]}-v{CONVERSION_VERSION}-{dtype}"


def _model_card(source: dict[str, Any]) -> str:
    return (
        f"# {source['gguf_file']} (dequantized)\n\n"
        f"A standard transformers model directory converted by poc-lora from the GGUF file "
        f"`{source['gguf_file']}` (sha256 `{source['sha256']}`, {source['source']}). Every tensor was "
        f"dequantized by transformers' GGUF loader and stored as {source['dtype']} safetensors; "
        f"the tokenizer (and its chat template) is the one embedded in the GGUF file.\n\n"
        f"Architecture: {source['model_type']}, {source['num_hidden_layers']} layers, "
        f"tie_word_embeddings={source['tie_word_embeddings']}.\n\n"
        "The weights are those of the quantized file, not of the original full-precision release: "
        "expect small differences from the hub checkpoint of the same name.\n"
    )


def convert_gguf(name_or_path: str | os.PathLike, dtype: str = "float32", *, source: str | None = None) -> Path:
    """Convert a GGUF file into a plain safetensors model directory in the cache (once).

    Args:
        name_or_path: local ``.gguf`` path or ``<owner>/<repo>/<file>.gguf``.
        dtype: dtype of the stored (dequantized) weights: float32 (default, CPU), bfloat16, float16.
        source: how the file was obtained, written into the model card (default: its path).

    Returns the directory (``config.json``, ``model.safetensors``, tokenizer files, ``README.md``,
    ``poc_lora_gguf.json``). Written atomically; a complete conversion is reused, and a float32
    one also serves a bfloat16 or float16 request (load it with that ``dtype``). Peak memory is
    about twice the dequantized model. Raises :class:`ConfigError` when the ``gguf`` package is
    missing or the file cannot be read as a causal LM.

    Example:
        >>> convert_gguf("models/tiny.Q8_0.gguf", dtype="bfloat16")  # doctest: +SKIP
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"GGUF dequantization dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    path = gguf_file(name_or_path)
    if dtype != "float32" and (converted_dir(path, "float32") / SOURCE_FILE).is_file():
        # A float32 conversion serves a narrower request: loading it with dtype=bfloat16 casts
        # the same dequantized values as a bfloat16 conversion stores, without a second
        # conversion (minutes and a model-sized file for a large GGUF).
        return converted_dir(path, "float32")
    out = converted_dir(path, dtype)
    return build_once(out, lambda p: (p / SOURCE_FILE).is_file(), lambda: _convert(path, out, dtype, source))


def _convert(path: Path, out: Path, dtype: str, source: str | None) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader; lazy: the optional `gguf` extra)
    except ImportError:
        raise ConfigError(f"reading the GGUF base {path} needs the gguf package: pip install gguf") from None
    logger.info("converting the GGUF file %s into %s (once; dequantizing to %s)", path, out, dtype)
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot read the GGUF file {path} as a causal LM: {exc}") from None
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "model_type")},
                                  model_type=quantized.config.model_type)
    config.dtype = torch_dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # assign=True adopts the dequantized tensors (no second copy); tie_weights restores the tying.
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"GGUF file {path}: weights do not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    plain.generation_config = quantized.generation_config
    record = {
        "gguf_file": path.name, "gguf_path": str(path), "sha256": file_sha256(path),
        "source": source or f"local file {path}", "dtype": dtype, "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers, "tie_word_embeddings": bool(config.tie_word_embeddings),
        "conversion_version": CONVERSION_VERSION,
    }
    # overwrite: a directory left without its SOURCE_FILE marker is an incomplete earlier attempt
    with atomic_output_dir(out, overwrite=True) as tmp:
        save_asset_model(plain, tmp)  # safetensors (the default)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(record), encoding="utf-8")
        write_json(tmp / SOURCE_FILE, record)
    logger.info("converted GGUF model written to %s", out)


__all__ = ["GGUF_SUFFIX", "convert_gguf", "converted_dir", "gguf_file", "is_gguf"]
