"""The merge-method registry and each method's pure tensor function, against independent formulas.

The functions are called on random factors and compared with dense computations (PEFT's
``task_arithmetic`` for the exact merge, ``torch.linalg.svd`` for the truncation, an
enumeration of every subset for pruning, the product of averages for soup). A toy method
registered in a test shows up in the CLI, the validation, the report labels and the card
without editing any other file.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from peft.utils.merge_utils import task_arithmetic
from safetensors.torch import load_file
from test_merge import dense_updates, make_adapter, make_base

from poc_lora.cli import main
from poc_lora.config import EvalArguments, MergeArguments, PipelineArguments
from poc_lora.errors import ConfigError
from poc_lora.merge import merge_adapters
from poc_lora.merge.methods import Factors, LoraStack, MergeMethod, get_method, method_names, methods_markdown, \
    register, unregister
from poc_lora.merge.stats import MergeStats, ModuleStats


def random_stack(sizes=(2, 3, 1), n_out=7, n_in=5, weights=(0.5, -0.2, 0.9), seed=0):
    """A LoraStack plus the per-adapter factors it was built from: s_j, B_j (out x r_j), A_j."""
    gen = torch.Generator().manual_seed(seed)
    bs = [torch.randn(n_out, r, generator=gen) for r in sizes]
    as_ = [torch.randn(r, n_in, generator=gen) for r in sizes]
    scales = [0.5 + j for j in range(len(sizes))]
    stack = LoraStack(torch.cat(as_), torch.cat([s * b for s, b in zip(scales, bs)], 1),
                      tuple(weights), tuple(sizes))
    return stack, scales, bs, as_


def exact_update(scales, bs, as_, weights) -> torch.Tensor:
    """sum_j w_j s_j B_j A_j by PEFT's task arithmetic over the dense updates (float64)."""
    tasks = [s * b.double() @ a.double() for s, b, a in zip(scales, bs, as_)]
    return task_arithmetic(tasks, torch.tensor(weights, dtype=torch.float64))


def call_unmodified(name: str, stack: LoraStack, rank=None, seed=0) -> Factors:
    """Call a method and check it changed none of its inputs."""
    before = [t.clone() for t in (stack.a, stack.b)]
    out = get_method(name)(stack, rank, torch.Generator().manual_seed(seed))
    assert all(torch.equal(t, u) for t, u in zip(before, (stack.a, stack.b)))
    return out


def test_poc_function_is_peft_task_arithmetic_of_the_dense_updates():
    stack, scales, bs, as_ = random_stack()
    out = call_unmodified("poc", stack)
    want = exact_update(scales, bs, as_, [0.5, -0.2, 0.9])
    assert out.a.shape[0] == sum(stack.sizes)
    assert torch.allclose(out.b.double() @ out.a.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.a, torch.cat(as_))  # A copied bit for bit


@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_function_is_the_truncated_svd_of_the_dense_merge(k):
    stack, scales, bs, as_ = random_stack()
    out = call_unmodified("svd", stack, k)
    dw = exact_update(scales, bs, as_, [0.5, -0.2, 0.9])
    u, s, vh = torch.linalg.svd(dw)
    kk = min(k, int((s > 1e-9 * s[0]).sum()))
    best = u[:, :kk] @ torch.diag(s[:kk]) @ vh[:kk]
    assert out.a.shape == (k, 5) and out.b.shape == (7, k)
    assert torch.allclose(out.b.double() @ out.a.double(), best, rtol=1e-4, atol=1e-4)
    assert out.err_sq == pytest.approx(float(s[kk:].square().sum()), rel=1e-4, abs=1e-8)


def test_prune_function_draws_a_scaled_subset_and_is_unbiased_over_all_subsets():
    stack, scales, bs, as_ = random_stack(sizes=(2, 2), weights=(0.25, 0.75))
    n, k = 4, 2
    b_cols = [w * s * b[:, i] for w, s, b in zip([0.25, 0.75], scales, bs) for i in range(b.shape[1])]
    a_rows = [a[i] for a in as_ for i in range(a.shape[0])]
    subsets = {}
    for idx in itertools.combinations(range(n), k):
        subsets[idx] = (n / k) * sum(torch.outer(b_cols[i].double(), a_rows[i].double()) for i in idx)
    # the mean over every subset of size k is the exact merge: random pruning is unbiased
    exact = exact_update(scales, bs, as_, [0.25, 0.75])
    assert torch.allclose(sum(subsets.values()) / len(subsets), exact, rtol=1e-5, atol=1e-5)
    for seed in range(5):
        out = call_unmodified("prune", stack, k, seed)
        got = out.b.double() @ out.a.double()
        assert any(torch.allclose(got, v, rtol=1e-5, atol=1e-6) for v in subsets.values())
        again = call_unmodified("prune", stack, k, seed)  # the same seed draws the same neurons
        assert torch.equal(again.b, out.b) and torch.equal(again.a, out.a)


def test_soup_function_is_the_product_of_averages():
    stack, scales, bs, as_ = random_stack(sizes=(3, 3, 3))
    out = call_unmodified("soup", stack)
    w = [0.5, -0.2, 0.9]
    b_avg = sum(wj * s * b.double() for wj, s, b in zip(w, scales, bs))
    a_avg = sum(wj * a.double() for wj, a in zip(w, as_)) / sum(w)
    assert torch.allclose(out.b.double(), b_avg, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.a.double(), a_avg, rtol=1e-5, atol=1e-6)


def test_registry_declares_what_each_method_needs():
    assert method_names()[0] == "poc" and set(method_names()) >= {"poc", "svd", "prune", "soup"}
    assert {n for n in method_names() if get_method(n).needs_rank} >= {"svd", "prune"}
    assert get_method("soup").equal_ranks and get_method("prune").uses_seed and get_method("poc").exact
    assert get_method("svd").row_label(16) == "PoC merge, SVD rank 16"
    for name in method_names():
        m = get_method(name)
        assert m.description and m.reference and "\n" not in m.description
        assert f"| `{name}`" in methods_markdown()
    with pytest.raises(ConfigError, match="method must be one of poc"):
        get_method("breadcrumbs")


# ------------------------------------------------------------------ a new method: one registration
def _mean_of_products(stack: LoraStack, rank, generator) -> Factors:
    """Toy method: (1/M) sum_j s_j B_j A_j, ignoring the weights w_j."""
    return Factors(stack.b / stack.num_adapters, stack.a)


@pytest.fixture
def mean_method():
    method = register(MergeMethod(
        name="mean", label="Mean of products", description="toy: (1/M) sum_j s_j B_j A_j, weights ignored",
        reference="a test", function=_mean_of_products, card_text="the toy mean", title="Toy mean",
        tags=("toy-mean",)))
    try:
        yield method
    finally:
        unregister("mean")


def test_a_registered_method_reaches_cli_validation_labels_and_card(mean_method, tmp_path, capsys):
    from poc_lora.pipeline import PipelineConfig
    from poc_lora.pipeline_report import _label

    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"a{j}", base, 50 + j, r=2 + j, lora_alpha=3, target_modules=["q_proj", "v_proj"])
            for j in range(2)]
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = capsys.readouterr().out
    assert "mean" in help_text and "toy: (1/M)" in help_text
    assert main(["merge", *map(str, dirs), "--output", str(tmp_path / "m"), "--method", "mean", "--rank", "2"]) == 1
    assert "--rank is only used by --method dare_linear/dare_ties/prune/svd/ties, not mean" in capsys.readouterr().err
    assert main(["merge", *map(str, dirs), "--output", str(tmp_path / "m"), "--method", "mean",
                 "--weights", "0.9,0.3"]) == 0
    sd = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    updates = [dense_updates(d) for d in dirs]
    for name in updates[0]:
        key = f"base_model.model.{name}.lora_"
        got = sd[key + "B.weight"].double() @ sd[key + "A.weight"].double()
        assert torch.allclose(got, (updates[0][name] + updates[1][name]) / 2, rtol=1e-5, atol=1e-6), name
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["method"] == "mean" and report["overall"]["rel_error"] > 0  # not the weighted merge
    card = (tmp_path / "m" / "README.md").read_text()
    assert "# Toy mean of 2 LoRA adapters" in card and "toy-mean" in card and "the toy mean" in card
    PipelineConfig(pipeline=PipelineArguments(train_config="x.yaml"), merge=MergeArguments(methods=["poc", "mean"]),
                   eval=EvalArguments()).validate()
    assert _label("mean", tmp_path / "m") == "Mean of products"


BASELINES = {"ties": "TIES (density 0.3), rank 2", "dare_linear": "DARE linear (density 0.3), rank 2",
             "dare_ties": "DARE-TIES (density 0.3), rank 2"}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_the_baselines_reach_cli_validation_report_card_and_pipeline_labels(name, tmp_path, capsys):
    from poc_lora.pipeline import PipelineConfig
    from poc_lora.pipeline_report import _label

    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"a{j}", base, 70 + j, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
            for j in range(2)]
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = capsys.readouterr().out
    assert name in help_text and "--density" in help_text and "--majority_sign_method" in help_text
    args = ["merge", *map(str, dirs), "--output", str(tmp_path / "m"), "--method", name]
    for extra, needle in [([], f"--method {name} needs a positive --rank K"),
                          (["--rank", "2", "--density", "1.5"], "--density must be a number in (0, 1]"),
                          (["--rank", "2", "--density", "0"], "--density must be a number in (0, 1]")]:
        assert main(args + extra) == 1, extra
        assert needle in capsys.readouterr().err
    if "ties" in name:
        assert main(args + ["--rank", "2", "--weights", "0.5,-0.5"]) == 1
        assert "every weight must be > 0" in capsys.readouterr().err
    else:  # no sign election: --majority_sign_method is refused, naming the methods that use it
        assert main(args + ["--rank", "2", "--majority_sign_method", "frequency"]) == 1
        assert "--majority_sign_method is only used by --method dare_ties/ties, not dare_linear" in \
            capsys.readouterr().err
    assert main(["merge", *map(str, dirs), "--output", str(tmp_path / "p"), "--density", "0.3"]) == 1
    assert "--density is only used by --method dare_linear/dare_ties/ties, not poc" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()

    assert main(args + ["--rank", "2", "--density", "0.3", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "parameters: density=0.3" in printed and "relative error of the rank truncation (SVD)" in printed
    assert "vLLM: --max-lora-rank 8" in printed
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    want_params = {"density": 0.3, **({"majority_sign_method": "total"} if "ties" in name else {}), "exact_svd": False}
    assert report["method"] == name and report["params"] == want_params
    assert report["written_rank"] == 2 and report["vllm_max_lora_rank"] == 8
    assert 0 < report["overall"]["truncation_error"] < 1 and report["overall"]["rel_error"] > 0
    card = (tmp_path / "m" / "README.md").read_text()
    spec = get_method(name)
    assert f"# {spec.title} of 2 LoRA adapters" in card and "NOT the paper's method" in card
    assert spec.peft_equivalent in card and "| density | 0.3 |" in card and "--max-lora-rank 8" in card
    cfg = PipelineConfig(pipeline=PipelineArguments(train_config="x.yaml"),
                         merge=MergeArguments(methods=["poc", name], density=0.3), eval=EvalArguments())
    cfg.validate()
    assert cfg.merge_parameters(name) == want_params and cfg.merge_parameters("poc") == {}
    assert _label(name, tmp_path / "m") == BASELINES[name]
    with pytest.raises(ConfigError, match="density must be a number"):
        PipelineConfig(pipeline=PipelineArguments(train_config="x.yaml"),
                       merge=MergeArguments(methods=[name], density=2.0), eval=EvalArguments()).validate()


def test_an_unregistered_method_is_gone(tmp_path, capsys):
    register(MergeMethod(name="gone", label="g", description="d", reference="r", function=_mean_of_products))
    assert "gone" in method_names()
    unregister("gone")
    assert "gone" not in method_names()
    with pytest.raises(SystemExit):
        main(["merge", "a", "--output", str(tmp_path / "o"), "--method", "gone"])
    assert "invalid choice: 'gone'" in capsys.readouterr().err


# ------------------------------------------------------------------ statistics are typed
def test_report_statistics_are_typed_and_written_without_internal_fields(tmp_path):
    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"a{j}", base, 60 + j, r=2, lora_alpha=4, target_modules=["q_proj"])
            for j in range(2)]
    report = merge_adapters(dirs, tmp_path / "svd", method="svd", rank=1)
    st = report.modules["model.layers.0.self_attn.q_proj"]
    assert isinstance(st, ModuleStats) and isinstance(report.overall, MergeStats)
    assert report.overall.spread == report.overall["spread"] and st.rel_error == st["rel_error"]
    written = json.loads((tmp_path / "svd" / "merge_report.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert set(written["modules"]["model.layers.0.self_attn.q_proj"]) == {
        "rank_in", "scale_in", "rank_out", "rank_used", "norm_dW", "norm_merged", "spread", "rel_error",
        "truncation_error"}
    # the totals add the modules' squared norms: one module, so they agree
    assert written["overall"]["norm_merged"] == pytest.approx(st.norm_merged)
    assert written["overall"]["rel_error"] == pytest.approx(math.sqrt(st.err_sq / st.norm_sq))


def test_reading_the_registry_does_not_import_torch():
    """The CLI builds --method from the registry at start-up; torch would add seconds to --help."""
    import subprocess
    import sys

    code = ("import sys; from poc_lora.merge.methods import method_names; import poc_lora.cli, poc_lora.merge; "
            "assert method_names() and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
