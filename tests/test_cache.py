"""Cached assets under concurrency: every torchrun rank (and every process sharing the cache) asks
for the tiny model, the synthetic data and GGUF conversions at start-up; one builds, the rest
reuse it, and a result another process made meanwhile is never replaced under a reader's feet."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poc_lora.cache import build_once
from poc_lora.errors import OutputError
from poc_lora.outputs import atomic_output_dir


def test_atomic_output_dir_keeps_a_result_created_meanwhile(tmp_path):
    out = tmp_path / "asset"
    with pytest.raises(OutputError, match="created by another process"):
        with atomic_output_dir(out) as tmp:
            (tmp / "mine.txt").write_text("mine")
            out.mkdir()  # another process finishes first
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]  # our temporary directory is gone


def _build_slowly(root: str) -> None:
    path = Path(root) / "asset"

    def build() -> None:
        with open(Path(root) / "builds.log", "a") as log:  # one line per build actually run
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other processes to arrive while it builds
        with atomic_output_dir(path) as tmp:
            (tmp / "done").write_text("ok")

    build_once(path, lambda p: (p / "done").exists(), build)
    assert (path / "done").read_text() == "ok"


def test_build_once_builds_once_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(tmp_path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1


def _rank_builds(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == 1:  # the lock's holder need not be rank 0
            from poc_lora.testing.tiny_model import build_tiny_model
            build_tiny_model(out)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_a_rank_other_than_zero_writes_a_complete_model_asset(tmp_path):
    """transformers' save_pretrained writes weights on rank 0 only; a cache asset built by rank 1
    must still hold them (this left a weightless tiny model under torchrun)."""
    out = tmp_path / "tiny"
    torch.multiprocessing.spawn(_rank_builds, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    from transformers import AutoModelForCausalLM

    from poc_lora.testing.tiny_model import build_tiny_model
    reference = build_tiny_model(tmp_path / "single")  # same seed, no process group
    weights, expected = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(out)  # a complete transformers model directory
