"""Merged adapters read alike by PEFT, vLLM and llama.cpp's converter; the vLLM rank; --serve_rank.

Each consumer's documented scale rule is applied to the written files here and compared with
the update PEFT loads (``get_delta_weight``):

* vLLM: ``scaling = lora_alpha / r`` with the config's global ``r`` (its PEFT helper reads
  neither ``rank_pattern`` per module for the scale nor tensor shapes);
* llama.cpp ``convert_lora_to_gguf.py``: ``lora_alpha`` from the config over the rank of each
  tensor (``lora_A.shape[0]``).

Before this, a merge of mixed-rank inputs was written with per-module patterns, which PEFT and
vLLM read right but llama.cpp's rule scaled wrongly (issue 22's example below).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_merge import dense_updates, make_adapter, make_base

from poc_lora.cli import main
from poc_lora.errors import ConfigError
from poc_lora.merge import merge_adapters
from poc_lora.merge.serving import VLLM_MAX_LORA_RANKS, serve_cap, vllm_max_lora_rank

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def consumer_updates(out, rule: str) -> dict[str, torch.Tensor]:
    """The update of every module as ``rule`` (vllm | llama.cpp) reads the written files."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(str(out / "adapter_model.safetensors"))
    updates = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            scale = cfg["lora_alpha"] / (cfg["r"] if rule == "vllm" else a.shape[0])
            updates[prefix.removeprefix("base_model.model.")] = \
                scale * sd[prefix + ".lora_B.weight"].double() @ a.double()
    return updates


def peft_deltas(base, adapter) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    return {n: m.get_delta_weight("default").double() for n, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Issue 22's pattern example (two r 4 adapters), plus an rsLoRA one and a plain one."""
    root = tmp_path_factory.mktemp("serving")
    base = make_base()
    dirs = {
        "pattern_a": make_adapter(root / "pa", base, 1, r=4, lora_alpha=8, target_modules=TARGETS,
                                  rank_pattern={"model.layers.1.self_attn.q_proj": 8}, alpha_pattern={"v_proj": 32}),
        "pattern_b": make_adapter(root / "pb", base, 2, r=4, lora_alpha=8, target_modules=TARGETS,
                                  rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 2}),
        "rslora": make_adapter(root / "rs", base, 3, r=4, lora_alpha=6, use_rslora=True, target_modules=TARGETS),
        "plain": make_adapter(root / "pl", base, 4, r=4, lora_alpha=8, target_modules=TARGETS),
    }
    return base, dirs, root


CASES = {
    "plain": (["plain"], "poc", {}),
    "mixed rank and alpha patterns": (["pattern_a", "pattern_b"], "poc", {}),
    "rslora with patterns": (["rslora", "pattern_a", "pattern_b"], "poc", {}),
    "svd of patterns": (["pattern_a", "pattern_b", "rslora"], "svd", {"rank": 3}),
    "prune of patterns": (["pattern_a", "pattern_b"], "prune", {"rank": 5}),
    "ties of patterns": (["pattern_a", "rslora"], "ties", {"rank": 4, "density": 0.5}),
    "dare_ties of patterns": (["pattern_b", "plain"], "dare_ties", {"rank": 2, "density": 0.7}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_and_llama_cpp_rules_read_what_peft_loads(inputs, case, tmp_path):
    base, dirs, _ = inputs
    names, method, kw = CASES[case]
    adapters = [dirs[n] for n in names]
    out = tmp_path / "merged"
    report = merge_adapters(adapters, out, method=method, **kw)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["use_rslora"] is False
    assert cfg["lora_alpha"] == cfg["r"] == report.written_rank == max(report.output_ranks.values())
    ranks = {t.shape[0] for k, t in load_file(str(out / "adapter_model.safetensors")).items() if ".lora_A." in k}
    assert ranks == {cfg["r"]}  # one rank in every module (smaller ones zero-padded)
    peft = peft_deltas(base, out)
    assert len(peft) == 2 * len(TARGETS)
    for rule in ("vllm", "llama.cpp"):
        got = consumer_updates(out, rule)
        assert set(got) == set(peft)
        for name, delta in peft.items():
            assert torch.allclose(got[name], delta, rtol=1e-5, atol=1e-6), (rule, name)
    if method == "poc":  # and what PEFT loads is the weighted sum of the inputs' updates, read independently
        inputs_dense = [dense_updates(d) for d in adapters]
        for name, delta in peft.items():
            want = sum(u[name] for u in inputs_dense) / len(adapters)
            assert torch.allclose(delta, want, rtol=1e-5, atol=1e-6), name
    assert report.vllm_max_lora_rank == vllm_max_lora_rank(cfg["r"])


def test_issue_example_rank_and_vllm_rank(inputs, tmp_path, capsys):
    """The pattern pair: layers.1 q_proj has rank 8 + 4 = 12, the largest; all modules written at 12."""
    _, dirs, _ = inputs
    out = tmp_path / "m"
    assert main(["merge", str(dirs["pattern_a"]), str(dirs["pattern_b"]), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "serving: rank 12 in every module, one scale; vLLM: --max-lora-rank 16" in printed
    report = json.loads((out / "merge_report.json").read_text())
    assert report["output_ranks"]["model.layers.1.self_attn.q_proj"] == 12
    assert report["output_ranks"]["model.layers.0.self_attn.k_proj"] == 6
    assert report["written_rank"] == 12 and report["vllm_max_lora_rank"] == 16
    card = (out / "README.md").read_text()
    assert "--max-lora-rank 16" in card and "| vLLM --max-lora-rank needed | 16 |" in card


def test_vllm_rank_table():
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 80, 300, 512, 513)] == [1, 8, 8, 16, 128, 320, 512, None]
    assert serve_cap(None, 80) is None and serve_cap("auto", 80) == 128 and serve_cap("auto", 5000) == 512
    assert [serve_cap(n, 80) for n in (1, 7, 8, 100, "64", 320, 10000)] == [1, 1, 8, 64, 64, 320, 512]
    for bad in ("abc", 0, -3, "1.5", True):
        with pytest.raises(ConfigError, match="--serve_rank must be auto or a positive integer"):
            serve_cap(bad, 10)


def test_serve_rank_truncates_by_svd_with_its_error(inputs, tmp_path):
    """--serve_rank 10 -> the largest allowed value <= 10 is 8: modules above rank 8 become their
    best rank-8 approximation, the others stay exact; the report has the truncation error."""
    _, dirs, _ = inputs
    adapters = [dirs["pattern_a"], dirs["pattern_b"]]
    report = merge_adapters(adapters, tmp_path / "s", serve_rank=10)
    assert report.written_rank == 8 and report.vllm_max_lora_rank == 8 and report.serve_rank == 10
    written = consumer_updates(tmp_path / "s", "vllm")
    exact = [dense_updates(d) for d in adapters]
    err_sq = norm_sq = 0.0
    for name, got in written.items():
        want = (exact[0][name] + exact[1][name]) / 2
        s = torch.linalg.svdvals(want)
        best = float(s[8:].square().sum())
        assert float((got - want).norm() ** 2) == pytest.approx(best, rel=1e-4, abs=1e-10), name
        err_sq, norm_sq = err_sq + best, norm_sq + float(s.square().sum())
        truncated = sum(report.modules[name].rank_in) > 8  # the PoC merge's rank sum_j r_j
        assert (report.modules[name].truncation_error > 0) == truncated, name
    assert report.overall.truncation_error == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-4)
    assert report.overall.rel_error == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-4)  # poc: vs exact too
    # auto: the smallest allowed value >= 12 is 16, nothing to truncate
    auto = merge_adapters(adapters, tmp_path / "auto", serve_rank="auto")
    assert auto.written_rank == 12 and auto.vllm_max_lora_rank == 16 and auto.overall.truncation_error == 0


def test_above_512_warns_with_the_fix_and_auto_fits(tmp_path, capsys):
    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"big{j}", base, 5 + j, r=260, lora_alpha=16, target_modules=["q_proj"])
            for j in range(2)]
    assert main(["merge", *map(str, dirs), "--output", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "rank 520, above 512" in captured.out and "--serve_rank auto" in captured.out
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["vllm_max_lora_rank"] is None and any("--serve_rank auto" in w for w in report["warnings"])
    assert main(["merge", *map(str, dirs), "--output", str(tmp_path / "a"), "--serve_rank", "auto"]) == 0
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["written_rank"] == 512 and report["vllm_max_lora_rank"] == 512 and not report["warnings"]
    # the update has rank <= 16 (a 16 x 16 module): truncating to 512 loses nothing
    assert report["overall"]["truncation_error"] < 1e-6
    name = "model.layers.0.self_attn.q_proj"
    want = sum(dense_updates(d)[name] for d in dirs) / 2
    got = consumer_updates(tmp_path / "a", "llama.cpp")[name]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_serve_rank_errors(inputs, tmp_path, capsys):
    _, dirs, _ = inputs
    args = ["merge", str(dirs["plain"]), "--output", str(tmp_path / "x")]
    assert main(args + ["--serve_rank", "big"]) == 1
    assert "--serve_rank must be auto or a positive integer, got 'big'" in capsys.readouterr().err
    assert main(args + ["--serve_rank", "8", "--merge_into_base", "--base_model", str(tmp_path)]) == 1
    assert "--serve_rank applies to a merged adapter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_full_tensors_of_modules_to_save_are_named_with_what_each_engine_does(tmp_path, capsys):
    """Adapters trained with modules_to_save: the merged adapter carries full tensors, which vLLM's
    loader and llama.cpp's converter do not take: stdout, the report and the card say so."""
    base = make_base()
    dirs = [make_adapter(tmp_path / f"m{j}", base, 70 + j, r=2, lora_alpha=4, target_modules=["q_proj"],
                         modules_to_save=["lm_head", "norm"]) for j in range(2)]
    out = tmp_path / "merged"
    assert main(["merge", *map(str, dirs), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # the full tensors, from the written file itself: every key that is not a LoRA factor
    full = sorted(k.removeprefix("base_model.model.") for k in load_file(str(out / "adapter_model.safetensors"))
                  if ".lora_" not in k)
    assert {"lm_head.weight", "model.norm.weight"} <= set(full) and len(full) <= 8  # every one named below
    report = json.loads((out / "merge_report.json").read_text())
    assert [k.removeprefix("base_model.model.") for k in report["full_tensors"]] == full
    (note,) = report["notes"]
    card = (out / "README.md").read_text()
    for text in (note, printed, card):
        assert all(name in text for name in full)
    for needle in ("vLLM refuses the adapter", "Not a lora_A or lora_B tensor", "--merge-into-base"):
        assert needle in note and needle in printed and needle in card
    assert f"note: {note}" in printed
    assert "apply the same update as PEFT" not in card  # the plain adapter's serving line is not shown
    plain = [make_adapter(tmp_path / f"p{j}", base, 80 + j, r=2, lora_alpha=4, target_modules=["q_proj"])
             for j in range(2)]
    report = merge_adapters(plain, tmp_path / "plain")
    assert report.notes == [] and report.full_tensors == []
    assert "apply the same update as PEFT" in (tmp_path / "plain" / "README.md").read_text()
