#!/usr/bin/env python
"""Benchmark every registered merge method against the I/O floor on Llama-2-7B-shaped adapters.

Generates M adapters (default 8) shaped like the paper's Llama-2-7B LoRA (32 layers, r=32 on
q, k, v, up, down; fp32 safetensors, about 214 MiB each) in a temporary directory, then runs
each job in a fresh subprocess and reports wall time, CPU time and peak RSS (the child's own
``ru_maxrss``):

* floor: ``load_file`` every input, ``torch.cat`` per key, ``save_file`` (the least a
  merge must do, with everything in memory);
* every method in the registry (poc, svd, prune, soup, ties, dare_linear, dare_ties,
  model_stock, ...): ``merge_adapters(method=...)`` on the whole model, rank 32 for the methods
  that take ``--rank``, density 0.5 for ties/dare_* (their default path: blocked, randomized SVD);
* import: a process that only imports torch and poc_lora (the RSS every job starts from);
* svd_check: on a few full-size modules of layer 0 (TIES on q_proj, up_proj and down_proj,
  DARE linear on up_proj), the squared error of the randomized rank-32 factorisation against the
  Eckart-Young optimum from ``torch.linalg.svdvals`` (target <= 1.01x).

Targets: poc wall <= 1.2x floor, poc peak RSS <= 25% of the output file; svd < 60 s; every
method <= 15 min; the full-update methods' (ties, dare_*) peak RSS <= poc's peak + 4 full
updates of the largest module (what the blocked path holds: the merged update, the range
finder's and the error measurement's working set, allocator slack; it does not grow with M or
the layers), the others' <= 2x poc's peak.

Example:
    python scripts/bench_merge.py                         # full size (~1.7 GB of inputs)
    python scripts/bench_merge.py --layers 2 --jobs ties,dare_ties --json results/bench_merge_2l.json
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

from poc_lora.merge.methods import get_method, method_names  # the registry: no torch at import

METHODS = method_names()
JOBS = ("import", "floor", *METHODS, "svd_check")
DENSE_JOBS = tuple(m for m in METHODS if get_method(m).dense)  # methods on the full out x in updates
TIME_LIMIT_S = 15 * 60
RATIO_LIMIT = 1.01


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

    t0, c0 = time.perf_counter(), time.process_time()
    extra = {}
    if job == "import":
        pass  # the baseline every job pays: Python + torch + poc_lora
    elif job == "floor":
        run_floor(dirs, out)
    elif job == "svd_check":
        extra["modules"] = svd_check(dirs, rank)
    else:
        merge_adapters(dirs, out, method=job, rank=rank if get_method(job).needs_rank else None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss": rss, **extra}))


def svd_check(dirs: list[Path], rank: int) -> list[dict]:
    """Randomized vs exact rank-``rank`` factorisation of full-size merged updates of layer 0."""
    import torch

    from poc_lora.merge.compute import ModuleMerger
    from poc_lora.merge.methods._lowrank import randomized_factorise
    from poc_lora.merge.methods._task_ops import _blocked_update
    from poc_lora.merge.plan import make_plan

    plan = make_plan(dirs, dirs[0].parent.parent / "svd_check_out", "ties", None, rank, 0, None, overwrite=True,
                     allow_different_base=False)
    rows = []
    try:
        merger = ModuleMerger(plan)
        cases = [("self_attn.q_proj", "trim", True), ("mlp.up_proj", "trim", True), ("mlp.down_proj", "trim", True),
                 ("mlp.up_proj", "dare", False)]
        for mod, sparsify, elect in cases:
            stack = merger.read_stack(f"model.layers.0.{mod}")
            merged = _blocked_update(stack, torch.Generator().manual_seed(0), sparsify, 0.5, elect, "total")
            t0 = time.perf_counter()
            low = randomized_factorise(merged, rank)
            t_rand = time.perf_counter() - t0
            t0 = time.perf_counter()
            s = torch.linalg.svdvals(merged).double()
            t_exact = time.perf_counter() - t0
            best = float(s[rank:].square().sum())
            rows.append({"module": f"layers.0.{mod}", "method": "ties" if elect else "dare_linear",
                         "shape": list(merged.shape), "ratio": low.err_sq / best, "rel_error": (best / float(
                             s.square().sum())) ** 0.5, "randomized_s": t_rand, "svdvals_s": t_exact})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        plan.close()
    return rows


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
    p.add_argument("--json", default=None, help="also write the results and verdicts to this JSON file")
    p.add_argument("--inputs", default=None, help="directory of the generated adapters: generated there if it holds "
                                                  "none, else reused (several bench runs on the same inputs)")
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
        inputs = Path(args.inputs) if args.inputs else root / "inputs"
        if not (inputs / "adapter_0" / "adapter_model.safetensors").is_file():  # generated once, then reused
            shutil.rmtree(inputs, ignore_errors=True)
            _run_child("--_child", "generate", "--_out", str(inputs), "--num-adapters", str(args.num_adapters),
                       "--layers", str(args.layers), "--rank", str(args.rank), "--hidden", str(args.hidden))
        dirs = sorted(inputs.iterdir())
        in_size = (dirs[0] / "adapter_model.safetensors").stat().st_size
        print(f"inputs: {len(dirs)} adapters of {in_size / 2**20:.0f} MiB ({args.layers} layers, r={args.rank}) "
              f"in {inputs} ({time.perf_counter() - t0:.0f} s)", flush=True)
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
            if args.json:  # as it goes: a long run stopped early keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"results": results}, indent=2))
        out_size = results["poc"]["out_size"]
        floor = results["floor"]["wall_s"]
        merges = {job: r for job, r in results.items() if job in METHODS}
        rows = [[job, f"{r['wall_s']:.1f}", f"{r.get('cpu_s', 0):.1f}", f"{r['wall_s'] / floor:.2f}",
                 f"{r['peak_rss'] / 2**20:.0f}", f"{r['peak_rss'] / out_size:.0%}",
                 f"{r['out_size'] / 2**20:.0f}" if r["out_size"] else "-"]
                for job, r in results.items() if job != "svd_check"]
        from poc_lora.report import markdown_table

        print(markdown_table(["job", "wall s", "CPU s", "x floor", "peak RSS MiB", "RSS / poc output", "output MiB"],
                             rows))
        verdict = {True: "PASS", False: "FAIL"}
        checks = {"poc wall <= 1.2x floor": results["poc"]["wall_s"] <= 1.2 * floor,
                  "poc peak RSS <= 25% of output": results["poc"]["peak_rss"] <= 0.25 * out_size}
        if "svd" in results:
            checks["svd < 60 s"] = results["svd"]["wall_s"] < 60
        # the full-update methods hold one module's merged update and the factorisation's working
        # set at a time: poc's peak (same reading and writing) plus 4 full updates of the largest module
        biggest = max(out_f * in_f for _, out_f, in_f in shapes(args.hidden)) * 4  # float32 bytes
        dense_bound = results["poc"]["peak_rss"] + 4 * biggest
        for job, r in merges.items():
            checks[f"{job} <= {TIME_LIMIT_S / 60:.0f} min"] = r["wall_s"] <= TIME_LIMIT_S
            if job in DENSE_JOBS:
                checks[f"{job} peak RSS <= poc's + 4 full updates ({dense_bound / 2**20:.0f} MiB)"] = \
                    r["peak_rss"] <= dense_bound
            elif job != "poc":
                checks[f"{job} peak RSS <= 2x poc's"] = r["peak_rss"] <= 2 * results["poc"]["peak_rss"]
        if "svd_check" in results:
            mods = results["svd_check"]["modules"]
            print(markdown_table(["module", "method", "shape", "randomized / optimal squared error",
                                  "optimal relative error", "randomized s", "svdvals s"],
                                 [[m["module"], m["method"], " x ".join(map(str, m["shape"])), f"{m['ratio']:.5f}",
                                   f"{m['rel_error']:.4f}", f"{m['randomized_s']:.1f}", f"{m['svdvals_s']:.1f}"]
                                  for m in mods]))
            checks[f"randomized squared error <= {RATIO_LIMIT}x optimal"] = all(m["ratio"] <= RATIO_LIMIT for m in mods)
        print("targets: " + "; ".join(f"{k}: {verdict[v]}" for k, v in checks.items()))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                                if not k.startswith("_") and k != "dirs"},
                                                   "results": results, "checks": checks}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
