#!/usr/bin/env python
"""The ensemble's whole job, the old way and the fast way, on identical work: ratios from one run.

Runs ``poc-lora pipeline`` twice in fresh processes on the same recipe (M adapters, the same
examples per member, evaluation of base + M adapters + every merge on the same records):

* old: ``poc-lora --threads 1 pipeline ... --strategy sequential --data_order per_member
  --bf16 false --batch_models false`` (members one after another in fp32 on one thread, the LM
  head over every position, the models evaluated one by one);
* new: ``poc-lora pipeline ... --strategy batched --data_order shared`` (all members in one
  pass over one base, the frozen trunk once per micro-batch, bf16 where the CPU has it, all
  cores, logits only at supervised positions, the adapters and merges evaluated in one pass that
  shares the layers below the first adapted one).

Prints and writes (``--output``: ``bench_ensemble.json`` / ``.md``) wall time and peak RSS of
each run and their ratio, the per-part ratios (training per member-step, evaluation per model,
from the pipelines' own stage timings), the padding waste of the training batches (tokens
computed / real tokens), and the training step's achieved fraction of this CPU's bf16 matmul
peak (measured in the same run with one large matmul on all threads).

Run it alone on idle cores: another busy process changes both sides' times, not equally.

Usage:
    python scripts/bench_ensemble.py --model smollm2            # ~15 min on 2 idle cores
    python scripts/bench_ensemble.py --model tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": ROOT / "configs" / "pipeline" / "tiny_cpu.yaml",
           "smollm2": ROOT / "configs" / "pipeline" / "smollm2_cpu.yaml"}
OLD = ["--threads", "1"], ["--strategy", "sequential", "--data_order", "per_member", "--bf16", "false",
                           "--batch_models", "false"]
NEW = [], ["--strategy", "batched", "--data_order", "shared"]


def run_pipeline(name: str, config: Path, out: Path, global_args: list[str], keys: list[str],
                 common: list[str]) -> dict[str, Any]:
    """One pipeline run in a fresh process: its wall time, peak RSS, CPU time and page faults (its own,
    via wait4) and stage times."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "poc_lora.cli", *global_args, "pipeline", "--config", str(config),
           "--output", str(out), *keys, *common]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.parent / f"{name}.log", "w"))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[{name}] failed; see {out.parent / f'{name}.log'}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20, "seconds": report["seconds"],
            "cpu_user_s": usage.ru_utime, "cpu_system_s": usage.ru_stime, "minor_page_faults": usage.ru_minflt,
            "command": " ".join(cmd[2:])}


def batch_stats(config: Path, overrides: list[str]) -> dict[str, float]:
    """Over the training batches of member 0 (random order, the configured micro-batch, padded to
    the longest example and the collator's multiple): ``padding_waste`` = tokens computed / real
    tokens, ``tokens_per_row`` = padded length per row, ``supervised_per_row`` = labelled tokens
    per row (where the LM head runs)."""
    import torch

    from poc_lora.pipeline import PipelineConfig
    from poc_lora.data.instructions import build_datasets
    from poc_lora.data.templates import get_template
    from poc_lora.models import load_tokenizer
    from poc_lora.train import load_checked_records

    cfg = PipelineConfig.from_yaml(config, overrides).train_config("/tmp/unused")
    tok = load_tokenizer(cfg.model.model_name_or_path)
    ds, _ = build_datasets(load_checked_records(cfg), tok, get_template(cfg.data.prompt_template), cfg.data)
    lengths = torch.tensor([len(x) for x in ds["input_ids"]])
    supervised = sum(sum(1 for t in labels[1:] if t != -100) for labels in ds["labels"])
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
    b, m = cfg.training.per_device_train_batch_size, cfg.data.pad_to_multiple_of or 1
    computed = 0
    for i in range(0, len(order), b):
        batch = lengths[order[i:i + b]]
        computed += len(batch) * (-(-int(batch.max()) // m) * m)
    return {"padding_waste": computed / int(lengths.sum()), "tokens_per_row": computed / len(lengths),
            "supervised_per_row": supervised / len(lengths)}


def bf16_peak_gflops(threads: int) -> float:
    """This CPU's bf16 matmul throughput (GFLOP/s) on ``threads`` threads: one 2048^3 product."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def step_gflop(config: Path, overrides: list[str], num_adapters: int, stats: dict[str, float]) -> float:
    """Matmul work of one batched training step (GFLOP), from the model's shapes and the batches'
    measured lengths: the frozen trunk forward once; the adapted layers forward and backward for
    every member (the base weights are frozen: the backward computes input gradients only, as
    much work as the forward; the LoRA factors are negligible); the LM head forward and backward
    at the supervised positions only. Attention scores are left out (small at these lengths)."""
    from transformers import AutoConfig

    from poc_lora.models import resolve_model_path
    from poc_lora.pipeline import PipelineConfig

    cfg = PipelineConfig.from_yaml(config, overrides).train_config("/tmp/unused")
    mc = AutoConfig.from_pretrained(resolve_model_path(cfg.model.model_name_or_path, cfg.model.dtype))
    d, f, layers = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    kv = d * mc.num_key_value_heads // mc.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o, k, v, gate/up/down weights
    adapted = cfg.lora.lora_layers_to_transform or list(range(layers))
    first = min(adapted)
    rows = cfg.training.per_device_train_batch_size
    tokens = rows * stats["tokens_per_row"]
    trunk = 2 * per_layer * first * tokens
    top = num_adapters * 2 * 2 * per_layer * (layers - first) * tokens
    head = num_adapters * 2 * 2 * mc.vocab_size * d * rows * stats["supervised_per_row"]
    return (trunk + top + head) / 1e9


def threads_table(config: Path, repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds per training forward + backward (the recipe's micro-batch, bf16 autocast where
    native) with 1 thread and with every available core, on idle cores and with two busy
    processes beside it (each spinning one core), under passive OpenMP waiting: the measurement
    behind ``configure_threads``' default."""
    import torch

    from poc_lora.pipeline import PipelineConfig
    from poc_lora.runtime import native_bf16
    from poc_lora.train import attach_lora, load_base_model

    cfg = PipelineConfig.from_yaml(config).train_config("/tmp/unused")
    model = attach_lora(load_base_model(cfg), cfg)
    b, t = cfg.training.per_device_train_batch_size, cfg.data.cutoff_len
    ids = torch.randint(3, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - start

    rows = []
    cores = len(os.sched_getaffinity(0))
    for load in ("idle", "2 busy processes"):
        burners = [] if load == "idle" else [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            for n in sorted({1, cores}):
                torch.set_num_threads(n)
                step()  # warm-up
                rows.append({"load": load, "threads": n, "seconds": min(step() for _ in range(repeats))})
        finally:
            for p in burners:
                p.kill()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="smollm2")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per member (both runs)")
    ap.add_argument("--limit", type=int, default=8, help="evaluation examples per suite (both runs)")
    ap.add_argument("--output", default=None, help="default: results/bench/ensemble_<model>")
    ap.add_argument("--threads_table", action="store_true",
                    help="only the thread-count table (1 thread vs all cores, idle and busy)")
    args = ap.parse_args(argv)
    config = CONFIGS[args.model]
    out = Path(args.output or f"results/bench/ensemble_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads_table:
        from poc_lora.runtime import configure_threads

        configure_threads()  # passive waiting, set before torch starts its thread pool
        rows = threads_table(config)
        lines = [f"# training forward + backward, {args.model} recipe micro-batch", "",
                 "| load | threads | seconds |", "|---|---|---|"]
        lines += [f"| {r['load']} | {r['threads']} | {r['seconds']:.2f} |" for r in rows]
        (out / "threads.json").write_text(json.dumps(rows, indent=2))
        (out / "threads.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    common = ["--max_steps", str(args.steps), "--eval.limit", str(args.limit), "--save_strategy", "no",
              "--disable_tqdm", "true"]
    runs = {name: run_pipeline(name, config, out / name, g, k, common)
            for name, (g, k) in (("old", OLD), ("new", NEW))}
    old, new = runs["old"], runs["new"]
    report = json.loads((out / "new" / "report.json").read_text())
    m = len(report["adapters"])
    n_models = len(json.loads((out / "new" / "eval" / "summary.json").read_text())["models"])
    threads = len(os.sched_getaffinity(0))
    stats = batch_stats(config, common)
    gflop = step_gflop(config, common, m, stats)
    step_s = new["seconds"]["training"] / args.steps
    peak = bf16_peak_gflops(threads)
    res = {
        "model": args.model, "config": str(config.relative_to(ROOT)), "steps": args.steps, "limit": args.limit,
        "num_adapters": m, "models_evaluated": n_models, "threads_new": threads, "runs": runs,
        "end_to_end_speedup": old["wall_s"] / new["wall_s"],
        "training_per_member_step": {k: r["seconds"]["training"] / (m * args.steps) for k, r in runs.items()},
        "evaluation_per_model": {k: r["seconds"]["evaluation"] / n_models for k, r in runs.items()},
        "padding_waste": stats["padding_waste"],
        "bf16_peak_gflops": peak, "step_gflop": gflop, "achieved_fraction_of_peak": gflop / step_s / peak,
    }
    res["training_speedup"] = res["training_per_member_step"]["old"] / res["training_per_member_step"]["new"]
    res["evaluation_speedup"] = res["evaluation_per_model"]["old"] / res["evaluation_per_model"]["new"]
    rows = [
        ("end to end (wall)", f"{old['wall_s']:.1f} s", f"{new['wall_s']:.1f} s", f"{res['end_to_end_speedup']:.2f}x"),
        ("peak RSS", f"{old['peak_rss_gb']:.2f} GB", f"{new['peak_rss_gb']:.2f} GB", ""),
        ("training per member-step", f"{res['training_per_member_step']['old']:.2f} s",
         f"{res['training_per_member_step']['new']:.2f} s", f"{res['training_speedup']:.2f}x"),
        ("evaluation per model", f"{res['evaluation_per_model']['old']:.2f} s",
         f"{res['evaluation_per_model']['new']:.2f} s", f"{res['evaluation_speedup']:.2f}x"),
    ]
    lines = [f"# bench_ensemble: {args.model}, M={m}, {args.steps} steps per member, {args.limit} examples per "
             f"suite, {n_models} models evaluated", "", "| work | old | new | speed-up |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", f"padding waste (tokens computed / real tokens): {res['padding_waste']:.2f}",
              f"training step: {gflop:.1f} GFLOP in {step_s:.2f} s = {gflop / step_s:.0f} GFLOP/s, "
              f"{100 * res['achieved_fraction_of_peak']:.0f}% of this CPU's bf16 matmul peak "
              f"({peak:.0f} GFLOP/s on {threads} threads)"]
    text = "\n".join(lines)
    (out / "bench_ensemble.json").write_text(json.dumps(res, indent=2))
    (out / "bench_ensemble.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
