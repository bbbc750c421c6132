"""The one-command pipeline and the demo (quick sizes): files, table layout, numbers from the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eval_harness.suites import SUITE_ORDER, SUITES, TABLE_COLUMNS
from poc_lora.cli import main
from poc_lora.errors import ConfigError
from poc_lora.pipeline import DEMO_CONFIG, QUICK_OVERRIDES, PipelineConfig, run_pipeline


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "results"
    return out


@pytest.fixture(scope="module")
def demo_run(demo):
    rc = main(["demo", "--quick", "--output", str(demo)])
    assert rc == 0
    return demo


def _accuracy_from_predictions(eval_dir: Path, model: str, suite: str) -> float:
    rows = [json.loads(line) for line in (eval_dir / model / suite / "predictions.jsonl").read_text().splitlines()]
    assert rows, f"no predictions for {model}/{suite}"
    # an independent re-scoring of every row: the prediction is the argmax of the candidates' scores
    for r in rows:
        assert r["prediction"] == max(r["scores"], key=r["scores"].get)
        assert r["correct"] == (r["prediction"] == r["label"])
    return 100.0 * sum(r["correct"] for r in rows) / len(rows)


def test_demo_writes_every_result_file(demo_run):
    pipe, mfnn = demo_run / "pipeline", demo_run / "mfnn"
    for path in [pipe / "report.md", pipe / "report.json", pipe / "report.png", pipe / "eval" / "results.csv",
                 pipe / "eval" / "results.md", mfnn / "figure1_classification.csv",
                 mfnn / "figure1_classification.png", mfnn / "figure1_classification.json"]:
        assert path.is_file() and path.stat().st_size > 0, path
    assert (pipe / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for j in range(2):  # quick demo: M = 2 adapters, each a plain PEFT adapter directory
        assert (pipe / "adapters" / f"adapter_{j}" / "adapter_model.safetensors").is_file()
    for method in ("poc", "svd", "prune", "soup"):
        assert (pipe / "merges" / method / "merge_report.json").is_file()


def test_report_table_has_the_papers_rows_and_columns(demo_run):
    report = json.loads((demo_run / "pipeline" / "report.json").read_text())
    assert report["columns"] == list(TABLE_COLUMNS)
    methods = [r["Method"] for r in report["table"]]
    assert methods[:3] == ["LoRA (best)", "LoRA (ave.)", "PoC merge"]
    assert len(methods) == 6  # + SVD, pruned, soup variants
    header = next(line for line in (demo_run / "pipeline" / "report.md").read_text().splitlines()
                  if line.startswith("| Method"))
    assert header == "| Method | " + " | ".join(TABLE_COLUMNS) + " |"


def test_every_number_in_the_report_comes_from_the_predictions(demo_run):
    pipe = demo_run / "pipeline"
    report = json.loads((pipe / "report.json").read_text())
    eval_dir = pipe / "eval"
    acc = {}
    for model in ["adapter_0", "adapter_1", "poc", "svd", "prune", "soup"]:
        row = {SUITES[s].column: _accuracy_from_predictions(eval_dir, model, s) for s in SUITE_ORDER}
        row["Ave."] = sum(row.values()) / len(SUITE_ORDER)
        acc[model] = row
    best = max(["adapter_0", "adapter_1"], key=lambda k: acc[k]["Ave."])
    expected = {
        "LoRA (best)": acc[best],
        "LoRA (ave.)": {c: (acc["adapter_0"][c] + acc["adapter_1"][c]) / 2 for c in TABLE_COLUMNS},
        "PoC merge": acc["poc"],
    }
    rows = {r["Method"]: r for r in report["table"]}
    for method, values in expected.items():
        for col in TABLE_COLUMNS:
            assert rows[method][col] == pytest.approx(values[col], abs=1e-9), (method, col)
    # the Markdown table shows the same numbers (2 decimals)
    md = (pipe / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| PoC merge |"))
    shown = [float(x) for x in re.findall(r"\d+\.\d+", line)]
    assert shown == pytest.approx([acc["poc"][c] for c in TABLE_COLUMNS], abs=0.006)


def test_mfnn_figure1_in_the_demo_shows_the_merge_trend(demo_run):
    rows = (demo_run / "mfnn" / "figure1_classification.csv").read_text().splitlines()
    assert rows[0] == "task,N,M,log_sup_norm"
    summary = json.loads((demo_run / "mfnn" / "figure1_classification.json").read_text())["summary"]
    assert summary["m_trend"] is True


def test_rerun_skips_finished_stages(demo_run):
    pipe = demo_run / "pipeline"
    watched = [pipe / "adapters" / "adapter_0" / "adapter_model.safetensors",
               pipe / "merges" / "poc" / "adapter_model.safetensors",
               pipe / "eval" / "poc" / "boolq" / "predictions.jsonl"]
    before = [p.stat().st_mtime_ns for p in watched]
    report = run_pipeline(DEMO_CONFIG, pipe, QUICK_OVERRIDES)
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert report["table"][2]["Method"] == "PoC merge"


def test_bad_pipeline_config_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_config: ../train/tiny_cpu.yaml\nnum_adapter: 3\n")
    with pytest.raises(ConfigError, match="num_adapter"):
        PipelineConfig.from_yaml(bad)
    assert main(["pipeline", "--config", str(bad)]) == 1
    assert "num_adapter" in capsys.readouterr().err
    bad.write_text(f"train_config: {DEMO_CONFIG.parent / '../train/tiny_cpu.yaml'}\nmerge_methods: [average]\n")
    with pytest.raises(ConfigError, match="merge_methods"):
        PipelineConfig.from_yaml(bad)


def test_report_says_what_it_is_draws_chance_and_rounds_like_the_eval_table(demo_run):
    pipe = demo_run / "pipeline"
    md = (pipe / "report.md").read_text()
    assert md.splitlines()[0] == "# poc-lora pipeline report: synthetic suites, tiny model, rank-mode scoring"
    report = json.loads((pipe / "report.json").read_text())
    assert report["what"] == "synthetic suites, tiny model, rank-mode scoring"
    # chance: a uniform guess among the options written in each evaluated question
    limit = PipelineConfig.from_yaml(DEMO_CONFIG, QUICK_OVERRIDES).eval_limit
    data_dir = Path(json.loads((pipe / "eval" / "summary.json").read_text())["data_dir"])
    for s in SUITE_ORDER:
        records = json.loads((data_dir / s / "test.json").read_text())[:limit]
        options = [len(re.findall(rf"\b{SUITES[s].option_prefix}\d+:", r["instruction"])) if SUITES[s].option_prefix
                   else 2 for r in records]
        assert report["chance"][SUITES[s].column] == pytest.approx(100 * sum(1 / k for k in options) / len(options))
    assert "| Chance |" in md
    # one value, one rounding: the PoC merge row reads the same in report.md and eval/results.md
    def cells(text: str, label: str) -> list[str]:
        line = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
        return re.findall(r"\d+\.\d+", line)
    results = (pipe / "eval" / "results.md").read_text()  # labels merges by method when there are several
    assert cells(md, "PoC merge") == cells(results, "PoC merge (poc)")
    assert cells(md, "LoRA (best)") == cells(results, "LoRA (best)")
    # the average is the evaluation's own (100 x its mean accuracy), bit for bit, not re-derived
    summary = json.loads((pipe / "eval" / "summary.json").read_text())
    merged = next(r for r in report["table"] if r["Method"] == "PoC merge")
    assert merged["Ave."] == 100 * summary["models"][merged["Model"]]["average"]
