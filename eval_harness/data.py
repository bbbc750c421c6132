"""Test-set loading (LLM-Adapters layout) with validation, and converters from the hub schemas.

The layout is ``<data_dir>/<suite>/test.json``: a JSON list of records with ``instruction``
(the question, its options and an ``Answer format: ...`` last line), optional ``input`` and
``output``, and ``answer`` (the label word). The paper evaluated on the files of the
LLM-Adapters repository's ``dataset/`` folder; see the README section
"Getting the commonsense data".

Example:
    >>> records = load_suite("data/commonsense", "boolq", limit=10)  # doctest: +SKIP
    >>> records[0]["answer"]  # doctest: +SKIP
    'true'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from poc_lora.data.suites import SUITE_ORDER, SUITES, Suite, get_suite
from poc_lora.errors import ConfigError, DataError
from poc_lora.outputs import atomic_write_text, check_output_path

TEST_FILE = "test.json"
README_DATA_SECTION = 'the README section "Getting the commonsense data"'


def suite_file(data_dir: str | Path, suite: Suite | str) -> Path:
    """Where a suite's test file must be: ``<data_dir>/<suite>/test.json``."""
    name = suite.name if isinstance(suite, Suite) else suite
    return Path(data_dir) / name / TEST_FILE


# ``tasks`` value meaning "every suite whose test file the data directory holds".
AVAILABLE = "available"


def available_suites(data_dir: str | Path) -> list[Suite]:
    """The suites (paper order) whose ``<suite>/test.json`` exists under ``data_dir``.

    Raises :class:`ConfigError` naming the directory when it holds none.

    Example:
        >>> [s.name for s in available_suites("data/my_tests")]  # doctest: +SKIP
        ['boolq', 'piqa']
    """
    found = [SUITES[name] for name in SUITE_ORDER if suite_file(data_dir, SUITES[name]).is_file()]
    if not found:
        raise ConfigError(f"tasks=available: {data_dir} holds no <suite>/test.json "
                          f"(suites: {', '.join(SUITE_ORDER)})")
    return found


def _check_record(rec: Any, suite: Suite, path: Path, index: int) -> dict[str, str]:
    where = f"{path}: record {index}"
    if not isinstance(rec, Mapping):
        raise DataError(f"{where} is a {type(rec).__name__}, expected an object with 'instruction' and 'answer'")
    for field in ("instruction", "answer"):
        if field not in rec:
            raise DataError(f"{where} has no field {field!r}")
        if not isinstance(rec[field], str) or not rec[field].strip():
            raise DataError(f"{where}: field {field!r} must be a non-empty string, got {rec[field]!r}")
    for field in ("input", "output"):
        if rec.get(field) is not None and not isinstance(rec[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(rec[field]).__name__}")
    if rec["answer"] not in suite.search_labels:
        raise DataError(
            f"{where}: field 'answer' is {rec['answer']!r}, not a label of {suite.name} "
            f"({', '.join(suite.search_labels)})"
        )
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "answer": rec["answer"]}


def load_suite(data_dir: str | Path, suite: Suite | str, limit: int | None = None) -> list[dict[str, str]]:
    """Read and validate ``<data_dir>/<suite>/test.json``; the first ``limit`` records if given.

    Every record is validated (not only the first ``limit``), so a broken file fails before any
    model is loaded. Raises :class:`DataError` naming the file, the record index and the field.
    """
    suite = suite if isinstance(suite, Suite) else get_suite(suite)
    path = suite_file(data_dir, suite)
    if not path.is_file():
        raise DataError(
            f"missing test set for {suite.name}: expected {path} "
            f"({'the directory ' + str(path.parent) + ' does not exist' if not path.parent.is_dir() else 'no test.json in it'}); "
            f"see {README_DATA_SECTION}"
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path} is empty (no records)")
    checked = [_check_record(rec, suite, path, i) for i, rec in enumerate(records)]
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        checked = checked[:limit]
    return checked


# ------------------------------------------------------------------ hub schemas -> LLM-Adapters
# Converters for users who start from the hub datasets instead of the LLM-Adapters files. The
# official splits with the paper's sizes: google/boolq validation (3270), ybisk/piqa validation
# (1838), allenai/social_i_qa validation (1954), Rowan/hellaswag validation (10042),
# allenai/winogrande winogrande_xl validation (1267), allenai/ai2_arc ARC-Challenge test (1172)
# and ARC-Easy test (2376), allenai/openbookqa main test (500). The instruction wording follows
# the LLM-Adapters files; prefer those files when you can get them, as the paper did.


def _options(suite: Suite, lead: str, options: list[str], answer_index: int) -> dict[str, str]:
    lines = [lead] + [f"{suite.option_prefix}{i}: {text}" for i, text in enumerate(options, 1)]
    lines.append("Answer format: " + "/".join(suite.search_labels[: len(options)]))
    answer = suite.search_labels[answer_index]
    return {"instruction": "\n\n".join(lines), "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _choices(row: Mapping[str, Any]) -> tuple[list[str], int]:
    """ARC/OBQA: ``choices = {"text": [...], "label": ["A", ...]}`` and ``answerKey``."""
    keys = list(row["choices"]["label"])
    return list(row["choices"]["text"]), keys.index(row["answerKey"])


def from_hub_record(suite: Suite | str, row: Mapping[str, Any]) -> dict[str, str]:
    """One hub-schema row of ``suite`` as an LLM-Adapters test record.

    Example:
        >>> from_hub_record("piqa", {"goal": "Dry hair", "sol1": "towel", "sol2": "oven", "label": 0})["answer"]
        'solution1'
    """
    suite = suite if isinstance(suite, Suite) else get_suite(suite)
    lead = suite.lead
    name = suite.name
    if name == "boolq":
        answer = "true" if row["answer"] else "false"
        instruction = f"{lead.format(body=row['question'])}\n\n{suite.answer_format}"
        return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
    if name == "piqa":
        return _options(suite, lead.format(body=row["goal"]), [row["sol1"], row["sol2"]], int(row["label"]))
    if name == "social_i_qa":
        body = f"{row['context']} {row['question']}"
        return _options(suite, lead.format(body=body), [row["answerA"], row["answerB"], row["answerC"]],
                        int(row["label"]) - 1)
    if name == "hellaswag":
        body = f"{row['activity_label']}: {row['ctx']}"
        return _options(suite, lead.format(body=body), list(row["endings"]), int(row["label"]))
    if name == "winogrande":
        return _options(suite, lead.format(body=row["sentence"]), [row["option1"], row["option2"]],
                        int(row["answer"]) - 1)
    texts, index = _choices(row)
    question = row["question_stem"] if name == "openbookqa" else row["question"]
    return _options(suite, lead.format(body=question), texts, index)


def write_hub_split(suite: Suite | str, rows: Iterable[Mapping[str, Any]], data_dir: str | Path,
                    overwrite: bool = False) -> Path:
    """Convert hub rows (e.g. a ``datasets`` split) and write ``<data_dir>/<suite>/test.json``.

    Example:
        >>> from datasets import load_dataset  # doctest: +SKIP
        >>> write_hub_split("piqa", load_dataset("ybisk/piqa", split="validation"), "data")  # doctest: +SKIP
    """
    path = check_output_path(suite_file(data_dir, suite), overwrite)
    records = [from_hub_record(suite, row) for row in rows]
    if not records:
        raise DataError(f"no rows to convert for {suite}")
    return atomic_write_text(path, json.dumps(records, indent=2) + "\n")
