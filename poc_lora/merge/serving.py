"""Serving a merged adapter: the rank vLLM must be started with, and ``--serve_rank``.

A merged adapter is written with one rank R and one scale for every module (smaller modules
padded with zero neurons, which changes nothing; ``lora_alpha = r = R``, no ``rank_pattern`` /
``alpha_pattern``, ``use_rslora: false``), so PEFT (``lora_alpha / r`` per module after its
patterns), vLLM (``lora_alpha / r`` from the config's global ``r``) and llama.cpp's
``convert_lora_to_gguf.py`` (``lora_alpha`` over each tensor's own rank) all apply scale 1.

vLLM loads a LoRA only when its rank is at most the server's ``--max-lora-rank``, which must be
one of :data:`VLLM_MAX_LORA_RANKS` (vLLM's ``LoRAConfig``); :func:`vllm_max_lora_rank` is the
smallest value that loads rank R. ``--serve_rank N`` truncates every module to at most the
largest allowed value <= N by SVD; ``auto`` to the smallest allowed value >= the merged rank,
at most 512 (:func:`serve_cap`). No torch here: the CLI validates ``--serve_rank`` at start-up.

Full tensors (``modules_to_save`` copies such as ``lm_head`` or ``norm``, trained base biases)
travel beside the LoRA factors: PEFT loads them in place of the base's, the other engines do not
(:func:`full_tensor_note`, checked in their sources: vLLM ``vllm/lora/utils.py``,
``parse_fine_tuned_lora_name``; llama.cpp ``convert_lora_to_gguf.py``).

Example:
    >>> vllm_max_lora_rank(80), vllm_max_lora_rank(600)
    (128, None)
    >>> serve_cap("auto", 700), serve_cap(100, 40)
    (512, 64)
"""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError

# vLLM's allowed --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest vLLM ``--max-lora-rank`` that loads an adapter of rank ``rank``; None above 512."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def parse_serve_rank(value: object) -> int | str | None:
    """``None``, ``"auto"`` or a positive integer (also given as a string, from the CLI or YAML).

    Raises:
        ConfigError: anything else, naming ``--serve_rank``.
    """
    if value is None or value == "auto":
        return value
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise ConfigError(f"--serve_rank must be auto or a positive integer, got {value!r}")
    return n


def serve_cap(serve_rank: int | str | None, merged_rank: int) -> int | None:
    """The rank every module is truncated to (None: no truncation).

    ``N``: the largest allowed vLLM value <= N. ``auto``: the smallest allowed value >=
    ``merged_rank`` (the largest module rank), at most 512. None: no truncation.
    """
    serve_rank = parse_serve_rank(serve_rank)
    if serve_rank is None:
        return None
    if serve_rank == "auto":
        return vllm_max_lora_rank(merged_rank) or VLLM_MAX_LORA_RANKS[-1]
    return max(v for v in VLLM_MAX_LORA_RANKS if v <= serve_rank)


def too_big_warning(rank: int) -> str:
    """The warning for a merged rank vLLM cannot load, naming the fix."""
    return (f"the merged adapter has rank {rank}, above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank "
            f"vLLM accepts: vLLM cannot serve it (PEFT and llama.cpp can). Merge again with --serve_rank auto "
            f"(best rank-{VLLM_MAX_LORA_RANKS[-1]} approximation by SVD, its error in merge_report.json) or "
            f"--serve_rank N")


def full_tensor_note(keys: Sequence[str]) -> str | None:
    """The note for a merged adapter holding full tensors beside its LoRA factors, naming them and
    what each serving engine does with them; None when ``keys`` is empty.

    ``keys``: the tensors' keys (PEFT's layout or module paths). vLLM's LoRA loader accepts only
    ``lora_A`` / ``lora_B`` / ``lora_embedding_A`` / ``lora_embedding_B`` tensors and refuses the
    adapter otherwise; llama.cpp's converter stops on them, keeping only norm weights.

    Example:
        >>> full_tensor_note(["base_model.model.lm_head.weight"]).split(":")[0]
        'the merged adapter holds 1 full tensor(s) beside its LoRA factors (modules_to_save / trained biases)'
    """
    if not keys:
        return None
    names = [k.removeprefix("base_model.model.") for k in keys]
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return (f"the merged adapter holds {len(names)} full tensor(s) beside its LoRA factors (modules_to_save / "
            f"trained biases): {shown}. PEFT loads them in place of the base model's; vLLM refuses the adapter "
            "(its LoRA loader takes only lora_A / lora_B / lora_embedding_A / lora_embedding_B tensors: "
            "\"... is unsupported LoRA weight\"); llama.cpp's convert_lora_to_gguf.py stops with \"Not a lora_A "
            "or lora_B tensor\" (recent versions copy norm weights into the GGUF adapter, nothing else). To "
            "serve elsewhere than PEFT, merge into the base (--merge-into-base) or train without modules_to_save")


__all__ = ["VLLM_MAX_LORA_RANKS", "full_tensor_note", "parse_serve_rank", "serve_cap", "too_big_warning",
           "vllm_max_lora_rank"]
