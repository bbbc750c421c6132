"""The full-update baselines' fast path against independent computations.

* the seeded randomized factorisation: its squared error against the Eckart-Young optimum
  (``torch.linalg.svdvals``) on random low-rank-plus-noise matrices, <= 1.01x, deterministic;
* TIES' exact threshold against ``torch.kthvalue``; the blocked merge against the entry formula
  and against the reference (``exact_svd``) path, for any block size;
* DARE's default draws reproduced here from their documented definition;
* the rank rule: a module with fewer than K directions is padded with zero neurons;
* ``exact_svd`` through the API, the CLI and the report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_merge import dense_updates, make_adapter, make_base
from test_merge_baselines import dense_of, product, run, ties_by_entry
from test_merge_methods import random_stack

from poc_lora.cli import main
from poc_lora.merge import merge_adapters
from poc_lora.merge.methods import LoraStack, _task_ops
from poc_lora.merge.methods._lowrank import exact_factorise, randomized_factorise


def low_rank_plus_noise(n_out: int, n_in: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(n_out, rank, generator=gen) @ torch.randn(rank, n_in, generator=gen)
    return signal / rank ** 0.5 + noise * torch.randn(n_out, n_in, generator=gen)


@pytest.mark.parametrize("n_out,n_in,rank,noise,k", [
    (300, 200, 10, 0.1, 10), (200, 500, 20, 0.5, 16), (400, 300, 5, 1.0, 8),
    (256, 256, 64, 1.0, 32),  # signal rank above K: a slowly decaying spectrum
    (500, 120, 0, 1.0, 16),  # pure noise: the flattest spectrum
])
def test_randomized_error_is_within_1_01_of_eckart_young(n_out, n_in, rank, noise, k):
    for seed in range(3):
        dw = low_rank_plus_noise(n_out, n_in, rank, noise, seed) if rank else \
            torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed))
        s = torch.linalg.svdvals(dw.double())
        best = float(s[k:].square().sum())
        before = dw.clone()
        torch.manual_seed(1000 + seed)  # the global generator plays no part
        low = randomized_factorise(dw, k)
        assert torch.equal(dw, before)
        got = float((dw.double() - low.b.double() @ low.a.double()).square().sum())  # measured here
        assert got <= 1.01 * best, (seed, got / best)
        assert low.err_sq == pytest.approx(got, rel=1e-4)
        assert low.norm_sq == pytest.approx(float(s.square().sum()), rel=1e-5)
        assert low.optimal_err_sq is None and low.rank_used == k and low.a.shape == (k, n_in)
        again = randomized_factorise(dw, k)  # deterministic
        assert torch.equal(again.b, low.b) and torch.equal(again.a, low.a)


def test_exact_factorise_is_the_optimum_and_both_pad_to_k():
    dw = low_rank_plus_noise(40, 12, 3, 0.2, 0)
    s = torch.linalg.svdvals(dw.double())
    ex = exact_factorise(dw, 5)
    assert ex.err_sq == pytest.approx(float(s[5:].square().sum()), rel=1e-5) == ex.optimal_err_sq
    for low in (exact_factorise(dw, 20), randomized_factorise(dw, 20)):  # 20 > min(40, 12)
        assert low.b.shape == (40, 20) and low.a.shape == (20, 12) and low.rank_used == 12
        assert not low.b[:, 12:].any() and not low.a[12:].any()
        assert torch.allclose(low.b @ low.a, dw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", [256, 2])  # 2: a coarse sample whose bracket misses, the fallback
def test_magnitude_threshold_is_the_kth_largest_magnitude(monkeypatch, side):
    monkeypatch.setattr(_task_ops, "SAMPLE_SIDE", side)
    monkeypatch.setattr(_task_ops, "BLOCK_ENTRIES", 97)  # many blocks, the last one partial
    gen = torch.Generator().manual_seed(4)
    # small integers: every product is exact in float32, however the blocks sum it
    b, a = torch.randint(-9, 10, (37, 3), generator=gen).float(), torch.randint(-9, 10, (3, 29), generator=gen).float()
    b[5] = 0.0  # a row of exact zeros: ties at the bottom (and many repeated values elsewhere)
    mags = (b @ a).abs().flatten()
    n = mags.numel()
    for k in (1, 2, 17, n // 3, n // 2, n - 30, n - 1, n):
        want = float(torch.kthvalue(mags, n - k + 1).values)
        assert _task_ops.magnitude_threshold(b, a, k) == want, k
    assert _task_ops.magnitude_threshold(b, a, 0) == float("inf")


def test_keep_at_least_keeps_exactly_the_magnitudes_at_or_above_the_threshold():
    t = torch.tensor([0.5, -0.5, 0.49999997, -1.0, 0.0, 2.0, -0.50000006])
    want = torch.where(t.abs() >= 0.5, t, torch.zeros_like(t))
    assert torch.equal(_task_ops.keep_at_least(t.clone(), 0.5), want)
    assert torch.equal(_task_ops.keep_at_least(t.clone(), 0.0), t)
    assert not _task_ops.keep_at_least(t.clone(), float("inf")).any()


@pytest.mark.parametrize("block", [7, 1 << 18])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_blocked_ties_is_the_entry_formula_and_the_reference_path(monkeypatch, block, method):
    monkeypatch.setattr(_task_ops, "BLOCK_ENTRIES", block)
    stack, *_ = random_stack(sizes=(2, 3, 1), n_out=9, n_in=6, weights=(0.5, 0.2, 0.9), seed=8)
    want = ties_by_entry(dense_of(stack), [0.5, 0.2, 0.9], 0.4, method)
    fast = run("ties", stack, 6, density=0.4, majority_sign_method=method)  # 6 = min(9, 6): nothing truncated
    ref = run("ties", stack, 6, density=0.4, majority_sign_method=method, exact_svd=True)
    assert torch.allclose(product(fast), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(product(ref), want, rtol=1e-5, atol=1e-5)
    merged_fast = _task_ops._blocked_update(stack, None, "trim", 0.4, True, method)
    merged_ref = _task_ops._reference_update(stack, None, "trim", 0.4, True, method)
    assert torch.allclose(merged_fast, merged_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [5, 1 << 18])
def test_blocked_dare_draws_are_their_definition_whatever_the_block_size(monkeypatch, block):
    monkeypatch.setattr(_task_ops, "BLOCK_ENTRIES", block)
    stack, *_ = random_stack(sizes=(2, 3, 1), n_out=8, n_in=5, weights=(0.5, -0.2, 0.9), seed=9)
    seed, density = 3, 0.4
    # the documented draws: one seed per input from the merge's generator, then numpy's SFC64
    # uniform 32-bit integers, row-major, kept below round(density * 2^32)
    seeds = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
    keeps = [torch.from_numpy(np.random.Generator(np.random.SFC64(s)).integers(0, 2**32, size=(8, 5), dtype=np.uint32)
                              < round(density * 2**32)) for s in seeds]
    dws = dense_of(stack)
    want = sum(w * dw * keep / density for w, dw, keep in zip((0.5, -0.2, 0.9), dws, keeps))
    out = run("dare_linear", stack, 5, seed, density=density)
    assert torch.allclose(product(out), want, rtol=1e-5, atol=1e-5)


def test_rank_above_a_module_width_is_padded_and_recorded(tmp_path, capsys):
    """--rank 20 on 16-wide modules (refused before): zero neurons pad, the report says 16 used."""
    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"a{j}", base, 40 + j, r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"])
            for j in range(3)]
    out = tmp_path / "ties"
    assert main(["merge", *map(str, dirs), "--output", str(out), "--method", "ties", "--rank", "20",
                 "--exact_svd", "true"]) == 0
    progress = capsys.readouterr().err  # tqdm over modules: done / total, with the time left
    assert "merge (ties)" in progress and "2/2 [" in progress and "<" in progress
    report = json.loads((out / "merge_report.json").read_text())
    updates = [dense_updates(d) for d in dirs]
    for name, st in report["modules"].items():
        assert st["rank_out"] == 20 and st["rank_used"] == 16 and st["truncation_error"] == pytest.approx(0, abs=1e-6)
        assert st["svd"] == "exact" and st["truncation_sq_optimum"] == st["truncation_sq"]
        want = ties_by_entry([u[name] for u in updates], [1 / 3] * 3, 0.5, "total")
        cfg = json.loads((out / "adapter_config.json").read_text())
        from safetensors.torch import load_file

        sd = load_file(str(out / "adapter_model.safetensors"))
        key = f"base_model.model.{name}.lora_"
        got = cfg["lora_alpha"] / cfg["r"] * sd[key + "B.weight"].double() @ sd[key + "A.weight"].double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), name
    assert report["params"]["exact_svd"] is True and report["written_rank"] == 20


def test_default_path_reports_the_randomized_error_and_exact_svd_is_refused_elsewhere(tmp_path, capsys):
    base = make_base(num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=4)
    dirs = [make_adapter(tmp_path / f"a{j}", base, 60 + j, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
            for j in range(3)]
    fast = merge_adapters(dirs, tmp_path / "fast", method="dare_ties", rank=4, seed=2)
    exact = merge_adapters(dirs, tmp_path / "exact", method="ties", rank=4, exact_svd=True)
    ties_fast = merge_adapters(dirs, tmp_path / "ties", method="ties", rank=4)
    for name, st in fast.modules.items():
        assert st.extra["svd"] == "randomized" and "truncation_sq_optimum" not in st.extra
        assert st.extra["truncation_sq"] == pytest.approx(st.trunc_sq) and st.rank_used == 4
        assert st.truncation_error == pytest.approx((st.trunc_sq / st.target_sq) ** 0.5)
        ex, tf = exact.modules[name], ties_fast.modules[name]
        assert ex.extra["svd"] == "exact" and ex.extra["truncation_sq_optimum"] == ex.trunc_sq
        assert ex.trunc_sq <= tf.trunc_sq <= 1.01 * ex.trunc_sq  # same TIES update, near-optimal truncation
    written = json.loads((tmp_path / "fast" / "merge_report.json").read_text())
    assert written["params"]["exact_svd"] is False
    assert {"svd", "truncation_sq", "rank_used"} <= set(next(iter(written["modules"].values())))
    assert main(["merge", *map(str, dirs), "--output", str(tmp_path / "p"), "--exact_svd", "true"]) == 1
    assert "--exact_svd is only used by --method dare_linear/dare_ties/ties, not poc" in capsys.readouterr().err


def test_exact_svd_reaches_the_pipeline_parameters():
    from poc_lora.config import EvalArguments, MergeArguments, PipelineArguments
    from poc_lora.pipeline import PipelineConfig

    cfg = PipelineConfig(pipeline=PipelineArguments(train_config="x.yaml"),
                         merge=MergeArguments(methods=["poc", "ties", "dare_linear"], exact_svd=True),
                         eval=EvalArguments())
    cfg.validate()
    assert cfg.merge_parameters("ties")["exact_svd"] is True and cfg.merge_parameters("poc") == {}
    assert cfg.to_dict()["merge_exact_svd"] is True


def test_a_stack_with_identical_members_merges_to_the_member(monkeypatch):
    """Sanity of the blocked path on the simplest case: M copies of one update, density 1."""
    monkeypatch.setattr(_task_ops, "BLOCK_ENTRIES", 11)
    one, *_ = random_stack(sizes=(2,), n_out=12, n_in=7, weights=(1.0,), seed=2)
    same = LoraStack(one.a.repeat(3, 1), one.b.repeat(1, 3), (1 / 3,) * 3, (2,) * 3)
    for name in ("ties", "dare_ties", "dare_linear"):
        out = run(name, same, 2, 0, density=1.0)
        assert torch.allclose(product(out), dense_of(one)[0], rtol=1e-5, atol=1e-5), name
