"""The one-command pipeline and the demo (quick sizes): files, table layout, numbers from the run."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from eval_harness.suites import SUITE_ORDER, SUITES, TABLE_COLUMNS
from poc_lora.cards import MERGE_KEY, TRAINING_KEY, read_card_block
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
    assert methods[:4] == ["LoRA (best)", "LoRA (ave.)", "LoRA ensemble (M = 2, M forward passes)", "PoC merge"]
    assert len(methods) == 7  # + SVD, pruned, soup variants
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


def test_adapter_cards_record_training_ensemble_and_evaluation(demo_run):
    from huggingface_hub import ModelCard

    pipe = demo_run / "pipeline"
    for j in range(2):
        adapter = pipe / "adapters" / f"adapter_{j}"
        card = ModelCard.load(adapter / "README.md")
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert card.data.base_model == config["base_model_name_or_path"]
        assert card.data.library_name == "peft" and {"lora", "noisy-adamw"} <= set(card.data.tags)
        assert "More Information Needed" not in card.text  # PEFT's empty template is replaced
        block = read_card_block(card.text, TRAINING_KEY)
        train_cfg = json.loads((adapter / "poc_lora_config.json").read_text())
        record = json.loads((adapter / "poc_lora_train.json").read_text())
        for key in ("temperature", "learning_rate", "max_steps", "seed", "lora_r", "lora_alpha", "warmup_steps",
                    "per_device_train_batch_size", "data_path", "prompt_template"):
            assert block[key] == train_cfg[key], key
        assert block["seed"] == j and block["noise_seed"] == record["noise_seed"]
        assert block["global_step"] == record["global_step"] and block["train_loss"] == record["metrics"]["train_loss"]
        assert block["train_records"] == record["train_records"] and block["data_file"] == record["data_file"]
        assert block["data_sha256"] == hashlib.sha256(Path(record["data_file"]).read_bytes()).hexdigest()
        assert f"Member {j} of an ensemble of M = 2" in card.text
        _check_evaluation(card, pipe / "eval" / f"adapter_{j}")


def _check_evaluation(card, eval_dir: Path) -> None:
    results = {r.dataset_type: r.metric_value for r in card.data.eval_results}
    assert results == {s: json.loads((eval_dir / s / "summary.json").read_text())["accuracy"] for s in SUITE_ORDER}
    assert {r.dataset_name for r in card.data.eval_results} == set(TABLE_COLUMNS[:-1])
    assert "| PoC merge |" in card.text.split("## Evaluation", 1)[1]


def test_merge_cards_equal_the_merge_reports(demo_run):
    from huggingface_hub import ModelCard

    pipe = demo_run / "pipeline"
    for method in ("poc", "svd", "prune", "soup"):
        out = pipe / "merges" / method
        card = ModelCard.load(out / "README.md")
        report = json.loads((out / "merge_report.json").read_text())
        config = json.loads((out / "adapter_config.json").read_text())
        assert card.data.base_model == config["base_model_name_or_path"] and card.data.library_name == "peft"
        assert ("model-soup" if method == "soup" else "poc-merge") in card.data.tags
        assert "noisy-adamw" in card.data.tags  # the sources were trained with temperature > 0
        block = read_card_block(card.text, MERGE_KEY)
        assert block["method"] == method and block["merged_rank"] == config["r"]
        assert block["spread"] == report["overall"]["spread"]
        assert block.get("rel_error") == (None if method == "poc" else report["overall"]["rel_error"])
        for j, src in enumerate(block["sources"]):
            adapter = pipe / "adapters" / f"adapter_{j}"
            assert src["sha256"] == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
            assert src["weight"] == report["weights"][j] == 0.5
            assert src["scale"] == train_scale(adapter)
        _check_evaluation(card, pipe / "eval" / method)


def train_scale(adapter: Path) -> float:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])


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
    assert report.table[3]["Method"] == "PoC merge"
    assert report.to_dict() == json.loads((pipe / "report.json").read_text())  # the typed report is the file


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


# ------------------------------------------------- stale stages: every stage keyed by its settings
def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _lora_rank(adapter: Path) -> int:
    """The rank of the adapter written on disk, from its tensors (lora_A is r x in_features)."""
    from safetensors.torch import load_file

    ranks = {v.shape[0] for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_A" in k}
    assert len(ranks) == 1
    return ranks.pop()


def test_unchanged_rerun_recomputes_nothing(demo_run):
    pipe = demo_run / "pipeline"
    before = _mtimes(pipe)
    run_pipeline(DEMO_CONFIG, pipe, QUICK_OVERRIDES)
    assert _mtimes(pipe) == before  # no stage marker, adapter, merge, prediction or report rewritten


def test_changed_merge_rank_recomputes_the_svd_merge_and_its_label(demo_run):
    pipe = demo_run / "pipeline"
    assert _lora_rank(pipe / "merges" / "svd") == 16  # default: one adapter's rank
    before = _mtimes(pipe)
    report = run_pipeline(DEMO_CONFIG, pipe, [*QUICK_OVERRIDES, "--merge_rank", "8"])
    after = _mtimes(pipe)
    assert _lora_rank(pipe / "merges" / "svd") == 8 and _lora_rank(pipe / "merges" / "prune") == 8
    labels = [r["Method"] for r in report.table]
    assert "PoC merge, SVD rank 8" in labels and "PoC merge, pruned to 8" in labels
    assert "PoC merge, SVD rank 8" in (pipe / "report.md").read_text()
    changed = {p for p in after if before.get(p) != after[p]}
    # recomputed: the svd/prune merges, their evaluation, the report; untouched: adapters, poc merge, its eval
    assert pipe / "merges" / "svd" / "adapter_model.safetensors" in changed
    assert pipe / "eval" / "svd" / "boolq" / "predictions.jsonl" in changed
    assert pipe / "report.md" in changed
    # the model cards (README.md) carry the report's table, so they follow the new label; nothing else moves
    assert "SVD rank 8" in (pipe / "adapters" / "adapter_0" / "README.md").read_text()
    for untouched in ("adapters", "merges/poc", "merges/soup", "eval/poc", "eval/adapter_0"):
        assert not {p for p in changed if (pipe / untouched) in p.parents and p.name != "README.md"}, untouched
    # back to the default rank: labelled from what is on disk again
    report = run_pipeline(DEMO_CONFIG, pipe, QUICK_OVERRIDES)
    assert _lora_rank(pipe / "merges" / "svd") == 16
    assert "PoC merge, SVD rank 16" in [r["Method"] for r in report.table]


def test_readme_sequence_more_adapters_then_demo_again_needs_no_flags(demo_run, capsys):
    """README: `pipeline --num_adapters 8 --eval.limit 50` after the demo, then `demo` again (quick sizes)."""
    pipe = demo_run / "pipeline"
    cfg = str(DEMO_CONFIG)
    assert main(["pipeline", "--config", cfg, "--output", str(pipe), *QUICK_OVERRIDES,
                 "--num_adapters", "3", "--eval.limit", "8"]) == 0
    report = json.loads((pipe / "report.json").read_text())
    assert len(report["adapters"]) == 3 and report["config"]["eval_limit"] == 8
    rows = [json.loads(line) for line in (pipe / "eval" / "poc" / "boolq" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert main(["demo", "--quick", "--output", str(demo_run)]) == 0
    report = json.loads((pipe / "report.json").read_text())
    assert len(report["adapters"]) == 2 and report["config"]["eval_limit"] == 16
    rows = [json.loads(line) for line in (pipe / "eval" / "poc" / "boolq" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    assert main(["pipeline", "--config", cfg, "--output", str(pipe), *QUICK_OVERRIDES, "--overwrite"]) == 0
    assert "error" not in capsys.readouterr().err


def test_report_says_what_it_is_draws_chance_and_rounds_like_the_eval_table(demo_run):
    pipe = demo_run / "pipeline"
    md = (pipe / "report.md").read_text()
    assert md.splitlines()[0] == "# poc-lora pipeline report: synthetic suites, tiny model, rank-mode scoring"
    report = json.loads((pipe / "report.json").read_text())
    assert report["what"] == "synthetic suites, tiny model, rank-mode scoring"
    # chance: a uniform guess among the options written in each evaluated question
    limit = PipelineConfig.from_yaml(DEMO_CONFIG, QUICK_OVERRIDES).eval.limit
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


# ------------------------------------------- damaged outputs: a stage is done only when its files are
@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_damaged_outputs_of_every_stage_are_recomputed(demo_run, how):
    """A trained adapter, a merge, an evaluation pair and the report each lose (or half lose) a
    file; the same command brings every one back, the deterministic ones bit for bit."""
    from poc_lora.stages import is_done

    pipe = demo_run / "pipeline"
    damaged = {pipe / "adapters" / "adapter_1" / "adapter_model.safetensors": True,
               pipe / "merges" / "svd" / "adapter_model.safetensors": True,
               pipe / "eval" / "poc" / "boolq" / "predictions.jsonl": True,
               pipe / "eval" / "results.csv": True,
               pipe / "report.png": False}  # True: the same bytes come back
    before = {p: p.read_bytes() for p in damaged}
    for p in damaged:
        if how == "deleted":
            p.unlink()
        else:
            p.write_bytes(before[p][: len(before[p]) // 2])
    report = run_pipeline(DEMO_CONFIG, pipe, QUICK_OVERRIDES)
    for p, same in damaged.items():
        if p.suffix == ".jsonl":
            # re-evaluated alone, not in the first run's many-models pass: the same predictions,
            # scores equal to rounding (docs/evaluation.md, "Many models in one pass")
            new, old = ([json.loads(line) for line in b.decode().splitlines()] for b in (p.read_bytes(), before[p]))
            assert [r["prediction"] for r in new] == [r["prediction"] for r in old], p
            for a, b in zip(new, old):
                assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
            continue
        assert p.is_file() and (p.read_bytes() == before[p] if same else p.stat().st_size > 0), p
    for stage in ("adapters/adapter_1", "merges/svd", "eval/poc", "eval/poc/boolq", "eval", "."):
        assert is_done(pipe / stage), stage
    assert report.to_dict() == json.loads((pipe / "report.json").read_text())
