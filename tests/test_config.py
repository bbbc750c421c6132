"""YAML + --key value configs parsed through HfArgumentParser (poc_lora.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from poc_lora.config import PAPER_TARGET_MODULES, load_config, read_yaml, valid_keys
from poc_lora.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
# TrainingArguments refuses bf16 without a GPU; parsing is what is tested here
NO_GPU = [] if torch.cuda.is_available() else ["--bf16", "false"]
BASE = {"model_name_or_path": "poc-lora/tiny-llama", "data_path": "synthetic", "output_dir": "runs/x"}


def test_yaml_values_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 3e-4 (no dot) as a string; the parser must still give a float
    path.write_text(yaml.safe_dump({**BASE, "learning_rate": "3e-4", "lora_target_modules": "q_proj, v_proj",
                                    "train_on_inputs": True, "max_steps": 7}))
    cfg = load_config(path, ["--max_steps", "11", "--train_on_inputs", "false", "--temperature=1e-4",
                             "--lora_r", "8", "--seed", "5"])
    assert cfg.training.learning_rate == pytest.approx(3e-4) and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.max_steps == 11 and cfg.training.seed == 5
    assert cfg.data.train_on_inputs is False
    assert cfg.poc.temperature == pytest.approx(1e-4)
    assert cfg.lora.lora_r == 8 and cfg.lora.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.noise_seed == 5  # defaults to the training seed


def test_paper_defaults():
    cfg = load_config(BASE)
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (32, 64, 0.05)
    assert cfg.lora.lora_target_modules == PAPER_TARGET_MODULES
    assert (cfg.data.cutoff_len, cfg.data.val_set_size) == (256, 120)
    assert cfg.poc.temperature == 1e-5 and cfg.model.trust_remote_code is False


@pytest.mark.parametrize("source,overrides,needle", [
    ({**BASE, "lerning_rate": 1.0}, [], "'lerning_rate'"),
    (BASE, ["--not_a_key", "1"], "'not_a_key'"),
    (BASE, ["--max_steps", "many"], "max_steps"),
    ({"data_path": "d", "output_dir": "o"}, [], "model_name_or_path"),
    ({**BASE, "lora_bias": "some"}, [], "lora_bias"),
    ({**BASE, "temperature": -1.0}, [], "temperature"),
])
def test_bad_configs_name_the_key(source, overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    assert needle in str(info.value)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, "lerning_rate": 1.0})
    msg = str(info.value)
    assert "did you mean learning_rate" in msg
    assert all(k in msg for k in ("lora_r", "data_path", "temperature", "per_device_train_batch_size"))


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        read_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(BASE, ["--lora_r", "4", "--learning_rate", "1e-3", "--warmup_steps", "3"])
    saved = cfg.save(tmp_path)
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()
    assert set(yaml.safe_load(saved.read_text())) <= set(valid_keys())


def test_member_configs_shift_every_seed():
    cfg = load_config({**BASE, "seed": 10, "data_seed": 3, "noise_seed": 100})
    m = cfg.for_member(2, "runs/x/adapter_2")
    assert (m.training.seed, m.training.data_seed, m.noise_seed) == (12, 5, 102)
    assert m.training.output_dir == "runs/x/adapter_2" and cfg.training.seed == 10


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name):
    cfg = load_config(CONFIGS / name, NO_GPU)
    assert cfg.model.model_name_or_path and cfg.data.data_path


def test_paper_configs_follow_the_paper():
    for name, lr in (("llama2_7b_commonsense.yaml", 3e-4), ("llama3_8b_commonsense.yaml", 1e-4)):
        cfg = load_config(CONFIGS / name, NO_GPU)
        tr = cfg.training
        assert tr.learning_rate == pytest.approx(lr)
        assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (32, 64, 0.05)
        assert cfg.lora.lora_target_modules == PAPER_TARGET_MODULES
        assert tr.per_device_train_batch_size * tr.gradient_accumulation_steps == 16
        assert (tr.warmup_steps, tr.num_train_epochs, cfg.data.cutoff_len, cfg.data.val_set_size) == (100, 3, 256, 120)
        assert cfg.poc.temperature == 1e-5 and tr.activation_checkpointing
        one = load_config(CONFIGS / name.replace(".yaml", "_1epoch.yaml"), NO_GPU)
        assert one.training.num_train_epochs == 1
