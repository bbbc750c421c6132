"""Instruction data (commonsense_170k layout): load, validate, tokenise, split, collate.

Records are ``{"instruction", "input", "output"}`` (``input`` and ``answer`` optional), read from
a JSON list, a JSONL file, or a hub dataset id via ``datasets``. Validation happens before any
model is loaded and names the file, record index and field at fault.

Tokenisation follows the reference implementation (LLM-Adapters ``finetune.py``): the prompt
(:class:`~poc_lora.data.templates.PromptTemplate`) plus the ``output`` is tokenised with
truncation at ``cutoff_len``; EOS is appended when it fits; with ``train_on_inputs=False`` the
prompt's tokens get label -100 so only the response is learned. Batches are padded only to the
longest example (rounded up to ``pad_to_multiple_of``) by ``DataCollatorForSeq2Seq``.

``data_path`` may also be an LLM-Adapters ``dataset/`` directory: :func:`read_dataset_dir` reads
the ``<suite>/train.json`` of every suite present (checking each record against its suite: label
word, option list), and :func:`load_training_records` carves the seeded ``validation_split``
out of it (:mod:`poc_lora.data.validation`) and applies ``answer_style``
(:mod:`poc_lora.data.choices`).

``data_path: synthetic`` (or ``synthetic-reasoning``, :mod:`poc_lora.data.reasoning`) is the offline default: :func:`resolve_data_path` writes the synthetic
commonsense suites (:mod:`poc_lora.data.synthetic`) once, keyed by their options, under
``$POC_LORA_CACHE/synthetic-...`` and reads the training file from there (the test files for
evaluation sit beside it).

Example:
    >>> from poc_lora.data.instructions import load_records
    >>> records = load_records("data/commonsense_170k.json")  # doctest: +SKIP
    >>> records[0]["instruction"][:20]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import datasets
from transformers import DataCollatorForSeq2Seq

from ..cache import build_once, cache_dir
from ..errors import ConfigError, DataError
from .choices import ANSWER_STYLES, parse_choices, record_answer, text_target
from .requests import lm_eval_record
from .reasoning import make_records as make_reasoning_records
from .suites import SUITE_ORDER, SUITES, Suite
from .synthetic import SYNTHETIC_KINDS, SYNTHETIC_REASONING_DATA, TRAIN_FILE, write_synthetic_commonsense
from .templates import PromptTemplate
from .validation import MANIFEST as VALIDATION_MANIFEST
from .validation import split_validation, validation_dir_for, write_validation_dir

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "answer")
IGNORE_INDEX = -100
_FILE_SUFFIXES = (".json", ".jsonl")


def synthetic_data_dir(train_per_suite: int, test_per_suite: int, label_noise: float, seed: int,
                       kind: str = "synthetic") -> Path:
    """Where :func:`resolve_data_path` keeps the synthetic suites of ``kind`` for these options."""
    return cache_dir() / f"{kind}-tr{train_per_suite}-te{test_per_suite}-ln{label_noise:g}-s{seed}"


def synthetic_test_dir(data_args: Any) -> Path | None:
    """The directory of ``<suite>/test.json`` written beside synthetic training data (written on
    demand), or None when ``data_args.data_path`` is not a synthetic kind."""
    if data_args.data_path not in SYNTHETIC_KINDS:
        return None
    return Path(resolve_data_path(data_args)).parent


def resolve_data_path(data_args: Any) -> str:
    """``data_args.data_path``, with ``"synthetic"`` mapped to the (written on demand) synthetic
    training file. Anything else is returned unchanged."""
    kind = data_args.data_path
    if kind not in SYNTHETIC_KINDS:
        return data_args.data_path
    generator = make_reasoning_records if kind == SYNTHETIC_REASONING_DATA else None
    root = synthetic_data_dir(data_args.synthetic_train_per_suite, data_args.synthetic_test_per_suite,
                              data_args.synthetic_label_noise, data_args.synthetic_seed, kind)

    def build() -> None:
        logger.info("writing the %s suites to %s", kind, root)
        write_synthetic_commonsense(
            root, train_per_suite=data_args.synthetic_train_per_suite,
            test_per_suite=data_args.synthetic_test_per_suite,
            label_noise=data_args.synthetic_label_noise, seed=data_args.synthetic_seed, generator=generator)

    build_once(root, lambda p: (p / TRAIN_FILE).exists(), build)
    return str(root / TRAIN_FILE)


def _read_json_file(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"data file {path}, line {lineno}: invalid JSON ({exc.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict) and isinstance(data.get("train"), list):
        data = data["train"]
    if not isinstance(data, list):
        raise DataError(f"data file {path} must hold a JSON list of records, got {type(data).__name__}")
    return data


def _read_hub_dataset(name: str, split: str) -> list[Any]:
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (offline, missing, bad split)
        raise DataError(f"data_path {name!r} is neither an existing file nor a loadable dataset "
                        f"(split {split!r}): {type(exc).__name__}: {exc}") from None
    return ds.to_list()


def validate_records(records: Sequence[Any], source: str) -> list[dict[str, str]]:
    """Check every record has string ``instruction``/``output`` (and string ``input``/``answer``
    when present); return them with ``input`` defaulted to "". Errors name the record index."""
    if len(records) == 0:
        raise DataError(f"data {source} holds no records")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"data {source}, record {i}: expected an object with fields "
                            f"{', '.join(REQUIRED_FIELDS)}, got {type(rec).__name__}")
        for name in REQUIRED_FIELDS:
            if name not in rec:
                raise DataError(f"data {source}, record {i}: missing field {name!r}")
        for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            if name in rec and rec[name] is not None and not isinstance(rec[name], str):
                raise DataError(f"data {source}, record {i}: field {name!r} must be a string, "
                                f"got {type(rec[name]).__name__}")
        if not rec["instruction"].strip():
            raise DataError(f"data {source}, record {i}: field 'instruction' is empty")
        out.append({**rec, "input": rec.get("input") or ""})
    return out


def load_records(data_path: str | os.PathLike, split: str = "train") -> list[dict[str, str]]:
    """Read and validate instruction records from a JSON/JSONL file or a hub dataset id.

    A path ending in .json/.jsonl (or any existing file) is read as a file; anything else that is
    not an existing path is tried as a ``datasets`` hub id (needs the network or a local cache).
    A directory is read as an LLM-Adapters ``dataset/`` directory (:func:`read_dataset_dir`:
    every suite's ``train.json``, concatenated in the paper's suite order).
    """
    text = str(data_path)
    path = Path(text)
    if path.is_file():
        return validate_records(_read_json_file(path), str(path))
    if path.is_dir():
        return [r for records in read_dataset_dir(path).values() for r in records]
    if path.suffix in _FILE_SUFFIXES or path.exists():
        raise DataError(f"data file {path} not found")
    return validate_records(_read_hub_dataset(text, split), text)


DATASET_TRAIN_FILE = "train.json"  # LLM-Adapters layout: dataset/<suite>/train.json


def dataset_train_files(directory: str | os.PathLike) -> dict[str, Path]:
    """``{suite: <directory>/<suite>/train.json}`` for the suites (paper order) whose training
    file exists; a DataError naming the directory when there is none."""
    directory = Path(directory)
    found = {name: directory / name / DATASET_TRAIN_FILE for name in SUITE_ORDER
             if (directory / name / DATASET_TRAIN_FILE).is_file()}
    if not found:
        raise DataError(f"data_path {directory} is a directory but holds no <suite>/{DATASET_TRAIN_FILE} "
                        f"(an LLM-Adapters dataset/ directory; suites: {', '.join(SUITE_ORDER)})")
    return found


def check_suite_record(record: dict[str, str], suite: Suite, where: str) -> None:
    """A training record of ``suite`` names one of its label words and, for a multiple-choice
    suite, an option its instruction lists; DataError (prefixed by ``where``) otherwise."""
    answer = record_answer(record, suite.search_labels)
    if answer is None:
        raise DataError(f"{where}: no label word of {suite.name} ({', '.join(suite.labels)}) in 'answer' or 'output'")
    if answer not in suite.search_labels:
        raise DataError(f"{where}: field 'answer' is {answer!r}, not a label of {suite.name} "
                        f"({', '.join(suite.search_labels)})")
    try:
        parse_choices(record["instruction"], suite).option(answer)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def read_dataset_dir(directory: str | os.PathLike) -> dict[str, list[dict[str, str]]]:
    """Read and check the ``<suite>/train.json`` of every suite an LLM-Adapters ``dataset/``
    directory holds: ``{suite: records}`` in the paper's suite order; logs the suites found,
    their record counts and the suites absent.

    Every record is checked (:func:`validate_records`, :func:`check_suite_record`) before any
    model loads. Raises :class:`DataError` naming the file and record index: a missing or
    non-string field, a label word outside the suite's set, an option list that cannot be
    parsed, an empty file.

    Example:
        >>> {s: len(r) for s, r in read_dataset_dir("LLM-Adapters/dataset").items()}  # doctest: +SKIP
        {'openbookqa': 4957, 'ARC-Challenge': 1119, 'ARC-Easy': 2251, 'boolq': 9427}
    """
    files = dataset_train_files(directory)
    out = {}
    for name, path in files.items():
        records = validate_records(_read_json_file(path), str(path))
        for i, rec in enumerate(records):
            check_suite_record(rec, SUITES[name], f"data {path}, record {i}")
        out[name] = records
    absent = [s for s in SUITE_ORDER if s not in files]
    logger.info("read %d training records from %s: %s%s", sum(map(len, out.values())), directory,
                ", ".join(f"{s} {len(r)}" for s, r in out.items()),
                f" (no {DATASET_TRAIN_FILE} for {', '.join(absent)})" if absent else "")
    return out


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def apply_answer_style(records: Sequence[dict[str, str]], style: str, source: str,
                       suite: str | None = None) -> list[dict[str, str]]:
    """``records`` with their ``output`` written in ``answer_style`` ``style``.

    ``label`` (the files as they are, the paper's): unchanged. ``text``: "the correct answer is
    <option text>" for multiple-choice records (the option their label word names, parsed from
    the instruction by :func:`~poc_lora.data.choices.parse_choices`); BoolQ-style records, whose
    options are ``true``/``false``, keep "the correct answer is true|false". ``lm-eval``: the
    record as the lm-evaluation-harness request of its correct option
    (:func:`~poc_lora.data.requests.lm_eval_record`; the prompt differs per suite, so ``suite``
    is required). Inputs are not modified. Raises :class:`DataError` naming ``source`` and the
    record index, :class:`ConfigError` for ``lm-eval`` without a suite.
    """
    if style not in ANSWER_STYLES:
        raise ConfigError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {style!r}")
    if style == "label":
        return list(records)
    if style == "lm-eval" and suite is None:
        raise ConfigError(f"answer_style lm-eval needs each record's suite (its prompt differs per suite): give "
                          f"data_path as an LLM-Adapters dataset/ directory (<suite>/train.json), not {source}")
    out = []
    for i, rec in enumerate(records):
        if style == "lm-eval":
            try:
                out.append(lm_eval_record(suite, rec))
            except DataError as exc:
                raise DataError(f"answer_style lm-eval: data {source}, record {i}: {exc}") from None
            continue
        try:
            choices = parse_choices(rec["instruction"])
            answer = record_answer(rec, choices.labels)
            if answer is None:
                raise DataError(f"no label word ({', '.join(choices.labels)}) in 'answer' or 'output'")
            out.append({**rec, "output": text_target(choices, answer)})
        except DataError as exc:
            raise DataError(f"answer_style text: data {source}, record {i}: {exc}") from None
    return out


def _split(data_args: Any, directory: Path) -> tuple[dict[str, list[dict[str, str]]], Path]:
    """The training records of a dataset directory with the validation split held out, and the
    (written on demand) validation directory."""
    files = dataset_train_files(directory)
    by_suite = read_dataset_dir(directory)
    hashes = {s: _file_sha256(p) for s, p in files.items()}
    sources = {s: str(p) for s, p in files.items()}
    spec, seed = data_args.validation_split, data_args.val_split_seed
    train, val, held = split_validation(by_suite, spec, seed, sources)
    root = validation_dir_for(sources, hashes, spec, seed)
    build_once(root, lambda p: (p / VALIDATION_MANIFEST).is_file(),
               lambda: write_validation_dir(root, val, held, sources, hashes, spec, seed))
    return train, root


def _split_source(data_args: Any) -> Path:
    path = Path(resolve_data_path(data_args))
    if not path.is_dir():
        raise ConfigError(f"validation_split needs data_path to be an LLM-Adapters dataset/ directory "
                          f"(<suite>/train.json: the split is drawn per suite); {path} is not one")
    return path


def load_training_records(data_args: Any) -> list[dict[str, str]]:
    """The records training reads for ``data_args`` (a :class:`~poc_lora.config.DataArguments`):
    ``data_path`` resolved and read (file, hub id or dataset directory), the ``validation_split``
    held out (dataset directories only; the validation directory is written on demand, see
    :func:`validation_data_dir`), then ``answer_style`` applied.

    Example:
        >>> load_training_records(DataArguments(data_path="dataset", validation_split=100))  # doctest: +SKIP
    """
    style = getattr(data_args, "answer_style", "label")
    if getattr(data_args, "validation_split", None) is None:
        path = Path(resolve_data_path(data_args))
        if style == "lm-eval" and path.is_dir():  # per suite: lm-eval's prompt differs per suite
            return [r for suite, rs in read_dataset_dir(path).items()
                    for r in apply_answer_style(rs, style, str(path / suite), suite)]
        records = load_records(str(path), data_args.dataset_split)
        return apply_answer_style(records, style, str(data_args.data_path))
    train, root = _split(data_args, _split_source(data_args))
    logger.info("training on %d records; validation split in %s", sum(map(len, train.values())), root)
    return [r for suite, rs in train.items()
            for r in apply_answer_style(rs, style, f"{data_args.data_path} ({suite})", suite)]


def validation_data_dir(data_args: Any) -> Path | None:
    """The directory of ``<suite>/test.json`` holding ``data_args``'s validation split (written on
    demand under ``$POC_LORA_CACHE``), or None when ``validation_split`` is not set."""
    if getattr(data_args, "validation_split", None) is None:
        return None
    return _split(data_args, _split_source(data_args))[1]


def tokenize_examples(
    records: Sequence[dict[str, str]],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos_token: bool = True,
) -> dict[str, list[list[int]]]:
    """``input_ids``/``attention_mask``/``labels`` for each record (the reference's recipe).

    ``labels`` equal ``input_ids`` (EOS included), except that with ``train_on_inputs=False`` the
    tokens of the prompt alone are -100. Batched fast-tokenizer calls, no padding.
    """
    prompts = [template.train_prompt(r) for r in records]
    full = tokenizer([p + r["output"] for p, r in zip(prompts, records)], truncation=True,
                     max_length=cutoff_len, padding=False)
    eos = tokenizer.eos_token_id
    ids_all, mask_all, labels_all = [], [], []
    prompt_lens = None
    if not train_on_inputs:
        prompt_ids = tokenizer(prompts, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
        prompt_lens = [len(p) for p in prompt_ids]
    for k, ids in enumerate(full["input_ids"]):
        ids = list(ids)
        if add_eos_token and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
            ids.append(eos)
        labels = list(ids)
        if prompt_lens is not None:
            n = min(prompt_lens[k], len(ids))
            labels[:n] = [IGNORE_INDEX] * n
        ids_all.append(ids)
        mask_all.append([1] * len(ids))
        labels_all.append(labels)
    return {"input_ids": ids_all, "attention_mask": mask_all, "labels": labels_all}


def build_datasets(records: Sequence[dict[str, str]], tokenizer: Any, template: PromptTemplate, data_args: Any) -> tuple[Any, Any]:
    """Tokenised ``datasets.Dataset`` for training and (``val_set_size`` > 0) validation.

    The split is seeded by ``data_args.val_split_seed`` (not the training seed), so every
    member of an ensemble holds out the same records.
    """
    n_val = data_args.val_set_size
    if n_val >= len(records):
        raise DataError(f"val_set_size={n_val} leaves no training records (the data holds {len(records)})")
    columns = {k: [r.get(k, "") or "" for r in records] for k in ("instruction", "input", "output")}
    ds = datasets.Dataset.from_dict(columns)
    splits = {"train": ds, "test": None}
    if n_val > 0:
        splits = ds.train_test_split(test_size=n_val, shuffle=True, seed=data_args.val_split_seed)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        recs = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        return tokenize_examples(recs, tokenizer, template, data_args.cutoff_len,
                                 data_args.train_on_inputs, data_args.add_eos_token)

    def prepare(split: Any) -> Any:
        if split is None:
            return None
        return split.map(tokenize, batched=True, remove_columns=split.column_names,
                         desc="tokenising", load_from_cache_file=False)

    train = prepare(splits["train"])
    if not data_args.train_on_inputs:
        check_supervised(splits["train"], train, tokenizer, template, data_args.cutoff_len)
    return train, prepare(splits["test"])


def check_supervised(records: Any, tokenized: Any, tokenizer: Any, template: PromptTemplate, cutoff_len: int) -> int:
    """Count the tokenised records with no supervised token (every label -100): with
    ``train_on_inputs=False`` a prompt that fills ``cutoff_len`` cuts the whole response away.

    ``records``: the untokenised rows (``instruction``/``input``/``output``), in the order of
    ``tokenized``. Returns the count; logs a warning naming it when some records are affected.

    Raises:
        DataError: when no record keeps a response token (training would learn nothing: a loss
            of 0 and an adapter of pure noise); the message names ``cutoff_len`` and the
            longest prompt, in tokens.
    """
    empty = [i for i, labels in enumerate(tokenized["labels"]) if all(t == IGNORE_INDEX for t in labels)]
    if not empty:
        return 0
    rows = [records[i] for i in empty]
    prompts = [template.train_prompt({**r, "input": r.get("input") or ""}) for r in rows]
    longest = max(len(ids) for ids in tokenizer(prompts, truncation=False, padding=False)["input_ids"])
    if len(empty) == len(tokenized):
        raise DataError(
            f"with train_on_inputs=false and cutoff_len={cutoff_len}, none of the {len(empty)} training records "
            f"keeps a response token: the prompt alone fills cutoff_len (the longest prompt is {longest} tokens), "
            f"so training would learn nothing. Raise cutoff_len above {longest}, shorten the prompts, or set "
            "train_on_inputs: true")
    logger.warning("%d of %d training records have no response token within cutoff_len=%d (their prompts are up "
                   "to %d tokens) and add nothing to the loss; raise cutoff_len to keep them",
                   len(empty), len(tokenized), cutoff_len, longest)
    return len(empty)


def data_collator(tokenizer: Any, pad_to_multiple_of: int | None = 8) -> Any:
    """Pads each batch to its longest example (rounded up), labels with -100."""
    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=pad_to_multiple_of or None,
                                  return_tensors="pt", padding=True, label_pad_token_id=IGNORE_INDEX)


__all__ = [
    "DATASET_TRAIN_FILE", "IGNORE_INDEX", "apply_answer_style", "build_datasets", "check_suite_record",
    "check_supervised", "data_collator", "dataset_train_files", "load_records", "load_training_records",
    "read_dataset_dir", "resolve_data_path", "synthetic_data_dir", "synthetic_test_dir", "tokenize_examples",
    "validate_records", "validation_data_dir",
]
