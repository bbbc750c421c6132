"""NoisyAdamW under torch.distributed: 2 CPU processes with the gloo backend.

* DDP: replicas start from different local RNG states and see different data, yet with
  ``seed=None`` they agree on the noise seed and stay bit-identical after noisy steps.
* DTensor: a sharded parameter gets independent noise per shard, a replicated one the same noise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poc_lora.optim import NoisyAdamW

pytestmark = pytest.mark.distributed
WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # different global RNG per rank: agreement must come from broadcast
        local_draw = torch.randint(0, 2**62, ()).item()
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
        opt = NoisyAdamW(ddp.parameters(), lr=1e-2, temperature=1e-3)  # seed=None
        start = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(rank)  # each rank its own data
        for _ in range(5):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        ddp_state = [p.detach().clone() for p in model.parameters()]

        from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

        mesh = DeviceMesh("cpu", list(range(WORLD)))
        full = torch.zeros(64, 32)
        sharded = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        replicated = torch.nn.Parameter(distribute_tensor(full, mesh, [Replicate()]))
        dt_opt = NoisyAdamW([sharded, replicated], lr=0.5, weight_decay=0.0, temperature=0.01, seed=7)
        for p in (sharded, replicated):
            p.grad = distribute_tensor(torch.zeros(64, 32), mesh, p.placements)
        dt_opt.step()
        torch.save({"seed": opt.noise_seed, "local_draw": local_draw, "start": start, "ddp": ddp_state,
                    "shard": sharded.to_local().detach().clone(),
                    "replica": replicated.to_local().detach().clone()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_identical_and_shards_independent(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["local_draw"] != r1["local_draw"]  # the ranks' own RNGs would have disagreed
    assert r0["seed"] == r1["seed"]
    assert all(torch.equal(a, b) for a, b in zip(r0["ddp"], r1["ddp"]))
    assert all(not torch.equal(a, s) for a, s in zip(r0["ddp"], r0["start"]))
    # DTensor: each shard (32 x 32) received noise of std sqrt(2 * 0.5 * 0.01) = 0.1 ...
    std = math.sqrt(2 * 0.5 * 0.01)
    for r in (r0, r1):
        assert r["shard"].shape == (32, 32)
        assert 0.8 < float(r["shard"].std()) / std < 1.2  # 1024 samples: SE of the std ratio ~2.2%
    # ... independently per shard (equal draws would make them identical), while replicas agree
    assert not torch.equal(r0["shard"], r1["shard"])
    assert abs(float(torch.corrcoef(torch.stack([r0["shard"].flatten(), r1["shard"].flatten()]))[0, 1])) < 6 / 32
    assert torch.equal(r0["replica"], r1["replica"]) and float(r0["replica"].std()) > 0


def _fsdp1_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32))
        fsdp = FSDP(model, use_orig_params=False, device_id=torch.device("cpu"))
        (flat,) = list(fsdp.parameters())  # FSDP1: one flat 1-D local shard per rank
        assert getattr(flat, "_is_flat_param", False)
        before = flat.detach().clone()
        opt = NoisyAdamW([flat], lr=0.5, weight_decay=0.0, temperature=0.01, seed=7)
        flat.grad = torch.zeros_like(flat)  # AdamW moves nothing: the change is the noise alone
        opt.step()
        torch.save({"noise": (flat.detach() - before).clone()}, f"{out_dir}/fsdp1_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp1_flat_parameter_shards_get_independent_noise(tmp_path):
    """FSDP1 with use_orig_params=False gives the optimizer equally shaped flat shards; keyed by
    nothing they would all draw the same noise (correlation 1)."""
    mp.spawn(_fsdp1_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    n0, n1 = (torch.load(tmp_path / f"fsdp1_rank{r}.pt", weights_only=True)["noise"] for r in range(WORLD))
    numel = 32 * 64 + 64 + 64 * 32 + 32
    assert n0.numel() == n1.numel() == math.ceil(numel / WORLD)  # each rank holds half the flat parameter
    std = math.sqrt(2 * 0.5 * 0.01)
    for n in (n0, n1):
        assert 0.9 < float(n.std()) / std < 1.1  # ~2100 samples: SE of the std ratio ~1.5%
    assert abs(float(torch.corrcoef(torch.stack([n0, n1]))[0, 1])) < 6 / math.sqrt(n0.numel())
