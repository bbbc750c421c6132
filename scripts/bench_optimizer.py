"""Benchmark NoisyAdamW against torch AdamW, the noise "floor" and a naive per-parameter loop.

Parameters are shaped like Llama-2-7B LoRA adapters (r=32 on q, k, v, up, down; fp32), with
fixed random gradients. Reported: median step time after warm-up of

* ``adamw``  torch.optim.AdamW (fused where supported, else foreach);
* ``floor``  the same plus one ``buf.normal_(generator=g)`` per element into a buffer allocated
             once: the least any implementation that draws fresh Gaussian noise can cost;
* ``noisy``  poc_lora.NoisyAdamW with its defaults;
* ``naive``  a per-parameter Python loop of AdamW math plus ``p.add_(torch.randn_like(p) * std)``
             (the structure of the paper's released optimizer).

The methods run round-robin, one step each per round, so background load hits all of them alike.

Usage:
    python scripts/bench_optimizer.py --layers 8 --device cpu [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from poc_lora.optim import NoisyAdamW
from poc_lora.outputs import write_json
from poc_lora.report import markdown_table

LR, TEMPERATURE, WEIGHT_DECAY, BETAS, EPS = 3e-4, 1e-5, 0.0, (0.9, 0.999), 1e-8
# Llama-2-7B linear shapes (out_features, in_features) of the LoRA target modules
TARGETS = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
           "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def lora_params(layers: int, rank: int, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    """lora_A (r x in) and lora_B (out x r) for every target of every layer, with gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        for out_f, in_f in TARGETS.values():
            for shape in ((rank, in_f), (out_f, rank)):
                p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
                p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
                params.append(p)
    return params


def fast_adamw(params: list, device: torch.device) -> torch.optim.AdamW:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    choice = {"fused": True} if device.type in _get_fused_kernels_supported_devices() else {"foreach": True}
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **choice)


class Floor:
    """AdamW plus drawing one standard normal per element into a buffer allocated once."""

    def __init__(self, params: list, device: torch.device) -> None:
        self.adamw = fast_adamw(params, device)
        self.buf = torch.empty(sum(p.numel() for p in params), device=device)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def step(self) -> None:
        self.adamw.step()
        self.buf.normal_(generator=self.gen)


class NaiveNoisyAdamW:
    """One Python iteration per parameter: AdamW math, then a fresh noise tensor per parameter."""

    def __init__(self, params: list, device: torch.device) -> None:
        self.params, self.t = params, 0
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.gen = torch.Generator(device=device).manual_seed(0)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        (b1, b2), std = BETAS, math.sqrt(2 * LR * TEMPERATURE)
        for p, (m, v) in zip(self.params, self.state):
            g = p.grad
            p.mul_(1 - LR * WEIGHT_DECAY)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt_().add_(EPS)
            p.addcdiv_(m, denom, value=-LR / (1 - b1 ** self.t))
            p.add_(torch.randn(p.shape, generator=self.gen, device=p.device) * std)


def build(name: str, layers: int, rank: int, device: torch.device):
    params = lora_params(layers, rank, device, seed=0)
    if name == "adamw":
        return fast_adamw(params, device)
    if name == "floor":
        return Floor(params, device)
    if name == "noisy":
        return NoisyAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, temperature=TEMPERATURE, seed=0)
    return NaiveNoisyAdamW(params, device)


def run(layers: int, rank: int, device: torch.device, steps: int, warmup: int) -> dict:
    names = ["adamw", "floor", "noisy", "naive"]
    optims = {n: build(n, layers, rank, device) for n in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        for n in names:  # round-robin: contention affects every method alike
            sync()
            t0 = time.perf_counter()
            optims[n].step()
            sync()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    numel = layers * sum(rank * (out_f + in_f) for out_f, in_f in TARGETS.values())
    noisy = optims["noisy"]
    return {
        "device": str(device), "threads": torch.get_num_threads(), "layers": layers, "rank": rank,
        "trainable_params": numel, "steps": steps, "warmup": warmup,
        "median_s": {n: statistics.median(ts) for n, ts in times.items()},
        "noise_buffer_bytes": sum(b.numel() * b.element_size() for b in noisy._buffers.values()),
        "param_bytes": numel * 4,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="transformer layers with adapters (>= 8; 32 = full 7B)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.layers, args.rank, torch.device(args.device), args.steps, args.warmup)
    med = res["median_s"]
    rows = [
        ["torch AdamW (fused/foreach)", med["adamw"] * 1e3, med["adamw"] / med["floor"], med["adamw"] / med["noisy"]],
        ["floor: AdamW + normal_ into one buffer", med["floor"] * 1e3, 1.0, med["floor"] / med["noisy"]],
        ["NoisyAdamW (defaults)", med["noisy"] * 1e3, med["noisy"] / med["floor"], 1.0],
        ["naive per-parameter loop", med["naive"] * 1e3, med["naive"] / med["floor"], med["naive"] / med["noisy"]],
    ]
    print(f"device={res['device']} threads={res['threads']} layers={res['layers']} r={res['rank']} "
          f"trainable={res['trainable_params'] / 1e6:.1f}M fp32, median of {res['steps']} steps "
          f"after {res['warmup']} warm-up")
    print(markdown_table(["method", "median step (ms)", "x floor", "x NoisyAdamW"], rows, floatfmt=".2f"))
    print(f"NoisyAdamW noise buffer: {res['noise_buffer_bytes'] / 2**20:.1f} MiB "
          f"(parameters: {res['param_bytes'] / 2**20:.1f} MiB)")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
