"""Stage markers: an output is reused only when it was computed from the same settings and its
files are still the ones that were written.

Every stage of a workflow (a trained adapter, a merge, an evaluation, a report) writes, once
its output is complete and as its last file, ``.poc_lora_stage.json`` in its directory::

    {"stage": "merge", "settings": {...}, "settings_sha256": "...",
     "files": [{"path": "adapter_model.safetensors", "size": 81992, "sha256": "..."}, ...],
     "stage_sha256": "..."}

``settings`` is everything the output depends on, including the :func:`stage_hash` of the
stages it reads, so a changed setting makes that stage and every stage after it stale.
``files`` are the outputs the marker vouches for (by default every file under the directory
but markers, dot-files and the model card, which later stages extend); a stage whose files are
missing, truncated or changed is *not* done (:func:`stage_problems` says which file and how),
whatever its settings. A rerun skips a stage that :func:`is_current` accepts and recomputes it
otherwise (removing the marker first, so an interrupted recomputation is never taken for a
finished one). Markers of earlier releases record no files and count as not done.

Checking a stage hashes its files (sha256, streamed); the hash of a file last modified more than
two seconds before is remembered in this process for as long as its size, mtime and inode are
unchanged, so the several checks a run makes of one merged model read it once.

Example:
    >>> from poc_lora.stages import is_current, write_stage
    >>> write_stage("out/merges/svd", "merge", {"method": "svd", "rank": 8})  # doctest: +SKIP
    >>> is_current("out/merges/svd", {"method": "svd", "rank": 8})  # doctest: +SKIP
    True
    >>> Path("out/merges/svd/adapter_model.safetensors").unlink()  # doctest: +SKIP
    >>> stage_problems("out/merges/svd")  # doctest: +SKIP
    ['adapter_model.safetensors is missing']
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from .outputs import sha256_file, write_json

logger = logging.getLogger(__name__)

STAGE_FILE = ".poc_lora_stage.json"
# Files that later stages update in place, so no marker vouches for them: the model card
# (poc_lora.cards adds the ensemble and evaluation sections to an adapter's README.md).
LIVING_FILES = frozenset({"README.md"})
NOT_COMPUTED = "not computed yet"

_HASHES: dict[tuple[str, int, int, int], str] = {}
# Filesystem timestamps tick coarsely (a few ms), so a file rewritten with the same size right after
# it was hashed can keep its mtime; like git's "racily clean" rule, only the hash of a file older
# than this when it was hashed is remembered.
_RACY_NS = 2_000_000_000


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of ``settings`` as canonical JSON (sorted keys; paths and other objects as strings)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _HASHES.get(key)
    if digest is None:
        digest = sha256_file(path)
        if time.time_ns() - st.st_mtime_ns > _RACY_NS:
            _HASHES[key] = digest
    return digest


def output_files(directory: str | os.PathLike) -> list[str]:
    """The files a marker vouches for by default: every regular file under ``directory``
    (recursively, as POSIX paths relative to it, sorted) except stage markers, dot-files
    (temporaries of atomic writes) and :data:`LIVING_FILES`."""
    root = Path(directory)
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(parent) / name
            if not name.startswith(".") and name not in LIVING_FILES and path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _relative(root: Path, path: str | os.PathLike) -> str:
    p = Path(path)
    rel = p.resolve().relative_to(root.resolve()) if p.is_absolute() else p
    return rel.as_posix()


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


def stage_problems(directory: str | os.PathLike) -> list[str]:
    """Why ``directory`` is not a finished, intact stage; ``[]`` when it is.

    Each entry names one file and what is wrong with it, e.g. ``"adapter_model.safetensors is
    missing"``, ``"... is truncated (100 of 81992 bytes)"``, ``"... changed since it was written
    (sha256 differs)"``; ``["not computed yet"]`` when there is no marker.
    """
    root = Path(directory)
    marker = read_stage(root)
    if marker is None:
        return [NOT_COMPUTED]
    files = marker.get("files")
    if not isinstance(files, list):
        return [f"its marker {STAGE_FILE} records no files (written by an earlier release)"]
    problems = []
    for rec in files:
        try:
            rel, size, digest = rec["path"], int(rec["size"]), rec["sha256"]
        except (TypeError, KeyError, ValueError):
            return [f"its marker {STAGE_FILE} is malformed"]
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if not path.is_file():
            problems.append(f"{rel} is not a file")
        elif st.st_size < size:
            problems.append(f"{rel} is truncated ({st.st_size} of {size} bytes)")
        elif st.st_size != size:
            problems.append(f"{rel} changed since it was written ({st.st_size} bytes, {size} written)")
        elif _file_sha256(path, st) != digest:
            problems.append(f"{rel} changed since it was written (sha256 differs)")
    return problems


def is_done(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a finished stage whose files are intact (any settings)."""
    return not stage_problems(directory)


def stage_hash(directory: str | os.PathLike) -> str | None:
    """The identity of the finished stage in ``directory`` (its settings and the sha256 of its
    files), for the settings of the stages that read it; None when there is no finished, intact
    stage there, so anything computed from it is stale."""
    marker = read_stage(directory)
    if marker is None or stage_problems(directory):
        return None
    return marker.get("stage_sha256")


def changed_settings(directory: str | os.PathLike, settings: dict[str, Any]) -> list[str]:
    """The keys whose value differs from the marker's (``["not computed yet"]`` when there is none)."""
    marker = read_stage(directory)
    if marker is None:
        return [NOT_COMPUTED]
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
    """True when ``directory`` holds a finished stage computed from exactly ``settings`` whose
    files are all there unchanged (:func:`stage_problems`); the files are only hashed when the
    settings match. A damaged stage is logged with what is wrong."""
    marker = read_stage(directory)
    if marker is None or marker.get("settings_sha256") != settings_hash(settings):
        return False
    problems = stage_problems(directory)
    if problems:
        logger.warning("%s is not intact (%s); it will be recomputed", directory, "; ".join(problems[:5]))
    return not problems


def write_stage(directory: str | os.PathLike, stage: str, settings: dict[str, Any],
                files: Iterable[str | os.PathLike] | None = None) -> Path:
    """Mark ``directory`` as the finished output of ``stage`` for ``settings`` (atomic; write it
    last), vouching for ``files`` (paths relative to ``directory``, or absolute inside it;
    default: :func:`output_files`; never :data:`LIVING_FILES`) with their size and sha256.

    Raises FileNotFoundError when one of ``files`` does not exist (a bug in the caller).

    Example:
        >>> write_stage("runs/a0", "train", {"lr": 1e-3}, files=["adapter_model.safetensors"])  # doctest: +SKIP
    """
    root = Path(directory)
    settings = json.loads(json.dumps(settings, default=str))
    names = output_files(root) if files is None else sorted(
        {rel for rel in map(lambda f: _relative(root, f), files) if Path(rel).name not in LIVING_FILES})
    records = []
    for rel in names:
        st = (root / rel).stat()
        records.append({"path": rel, "size": st.st_size, "sha256": _file_sha256(root / rel, st)})
    digest = settings_hash(settings)
    return write_json(root / STAGE_FILE, {
        "stage": stage, "settings": settings, "settings_sha256": digest, "files": records,
        "stage_sha256": settings_hash({"settings_sha256": digest, "files": records}),
    })


def clear_stage(directory: str | os.PathLike) -> None:
    """Remove the marker before a stage is recomputed in place."""
    (Path(directory) / STAGE_FILE).unlink(missing_ok=True)


__all__ = ["LIVING_FILES", "NOT_COMPUTED", "STAGE_FILE", "changed_settings", "clear_stage", "differing_keys",
           "is_current", "is_done", "output_files", "read_stage", "settings_hash", "stage_hash", "stage_problems",
           "write_stage"]
