"""The offline defaults: synthetic suites in the LLM-Adapters formats and the tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from eval_harness.suites import SUITE_ORDER, SUITES
from poc_lora.data.synthetic import CUES, TRAIN_FILE, write_synthetic_commonsense
from poc_lora.data.templates import TEMPLATES
from poc_lora.models import load_model, load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_commonsense(tmp_path_factory.mktemp("syn") / "data", train_per_suite=40, test_per_suite=24)


def test_layout_and_formats(data_dir):
    train = json.loads((data_dir / TRAIN_FILE).read_text())
    assert len(train) == 8 * 40
    for name in SUITE_ORDER:
        suite = SUITES[name]
        test = json.loads((data_dir / name / "test.json").read_text())
        assert len(test) == 24
        for rec in test:
            assert set(rec) == {"instruction", "input", "output", "answer"}
            assert rec["instruction"].endswith("\n\n" + suite.answer_format)
            assert rec["answer"] in suite.labels
            assert rec["output"] == f"the correct answer is {rec['answer']}"
            if suite.option_prefix:  # options are written inside the instruction
                assert f"\n\n{suite.option_prefix}1: " in rec["instruction"]
        # answer positions are balanced in the clean test set
        counts = Counter(r["answer"] for r in test)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_rule_is_consistent_on_test_sets(data_dir):
    # Independent check of the rule: the single cue word in the question decides the answer.
    cue_position = {w: i for i, group in enumerate(CUES) for w in group}
    for name in SUITE_ORDER:
        for rec in json.loads((data_dir / name / "test.json").read_text()):
            cues = [w for w in re.findall(r"\w+", rec["instruction"]) if w in cue_position]
            assert len(cues) == 1
            assert SUITES[name].labels[cue_position[cues[0]]] == rec["answer"]


def test_deterministic_by_seed(tmp_path, data_dir):
    again = write_synthetic_commonsense(tmp_path / "again", train_per_suite=40, test_per_suite=24)
    other = write_synthetic_commonsense(tmp_path / "other", train_per_suite=40, test_per_suite=24, seed=1)
    assert (again / TRAIN_FILE).read_bytes() == (data_dir / TRAIN_FILE).read_bytes()
    assert (other / TRAIN_FILE).read_bytes() != (data_dir / TRAIN_FILE).read_bytes()


def test_tiny_model_loads_with_auto_classes_and_covers_the_data(tmp_path, data_dir):
    path = build_tiny_model(tmp_path / "tiny")
    tok = load_tokenizer(str(path))
    model = load_model(str(path), dtype="float32")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    texts = [t.train_no_input for t in TEMPLATES.values()]
    for name in SUITE_ORDER:
        rec = json.loads((data_dir / name / "test.json").read_text())[0]
        texts += [rec["instruction"], rec["output"]]
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text
    ids = tok("the correct answer is ending3")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "the correct answer is ending3"
    # same seed, same weights
    again = build_tiny_model(tmp_path / "tiny2")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_pretrained_tiny_base_has_learned_the_answer_format(tmp_path, data_dir):
    # The demo's base is briefly pretrained; it must model the answer text far better than the
    # random base it starts from (loss on held-out records, computed with the plain model).
    import torch

    from poc_lora.data.instructions import data_collator, tokenize_examples
    from poc_lora.data.templates import get_template

    records = json.loads((data_dir / "piqa" / "test.json").read_text())[:16]

    def loss(path):
        tok, model = load_tokenizer(str(path)), load_model(str(path), dtype="float32")
        enc = tokenize_examples(records, tok, get_template("alpaca"), cutoff_len=256, train_on_inputs=False)
        batch = data_collator(tok)([dict(zip(enc, v)) for v in zip(*enc.values())])
        with torch.no_grad():
            return model(**batch).loss.item()

    random_base = build_tiny_model(tmp_path / "random")
    pretrained = build_tiny_model(tmp_path / "pretrained", pretrain_steps=30)
    assert loss(pretrained) < 0.5 * loss(random_base)
