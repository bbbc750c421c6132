"""Model Stock (``--method model_stock``) against formulas written here on materialised updates.

The method computes the members' cosines in factored form from Gram matrices; the tests form
every dW_j = s_j B_j A_j densely (float64), take torch's cosine of the flattened matrices, and
check the ratio t = M cos / (1 + (M - 1) cos), the written update t * sum_j w_j dW_j (through
PEFT's own loading: AutoPeftModelForCausalLM and the layer's get_delta_weight) and the edge
cases (identical members: the PoC merge bit for bit; opposite members: t in [0, 1], no NaN).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from peft.tuners.lora import LoraLayer
from test_merge import dense_updates, make_adapter, make_base
from test_merge_methods import random_stack

from poc_lora.cli import main
from poc_lora.config import EvalArguments, MergeArguments, PipelineArguments
from poc_lora.merge import merge_adapters
from poc_lora.merge.methods import LoraStack, get_method


def materialised_cosine(stack: LoraStack) -> float:
    """Mean over pairs of torch's cosine of the flattened dense updates (float64)."""
    dws = [(stack.b[:, blk].double() @ stack.a[blk].double()).flatten() for blk in stack.blocks()]
    cosines = [float(torch.nn.functional.cosine_similarity(dws[i], dws[j], dim=0))
               for i in range(len(dws)) for j in range(i + 1, len(dws))]
    return sum(cosines) / len(cosines)


def ratio(cos: float, m: int) -> float:
    c = min(max(cos, 0.0), 1.0)
    return m * c / (1 + (m - 1) * c)


@pytest.mark.parametrize("seed", range(4))
def test_factored_cosine_is_the_cosine_of_the_materialised_updates(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    stack, *_ = random_stack(sizes=(2, 3, 1, 4), n_out=40, n_in=30, weights=(0.1, 0.2, 0.3, 0.4), seed=seed)
    # correlated members (a shared component), so the mean cosine is well inside (0, 1)
    shared_b, shared_a = torch.randn(40, 1, generator=gen), torch.randn(1, 30, generator=gen)
    b, a = stack.b.clone(), stack.a.clone()
    for blk in stack.blocks():
        b[:, blk.start:blk.start + 1] += 3 * shared_b
        a[blk.start:blk.start + 1] += 3 * shared_a
    stack = LoraStack(a, b, stack.weights, stack.sizes)
    out = get_method("model_stock")(stack)
    want_cos = materialised_cosine(stack)
    assert 0.05 < want_cos < 0.95
    assert out.extra["cos"] == pytest.approx(want_cos, abs=1e-5)
    assert out.extra["t"] == pytest.approx(ratio(want_cos, 4), abs=1e-5)
    # the written update is t times the weighted merge, at the PoC rank
    exact = sum(w * stack.b[:, blk].double() @ stack.a[blk].double() for w, blk in zip(stack.weights, stack.blocks()))
    assert out.a.shape[0] == stack.total_rank
    assert torch.allclose(out.b.double() @ out.a.double(), out.extra["t"] * exact, rtol=1e-5, atol=1e-6)
    assert out.err_sq == pytest.approx((1 - out.extra["t"]) ** 2 * float(exact.square().sum()), rel=1e-5)


def test_identical_members_give_t_one_and_the_poc_factors_bit_for_bit():
    stack, *_ = random_stack(sizes=(3,), n_out=50, n_in=20, weights=(1.0,), seed=7)
    same = LoraStack(stack.a.repeat(4, 1), stack.b.repeat(1, 4), (0.25,) * 4, (3,) * 4)
    out = get_method("model_stock")(same)
    poc = get_method("poc")(same)
    assert out.extra == {"t": 1.0, "cos": 1.0}
    assert torch.equal(out.b, poc.b) and torch.equal(out.a, poc.a) and out.err_sq == 0.0


@pytest.mark.parametrize("m", [2, 3, 5])
def test_opposite_and_zero_members_give_t_in_zero_one_and_no_nan(m):
    stack, *_ = random_stack(sizes=(2,), n_out=9, n_in=6, weights=(1.0,), seed=3)
    # members alternating +dW, -dW: mean cosine -(floor(m/2) * ceil(m/2)) / (m(m-1)/2) < 0
    signs = [(-1.0) ** j for j in range(m)]
    opp = LoraStack(stack.a.repeat(m, 1), torch.cat([s * stack.b for s in signs], 1), (1 / m,) * m, (2,) * m)
    out = get_method("model_stock")(opp)
    assert out.extra["cos"] == pytest.approx(materialised_cosine(opp), abs=1e-6) and out.extra["cos"] < 0
    assert out.extra["t"] == 0.0 and torch.isfinite(out.b).all() and not out.b.any()
    # a member that left the module untouched (B = 0) has no angle: its pairs count as 0
    zero = LoraStack(stack.a.repeat(2, 1), torch.cat([stack.b, torch.zeros_like(stack.b)], 1), (0.5, 0.5), (2, 2))
    out = get_method("model_stock")(zero)
    assert out.extra == {"t": 0.0, "cos": 0.0} and torch.isfinite(out.b).all()
    # random members: t always in [0, 1]
    for seed in range(10):
        rnd, *_ = random_stack(sizes=(1,) * m, n_out=4, n_in=3, weights=(1 / m,) * m, seed=seed)
        t = get_method("model_stock")(rnd).extra["t"]
        assert 0.0 <= t <= 1.0 and math.isfinite(t)
    # one input: t = 1, the input itself
    one = get_method("model_stock")(LoraStack(stack.a, stack.b, (1.0,), (2,)))
    assert one.extra == {"t": 1.0, "cos": 1.0}


def test_merged_adapter_loads_with_auto_peft_and_its_delta_is_t_times_the_mean(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir = tmp_path / "base"
    make_base(num_hidden_layers=2).save_pretrained(str(base_dir))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()  # so the adapters name base_dir
    targets = ["q_proj", "k_proj", "v_proj"]
    dirs = [make_adapter(tmp_path / f"a{j}", base, 30 + j, r=2 + j, lora_alpha=4, target_modules=targets)
            for j in range(3)]
    out = tmp_path / "stock"
    assert main(["merge", *map(str, dirs), "--output", str(out), "--method", "model_stock"]) == 0
    assert "Model Stock ratio t per module: mean" in capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    updates = [dense_updates(d) for d in dirs]
    assert set(layers) == set(updates[0]) == set(report["modules"]) and len(layers) == 6
    for name, layer in layers.items():
        dws = [u[name] for u in updates]
        cos = sum(float(torch.nn.functional.cosine_similarity(dws[i].flatten(), dws[j].flatten(), dim=0))
                  for i in range(3) for j in range(i + 1, 3)) / 3
        st = report["modules"][name]
        assert st["cos"] == pytest.approx(cos, abs=1e-5) and st["t"] == pytest.approx(ratio(cos, 3), abs=1e-5)
        want = st["t"] * sum(dws) / 3
        got = layer.get_delta_weight("default").double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
        assert st["rank_out"] == 2 + 3 + 4
        assert st["rel_error"] == pytest.approx(abs(1 - st["t"]), abs=1e-6)


def test_model_stock_of_identical_adapters_writes_the_poc_file(tmp_path):
    base = make_base(num_hidden_layers=1)
    one = make_adapter(tmp_path / "a", base, 5, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    merge_adapters([one, one, one], tmp_path / "poc")
    rep = merge_adapters([one, one, one], tmp_path / "stock", method="model_stock")
    assert all(st.extra["t"] == 1.0 for st in rep.modules.values())
    name = "adapter_model.safetensors"
    assert (tmp_path / "poc" / name).read_bytes() == (tmp_path / "stock" / name).read_bytes()


def test_model_stock_is_a_pipeline_method_with_its_label(tmp_path):
    from poc_lora.pipeline import PipelineConfig
    from poc_lora.pipeline_report import _label

    spec = get_method("model_stock")
    assert not spec.needs_rank and not spec.uses_seed and not spec.exact
    PipelineConfig(pipeline=PipelineArguments(train_config="x.yaml"),
                   merge=MergeArguments(methods=["poc", "model_stock"]), eval=EvalArguments()).validate()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 6}))
    assert _label("model_stock", tmp_path) == "Model Stock"
