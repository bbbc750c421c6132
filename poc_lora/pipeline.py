"""The main job in one call: train M adapters -> PoC merge (+ variants) -> evaluate -> report.

Stages and where they write (under ``output_dir``)::

    adapters/adapter_<j>/    ensemble training (poc_lora.ensemble), one PEFT adapter per seed
    merges/<method>/         merges of all M adapters (poc_lora.merge) + merge_report.json
    eval/                    every adapter and every merge on the suites (eval_harness)
    report.md, report.json, report.png
                             the paper's table (LoRA (best), LoRA (ave.), PoC merge, variants)

Every stage is keyed by the settings it depends on (:mod:`poc_lora.stages`: a
``.poc_lora_stage.json`` marker, written last, holds a hash of those settings and of the stages
it reads). A rerun skips a stage whose settings are unchanged and recomputes one whose
settings changed, and with it every stage downstream: an adapter trained with other settings
is trained again, a merge whose method, rank, seed or adapters changed is merged again, a model
whose evaluation settings (tasks, mode, limit, ...) or weights changed is evaluated again, and
the report is rebuilt from the files when anything it shows changed. Labels come from what is on
disk (the rank in "PoC merge, SVD rank K" is the written adapter's rank). ``overwrite=True``
recomputes merges, evaluation and report (trained adapters are kept unless their settings changed).

``poc-lora demo`` (:func:`run_demo`) is the README's first command: the tiny pipeline
(``configs/pipeline/tiny_cpu.yaml``) plus the MFNN Figure 1 experiment, offline, on a CPU.

Example:
    >>> from poc_lora.pipeline import run_pipeline
    >>> result = run_pipeline("configs/pipeline/tiny_cpu.yaml", output="results/pipeline")  # doctest: +SKIP
    >>> result.table[-1]["Method"]  # doctest: +SKIP
    'PoC merge'
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from eval_harness.results import EvalResult
from eval_harness.runner import evaluate
from eval_harness.suites import SUITES

from .cards import add_evaluation_cards
from .config import TRAIN_SECTIONS, load_config, section_class
from .keyparser import KeyParser, RaisingArgumentParser, read_yaml
from .data.instructions import synthetic_test_dir, validation_data_dir
from .data.synthetic import SYNTHETIC_DATA
from .ensemble import train_ensemble
from .errors import ConfigError, OutputError
from .merge import merge_adapters
from .mfnn.experiments import run_figure1
from .models import TINY_MODEL_ID
from .pipeline_report import PipelineReport, _adapter_rank, write_report
from .report import markdown_table
from .stages import changed_settings, clear_stage, is_current, stage_hash, write_stage
from .runtime import release_memory
from .merge.methods import get_method, method_names, resolve_parameters
from .merge.serving import parse_serve_rank

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the report shows; a change makes every earlier report stale (2: calibration, ensemble, reliability.png).
REPORT_LAYOUT = 2


# The pipeline command's keys: its own sections (the eval keys it uses), then every training key.
PIPELINE_SECTIONS = (("pipeline", None),
                     ("merge", ("methods", "rank", "seed", "density", "majority_sign_method", "exact_svd",
                               "serve_rank")),
                     ("eval", ("data_dir", "tasks", "mode", "choice_format", "limit", "batch_size", "num_beams",
                               "include_base", "batch_models", "ensemble")))
# Keys of the flat pipeline YAMLs of earlier releases -> their key now.
LEGACY_KEYS = {
    "merge_methods": "merge.methods", "merge_rank": "merge.rank", "merge_seed": "merge.seed",
    "eval_data_dir": "eval.data_dir", "eval_tasks": "eval.tasks", "eval_mode": "eval.mode",
    "eval_limit": "eval.limit", "eval_batch_size": "eval.batch_size", "eval_num_beams": "eval.num_beams",
    "output_dir": "pipeline.output_dir",
}


def check_overrides(argv: Sequence[str]) -> None:
    """Refuse ``--train_overrides`` (earlier releases) with what to write instead."""
    if any(t.split("=", 1)[0] == "--train_overrides" for t in argv):
        raise ConfigError("--train_overrides is gone: give the training keys directly, "
                          "e.g. --max_steps 12 --save_steps 6 (or --training.max_steps 12)")


def pipeline_key_parser(parser: argparse.ArgumentParser | None = None) -> Any:
    """The keys of ``poc-lora pipeline`` (pipeline, merge, eval, then the training sections) on
    ``parser`` (default: one whose errors are ConfigErrors)."""
    parser = parser if parser is not None else RaisingArgumentParser(prog="poc-lora pipeline", add_help=False,
                                                              allow_abbrev=False)
    sections = [(name, section_class(name), only) for name, only in PIPELINE_SECTIONS]
    return KeyParser(parser, sections + [(name, section_class(name), None) for name in TRAIN_SECTIONS],
                     legacy=LEGACY_KEYS)


def _migrate(raw: dict[str, Any], where: str, keys: Any) -> dict[str, Any]:
    """A pipeline mapping in the old flat layout (``eval_mode``, ``train_overrides``, ...) in the
    current one, with a warning naming what to write instead."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "train_overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: train_overrides must be a mapping of training keys, got {value!r}; "
                                  "better: write the training keys at the top level (max_steps: 12) or under "
                                  "their section (training: {max_steps: 12})")
            if value:
                logger.warning("%s: train_overrides is deprecated: write its keys (%s) at the top level or "
                               "under their section (training: {...})", where, ", ".join(value))
            for k, v in value.items():  # training keys: a name the pipeline sections share is the training one
                train = [sec for sec in keys.names.get(str(k), []) if sec in TRAIN_SECTIONS]
                out[f"{train[0]}.{k}" if len(keys.names.get(str(k), [])) > 1 and train else k] = v
        elif key in LEGACY_KEYS:
            section, name = LEGACY_KEYS[key].split(".")
            logger.warning("%s: key %s is deprecated: write %s.%s (%s: {%s: ...})", where, key, section, name,
                           section, name)
            out[LEGACY_KEYS[key]] = value
        else:
            out[key] = value
    return out


@dataclass
class PipelineConfig:
    """A pipeline configuration: the pipeline, merge and eval sections, and the training keys it
    sets over its ``train_config`` (``{section.key: value}``, typed).

    A pipeline YAML holds keys like every config (flat where unique, dotted, or nested under their
    section); relative paths in it are relative to the file itself. The flat layout of earlier
    releases (``eval_mode``, ``merge_methods``, ``train_overrides: {...}``) still loads, with a
    warning naming each key's new spelling.
    """

    pipeline: Any  # config.PipelineArguments
    merge: Any  # config.MergeArguments
    eval: Any  # config.EvalArguments
    train_updates: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = (),
                  updates: dict[str, Any] | None = None) -> "PipelineConfig":
        """Read a pipeline YAML; then ``updates`` (``{key: value}``, typed) and ``overrides``
        (``--key value`` tokens), both in the keys of ``poc-lora pipeline``.

        Raises :class:`ConfigError` naming the file and key for an unknown, ambiguous or
        invalid key, or a missing ``train_config``.
        """
        path = Path(path)
        keys = pipeline_key_parser()
        flat = keys.flatten(_migrate(read_yaml(path), str(path), keys), str(path))
        flat.update(keys.flatten(_migrate(dict(updates or {}), "the pipeline updates", keys), "the pipeline updates"))
        check_overrides(overrides)
        try:
            _, sections = keys.parse(list(overrides), flat)
            groups = {name: section_class(name)(**sections[name]) for name, _ in PIPELINE_SECTIONS}
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not groups["pipeline"].train_config:
            raise ConfigError(f"{path}: missing required key 'train_config' (pipeline.train_config)")
        cfg = cls(groups["pipeline"], groups["merge"], groups["eval"],
                  {f"{s}.{k}": v for s in TRAIN_SECTIONS for k, v in sections[s].items()})
        for obj, key in ((cfg.pipeline, "train_config"), (cfg.eval, "data_dir")):  # relative to the YAML file
            value = getattr(obj, key)
            if value and not Path(value).is_absolute() and not Path(value).exists():
                setattr(obj, key, str(path.parent / value))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a merge method the pipeline does not know, or merge
        parameters out of range (before any training)."""
        bad = [m for m in self.merge.methods if m not in method_names()]
        if bad or not self.merge.methods:
            raise ConfigError(f"merge.methods (earlier: merge_methods): unknown method {bad[:1]}; "
                              f"valid: {', '.join(method_names())}")
        for method in self.merge.methods:
            self.merge_parameters(method)
        parse_serve_rank(self.merge.serve_rank)

    def merge_parameters(self, method: str) -> dict[str, Any]:
        """The parameters ``method`` runs with: the merge section's density and sign election
        where the method takes them (the others ignore them), else the defaults."""
        spec = get_method(method)
        given = {"density": self.merge.density, "majority_sign_method": self.merge.majority_sign_method,
                 "exact_svd": self.merge.exact_svd}
        return resolve_parameters(method, **{k: v for k, v in given.items() if k in spec.parameters})

    def train_config(self, output_dir: str | os.PathLike) -> Any:
        """The :class:`~poc_lora.config.TrainConfig` of the ensemble: ``pipeline.train_config``
        with this config's training keys, writing into ``output_dir``."""
        return load_config(self.pipeline.train_config,
                           updates={**self.train_updates, "training.output_dir": str(output_dir)})

    def to_dict(self) -> dict[str, Any]:
        """The settings in the flat layout ``report.json`` and the stage hashes have always used
        (so results written by earlier releases stay current)."""
        p, m, e = self.pipeline, self.merge, self.eval
        return {
            "train_config": p.train_config, "num_adapters": p.num_adapters, "strategy": p.strategy,
            # only when not the default, so reports written before the key existed stay current
            **({"data_order": p.data_order} if p.data_order != "per_member" else {}),
            "train_overrides": {k.split(".", 1)[1]: v for k, v in self.train_updates.items()},
            "merge_methods": list(m.methods), "merge_rank": m.rank, "merge_seed": m.seed,
            # the newer merge keys only when set: the settings (and stage hashes) of earlier runs stay as they were
            **{f"merge_{k}": getattr(m, k) for k in ("density", "majority_sign_method", "exact_svd", "serve_rank")
               if getattr(m, k) is not None},
            "eval_data_dir": e.data_dir, "eval_tasks": e.tasks, "eval_mode": e.mode, "eval_limit": e.limit,
            "eval_batch_size": e.batch_size, "eval_num_beams": e.num_beams, "include_base": e.include_base,
            "output_dir": p.output_dir,
            # only when not the default, so results written before the key existed stay current
            **({"eval_choice_format": e.choice_format} if "choice" in e.modes else {}),
        }


def _eval_data_dir(cfg: PipelineConfig, train_cfg: Any) -> Path:
    """eval.data_dir; else the validation split of the training data (validation_split); else the
    synthetic suites' test sets (written on demand)."""
    if cfg.eval.data_dir:
        return Path(cfg.eval.data_dir)
    test_dir = validation_data_dir(train_cfg.data) or synthetic_test_dir(train_cfg.data)
    if test_dir is None:
        raise ConfigError("eval.data_dir is required when the training data are neither the synthetic suites "
                          "nor split with validation_split")
    return test_dir


def _merge_settings(cfg: PipelineConfig, method: str, adapters: list[Path]) -> dict[str, Any]:
    spec = get_method(method)
    rank = None
    if spec.needs_rank:
        rank = cfg.merge.rank if cfg.merge.rank is not None else _adapter_rank(adapters[0])
    settings = {"method": method, "rank": rank, "seed": cfg.merge.seed if spec.uses_seed else None,
                "adapters": [str(a) for a in adapters], "adapter_stages": [stage_hash(a) for a in adapters]}
    # only where they apply: the markers of merges written before these keys existed stay current
    if spec.parameters:
        settings["params"] = cfg.merge_parameters(method)
    if cfg.merge.serve_rank is not None:
        settings["serve_rank"] = cfg.merge.serve_rank
    return settings


def _merge_stage(cfg: PipelineConfig, adapters: list[Path], out: Path, overwrite: bool) -> dict[str, Path]:
    merges: dict[str, Path] = {}
    for i, method in enumerate(cfg.merge.methods, 1):
        target = out / method
        settings = _merge_settings(cfg, method, adapters)
        if is_current(target, settings) and not overwrite:
            logger.info("merge %d/%d (%s): up to date in %s", i, len(cfg.merge.methods), method, target)
        else:
            why = "--overwrite" if overwrite else ", ".join(changed_settings(target, settings)[:6])
            logger.info("merge %d/%d (%s) into %s (%s)", i, len(cfg.merge.methods), method, target, why)
            clear_stage(target)
            report = merge_adapters(adapters, target, method=method, rank=settings["rank"], seed=cfg.merge.seed,
                                    overwrite=True, serve_rank=cfg.merge.serve_rank,
                                    **settings.get("params", {}))
            write_stage(target, "merge", settings)
            logger.info("%s", report.summary())
        merges[method] = target
    return merges


def eval_dtype(train_cfg: Any) -> str:
    """The dtype the pipeline evaluates in: bfloat16 when the adapters were trained with bf16
    autocast (``bf16: auto`` on a CPU or GPU with native bf16), else the base model's dtype."""
    return "bfloat16" if train_cfg.training.bf16 else train_cfg.model.dtype


def _eval_stage(cfg: PipelineConfig, mode: str, base_model: str, adapters: list[Path], merges: dict[str, Path],
                data_dir: Path, out: Path, overwrite: bool, dtype: str = "auto",
                template: str | None = None) -> EvalResult:
    """Evaluate every model whose weights or evaluation settings changed, then collect all results.

    ``template``: the prompt template the adapters were trained with; the base model is prompted
    with it too (adapters carry their own record of it), so the Base row differs from the
    adapters' rows by the weights alone.

    Each model's results under ``out/<model>/`` carry a stage marker (evaluation settings + the
    model's own stage hash); stale models are evaluated again in one call (base loaded once), and
    a second call that finds every pair finished builds the summary and tables.
    """

    common = dict(data_dir=data_dir, output=out, tasks=cfg.eval.tasks, mode=mode, limit=cfg.eval.limit,
                  batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams, choice_format=cfg.eval.choice_format,
                  dtype=dtype, batch_models=cfg.eval.batch_models, template=template)
    shared = {"base_model": base_model, "dtype": dtype, "data_dir": str(data_dir), "tasks": cfg.eval.tasks,
              "mode": mode, "limit": cfg.eval.limit, "num_beams": cfg.eval.num_beams if mode == "generate" else None,
              "include_base": cfg.eval.include_base, "template": template}
    if mode == "choice":
        shared["choice_format"] = cfg.eval.choice_format
    models = [(a, "adapter") for a in adapters] + [(m, "merged") for m in merges.values()]
    settings = {p: {**shared, "model": str(p), "model_stage": stage_hash(p)} for p, _ in models}
    stale = [(p, kind) for p, kind in models if overwrite or not is_current(out / p.name, settings[p])]
    if stale:
        logger.info("evaluating %d of %d models (%s); the others are up to date", len(stale), len(models),
                    ", ".join(p.name for p, _ in stale))
        # the base model (when asked for) rides along: in one many-models pass it is one more
        # member above the shared trunk, where evaluating it alone afterwards costs a whole pass
        evaluate(base_model, [p for p, k in stale if k == "adapter"], [p for p, k in stale if k == "merged"],
                 include_base=bool(cfg.eval.include_base and cfg.eval.batch_models and mode != "generate"),
                 overwrite=True, ensemble=False, **common)  # the ensemble of all adapters: below
        for p, _ in stale:
            write_stage(out / p.name, "eval", settings[p])
    else:
        logger.info("evaluation: all %d models up to date", len(models))
    collected = {**shared, "models": {str(p): stage_hash(out / p.name) for p, _ in models},
                 **({"ensemble": True} if cfg.eval.ensemble else {})}  # only when on: older results stay current
    if not stale and is_current(out, collected) and (out / "summary.json").is_file():
        return EvalResult.load(out / "summary.json")
    # The base model (when asked for) is evaluated here, once: its results are keyed by the
    # evaluation settings alone, so the runner's own per-pair check decides whether it is current.
    result = evaluate(base_model, adapters, list(merges.values()), include_base=cfg.eval.include_base or None,
                      overwrite=False, ensemble=cfg.eval.ensemble, **common)
    write_stage(out, "eval", collected, files=["summary.json", "results.md", "results.csv"])
    return result


def _what_was_run(cfg: PipelineConfig, out: Path, evaluation: EvalResult) -> str:
    """What the report's numbers are, from the settings actually used, e.g. "synthetic suites,
    tiny model, rank-mode scoring" (the demo) or "data data/dataset, model meta-llama/...,
    generate-mode scoring"."""
    train_cfg = cfg.train_config(out / "adapters")
    synthetic = train_cfg.data.data_path == SYNTHETIC_DATA and not cfg.eval.data_dir
    split = train_cfg.data.validation_split
    model = evaluation.base_model
    data = (f"validation split ({split:g} per suite) of {train_cfg.data.data_path}"
            if split is not None and not cfg.eval.data_dir else f"data {evaluation.data_dir}")
    return ", ".join([
        "synthetic suites" if synthetic else data,
        "tiny model" if model == TINY_MODEL_ID else f"model {model}",
        f"{evaluation.mode}-mode scoring" + (f" (also {', '.join(cfg.eval.modes[1:])})" if cfg.eval.modes[1:] else ""),
    ])


def run_pipeline(
    config: str | os.PathLike | PipelineConfig,
    output: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> PipelineReport | None:
    """Train -> merge -> evaluate -> report, resumably. Returns the :class:`PipelineReport`
    (``report.json``; None on the ranks other than 0 of a parallel run).

    ``overrides`` are ``--key value`` pairs of ``poc-lora pipeline``'s keys. Each stage is
    skipped when its settings are unchanged and recomputed (with what depends on it) when they
    changed (see the module docstring). With ``overwrite`` the merges, evaluations and report are
    recomputed (trained adapters are kept unless their settings changed). Under ``accelerate
    launch`` with ``strategy: parallel`` every rank trains its adapters and only rank 0 continues
    past training.

    Raises :class:`~poc_lora.errors.PocLoraError` subclasses for a bad config, data or output
    (``output`` an existing file, say), before anything is trained.
    """
    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.from_yaml(config, overrides)
    out = Path(output or cfg.pipeline.output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"pipeline output {out} exists and is not a directory")
    timing: dict[str, float] = {}

    t = time.perf_counter()
    train_cfg = cfg.train_config(out / "adapters")
    data_dir = _eval_data_dir(cfg, train_cfg)  # checked before hours of training
    rank = int(os.environ.get("RANK", "0"))  # read first: parallel training hides the launcher's env
    logger.info("stage 1/4: training %d adapters into %s", cfg.pipeline.num_adapters, out / "adapters")
    ens = train_ensemble(train_cfg, cfg.pipeline.num_adapters, strategy=cfg.pipeline.strategy, retrain_stale=True,
                         data_order=cfg.pipeline.data_order)
    if rank != 0:  # the other ranks have trained their adapters; rank 0 merges and evaluates
        return None
    timing["training"] = time.perf_counter() - t
    adapters = [Path(p) for p in ens.adapters]
    release_memory()  # the training's freed activations, before evaluation allocates its own

    t = time.perf_counter()
    logger.info("stage 2/4: merging (%s)", ", ".join(cfg.merge.methods))
    merges = _merge_stage(cfg, adapters, out / "merges", overwrite)
    timing["merging"] = time.perf_counter() - t
    release_memory()

    t = time.perf_counter()
    logger.info("stage 3/4: evaluating %d models", len(adapters) + len(merges))
    # The first mode's results go to eval/ (as with one mode), each further mode's to eval_<mode>/.
    eval_dirs = {mode: out / ("eval" if k == 0 else f"eval_{mode}") for k, mode in enumerate(cfg.eval.modes)}
    evaluations = {mode: _eval_stage(cfg, mode, train_cfg.model.model_name_or_path, adapters, merges, data_dir,
                                     eval_dir, overwrite, dtype=eval_dtype(train_cfg),
                                     template=train_cfg.data.prompt_template)
                   for mode, eval_dir in eval_dirs.items()}
    evaluation = evaluations[cfg.eval.modes[0]]
    timing["evaluation"] = time.perf_counter() - t

    report_settings = {"config": cfg.to_dict(),
                       "models": {str(p): stage_hash(out / "eval" / p.name) for p in [*adapters, *merges.values()]},
                       "merges": {m: stage_hash(p) for m, p in merges.items()}}
    for mode, eval_dir in list(eval_dirs.items())[1:]:
        report_settings[f"models_{mode}"] = {str(p): stage_hash(eval_dir / p.name)
                                             for p in [*adapters, *merges.values()]}
    report_settings["config"].pop("output_dir")
    report_settings["layout"] = REPORT_LAYOUT
    if is_current(out, report_settings) and (out / "report.json").is_file() and not overwrite:
        logger.info("stage 4/4: report up to date (%s)", out / "report.md")
        return PipelineReport.load(out / "report.json")
    logger.info("stage 4/4: writing the report")
    report = write_report(out, evaluations, merges, adapters, timing, config=cfg.to_dict(),
                          what=_what_was_run(cfg, out, evaluation), methods=cfg.merge.methods, limit=cfg.eval.limit)

    add_evaluation_cards(evaluation, report.columns, report.table, {s: SUITES[s].column for s in SUITES})
    write_stage(out, "report", report_settings, files=["report.md", "report.png", "report.json"])
    return report


def _print_report(report: PipelineReport, title: str) -> None:
    print(f"\n## {title}\n")
    print(markdown_table(["Method", *report.columns], report.table))
    if report.calibration:
        print("\n## Calibration (option softmax, mean over suites: accuracy and confidence in %, NLL in nats)\n")
        print(markdown_table(list(report.calibration[0]), report.calibration, floatfmt=".4f"))
    if report.ensemble and report.ensemble["distances"]:
        ens = report.ensemble
        print(f"\n## Distance to the {ens['label']} (members' mean pairwise disagreement "
              f"{100 * ens['disagreement']['average']:.2f} %)\n")
        print(markdown_table(list(ens["distances"][0]), ens["distances"], floatfmt=".4f"))


def main_pipeline(config: str | os.PathLike | PipelineConfig, output: str | None, overrides: Sequence[str] = (),
                  overwrite: bool = False) -> int:
    """``poc-lora pipeline --config CONFIG.yaml [--output DIR] [--overwrite] [--key value ...]``."""
    report = run_pipeline(config, output, overrides, overwrite=overwrite)
    if report:
        _print_report(report, "Pipeline report")
        print(f"\nreport: {report.files['report_md']}  plot: {report.files['report_png']}")
    return 0


# ---------------------------------------------------------------------------- demo
DEMO_CONFIG = REPO_ROOT / "configs" / "pipeline" / "tiny_cpu.yaml"
# --quick: small enough for CI (about a minute on 2 cores), still every stage for real.
QUICK_OVERRIDES = ["--num_adapters", "2", "--eval.limit", "16", "--max_steps", "12", "--save_steps", "6",
                   "--logging_steps", "4"]
# `demo --model NAME`: the pipeline config, where under --output it writes, its --quick overrides.
DEMO_MODELS: dict[str, tuple[Path, str, list[str]]] = {
    "tiny": (DEMO_CONFIG, "pipeline", QUICK_OVERRIDES),
    "smollm2": (REPO_ROOT / "configs" / "pipeline" / "smollm2_cpu.yaml", "smollm2",
                ["--num_adapters", "2", "--eval.limit", "2", "--eval.tasks", "boolq,piqa", "--max_steps", "2",
                 "--save_steps", "2", "--logging_steps", "1", "--cutoff_len", "128"]),
}
# `demo --model smollm2 --data_dir PATH`: real records (an LLM-Adapters dataset/ directory).
COMMONSENSE_DEMO = (REPO_ROOT / "configs" / "pipeline" / "smollm2_commonsense_cpu.yaml", "smollm2_commonsense",
                    ["--num_adapters", "2", "--eval.limit", "2", "--max_steps", "2", "--save_steps", "2",
                     "--logging_steps", "1", "--validation_split", "4"])


def run_demo(output: str | os.PathLike = "results", quick: bool = False, overwrite: bool = False,
             model: str = "tiny", data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The README's first command: the tiny pipeline (M = 4) and MFNN Figure 1 (classification).

    Writes ``<output>/pipeline/`` (adapters, merges, eval, report.md/json/png) and
    ``<output>/mfnn/`` (figure1_classification.csv/png/json). ``quick`` shrinks both for CI.
    ``model="smollm2"`` runs ``configs/pipeline/smollm2_cpu.yaml`` (the real SmolLM2-135M-Instruct)
    into ``<output>/smollm2/`` instead, without the MFNN experiment; with ``data_dir`` (an
    LLM-Adapters ``dataset/`` directory) it runs ``configs/pipeline/smollm2_commonsense_cpu.yaml``
    on those real records (trained on the training files minus a validation split, reported on
    that split) into ``<output>/smollm2_commonsense/``.
    """
    if model not in DEMO_MODELS:
        raise ConfigError(f"unknown demo model {model!r}; valid: {', '.join(DEMO_MODELS)}")
    config, subdir, quick_overrides = DEMO_MODELS[model]
    data_overrides: list[str] = []
    if data_dir is not None:
        if model != "smollm2":
            raise ConfigError("demo --data_dir (real records) needs --model smollm2: the tiny model's word "
                              "vocabulary only covers the synthetic suites")
        if not Path(data_dir).is_dir():
            raise ConfigError(f"demo --data_dir {data_dir} is not a directory; give an LLM-Adapters dataset/ "
                              "directory (<suite>/train.json)")
        config, subdir, quick_overrides = COMMONSENSE_DEMO
        data_overrides = ["--data_path", str(Path(data_dir).resolve())]
    if not config.is_file():
        raise ConfigError(f"the demo needs {config}; run it from a source checkout (pip install -e .)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"demo output {output} exists and is not a directory; give a directory (default results/)")
    t = time.perf_counter()
    report = run_pipeline(config, output / subdir, [*data_overrides, *(quick_overrides if quick else ())],
                          overwrite=overwrite)
    t_pipeline = time.perf_counter() - t
    if model != "tiny":
        return {"pipeline": report, "figure1": None, "seconds": {"pipeline": t_pipeline}}
    t = time.perf_counter()
    figure1 = run_figure1("classification", output=output / "mfnn", quick=quick, overwrite=True)
    t_mfnn = time.perf_counter() - t
    return {"pipeline": report, "figure1": figure1, "seconds": {"pipeline": t_pipeline, "mfnn_figure1": t_mfnn}}


def main_demo(args: argparse.Namespace) -> int:
    """``poc-lora demo [--output results] [--quick] [--overwrite] [--model tiny|smollm2] [--data_dir DIR]``."""
    model = getattr(args, "model", "tiny")
    result = run_demo(args.output, quick=args.quick, overwrite=args.overwrite, model=model,
                      data_dir=getattr(args, "data_dir", None))
    if result["figure1"] is None:
        _print_report(result["pipeline"], f"{model} pipeline: single adapters vs. their PoC merge (accuracy %)")
        print(f"\nreport: {result['pipeline'].files['report_md']}")
        print(f"time: pipeline {result['seconds']['pipeline']:.0f} s")
        return 0
    _print_report(result["pipeline"], "Tiny pipeline: single adapters vs. their PoC merge (accuracy %)")
    fig = result["figure1"]
    md = next(Path(p) for p in fig["files"].values() if str(p).endswith(".md"))
    print("\n" + md.read_text().replace("# Figure 1", "## MFNN Figure 1", 1))
    print("\nfiles:")
    for name, path in {**result["pipeline"].files, **fig.get("files", {})}.items():
        print(f"  {name}: {path}")
    secs = result["seconds"]
    print(f"\ntime: pipeline {secs['pipeline']:.0f} s, MFNN Figure 1 {secs['mfnn_figure1']:.0f} s")
    return 0


__all__ = ["PipelineConfig", "PipelineReport", "main_demo", "main_pipeline", "pipeline_key_parser", "run_demo", "run_pipeline"]
