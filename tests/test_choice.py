"""choice mode: lm-evaluation-harness's requests from LLM-Adapters records, scores equal to a direct
per-option forward, batch invariance, acc / acc_norm in the runner, and the pipeline's mode list on
a dataset directory with a validation split."""

from __future__ import annotations

import json

import pytest
import torch

from eval_harness import evaluate
from eval_harness.choice import ChoiceRequest, choice_predictions, choice_request
from eval_harness.data import from_hub_record, load_suite
from eval_harness.scoring import continuation_logprobs
from poc_lora.data.synthetic import write_synthetic_commonsense
from poc_lora.data.templates import get_template
from poc_lora.errors import DataError
from poc_lora.models import load_model, load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model

# Hub rows in each data set's own schema; the expected requests are lm-evaluation-harness's task
# definitions written out by hand (context, continuation per option).
HUB = {
    "ARC-Easy": ({"question": "Which is a metal?", "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]},
                  "answerKey": "B"},
                 [("Question: Which is a metal?\nAnswer:", " wood"), ("Question: Which is a metal?\nAnswer:", " iron"),
                  ("Question: Which is a metal?\nAnswer:", " glass")], "answer2"),
    "openbookqa": ({"question_stem": "The sun is", "choices": {"text": ["cold", "a star"], "label": ["A", "B"]},
                    "answerKey": "B"}, [("The sun is", " cold"), ("The sun is", " a star")], "answer2"),
    "boolq": ({"question": "is the sky blue", "answer": True},
              [("Question: is the sky blue?\nAnswer:", " yes"), ("Question: is the sky blue?\nAnswer:", " no")], "true"),
    "piqa": ({"goal": "Dry hair", "sol1": "use a towel", "sol2": "use an oven", "label": 0},
             [("Question: Dry hair\nAnswer:", " use a towel"), ("Question: Dry hair\nAnswer:", " use an oven")],
             "solution1"),
    "social_i_qa": ({"context": "Kai gave a gift.", "question": "How does Kai feel?", "answerA": "happy",
                     "answerB": "sad", "answerC": "bored", "label": "1"},
                    [("Q: Kai gave a gift. How does Kai feel?\nA:", f" {o}") for o in ("happy", "sad", "bored")],
                    "answer1"),
    "hellaswag": ({"activity_label": "Baking", "ctx": "A man mixes flour. He", "endings": ["bakes it.", "swims [header] fast."],
                   "label": 0},
                  [("Baking: A man mixes flour. He", " bakes it."), ("Baking: A man mixes flour. He", " swims fast.")],
                  "ending1"),
    "winogrande": ({"sentence": "Ann gave Bo a book because _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "1"},
                   [("Ann gave Bo a book because Ann", " was kind."), ("Ann gave Bo a book because Bo", " was kind.")],
                   "option1"),
}


@pytest.mark.parametrize("suite", list(HUB))
def test_requests_follow_lm_evaluation_harness(suite):
    row, expected, answer = HUB[suite]
    record = from_hub_record(suite, row)  # the LLM-Adapters layout
    request = choice_request(suite, record)
    assert record["answer"] == answer
    labels = list(request.labels)
    if suite == "boolq":  # the options are its label words; lm-eval's words are no/yes
        assert labels == ["true", "false"]
    assert list(request.pairs) == expected
    # acc_norm's divisor: the option's characters without the leading space (WinoGrande: the
    # shared continuation's)
    assert list(request.lengths) == [len(cont) - 1 for _, cont in expected]


def test_template_format_scores_option_texts_after_the_training_prompt():
    row, _, _ = HUB["ARC-Easy"]
    record = from_hub_record("ARC-Easy", row)
    tpl = get_template("alpaca")
    request = choice_request("ARC-Easy", record, tpl, "template")
    assert request.pairs[1] == (tpl.eval_prompt(record), "the correct answer is iron")
    assert choice_request("boolq", from_hub_record("boolq", HUB["boolq"][0]), tpl, "template").pairs[0][1] == \
        "the correct answer is true"


def test_winogrande_without_a_blank_is_refused():
    record = from_hub_record("winogrande", {**HUB["winogrande"][0], "sentence": "No blank here."})
    with pytest.raises(DataError, match="no blank"):
        choice_request("winogrande", record)


def test_acc_and_acc_norm_definitions():
    request = ChoiceRequest(((" ", " a"), (" ", " bbbbbb"), (" ", " cc")), ("answer1", "answer2", "answer3"), (1, 6, 2))
    # acc: the largest log-likelihood; acc_norm: the largest log-likelihood per character
    assert choice_predictions(request, [-3.0, -6.0, -5.0]) == ("answer1", "answer2")
    assert choice_predictions(request, [-2.0, -2.0, -9.0]) == ("answer1", "answer2")  # ties: the first listed


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("choice")
    base = build_tiny_model(root / "tiny")
    data = write_synthetic_commonsense(root / "data", train_per_suite=1, test_per_suite=6)
    model = load_model(str(base), "float32").eval()
    return {"root": root, "base": base, "data": data, "model": model, "tok": load_tokenizer(str(base))}


def _direct(model, tok, context, continuation):
    """log p(continuation | context) from one full forward of context + continuation."""
    n_ctx = len(tok(context)["input_ids"])
    ids = torch.tensor([tok(context + continuation)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(n_ctx, ids.shape[1]))


def test_choice_scores_equal_a_direct_forward_per_option_and_are_batch_invariant(env):
    requests = [choice_request(s, r) for s in ("winogrande", "ARC-Easy", "boolq", "hellaswag")
                for r in load_suite(env["data"], s, limit=2)]
    requests.append(ChoiceRequest((("one two", " three"), ("one two four", " three")), ("a", "b"), (1, 1)))
    pairs = [q.pairs for q in requests]
    got = continuation_logprobs(env["model"], env["tok"], pairs, batch_size=3)
    one = continuation_logprobs(env["model"], env["tok"], pairs, batch_size=1)
    for q, scores, scores1 in zip(requests, got, one):
        assert len(scores) == len(q.pairs)
        for (ctx, cont), value, value1 in zip(q.pairs, scores, scores1):
            expected = _direct(env["model"], env["tok"], ctx, cont)
            assert value == pytest.approx(expected, abs=1e-4)
            assert value1 == pytest.approx(value, abs=1e-5)


@pytest.mark.parametrize("continuation", ["", " "])
def test_a_continuation_with_no_token_of_its_own_is_refused_not_scored_as_the_context(env, continuation):
    # The old fallback scored the context's last token ("world" given "hello") as if it were the
    # continuation; a log-likelihood of nothing has no such value, so the API refuses it.
    if continuation and env["tok"]("hello world" + continuation)["input_ids"] != env["tok"]("hello world")["input_ids"]:
        pytest.skip("this tokenizer gives the space a token of its own")
    with pytest.raises(DataError, match="continuation"):
        continuation_logprobs(env["model"], env["tok"], [[("hello world", continuation), ("hello world", " three")]])


def test_runner_reports_acc_and_acc_norm_from_its_predictions(env):
    out = env["root"] / "out"
    result = evaluate(str(env["base"]), data_dir=env["data"], output=out, tasks="winogrande,ARC-Easy,boolq",
                      mode="choice", limit=6, batch_size=4)
    model = result.models["tiny"]
    for suite, res in model.suites.items():
        rows = [json.loads(line) for line in (out / "tiny" / suite / "predictions.jsonl").read_text().splitlines()]
        best = [max(r["scores"], key=r["scores"].get) for r in rows]
        best_norm = [max(r["scores"], key=lambda k: r["scores"][k] / r["lengths"][k]) for r in rows]
        assert res.accuracy == pytest.approx(sum(b == r["label"] for b, r in zip(best, rows)) / len(rows))
        assert res.acc_norm == pytest.approx(sum(b == r["label"] for b, r in zip(best_norm, rows)) / len(rows))
        assert res.settings["choice_format"] == "lm-eval"
        if suite == "winogrande":  # one shared continuation: nothing to normalise
            assert res.acc_norm == res.accuracy
    assert model.average_norm == pytest.approx(sum(s.acc_norm for s in model.suites.values()) / 3)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"]["tiny"]["suites"]["boolq"]["acc_norm"] == model.suites["boolq"].acc_norm


def test_unparseable_options_fail_before_the_model_loads(env, tmp_path):
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    rec = load_suite(env["data"], "piqa", limit=1)[0]
    bad = {**rec, "instruction": rec["instruction"].replace("Solution1:", "Solution 1")}
    (data / "piqa" / "test.json").write_text(json.dumps([rec, bad]))
    with pytest.raises(DataError, match=r"piqa/test.json: record 1: cannot parse the option list"):
        evaluate("no/such-model", data_dir=data, output=tmp_path / "o", tasks="piqa", mode="choice")


@pytest.mark.slow
def test_pipeline_on_a_dataset_directory_scores_its_validation_split_in_two_modes(tmp_path, monkeypatch):
    """data_path = an LLM-Adapters dataset/ directory, validation_split set, no eval.data_dir: the
    pipeline evaluates on the validation directory, in choice mode (report's table, acc_norm
    table) and rank mode (eval_rank/, its own table)."""
    from poc_lora.pipeline import DEMO_CONFIG, run_pipeline

    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "dataset"
    synthetic = write_synthetic_commonsense(tmp_path / "synthetic", train_per_suite=1, test_per_suite=12)
    for suite in ("ARC-Easy", "boolq"):  # the synthetic test records, in the training layout
        (data / suite).mkdir(parents=True)
        (data / suite / "train.json").write_text((synthetic / suite / "test.json").read_text())
    report = run_pipeline(DEMO_CONFIG, tmp_path / "pipe", [
        "--data_path", str(data), "--validation_split", "4", "--eval.mode", "choice,rank", "--eval.tasks", "available",
        "--num_adapters", "2", "--max_steps", "2", "--save_steps", "2", "--merge.methods", "poc", "--val_set_size", "0",
        "--eval.include_base", "true"])
    summary = json.loads((tmp_path / "pipe" / "eval" / "summary.json").read_text())
    rank = json.loads((tmp_path / "pipe" / "eval_rank" / "summary.json").read_text())
    assert summary["mode"] == "choice" and rank["mode"] == "rank"
    val_dir = next((tmp_path / "cache").glob("validation-*"))
    assert summary["data_dir"] == str(val_dir) and summary["tasks"] == ["ARC-Easy", "boolq"]
    assert summary["models"]["tiny-llama"]["suites"]["boolq"]["n"] == 4
    assert set(report.tables) == {"rank", "choice acc_norm"}
    base_rank = next(r for r in report.tables["rank"] if r["Method"] == "Base model")
    assert base_rank["Ave."] == pytest.approx(100 * rank["models"]["tiny-llama"]["average"], abs=0.01)
    md = (tmp_path / "pipe" / "report.md").read_text()
    assert "## Scored in rank mode" in md and "acc_norm" in md and "choice-mode scoring (also rank)" in md


def test_mode_lists_are_for_the_pipeline_one_mode_per_evaluation(tmp_path):
    from poc_lora.config import EvalArguments
    from poc_lora.errors import ConfigError

    assert EvalArguments(mode="choice, rank").modes == ["choice", "rank"]
    with pytest.raises(ConfigError, match="eval mode must be generate, rank, choice"):
        EvalArguments(mode="choice,ranked")
    with pytest.raises(ConfigError, match="choice_format must be lm-eval or template"):
        EvalArguments(choice_format="lm_eval")
    with pytest.raises(ConfigError, match="one per evaluation"):
        evaluate("no/such-model", data_dir=tmp_path, output=tmp_path / "o", tasks="boolq", mode="choice,rank")


def test_demo_data_dir_needs_smollm2_and_a_directory(tmp_path):
    from poc_lora.errors import ConfigError
    from poc_lora.pipeline import run_demo

    with pytest.raises(ConfigError, match="needs --model smollm2"):
        run_demo(tmp_path / "out", model="tiny", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="is not a directory"):
        run_demo(tmp_path / "out", model="smollm2", data_dir=tmp_path / "missing")
    assert not (tmp_path / "out").exists()
