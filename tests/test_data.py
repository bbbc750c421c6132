"""Instruction data: loading, validation before any model load, tokenisation, masking, collation."""

from __future__ import annotations

import json
import os

import pytest

from poc_lora.config import load_config
from poc_lora.data.instructions import (
    IGNORE_INDEX, build_datasets, data_collator, load_records, resolve_data_path, tokenize_examples,
)
from poc_lora.data.templates import get_template
from poc_lora.errors import ConfigError, DataError
from poc_lora.models import load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model

RECORDS = [
    {"instruction": "Please answer the following question with true or false, question: did Alex find the "
                    "table?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
     "answer": "true"},
    {"instruction": "Please choose the correct solution to the question: What did Kai do?",
     "input": "Solution1: the bucket", "output": "the correct answer is solution1"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")))


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_json_and_jsonl_load_the_same(tmp_path):
    a = load_records(_write(tmp_path / "a.json", RECORDS))
    b = load_records(_write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in RECORDS) + "\n"))
    assert a == b and a[0]["answer"] == "true" and a[1]["input"] == "Solution1: the bucket"


@pytest.mark.parametrize("content,needle", [
    ([{"instruction": "x", "input": ""}], "record 0: missing field 'output'"),
    ([RECORDS[0], {"input": "", "output": "y"}], "record 1: missing field 'instruction'"),
    ([RECORDS[0], RECORDS[1], {"instruction": "x", "output": 3}], "record 2: field 'output' must be a string"),
    ([], "holds no records"),
    ('[{"instruction": ', "not valid JSON"),
    ({"rows": []}, "JSON list"),
    (["just a string"], "record 0: expected an object"),
])
def test_bad_records_name_file_index_and_field(tmp_path, content, needle):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert needle in str(info.value) and "bad.json" in str(info.value)


def test_missing_file_and_bad_jsonl_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.json")
    path = _write(tmp_path / "x.jsonl", json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2"):
        load_records(path)


def test_unknown_template():
    with pytest.raises(ConfigError, match="valid templates: alpaca, llm-adapters"):
        get_template("vicuna")


@pytest.mark.parametrize("template", ["alpaca", "llm-adapters"])
def test_prompt_tokens_masked_exactly(tok, template):
    t = get_template(template)
    out = tokenize_examples(RECORDS, tok, t, cutoff_len=256, train_on_inputs=False)
    for rec, ids, labels in zip(RECORDS, out["input_ids"], out["labels"]):
        prompt_ids = tok(t.train_prompt(rec))["input_ids"]  # independent tokenisation of the prompt alone
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n:-1]) == rec["output"]
    full = tokenize_examples(RECORDS, tok, t, cutoff_len=256, train_on_inputs=True)
    assert full["labels"] == full["input_ids"] == out["input_ids"]


def test_cutoff_truncates_without_eos(tok):
    out = tokenize_examples(RECORDS, tok, get_template("alpaca"), cutoff_len=10, train_on_inputs=True)
    assert all(len(ids) == 10 and ids[-1] != tok.eos_token_id for ids in out["input_ids"])
    off = tokenize_examples(RECORDS, tok, get_template("alpaca"), 256, True, add_eos_token=False)
    assert all(ids[-1] != tok.eos_token_id for ids in off["input_ids"])


def test_val_split_is_seeded_and_sized(tok, tmp_path):
    recs = [dict(RECORDS[0], instruction=f"q {i}") for i in range(30)]
    cfg = load_config({"model_name_or_path": "m", "data_path": "d", "output_dir": "o", "val_set_size": 7,
                       "seed": 1})
    tr, va = build_datasets(recs, tok, get_template("alpaca"), cfg.data)
    assert (len(tr), len(va)) == (23, 7)
    tr2, va2 = build_datasets(recs, tok, get_template("alpaca"), cfg.data)
    assert va["input_ids"] == va2["input_ids"]
    cfg.data.val_set_size = 30
    with pytest.raises(DataError, match="val_set_size=30"):
        build_datasets(recs, tok, get_template("alpaca"), cfg.data)


def test_collator_pads_to_multiple_with_ignored_labels(tok):
    out = tokenize_examples(RECORDS, tok, get_template("alpaca"), 256, False)
    feats = [{k: out[k][i] for k in out} for i in range(2)]
    batch = data_collator(tok, 8)(feats)
    lengths = [len(ids) for ids in out["input_ids"]]
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(lengths)
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, min(lengths):] == 0).all()


def test_synthetic_resolver_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path))
    cfg = load_config({"model_name_or_path": "m", "data_path": "synthetic", "output_dir": "o",
                       "synthetic_train_per_suite": 5, "synthetic_test_per_suite": 3})
    path = resolve_data_path(cfg.data)
    assert path.startswith(str(tmp_path)) and len(load_records(path)) == 40
    mtime = os.path.getmtime(path)
    assert resolve_data_path(cfg.data) == path and os.path.getmtime(path) == mtime
    assert load_config({"model_name_or_path": "m", "data_path": "f.json", "output_dir": "o"}).data.data_path == "f.json"
