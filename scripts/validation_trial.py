#!/usr/bin/env python
"""Learning curve of one adapter on a validation split: choose settings without the test split.

Trains one adapter with a training config plus ``--key value`` overrides (saving a checkpoint
every ``--every`` steps), then scores the base model and every checkpoint (``--mode`` rank or
choice; choice also reports acc_norm) on a *validation* set, never on a test file:

* real records (``data_path`` an LLM-Adapters ``dataset/`` directory): the seeded
  ``validation_split`` carved out of the training files (``--validation_split 100`` holds 100
  records per suite out of training; see docs/training.md);
* synthetic suites: the same kind generated with another seed (``--val_seed``, default 777).

Refused: a ``data_path`` that is a test file (named ``test.json``), a hub split named ``test``,
real data without ``validation_split``, and a validation seed equal to the synthetic test seed.
Writes ``learning_curve.md``, ``learning_curve.json`` (accuracy % per suite and the average,
per step) and ``learning_curve.png`` (the curves) into ``--output``.

This is how the settings of ``configs/train/smollm2_cpu.yaml`` were chosen (docs/training.md,
"Choosing the settings").

Usage:
    python scripts/validation_trial.py --config configs/train/smollm2_cpu.yaml \
        --output results/validation/lr2e-3 --every 50 --max_steps 200 --learning_rate 2e-3
    python scripts/validation_trial.py --config configs/train/smollm2_commonsense_cpu.yaml \
        --data_path LLM-Adapters/dataset --validation_split 100 --mode choice \
        --output results/validation/commonsense --every 50 --max_steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from eval_harness import evaluate
from eval_harness.suites import SUITES
from poc_lora.config import CHOICE_FORMATS, TrainConfig, load_config
from poc_lora.data.instructions import SYNTHETIC_KINDS, resolve_data_path, synthetic_test_dir, validation_data_dir
from poc_lora.pipeline_report import chance_levels
from poc_lora.errors import ConfigError, PocLoraError
from poc_lora.outputs import atomic_write_text, write_json
from poc_lora.report import markdown_table, plot_lines
from poc_lora.runtime import configure_threads
from poc_lora.train import train_adapter


def _checkpoints(adapter_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in adapter_dir.glob("checkpoint-*") if p.is_dir()]
    return sorted(found)


def _validation_set(cfg: TrainConfig, args: argparse.Namespace) -> tuple[Path, int | None, str]:
    """The validation directory, the per-suite limit and a description; refuses any test file."""
    data = cfg.data
    if Path(str(data.data_path)).name == "test.json" or data.dataset_split == "test":
        raise ConfigError(f"data_path {data.data_path} (split {data.dataset_split}) is a test split; choose "
                          "settings on a validation split of the training data, never on test data")
    if data.data_path in SYNTHETIC_KINDS:
        if args.val_seed == data.synthetic_seed:
            raise ConfigError(f"--val_seed {args.val_seed} equals synthetic_seed: that is the test split")
        n = args.val_per_suite or 16
        val_args = dataclasses.replace(data, synthetic_seed=args.val_seed, synthetic_test_per_suite=n)
        resolve_data_path(val_args)  # writes the validation suites on demand
        return synthetic_test_dir(val_args), n, f"seed {args.val_seed}, {n} questions per suite"
    if data.validation_split is None:
        raise ConfigError(f"data_path {data.data_path!r}: give --validation_split N (records held out per suite, "
                          "never trained on) to score real data; synthetic kinds use --val_seed")
    split = f"{data.validation_split:g}"
    return (validation_data_dir(data), args.val_per_suite,
            f"validation_split {split} per suite (seed {data.val_split_seed})"
            + (f", first {args.val_per_suite} per suite" if args.val_per_suite else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="training YAML (synthetic data_path, or a dataset/ directory)")
    ap.add_argument("--output", "-o", required=True, help="where the adapter and the curve go")
    ap.add_argument("--val_seed", type=int, default=777, help="synthetic data: generator seed of the validation set")
    ap.add_argument("--val_per_suite", type=int, default=None,
                    help="validation questions per suite (synthetic default 16; real data default: the whole split)")
    ap.add_argument("--mode", choices=["rank", "choice"], default="rank", help="scoring mode (eval_harness)")
    ap.add_argument("--choice_format", choices=CHOICE_FORMATS, default="lm-eval", help="choice mode's requests")
    ap.add_argument("--every", type=int, default=50, help="checkpoint (and score) every N steps")
    ap.add_argument("--batch_size", type=int, default=8, help="evaluation prompts per forward pass")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as poc-lora)")
    args, overrides = ap.parse_known_args(argv)
    configure_threads(args.threads)
    out = Path(args.output)
    cfg = load_config(args.config, [*overrides, "--output_dir", str(out / "adapter"), "--save_strategy", "steps",
                                    "--save_steps", str(args.every), "--save_total_limit", "1000"])
    val_dir, limit, what = _validation_set(cfg, args)
    adapter = train_adapter(cfg)
    steps = _checkpoints(adapter)
    result = evaluate(str(cfg.model.model_name_or_path), [str(p) for _, p in steps], data_dir=val_dir,
                      output=out / "eval", tasks="available", mode=args.mode, limit=limit,
                      batch_size=args.batch_size, include_base=True, choice_format=args.choice_format,
                      ensemble=False)  # checkpoints of one adapter, not an ensemble
    names = [SUITES[s].column for s in result.tasks]
    rows = []
    for key, model in result.models.items():
        step = 0 if model.kind == "base" else next(n for n, p in steps if str(p) == model.adapter)
        rows.append({"step": step, "examples": step * cfg.training.per_device_train_batch_size
                     * cfg.training.gradient_accumulation_steps,
                     **{SUITES[s].column: 100 * r.accuracy for s, r in model.suites.items()},
                     "Ave.": 100 * model.average,
                     **({"acc_norm Ave.": 100 * model.average_norm} if model.average_norm is not None else {})})
    rows.sort(key=lambda r: r["step"])
    chance = {SUITES[s].column: c for s, c in chance_levels(val_dir, result.tasks, limit).items()}
    chance_row = {"step": "chance", "examples": "", **chance, "Ave.": sum(chance.values()) / len(chance)}
    if args.mode == "choice":
        chance_row["acc_norm Ave."] = chance_row["Ave."]
    columns = ["step", "examples", *names, "Ave.", *(["acc_norm Ave."] if args.mode == "choice" else [])]
    overrides_text = " ".join(overrides) or "(none)"
    md = "\n".join([
        f"# Validation learning curve ({args.mode} mode, accuracy %)", "",
        f"Config: `{args.config}` with overrides `{overrides_text}`; base `{cfg.model.model_name_or_path}`; "
        f"data `{cfg.data.data_path}`; validation: {what} (`{val_dir}`), never a test file. "
        "Step 0 is the base model.", "",
        markdown_table(columns, [chance_row, *rows]), "",
    ])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "learning_curve.md", md)
    write_json(out / "learning_curve.json", {"config": args.config, "overrides": overrides, "mode": args.mode,
                                             "validation_dir": str(val_dir), "validation": what,
                                             "val_seed": args.val_seed, "chance": chance, "rows": rows})
    curve_columns = [*names, "Ave.", *(["acc_norm Ave."] if args.mode == "choice" else [])]
    plot_lines({f"{cfg.model.model_name_or_path}, {args.mode} mode": {
                    c: ([r["examples"] for r in rows], [r[c] for r in rows]) for c in curve_columns}},
               out / "learning_curve.png", xlabel="training examples (0 = base model)",
               ylabel="validation accuracy (%)", title=f"{what}; chance {chance_row['Ave.']:.1f} % on average")
    print(md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PocLoraError as exc:
        sys.exit(f"error: {exc}")
