"""A seeded validation split carved out of an LLM-Adapters dataset directory's training records.

Without test files (or to choose settings without looking at them) a user still needs a table:
``validation_split: 100`` (a count per suite) or ``0.05`` (a fraction per suite) holds records of
every suite out of training and writes them in the suites' layout, ``<dir>/<suite>/test.json``,
so the evaluation reads them like a test set. The directory lies under ``$POC_LORA_CACHE``
(never in the user's data directory), keyed by the training files' hashes, the split and its
seed; ``validation_split.json`` in it names the source files and the held-out record indices.

Each suite draws its held-out records with its own seed, ``derive_seed(val_split_seed,
"validation", suite)``, so adding or removing another suite leaves a suite's split unchanged.
The held-out records are never trained on: training also drops any record whose
``instruction`` and ``input`` equal a held-out one (duplicates in the source files), and logs
how many it dropped.

Example:
    >>> train, val = split_validation({"boolq": records}, 100, seed=42)  # doctest: +SKIP
    >>> len(val["boolq"])  # doctest: +SKIP
    100
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..cache import cache_dir
from ..errors import ConfigError, DataError
from ..outputs import atomic_write_text, write_json
from ..runtime import derive_seed

logger = logging.getLogger(__name__)

MANIFEST = "validation_split.json"
TEST_FILE = "test.json"  # the suites' layout: <dir>/<suite>/test.json


def validation_count(spec: float, n: int, where: str) -> int:
    """How many of a suite's ``n`` records ``validation_split`` holds out: ``spec`` itself when it
    is a whole number >= 1, ``round(spec * n)`` (at least 1) for a fraction in (0, 1).

    Raises:
        ConfigError: ``spec`` is neither; DataError: it leaves ``where`` no training record.
    """
    if 0 < spec < 1:
        k = max(1, round(spec * n))
    elif spec >= 1 and float(spec).is_integer():
        k = int(spec)
    else:
        raise ConfigError(f"validation_split must be a count (a whole number >= 1) or a fraction in (0, 1), "
                          f"got {spec!r}")
    if k >= n:
        raise DataError(f"validation_split={spec:g} holds out {k} of the {n} records of {where}, "
                        "leaving none to train on")
    return k


def _key(record: Mapping[str, Any]) -> tuple[str, str]:
    return record["instruction"], record.get("input") or ""


def split_validation(by_suite: Mapping[str, Sequence[dict[str, Any]]], spec: float, seed: int,
                     sources: Mapping[str, str] | None = None
                     ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], dict[str, list[int]]]:
    """Split each suite's records into training and validation records.

    Returns ``(train, validation, held_out)``: per suite, the training records (source order,
    held-out records and their duplicates removed), the validation records (source order) and
    the held-out indices. ``sources`` (suite -> file) only names the files in errors.
    """
    train, val, held = {}, {}, {}
    for suite, records in by_suite.items():
        where = (sources or {}).get(suite, suite)
        k = validation_count(spec, len(records), where)
        rng = random.Random(derive_seed(seed, "validation", suite))
        idx = sorted(rng.sample(range(len(records)), k))
        chosen = set(idx)
        val[suite] = [records[i] for i in idx]
        keys = {_key(r) for r in val[suite]}
        rest = [r for i, r in enumerate(records) if i not in chosen]
        train[suite] = [r for r in rest if _key(r) not in keys]
        if len(train[suite]) < len(rest):
            logger.info("%s: dropped %d training records that repeat a validation record", where,
                        len(rest) - len(train[suite]))
        if not train[suite]:
            raise DataError(f"validation_split={spec:g} leaves no training record of {where}")
        held[suite] = idx
    return train, val, held


def validation_dir_for(sources: Mapping[str, str], hashes: Mapping[str, str], spec: float, seed: int) -> Path:
    """Where the validation split of these training files is written (under ``$POC_LORA_CACHE``)."""
    blob = json.dumps({"files": dict(sorted(hashes.items())), "split": spec, "seed": seed}, sort_keys=True)
    return cache_dir() / f"validation-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def write_validation_dir(root: Path, validation: Mapping[str, Sequence[dict[str, Any]]],
                         held_out: Mapping[str, list[int]], sources: Mapping[str, str], hashes: Mapping[str, str],
                         spec: float, seed: int) -> Path:
    """Write ``<root>/<suite>/test.json`` per suite and the manifest (last: it marks the directory
    complete; a complete directory is left as it is). Returns ``root``."""
    if (root / MANIFEST).is_file():
        return root
    for suite, records in validation.items():
        atomic_write_text(root / suite / TEST_FILE, json.dumps(list(records), indent=2) + "\n")
    write_json(root / MANIFEST, {
        "validation_split": spec, "val_split_seed": seed,
        "seed_rule": "derive_seed(val_split_seed, 'validation', suite) (poc_lora.runtime)",
        "suites": {s: {"source": sources[s], "source_sha256": hashes[s], "held_out": len(held_out[s]),
                       "held_out_indices": held_out[s]} for s in validation},
    })
    logger.info("validation split (%s per suite) written to %s: %s", f"{spec:g}", root,
                ", ".join(f"{s} {len(v)}" for s, v in validation.items()))
    return root


__all__ = ["MANIFEST", "split_validation", "validation_count", "validation_dir_for", "write_validation_dir"]
