"""End to end through the CLI on the tiny config: train, resume, ensembles, DDP, QLoRA, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poc_lora import cli
from poc_lora.config import CONFIG_FILE, load_config
from poc_lora.data.templates import TEMPLATE_RECORD_FILE
from poc_lora.train import DONE_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
# 8 records per suite (64), 8 held out, 4 steps of batch 4, a checkpoint every 2 steps.
SMALL = ["--synthetic_train_per_suite", "8", "--synthetic_test_per_suite", "2", "--val_set_size", "8",
         "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--warmup_steps", "0",
         "--logging_steps", "2", "--save_total_limit", "3", "--disable_tqdm", "true"]
WEIGHTS = "adapter_model.safetensors"


pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def _train(out: Path, *extra: str) -> int:
    return cli.main(["train", "--config", TINY, "--output_dir", str(out), *SMALL, *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / WEIGHTS))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "adapter"
    assert _train(out) == 0
    return out


def test_train_writes_a_peft_adapter_that_loads_and_changed(trained):
    from peft import PeftModel

    from poc_lora.models import load_model
    from poc_lora.train import attach_lora

    for name in ("adapter_config.json", WEIGHTS, TEMPLATE_RECORD_FILE, CONFIG_FILE, DONE_FILE):
        assert (trained / name).is_file(), name
    assert json.loads((trained / TEMPLATE_RECORD_FILE).read_text())["prompt_template"] == "alpaca"
    record = json.loads((trained / DONE_FILE).read_text())
    assert record["global_step"] == 4 and record["noise_seed"] == 0
    cfg = load_config(trained / CONFIG_FILE)  # the resolved config is rerunnable
    assert cfg.training.max_steps == 4 and cfg.data.synthetic_train_per_suite == 8

    model = PeftModel.from_pretrained(load_model("poc-lora/tiny-llama", "float32"), str(trained))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    saved = _weights(trained)
    assert len(loaded) == len(saved) == 2 * 2 * 5  # 2 layers x 5 modules x (A, B)
    # the initial adapter, built independently with the same seed: B starts at 0, A at random
    init = attach_lora(load_model("poc-lora/tiny-llama", "float32"), cfg)
    init_sd = {k: v for k, v in init.state_dict().items() if "lora_" in k}
    for key, value in loaded.items():
        assert not torch.equal(value, init_sd[key]), key  # every factor moved
    assert all(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)


def test_resume_gives_the_same_adapter(trained, tmp_path):
    # An interrupted run = the output dir holding only checkpoint-2; resuming must reproduce
    # the uninterrupted adapter bit for bit (model, optimizer incl. noise stream, RNG, data order).
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(trained / "checkpoint-2", out / "checkpoint-2")
    assert _train(out) == 1  # unfinished checkpoints without --resume_from_checkpoint: refused
    assert _train(out, "--resume_from_checkpoint", "true") == 0
    assert json.loads((out / DONE_FILE).read_text())["resumed_from"].endswith("checkpoint-2")
    a, b = _weights(trained), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_adapter_is_not_overwritten(trained, capsys):
    before = (trained / WEIGHTS).read_bytes()
    assert _train(trained) == 1
    assert "already holds a trained adapter" in capsys.readouterr().err
    assert (trained / WEIGHTS).read_bytes() == before


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must fail before the model (or tokenizer) is loaded."""
    import poc_lora.train as train_module  # where training looks the loaders up

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(train_module, "load_model", boom)
    monkeypatch.setattr(train_module, "load_tokenizer", boom)


def _bad_data(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "nope.json", "empty": tmp_path / "empty.json",
             "field": tmp_path / "field.json", "jsonl": tmp_path / "bad.jsonl"}
    files["empty"].write_text("[]")
    files["field"].write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    files["jsonl"].write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    return files


@pytest.mark.parametrize("case,extra,needle", [
    ("missing", [], "nope.json not found"),
    ("empty", [], "empty.json holds no records"),
    ("field", [], "record 1: missing field 'output'"),
    ("jsonl", [], "bad.jsonl, line 2"),
    (None, ["--prompt_template", "vicuna"], "unknown prompt_template 'vicuna'"),
    (None, ["--lerning_rate", "1"], "unknown config key 'lerning_rate'"),
    (None, ["--resume_from_checkpoint", "true"], "no checkpoint-<step>"),
])
def test_bad_input_fails_before_loading_the_model(tmp_path, capsys, no_model_load, case, extra, needle):
    data = ["--data_path", str(_bad_data(tmp_path)[case])] if case else []
    out = tmp_path / "out"
    assert _train(out, *data, *extra) == 1
    assert needle in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ens") / "seq"
    args = ["ensemble", "--config", TINY, "-M", "2", "--strategy", "sequential", "--merge", "--output_dir", str(out), *SMALL]
    assert cli.main(args) == 0
    return out, args


def test_ensemble_sequential_merges(sequential):
    out, _ = sequential
    w0, w1 = _weights(out / "adapter_0"), _weights(out / "adapter_1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # different seeds, different adapters
    seeds = [json.loads((out / f"adapter_{j}" / DONE_FILE).read_text())["seed"] for j in range(2)]
    assert seeds == [0, 1]
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    assert report["method"] == "poc" and len(report["inputs"]) == 2
    # the merged delta equals the mean of the adapters' deltas s * B @ A (computed here directly)
    merged = _weights(out / "merged")
    cfg0 = json.loads((out / "adapter_0" / "adapter_config.json").read_text())
    mcfg = json.loads((out / "merged" / "adapter_config.json").read_text())
    s, ms = cfg0["lora_alpha"] / cfg0["r"], mcfg["lora_alpha"] / mcfg["r"]
    for key_a in (k for k in w0 if "lora_A" in k):
        key_b = key_a.replace("lora_A", "lora_B")
        mean = 0.5 * s * (w0[key_b] @ w0[key_a] + w1[key_b] @ w1[key_a])
        torch.testing.assert_close(ms * merged[key_b] @ merged[key_a], mean, rtol=1e-4, atol=1e-6)


def test_ensemble_rerun_skips_finished_adapters(sequential, no_model_load):
    out, args = sequential
    before = (out / "adapter_0" / WEIGHTS).stat().st_mtime_ns
    assert cli.main(args) == 0  # nothing is loaded or trained again
    assert (out / "adapter_0" / WEIGHTS).stat().st_mtime_ns == before


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "poc_lora.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_ensemble_parallel_two_processes_matches_sequential(sequential, tmp_path):
    seq = sequential[0]
    out = tmp_path / "par"
    _torchrun("ensemble", "--config", TINY, "-M", "2", "--strategy", "parallel", "--merge",
              "--output_dir", str(out), *SMALL)
    for j in range(2):
        a, b = _weights(seq / f"adapter_{j}"), _weights(out / f"adapter_{j}")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    w0, w1 = _weights(out / "adapter_0"), _weights(out / "adapter_1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["strategy"] == "parallel" and manifest["world_size"] == 2
    assert (out / "merged" / WEIGHTS).is_file() and (out / "merged" / "merge_report.json").is_file()


@pytest.mark.distributed
def test_one_adapter_data_parallel_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    _torchrun("train", "--config", TINY, "--output_dir", str(out), *SMALL)
    record = json.loads((out / DONE_FILE).read_text())
    assert record["world_size"] == 2 and record["replicas_identical"] is True


def test_qlora_4bit_with_checkpointing_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    from poc_lora.testing.tiny_model import build_tiny_model

    # bitsandbytes' CPU 4-bit kernels need output sizes divisible by their block (176 is not)
    base = build_tiny_model(tmp_path / "tiny192", intermediate_size=192)
    out = tmp_path / "qlora"
    assert _train(out, "--model_name_or_path", str(base), "--load_in_4bit", "true", "--bnb_4bit_compute_dtype", "float32", "--max_steps", "2",
                  "--activation_checkpointing", "true") == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16
    w = _weights(out)
    assert all(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k)
    assert all(v.dtype == torch.float32 for v in w.values())


# ----------------------------------------------------------------- item: resume of a finished run
def test_resume_of_a_finished_adapter_changes_nothing(trained, caplog, no_model_load):
    """Like Trainer resuming a run that reached max_steps: nothing is trained, nothing rewritten."""
    files = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    caplog.set_level("WARNING")
    assert _train(trained, "--resume_from_checkpoint", "true") == 0
    assert _train(trained, "--resume_from_checkpoint", str(trained / "checkpoint-2")) == 0
    assert "already finished (step 4)" in caplog.text
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_train_adapter_api_into_a_finished_dir_raises_a_poc_lora_error(trained, no_model_load):
    from poc_lora import OutputError, PocLoraError, train_adapter

    before = (trained / WEIGHTS).read_bytes()
    with pytest.raises(OutputError, match="already holds a trained adapter") as info:
        train_adapter(TINY, ["--output_dir", str(trained), *SMALL])
    assert isinstance(info.value, PocLoraError) and str(trained) in str(info.value)
    assert (trained / WEIGHTS).read_bytes() == before


def test_ensemble_resume_of_finished_members_changes_nothing(sequential, no_model_load):
    out, args = sequential
    files = {p: p.read_bytes() for p in out.rglob("adapter_model.safetensors")}
    assert cli.main([*args, "--resume_from_checkpoint", "true"]) == 0
    assert {p: p.read_bytes() for p in files} == files


def test_ensemble_with_changed_settings_is_refused_not_silently_reused(sequential, capsys, no_model_load):
    out, args = sequential
    before = (out / "adapter_0" / WEIGHTS).read_bytes()
    assert cli.main([*args, "--learning_rate", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "trained with other settings (learning_rate)" in err and str(out / "adapter_0") in err
    assert (out / "adapter_0" / WEIGHTS).read_bytes() == before


# ------------------------------------------------------------ item: responses cut away by cutoff_len
@pytest.fixture
def no_model_weights(monkeypatch):
    """The tokenizer may load (tokenising comes first); the model must not."""
    import poc_lora.train as train_module  # where training looks the loader up

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(train_module, "load_model", boom)


def _records_with_prompt_lengths(tmp_path: Path, n_short: int, n_long: int) -> Path:
    short = [{"instruction": f"Is {w} a word?", "input": "", "output": "true"} for w in ("sky", "sea", "sun", "tree")]
    long = [{"instruction": "Please answer " + "the question " * 60 + f"number {i}?", "input": "", "output": "false"}
            for i in range(n_long)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps((short * 4)[:n_short] + long))
    return path


def _prompt_lengths(path: Path) -> list[int]:
    """Prompt lengths in tokens, computed directly with the tiny tokenizer and the alpaca template."""
    from poc_lora.data.templates import get_template
    from poc_lora.models import load_tokenizer

    tok, tpl = load_tokenizer("poc-lora/tiny-llama"), get_template("alpaca")
    return [len(tok(tpl.train_prompt(r))["input_ids"]) for r in json.loads(path.read_text())]


def test_all_responses_cut_away_is_an_error_naming_cutoff_len(tmp_path, capsys, trained, no_model_weights):
    data = _records_with_prompt_lengths(tmp_path, 0, 12)
    lengths = _prompt_lengths(data)
    cutoff = min(lengths) - 1  # every prompt alone fills cutoff_len
    out = tmp_path / "out"
    assert _train(out, "--data_path", str(data), "--val_set_size", "0", "--cutoff_len", str(cutoff)) == 1
    err = capsys.readouterr().err
    assert f"cutoff_len={cutoff}" in err and f"the longest prompt is {max(lengths)} tokens" in err
    assert "none of the 12 training records" in err
    assert not out.exists()


def test_some_responses_cut_away_is_a_warning_with_the_count(tmp_path, caplog, trained, no_model_weights):
    data = _records_with_prompt_lengths(tmp_path, 10, 6)
    lengths = _prompt_lengths(data)
    cutoff = 40
    expected = sum(n >= cutoff for n in lengths)  # a prompt that fills cutoff_len leaves no response token
    assert 0 < expected < len(lengths)
    caplog.set_level("WARNING")
    with pytest.raises(AssertionError, match="model was loaded"):  # the check ran, then the model load came
        _train(tmp_path / "out", "--data_path", str(data), "--val_set_size", "0", "--cutoff_len", str(cutoff))
    assert f"{expected} of {len(lengths)} training records have no response token within cutoff_len={cutoff}" in caplog.text
