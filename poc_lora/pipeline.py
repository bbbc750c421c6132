"""The main job in one call: train M adapters -> PoC merge (+ variants) -> evaluate -> report.

Stages and where they write (under ``output_dir``)::

    adapters/adapter_<j>/    ensemble training (poc_lora.ensemble), one PEFT adapter per seed
    merges/<method>/         merges of all M adapters (poc_lora.merge) + merge_report.json
    eval/                    every adapter and every merge on the suites (eval_harness)
    report.md, report.json, report.png
                             the paper's table (LoRA (best), LoRA (ave.), PoC merge, variants)

Every stage is resumable: finished adapters are skipped by the ensemble, an existing merge is
kept unless an adapter was retrained, and finished (model, suite) pairs are skipped by the
evaluation (which keys them by the adapter's weight hash). The report is always rebuilt from
the files, so its numbers are the ones the predictions files hold.

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

from .errors import ConfigError

logger = logging.getLogger(__name__)

# Row labels of the report, per merge method. Only ``poc`` is the paper's method.
MERGE_LABELS = {
    "poc": "PoC merge",
    "svd": "PoC merge, SVD rank {rank}",
    "prune": "PoC merge, pruned to {rank}",
    "soup": "Soup (A, B averaged; baseline)",
}
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
        bad = [m for m in self.merge_methods if m not in MERGE_LABELS]
        if bad or not self.merge_methods:
            raise ConfigError(f"merge_methods: unknown method {bad[:1]}; valid: {', '.join(MERGE_LABELS)}")
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


def _merge_stage(cfg: PipelineConfig, adapters: list[Path], out: Path, retrained: bool) -> dict[str, Path]:
    from .merge import merge_adapters

    merges: dict[str, Path] = {}
    for method in cfg.merge_methods:
        target = out / method
        if (target / "merge_report.json").is_file() and not retrained:
            logger.info("merge %s: already done (%s)", method, target)
        else:
            rank = cfg.merge_rank if method in ("svd", "prune") else None
            if method in ("svd", "prune") and rank is None:
                rank = _adapter_rank(adapters[0])
            report = merge_adapters(adapters, target, method=method, rank=rank, seed=cfg.merge_seed, overwrite=True)
            logger.info("%s", report.summary())
        merges[method] = target
    return merges


def _adapter_rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text())["r"])


def _label(method: str, cfg: PipelineConfig, adapters: list[Path]) -> str:
    rank = cfg.merge_rank or (_adapter_rank(adapters[0]) if method in ("svd", "prune") else None)
    return MERGE_LABELS[method].format(rank=rank)


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


def _report(cfg: PipelineConfig, out: Path, evaluation: dict[str, Any], merges: dict[str, Path],
            adapters: list[Path], timing: dict[str, float]) -> dict[str, Any]:
    """report.md / report.json / report.png from the evaluation's per-model accuracies."""
    from eval_harness.suites import AVERAGE_COLUMN, SUITES

    from .outputs import atomic_write_text, write_json
    from .report import comparison_rows, markdown_table, plot_grouped_bars

    suites = evaluation["tasks"]
    columns = [SUITES[s].column for s in suites] + [AVERAGE_COLUMN]
    by_path = {Path(m["adapter"]).resolve(): key for key, m in evaluation["models"].items() if m["adapter"]}
    acc: dict[str, dict[str, float]] = {}
    for key, m in evaluation["models"].items():
        row = {SUITES[s].column: 100.0 * m["suites"][s]["accuracy"] for s in suites}
        row[AVERAGE_COLUMN] = sum(row.values()) / len(suites)
        acc[key] = row
    merge_keys = {by_path[p.resolve()]: _label(meth, cfg, adapters) for meth, p in merges.items()}
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
        "# poc-lora pipeline report",
        "",
        f"{len(adapters)} adapters (seeds seed+j), merged with {', '.join(cfg.merge_methods)}; "
        f"evaluation mode `{evaluation['mode']}` on {len(suites)} suites "
        f"({'first ' + str(cfg.eval_limit) if cfg.eval_limit else 'all'} examples each). Accuracy in %.",
        "",
        markdown_table(table_cols, rows),
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
                            title="Single adapters vs. their merge")
    report = {
        "config": dataclasses.asdict(cfg),
        "columns": columns,
        "table": rows,
        "adapters": per_adapter,
        "merge_spread": spreads,
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

    ``overrides`` are ``--key value`` pairs of :class:`PipelineConfig` fields. With
    ``overwrite`` the merges and evaluations are recomputed (trained adapters are kept).
    Under ``accelerate launch`` with ``strategy: parallel`` every rank trains its adapters and
    only rank 0 continues past training.
    """
    from eval_harness.runner import evaluate

    from .config import load_config
    from .ensemble import train_ensemble

    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.from_yaml(config, overrides)
    out = Path(output or cfg.output_dir)
    timing: dict[str, float] = {}

    t = time.perf_counter()
    train_cfg = load_config(cfg.train_config, _train_overrides(cfg, out / "adapters"))
    data_dir = _eval_data_dir(cfg, train_cfg)  # checked before hours of training
    rank = int(os.environ.get("RANK", "0"))  # read first: parallel training hides the launcher's env
    ens = train_ensemble(train_cfg, cfg.num_adapters, strategy=cfg.strategy)
    if rank != 0:  # the other ranks have trained their adapters; rank 0 merges and evaluates
        return {}
    timing["training"] = time.perf_counter() - t
    adapters = [Path(p) for p in ens.adapters]

    t = time.perf_counter()
    retrained = bool(ens.trained) or overwrite
    merges = _merge_stage(cfg, adapters, out / "merges", retrained)
    timing["merging"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate(
        train_cfg.model.model_name_or_path, adapters, list(merges.values()),
        data_dir=data_dir, output=out / "eval", tasks=cfg.eval_tasks, mode=cfg.eval_mode,
        limit=cfg.eval_limit, batch_size=cfg.eval_batch_size, num_beams=cfg.eval_num_beams,
        include_base=cfg.include_base or None, overwrite=overwrite,
    )
    timing["evaluation"] = time.perf_counter() - t
    return _report(cfg, out, evaluation, merges, adapters, timing)


def _print_report(report: dict[str, Any], title: str) -> None:
    from .report import markdown_table

    print(f"\n## {title}\n")
    print(markdown_table(["Method", *report["columns"]], report["table"]))


def main_pipeline(config_path: str, output: str | None, overrides: Sequence[str]) -> int:
    """``poc-lora pipeline --config CONFIG.yaml [--output DIR] [--key value ...]``."""
    report = run_pipeline(config_path, output, overrides)
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
