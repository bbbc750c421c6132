"""scripts/validation_trial.py: a learning curve scored on a validation split, never the test split."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("validation_trial", ROOT / "scripts" / "validation_trial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _questions(directory: Path) -> set[str]:
    return {r["instruction"] for p in directory.glob("*/test.json") for r in json.loads(p.read_text())}


def test_curve_scores_checkpoints_on_a_validation_set_apart_from_the_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trial"
    assert _script().main(["--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--output", str(out),
                           "--every", "2", "--max_steps", "4", "--val_per_suite", "4"]) == 0
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [r["step"] for r in curve["rows"]] == [0, 2, 4]  # base, then each checkpoint
    val_dir = Path(curve["validation_dir"])
    test_dirs = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith("-s0")]
    assert len(test_dirs) == 1 and val_dir.name.endswith("-s777")
    val, test = _questions(val_dir), _questions(test_dirs[0])
    assert len(val) > 20 and not val & test
    # Each row is that model's evaluation summary, as eval_harness wrote it.
    summary = json.loads((out / "eval" / "summary.json").read_text())
    by_adapter = {m["adapter"]: m for m in summary["models"].values()}
    ckpt4 = by_adapter[str(out / "adapter" / "checkpoint-4")]
    assert curve["rows"][2]["Ave."] == pytest.approx(100 * ckpt4["average"])
    assert "| chance |" in (out / "learning_curve.md").read_text()
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_validation_seed_equal_to_the_training_seed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    from poc_lora.errors import ConfigError
    with pytest.raises(ConfigError, match="test split"):
        _script().main(["--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--output", str(tmp_path / "t"),
                        "--val_seed", "0"])
    assert not (tmp_path / "t").exists()


def _commonsense_train() -> Path | None:
    """The real training records (LLM-Adapters layout): $POC_LORA_COMMONSENSE_TRAIN, else
    ../shared/data/commonsense-train beside the repository (development machines only)."""
    env = os.environ.get("POC_LORA_COMMONSENSE_TRAIN")
    for path in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data" / "commonsense-train",
                                                 ROOT.parents[1] / "shared" / "data" / "commonsense-train"]:
        if (path / "boolq" / "train.json").is_file():
            return path
    return None


@pytest.mark.parametrize("extra, pattern", [
    (["--data_path", "{tmp}/boolq/test.json"], "is a test split"),
    (["--data_path", "someone/commonsense", "--dataset_split", "test"], "is a test split"),
    (["--data_path", "{tmp}"], "give --validation_split"),
])
def test_test_files_and_unsplit_real_data_are_refused(tmp_path, monkeypatch, extra, pattern):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    from poc_lora.errors import ConfigError
    (tmp_path / "boolq").mkdir()
    record = {"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                             "Answer format: true/false", "input": "", "output": "the correct answer is true",
              "answer": "true"}
    for name in ("test.json", "train.json"):
        (tmp_path / "boolq" / name).write_text(json.dumps([record] * 4))
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    with pytest.raises(ConfigError, match=pattern):
        _script().main(["--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--output", str(tmp_path / "t"),
                        *extra])
    assert not (tmp_path / "t").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_real_training_data_with_a_validation_split_in_choice_mode(tmp_path, monkeypatch):
    data = _commonsense_train()
    if data is None:
        pytest.skip("the real commonsense training records are not here: set POC_LORA_COMMONSENSE_TRAIN to an "
                    "LLM-Adapters dataset/ directory (or ../shared/data/commonsense-train)")
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trial"
    assert _script().main(["--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--output", str(out),
                           "--data_path", str(data), "--validation_split", "3", "--val_set_size", "0",
                           "--answer_style", "text", "--mode", "choice", "--every", "2", "--max_steps", "2"]) == 0
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [r["step"] for r in curve["rows"]] == [0, 2] and curve["mode"] == "choice"
    val_dir = Path(curve["validation_dir"])
    assert val_dir.parent == tmp_path / "cache" and "acc_norm Ave." in curve["rows"][0]
    suites = sorted(p.parent.name for p in val_dir.glob("*/test.json"))
    assert suites == sorted(p.parent.name for p in data.glob("*/train.json"))
    assert all(len(json.loads((val_dir / s / "test.json").read_text())) == 3 for s in suites)
