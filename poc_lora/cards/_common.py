"""What every model card shares: the card format, the settings tables and yaml blocks, sections.

Helpers of :mod:`poc_lora.cards` (one file per card kind); see its docstring.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from ..citation import BIBTEX, PAPER, PAPER_URL
from ..outputs import atomic_write_text

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
# Where the paper trains LoRA adapters with Noisy AdamW and merges them (its LoRA experiments).
PAPER_LORA = "§5.2, Tables 1 and 3"
# Keys of the machine-readable blocks in the card body (yaml code blocks).
TRAINING_KEY = "poc_lora_training"
MERGE_KEY = "poc_lora_merge"
_TRAIN_RECORD = "poc_lora_train.json"  # poc_lora.train.DONE_FILE (not imported: train imports us)
_TRAIN_CONFIG = "poc_lora_config.json"
_SECTION = re.compile(r"^## (.+)$", re.M)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load_card(path: Path) -> Any:
    """A card's metadata, or None when there is none or it does not parse (never fatal)."""
    try:
        return ModelCard.load(path, ignore_metadata_errors=True) if path.is_file() else None
    except Exception:  # a foreign README without metadata, unreadable YAML...
        return None


def _base_card(base_model: str | None) -> Any:
    """The base model's own card: a local directory's README.md, or the hub cache's (no network)."""
    if not base_model:
        return None
    local = Path(base_model)
    if local.is_dir():
        return _load_card(local / CARD_NAME)
    try:
        cached = try_to_load_from_cache(base_model, CARD_NAME)
    except Exception:  # not a repo id
        return None
    return _load_card(Path(cached)) if isinstance(cached, str) else None


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _hub_dataset(data_path: str | None) -> list[str]:
    """``datasets`` metadata: the training data when it is a hub dataset id (not a file, not synthetic)."""
    if not data_path or data_path == "synthetic" or Path(data_path).exists():
        return []
    return [data_path] if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", data_path) else []


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(v) for v in value)
    return "n/a" if value is None else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _yaml_block(key: str, values: dict[str, Any]) -> str:
    text = yaml.safe_dump({key: values}, sort_keys=False, allow_unicode=True, width=120)
    return f"```yaml\n{text}```"


def read_card_block(card_text: str, key: str) -> dict[str, Any] | None:
    """The exact values a card carries under ``key`` (:data:`TRAINING_KEY`, :data:`MERGE_KEY`).

    Example:
        >>> read_card_block(Path("runs/merged/README.md").read_text(), MERGE_KEY)["spread"]  # doctest: +SKIP
        0.93
    """
    for block in re.findall(r"```yaml\n(.*?)```", card_text, re.S):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and key in data:
            return data[key]
    return None


def _card(metadata: dict[str, Any], body: str) -> Any:
    data = ModelCardData(**{k: v for k, v in metadata.items() if v not in (None, [], {})})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def _write(directory: Path, card: Any) -> Path:
    path = directory / CARD_NAME
    text = str(card)
    # An unchanged card is not rewritten: reruns of the pipeline must leave every file as it was.
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return atomic_write_text(path, text)


def _adapter_metadata(adapter_config: dict[str, Any], extra_tags: Sequence[str]) -> dict[str, Any]:
    """PEFT's own adapter metadata (as ``save_pretrained`` writes it) plus our tags."""
    base = adapter_config.get("base_model_name_or_path")
    tags = ([f"base_model:adapter:{base}"] if base else []) + ["lora", *extra_tags, "transformers", "poc-lora"]
    task = adapter_config.get("task_type")
    return {"base_model": base, "library_name": "peft", "tags": list(dict.fromkeys(tags)),
            "pipeline_tag": "text-generation" if task in (None, "CAUSAL_LM") else None}


def _usage(base: str | None, directory_name: str, adapter: bool) -> str:
    if not adapter:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{directory_name}")\n```')
    return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{directory_name}")\n```')


def _citation() -> str:
    return f"## Citation\n\n{PAPER} ({PAPER_URL}).\n\n```bibtex\n{BIBTEX}\n```"


def _sections(text: str) -> list[tuple[str | None, str]]:
    """The card body split at ``## `` headings: [(heading or None for the preamble, text)]."""
    cuts = [m.start() for m in _SECTION.finditer(text)]
    parts = [(None, text[: cuts[0]] if cuts else text)]
    for start, end in zip(cuts, cuts[1:] + [len(text)]):
        chunk = text[start:end]
        parts.append((_SECTION.match(chunk).group(1).strip(), chunk))
    return parts


def _upsert_section(text: str, heading: str, content: str, before: str = "Citation") -> str:
    """Replace the ``## heading`` section of a card body (or insert it before ``## before``)."""
    new = f"## {heading}\n\n{content.strip()}\n\n"
    parts = _sections(text)
    if any(h == heading for h, _ in parts):
        return "".join(new if h == heading else chunk for h, chunk in parts)
    at = next((i for i, (h, _) in enumerate(parts) if h == before), len(parts))
    chunks = [chunk for _, chunk in parts]
    if at == len(parts) and chunks and not chunks[-1].endswith("\n\n"):
        chunks[-1] = chunks[-1].rstrip("\n") + "\n\n"
    return "".join(chunks[:at] + [new] + chunks[at:])


def _update(directory: Path, heading: str, content: str, metadata: Mapping[str, Any] | None = None) -> Path | None:
    """Replace one section (and some metadata) of an existing card, atomically."""
    card = _load_card(directory / CARD_NAME)
    if card is None:
        logger.warning("%s has no model card to update", directory)
        return None
    text = _upsert_section(card.text, heading, content)
    data = card.data.to_dict()
    data.update(metadata or {})
    return _write(directory, _card(data, text) if data else ModelCard(text))
