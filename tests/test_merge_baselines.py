"""The TIES / DARE baselines against PEFT where the definitions coincide, and against direct
formulas written here where they do not.

Where they coincide: our methods act on each module's full update dW_j = s_j B_j A_j as PEFT's
``*_svd`` combination types do (``get_delta_weight``, then ``torch.linalg.svd``). PEFT elects the
sign on the unweighted updates and divides the weighted sum by the count of agreeing entries,
so with weights 1.0 each it equals our disjoint weighted mean for any equal weights; its DARE
draws ``torch.bernoulli`` from the global generator, the same stream ours draws from a seeded
generator. Unequal weights are checked against an entry-by-entry formula.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.merge_utils import dare_linear, dare_ties, ties
from safetensors.torch import load_file
from test_merge import dense_updates, make_adapter, make_base
from test_merge_methods import exact_update, random_stack

from poc_lora.merge import merge_adapters
from poc_lora.merge.methods import LoraStack, get_method
from poc_lora.merge.methods._task_ops import dare_drop, disjoint_mean, elect_sign, trim


def dense_of(stack: LoraStack) -> list[torch.Tensor]:
    """dW_j = s_j B_j A_j of a stack, float64, computed here."""
    return [stack.b[:, blk].double() @ stack.a[blk].double() for blk in stack.blocks()]


def ties_by_entry(updates: list[torch.Tensor], weights: list[float], density: float, method: str) -> torch.Tensor:
    """TIES as its paper and mergekit define it, one entry at a time (no shared code)."""
    trimmed = []
    for u in updates:
        k = int(density * u.numel())
        kth = sorted(u.abs().flatten().tolist(), reverse=True)[k - 1]
        trimmed.append(torch.where(u.abs() >= kth, u, torch.zeros_like(u)))
    out = torch.zeros_like(updates[0])
    for i in range(out.shape[0]):
        for c in range(out.shape[1]):
            vals = [float(t[i, c]) for t in trimmed]
            if method == "total":
                score = sum(w * v for w, v in zip(weights, vals))
            else:
                score = sum((v > 0) - (v < 0) for v in vals)
            sign = 1 if score >= 0 else -1
            agree = [(w, v) for w, v in zip(weights, vals) if (v > 0) - (v < 0) == sign]
            out[i, c] = sum(w * v for w, v in agree) / sum(w for w, _ in agree) if agree else 0.0
    return out


def product(f) -> torch.Tensor:
    return f.b.double() @ f.a.double()


def run(name: str, stack: LoraStack, rank: int, seed: int | None = None, **params):
    """Call a method with parameters and check it changed none of its inputs."""
    before = [t.clone() for t in (stack.a, stack.b)]
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out = get_method(name)(stack, rank, gen, **params)
    assert all(torch.equal(t, u) for t, u in zip(before, (stack.a, stack.b)))
    return out


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_with_unequal_weights_is_the_entrywise_formula(method):
    stack, *_ = random_stack(sizes=(2, 3, 1), weights=(0.5, 0.2, 0.9))
    out = run("ties", stack, 5, density=0.4, majority_sign_method=method)
    want = ties_by_entry(dense_of(stack), [0.5, 0.2, 0.9], 0.4, method)
    assert torch.allclose(product(out), want, rtol=1e-5, atol=1e-5)  # rank 5 = min(7, 5): nothing truncated
    assert out.trunc_sq == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_with_equal_weights_is_peft_ties_with_weights_one(method):
    stack, *_ = random_stack(sizes=(2, 3, 1), weights=(0.25, 0.25, 0.25), seed=3)
    out = run("ties", stack, 5, density=0.3, majority_sign_method=method)
    want = ties(dense_of(stack), torch.ones(3, dtype=torch.float64), 0.3, method)
    assert torch.allclose(product(out), want, rtol=1e-5, atol=1e-5)


def test_dare_linear_is_peft_dare_linear_draw_for_draw_and_unbiased():
    stack, *_ = random_stack(weights=(0.5, -0.2, 0.9), seed=4)
    weights = torch.tensor([0.5, -0.2, 0.9], dtype=torch.float64)
    for seed in range(3):
        out = run("dare_linear", stack, 5, seed, exact_svd=True)  # density 0.5 (the default)
        torch.manual_seed(seed)  # PEFT draws from the global generator
        want = dare_linear([u.float() for u in dense_of(stack)], weights.float(), 0.5).double()
        assert torch.allclose(product(out), want, rtol=1e-4, atol=1e-4)
    # density 1 drops nothing: exactly the weighted average update, i.e. the PoC merge
    full = run("dare_linear", stack, 5, 0, density=1.0)
    _, scales, bs, as_ = random_stack(weights=(0.5, -0.2, 0.9), seed=4)
    assert torch.allclose(product(full), exact_update(scales, bs, as_, [0.5, -0.2, 0.9]), rtol=1e-5, atol=1e-5)
    # E[drop(t)] = t: the mean of many draws approaches t
    t = torch.randn(1, 40, 30)
    gen = torch.Generator().manual_seed(0)
    mean = sum(dare_drop(t.clone(), 0.3, gen) for _ in range(400)) / 400
    assert float((mean - t).norm() / t.norm()) < 0.12


def test_dare_ties_with_equal_weights_is_peft_dare_ties():
    stack, *_ = random_stack(weights=(1 / 3,) * 3, seed=5)
    out = run("dare_ties", stack, 5, 7, density=0.6, majority_sign_method="frequency", exact_svd=True)
    torch.manual_seed(7)
    want = dare_ties([u.float() for u in dense_of(stack)], torch.ones(3), 0.6, "frequency").double()
    assert torch.allclose(product(out), want, rtol=1e-4, atol=1e-4)


def test_truncation_is_the_optimal_rank_k_approximation():
    stack, *_ = random_stack(seed=6, weights=(0.3, 0.3, 0.4))
    want = ties_by_entry(dense_of(stack), [0.3, 0.3, 0.4], 0.5, "total")
    s = torch.linalg.svdvals(want)
    for k in (1, 2, 4):
        out = run("ties", stack, k)
        assert out.a.shape == (k, 5) and out.b.shape == (7, k)
        assert float((product(out) - want).norm() ** 2) == pytest.approx(float(s[k:].square().sum()), rel=1e-4)
        assert out.trunc_sq == pytest.approx(float(s[k:].square().sum()), rel=1e-4)
        assert out.target_sq == pytest.approx(float(s.square().sum()), rel=1e-5)


def test_the_tensor_steps_on_a_hand_example():
    t = torch.tensor([[[3.0, -1.0, 0.5, -4.0]], [[-2.0, 2.0, 1.0, 1.0]]])
    assert trim(t.clone(), 0.5).tolist() == [[[3.0, 0.0, 0.0, -4.0]], [[-2.0, 2.0, 0.0, 0.0]]]
    w = torch.tensor([1.0, 1.0])
    assert elect_sign(t, w, "total").tolist() == [[1.0, 1.0, 1.0, -1.0]]
    assert elect_sign(t, torch.tensor([0.1, 1.0]), "total").tolist() == [[-1.0, 1.0, 1.0, 1.0]]
    assert elect_sign(t, w, "frequency").tolist() == [[1.0, 1.0, 1.0, 1.0]]  # ties of counts elect +
    sign = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    assert disjoint_mean(t, torch.tensor([1.0, 3.0]), sign).tolist() == [[3.0, 2.0, (0.5 + 3.0) / 4, -4.0]]


# ------------------------------------------------------------------ end to end, through the files
def written_update(out, name: str) -> torch.Tensor:
    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(str(out / "adapter_model.safetensors"))
    key = f"base_model.model.{name}.lora_"
    return cfg["lora_alpha"] / cfg["r"] * sd[key + "B.weight"].double() @ sd[key + "A.weight"].double()


def test_ties_file_equals_peft_ties_svd_on_mixed_inputs(tmp_path):
    """Different r, lora_alpha, rsLoRA and rank_pattern across the inputs: PEFT's ties_svd with
    weights 1.0 each and svd_rank K writes the update ours writes with weights 1/M."""
    base = make_base(num_hidden_layers=1)
    targets = ["q_proj", "v_proj"]
    dirs = [make_adapter(tmp_path / "a0", base, 80, r=2, lora_alpha=4, target_modules=targets),
            make_adapter(tmp_path / "a1", base, 81, r=4, lora_alpha=3, use_rslora=True, target_modules=targets),
            make_adapter(tmp_path / "a2", base, 82, r=3, lora_alpha=7, target_modules=targets,
                         rank_pattern={"v_proj": 5})]
    report = merge_adapters(dirs, tmp_path / "ours", method="ties", rank=6, density=0.4)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0")
    for j in (1, 2):
        model.load_adapter(str(dirs[j]), adapter_name=f"a{j}")
    model.add_weighted_adapter(["a0", "a1", "a2"], [1.0, 1.0, 1.0], "ties", combination_type="ties_svd",
                               svd_rank=6, density=0.4)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == {f"model.layers.0.self_attn.{t}" for t in targets}
    for name, layer in layers.items():
        theirs = layer.get_delta_weight("ties").double()
        ours = written_update(tmp_path / "ours", name)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), name
        # the report's truncation error is that of the rank-6 SVD of the full TIES update
        full = ties([layer.get_delta_weight(a).double() for a in ("a0", "a1", "a2")], torch.ones(3), 0.4)
        s = torch.linalg.svdvals(full)
        assert report.modules[name].truncation_error == pytest.approx(float((s[6:].norm() / s.norm())), rel=1e-3)


def test_dare_linear_file_is_peft_dare_linear_of_the_peft_deltas(tmp_path):
    """One module, so our draws with --exact_svd true (module by module, input by input) are
    PEFT's under the same seed; the default path's draws are reproducible too."""
    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"d{j}", base, 90 + j, r=3, lora_alpha=6, use_rslora=bool(j),
                         target_modules=["q_proj"]) for j in range(2)]
    name = "model.layers.0.self_attn.q_proj"
    merge_adapters(dirs, tmp_path / "ours", method="dare_linear", rank=16, density=0.3, seed=11, weights=[0.7, 0.6],
                   exact_svd=True)
    deltas = [dense_updates(d)[name].float() for d in dirs]
    torch.manual_seed(11)
    want = dare_linear(deltas, torch.tensor([0.7, 0.6]), 0.3).double()
    assert torch.allclose(written_update(tmp_path / "ours", name), want, rtol=1e-4, atol=1e-5)
    # the same seed writes the same file; another seed another one
    merge_adapters(dirs, tmp_path / "again", method="dare_linear", rank=16, density=0.3, seed=11, weights=[0.7, 0.6],
                   exact_svd=True)
    merge_adapters(dirs, tmp_path / "other", method="dare_linear", rank=16, density=0.3, seed=12, weights=[0.7, 0.6],
                   exact_svd=True)
    for out in ("fast", "fast_again"):  # the default (blocked) path: deterministic too
        merge_adapters(dirs, tmp_path / out, method="dare_linear", rank=16, density=0.3, seed=11, weights=[0.7, 0.6])
    weights_file = "adapter_model.safetensors"
    assert (tmp_path / "ours" / weights_file).read_bytes() == (tmp_path / "again" / weights_file).read_bytes()
    assert (tmp_path / "ours" / weights_file).read_bytes() != (tmp_path / "other" / weights_file).read_bytes()
    assert (tmp_path / "fast" / weights_file).read_bytes() == (tmp_path / "fast_again" / weights_file).read_bytes()
