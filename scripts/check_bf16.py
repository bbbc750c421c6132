#!/usr/bin/env python
"""What bf16 costs in accuracy: the same adapter trained in fp32 and with bf16 autocast, and the
same model scored in fp32 and in bf16.

For a training config it trains one adapter twice from the same seed (``--bf16 false`` and
``--bf16 true``; the LoRA weights and the optimizer state stay fp32 in both), logging the
training loss at every step, then scores the base and both adapters in rank mode, together in
one pass as the pipeline does, with the base loaded in float32 and in bfloat16 (the pipeline's
evaluation precision for bf16 runs).
Prints and writes (``--output``: ``bf16_check.json`` and ``bf16_check.md``):

* the largest relative gap between the two loss curves, step by step and over a
  ``--window``-step moving average (bf16 rounding makes single steps noisy; the smoothed gap
  is what a training curve shows);
* the fraction of (model, example) pairs whose rank-mode prediction is the same in both
  precisions, and the fp32-trained adapter's two accuracies.

Usage:
    python scripts/check_bf16.py --config configs/train/smollm2_cpu.yaml --output results/bf16/smollm2 \
        --max_steps 40 --limit 24
    python scripts/check_bf16.py --config configs/train/tiny_cpu.yaml --output results/bf16/tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from eval_harness import evaluate
from poc_lora.config import load_config
from poc_lora.data.instructions import synthetic_test_dir
from poc_lora.errors import PocLoraError
from poc_lora.outputs import atomic_write_text, write_json
from poc_lora.report import markdown_table
from poc_lora.runtime import configure_threads, native_bf16
from poc_lora.train import train_adapter


def loss_curve(adapter: Path, max_steps: int) -> list[float]:
    """The per-step training losses of a run saved at ``max_steps`` (its trainer_state.json)."""
    state = json.loads((adapter / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _smooth(values: Sequence[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def max_relative_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """max_i |a_i - b_i| / |a_i| over two curves of the same length."""
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def _predictions(eval_dir: Path, models: Sequence[str]) -> dict[tuple[str, str, int], str]:
    out = {}
    for model in models:
        for path in sorted((eval_dir / model).glob("*/predictions.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                out[(model, path.parent.name, row["index"])] = row["prediction"]
    return out


def check_bf16(config: str, output: Path, overrides: Sequence[str] = (), limit: int | None = 24,
               window: int = 5, batch_size: int = 8) -> dict[str, Any]:
    """Train fp32 and bf16 adapters from one seed and compare curves and rank-mode predictions.

    Returns ``{"loss_fp32", "loss_bf16", "max_step_gap", "max_smoothed_gap", "agreement",
    "accuracy_fp32_eval", "accuracy_bf16_eval", "examples", "native_bf16"}`` (gaps relative,
    agreement and accuracies as fractions). Raises :class:`PocLoraError` for bad input.
    """
    adapters = {}
    for name, bf16 in (("fp32", "false"), ("bf16", "true")):
        cfg = load_config(config, [*overrides, "--output_dir", str(output / f"adapter_{name}"), "--bf16", bf16,
                                   "--logging_steps", "1", "--save_strategy", "steps", "--save_total_limit", "1",
                                   "--overwrite_output_dir", "true", "--eval_strategy", "no"])
        cfg.training.save_steps = cfg.training.max_steps  # the final checkpoint holds the whole log
        adapters[name] = (train_adapter(cfg), cfg)
    steps = adapters["fp32"][1].training.max_steps
    curves = {name: loss_curve(path, steps) for name, (path, _) in adapters.items()}
    cfg = adapters["fp32"][1]
    data_dir = synthetic_test_dir(cfg.data)
    if data_dir is None:
        raise PocLoraError(f"{config}: the check scores the synthetic test sets; use a synthetic data_path")
    evals = {}
    for dtype in ("float32", "bfloat16"):
        # the base and both adapters, scored together as the pipeline does (bf16 LoRA products
        # on a bf16 base: eval_harness.multimodel)
        result = evaluate(cfg.model.model_name_or_path, adapters=[adapters["fp32"][0], adapters["bf16"][0]],
                          data_dir=data_dir, output=output / f"eval_{dtype}", mode="rank", limit=limit,
                          batch_size=batch_size, dtype=dtype, include_base=True, overwrite=True,
                          template=cfg.data.prompt_template, ensemble=False)
        evals[dtype] = (result, _predictions(output / f"eval_{dtype}", list(result.models)))
    p32, p16 = evals["float32"][1], evals["bfloat16"][1]
    same = sum(p32[k] == p16.get(k) for k in p32)
    model = adapters["fp32"][0].name
    return {
        "config": config, "overrides": list(overrides), "native_bf16": native_bf16("cpu"),
        "loss_fp32": curves["fp32"], "loss_bf16": curves["bf16"],
        "max_step_gap": max_relative_gap(curves["fp32"], curves["bf16"]),
        "max_smoothed_gap": max_relative_gap(_smooth(curves["fp32"], window), _smooth(curves["bf16"], window)),
        "window": window, "examples": len(p32), "agreement": same / len(p32),
        "accuracy_fp32_eval": evals["float32"][0].models[model].average,
        "accuracy_bf16_eval": evals["bfloat16"][0].models[model].average,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="training YAML (a synthetic data_path)")
    ap.add_argument("--output", "-o", required=True)
    ap.add_argument("--limit", type=int, default=24, help="evaluation examples per suite")
    ap.add_argument("--window", type=int, default=5, help="moving-average window of the smoothed loss gap")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as poc-lora)")
    args, overrides = ap.parse_known_args(argv)
    configure_threads(args.threads)
    out = Path(args.output)
    try:
        res = check_bf16(args.config, out, overrides, args.limit, args.window)
    except PocLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = [[k, f"{res[k]:.4f}" if isinstance(res[k], float) else str(res[k])]
            for k in ("native_bf16", "max_step_gap", "max_smoothed_gap", "examples", "agreement",
                      "accuracy_fp32_eval", "accuracy_bf16_eval")]
    table = markdown_table(["what", "value"], rows)
    write_json(out / "bf16_check.json", res)
    atomic_write_text(out / "bf16_check.md", f"# bf16 vs fp32: {args.config} {' '.join(overrides)}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
