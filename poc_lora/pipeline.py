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
    >>> result["table"][-1]["Method"]  # doctest: +SKIP
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

from .errors import ConfigError, OutputError
from .merge.methods import get_method, method_names

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PipelineConfig:
    """A pipeline YAML file. Relative paths in it are relative to the file itself."""

    train_config: str  # a training YAML (configs/train/*.yaml)
    num_adapters: int = 4
    strategy: str | None = None  # sequential | parallel (default: by the number of processes)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # key: value, as on the train CLI
    merge_methods: list[str] = field(default_factory=lambda: ["poc"])
    merge_rank: int | None = None  # K for svd / prune (default: the rank of one adapter)
    merge_seed: int = 0
    eval_data_dir: str | None = None  # default: the synthetic test sets when data_path is synthetic
    eval_tasks: str = "all"
    eval_mode: str = "rank"
    eval_limit: int | None = None
    eval_batch_size: int = 16
    eval_num_beams: int = 4
    include_base: bool = False  # also evaluate the plain base model (a "Base model" row)
    output_dir: str = "results/pipeline"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "PipelineConfig":
        """Read a pipeline YAML; ``overrides`` are ``--key value`` pairs of this class's fields."""
        from .config import read_yaml

        path = Path(path)
        raw = read_yaml(path)
        raw.update(_parse_overrides(overrides))
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
        if "train_config" not in raw:
            raise ConfigError(f"{path}: missing required key 'train_config'")
        cfg = cls(**raw)
        for key in ("train_config", "eval_data_dir"):  # relative to the YAML file
            value = getattr(cfg, key)
            if value and not Path(value).is_absolute() and not Path(value).exists():
                setattr(cfg, key, str(path.parent / value))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_adapters < 1:
            raise ConfigError(f"num_adapters must be >= 1, got {self.num_adapters}")
        bad = [m for m in self.merge_methods if m not in method_names()]
        if bad or not self.merge_methods:
            raise ConfigError(f"merge_methods: unknown method {bad[:1]}; valid: {', '.join(method_names())}")
        if self.eval_mode not in ("rank", "generate"):
            raise ConfigError(f"eval_mode must be 'rank' or 'generate', got {self.eval_mode!r}")


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    items = list(overrides)
    while items:
        key = items.pop(0)
        if not key.startswith("--") or not items:
            raise ConfigError(f"overrides must be '--key value' pairs, got {key!r}")
        out[key[2:].replace("-", "_")] = yaml.safe_load(items.pop(0))
    return out


def _train_overrides(cfg: PipelineConfig, output_dir: Path) -> list[str]:
    flat: list[str] = []
    for key, value in cfg.train_overrides.items():
        if isinstance(value, (list, tuple)):  # the train CLI takes lists comma-separated
            value = ",".join(map(str, value))
        flat += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return [*flat, "--output_dir", str(output_dir)]


def _eval_data_dir(cfg: PipelineConfig, train_cfg: Any) -> Path:
    if cfg.eval_data_dir:
        return Path(cfg.eval_data_dir)
    from .data.instructions import synthetic_test_dir

    test_dir = synthetic_test_dir(train_cfg.data)  # writes the synthetic suites if they are not there yet
    if test_dir is None:
        raise ConfigError("eval_data_dir is required when the training data are not the synthetic suites")
    return test_dir


def _merge_settings(cfg: PipelineConfig, method: str, adapters: list[Path]) -> dict[str, Any]:
    from .stages import stage_hash

    spec = get_method(method)
    rank = None
    if spec.needs_rank:
        rank = cfg.merge_rank if cfg.merge_rank is not None else _adapter_rank(adapters[0])
    return {"method": method, "rank": rank, "seed": cfg.merge_seed if spec.uses_seed else None,
            "adapters": [str(a) for a in adapters], "adapter_stages": [stage_hash(a) for a in adapters]}


def _merge_stage(cfg: PipelineConfig, adapters: list[Path], out: Path, overwrite: bool) -> dict[str, Path]:
    from .merge import merge_adapters
    from .stages import changed_settings, clear_stage, is_current, write_stage

    merges: dict[str, Path] = {}
    for i, method in enumerate(cfg.merge_methods, 1):
        target = out / method
        settings = _merge_settings(cfg, method, adapters)
        if is_current(target, settings) and not overwrite:
            logger.info("merge %d/%d (%s): up to date in %s", i, len(cfg.merge_methods), method, target)
        else:
            why = "--overwrite" if overwrite else ", ".join(changed_settings(target, settings)[:6])
            logger.info("merge %d/%d (%s) into %s (%s)", i, len(cfg.merge_methods), method, target, why)
            clear_stage(target)
            report = merge_adapters(adapters, target, method=method, rank=settings["rank"], seed=cfg.merge_seed,
                                    overwrite=True)
            write_stage(target, "merge", settings)
            logger.info("%s", report.summary())
        merges[method] = target
    return merges


def _adapter_rank(adapter: Path) -> int:
    from .errors import AdapterError

    path = adapter / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot read the LoRA rank 'r' from {path}: {exc}") from None


def _label(method: str, merged: Path) -> str:
    """The report label of the merge in ``merged`` (the method registry's), with the rank of the
    adapter written there."""
    return get_method(method).row_label(_adapter_rank(merged))


def _eval_stage(cfg: PipelineConfig, base_model: str, adapters: list[Path], merges: dict[str, Path],
                data_dir: Path, out: Path, overwrite: bool) -> dict[str, Any]:
    """Evaluate every model whose weights or evaluation settings changed, then collect all results.

    Each model's results under ``out/<model>/`` carry a stage marker (evaluation settings + the
    model's own stage hash); stale models are evaluated again in one call (base loaded once), and
    a second call that finds every pair finished builds the summary and tables.
    """
    from eval_harness.runner import evaluate

    from .stages import is_current, stage_hash, write_stage

    common = dict(data_dir=data_dir, output=out, tasks=cfg.eval_tasks, mode=cfg.eval_mode, limit=cfg.eval_limit,
                  batch_size=cfg.eval_batch_size, num_beams=cfg.eval_num_beams)
    shared = {"base_model": base_model, "data_dir": str(data_dir), "tasks": cfg.eval_tasks, "mode": cfg.eval_mode,
              "limit": cfg.eval_limit, "num_beams": cfg.eval_num_beams if cfg.eval_mode == "generate" else None,
              "include_base": cfg.include_base}
    models = [(a, "adapter") for a in adapters] + [(m, "merged") for m in merges.values()]
    settings = {p: {**shared, "model": str(p), "model_stage": stage_hash(p)} for p, _ in models}
    stale = [(p, kind) for p, kind in models if overwrite or not is_current(out / p.name, settings[p])]
    if stale:
        logger.info("evaluating %d of %d models (%s); the others are up to date", len(stale), len(models),
                    ", ".join(p.name for p, _ in stale))
        evaluate(base_model, [p for p, k in stale if k == "adapter"], [p for p, k in stale if k == "merged"],
                 include_base=False, overwrite=True, **common)
        for p, _ in stale:
            write_stage(out / p.name, "eval", settings[p])
    else:
        logger.info("evaluation: all %d models up to date", len(models))
    collected = {**shared, "models": {str(p): stage_hash(out / p.name) for p, _ in models}}
    if not stale and is_current(out, collected) and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    # The base model (when asked for) is evaluated here, once: its results are keyed by the
    # evaluation settings alone, so the runner's own per-pair check decides whether it is current.
    result = evaluate(base_model, adapters, list(merges.values()), include_base=cfg.include_base or None,
                      overwrite=False, **common)
    write_stage(out, "eval", collected)
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


def _what_was_run(cfg: PipelineConfig, out: Path, evaluation: dict[str, Any]) -> str:
    """What the report's numbers are, from the settings actually used, e.g. "synthetic suites,
    tiny model, rank-mode scoring" (the demo) or "data data/dataset, model meta-llama/...,
    generate-mode scoring"."""
    from .config import SYNTHETIC_DATA, load_config
    from .models import TINY_MODEL_ID

    train_cfg = load_config(cfg.train_config, _train_overrides(cfg, out / "adapters"))
    synthetic = train_cfg.data.data_path == SYNTHETIC_DATA and not cfg.eval_data_dir
    model = evaluation["base_model"]
    return ", ".join([
        "synthetic suites" if synthetic else f"data {evaluation['data_dir']}",
        "tiny model" if model == TINY_MODEL_ID else f"model {model}",
        f"{evaluation['mode']}-mode scoring",
    ])


def _chance_levels(data_dir: str | os.PathLike, suites: Sequence[str], limit: int | None) -> dict[str, float]:
    """Per suite, the accuracy in % of a uniform guess among each question's options (the
    labels the rank scorer chooses from), averaged over the evaluated questions."""
    from eval_harness.data import load_suite
    from eval_harness.scoring import candidate_labels

    chance = {}
    for name in suites:
        records = load_suite(data_dir, name, limit)
        chance[name] = 100 * sum(1 / len(candidate_labels(name, r["instruction"])) for r in records) / len(records)
    return chance


def _report(cfg: PipelineConfig, out: Path, evaluation: dict[str, Any], merges: dict[str, Path],
            adapters: list[Path], timing: dict[str, float]) -> dict[str, Any]:
    """report.md / report.json / report.png from the evaluation's per-model accuracies."""
    from eval_harness.suites import AVERAGE_COLUMN, SUITES

    from .outputs import atomic_write_text, write_json
    from .report import accuracy_percentages, comparison_rows, markdown_table, plot_grouped_bars

    suites = evaluation["tasks"]
    columns = [SUITES[s].column for s in suites] + [AVERAGE_COLUMN]
    by_path = {Path(m["adapter"]).resolve(): key for key, m in evaluation["models"].items() if m["adapter"]}
    acc = {key: accuracy_percentages({SUITES[s].column: m["suites"][s]["accuracy"] for s in suites}, m["average"],
                                     AVERAGE_COLUMN)
           for key, m in evaluation["models"].items()}
    what = _what_was_run(cfg, out, evaluation)
    chance = _chance_levels(evaluation["data_dir"], suites, cfg.eval_limit)
    chance_row = {**{SUITES[s].column: chance[s] for s in suites}, AVERAGE_COLUMN: sum(chance.values()) / len(suites)}
    merge_keys = {by_path[p.resolve()]: _label(meth, p) for meth, p in merges.items()}
    singles = {by_path[a.resolve()] for a in adapters}
    base = [k for k, m in evaluation["models"].items() if m["kind"] == "base"]
    base_rows = [{"Method": "Base model", **acc[k], "Model": k} for k in base]
    acc = {k: v for k, v in acc.items() if k in singles or k in merge_keys}
    rows = base_rows + comparison_rows(acc, columns, merge_keys, AVERAGE_COLUMN)
    per_adapter = [{"Method": f"LoRA {k}", **acc[k], "Model": k} for k in sorted(singles)]
    spreads = {}
    for meth, p in merges.items():
        rep = json.loads((p / "merge_report.json").read_text())
        spreads[meth] = rep.get("overall", {}).get("spread")
    table_cols = ["Method", *columns]
    md = [
        f"# poc-lora pipeline report: {what}",
        "",
        f"{len(adapters)} adapters (seeds seed+j), merged with {', '.join(cfg.merge_methods)}; "
        f"evaluation mode `{evaluation['mode']}` on {len(suites)} suites "
        f"({'first ' + str(cfg.eval_limit) if cfg.eval_limit else 'all'} examples each). Accuracy in %; "
        f"chance is a uniform guess among each question's options.",
        "",
        markdown_table(table_cols, [*rows, {"Method": "Chance", **chance_row}]),
        "",
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
    report = {
        "config": dataclasses.asdict(cfg),
        "columns": columns,
        "table": rows,
        "adapters": per_adapter,
        "merge_spread": spreads,
        "what": what,
        "chance": chance_row,
        "eval_summary": evaluation["files"]["summary"],
        "seconds": timing,
        "files": {"report_md": str(out / "report.md"), "report_png": str(png),
                  "results_csv": evaluation["files"]["results_csv"]},
    }
    write_json(out / "report.json", report)
    return report


def run_pipeline(
    config: str | os.PathLike | PipelineConfig,
    output: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train -> merge -> evaluate -> report, resumably. Returns the report dict (``report.json``).

    ``overrides`` are ``--key value`` pairs of :class:`PipelineConfig` fields. Each stage is
    skipped when its settings are unchanged and recomputed (with what depends on it) when they
    changed (see the module docstring). With ``overwrite`` the merges, evaluations and report are
    recomputed (trained adapters are kept unless their settings changed). Under ``accelerate
    launch`` with ``strategy: parallel`` every rank trains its adapters and only rank 0 continues
    past training.

    Raises :class:`~poc_lora.errors.PocLoraError` subclasses for a bad config, data or output
    (``output`` an existing file, say), before anything is trained.
    """
    from .config import load_config
    from .ensemble import train_ensemble
    from .stages import is_current, stage_hash, write_stage

    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.from_yaml(config, overrides)
    out = Path(output or cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"pipeline output {out} exists and is not a directory")
    timing: dict[str, float] = {}

    t = time.perf_counter()
    train_cfg = load_config(cfg.train_config, _train_overrides(cfg, out / "adapters"))
    data_dir = _eval_data_dir(cfg, train_cfg)  # checked before hours of training
    rank = int(os.environ.get("RANK", "0"))  # read first: parallel training hides the launcher's env
    logger.info("stage 1/4: training %d adapters into %s", cfg.num_adapters, out / "adapters")
    ens = train_ensemble(train_cfg, cfg.num_adapters, strategy=cfg.strategy, retrain_stale=True)
    if rank != 0:  # the other ranks have trained their adapters; rank 0 merges and evaluates
        return {}
    timing["training"] = time.perf_counter() - t
    adapters = [Path(p) for p in ens.adapters]

    t = time.perf_counter()
    logger.info("stage 2/4: merging (%s)", ", ".join(cfg.merge_methods))
    merges = _merge_stage(cfg, adapters, out / "merges", overwrite)
    timing["merging"] = time.perf_counter() - t

    t = time.perf_counter()
    logger.info("stage 3/4: evaluating %d models", len(adapters) + len(merges))
    evaluation = _eval_stage(cfg, train_cfg.model.model_name_or_path, adapters, merges, data_dir,
                             out / "eval", overwrite)
    timing["evaluation"] = time.perf_counter() - t

    report_settings = {"config": dataclasses.asdict(cfg),
                       "models": {str(p): stage_hash(out / "eval" / p.name) for p in [*adapters, *merges.values()]},
                       "merges": {m: stage_hash(p) for m, p in merges.items()}}
    report_settings["config"].pop("output_dir")
    if is_current(out, report_settings) and (out / "report.json").is_file() and not overwrite:
        logger.info("stage 4/4: report up to date (%s)", out / "report.md")
        return json.loads((out / "report.json").read_text())
    logger.info("stage 4/4: writing the report")
    report = _report(cfg, out, evaluation, merges, adapters, timing)
    from eval_harness.suites import SUITES

    from .cards import add_evaluation_cards

    add_evaluation_cards(evaluation, report["columns"], report["table"], {s: SUITES[s].column for s in SUITES})
    write_stage(out, "report", report_settings)
    return report


def _print_report(report: dict[str, Any], title: str) -> None:
    from .report import markdown_table

    print(f"\n## {title}\n")
    print(markdown_table(["Method", *report["columns"]], report["table"]))


def main_pipeline(config_path: str, output: str | None, overrides: Sequence[str], overwrite: bool = False) -> int:
    """``poc-lora pipeline --config CONFIG.yaml [--output DIR] [--overwrite] [--key value ...]``."""
    report = run_pipeline(config_path, output, overrides, overwrite=overwrite)
    if report:
        _print_report(report, "Pipeline report")
        print(f"\nreport: {report['files']['report_md']}  plot: {report['files']['report_png']}")
    return 0


# ---------------------------------------------------------------------------- demo
DEMO_CONFIG = REPO_ROOT / "configs" / "pipeline" / "tiny_cpu.yaml"
# --quick: small enough for CI (about a minute on 2 cores), still every stage for real.
QUICK_OVERRIDES = ["--num_adapters", "2", "--eval_limit", "16",
                   "--train_overrides", "{max_steps: 12, save_steps: 6, logging_steps: 4}"]
# `demo --model NAME`: the pipeline config, where under --output it writes, its --quick overrides.
DEMO_MODELS: dict[str, tuple[Path, str, list[str]]] = {
    "tiny": (DEMO_CONFIG, "pipeline", QUICK_OVERRIDES),
    "smollm2": (REPO_ROOT / "configs" / "pipeline" / "smollm2_cpu.yaml", "smollm2",
                ["--num_adapters", "2", "--eval_limit", "2", "--eval_tasks", "boolq,piqa",
                 "--train_overrides", "{max_steps: 2, save_steps: 2, logging_steps: 1, cutoff_len: 128}"]),
}


def run_demo(output: str | os.PathLike = "results", quick: bool = False, overwrite: bool = False,
             model: str = "tiny") -> dict[str, Any]:
    """The README's first command: the tiny pipeline (M = 4) and MFNN Figure 1 (classification).

    Writes ``<output>/pipeline/`` (adapters, merges, eval, report.md/json/png) and
    ``<output>/mfnn/`` (figure1_classification.csv/png/json). ``quick`` shrinks both for CI.
    ``model="smollm2"`` runs ``configs/pipeline/smollm2_cpu.yaml`` (the real SmolLM2-135M-Instruct)
    into ``<output>/smollm2/`` instead, without the MFNN experiment.
    """
    from .mfnn.experiments import run_figure1

    if model not in DEMO_MODELS:
        raise ConfigError(f"unknown demo model {model!r}; valid: {', '.join(DEMO_MODELS)}")
    config, subdir, quick_overrides = DEMO_MODELS[model]
    if not config.is_file():
        raise ConfigError(f"the demo needs {config}; run it from a source checkout (pip install -e .)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"demo output {output} exists and is not a directory; give a directory (default results/)")
    t = time.perf_counter()
    report = run_pipeline(config, output / subdir, quick_overrides if quick else (), overwrite=overwrite)
    t_pipeline = time.perf_counter() - t
    if model != "tiny":
        return {"pipeline": report, "figure1": None, "seconds": {"pipeline": t_pipeline}}
    t = time.perf_counter()
    figure1 = run_figure1("classification", output=output / "mfnn", quick=quick, overwrite=True)
    t_mfnn = time.perf_counter() - t
    return {"pipeline": report, "figure1": figure1, "seconds": {"pipeline": t_pipeline, "mfnn_figure1": t_mfnn}}


def main_demo(args: argparse.Namespace) -> int:
    """``poc-lora demo [--output results] [--quick] [--overwrite]``."""
    model = getattr(args, "model", "tiny")
    result = run_demo(args.output, quick=args.quick, overwrite=args.overwrite, model=model)
    if result["figure1"] is None:
        _print_report(result["pipeline"], f"{model} pipeline: single adapters vs. their PoC merge (accuracy %)")
        print(f"\nreport: {result['pipeline']['files']['report_md']}")
        print(f"time: pipeline {result['seconds']['pipeline']:.0f} s")
        return 0
    _print_report(result["pipeline"], "Tiny pipeline: single adapters vs. their PoC merge (accuracy %)")
    fig = result["figure1"]
    md = next(Path(p) for p in fig["files"].values() if str(p).endswith(".md"))
    print("\n" + md.read_text().replace("# Figure 1", "## MFNN Figure 1", 1))
    print("\nfiles:")
    for name, path in {**result["pipeline"]["files"], **fig.get("files", {})}.items():
        print(f"  {name}: {path}")
    secs = result["seconds"]
    print(f"\ntime: pipeline {secs['pipeline']:.0f} s, MFNN Figure 1 {secs['mfnn_figure1']:.0f} s")
    return 0


__all__ = ["PipelineConfig", "main_demo", "main_pipeline", "run_demo", "run_pipeline"]
