"""scripts/validation_trial.py: a learning curve scored on a validation split, never the test split."""

from __future__ import annotations

import importlib.util
import json
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


def test_a_validation_seed_equal_to_the_training_seed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))
    from poc_lora.errors import ConfigError
    with pytest.raises(ConfigError, match="test split"):
        _script().main(["--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--output", str(tmp_path / "t"),
                        "--val_seed", "0"])
    assert not (tmp_path / "t").exists()
