#!/usr/bin/env python
"""Benchmark the PoC merge against the I/O floor on Llama-2-7B-shaped LoRA adapters.

Generates M adapters (default 8) shaped like the paper's Llama-2-7B LoRA (32 layers, r=32 on
q, k, v, up, down; fp32 safetensors, about 214 MiB each) in a temporary directory, then runs
each job in a fresh subprocess and reports wall time and peak RSS (the child's own
``ru_maxrss``):

* floor: ``load_file`` every input, ``torch.cat`` per key, ``save_file`` (the least a
  merge must do, with everything in memory);
* poc: ``merge_adapters(method="poc")`` (streaming, with all report statistics);
* svd: ``merge_adapters(method="svd", rank=32)``;
* ties, dare_linear, dare_ties: the baselines on the full updates (density 0.5, rank 32): each
  module's M full out x in updates, then an SVD of the merged one (the cost of these methods,
  not of their I/O);
* import: a process that only imports torch and poc_lora (the RSS every job starts from).

Targets: poc wall <= 1.2x floor, poc peak RSS <= 25% of the output file; svd < 60 s. For the
baselines the table shows how far above the floor they are and their peak RSS against the
bound "poc's peak + M + 10 full updates of the largest module" (what streaming module by module
allows: the M inputs' updates of one module, the trimming/drop, sign and mean buffers, the SVD's
copy, factors and workspace, and allocator slack; measured 9 to 12 for M = 3 with 1, 2 and 4
layers, ``--hidden 1024``), so a method that
held more than one module's updates per input at a time, or grew with the layers, would show.

Example:
    python scripts/bench_merge.py                         # full size (~1.7 GB of inputs)
    python scripts/bench_merge.py --layers 4 --num-adapters 4
    python scripts/bench_merge.py --layers 1 --num-adapters 2 --hidden 256 --jobs poc,ties   # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = ("import", "floor", "poc", "svd", "ties", "dare_linear", "dare_ties")
DENSE_JOBS = ("ties", "dare_linear", "dare_ties")  # methods on the full out x in updates


def shapes(hidden: int = 4096) -> list[tuple[str, int, int]]:
    """(module, out_features, in_features) of Llama-2-7B's adapted linear layers; a smaller
    ``hidden`` keeps Llama-2's ratio intermediate / hidden = 11008 / 4096."""
    intermediate = round(hidden * 11008 / 4096)
    return [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden, hidden),
            ("self_attn.v_proj", hidden, hidden), ("mlp.up_proj", intermediate, hidden),
            ("mlp.down_proj", hidden, intermediate)]


def generate(root: Path, num_adapters: int, layers: int, rank: int, hidden: int = 4096) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    dirs = []
    for j in range(num_adapters):
        gen = torch.Generator().manual_seed(j)
        sd = {}
        for layer in range(layers):
            for mod, out_f, in_f in shapes(hidden):
                prefix = f"base_model.model.model.layers.{layer}.{mod}"
                sd[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
                sd[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
        d = root / f"adapter_{j}"
        d.mkdir(parents=True)
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
               "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.05, "bias": "none", "use_rslora": False,
               "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "fan_in_fan_out": False}
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        dirs.append(d)
    return dirs


def run_floor(dirs: list[Path], out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sds = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    merged = {k: torch.cat([sd[k] for sd in sds], dim=0 if ".lora_A." in k else 1) for k in sds[0]}
    del sds
    out.mkdir()
    save_file(merged, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def child(job: str, dirs: list[Path], out: Path, rank: int) -> None:
    """Run one job in this (fresh) process and print its wall time and peak RSS as JSON."""
    import torch  # imported before the clock starts: every job pays it alike

    torch.set_num_threads(torch.get_num_threads())
    from poc_lora.merge import merge_adapters

    t0 = time.perf_counter()
    if job == "import":
        pass  # the baseline every job pays: Python + torch + poc_lora
    elif job == "floor":
        run_floor(dirs, out)
    else:
        merge_adapters(dirs, out, method=job, rank=rank if job in ("svd", *DENSE_JOBS) else None)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"wall_s": wall, "peak_rss": rss}))


def _run_child(*args: str) -> str:
    # Linux keeps a process's peak RSS across exec, so a child spawned by a big parent would
    # report the parent's peak: the parent stays small (no torch) and generates in a child too.
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{args[:2]} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def measure(job: str, dirs: list[Path], out: Path, rank: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    stdout = _run_child("--_child", job, "--_out", str(out), "--rank", str(rank), *map(str, dirs))
    stats = json.loads(stdout.strip().splitlines()[-1])
    out_file = out / "adapter_model.safetensors"
    stats["out_size"] = out_file.stat().st_size if out_file.exists() else 0
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of each adapter, and K of svd and the baselines")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (Llama-2-7B: 4096; smaller for a quick check)")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated jobs among {', '.join(JOBS)}")
    p.add_argument("--repeats", type=int, default=2, help="runs per job; the fastest counts (shared machines)")
    p.add_argument("--workdir", default=None, help="where to generate (default: a temporary directory)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("dirs", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child == "generate":
        generate(Path(args._out), args.num_adapters, args.layers, args.rank, args.hidden)
        return 0
    if args._child:
        child(args._child, [Path(d) for d in args.dirs], Path(args._out), args.rank)
        return 0

    root = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        _run_child("--_child", "generate", "--_out", str(root / "inputs"), "--num-adapters", str(args.num_adapters),
                   "--layers", str(args.layers), "--rank", str(args.rank), "--hidden", str(args.hidden))
        dirs = sorted((root / "inputs").iterdir())
        in_size = (dirs[0] / "adapter_model.safetensors").stat().st_size
        print(f"generated {len(dirs)} adapters of {in_size / 2**20:.0f} MiB ({args.layers} layers, r={args.rank}) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
        unknown = sorted(set(jobs) - set(JOBS))
        if unknown:
            raise SystemExit(f"unknown job(s) {unknown}; choose among {', '.join(JOBS)}")
        jobs = [j for j in JOBS if j in {"import", "floor", "poc", *jobs}]  # poc and the floor are the references
        results = {}
        for job in jobs:
            repeats = args.repeats if job in ("floor", "poc") else 1
            runs = [measure(job, dirs, root / f"out_{job}", args.rank) for _ in range(repeats)]
            results[job] = min(runs, key=lambda r: r["wall_s"])
            results[job]["peak_rss"] = max(r["peak_rss"] for r in runs)
            print(f"  {job}: " + ", ".join(f"{r['wall_s']:.1f} s" for r in runs), flush=True)
        out_size = results["poc"]["out_size"]
        floor = results["floor"]["wall_s"]
        rows = [[job, f"{r['wall_s']:.1f}", f"{r['wall_s'] / floor:.2f}", f"{r['peak_rss'] / 2**20:.0f}",
                 f"{r['peak_rss'] / out_size:.0%}", f"{r['out_size'] / 2**20:.0f}" if r["out_size"] else "-"]
                for job, r in results.items()]
        from poc_lora.report import markdown_table

        print(markdown_table(["job", "wall s", "x floor", "peak RSS MiB", "RSS / poc output", "output MiB"], rows))
        verdict = {True: "PASS", False: "FAIL"}
        checks = [f"poc wall <= 1.2x floor: {verdict[results['poc']['wall_s'] <= 1.2 * floor]}",
                  f"poc peak RSS <= 25% of output: {verdict[results['poc']['peak_rss'] <= 0.25 * out_size]}"]
        if "svd" in results:
            checks.append(f"svd < 60 s: {verdict[results['svd']['wall_s'] < 60]}")
        # streaming bound of the full-update methods: the poc merge's peak (same reading and writing)
        # plus M + 10 full updates of the largest module (see the module docstring)
        biggest = max(out_f * in_f for _, out_f, in_f in shapes(args.hidden)) * 4  # float32 bytes
        bound = results["poc"]["peak_rss"] + (len(dirs) + 10) * biggest
        for job in DENSE_JOBS:
            if job in results:
                checks.append(f"{job} peak RSS <= poc's + (M + 10) full updates ({bound / 2**20:.0f} MiB): "
                              f"{verdict[results[job]['peak_rss'] <= bound]}")
        print("targets: " + "; ".join(checks))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
