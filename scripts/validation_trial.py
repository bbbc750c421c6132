#!/usr/bin/env python
"""Learning curve of one adapter on a validation split: choose settings without the test split.

Trains one adapter with a training config plus ``--key value`` overrides (saving a checkpoint
every ``--every`` steps), then scores the base model and every checkpoint in rank mode on a
*validation* set: the same synthetic kind generated with another seed (``--val_seed``, default
777), never the test split that pipelines report. Writes ``learning_curve.md`` and
``learning_curve.json`` (accuracy % per suite and the average, per step) into ``--output``.

This is how the settings of ``configs/train/smollm2_cpu.yaml`` were chosen (docs/training.md,
"Choosing the settings"). Only synthetic data kinds have a validation seed; for real data, hold
out a validation file yourself.

Usage:
    python scripts/validation_trial.py --config configs/train/smollm2_cpu.yaml \
        --output results/validation/lr2e-3 --every 50 --max_steps 200 --learning_rate 2e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from eval_harness import evaluate
from eval_harness.suites import SUITES
from poc_lora.config import load_config
from poc_lora.data.synthetic import num_options
from poc_lora.data.instructions import SYNTHETIC_KINDS, resolve_data_path, synthetic_test_dir
from poc_lora.errors import ConfigError, PocLoraError
from poc_lora.outputs import atomic_write_text, write_json
from poc_lora.report import markdown_table
from poc_lora.runtime import configure_threads
from poc_lora.train import train_adapter


def _checkpoints(adapter_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in adapter_dir.glob("checkpoint-*") if p.is_dir()]
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="training YAML (a synthetic data_path)")
    ap.add_argument("--output", "-o", required=True, help="where the adapter and the curve go")
    ap.add_argument("--val_seed", type=int, default=777, help="generator seed of the validation set")
    ap.add_argument("--val_per_suite", type=int, default=16, help="validation questions per suite")
    ap.add_argument("--every", type=int, default=50, help="checkpoint (and score) every N steps")
    ap.add_argument("--batch_size", type=int, default=8, help="evaluation prompts per forward pass")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as poc-lora)")
    args, overrides = ap.parse_known_args(argv)
    configure_threads(args.threads)
    out = Path(args.output)
    cfg = load_config(args.config, [*overrides, "--output_dir", str(out / "adapter"), "--save_strategy", "steps",
                                    "--save_steps", str(args.every), "--save_total_limit", "1000"])
    if cfg.data.data_path not in SYNTHETIC_KINDS:
        raise ConfigError(f"{args.config}: data_path {cfg.data.data_path!r} has no validation seed; "
                          f"use one of {sorted(SYNTHETIC_KINDS)}")
    if args.val_seed == cfg.data.synthetic_seed:
        raise ConfigError(f"--val_seed {args.val_seed} equals synthetic_seed: that is the test split")
    val_args = dataclasses.replace(cfg.data, synthetic_seed=args.val_seed, synthetic_test_per_suite=args.val_per_suite)
    resolve_data_path(val_args)  # writes the validation suites on demand
    val_dir = synthetic_test_dir(val_args)

    adapter = train_adapter(cfg)
    steps = _checkpoints(adapter)
    result = evaluate(str(cfg.model.model_name_or_path), [str(p) for _, p in steps], data_dir=val_dir,
                      output=out / "eval", mode="rank", limit=args.val_per_suite, batch_size=args.batch_size,
                      include_base=True)
    names = [SUITES[s].column for s in result.tasks]
    rows = []
    for key, model in result.models.items():
        step = 0 if model.kind == "base" else next(n for n, p in steps if str(p) == model.adapter)
        rows.append({"step": step, "examples": step * cfg.training.per_device_train_batch_size
                     * cfg.training.gradient_accumulation_steps,
                     **{SUITES[s].column: 100 * r.accuracy for s, r in model.suites.items()},
                     "Ave.": 100 * model.average})
    rows.sort(key=lambda r: r["step"])
    chance = {SUITES[s].column: 100 / num_options(SUITES[s]) for s in result.tasks}
    chance_row = {"step": "chance", "examples": "", **chance, "Ave.": sum(chance.values()) / len(chance)}
    columns = ["step", "examples", *names, "Ave."]
    overrides_text = " ".join(overrides) or "(none)"
    md = "\n".join([
        "# Validation learning curve (rank mode, accuracy %)", "",
        f"Config: `{args.config}` with overrides `{overrides_text}`; base `{cfg.model.model_name_or_path}`; "
        f"data `{cfg.data.data_path}` (training seed {cfg.data.synthetic_seed}); validation: seed "
        f"{args.val_seed}, {args.val_per_suite} questions per suite (`{val_dir}`), never the test split. "
        "Step 0 is the base model.", "",
        markdown_table(columns, [chance_row, *rows]), "",
    ])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "learning_curve.md", md)
    write_json(out / "learning_curve.json", {"config": args.config, "overrides": overrides,
                                             "validation_dir": str(val_dir), "val_seed": args.val_seed,
                                             "chance": chance, "rows": rows})
    print(md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PocLoraError as exc:
        sys.exit(f"error: {exc}")
