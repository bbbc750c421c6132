"""Prompts longer than the model's context: one rule for rank and generate modes (left-truncate
to the context minus the completion, keep BOS), counted per suite and warned once per suite."""

from __future__ import annotations

import json

import pytest
import torch

from eval_harness import evaluate
from eval_harness.data import load_suite
from eval_harness.scoring import CANDIDATE_FORMAT, generate_responses, generation_config, rank_scores
from poc_lora.data.synthetic import write_synthetic_commonsense
from poc_lora.data.templates import get_template
from poc_lora.errors import ConfigError
from poc_lora.models import load_model, load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model

CONTEXT = 32  # the synthetic prompts are ~60 words (tokens) long


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    base = build_tiny_model(root / "tiny32", max_position_embeddings=CONTEXT)
    data = write_synthetic_commonsense(root / "data", train_per_suite=1, test_per_suite=3)
    model = load_model(str(base), "float32").eval()
    return {"root": root, "base": base, "data": data, "model": model, "tok": load_tokenizer(str(base))}


def _prompts(env) -> list[str]:
    tpl = get_template("alpaca")
    long = [tpl.eval_prompt(r) for r in load_suite(env["data"], "boolq", limit=3)]
    return [long[0], "Question : true or false ?", *long[1:]]  # one prompt that fits


def _left_truncated(tok, prompt: str, reserve: int) -> list[int]:
    """The rule, written out: BOS + the last (CONTEXT - reserve - 1) prompt tokens."""
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id
    return ids if len(ids) + reserve <= CONTEXT else [ids[0]] + ids[1:][-(CONTEXT - reserve - 1):]


def test_rank_scores_of_a_truncated_prompt_equal_a_direct_computation(short):
    model, tok = short["model"], short["tok"]
    prompts = _prompts(short)
    labels = [("true", "false")] * len(prompts)
    cut: list[int] = []
    scores = rank_scores(model, tok, prompts, labels, batch_size=2, truncated=cut)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert lengths[1] + 5 <= CONTEXT and all(n > CONTEXT for i, n in enumerate(lengths) if i != 1)
    assert sorted(cut) == [0, 2, 3]
    for prompt, got in zip(prompts, scores):
        for label in ("true", "false"):
            completion = CANDIDATE_FORMAT.format(label=label)
            full, alone = tok(prompt + completion)["input_ids"], tok(prompt)["input_ids"]
            cont = full[len(alone):]
            seq = _left_truncated(tok, prompt, len(cont)) + cont
            assert len(seq) <= CONTEXT
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            start = len(seq) - len(cont)
            expected = sum(logp[start - 1 + t, token].item() for t, token in enumerate(cont))
            assert got[label] == pytest.approx(expected, abs=1e-4)


def test_generate_truncates_by_the_same_rule(short):
    model, tok = short["model"], short["tok"]
    prompts = _prompts(short)
    cut: list[int] = []
    texts = generate_responses(model, tok, prompts, batch_size=2, num_beams=1, max_new_tokens=4, truncated=cut)
    assert sorted(cut) == [0, 2, 3]
    config = generation_config(tok, num_beams=1, max_new_tokens=4)
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([_left_truncated(tok, prompt, 4)])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = new[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert text == tok.decode(new, skip_special_tokens=True).split("### Response:")[0].strip()
    with pytest.raises(ConfigError, match="leaves no room"):
        generate_responses(model, tok, prompts, num_beams=1, max_new_tokens=CONTEXT)


def _adapter(env):
    from peft import LoraConfig, get_peft_model

    out = env["root"] / "adapter"
    if not out.exists():
        model = get_peft_model(load_model(str(env["base"]), "float32"),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        model.save_pretrained(out)
    return out


@pytest.mark.parametrize("mode", ["rank", "generate"])
def test_runner_counts_truncated_prompts_and_warns_once_per_suite(short, tmp_path, caplog, mode):
    tok, tpl = short["tok"], get_template("llm-adapters")  # the default template of adapters without a record
    caplog.set_level("WARNING")
    result = evaluate(str(short["base"]), [_adapter(short)], data_dir=short["data"], output=tmp_path / "eval",
                      tasks="boolq,piqa", mode=mode, include_base=True, max_new_tokens=4, num_beams=1)
    reserve = {"rank": 5, "generate": 4}[mode]  # "the correct answer is <label>": 5 words
    for suite in ("boolq", "piqa"):
        prompts = [tpl.eval_prompt(r) for r in load_suite(short["data"], suite)]
        expected = sum(len(tok(p)["input_ids"]) + reserve > CONTEXT for p in prompts)
        assert expected == len(prompts) == 3
        for key, model in result.models.items():
            assert model.suites[suite].truncated_prompts == expected, (key, suite)
            rows = (tmp_path / "eval" / key / suite / "predictions.jsonl").read_text().splitlines()
            assert [json.loads(r)["prompt_truncated"] for r in rows] == [True] * 3
    warnings = [r.getMessage() for r in caplog.records if "longer than the model's context" in r.getMessage()]
    assert sorted(w.split(":")[0] for w in warnings) == ["boolq", "piqa"]  # 2 models, 2 suites: once per suite
    assert all(": 3 of 3 prompts" in w for w in warnings)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["models"]["adapter"]["suites"]["piqa"]["truncated_prompts"] == 3
