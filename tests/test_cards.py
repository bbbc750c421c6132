"""Model cards of merges (adapter and full model): they parse, match the directory and the report.

The cards of trained adapters, ensemble members and evaluated models are checked on the demo run
in test_pipeline.py (it trains, merges and evaluates once for all of them).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from poc_lora.cards import MERGE_KEY, add_evaluation_cards, read_card_block
from poc_lora.merge import REPORT_NAME, merge_adapters

LLAMA = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)
BASE_CARD = "---\nlicense: mit\ntags:\n- tiny\n---\n\n# a tiny base model\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A local base model with its own card (license mit) and three adapters of different r / alpha."""
    root = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    base.save_pretrained(root / "base")
    (root / "base" / "README.md").write_text(BASE_CARD)
    adapters = []
    for j, (r, alpha, rs) in enumerate([(4, 8, False), (2, 8, True), (4, 4, False)]):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(j)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.save_pretrained(root / f"a{j}")
        adapters.append(root / f"a{j}")
    return root, adapters


def _check_against_report(out: Path, adapters: list[Path], weights: list[float]) -> dict:
    card = ModelCard.load(out / "README.md")
    report = json.loads((out / REPORT_NAME).read_text())
    block = read_card_block(card.text, MERGE_KEY)
    assert block["method"] == report["method"] and block["num_adapters"] == len(adapters)
    assert block["merged_rank"] == sorted(set(report["output_ranks"].values()))[0]
    assert block["spread"] == report["overall"]["spread"]
    assert block["norm_dW"] == report["overall"]["norm_dW"]
    assert block["norm_merged"] == report["overall"]["norm_merged"]
    for j, (src, path) in enumerate(zip(block["sources"], adapters)):
        cfg = json.loads((path / "adapter_config.json").read_text())
        # independently: the weights file's hash, PEFT's scale formula, the weights asked for
        assert src["sha256"] == hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert src["sha256"] == report["inputs"][j]["sha256"]
        assert src["weight"] == weights[j] == report["weights"][j]
        assert src["rank"] == src["r"] == cfg["r"]
        expected = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
        assert src["scale"] == pytest.approx(expected, rel=1e-12)
        assert src["sha256"] in card.text and str(path) in card.text
    assert f"{report['overall']['spread']:.6g}" in card.text  # the table shows the report's number
    assert "PoC merge" in card.text and "arXiv:2502.05784" in card.text
    return {"card": card, "report": report, "block": block}


@pytest.mark.parametrize("method, rank", [("poc", None), ("svd", 3)])
def test_merged_adapter_card(sources, tmp_path, method, rank):
    root, adapters = sources
    weights = [0.5, 0.25, 0.25]
    merge_adapters(adapters, tmp_path / "merged", method=method, rank=rank, weights=weights)
    got = _check_against_report(tmp_path / "merged", adapters, weights)
    card, report, block = got["card"], got["report"], got["block"]
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert card.data.base_model == config["base_model_name_or_path"] == str(root / "base")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lora", "poc-merge", f"base_model:adapter:{root / 'base'}"} <= set(card.data.tags)
    assert card.data.license == "mit"  # from the base model's card
    if method == "poc":
        assert block["merged_rank"] == config["r"] == 10 and "rel_error" not in block
    else:
        assert block["merged_rank"] == config["r"] == rank and "svd" in card.data.tags
        assert block["rel_error"] == report["overall"]["rel_error"] > 0
        assert f"{report['overall']['rel_error']:.6g}" in card.text
    # the card is part of the atomic output: no temporary directory is left beside it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


def test_merged_model_card_replaces_the_base_models(sources, tmp_path):
    root, adapters = sources
    merge_adapters(adapters[:2], tmp_path / "full", merge_into_base=True, base_model=root / "base")
    got = _check_against_report(tmp_path / "full", adapters[:2], [0.5, 0.5])
    card = got["card"]
    assert card.data.base_model == got["report"]["base_model"] == str(root / "base")
    assert card.data.library_name == "transformers" and "poc-merge" in card.data.tags
    assert "tiny" not in card.data.tags and card.data.license == "mit"
    assert "AutoModelForCausalLM.from_pretrained(\"full\")" in card.text
    assert (root / "base" / "README.md").read_text() == BASE_CARD  # input untouched


def test_evaluation_is_added_to_the_card(sources, tmp_path):
    root, adapters = sources
    out = tmp_path / "merged"
    merge_adapters(adapters[:2], out)
    before = ModelCard.load(out / "README.md")
    evaluation = {"mode": "rank", "models": {
        "merged": {"adapter": str(out), "suites": {"boolq": {"accuracy": 0.75, "n": 8}, "piqa": {"accuracy": 0.5, "n": 8}}},
        "base": {"adapter": None, "suites": {}}}}
    rows = [{"Method": "PoC merge", "BoolQ": 75.0, "PIQA": 50.0, "Ave.": 62.5}]
    for _ in range(2):  # updating twice replaces the section, it does not append a second one
        add_evaluation_cards(evaluation, ["BoolQ", "PIQA", "Ave."], rows, {"boolq": "BoolQ", "piqa": "PIQA"})
    card = ModelCard.load(out / "README.md")
    results = {r.dataset_type: r.metric_value for r in card.data.eval_results}
    assert results == {s: v["accuracy"] for s, v in evaluation["models"]["merged"]["suites"].items()}
    assert card.text.count("## Evaluation") == 1 and "| PoC merge | 75 | 50 | 62.5 |" in card.text
    assert read_card_block(card.text, MERGE_KEY) == read_card_block(before.text, MERGE_KEY)
    assert card.data.base_model == before.data.base_model and card.data.tags == before.data.tags
    assert card.text.index("## Evaluation") < card.text.index("## Citation")
