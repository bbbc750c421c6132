"""Many models in one pass (eval_harness.multimodel): equal to evaluating them one by one.

The models: the base, three adapters (ranks 4, 4 and 2; the third also adapts ``up_proj``) and
their PoC merge of the first two (rank 8), with LoRA on decoder layer 1 only (layer 0 is the
shared trunk) and on every layer. Adapters get random B factors (PEFT's zero B would make every
model the base), so a wrong model-to-row mapping or cache gather shows in the scores.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

import eval_harness.loading as loading
import eval_harness.runner as runner
from eval_harness import evaluate
from eval_harness.data import load_suite
from eval_harness.multimodel import Unsupported, build_multi_model
from eval_harness.scoring import candidate_labels, rank_scores
from poc_lora.cli import main as cli_main
from poc_lora.data.synthetic import write_synthetic_commonsense
from poc_lora.data.templates import get_template
from poc_lora.errors import AdapterError
from poc_lora.merge import merge_adapters
from poc_lora.models import load_model, load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model

pytestmark = pytest.mark.usefixtures("private_cache")
TASKS = "boolq,piqa"
MODELS = ("tiny", "a0", "a1", "a2", "merged")


def _adapter(base, path, seed, **lora):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_alpha=8, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "lora_B" in name else 0.3))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    base_dir = build_tiny_model(root / "tiny")
    base = load_model(str(base_dir), "float32")
    data = write_synthetic_commonsense(root / "data", train_per_suite=1, test_per_suite=6)
    sets = {}
    for name, layers in (("upper", [1]), ("all", None)):
        d = root / name
        a0 = _adapter(base, d / "a0", 1, r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=layers)
        a1 = _adapter(base, d / "a1", 2, r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=layers)
        a2 = _adapter(base, d / "a2", 3, r=2, target_modules=["q_proj", "v_proj", "up_proj"],
                      layers_to_transform=layers, use_rslora=True)
        merge_adapters([a0, a1], d / "merged")
        sets[name] = [a0, a1, a2], [d / "merged"]
    return {"root": root, "base": base_dir, "data": data, "sets": sets}


def _rows(out, key, suite):
    return [json.loads(line) for line in (out / key / suite / "predictions.jsonl").read_text().splitlines()]


def _run(env, layers, mode, batch_models, out, dtype="auto"):
    adapters, merged = env["sets"][layers]
    return evaluate(str(env["base"]), adapters, merged, data_dir=env["data"], output=out, tasks=TASKS, mode=mode,
                    limit=6, batch_size=4, include_base=True, batch_models=batch_models, dtype=dtype)


@pytest.mark.parametrize("layers,mode", [("upper", "rank"), ("upper", "choice"), ("all", "rank"), ("all", "choice")])
def test_many_models_equal_one_by_one(env, layers, mode, monkeypatch):
    built = []
    real = loading.build_multi_model
    monkeypatch.setattr(loading, "build_multi_model", lambda model, paths: built.append(len(paths)) or real(model, paths))
    root = env["root"] / f"{layers}-{mode}"
    together = _run(env, layers, mode, True, root / "together")
    assert built == [len(MODELS)]  # one multi-model for all five, reused for the second suite
    _run(env, layers, mode, False, root / "alone")
    assert built == [len(MODELS)]
    assert list(together.models) == [*MODELS[:-1], "lora-ensemble", MODELS[-1]]  # the ensemble: no forward pass
    for suite in TASKS.split(","):
        base_scores = [r["scores"] for r in _rows(root / "together", "tiny", suite)]
        for key in MODELS:
            got, want = _rows(root / "together", key, suite), _rows(root / "alone", key, suite)
            assert [r["prediction"] for r in got] == [r["prediction"] for r in want], (key, suite)
            for g, w in zip(got, want):
                assert g["scores"] == pytest.approx(w["scores"], abs=1e-4), (key, suite)
                assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-4), (key, suite)
                assert ({k: v for k, v in g.items() if k not in ("scores", "probabilities")}
                        == {k: v for k, v in w.items() if k not in ("scores", "probabilities")})
            if key != "tiny":  # the adapters really change the scores (else the test proves little)
                assert max(abs(g["scores"][c] - b[c]) for g, b in zip(got, base_scores) for c in b) > 1e-2
            summary = json.loads((root / "together" / key / suite / "summary.json").read_text())
            alone = json.loads((root / "alone" / key / suite / "summary.json").read_text())
            assert summary["settings"] == alone["settings"] and summary["accuracy"] == alone["accuracy"]


def test_bfloat16_base_many_models_as_close_to_float32_as_one_by_one(env):
    # On a bf16 base the models' LoRA products run in bf16 (PEFT's layer: in float32). Against
    # the float32 scores, the together-run's error stays of the size of PEFT's own bf16 error.
    root = env["root"] / "bf16"
    _run(env, "all", "rank", True, root / "together", dtype="bfloat16")
    _run(env, "all", "rank", False, root / "alone", dtype="bfloat16")
    _run(env, "all", "rank", False, root / "fp32", dtype="float32")

    def error(key, suite, run):
        got, want = _rows(root / run, key, suite), _rows(root / "fp32", key, suite)
        return max(abs(g["scores"][c] - w["scores"][c]) for g, w in zip(got, want) for c in w["scores"])

    same = total = 0
    for suite in TASKS.split(","):
        for key in MODELS:
            assert 0 < error(key, suite, "together") <= 3 * error(key, suite, "alone"), (key, suite)
            got, want = _rows(root / "together", key, suite), _rows(root / "fp32", key, suite)
            same += sum(g["prediction"] == w["prediction"] for g, w in zip(got, want))
            total += len(got)
    assert same >= 0.95 * total


def test_resume_after_a_together_run_recomputes_nothing(env, monkeypatch):
    out = env["root"] / "resume"
    first = _run(env, "upper", "rank", True, out)
    monkeypatch.setattr(runner, "_score_suite", lambda *a, **k: pytest.fail("a finished pair was recomputed"))
    assert _run(env, "upper", "rank", False, out).table == first.table  # the same files serve both paths


@pytest.fixture(scope="module")
def plain(env):
    return load_model(str(env["base"]), "float32").eval(), load_tokenizer(str(env["base"]))


def _inputs(env, n=5):
    tpl = get_template("llm-adapters")
    recs = [(s, r) for s in ("boolq", "piqa") for r in load_suite(env["data"], s, limit=n)]
    return [tpl.eval_prompt(r) for _, r in recs], [candidate_labels(s, r["instruction"]) for s, r in recs]


def test_batch_invariance_and_trunk_rows(env, plain):
    model, tok = plain
    adapters, merged = env["sets"]["upper"]
    paths = [None, *adapters, *merged]
    prompts, cands = _inputs(env)
    multi = build_multi_model(model, paths)
    try:
        assert multi.first_layer == 1
        layers = model.model.layers
        seen: dict[int, list[int]] = {0: [], 1: []}
        hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: seen[i].append(o.shape[0] if torch.is_tensor(o)
                                                                                 else o[0].shape[0])) for i in (0, 1)]
        one = rank_scores(multi, tok, prompts, cands, batch_size=1)
        for h in hooks:
            h.remove()
        # the trunk (layer 0) ran on each batch's rows once; layer 1 on one copy per model
        assert seen[0] and [len(paths) * n for n in seen[0]] == seen[1]
        four = rank_scores(multi, tok, prompts, cands, batch_size=4)
        assert len(one) == len(paths)
        for a, b in zip(one, four):
            for x, y in zip(a, b):
                assert x == pytest.approx(y, abs=1e-5)
    finally:
        multi.restore()
    assert not any(type(m).__name__ == "MultiLoraLinear" for m in model.modules())
    for got, want in zip(rank_scores(model, tok, prompts, cands, batch_size=4), one[0]):
        assert got == pytest.approx(want, abs=1e-5)  # restored base == the zero member


def test_refusals_fall_back_one_by_one(env, plain, caplog, monkeypatch):
    model, _ = plain
    base = load_model(str(env["base"]), "float32")
    dora = _adapter(base, env["root"] / "dora", 4, r=4, target_modules=["q_proj"], use_dora=True)
    emb = _adapter(base, env["root"] / "emb", 5, r=4, target_modules=["embed_tokens"])
    for bad in (dora, emb):
        with pytest.raises(Unsupported):
            build_multi_model(model, [None, bad])
        assert not any(type(m).__name__ == "MultiLoraLinear" for m in model.modules())  # left unchanged
    adapters, _ = env["sets"]["upper"]
    with caplog.at_level(logging.INFO, logger="eval_harness"):
        result = evaluate(str(env["base"]), [adapters[0], dora], data_dir=env["data"], output=env["root"] / "out-dora",
                          tasks="boolq", mode="rank", limit=3, batch_size=4)
    assert "one at a time" in caplog.text and set(result.models) == {"a0", "dora", "lora-ensemble"}
    alone = evaluate(str(env["base"]), [adapters[0]], data_dir=env["data"], output=env["root"] / "out-a0",
                     tasks="boolq", mode="rank", limit=3, batch_size=4)
    assert result.models["a0"].average == alone.models["a0"].average


def _renamed_copy(adapter, out, rename):
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    return out


def test_keys_without_the_peft_prefix_score_as_the_adapter_on_both_paths(env):
    """PEFT's own loader (one model at a time, generate mode, every fallback) loaded nothing from
    keys without the base_model.model. prefix: the model scored as the base."""
    a2 = env["sets"]["upper"][0][2]
    moved = _renamed_copy(a2, env["root"] / "no-prefix", lambda k: k.removeprefix("base_model.model."))
    out = env["root"] / "no-prefix-out"
    for batch_models in (False, True):
        evaluate(str(env["base"]), [a2, moved], data_dir=env["data"], output=out / str(batch_models), tasks="boolq",
                 mode="rank", limit=3, batch_size=4, include_base=True, batch_models=batch_models)
    # the reference: the untouched adapter, loaded by PEFT itself one at a time
    want = [r["scores"] for r in _rows(out / "False", "a2", "boolq")]
    assert want != [r["scores"] for r in _rows(out / "False", "tiny", "boolq")]
    for batch_models in ("False", "True"):
        for got, ref in zip(_rows(out / batch_models, moved.name, "boolq"), want):
            assert got["scores"] == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("batch_models", [False, True])
@pytest.mark.parametrize("layout", ["renamed module", "adapter name in the key"])
def test_lora_keys_peft_would_skip_are_refused_by_name(env, layout, batch_models):
    """With up_proj's keys renamed (or PEFT's in-memory ".default." left in them), PEFT's loader ran
    the adapter without them, silently: a partial adapter, or the base."""
    a2 = env["sets"]["upper"][0][2]
    rename, named = {
        "renamed module": (lambda k: k.replace("up_proj", "upper_proj"), r"layers\.1\.mlp\.upper_proj\.lora_A\.weight"),
        "adapter name in the key": (lambda k: k.replace("lora_A.weight", "lora_A.default.weight"),
                                    r"q_proj\.lora_A\.default\.weight"),
    }[layout]
    moved = _renamed_copy(a2, env["root"] / f"{layout}-{batch_models}", rename)
    with pytest.raises(AdapterError, match=named):
        evaluate(str(env["base"]), [a2, moved], data_dir=env["data"], output=env["root"] / f"{layout}-{batch_models}-out",
                 tasks="boolq", mode="rank", limit=2, batch_size=2, batch_models=batch_models)


def test_generate_mode_and_the_flag_evaluate_one_at_a_time(env, monkeypatch):
    monkeypatch.setattr(loading, "build_multi_model", lambda *a: pytest.fail("models were batched"))
    adapters, merged = env["sets"]["upper"]
    evaluate(str(env["base"]), adapters[:2], merged, data_dir=env["data"], output=env["root"] / "gen", tasks="boolq",
             mode="generate", limit=2, batch_size=2, num_beams=1, max_new_tokens=3)
    argv = ["eval", "--base_model", str(env["base"]), "--adapter", str(adapters[0]), str(adapters[1]),
            "--data_dir", str(env["data"]), "--tasks", "boolq", "--mode", "rank", "--limit", "2",
            "--batch_models", "false", "--output", str(env["root"] / "flag")]
    assert cli_main(argv) == 0


def test_target_logprobs_in_chunks_equal_one_log_softmax(monkeypatch):
    import eval_harness.scoring as scoring

    logits = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    target = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None]).squeeze(-1)
    monkeypatch.setattr(scoring, "_LOGPROB_CHUNK", 37 * 4)  # 4 rows per chunk: 15 rows in 4 chunks
    got = scoring.target_logprobs(logits, target)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
