"""Every user error ends in `error: ...`, a non-zero exit and no traceback, in every command.

One table sweeps unreadable inputs across the commands: empty files, pickles, truncated
safetensors, a file where a directory belongs and a directory where a file belongs. Each row
runs the real CLI entry point and checks the exit code, the `error:` line, that the message
names the path at fault, and that no traceback is printed.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from poc_lora import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
DEMO = str(ROOT / "configs" / "pipeline" / "tiny_cpu.yaml")
LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
               "base_model_name_or_path": "poc-lora/tiny-llama", "task_type": "CAUSAL_LM"}


class _Hostile:
    """Unpickling this creates the file named: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path / "cache"))


def _make(kind: str, root: Path, name: str) -> Path:
    """An unreadable input of the given kind at root/name."""
    path = root / name
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    elif kind == "file":
        path.write_text("not a directory\n")
    else:
        raise ValueError(kind)
    return path


def _adapter(root: Path, weights: str) -> Path:
    """An adapter directory with a valid adapter_config.json and broken weights."""
    path = root / f"adapter_{weights}"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    if weights == "truncated":
        import torch
        from safetensors.torch import save_file

        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
                  str(path / "adapter_model.safetensors"))
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        return path / "adapter_model.safetensors"
    if weights == "empty":
        (path / "adapter_model.safetensors").write_bytes(b"")
        return path / "adapter_model.safetensors"
    if weights == "pickle":
        (path / "adapter_model.bin").write_bytes(pickle.dumps(_Hostile(root / "code_ran")))
        return path / "adapter_model.bin"
    raise ValueError(weights)


def _suites(root: Path) -> Path:
    from poc_lora.data.synthetic import write_synthetic_commonsense

    return write_synthetic_commonsense(root / "suites", train_per_suite=2, test_per_suite=2, seed=0) or root / "suites"


def _eval(data_dir: Path, out: Path, *adapters: Path) -> list[str]:
    return ["eval", "--base_model", "poc-lora/tiny-llama", "--data_dir", str(data_dir), "--mode", "rank",
            "--output", str(out), *[a for p in adapters for a in ("--adapter", str(p))]]


def _suite_file_broken(root: Path, kind: str) -> Path:
    data = _suites(root)
    test = data / "boolq" / "test.json"
    test.unlink()
    return _make(kind, test.parent, "test.json")


# (row id, builder(tmp) -> (argv, path the message must name))
ROWS = {
    "train config empty": lambda t: (["train", "--config", str(_make("empty", t, "c.yaml"))], t / "c.yaml"),
    "train config is a directory": lambda t: (["train", "--config", str(_make("directory", t, "c.yaml"))], t / "c.yaml"),
    "train config is a pickle": lambda t: (["train", "--config", str(_make("pickle", t, "c.yaml"))], t / "c.yaml"),
    "train data empty": lambda t: (["train", "--config", TINY, "--output_dir", str(t / "o"), "--data_path",
                                    str(_make("empty", t, "d.json"))], t / "d.json"),
    "train data is a directory": lambda t: (["train", "--config", TINY, "--output_dir", str(t / "o"), "--data_path",
                                             str(_make("directory", t, "d.json"))], t / "d.json"),
    "train data is a pickle": lambda t: (["train", "--config", TINY, "--output_dir", str(t / "o"), "--data_path",
                                          str(_make("pickle", t, "d.json"))], t / "d.json"),
    "train output_dir is a file": lambda t: (["train", "--config", TINY, "--output_dir",
                                              str(_make("file", t, "o"))], t / "o"),
    "ensemble config is a directory": lambda t: (["ensemble", "--config", str(_make("directory", t, "c.yaml")),
                                                  "-M", "2"], t / "c.yaml"),
    "eval adapter is a file": lambda t: (_eval(_suites(t), t / "o", _make("file", t, "a")), t / "a"),
    "eval adapter truncated safetensors": lambda t: (_eval(_suites(t), t / "o", (w := _adapter(t, "truncated")).parent), w),
    "eval adapter empty safetensors": lambda t: (_eval(_suites(t), t / "o", (w := _adapter(t, "empty")).parent), w),
    "eval adapter pickle": lambda t: (_eval(_suites(t), t / "o", (w := _adapter(t, "pickle")).parent), w),
    "eval data dir is a file": lambda t: (_eval(_make("file", t, "d"), t / "o"), t / "d"),
    "eval data dir empty": lambda t: (_eval(_make("directory", t, "d"), t / "o"), t / "d"),
    "eval suite file is a directory": lambda t: (_eval(t / "suites", t / "o"), _suite_file_broken(t, "directory")),
    "eval suite file empty": lambda t: (_eval(t / "suites", t / "o"), _suite_file_broken(t, "empty")),
    "eval output is a file": lambda t: (_eval(_suites(t), _make("file", t, "o")), t / "o"),
    "merge input truncated safetensors": lambda t: (["merge", str((w := _adapter(t, "truncated")).parent),
                                                     str(w.parent), "--output", str(t / "m")], w),
    "merge input pickle": lambda t: (["merge", str((w := _adapter(t, "pickle")).parent), str(w.parent),
                                      "--output", str(t / "m")], w),
    "merge input empty safetensors": lambda t: (["merge", str((w := _adapter(t, "empty")).parent), str(w.parent),
                                                 "--output", str(t / "m")], w),
    "merge input is a file": lambda t: (["merge", str(_make("file", t, "a")), str(t / "a"), "--output", str(t / "m")],
                                        t / "a"),
    "pipeline config empty": lambda t: (["pipeline", "--config", str(_make("empty", t, "p.yaml"))], t / "p.yaml"),
    "pipeline config is a directory": lambda t: (["pipeline", "--config", str(_make("directory", t, "p.yaml"))],
                                                 t / "p.yaml"),
    "pipeline config is a pickle": lambda t: (["pipeline", "--config", str(_make("pickle", t, "p.yaml"))], t / "p.yaml"),
    "pipeline output is a file": lambda t: (["pipeline", "--config", DEMO, "--output", str(_make("file", t, "o"))],
                                            t / "o"),
    "demo output is a file": lambda t: (["demo", "--quick", "--output", str(_make("file", t, "o"))], t / "o"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_unreadable_input_is_a_clean_error(row, tmp_path, capsys):
    argv, culprit = ROWS[row](tmp_path)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "error:" in err, err
    assert str(culprit) in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "code_ran").exists()  # no pickle ever runs code


def test_hostile_pickle_adapter_in_eval_through_the_console(tmp_path):
    """The real process: exit 1, one `error:` line naming the file, no traceback, no code run."""
    weights = _adapter(tmp_path, "pickle")
    proc = subprocess.run([sys.executable, "-m", "poc_lora.cli", *_eval(_suites(tmp_path), tmp_path / "o", weights.parent)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "POC_LORA_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and str(weights) in proc.stderr and "weights_only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "code_ran").exists() and not (tmp_path / "o").exists()


def test_offline_console_prints_exactly_the_error_and_the_api_prints_nothing(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as an offline user sets it), importing PEFT imports bitsandbytes,
    whose optional CPU kernel lookup on the Hub used to log two warnings; the console's stderr is
    exactly the one `error:` line, and importing the Python API writes nothing."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POC_LORA_CACHE": str(tmp_path / "cache")}
    weights = _adapter(tmp_path, "empty")
    proc = subprocess.run([sys.executable, "-m", "poc_lora.cli", *_eval(_suites(tmp_path), tmp_path / "o", weights.parent)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: adapter {weights.parent}: {weights} is not a valid safetensors file "
                           "(Error while deserializing header: header too small)\n")
    api = subprocess.run([sys.executable, "-c", "from eval_harness import evaluate; import peft, bitsandbytes"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert (api.returncode, api.stderr) == (0, "")


def test_offline_4bit_load_works_without_the_hub_kernel_notices(tmp_path):
    """bitsandbytes falls back to its own CPU 4-bit code when the Hub kernel cannot be fetched; a
    4-bit load offline works and prints nothing about the kernel."""
    import os

    pytest.importorskip("bitsandbytes")
    code = ("from poc_lora.models import load_model, tiny_model_path; import torch; "
            "m = load_model(str(tiny_model_path()), 'float32', load_in_4bit=True); "
            "print(type(m.model.layers[0].self_attn.q_proj).__name__, "
            "bool(torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]])).logits).all()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "POC_LORA_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Linear4bit", "True"]
    assert "kernels" not in proc.stderr and "gemm_4bit" not in proc.stderr


# ------------------------------------------------------------------------ CPU thread defaults
def test_cli_thread_defaults(monkeypatch, capsys):
    """All the cores this process may use (its affinity mask, not os.cpu_count) and passive OpenMP
    waiting, unless the user says otherwise."""
    import torch

    from poc_lora.runtime import configure_threads

    before = torch.get_num_threads()
    try:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
            monkeypatch.delenv(var, raising=False)
        cores = len(__import__("os").sched_getaffinity(0))
        assert configure_threads() == cores and torch.get_num_threads() == cores
        monkeypatch.delenv("OMP_NUM_THREADS")  # configure_threads exported it for child processes
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})  # e.g. `taskset -c 0`
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        assert __import__("os").environ["OMP_WAIT_POLICY"] == "PASSIVE"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_threads() == 2 and torch.get_num_threads() == 2
        assert configure_threads(3) == 3 and torch.get_num_threads() == 3
        assert cli.main(["--threads", "0", "demo"]) == 1
        assert "error: --threads must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    """outputs.atomic_write: the one atomic file write (text, JSON, figures) never leaves a
    partial file or its temporary behind, and replaces the old file only when complete."""
    from poc_lora.outputs import atomic_write, atomic_write_text, staged_files

    target = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_write(tmp_path / "b.png", lambda tmp: tmp.write_bytes(tmp.suffix.encode()), suffix=".png")
    assert (tmp_path / "b.png").read_bytes() == b".png"  # the writer saw the suffix it needs
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-1").mkdir()
    with staged_files(tmp_path / "run") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter_config.json", "checkpoint-1"]
    with pytest.raises(RuntimeError), staged_files(tmp_path / "run") as tmp:
        (tmp / "adapter_model.safetensors").write_text("partial")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
