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
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from eval_harness.data import load_suite
from eval_harness.results import EvalResult
from eval_harness.runner import evaluate
from eval_harness.scoring import candidate_labels
from eval_harness.suites import AVERAGE_COLUMN, SUITES

from .cards import add_evaluation_cards
from .config import TRAIN_SECTIONS, KeyParser, _RaisingParser, load_config, read_yaml, section_class
from .data.instructions import synthetic_test_dir, validation_data_dir
from .data.synthetic import SYNTHETIC_DATA
from .ensemble import train_ensemble
from .errors import AdapterError, ConfigError, OutputError
from .merge import merge_adapters
from .mfnn.experiments import run_figure1
from .models import TINY_MODEL_ID
from .outputs import atomic_write_text, write_json
from .report import accuracy_percentages, comparison_rows, markdown_table, plot_grouped_bars
from .stages import changed_settings, clear_stage, is_current, stage_hash, write_stage
from .runtime import release_memory
from .merge.methods import get_method, method_names, resolve_parameters
from .merge.serving import parse_serve_rank

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


# The pipeline command's keys: its own sections (the eval keys it uses), then every training key.
PIPELINE_SECTIONS = (("pipeline", None),
                     ("merge", ("methods", "rank", "seed", "density", "majority_sign_method", "exact_svd",
                               "serve_rank")),
                     ("eval", ("data_dir", "tasks", "mode", "choice_format", "limit", "batch_size", "num_beams",
                               "include_base", "batch_models")))
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
    parser = parser if parser is not None else _RaisingParser(prog="poc-lora pipeline", add_help=False,
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


@dataclass
class PipelineReport:
    """What :func:`run_pipeline` returns; ``to_dict()`` is ``report.json`` (``from_dict``/``load``
    read it back, including reports written by earlier releases). Accuracies are in %."""

    config: dict[str, Any]  # PipelineConfig.to_dict()
    columns: list[str]  # suite columns + the average
    table: list[dict[str, Any]]  # the paper's rows: Base model, LoRA (best), LoRA (ave.), PoC merge, variants
    adapters: list[dict[str, Any]]  # one row per adapter
    merge_spread: dict[str, float | None]  # per merge method, the adapters' mean pairwise relative distance
    what: str  # what was run, e.g. "synthetic suites, tiny model, rank-mode scoring"
    chance: dict[str, float]  # uniform guess per column
    eval_summary: str  # the evaluation's summary.json
    seconds: dict[str, float]  # wall time per stage
    files: dict[str, str]  # report_md, report_png, results_csv
    # The same rows in the other scorings: "<mode>" for each further eval mode, "<mode> acc_norm"
    # for choice mode's length-normalised accuracy (absent in reports of earlier releases).
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline report") -> "PipelineReport":
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default_factory is dataclasses.MISSING]
        if missing:
            raise OutputError(f"{where}: not a pipeline report (missing {', '.join(missing)})")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PipelineReport":
        """Read a ``report.json``; raises :class:`OutputError` naming the file if it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read the pipeline report {path}: {exc}") from None
        if not isinstance(data, dict):
            raise OutputError(f"{path}: not a pipeline report")
        return cls.from_dict(data, str(path))


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


def _adapter_rank(adapter: Path) -> int:
    path = adapter / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot read the LoRA rank 'r' from {path}: {exc}") from None


def _label(method: str, merged: Path) -> str:
    """The report label of the merge in ``merged`` (the method registry's), with the rank of the
    adapter written there and the parameters its ``merge_report.json`` records."""
    try:
        params = json.loads((merged / "merge_report.json").read_text()).get("params") or {}
    except (OSError, ValueError):
        params = {}
    return get_method(method).row_label(_adapter_rank(merged), **params)


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
                 overwrite=True, **common)
        for p, _ in stale:
            write_stage(out / p.name, "eval", settings[p])
    else:
        logger.info("evaluation: all %d models up to date", len(models))
    collected = {**shared, "models": {str(p): stage_hash(out / p.name) for p, _ in models}}
    if not stale and is_current(out, collected) and (out / "summary.json").is_file():
        return EvalResult.load(out / "summary.json")
    # The base model (when asked for) is evaluated here, once: its results are keyed by the
    # evaluation settings alone, so the runner's own per-pair check decides whether it is current.
    result = evaluate(base_model, adapters, list(merges.values()), include_base=cfg.eval.include_base or None,
                      overwrite=False, **common)
    write_stage(out, "eval", collected, files=["summary.json", "results.md", "results.csv"])
    return result


# Above this mean pairwise relative distance the adapters' updates are closer to orthogonal than
# to equal; when such a merge underperforms, that is the first thing to look at.
FAR_APART_SPREAD = 0.5


def _spread_line(spreads: dict[str, Any]) -> str:
    """The adapters' spread from the merge report, with what it means for the merge."""
    spread = spreads.get("poc", next(iter(spreads.values()), None)) if spreads else None
    if spread is None:
        return ""
    line = f"Spread of the adapters (mean pairwise relative distance of their ΔW; 0 = identical): {spread:.3f}."
    if spread >= FAR_APART_SPREAD:
        line += (" The adapters are far apart: if the merge falls short of the single adapters, this is"
                 " the likely cause (they did not land in one basin: the paper's λ = 0 / one-epoch"
                 " failure mode). More training, a higher temperature, or a base model that already"
                 " solves more of the task bring them together.")
    return line


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


def chance_levels(data_dir: str | os.PathLike, suites: Sequence[str], limit: int | None) -> dict[str, float]:
    """Per suite, the accuracy in % of a uniform guess among each question's options (the
    labels the rank scorer chooses from), averaged over the evaluated questions."""
    chance = {}
    for name in suites:
        records = load_suite(data_dir, name, limit)
        chance[name] = 100 * sum(1 / len(candidate_labels(name, r["instruction"])) for r in records) / len(records)
    return chance


def _rows(evaluation: EvalResult, merges: dict[str, Path], adapters: list[Path], norm: bool = False
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The paper's rows (Base model, LoRA (best), LoRA (ave.), merges) and one row per adapter,
    in %, from one evaluation (``norm``: choice mode's acc_norm instead of the accuracy)."""
    suites = evaluation.tasks
    columns = [SUITES[s].column for s in suites] + [AVERAGE_COLUMN]
    by_path = {Path(m.adapter).resolve(): key for key, m in evaluation.models.items() if m.adapter}
    acc = {key: accuracy_percentages({SUITES[s].column: (m.suites[s].acc_norm if norm else m.suites[s].accuracy)
                                      for s in suites}, m.average_norm if norm else m.average, AVERAGE_COLUMN)
           for key, m in evaluation.models.items()}
    # the paper's merge and its variants first, the baselines (soup, ties, dare_*) under them
    ordered = sorted(merges.items(), key=lambda kv: get_method(kv[0]).title != "PoC merge")
    merge_keys = {by_path[p.resolve()]: _label(meth, p) for meth, p in ordered}
    singles = {by_path[a.resolve()] for a in adapters}
    base = [k for k, m in evaluation.models.items() if m.kind == "base"]
    base_rows = [{"Method": "Base model", **acc[k], "Model": k} for k in base]
    acc = {k: v for k, v in acc.items() if k in singles or k in merge_keys}
    rows = base_rows + comparison_rows(acc, columns, merge_keys, AVERAGE_COLUMN)
    return rows, [{"Method": f"LoRA {k}", **acc[k], "Model": k} for k in sorted(singles)]


def _other_tables(evaluations: dict[str, EvalResult], merges: dict[str, Path], adapters: list[Path]
                  ) -> dict[str, list[dict[str, Any]]]:
    """The report's further tables: choice mode's acc_norm, and each further mode's accuracy."""
    tables = {}
    for k, (mode, evaluation) in enumerate(evaluations.items()):
        if k:
            tables[mode] = _rows(evaluation, merges, adapters)[0]
        if mode == "choice":
            tables[f"{mode} acc_norm"] = _rows(evaluation, merges, adapters, norm=True)[0]
    return tables


def _table_title(name: str) -> str:
    """``"rank"`` -> "Scored in rank mode"; ``"choice acc_norm"`` -> "... choice mode, acc_norm ..."."""
    mode, _, metric = name.partition(" ")
    return f"Scored in {mode} mode" + (", acc_norm (lm-evaluation-harness's length-normalised accuracy)"
                                       if metric else "")


def _report(cfg: PipelineConfig, out: Path, evaluations: dict[str, EvalResult], merges: dict[str, Path],
            adapters: list[Path], timing: dict[str, float]) -> "PipelineReport":
    """report.md / report.json / report.png from the evaluations' per-model accuracies (the first
    mode's table first; the other modes' and choice mode's acc_norm below it)."""

    evaluation = next(iter(evaluations.values()))
    suites = evaluation.tasks
    columns = [SUITES[s].column for s in suites] + [AVERAGE_COLUMN]
    what = _what_was_run(cfg, out, evaluation)
    chance = chance_levels(evaluation.data_dir, suites, cfg.eval.limit)
    chance_row = {**{SUITES[s].column: chance[s] for s in suites}, AVERAGE_COLUMN: sum(chance.values()) / len(suites)}
    rows, per_adapter = _rows(evaluation, merges, adapters)
    tables = _other_tables(evaluations, merges, adapters)
    spreads = {}
    for meth, p in merges.items():
        rep = json.loads((p / "merge_report.json").read_text())
        spreads[meth] = rep.get("overall", {}).get("spread")
    table_cols = ["Method", *columns]
    md = [
        f"# poc-lora pipeline report: {what}",
        "",
        f"{len(adapters)} adapters (seeds seed+j), merged with {', '.join(cfg.merge.methods)}; "
        f"evaluation mode `{evaluation.mode}` on {len(suites)} suites "
        f"({'first ' + str(cfg.eval.limit) if cfg.eval.limit else 'all'} examples each). Accuracy in %; "
        f"chance is a uniform guess among each question's options.",
        "",
        markdown_table(table_cols, [*rows, {"Method": "Chance", **chance_row}]),
        "",
        *[line for name, table in tables.items()
          for line in (f"## {_table_title(name)}", "", markdown_table(table_cols, table), "")],
        "## Every adapter",
        "",
        markdown_table(table_cols, per_adapter),
        "",
        _spread_line(spreads),
        "",
        f"Wall time: {', '.join(f'{k} {v:.1f} s' for k, v in timing.items())}.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    series = {r["Method"]: [r[c] for c in columns] for r in rows}
    png = plot_grouped_bars(columns, series, out / "report.png", ylabel="accuracy (%)",
                            title=f"Single adapters vs. their merge ({what})",
                            reference=[chance_row[c] for c in columns], reference_label="chance")
    report = PipelineReport(
        config=cfg.to_dict(),
        columns=columns,
        table=rows,
        adapters=per_adapter,
        merge_spread=spreads,
        what=what,
        chance=chance_row,
        eval_summary=evaluation.files["summary"],
        seconds=timing,
        files={"report_md": str(out / "report.md"), "report_png": str(png),
               "results_csv": evaluation.files["results_csv"]},
        tables=tables,
    )
    write_json(out / "report.json", report.to_dict())
    return report


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
    if is_current(out, report_settings) and (out / "report.json").is_file() and not overwrite:
        logger.info("stage 4/4: report up to date (%s)", out / "report.md")
        return PipelineReport.load(out / "report.json")
    logger.info("stage 4/4: writing the report")
    report = _report(cfg, out, evaluations, merges, adapters, timing)

    add_evaluation_cards(evaluation, report.columns, report.table, {s: SUITES[s].column for s in SUITES})
    write_stage(out, "report", report_settings, files=["report.md", "report.png", "report.json"])
    return report


def _print_report(report: PipelineReport, title: str) -> None:
    print(f"\n## {title}\n")
    print(markdown_table(["Method", *report.columns], report.table))


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
