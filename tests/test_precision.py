"""bf16 on CPUs that compute it natively: detection, the training path it selects, and its cost."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from poc_lora.config import load_config
from poc_lora.models import float32_logits, load_model
from poc_lora.runtime import native_bf16
from poc_lora.train import prepare_run, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
SMALL = ["--synthetic_train_per_suite", "8", "--synthetic_test_per_suite", "2", "--val_set_size", "0",
         "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cpu_bf16(monkeypatch, supported: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: supported)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def _autocast_seen(cfg) -> set[bool]:
    """Train one step and record whether each Linear forward ran under CPU bf16 autocast."""
    seen: set[bool] = set()

    def hook(module, args):
        seen.add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: hook(m, a) if isinstance(m, torch.nn.Linear) else None)
    try:
        run_training(prepare_run(cfg))
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("supported", [True, False])
def test_bf16_auto_autocasts_exactly_where_the_cpu_has_native_bf16(tmp_path, monkeypatch, supported):
    _cpu_bf16(monkeypatch, supported)
    assert native_bf16("cpu") is supported
    cfg = load_config(TINY, [*SMALL, "--output_dir", str(tmp_path / "a"), "--bf16", "auto"])
    assert cfg.training.bf16 is supported
    assert _autocast_seen(cfg) == ({True, False} if supported else {False})  # the adapter save runs without
    # an explicit value always wins over the detection
    forced = load_config(TINY, [*SMALL, "--output_dir", str(tmp_path / "b"), "--bf16", "false"])
    assert forced.training.bf16 is False
    assert load_config(TINY, ["--output_dir", "x"], updates={"bf16": "auto"}).training.bf16 is supported


def test_lora_weights_stay_float32_under_bf16_autocast(tmp_path, monkeypatch):
    _cpu_bf16(monkeypatch, True)
    cfg = load_config(TINY, [*SMALL, "--output_dir", str(tmp_path / "a"), "--bf16", "auto"])
    _, model = run_training(prepare_run(cfg))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_float32_logits_equal_a_float32_head_on_the_bf16_hidden_states(tmp_path):
    model = load_model("poc-lora/tiny-llama", "bfloat16")
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        expected = torch.nn.functional.linear(hidden.float(), model.lm_head.weight.float())
        before = model(input_ids=ids).logits
        float32_logits(model)
        after = model(input_ids=ids).logits
    assert before.dtype == torch.bfloat16 and after.dtype == torch.float32
    torch.testing.assert_close(after, expected)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the rest stays bf16


@pytest.mark.skipif(not native_bf16("cpu"), reason="the cost of bf16 is measured where it is used: native bf16")
def test_bf16_training_curve_and_rank_predictions_track_fp32(tmp_path):
    spec = importlib.util.spec_from_file_location("check_bf16", ROOT / "scripts" / "check_bf16.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    res = check.check_bf16(TINY, tmp_path, ["--max_steps", "30", "--synthetic_train_per_suite", "100",
                                            "--disable_tqdm", "true"], limit=25)
    assert len(res["loss_fp32"]) == len(res["loss_bf16"]) == 30
    assert res["loss_fp32"] != res["loss_bf16"]  # the two runs really differ in precision
    assert res["max_smoothed_gap"] < 0.02  # the tolerance stated in docs/training.md
    assert res["examples"] == 3 * 200 and res["agreement"] >= 0.99  # base and both adapters, 200 questions
