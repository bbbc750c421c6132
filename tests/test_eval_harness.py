"""eval_harness: extraction rule, both scoring modes, the runner's outputs, resume and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eval_harness import evaluate, extract_answer, metric_path
from eval_harness.data import load_suite
from eval_harness.scoring import _split_pairs, candidate_labels, generate_responses, rank_scores
from eval_harness.suites import SUITES, TABLE_COLUMNS
from poc_lora.cli import main as cli_main
from poc_lora.data.synthetic import write_synthetic_commonsense
from poc_lora.data.templates import TEMPLATE_RECORD_FILE, get_template, template_record
from poc_lora.errors import AdapterError, ConfigError, DataError, OutputError
from poc_lora.models import load_model, load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model

TASKS = "boolq,piqa"


def _make_adapter(base_dir, out, seed, template=None, r=4):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(str(base_dir), "float32"),
                           LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero; randomise it so adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    if template:
        (out / TEMPLATE_RECORD_FILE).write_text(json.dumps(template_record(get_template(template))))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_model(root / "tiny")
    data = write_synthetic_commonsense(root / "data", train_per_suite=1, test_per_suite=8)
    return {
        "root": root,
        "base": base,
        "data": data,
        "a0": _make_adapter(base, root / "a0", 1, template="alpaca"),
        "a1": _make_adapter(base, root / "a1", 2),
        "merged": _make_adapter(base, root / "merged", 3, template="alpaca"),
    }


@pytest.fixture(scope="module")
def plain(env):
    return load_model(str(env["base"]), "float32").eval(), load_tokenizer(str(env["base"]))


def _prompts(env, suites=("ARC-Challenge", "boolq", "hellaswag"), n=3, template="alpaca"):
    tpl = get_template(template)
    recs = [(s, r) for s in suites for r in load_suite(env["data"], s, limit=n)]
    return [tpl.eval_prompt(r) for _, r in recs], [candidate_labels(s, r["instruction"]) for s, r in recs]


# ------------------------------------------------------------------------------ extraction
EXTRACTION_CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "trueness", "true"),  # substring inside another word still counts
    ("boolq", "untrue", "true"),
    ("boolq", "false, not true", "false"),  # several labels: the first by position
    ("piqa", "solution2 or solution1", "solution2"),
    ("boolq", "True", None),  # case-sensitive
    ("hellaswag", "Ending3", None),
    ("winogrande", "", None),
    ("ARC-Easy", "no idea", None),
    ("social_i_qa", "answer5", "answer5"),  # answer1..answer5 searched whatever the options
    ("openbookqa", "xanswer4y", "answer4"),
]


@pytest.mark.parametrize("suite, text, expected", EXTRACTION_CASES)
def test_extract_answer(suite, text, expected):
    assert extract_answer(suite, text) == expected
    assert extract_answer(SUITES[suite], text) == expected


def test_candidate_labels_follow_the_option_lines():
    assert candidate_labels("ARC-Easy", "Q\n\nAnswer1: a\n\nAnswer2: b\n\nAnswer3: c") == ("answer1", "answer2", "answer3")
    assert candidate_labels("boolq", "anything") == ("true", "false")
    assert candidate_labels("piqa", "no options here") == ("solution1", "solution2")


# ------------------------------------------------------------------------------ evaluate metric
def _first_label(labels, text):
    """The paper's rule written out directly: the label found at the smallest position (str.find),
    the one listed first at a tie; None when no label occurs."""
    hits = [(text.find(label), i, label) for i, label in enumerate(labels) if label in text]
    return min(hits)[2] if hits else None


def _edge_texts(suite):
    """Generated-text edge cases built from the suite's label words, plus the extraction cases."""
    labels = suite.search_labels
    texts = ["", "no idea", "the correct answer is", " ".join(labels)]
    for i, label in enumerate(labels):
        other = labels[(i + 1) % len(labels)]
        texts += [f"the correct answer is {label}", label.upper(), label.capitalize(), f"x{label}y",
                  f"{other} or {label}", f"{label}, not {other}", f"{label[:-1]} {label[-1]}"]
    return texts + [text for name, text, _ in EXTRACTION_CASES if name == suite.name]


@pytest.mark.parametrize("suite", list(SUITES))
def test_metric_equals_the_harness_scoring_on_every_suite(suite):
    import evaluate

    metric = evaluate.load(metric_path(), suite)
    texts = _edge_texts(SUITES[suite])
    labels = SUITES[suite].labels
    refs = [labels[(i // 2) % len(labels)] for i in range(len(texts))]
    got = metric.compute(predictions=texts, references=refs)
    # the harness's per-example rule (runner rows) and the rule written out independently
    correct = sum(extract_answer(suite, t) == r for t, r in zip(texts, refs))
    direct = sum(_first_label(SUITES[suite].search_labels, t) == r for t, r in zip(texts, refs))
    unparsed = sum(_first_label(SUITES[suite].search_labels, t) is None for t in texts)
    assert correct == direct and 0 < correct < len(texts) and unparsed > 0
    assert got == {"accuracy": direct / len(texts), "correct": direct, "total": len(texts), "unparsed": unparsed}
    # loaded without a configuration name, the suite comes with compute()
    assert evaluate.load(metric_path()).compute(predictions=texts, references=refs, suite=suite) == got


def test_metric_bad_suite_names_the_valid_ones():
    import evaluate

    with pytest.raises(ConfigError, match="unknown task 'siqa'; valid tasks: social_i_qa"):
        evaluate.load(metric_path(), "siqa")
    with pytest.raises(ConfigError, match="needs a suite"):
        evaluate.load(metric_path()).compute(predictions=["true"], references=["true"])


def test_metric_loads_with_the_network_off(tmp_path):
    code = textwrap.dedent("""
        import json, socket

        def refuse(*args, **kwargs):
            raise OSError("the network is off in this test")

        socket.socket.connect = socket.create_connection = refuse
        import evaluate
        from eval_harness import metric_path

        metric = evaluate.load(metric_path(), "boolq")
        print(json.dumps(metric.compute(predictions=["true", "untrue", "True"], references=["true", "false", "true"])))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_EVALUATE_CACHE": str(tmp_path / "evaluate")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    preds = [extract_answer("boolq", t) for t in ("true", "untrue", "True")]
    correct = sum(p == r for p, r in zip(preds, ["true", "false", "true"]))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "accuracy": correct / 3, "correct": correct, "total": 3, "unparsed": preds.count(None)}
    assert list((tmp_path / "modules").rglob("commonsense_accuracy.py"))  # imported from the local copy


EXACT_TEXT_MODULE = '''
import datasets
import evaluate


class ExactText(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", inputs_description="", features=datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return {"exact_match": sum(p == r for p, r in zip(predictions, references)) / len(predictions)}
'''


def test_metric_in_evaluate_combine(tmp_path):
    import evaluate

    (tmp_path / "exact_text").mkdir()
    (tmp_path / "exact_text" / "exact_text.py").write_text(EXACT_TEXT_MODULE)
    combined = evaluate.combine([evaluate.load(metric_path(), "piqa"), evaluate.load(str(tmp_path / "exact_text"))])
    texts = ["solution1", "the correct answer is solution2", "Solution1", "solution2"]
    refs = ["solution1", "solution2", "solution1", "solution1"]
    got = combined.compute(predictions=texts, references=refs)
    correct = sum(_first_label(("solution1", "solution2"), t) == r for t, r in zip(texts, refs))
    assert got == {"accuracy": correct / 4, "correct": correct, "total": 4, "unparsed": 1,
                   "exact_match": sum(t == r for t, r in zip(texts, refs)) / 4}


def test_metric_as_trainer_compute_metrics(env, plain, tmp_path):
    import datasets
    import evaluate
    from transformers import Trainer, TrainingArguments

    from poc_lora.data.instructions import data_collator, tokenize_examples

    model, tokenizer = plain
    records = [dict(r, output=f"the correct answer is {r['answer']}") for r in load_suite(env["data"], "boolq", limit=7)]
    eval_dataset = datasets.Dataset.from_dict(
        tokenize_examples(records, tokenizer, get_template("alpaca"), 256, train_on_inputs=False))
    answers = [r["answer"] for r in records]
    # as in the README: teacher-forced argmax tokens of the response, decoded, scored by the metric
    metric = evaluate.load(metric_path(), "boolq")

    def preprocess_logits_for_metrics(logits, labels):
        return logits.argmax(-1)  # keep token ids, not batch x length x vocabulary logits

    def compute_metrics(eval_pred):
        ids, labels = eval_pred.predictions, eval_pred.label_ids
        texts = [tokenizer.decode(p[:-1][l[1:] != -100]) for p, l in zip(ids, labels)]  # position t predicts t+1
        return metric.compute(predictions=texts, references=answers)

    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=3, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, eval_dataset=eval_dataset, data_collator=data_collator(tokenizer),
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    got = trainer.evaluate()
    texts = []  # independently: one example at a time, no padding, no Trainer
    for row in eval_dataset:
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].argmax(-1)
        keep = torch.tensor(row["labels"][1:]) != -100
        texts.append(tokenizer.decode(pred[:-1][keep].tolist()))
    assert all(texts)
    correct = sum(_first_label(("true", "false"), t) == a for t, a in zip(texts, answers))
    assert got["eval_correct"] == correct and got["eval_total"] == len(records)
    assert got["eval_unparsed"] == sum(_first_label(("true", "false"), t) is None for t in texts)
    assert got["eval_accuracy"] == pytest.approx(correct / len(records))


# ------------------------------------------------------------------------------ scoring
def test_generate_is_batch_size_invariant(env, plain):
    model, tok = plain
    prompts, _ = _prompts(env, n=2)
    one = generate_responses(model, tok, prompts, batch_size=1, num_beams=4, max_new_tokens=6)
    many = generate_responses(model, tok, prompts, batch_size=4, num_beams=4, max_new_tokens=6)
    assert one == many
    assert all(one)


def test_rank_scores_match_an_independent_full_forward(env, plain):
    model, tok = plain
    prompts, cands = _prompts(env)
    # labels with a longer common prefix ("option"): in a batch with the others, the rows score
    # different numbers of shared completion tokens in the shared pass
    prompts.insert(1, prompts[0])
    cands.insert(1, ["option A", "option B"])
    counts = {_split_pairs(tok, [(p, f"the correct answer is {c}") for c in cs], True).scored
              for p, cs in zip(prompts, cands)}
    assert len(counts) > 1 and min(counts) > 0
    got = rank_scores(model, tok, prompts, cands, batch_size=4)
    single = rank_scores(model, tok, prompts, cands, batch_size=1)
    for prompt, labels, scores, scores1 in zip(prompts, cands, got, single):
        n_prompt = len(tok(prompt)["input_ids"])
        for label in labels:
            ids = torch.tensor([tok(prompt + f"the correct answer is {label}")["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            expected = sum(logp[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))
            assert scores[label] == pytest.approx(expected, abs=1e-4)
            assert scores1[label] == pytest.approx(expected, abs=1e-4)
        assert max(scores, key=scores.get) == max(scores1, key=scores1.get)


# ------------------------------------------------------------------------------ runner
@pytest.fixture(scope="module")
def ranked(env):
    out = env["root"] / "out-rank"
    result = evaluate(str(env["base"]), [env["a0"], env["a1"]], [env["merged"]], data_dir=env["data"],
                      output=out, tasks=TASKS, mode="rank", limit=6, batch_size=4)
    return out, result


def test_runner_outputs_and_paper_rows(env, ranked):
    out, result = ranked
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["Method", "Model", *TABLE_COLUMNS]
    assert TABLE_COLUMNS[:3] == ("SIQA", "PIQA", "WinoGrande") and TABLE_COLUMNS[-1] == "Ave."
    ens = "LoRA ensemble (M = 2, M forward passes)"
    assert [r["Method"] for r in table] == ["LoRA", "LoRA", ens, "Merged", "LoRA (best)", "LoRA (ave.)", ens, "PoC merge"]
    accs = {}
    for key in ("a0", "a1", "merged"):
        per_suite = {}
        for suite in ("boolq", "piqa"):
            rows = [json.loads(line) for line in (out / key / suite / "predictions.jsonl").read_text().splitlines()]
            assert len(rows) == 6 and {"index", "prompt_sha256", "scores", "prediction", "label", "correct"} <= set(rows[0])
            per_suite[SUITES[suite].column] = 100 * sum(r["prediction"] == r["label"] for r in rows) / 6
        accs[key] = {**per_suite, "Ave.": sum(per_suite.values()) / 2}
    by_model = {r["Model"]: r for r in table[:4]}
    for key, acc in accs.items():
        for col, value in acc.items():
            assert float(by_model[key][col]) == pytest.approx(value)
        assert by_model[key]["SIQA"] == ""  # not evaluated
    best = max(["a0", "a1"], key=lambda k: accs[k]["Ave."])
    assert float(table[4]["Ave."]) == pytest.approx(accs[best]["Ave."]) and table[4]["Model"] == best
    assert float(table[5]["BoolQ"]) == pytest.approx((accs["a0"]["BoolQ"] + accs["a1"]["BoolQ"]) / 2)
    assert float(table[7]["PIQA"]) == pytest.approx(accs["merged"]["PIQA"])
    models = json.loads((out / "summary.json").read_text())["models"]
    assert models["a0"]["template"] == "alpaca" and models["a1"]["template"] == "llm-adapters"
    assert models["a1"]["template_source"] == "default"
    md_rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(md_rows) == 1 + 8 and md_rows[-1].startswith("| PoC merge | merged |")


def test_adapter_swapping_matches_a_fresh_peft_load(env, ranked):
    from peft import PeftModel

    out, _ = ranked
    model = PeftModel.from_pretrained(load_model(str(env["base"]), "float32"), str(env["a1"])).eval()
    tok = load_tokenizer(str(env["base"]))
    records = load_suite(env["data"], "piqa", limit=6)
    tpl = get_template("llm-adapters")
    expected = rank_scores(model, tok, [tpl.eval_prompt(r) for r in records],
                           [candidate_labels("piqa", r["instruction"]) for r in records])
    rows = [json.loads(line) for line in (out / "a1" / "piqa" / "predictions.jsonl").read_text().splitlines()]
    other = [json.loads(line) for line in (out / "a0" / "piqa" / "predictions.jsonl").read_text().splitlines()]
    for row, exp, oth in zip(rows, expected, other):
        assert row["scores"] == pytest.approx(exp, abs=1e-4)
        assert row["scores"] != pytest.approx(oth["scores"], abs=1e-3)  # the adapters differ


def test_resume_skips_finished_pairs(env, ranked, monkeypatch):
    import eval_harness.runner as runner

    out, first = ranked
    pred = out / "a0" / "boolq" / "predictions.jsonl"
    mtime = pred.stat().st_mtime_ns
    calls = []
    real = runner._score_suite
    monkeypatch.setattr(runner, "_score_suite", lambda *a, **k: calls.append(a[3].name) or real(*a, **k))
    monkeypatch.setattr(runner._ModelHolder, "_load_base", lambda self: pytest.fail("model loaded on resume"))
    again = evaluate(str(env["base"]), [env["a0"], env["a1"]], [env["merged"]], data_dir=env["data"],
                     output=out, tasks=TASKS, mode="rank", limit=6, batch_size=2)
    assert calls == [] and pred.stat().st_mtime_ns == mtime
    assert again.table == first.table
    with pytest.raises(OutputError, match="limit"):
        evaluate(str(env["base"]), [env["a0"]], data_dir=env["data"], output=out, tasks=TASKS, mode="rank", limit=5)


def test_generate_mode_through_the_cli(env, capsys):
    out = env["root"] / "out-gen"
    argv = ["eval", "--base_model", str(env["base"]), "--adapter", str(env["a0"]), "--data_dir", str(env["data"]),
            "--tasks", "winogrande", "--limit", "3", "--num_beams", "2", "--max_new_tokens", "4",
            "--batch_size", "2", "--output", str(out)]
    assert cli_main(argv) == 0
    assert "| LoRA | a0 |" in capsys.readouterr().out
    summary = json.loads((out / "a0" / "winogrande" / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "a0" / "winogrande" / "predictions.jsonl").read_text().splitlines()]
    assert summary["settings"]["mode"] == "generate" and summary["settings"]["num_beams"] == 2
    assert summary["unparsed"] == sum(r["prediction"] is None for r in rows)
    assert all(r["prediction"] == extract_answer("winogrande", r["generated"]) for r in rows)
    assert summary["correct"] == sum(r["correct"] for r in rows)
    labels = SUITES["winogrande"].search_labels
    direct = sum(_first_label(labels, r["generated"]) == r["label"] for r in rows)
    assert summary["correct"] == direct and summary["accuracy"] == direct / len(rows)


# ------------------------------------------------------------------------------ bad input
def _broken_data(env, name, content):
    root = env["root"] / f"bad-{name}"
    (root / "boolq").mkdir(parents=True)
    (root / "boolq" / "test.json").write_text(content)
    return root


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty", "[]", r"test\.json is empty"),
        ("record", json.dumps([{"instruction": "q", "answer": "true"}] * 2 + [{"instruction": "q"}]),
         r"test\.json: record 2 has no field 'answer'"),
        ("label", json.dumps([{"instruction": "q", "answer": "maybe"}]), r"record 0: field 'answer' is 'maybe'"),
        ("json", "[{", r"not valid JSON \(line 1"),
    ],
)
def test_bad_test_files(env, name, content, pattern):
    data = _broken_data(env, name, content)
    out = env["root"] / f"out-bad-{name}"
    with pytest.raises(DataError, match=pattern):
        evaluate(str(env["base"]), data_dir=data, output=out, tasks="boolq", mode="rank")
    assert not out.exists()


def test_missing_suite_dir_and_unknown_task(env, capsys):
    out = env["root"] / "out-missing"
    with pytest.raises(DataError, match=r"nope[/\\]piqa[/\\]test\.json.*Getting the commonsense data"):
        evaluate(str(env["base"]), data_dir=env["root"] / "nope", output=out, tasks="piqa", mode="rank")
    with pytest.raises(ConfigError, match="valid tasks: social_i_qa, piqa"):
        evaluate(str(env["base"]), data_dir=env["data"], output=out, tasks="piqa,siqa", mode="rank")
    assert cli_main(["eval", "--base_model", str(env["base"]), "--data_dir", str(env["data"]),
                     "--tasks", "bogus", "--output", str(out)]) == 1
    assert "unknown task 'bogus'" in capsys.readouterr().err
    assert not out.exists()


def test_adapter_that_does_not_fit_the_base(env):
    other = build_tiny_model(env["root"] / "tiny-32", hidden_size=32, intermediate_size=88)
    bad = _make_adapter(other, env["root"] / "bad-adapter", 4)
    with pytest.raises(AdapterError, match=r"bad-adapter does not fit the base model .*tiny"):
        evaluate(str(env["base"]), [bad], data_dir=env["data"], output=env["root"] / "out-fit",
                 tasks="boolq", mode="rank", limit=2)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        evaluate(str(env["base"]), [env["data"]], data_dir=env["data"], output=env["root"] / "out-fit",
                 tasks="boolq", mode="rank", limit=2)


def test_eval_cli_takes_brace_expanded_and_repeated_adapters():
    """README: `--adapter runs/x/adapter_{0..2}` expands to one flag with several directories."""
    from poc_lora.cli import parse_command

    for spelling in ("_", "-"):  # the old dashed spellings still parse (with a deprecation warning)
        argv = [f"--base{spelling}model", "b", f"--data{spelling}dir", "d", "--output", "o",
                "--adapter", "a_0", "a_1", "a_2", f"--merged{spelling}adapter", "m", "--adapter", "a_3"]
        args, sections = parse_command("eval", argv)
        assert args.adapter == ["a_0", "a_1", "a_2", "a_3"] and args.merged_adapter == ["m"]
        assert args.base_model == "b" and sections["eval"] == {"data_dir": "d"}


def test_typed_result_is_the_summary_file(ranked):
    """evaluate() returns an EvalResult whose to_dict() is summary.json, and which loads back."""
    from eval_harness.results import EvalResult, SuiteResult

    out, result = ranked
    on_disk = json.loads((out / "summary.json").read_text())
    loaded = EvalResult.load(out / "summary.json")
    assert loaded.to_dict() == on_disk  # the file's layout, exactly
    # The resume test may have rewritten summary.json (its timing); everything else is this result.
    assert {k: v for k, v in result.to_dict().items() if k != "seconds"} == \
        {k: v for k, v in on_disk.items() if k != "seconds"}
    pair = json.loads((out / "a0" / "boolq" / "summary.json").read_text())
    assert SuiteResult.from_dict(pair) == result.models["a0"].suites["boolq"]
    assert result.models["a0"].average == pytest.approx(
        sum(s["accuracy"] for s in on_disk["models"]["a0"]["suites"].values()) / len(on_disk["tasks"]))
    with pytest.raises(OutputError, match="missing"):
        EvalResult.from_dict({"mode": "rank"}, "x.json")
