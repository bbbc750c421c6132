"""Real data in: LLM-Adapters dataset/ directories, the seeded validation split, answer_style text.

The fixture writes a small directory in the LLM-Adapters layout by hand (the real files' one-line
option lists); expected values are written out in the tests, not computed by the code under test.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from eval_harness.data import load_suite
from poc_lora.config import DataArguments
from poc_lora.data.choices import parse_choices
from poc_lora.data.instructions import (apply_answer_style, load_records, load_training_records, read_dataset_dir,
                                        validation_data_dir)
from poc_lora.errors import ConfigError, DataError

LEAD = "Please choose the correct answer to the question: "
BOOLQ_LEAD = "Please answer the following question with true or false, question: "


def _mc(question: str, options: list[str], answer: int) -> dict[str, str]:
    """A record as the LLM-Adapters files write it: options on one line, 1-based answer."""
    opts = " ".join(f"Answer{i}: {o}" for i, o in enumerate(options, 1))
    fmt = "/".join(f"answer{i}" for i in range(1, len(options) + 1))
    return {"instruction": f"{LEAD}{question}\n\n{opts}\n\nAnswer format: {fmt}", "input": "",
            "output": f"the correct answer is answer{answer}", "answer": f"answer{answer}"}


def _bool(question: str, answer: str) -> dict[str, str]:
    return {"instruction": f"{BOOLQ_LEAD}{question}\n\nAnswer format: true/false", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


def _write(root: Path, suite: str, records: list) -> None:
    (root / suite).mkdir(parents=True, exist_ok=True)
    (root / suite / "train.json").write_text(json.dumps(records))


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "dataset"
    _write(root, "ARC-Easy", [_mc(f"Which thing number {i} is a metal?", ["wood", f"iron {i}", "glass", "paper"], 2)
                              for i in range(20)])
    _write(root, "openbookqa", [_mc(f"The sun number {i} is", ["cold", "a star", "a planet"], 2) for i in range(12)])
    _write(root, "boolq", [_bool(f"is {i} an even number?", "true" if i % 2 == 0 else "false") for i in range(30)])
    (root / "piqa").mkdir()  # a suite directory without train.json (e.g. only test.json): skipped
    (root / "piqa" / "test.json").write_text("[]")
    (root / "README.md").write_text("not a suite")
    return root


def test_reader_reads_every_suite_present_and_logs_them(dataset, caplog):
    with caplog.at_level(logging.INFO, logger="poc_lora.data.instructions"):
        by_suite = read_dataset_dir(dataset)
    assert list(by_suite) == ["openbookqa", "ARC-Easy", "boolq"]  # the paper's suite order
    assert {s: len(r) for s, r in by_suite.items()} == {"openbookqa": 12, "ARC-Easy": 20, "boolq": 30}
    assert "openbookqa 12, ARC-Easy 20, boolq 30" in caplog.text and "piqa" in caplog.text
    assert len(load_records(dataset)) == 62  # data_path: the directory, every suite's records


@pytest.mark.parametrize("record, pattern", [
    ({"instruction": LEAD + "q?\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2", "answer": "answer1"},
     r"record 3: missing field 'output'"),
    ({**_mc("q?", ["a", "b", "c"], 1), "answer": "answer9"}, r"record 3: field 'answer' is 'answer9', not a label"),
    ({**_mc("q?", ["a", "b", "c"], 1), "answer": "answer4"}, r"record 3: label 'answer4' names none of the options"),
    ({**_mc("q?", ["a", "b"], 1), "instruction": LEAD + "q? no options here\n\nAnswer format: answer1/answer2"},
     r"record 3: cannot parse the option list: no 'Answer1:'"),
    ({**_mc("q?", ["a", "b"], 1), "instruction": LEAD + "q?\n\nAnswer1: a Answer2: \n\nAnswer format: answer1/answer2"},
     r"record 3: cannot parse the option list: option Answer2 is empty"),
])
def test_malformed_records_name_the_file_and_record(dataset, record, pattern):
    records = json.loads((dataset / "ARC-Easy" / "train.json").read_text())
    records[3] = record
    _write(dataset, "ARC-Easy", records)
    with pytest.raises(DataError, match=pattern) as info:
        read_dataset_dir(dataset)
    assert str(dataset / "ARC-Easy" / "train.json") in str(info.value)


def test_out_of_set_boolq_label_and_empty_suite(dataset):
    records = json.loads((dataset / "boolq" / "train.json").read_text())
    records[7]["answer"] = "yes"
    _write(dataset, "boolq", records)
    with pytest.raises(DataError, match=r"boolq/train.json, record 7: field 'answer' is 'yes'"):
        read_dataset_dir(dataset)
    _write(dataset, "boolq", [])
    with pytest.raises(DataError, match=r"boolq/train.json holds no records"):
        read_dataset_dir(dataset)


def test_a_directory_without_suites_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no <suite>/train.json"):
        read_dataset_dir(tmp_path / "empty")


def test_parse_choices_one_line_and_paragraph_layouts():
    one = parse_choices(LEAD + "Pick one: Answer or not?\n\nAnswer1: yes, Answer2 is wrong Answer2: no\n\n"
                        "Answer format: answer1/answer2")
    assert one.question == "Pick one: Answer or not?"
    assert one.options == ("yes, Answer2 is wrong", "no") and one.labels == ("answer1", "answer2")
    para = parse_choices("Please choose the correct solution to the question: Dry hair?\n\nSolution1: towel\n\n"
                         "Solution2: oven\n\nAnswer format: solution1/solution2")
    assert para.question == "Dry hair?" and para.options == ("towel", "oven")
    assert parse_choices(BOOLQ_LEAD + "is it?\n\nAnswer format: true/false").options == ("true", "false")


def _args(dataset, **kw):
    return DataArguments(data_path=str(dataset), **{"validation_split": 5, **kw})


def _val(dataset, **kw) -> dict[str, list[str]]:
    root = validation_data_dir(_args(dataset, **kw))
    return {p.parent.name: [r["instruction"] for r in json.loads(p.read_text())] for p in root.glob("*/test.json")}


def test_validation_split_is_disjoint_seeded_and_outside_the_input(dataset):
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    root = validation_data_dir(_args(dataset))
    assert dataset not in root.parents and root.parent == dataset.parent / "cache"
    val = _val(dataset)
    assert {s: len(v) for s, v in val.items()} == {"openbookqa": 5, "ARC-Easy": 5, "boolq": 5}
    train = load_training_records(_args(dataset))
    assert len(train) == 62 - 15
    assert not {r["instruction"] for r in train} & {q for v in val.values() for q in v}
    # written in the suites' layout and read like a test set by the evaluation
    assert [r["instruction"] for r in load_suite(root, "boolq")] == val["boolq"]
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before  # input untouched
    assert _val(dataset) == val  # seeded: the same split again
    assert _val(dataset, val_split_seed=7) != val
    frac = _val(dataset, validation_split=0.25)
    assert {s: len(v) for s, v in frac.items()} == {"openbookqa": 3, "ARC-Easy": 5, "boolq": 8}


def test_validation_split_is_stable_when_a_suite_is_added(dataset, tmp_path):
    val = _val(dataset)
    bigger = tmp_path / "bigger"
    shutil.copytree(dataset, bigger)
    _write(bigger, "ARC-Challenge", [_mc(f"Hard question {i}?", ["x", "y", "z", "w"], 4) for i in range(9)])
    val2 = _val(bigger)
    assert set(val2) == set(val) | {"ARC-Challenge"}
    assert {s: val2[s] for s in val} == val


def test_duplicates_of_validation_records_are_not_trained_on(dataset):
    records = json.loads((dataset / "boolq" / "train.json").read_text())
    _write(dataset, "boolq", records + records)  # every record twice
    val = set(_val(dataset)["boolq"])
    train = load_training_records(_args(dataset))
    assert not {r["instruction"] for r in train} & val
    assert sum(1 for r in train if r["instruction"].startswith(BOOLQ_LEAD)) == 60 - 2 * 5


@pytest.mark.parametrize("value", [0, -3, 2.5, 1.0 + 1e-9])
def test_validation_split_must_be_a_count_or_a_fraction(value):
    with pytest.raises(ConfigError, match="validation_split must be a count"):
        DataArguments(data_path="x", validation_split=value)


def test_validation_split_that_leaves_nothing_and_on_a_single_file(dataset, tmp_path):
    with pytest.raises(DataError, match=r"holds out 12 of the 12 records of .*openbookqa/train.json"):
        validation_data_dir(_args(dataset, validation_split=12))
    single = tmp_path / "one.json"
    single.write_text(json.dumps([_bool("is it?", "true")]))
    with pytest.raises(ConfigError, match="validation_split needs data_path to be an LLM-Adapters dataset/ directory"):
        load_training_records(DataArguments(data_path=str(single), validation_split=1))


def test_answer_style_text_targets(dataset):
    text = {r["instruction"]: r for r in load_training_records(_args(dataset, answer_style="text", validation_split=None))}
    arc = text[_mc("Which thing number 3 is a metal?", ["wood", "iron 3", "glass", "paper"], 2)["instruction"]]
    assert arc["output"] == "the correct answer is iron 3" and arc["answer"] == "answer2"
    obqa = text[_mc("The sun number 0 is", ["cold", "a star", "a planet"], 2)["instruction"]]
    assert obqa["output"] == "the correct answer is a star"
    assert text[_bool("is 3 an even number?", "false")["instruction"]]["output"] == "the correct answer is false"
    label = load_training_records(_args(dataset, validation_split=None))  # the default: the files as they are
    assert {r["output"] for r in label} == {"the correct answer is answer2", "the correct answer is true",
                                            "the correct answer is false"}


def test_answer_style_text_on_a_mixed_file_without_answer_fields():
    """commonsense_170k.json: no suite names; the label words come from the output and the option
    prefix from the Answer format line."""
    piqa = {"instruction": "Please choose the correct solution to the question: Dry hair?\n\nSolution1: towel\n\n"
                           "Solution2: oven\n\nAnswer format: solution1/solution2",
            "input": "", "output": "the correct answer is solution1"}
    out = apply_answer_style([piqa, _mc("q?", ["a", "b"], 2)], "text", "mixed.json")
    assert [r["output"] for r in out] == ["the correct answer is towel", "the correct answer is b"]
    assert piqa["output"] == "the correct answer is solution1"  # input not modified
    bad = {**piqa, "output": "the correct answer is unknown"}
    with pytest.raises(DataError, match=r"answer_style text: data mixed.json, record 1: no label word"):
        apply_answer_style([piqa, bad], "text", "mixed.json")
    with pytest.raises(ConfigError, match="answer_style must be one of label, text"):
        DataArguments(data_path="x", answer_style="words")


def test_answer_style_lm_eval_renders_the_lm_eval_request_of_the_correct_option(dataset):
    """Expected strings written out from lm-evaluation-harness's task definitions (ARC: "Question:
    {q}\\nAnswer:" + " {option}"; OBQA: the stem + " {option}"; BoolQ: "Question: {q}?\\nAnswer:" +
    " yes"/" no")."""
    records = load_training_records(_args(dataset, answer_style="lm-eval", prompt_template="plain"))
    by_instruction = {r["instruction"]: r for r in records}
    assert len(records) == 62 - 15  # 5 held out per suite
    arc = next(r for r in records if r["instruction"].startswith("Question: Which thing number"))
    i = arc["instruction"].split("number ")[1].split(" ")[0]
    assert arc["instruction"] == f"Question: Which thing number {i} is a metal?\nAnswer:"
    assert arc["output"] == f" iron {i}" and arc["input"] == "" and arc["answer"] == "answer2"
    obqa = next(r for r in records if r["instruction"].startswith("The sun number"))
    assert obqa["output"] == " a star" and "\n" not in obqa["instruction"]
    boolq = [r for r in records if r["instruction"].startswith("Question: is ")]
    assert len(boolq) == 25
    for r in boolq:
        i = int(r["instruction"].split()[2])
        assert r["instruction"] == f"Question: is {i} an even number?\nAnswer:"  # one "?", lm-eval's BoolQ prompt
        assert r["output"] == (" yes" if i % 2 == 0 else " no")


def test_answer_style_lm_eval_trains_on_the_continuation_tokens_only(dataset):
    from poc_lora.data.instructions import tokenize_examples
    from poc_lora.data.templates import get_template
    from poc_lora.testing.tiny_model import build_tiny_model
    from poc_lora.models import load_tokenizer

    tok = load_tokenizer(str(build_tiny_model(dataset.parent / "tiny")))
    rec = {"instruction": "Question: Which is a metal?\nAnswer:", "input": "", "output": " iron", "answer": "answer2"}
    out = tokenize_examples([rec], tok, get_template("plain"), cutoff_len=64, train_on_inputs=False)
    ids, labels = out["input_ids"][0], out["labels"][0]
    n_prompt = len(tok(rec["instruction"])["input_ids"])
    assert ids[:n_prompt] == tok(rec["instruction"])["input_ids"]  # the prompt is the context, unwrapped
    assert all(x == -100 for x in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert len(ids) > n_prompt  # the continuation (and EOS) are learned


def test_answer_style_lm_eval_needs_the_plain_template_and_suites(dataset, tmp_path):
    with pytest.raises(ConfigError, match="prompt_template plain"):
        DataArguments(data_path=str(dataset), answer_style="lm-eval", prompt_template="alpaca")
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([_mc("q?", ["a", "b"], 1)]))
    with pytest.raises(ConfigError, match="needs each record's suite"):
        load_training_records(DataArguments(data_path=str(flat), answer_style="lm-eval", prompt_template="plain"))
