"""YAML + --key value configs parsed through HfArgumentParser (poc_lora.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from poc_lora.config import PAPER_TARGET_MODULES, load_config, valid_keys
from poc_lora.keyparser import read_yaml
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


# ------------------------------------------------------------------ one override grammar
def test_flat_dotted_and_nested_keys_build_the_same_training_arguments():
    """--key, --section.key and YAML 'section: {key: ...}' set the same field; compared with
    TrainingArguments and LoraArguments built directly."""
    from transformers import TrainingArguments

    flat = load_config(BASE, ["--learning_rate", "1e-3", "--lora_r", "8", "--lora_target_modules", "q_proj,v_proj"])
    dotted = load_config(BASE, ["--training.learning_rate", "1e-3", "--lora.lora_r", "8",
                                "--lora.lora_target_modules", "q_proj", "v_proj"])
    nested = load_config({**BASE, "training": {"learning_rate": "1e-3"},
                          "lora": {"lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"]}})
    direct = TrainingArguments(output_dir=BASE["output_dir"], learning_rate=1e-3)
    for cfg in (flat, dotted, nested):
        assert cfg.training.learning_rate == direct.learning_rate == 1e-3
        assert cfg.training.output_dir == direct.output_dir
        assert cfg.lora.lora_r == 8 and cfg.lora.lora_target_modules == ["q_proj", "v_proj"]


def test_updates_are_typed_values_not_argv_strings():
    """The pipeline's training keys reach load_config as a mapping (no argv round trip)."""
    cfg = load_config(BASE, updates={"training.max_steps": 7, "noise.temperature": 0.0, "lora_dropout": 0.0})
    assert cfg.training.max_steps == 7 and cfg.poc.temperature == 0.0 and cfg.lora.lora_dropout == 0.0


def test_ambiguous_and_unknown_keys_name_the_spellings(tmp_path):
    from poc_lora.pipeline import PipelineConfig

    cfg = tmp_path / "p.yaml"
    cfg.write_text("train_config: x.yaml\nseed: 3\n")  # merge.seed or training.seed?
    with pytest.raises(ConfigError, match=r"merge\.seed or training\.seed"):
        PipelineConfig.from_yaml(cfg)
    cfg.write_text("train_config: x.yaml\n")
    with pytest.raises(ConfigError, match=r"--merge\.seed or --training\.seed"):  # the same on the command line
        PipelineConfig.from_yaml(cfg, ["--seed", "3"])
    with pytest.raises(ConfigError, match="lora_r"):
        load_config(BASE, ["--lora_rr", "8"])


def test_old_flat_pipeline_config_loads_like_the_new_layout(tmp_path, caplog):
    """A pipeline YAML of the previous release (flat eval_*/merge_* keys, train_overrides) gives the
    same configuration as the sectioned layout, with a warning naming the new spelling."""
    from poc_lora.pipeline import PipelineConfig

    old = tmp_path / "old.yaml"
    old.write_text("train_config: t.yaml\nnum_adapters: 3\ntrain_overrides: {max_steps: 12, seed: 5}\n"
                   "merge_methods: [poc, svd]\nmerge_rank: 4\neval_mode: rank\neval_limit: 16\neval_batch_size: 32\n")
    new = tmp_path / "new.yaml"
    new.write_text("pipeline: {train_config: t.yaml, num_adapters: 3}\nmerge: {methods: [poc, svd], rank: 4}\n"
                   "eval: {mode: rank, limit: 16, batch_size: 32}\ntraining: {max_steps: 12, seed: 5}\n")
    with caplog.at_level("WARNING"):
        a = PipelineConfig.from_yaml(old)
    assert "eval.mode" in caplog.text and "train_overrides is deprecated" in caplog.text
    b = PipelineConfig.from_yaml(new)
    assert a.to_dict() == b.to_dict()
    assert (a.eval.mode, a.eval.limit, a.eval.batch_size, a.merge.methods, a.merge.rank) == ("rank", 16, 32, ["poc", "svd"], 4)
    assert a.train_updates == {"training.max_steps": 12, "training.seed": 5}
    with pytest.raises(ConfigError, match="--max_steps 12"):
        PipelineConfig.from_yaml(new, ["--train_overrides", "{max_steps: 1}"])


def test_one_default_per_eval_key():
    """eval CLI, pipeline and evaluate() share EvalArguments' defaults (generate mode, batch 8)."""
    import inspect

    from eval_harness.runner import evaluate
    from poc_lora.cli import parse_command
    from poc_lora.config import EvalArguments

    params = inspect.signature(evaluate).parameters
    ev = EvalArguments()
    assert (ev.mode, ev.batch_size, ev.num_beams, ev.max_new_tokens) == ("generate", 8, 4, 32)
    for key in ("mode", "batch_size", "num_beams", "max_new_tokens", "tasks", "limit"):
        assert params[key].default == getattr(ev, key)
    _, sections = parse_command("eval", ["--base_model", "b", "--data_dir", "d", "-o", "o"])
    assert sections["eval"] == {"data_dir": "d"}  # the rest: EvalArguments' defaults


@pytest.mark.parametrize("command", ["train", "ensemble", "merge", "eval", "pipeline", "demo",
                                     "mfnn figure1", "mfnn figure2", "mfnn table2"])
def test_help_lists_every_key_with_its_default(command, capsys):
    from poc_lora.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    expect = {"train": ["--lora_r LORA_R, --lora.lora_r LORA_R", "(default: 32)", "--learning_rate", "(default: 5e-05)"],
              "ensemble": ["--num_adapters", "--temperature", "(default: 1e-05)"],
              "merge": ["--rank", "--merge.rank", "--base_model"],
              "eval": ["--batch_size BATCH_SIZE, --eval.batch_size", "(default: 8)", "(default: generate)"],
              "pipeline": ["--merge.seed", "--training.seed", "--eval.limit", "--max_steps"],
              "demo": ["--quick"], "mfnn figure1": ["--data.n", "paper: 200"], "mfnn figure2": ["--lams", "--epochs"],
              "mfnn table2": ["--num_seeds", "paper: 3"]}[command]
    for needle in expect:
        assert needle in text, needle
