"""Outputs that say "done" only when they are: every stage kind (trained adapter, ensemble member,
merge, evaluation pair) with a deleted and a truncated output is recomputed or refused with the
file named; every output follows the process umask. (The pipeline's report stage: test_pipeline.)"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from poc_lora import cli
from poc_lora.stages import STAGE_FILE, is_current, is_done, output_files, stage_hash, stage_problems, write_stage
from poc_lora.train import DONE_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
# 6 steps of batch 4, a checkpoint every 3 (both kept): the reproduction, small data.
SMALL = ["--synthetic_train_per_suite", "8", "--synthetic_test_per_suite", "2", "--val_set_size", "8",
         "--per_device_train_batch_size", "4", "--max_steps", "6", "--save_steps", "3", "--warmup_steps", "0",
         "--logging_steps", "3", "--save_total_limit", "2", "--disable_tqdm", "true"]
WEIGHTS = "adapter_model.safetensors"
pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    else:  # truncated: a crash mid-copy, a full disk
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------------- the marker itself
def test_marker_vouches_for_each_file_by_size_and_sha256(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "README.md").write_text("card")  # a living file: later stages extend it
    (tmp_path / ".a.bin.tmp-1").write_text("a temporary")
    settings = {"method": "svd", "rank": 8}
    write_stage(tmp_path, "merge", settings)
    marker = json.loads((tmp_path / STAGE_FILE).read_text())
    assert [f["path"] for f in marker["files"]] == ["a.bin", "sub/b.txt"] == output_files(tmp_path)
    import hashlib
    assert marker["files"][0] == {"path": "a.bin", "size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()}
    assert is_current(tmp_path, settings) and is_done(tmp_path)
    identity = stage_hash(tmp_path)

    (tmp_path / "README.md").write_text("card + evaluation section")
    assert is_current(tmp_path, settings)
    assert not is_current(tmp_path, {"method": "svd", "rank": 4})

    (tmp_path / "a.bin").write_bytes(b"012")
    assert stage_problems(tmp_path) == ["a.bin is truncated (3 of 10 bytes)"]
    assert not is_current(tmp_path, settings) and stage_hash(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"0123456780")  # same size, other bytes
    assert stage_problems(tmp_path) == ["a.bin changed since it was written (sha256 differs)"]
    (tmp_path / "a.bin").unlink()
    (tmp_path / "sub" / "b.txt").write_text("bb")
    assert stage_problems(tmp_path) == ["a.bin is missing", "sub/b.txt changed since it was written (2 bytes, 1 written)"]
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    (tmp_path / "sub" / "b.txt").write_text("b")
    assert is_current(tmp_path, settings) and stage_hash(tmp_path) == identity

    (tmp_path / "a.bin").write_bytes(b"9876543210")  # rewritten with other content, marked again
    write_stage(tmp_path, "merge", settings)
    assert is_current(tmp_path, settings) and stage_hash(tmp_path) != identity  # downstream stages go stale


def test_marker_of_an_earlier_release_without_files_is_not_done(tmp_path):
    from poc_lora.stages import settings_hash

    settings = {"k": 1}
    (tmp_path / STAGE_FILE).write_text(json.dumps({"stage": "train", "settings": settings,
                                                   "settings_sha256": settings_hash(settings)}))
    assert not is_current(tmp_path, settings) and stage_hash(tmp_path) is None
    assert "records no files" in stage_problems(tmp_path)[0]


# --------------------------------------------------------------------------- trained adapters
def _train(out: Path, *extra: str) -> int:
    return cli.main(["train", "--config", TINY, "--output_dir", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "adapter"
    assert _train(out) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    return out


@pytest.fixture
def damaged(trained, tmp_path, request) -> tuple[Path, bytes]:
    """A copy of the finished adapter with its weights deleted or truncated; the original bytes."""
    out = tmp_path / "adapter"
    shutil.copytree(trained, out)
    _damage(out / WEIGHTS, request.param)
    return out, (trained / WEIGHTS).read_bytes()


@pytest.mark.parametrize("damaged", ["deleted", "truncated"], indirect=True)
def test_resume_of_a_damaged_adapter_rebuilds_it_from_the_last_checkpoint(damaged, caplog):
    out, original = damaged
    caplog.set_level("INFO")
    assert _train(out, "--resume_from_checkpoint", "true") == 0
    assert "already finished" not in caplog.text
    assert "rebuilding" in caplog.text and "checkpoint-6" in caplog.text
    # the finished weights, bit for bit (the last checkpoint holds them; nothing trained one step more)
    assert (out / WEIGHTS).read_bytes() == original
    record = json.loads((out / DONE_FILE).read_text())
    assert record["global_step"] == 6 and record["rebuilt_from"].endswith("checkpoint-6")
    assert is_done(out) and not (out / "checkpoint-7").exists()
    caplog.clear()
    assert _train(out, "--resume_from_checkpoint", "true") == 0  # now finished: a resume changes nothing
    assert "already finished (step 6)" in caplog.text


@pytest.mark.parametrize("damaged", ["deleted", "truncated"], indirect=True)
def test_damaged_adapter_without_resume_names_the_file_and_the_flags(damaged, capsys):
    out, _ = damaged
    assert _train(out) == 1
    err = capsys.readouterr().err
    assert "already holds a trained adapter" not in err
    assert WEIGHTS in err and ("missing" in err or "truncated" in err)
    assert "--resume_from_checkpoint true to rebuild it from checkpoint-6" in err and "--overwrite_output_dir true" in err


@pytest.mark.parametrize("damaged", ["deleted", "truncated"], indirect=True)
def test_damaged_adapter_without_checkpoints_names_the_file_and_the_command(damaged, capsys):
    out, _ = damaged
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    assert _train(out, "--resume_from_checkpoint", "true") == 1
    err = capsys.readouterr().err
    assert f"{out} is not a finished adapter: {WEIGHTS} is" in err
    assert "--overwrite_output_dir true" in err and "already finished" not in err


@pytest.mark.parametrize("damaged", ["deleted"], indirect=True)
def test_damaged_adapter_is_not_rebuilt_under_other_settings(damaged, capsys):
    """Its last checkpoint holds the adapter of the recorded settings, not of the changed ones."""
    out, _ = damaged
    assert _train(out, "--resume_from_checkpoint", "true", "--learning_rate", "0.5") == 1
    assert "trained with other settings (learning_rate)" in capsys.readouterr().err
    assert not (out / WEIGHTS).exists()


# ---------------------------------------------------------------------- ensemble members, merges
@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> tuple[Path, list[str], dict[Path, bytes]]:
    out = tmp_path_factory.mktemp("ens") / "ens"
    args = ["ensemble", "--config", TINY, "-M", "2", "--merge", "--output_dir", str(out), *SMALL]
    assert cli.main(args) == 0
    weights = {p: p.read_bytes() for p in (out / "adapter_0" / WEIGHTS, out / "adapter_1" / WEIGHTS,
                                           out / "merged" / WEIGHTS)}
    return out, args, weights


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_ensemble_rebuilds_damaged_members_and_merges_again(ensemble, how, caplog):
    out, args, weights = ensemble
    _damage(out / "adapter_0" / WEIGHTS, how)
    _damage(out / "adapter_1" / DONE_FILE, how)
    caplog.set_level("INFO")
    assert cli.main(args) == 0
    assert "already trained" not in caplog.text
    assert caplog.text.count("nothing is trained") == 2
    for path, data in weights.items():  # the members as trained, and their merge
        assert path.read_bytes() == data, path
    assert all(is_done(out / d) for d in ("adapter_0", "adapter_1", "merged"))


def test_ensemble_refuses_a_damaged_member_under_other_settings(ensemble, capsys):
    out, args, weights = ensemble
    path = out / "adapter_0" / WEIGHTS
    path.unlink()
    assert cli.main([*args, "--learning_rate", "0.5"]) == 1
    assert "trained with other settings (learning_rate)" in capsys.readouterr().err
    assert not path.exists()
    path.write_bytes(weights[path])  # the same bytes back: intact again
    assert is_done(out / "adapter_0")


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_ensemble_trains_a_damaged_member_without_checkpoints_again(ensemble, how):
    out, args, weights = ensemble
    member = out / "adapter_1"
    for ckpt in member.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    _damage(member / WEIGHTS, how)
    assert cli.main(args) == 0
    assert (member / WEIGHTS).read_bytes() == weights[member / WEIGHTS]  # same seed, same adapter
    assert sorted(p.name for p in member.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


@pytest.mark.parametrize("how", ["deleted", "truncated"])
@pytest.mark.parametrize("name", [WEIGHTS, "merge_report.json"])
def test_damaged_merge_is_merged_again(ensemble, how, name, no_training):
    out, args, weights = ensemble
    before = (out / "merged" / name).read_bytes()
    _damage(out / "merged" / name, how)
    assert cli.main(args) == 0
    assert (out / "merged" / WEIGHTS).read_bytes() == weights[out / "merged" / WEIGHTS]
    if name == WEIGHTS:
        assert (out / "merged" / name).read_bytes() == before
    assert is_done(out / "merged")


@pytest.fixture
def no_training(monkeypatch):
    """The members are intact: rebuilding or training one would be a bug."""
    import poc_lora.ensemble as ensemble_module

    def boom(*a, **k):
        raise AssertionError("an intact member was trained or rebuilt")

    monkeypatch.setattr(ensemble_module, "run_training", boom)


# ---------------------------------------------------------------------------- evaluation pairs
@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    from eval_harness import evaluate
    from poc_lora.data.instructions import synthetic_test_dir
    from poc_lora.config import load_config

    data = synthetic_test_dir(load_config(TINY, SMALL).data)
    out = tmp_path_factory.mktemp("eval") / "eval"
    kwargs = dict(data_dir=data, output=out, tasks="boolq", mode="rank")
    evaluate("poc-lora/tiny-llama", [trained], **kwargs)
    pair = out / "adapter" / "boolq"
    return kwargs, trained, pair, {n: (pair / n).read_bytes() for n in ("predictions.jsonl", "summary.json")}


@pytest.mark.parametrize("how", ["deleted", "truncated"])
@pytest.mark.parametrize("name", ["predictions.jsonl", "summary.json"])
def test_damaged_evaluation_pair_is_evaluated_again(evaluated, name, how, caplog):
    from eval_harness import evaluate

    kwargs, adapter, pair, files = evaluated
    _damage(pair / name, how)
    caplog.set_level("INFO")
    result = evaluate("poc-lora/tiny-llama", [adapter], **kwargs)
    assert "skipping adapter/boolq" not in caplog.text
    rows = [json.loads(line) for line in (pair / "predictions.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in rows] == [json.loads(line)["scores"] for line in
                                          files["predictions.jsonl"].decode().splitlines()]
    assert result.models["adapter"].suites["boolq"].n == len(rows) == 2 and is_done(pair)
    caplog.clear()
    evaluate("poc-lora/tiny-llama", [adapter], **kwargs)  # intact again: reused
    assert "skipping adapter/boolq" in caplog.text


# ---------------------------------------------------------------------------------- file modes
def _modes(root: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in [root, *root.rglob("*")]:
        kind = "dir" if p.is_dir() else "file"
        found.setdefault(f"{kind} {oct(stat.S_IMODE(p.stat().st_mode))}", set()).add(str(p.relative_to(root)))
    return found


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_output_follows_the_umask(tmp_path, umask):
    """Trained adapters and their checkpoints (safetensors writes 0600 by itself), ensemble
    members, merges, stage markers: files 0o666 & ~umask, directories 0o777 & ~umask."""
    out = tmp_path / "ens"
    old = os.umask(umask)
    try:
        assert cli.main(["ensemble", "--config", TINY, "-M", "2", "--merge", "--output_dir", str(out), *SMALL,
                         "--max_steps", "2", "--save_steps", "1"]) == 0
    finally:
        os.umask(old)
    modes = _modes(out)
    assert set(modes) == {f"file {oct(0o666 & ~umask)}", f"dir {oct(0o777 & ~umask)}"}, {
        k: sorted(v)[:5] for k, v in modes.items()}
    files = modes[f"file {oct(0o666 & ~umask)}"]
    for expected in ("adapter_0/adapter_model.safetensors", "adapter_1/checkpoint-2/adapter_model.safetensors",
                     "adapter_0/checkpoint-1/optimizer.pt", "merged/adapter_model.safetensors", "ensemble.json"):
        assert expected in files, expected
