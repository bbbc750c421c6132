"""The output ensemble, calibration metrics and the merge-to-ensemble distance (eval_harness).

Every number is recomputed here independently (numpy / torch on the prediction rows, direct
formulas for NLL, Brier and ECE), never taken from the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval_harness import evaluate
from eval_harness.calibration import calibration, expected_calibration_error, option_probabilities
from eval_harness.ensemble import distance_to_ensemble, ensemble_rows, majority_vote, pairwise_disagreement
from poc_lora.data.synthetic import write_synthetic_commonsense
from poc_lora.errors import DataError
from poc_lora.merge import merge_adapters
from poc_lora.models import load_model
from poc_lora.testing.tiny_model import build_tiny_model
# the adapters of the many-models tests: random A and B (PEFT's zero B would make each the base)
from test_multi_eval import _adapter as random_adapter

# ---------------------------------------------------------------- direct implementations


def _direct(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, float]:
    """NLL, Brier, ECE, confidence of a (N, K) probability table, written from the definitions."""
    n, k = probs.shape
    onehot = np.eye(k)[labels]
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.sum() / n * abs(correct[inside].mean() - conf[inside].mean())
    return {"nll": float(-np.log(np.maximum(probs[np.arange(n), labels], 5e-324)).mean()),
            "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
            "ece": float(ece), "confidence": float(conf.mean())}


def _as_dicts(probs: np.ndarray, names=("a", "b", "c")) -> list[dict[str, float]]:
    return [dict(zip(names, map(float, row))) for row in probs]


def _check(probs: np.ndarray, labels: np.ndarray, names=("a", "b", "c")) -> dict[str, float]:
    got = calibration(_as_dicts(probs, names), [names[i] for i in labels])
    want = _direct(probs, labels)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, abs=1e-12), key
    return want


def test_calibration_against_the_definitions_on_a_random_table():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, size=200)
    _check(probs, labels)


def test_perfectly_calibrated_table_has_zero_ece():
    # 10 questions at confidence 0.8 of which exactly 8 right, 4 at 0.5 of which 2 right
    probs = np.array([[0.8, 0.1, 0.1]] * 10 + [[0.5, 0.3, 0.2]] * 4)
    labels = np.array([0] * 8 + [1] * 2 + [0] * 2 + [2] * 2)
    want = _check(probs, labels)
    assert want["ece"] == pytest.approx(0.0, abs=1e-12)


def test_maximally_over_confident_table():
    probs = np.array([[1.0, 0.0, 0.0]] * 5)
    labels = np.array([1, 2, 1, 2, 1])  # always certain, always wrong
    want = _check(probs, labels)
    assert want["ece"] == pytest.approx(1.0) and want["brier"] == pytest.approx(2.0)
    assert math.isfinite(want["nll"]) and want["nll"] > 700  # capped at the smallest double, not inf
    assert expected_calibration_error([1.0] * 5, [False] * 5) == pytest.approx(1.0)


def test_option_probabilities_is_the_softmax_and_survives_large_sums():
    scores = {"x": -1000.0, "y": -1001.5, "z": -1003.0}
    want = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
    assert list(option_probabilities(scores).values()) == pytest.approx(want.tolist(), abs=1e-15)
    with pytest.raises(ValueError):
        option_probabilities({"x": float("-inf")})


# ---------------------------------------------------------------- the ensemble from rows


def _member_rows(seed: int, n: int = 12, labels=("answer1", "answer2", "answer3")) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, len(labels), (n,), generator=torch.Generator().manual_seed(99))
    rows = []
    for i in range(n):
        scores = (torch.randn(len(labels), generator=gen, dtype=torch.float64) * 3 - 5).tolist()
        lengths = [3 + j for j in range(len(labels))]
        rows.append({"index": i, "label": labels[truth[i]], "scores": dict(zip(labels, scores)),
                     "lengths": dict(zip(labels, lengths)),
                     "prediction": labels[int(np.argmax(scores))]})
    return rows


def test_ensemble_rows_recomputed_from_the_members():
    members = [_member_rows(s) for s in (1, 2, 3, 4)]
    ens = ensemble_rows(members, ["m0", "m1", "m2", "m3"])
    labels = list(members[0][0]["scores"])
    correct = 0
    for i, row in enumerate(ens):
        per_member = torch.stack([torch.softmax(torch.tensor(list(m[i]["scores"].values()), dtype=torch.float64), 0)
                                  for m in members])
        mean = per_member.mean(0)
        assert list(row["probabilities"].values()) == pytest.approx(mean.tolist(), abs=1e-12)
        assert row["prediction"] == labels[int(mean.argmax())]
        lengths = torch.tensor([float(members[0][i]["lengths"][k]) for k in labels], dtype=torch.float64)
        norm = torch.stack([torch.softmax(torch.tensor(list(m[i]["scores"].values()), dtype=torch.float64) / lengths, 0)
                            for m in members]).mean(0)
        assert row["prediction_norm"] == labels[int(norm.argmax())]
        assert row["correct"] == (row["prediction"] == members[0][i]["label"])
        correct += row["correct"]
    assert 0 < correct < len(ens)  # the fixture exercises both outcomes
    assert ens[0]["member_predictions"] == {f"m{j}": members[j][0]["prediction"] for j in range(4)}


def test_majority_vote_breaks_ties_by_the_lowest_member_index():
    assert majority_vote(["answer2", "answer1", "answer1", "answer2"]) == "answer2"
    assert majority_vote(["answer1", "answer2", "answer2", "answer1"]) == "answer1"
    assert majority_vote([None, "answer3", "answer1", "answer1"]) == "answer1"
    assert majority_vote([None, None]) is None
    rows = [[{"index": 0, "label": "true", "generated": g, "prediction": p}] for g, p in
            (("x", "false"), ("y", "true"), ("z", None))]
    ens = ensemble_rows(rows, ["a", "b", "c"])
    assert ens[0]["prediction"] == "false" and ens[0]["correct"] is False  # 1-1 tie: member a's answer


def test_members_on_different_records_are_refused():
    a, b = _member_rows(1), _member_rows(2)
    with pytest.raises(DataError, match="different records"):
        ensemble_rows([a, b[:-1]], ["a", "b"])
    b[3] = {**b[3], "label": "answer9" if b[3]["label"] != "answer9" else "answer8"}
    with pytest.raises(DataError, match="row 3"):
        ensemble_rows([a, b], ["a", "b"])
    with pytest.raises(DataError, match="at least 2"):
        ensemble_rows([a], ["a"])


def test_distance_and_disagreement_against_direct_formulas():
    members = [_member_rows(s) for s in (5, 6, 7)]
    ens = ensemble_rows(members, ["a", "b", "c"])
    model = members[1]
    d = distance_to_ensemble(ens, model)
    p = torch.tensor([list(r["probabilities"].values()) for r in ens], dtype=torch.float64)
    q = torch.softmax(torch.tensor([list(r["scores"].values()) for r in model], dtype=torch.float64), 1)
    assert d.kl == pytest.approx(float((p * (p.log() - q.log())).sum(1).mean()), abs=1e-12)
    assert d.agreement == pytest.approx(np.mean([e["prediction"] == m["prediction"] for e, m in zip(ens, model)]))
    assert distance_to_ensemble(ens, ens).kl == pytest.approx(0.0, abs=1e-15)
    preds = [[r["prediction"] for r in m] for m in members]
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = np.mean([np.mean([x != y for x, y in zip(preds[i], preds[j])]) for i, j in pairs])
    assert pairwise_disagreement(members) == pytest.approx(want)


# ---------------------------------------------------------------- end to end on the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    base_dir = build_tiny_model(root / "tiny")
    base = load_model(str(base_dir), "float32")
    data = write_synthetic_commonsense(root / "data", train_per_suite=1, test_per_suite=8)
    adapters = [random_adapter(base, root / f"a{j}", j + 1, r=4, target_modules=["q_proj", "v_proj"])
                for j in range(4)]
    merge_adapters(adapters, root / "merged")
    return {"root": root, "base": str(base_dir), "data": data, "adapters": adapters, "merged": root / "merged"}


@pytest.mark.parametrize("mode", ["rank", "choice"])
def test_eval_writes_the_ensemble_and_calibration_at_no_extra_forward_pass(tiny, mode, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    calls = {"n": 0}
    forward = llama.LlamaModel.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(llama.LlamaModel, "forward", counting)
    counts, results = {}, {}
    for flag in (False, True):
        calls["n"] = 0
        out = tiny["root"] / f"eval_{mode}_{flag}"
        results[flag] = evaluate(tiny["base"], tiny["adapters"], [tiny["merged"]], data_dir=tiny["data"],
                                 output=out, tasks="boolq,piqa", mode=mode, include_base=True, ensemble=flag,
                                 batch_models=False)
        counts[flag] = calls["n"]
    assert counts[True] == counts[False] > 0
    assert results[False].ensemble is None and "lora-ensemble" not in results[False].models
    res = results[True]
    ens = res.ensemble
    assert ens.members == ["a0", "a1", "a2", "a3"] and ens.label == "LoRA ensemble (M = 4, M forward passes)"
    out = tiny["root"] / f"eval_{mode}_True"
    for suite in ("boolq", "piqa"):
        rows = [[json.loads(x) for x in (out / k / suite / "predictions.jsonl").read_text().splitlines()]
                for k in ens.members]
        ens_rows = [json.loads(x) for x in (out / "lora-ensemble" / suite / "predictions.jsonl").read_text().splitlines()]
        correct = 0
        for i, row in enumerate(ens_rows):
            labels = list(rows[0][i]["scores"])
            mean = torch.stack([torch.softmax(torch.tensor([r[i]["scores"][k] for k in labels],
                                                           dtype=torch.float64), 0) for r in rows]).mean(0)
            assert [row["probabilities"][k] for k in labels] == pytest.approx(mean.tolist(), abs=1e-9)
            assert row["prediction"] == labels[int(mean.argmax())]
            correct += row["prediction"] == rows[0][i]["label"]
        summary = res.models["lora-ensemble"].suites[suite]
        assert summary.accuracy == pytest.approx(correct / len(ens_rows))
        # every model's calibration equals the definitions on its own rows
        for key in ("tiny", "a0", "merged", "lora-ensemble"):
            r = [json.loads(x) for x in (out / key / suite / "predictions.jsonl").read_text().splitlines()]
            labels = list(r[0]["probabilities"])
            probs = np.array([[row["probabilities"][k] for k in labels] for row in r])
            want = _direct(probs, np.array([labels.index(row["label"]) for row in r]))
            got = res.models[key].suites[suite]
            assert (got.nll, got.brier, got.ece) == pytest.approx((want["nll"], want["brier"], want["ece"]), abs=1e-9)
        # the PoC merge's distance, recomputed from the files
        merged = [json.loads(x) for x in (out / "merged" / suite / "predictions.jsonl").read_text().splitlines()]
        agree = np.mean([e["prediction"] == m["prediction"] for e, m in zip(ens_rows, merged)])
        assert ens.distances["merged"]["agreement"][suite] == pytest.approx(agree)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["ensemble"]["members"] == ens.members and saved["models"]["lora-ensemble"]["kind"] == "ensemble"
    assert saved["models"]["a1"]["nll"] == pytest.approx(np.mean([res.models["a1"].suites[s].nll
                                                                 for s in ("boolq", "piqa")]))
    methods = [row["Method"] for row in res.table]
    assert methods.index("LoRA (ave.)") < methods.index(ens.label, methods.index("LoRA (ave.)")) < methods.index("PoC merge")
    assert (out / "calibration.csv").read_text().count("\n") == len(res.calibration_table) + 1


def test_generate_mode_ensemble_is_the_vote(tiny):
    out = tiny["root"] / "eval_generate"
    res = evaluate(tiny["base"], tiny["adapters"][:3], data_dir=tiny["data"], output=out, tasks="boolq",
                   mode="generate", limit=4, max_new_tokens=4, num_beams=1)
    rows = [[json.loads(x) for x in (out / k / "boolq" / "predictions.jsonl").read_text().splitlines()]
            for k in ("a0", "a1", "a2")]
    ens = [json.loads(x) for x in (out / "lora-ensemble" / "boolq" / "predictions.jsonl").read_text().splitlines()]
    for i, row in enumerate(ens):
        votes = [r[i]["prediction"] for r in rows]
        parsed = [v for v in votes if v is not None]
        if parsed:
            top = max(parsed.count(v) for v in parsed)
            assert row["prediction"] == next(v for v in votes if v is not None and parsed.count(v) == top)
        else:
            assert row["prediction"] is None
    assert res.models["lora-ensemble"].nll is None and res.calibration_table == []
    assert res.ensemble.distances["a0"]["kl"] is None
