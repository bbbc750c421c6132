"""Stage markers: an output is reused only when it was computed from the same settings.

Every stage of a workflow (a trained adapter, a merge, an evaluation, a report) writes, once
its output is complete and as its last file, ``.poc_lora_stage.json`` in its directory::

    {"stage": "merge", "settings": {...}, "settings_sha256": "..."}

``settings`` is everything the output depends on, including the ``settings_sha256`` of the
stages it reads, so a changed setting makes that stage and every stage after it stale. A rerun
skips a stage whose marker holds the same hash, and recomputes it otherwise (removing the
marker first, so an interrupted recomputation is never taken for a finished one).

Example:
    >>> from poc_lora.stages import is_current, write_stage
    >>> write_stage("out/merges/svd", "merge", {"method": "svd", "rank": 8})  # doctest: +SKIP
    >>> is_current("out/merges/svd", {"method": "svd", "rank": 8})  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .outputs import write_json

logger = logging.getLogger(__name__)

STAGE_FILE = ".poc_lora_stage.json"


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of ``settings`` as canonical JSON (sorted keys; paths and other objects as strings)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_stage(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The marker in ``directory``, or None when there is none (or it is unreadable)."""
    path = Path(directory) / STAGE_FILE
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        logger.warning("%s is unreadable; the stage will be recomputed", path)
        return None
    return marker if isinstance(marker, dict) else None


def stage_hash(directory: str | os.PathLike) -> str | None:
    """The ``settings_sha256`` recorded in ``directory`` (None if no finished stage is there)."""
    marker = read_stage(directory)
    return None if marker is None else marker.get("settings_sha256")


def changed_settings(directory: str | os.PathLike, settings: dict[str, Any]) -> list[str]:
    """The keys whose value differs from the marker's (``["not computed yet"]`` when there is none)."""
    marker = read_stage(directory)
    if marker is None:
        return ["not computed yet"]
    return differing_keys(marker.get("settings", {}), settings)


def differing_keys(recorded: Any, settings: dict[str, Any]) -> list[str]:
    """The keys whose value differs between ``recorded`` settings (as read from a JSON file) and
    ``settings`` (compared as JSON, so paths and tuples equal their written form); the one
    comparison behind every "is this output current?" check, including the evaluation pairs
    whose settings live in their ``summary.json``."""
    if not isinstance(recorded, dict):
        return ["<unreadable settings>"]
    norm = json.loads(json.dumps(settings, default=str))
    return sorted(k for k in set(recorded) | set(norm) if recorded.get(k) != norm.get(k))


def is_current(directory: str | os.PathLike, settings: dict[str, Any]) -> bool:
    """True when ``directory`` holds a finished stage computed from exactly ``settings``."""
    return stage_hash(directory) == settings_hash(settings)


def write_stage(directory: str | os.PathLike, stage: str, settings: dict[str, Any]) -> Path:
    """Mark ``directory`` as the finished output of ``stage`` for ``settings`` (atomic; write it last)."""
    settings = json.loads(json.dumps(settings, default=str))
    return write_json(Path(directory) / STAGE_FILE,
                      {"stage": stage, "settings": settings, "settings_sha256": settings_hash(settings)})


def clear_stage(directory: str | os.PathLike) -> None:
    """Remove the marker before a stage is recomputed in place."""
    (Path(directory) / STAGE_FILE).unlink(missing_ok=True)


__all__ = ["STAGE_FILE", "changed_settings", "differing_keys", "clear_stage", "is_current", "read_stage", "settings_hash",
           "stage_hash", "write_stage"]
