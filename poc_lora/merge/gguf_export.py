"""GGUF export: a PEFT LoRA adapter (a single one or a merge) as a llama.cpp LoRA adapter file.

``poc-lora export ADAPTER_DIR --format gguf --output FILE.gguf`` writes what llama.cpp's own
``convert_lora_to_gguf.py`` writes, without needing llama.cpp's source tree: the metadata
llama.cpp reads (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
``general.architecture``) and, for every adapted linear module, two tensors named after the
base tensor in llama.cpp's naming (the ``gguf`` package's tensor name map for the
architecture): ``blk.N.attn_q.weight.lora_a`` = A, shape (r, in), and ``...lora_b`` = B,
shape (out, r), both as PEFT stores them. llama.cpp adds ``alpha / r * B @ A`` per tensor
(``r`` = that tensor's rank), PEFT ``scale * B @ A``. Two transformations make them agree:

* Llama-family rows of q_proj / k_proj are reordered for llama.cpp's rotary layout
  (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``, the same reordering its converter applies
  to the base weights); the reordering acts on output rows, so it is applied to B.
* Where PEFT's per-module scale is not ``lora_alpha / r`` (``alpha_pattern``, rsLoRA), B is
  multiplied by ``scale * r / lora_alpha`` so that llama.cpp's rule gives PEFT's scale. A merge
  written by ``poc-lora merge`` already has scale 1 everywhere (:mod:`.serving`), so its B is
  written unchanged, as is any adapter with one ``lora_alpha`` and no rsLoRA: then the file
  holds the same values as llama.cpp's converter writes (tested tensor by tensor).

``--merge_into_base`` (:func:`export_merged_gguf`) writes the base GGUF itself with the update
folded into its adapted tensors (Llama bases), for Ollama / LM Studio users who want one file.

Refused with an :class:`~poc_lora.errors.AdapterError` naming the module (never a file that
loads and silently does less): LoRA on embeddings or the LM head, ``modules_to_save`` and other
full tensors, trained biases (``lora_bias``, ``bias: all``), DoRA (refused by
:func:`~poc_lora.adapters.load_adapter`), aLoRA, a module the ``gguf`` name map does not know,
and an architecture not in :data:`ARCHITECTURES`.

``--outtype``: ``f32`` (default), ``f16``, ``bf16`` or ``q8_0`` (tensors whose row length is not
a multiple of 32, such as a rank-8 B, fall back to f16, as llama.cpp's converter does).

Example:
    >>> from poc_lora.merge.gguf_export import export_gguf
    >>> export_gguf("runs/merged", "merged.gguf", outtype="f16")  # doctest: +SKIP
    PosixPath('merged.gguf')
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import Adapter, load_adapter, read_adapter_config
from ..errors import AdapterError, ConfigError
from ..outputs import atomic_write, check_output_path

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# transformers architecture -> (GGUF architecture name, q/k rows reordered as llama.cpp's
# converter reorders them). Only architectures whose conversion was checked against
# llama.cpp's converter (convert_hf_to_gguf.py's LlamaModel) are listed.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # configs that name no architectures
TEMPLATE_KEY = "poc_lora.template_record"  # the adapter's prompt-template record (JSON), for `eval`


@dataclass(frozen=True)
class BaseShape:
    """What the export needs from the base model's ``config.json``."""

    architecture: str
    gguf_arch: str
    permute_qk: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int


def base_shape(config: dict[str, Any], source: str) -> BaseShape:
    """The architecture and head counts of a base model's ``config.json`` (a dict).

    Raises:
        ConfigError: the architecture is not in :data:`ARCHITECTURES` (named in the message).
    """
    archs = config.get("architectures") or [_MODEL_TYPES.get(config.get("model_type"), config.get("model_type"))]
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(f"base model {source}: architecture {archs or config.get('model_type')!r} cannot be "
                          f"exported to a llama.cpp LoRA by poc-lora (supported: {', '.join(ARCHITECTURES)}); "
                          f"use llama.cpp's convert_lora_to_gguf.py")
    heads = int(config["num_attention_heads"])
    return BaseShape(arch, *ARCHITECTURES[arch], int(config["num_hidden_layers"]), heads,
                     int(config.get("num_key_value_heads") or heads))


def load_base_config(base_model: str) -> tuple[dict[str, Any], str]:
    """``config.json`` of ``base_model`` (hub id, local directory, ``.gguf`` or an embedded id).

    Raises:
        ConfigError: the config cannot be found or read (offline and not cached, ...).
    """
    from transformers import AutoConfig  # lazy: seconds to import

    from ..models import resolve_model_path

    path = resolve_model_path(base_model)
    try:
        return AutoConfig.from_pretrained(path).to_dict(), path
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the config of the base model {base_model!r} ({path}); give a local "
                          f"directory with --base_model: {exc}") from None


def llama_cpp_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a q_proj / k_proj weight (or of its LoRA B) the way
    llama.cpp's ``convert_hf_to_gguf.py`` does for Llama (``LlamaModel.permute``): within each
    head, the two rotary halves are interleaved. ``rows``: (heads * head_dim, ...)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _refuse_unservable(ad: Adapter) -> None:
    cfg = ad.config
    if cfg.get("alora_invocation_tokens"):
        raise AdapterError(f"{ad.label}: aLoRA (alora_invocation_tokens) is not exported; llama.cpp would apply "
                           f"it to every token")
    for key in ad.full_keys:
        module = key.removeprefix("base_model.model.")
        what = "a trained bias" if key.endswith(".bias") else "a full tensor (modules_to_save)"
        raise AdapterError(f"{ad.label}: module {module} is {what}, not a LoRA update; a llama.cpp LoRA adapter "
                           f"cannot carry it (the file would load and silently leave it out)")
    for m in ad.modules.values():
        if m.kind == "embedding" or m.name.split(".")[-1] in ("embed_tokens", "wte", "lm_head"):
            raise AdapterError(f"{ad.label}: module {m.name}: LoRA on the token embeddings or the LM head is not "
                               f"exported (llama.cpp applies it differently, and a tied LM head shares the "
                               f"embedding tensor)")
        if m.bias_key:
            raise AdapterError(f"{ad.label}: module {m.name} has a trained LoRA bias (lora_bias); llama.cpp's LoRA "
                               f"adapters carry A and B only")


def _tensor_name(name_map: Any, module: str, label: str, arch: str) -> str:
    gguf_name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
    if gguf_name is None:
        raise AdapterError(f"{label}: module {module} has no llama.cpp tensor name for the {arch} architecture "
                           f"(the gguf package's name map does not know it)")
    return gguf_name


def _quantize(data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """``data`` (float32) in ``outtype``: ``(array, raw_dtype)`` for ``GGUFWriter.add_tensor``."""
    import gguf

    if outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # row length not a multiple of the block: llama.cpp's converter uses f16
        return data.astype(np.float16), None


def lora_tensors(ad: Adapter, shape: BaseShape) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(gguf tensor name, A, B)`` per module, float32, in llama.cpp's layout and scale
    (module docstring): A (r, in), B (out, r), q/k rows of B reordered, B rescaled where PEFT's
    scale differs from ``lora_alpha / r``.

    Raises:
        AdapterError: a module llama.cpp cannot apply (named).
    """
    import gguf

    _refuse_unservable(ad)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == shape.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, shape.num_layers)
    alpha = float(ad.config["lora_alpha"])
    out = []
    for m in ad.modules.values():
        name = _tensor_name(name_map, m.name, ad.label, shape.gguf_arch)
        a, b = ad.read_checked(m.a_key).float(), ad.read_checked(m.b_key).float()
        if not np.isclose(m.scale * m.rank / alpha, 1.0, rtol=1e-7, atol=0):
            b = b * (m.scale * m.rank / alpha)  # llama.cpp applies alpha / rank
        leaf = m.name.split(".")[-1]
        if shape.permute_qk and leaf in ("q_proj", "k_proj"):
            b = llama_cpp_permute(b, shape.num_heads if leaf == "q_proj" else shape.num_kv_heads)
        out.append((name, a.contiguous(), b.contiguous()))
    return out


def _checked_start(outtype: str, output: str | os.PathLike, overwrite: bool) -> tuple[Any, Path]:
    """What both exports check first: the ``gguf`` package (a ConfigError saying how to install
    it), ``outtype``, and that ``output`` may be written. Returns the package and the output path."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install -e .[gguf] (or pip install gguf)") from None
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    return gguf, check_output_path(output, overwrite)


def _write_gguf(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def base_gguf_of(adapter_cfg: dict[str, Any], base_model: str | None) -> Path:
    """The GGUF file of the adapter's base: ``base_model`` when it is a ``.gguf`` file, else the file
    a :mod:`poc_lora.gguf` conversion directory records (``poc_lora_gguf.json``), which is what
    adapters trained on a GGUF base (e.g. the embedded SmolLM2) name as their base.

    Raises:
        ConfigError: no GGUF file can be found (the message says to pass ``--base_model FILE.gguf``).
    """
    from ..gguf import SOURCE_FILE, gguf_file, is_gguf
    from ..models import resolve_model_path

    name = base_model or adapter_cfg.get("base_model_name_or_path") or ""
    if is_gguf(name):
        return gguf_file(name)
    record = Path(resolve_model_path(name)) / SOURCE_FILE if name else None
    if record is not None and record.is_file():
        path = Path(json.loads(record.read_text(encoding="utf-8"))["gguf_path"])
        if path.is_file():
            return path
    raise ConfigError(f"--merge_into_base needs the base model as a GGUF file ({name or 'no base named'} is none): "
                      f"pass --base_model FILE.gguf (convert a Hugging Face base with llama.cpp's convert_hf_to_gguf.py)")


def _gguf_shape(reader: Any, path: Path) -> BaseShape:
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.architecture", "llama."))}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r}; --merge_into_base handles llama only")
    heads = int(fields["llama.attention.head_count"])
    return BaseShape("LlamaForCausalLM", "llama", True, int(fields["llama.block_count"]), heads,
                     int(fields.get("llama.attention.head_count_kv") or heads))


def export_merged_gguf(adapter_dir: str | os.PathLike, output: str | os.PathLike, *, outtype: str = "f32",
                       base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write the base GGUF with the adapter's update folded into its weights (``W + scale * B @ A``
    in llama.cpp's row order), for Ollama / LM Studio users who want one file.

    The adapted tensors are dequantized (gguf-py), updated in float32 and written in ``outtype``
    (quantizing a small update back to 4 bits would round most of it away); every other tensor and
    all metadata (tokenizer, chat template) are copied as stored. ``base_model``: the base GGUF
    (default: the file the adapter's base conversion records, :func:`base_gguf_of`). Refuses what
    :func:`export_gguf` refuses. Written atomically.

    Example:
        >>> export_merged_gguf("runs/merged", "merged-model.gguf", outtype="q8_0")  # doctest: +SKIP
    """
    gguf, output = _checked_start(outtype, output, overwrite)
    base = base_gguf_of(read_adapter_config(adapter_dir), base_model)
    reader = gguf.GGUFReader(base)
    ad = load_adapter(adapter_dir)
    try:
        updates = {name: (a, b) for name, a, b in lora_tensors(ad, _gguf_shape(reader, base))}
        alpha = float(ad.config["lora_alpha"])
    finally:
        ad.close()
    missing = sorted(set(updates) - {t.name for t in reader.tensors})
    if missing:
        raise AdapterError(f"{adapter_dir}: the base GGUF {base} has no tensor {missing[0]} for the adapter")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "llama")
        for name, f in reader.fields.items():
            if not name.startswith("GGUF.") and name != "general.architecture":
                writer.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
        for t in reader.tensors:
            if t.name not in updates:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # copied as stored
                continue
            a, b = updates[t.name]
            weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            weight = weight.reshape(tuple(int(x) for x in reversed(t.shape)))
            weight = weight + (alpha / b.shape[1] * (b @ a)).numpy()  # llama.cpp's alpha / rank
            data, raw = _quantize(weight, outtype)
            writer.add_tensor(t.name, data, raw_dtype=raw)
        _write_gguf(writer)

    atomic_write(output, write, suffix=".gguf")
    logger.info("wrote the merged model %s (%d tensors updated, in %s)", output, len(updates), outtype)
    return output


def export_gguf(adapter_dir: str | os.PathLike, output: str | os.PathLike, *, outtype: str = "f32",
                base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write ``adapter_dir`` (a PEFT LoRA adapter or a ``poc-lora merge`` output) as a llama.cpp
    LoRA adapter GGUF file at ``output`` (atomically).

    Args:
        adapter_dir: the adapter directory (``adapter_config.json`` + weights); not modified.
        output: the ``.gguf`` file to write.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (module docstring).
        base_model: where the base's ``config.json`` comes from (default: the adapter's
            ``base_model_name_or_path``); only the architecture and head counts are read.
        overwrite: replace an existing ``output``.

    Returns ``output``. Load it with ``llama-cli -m BASE.gguf --lora output`` or
    ``Llama(model_path=BASE.gguf, lora_path=output)``.

    Raises:
        AdapterError: unreadable adapter, or a module llama.cpp cannot apply (named).
        ConfigError: bad ``outtype``, unsupported architecture, unreadable base config, no ``gguf``.
        OutputError: ``output`` exists and ``overwrite`` is false.

    Example:
        >>> export_gguf("runs/merged", "merged.gguf", base_model="poc-lora/tiny-llama")  # doctest: +SKIP
    """
    gguf, output = _checked_start(outtype, output, overwrite)
    cfg = read_adapter_config(adapter_dir)
    base = base_model or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; pass --base_model")
    config, source = load_base_config(str(base))
    shape = base_shape(config, source)
    ad = load_adapter(adapter_dir)
    try:
        tensors = lora_tensors(ad, shape)
        record = ad.template_record
        alpha = float(ad.config["lora_alpha"])
    finally:
        ad.close()

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, shape.gguf_arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter_dir).resolve().name)
        if record is not None:
            writer.add_string(TEMPLATE_KEY, json.dumps(record, sort_keys=True))
        for name, a, b in tensors:
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                data, raw = _quantize(t.numpy(), outtype)
                writer.add_tensor(name + suffix, data, raw_dtype=raw)
        _write_gguf(writer)

    atomic_write(output, write, suffix=".gguf")
    logger.info("wrote the llama.cpp LoRA adapter %s (%d modules, %s, alpha %g)", output, len(tensors), outtype, alpha)
    return output


__all__ = ["ARCHITECTURES", "OUTTYPES", "TEMPLATE_KEY", "BaseShape", "base_gguf_of", "base_shape", "export_gguf",
           "export_merged_gguf",
           "llama_cpp_permute", "load_base_config", "lora_tensors"]
