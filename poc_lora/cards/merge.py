"""The model card of a merged adapter or model (:func:`write_merge_card`, called by ``poc_lora.merge``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..citation import PAPER
from ._common import (CARD_NAME, MERGE_KEY, PAPER_LORA, _TRAIN_CONFIG, _adapter_metadata, _as_list,
                      _base_card, _card, _citation, _load_card, _num, _read_json, _table, _usage, _write,
                      _yaml_block)


def _source_values(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per source adapter: path, sha256, weight, rank, alpha, the scales s_j PEFT applies."""
    out = []
    for j, (inp, w) in enumerate(zip(report["inputs"], report["weights"])):
        scales = sorted({float(st["scale_in"][j]) for st in report["modules"].values() if "scale_in" in st})
        ranks = sorted({int(st["rank_in"][j]) for st in report["modules"].values() if "rank_in" in st})
        out.append({
            "path": inp["path"], "sha256": inp["sha256"], "weight": w, "r": inp.get("r"),
            "lora_alpha": inp.get("lora_alpha"), "use_rslora": inp.get("use_rslora"),
            "rank": ranks[0] if len(ranks) == 1 else ranks, "scale": scales[0] if len(scales) == 1 else scales,
        })
    return out


def merge_values(report: Any, exact: bool = True) -> dict[str, Any]:
    """The merge essentials a card records, taken from a MergeReport (or its ``to_dict()``);
    ``exact``: whether the method writes the exact merge (else the distance to it is recorded).

    ``sources[j]``: path, sha256 of the weights file, weight w_j, r, lora_alpha, use_rslora, and the
    rank and scale s_j PEFT applies (one value, or the sorted distinct values when modules differ).

    Example:
        >>> merge_values(json.loads(Path("runs/merged/merge_report.json").read_text()))["merged_rank"]  # doctest: +SKIP
        64
    """
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    ranks = sorted(set(rep["output_ranks"].values()))
    overall = rep.get("overall", {})
    written = rep.get("written_rank")
    values = {
        "method": rep["method"],
        "num_adapters": len(rep["inputs"]),
        "sources": _source_values(rep),
        "merged_rank": written if written is not None else (ranks[0] if len(ranks) == 1 else ranks),
        "rank": rep.get("rank"),
        "seed": rep.get("seed"),
        "dtype": rep.get("dtype"),
        "merge_into_base": rep.get("merge_into_base"),
        "spread": overall.get("spread"),
        "norm_dW": overall.get("norm_dW"),
        "norm_merged": overall.get("norm_merged"),
    }
    values.update(rep.get("params") or {})  # density, majority_sign_method (ties, dare_*)
    if not exact or overall.get("rel_error"):  # svd / prune / soup / baselines / truncated: vs the exact merge
        values["rel_error"] = overall.get("rel_error")
    if overall.get("truncation_error"):  # the rank-K SVD of a full-update method, or --serve_rank
        values["truncation_error"] = overall.get("truncation_error")
    if written is not None:
        values["serve_rank"] = rep.get("serve_rank")
        values["vllm_max_lora_rank"] = rep.get("vllm_max_lora_rank")
    return values


def _sources_info(sources: list[dict[str, Any]]) -> tuple[list[dict[str, Any] | None], list[Any]]:
    """Each source's training config (when poc-lora trained it) and card metadata."""
    configs, cards = [], []
    for s in sources:
        path = Path(s["path"])
        configs.append(_read_json(path / _TRAIN_CONFIG))
        cards.append(_load_card(path / CARD_NAME))
    return configs, cards


def merge_card(directory: str | Path, report: Any, method: Any) -> Any:
    """The card of a merge output ``directory`` (adapter, or full model with ``merge_into_base``);
    ``method`` is the merge method's registry entry (``poc_lora.merge.methods.get_method``: its
    tags, card text and exactness), passed in so that cards stay below the merge package.

    Example:
        >>> merge_card("runs/merged", report, get_method(report.method)).data.library_name  # doctest: +SKIP
        'peft'
    """
    directory = Path(directory)
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    name = Path(rep["output"]).name  # ``directory`` may be the temporary sibling
    v = merge_values(rep, method.exact)
    configs, source_cards = _sources_info(v["sources"])
    temps = {c.get("temperature") for c in configs if c}
    spec = method
    tags = list(spec.tags) + ["merge"]
    if temps and all(t for t in temps) and all(configs):
        tags.append("noisy-adamw")
    licenses = {getattr(c.data, "license", None) for c in source_cards if c is not None}
    datasets = sorted({d for c in source_cards if c is not None for d in _as_list(getattr(c.data, "datasets", None))})
    adapter_config = _read_json(directory / "adapter_config.json")
    if adapter_config is not None:
        meta = _adapter_metadata(adapter_config, tags)
        base = adapter_config.get("base_model_name_or_path")
    else:  # merged into the base model: a plain transformers model
        base = rep.get("base_model") or rep["inputs"][0].get("base_model_name_or_path")
        meta = {"base_model": base, "library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": [*tags, "lora", "poc-lora"]}
    if len(licenses) == 1 and None not in licenses:
        meta["license"] = licenses.pop()
    elif not licenses or licenses == {None}:
        meta["license"] = getattr(getattr(_base_card(base), "data", None), "license", None)
    meta["datasets"] = datasets
    m = v["num_adapters"]
    what = "merged into the base model's weights" if v["merge_into_base"] else "a LoRA adapter (PEFT)"
    method_line = (spec.card_text or spec.description).format(rank=v["rank"], seed=v["seed"],
                                                              **(rep.get("params") or {}))
    src_rows = [(j, f"`{s['path']}`", f"`{s['sha256']}`", s["weight"], s["rank"], s["lora_alpha"],
                 "yes" if s["use_rslora"] else "no", s["scale"],
                 _num(configs[j].get("temperature")) if configs[j] else "n/a",
                 configs[j].get("seed") if configs[j] else "n/a")
                for j, s in enumerate(v["sources"])]
    merge_rows = [
        ("method", v["method"]),
        ("merged rank", v["merged_rank"]),
        ("spread (mean pairwise relative distance of the ΔW_j; 0 = identical, 1 = orthogonal)", v["spread"]),
        ("‖ΔW_j‖_F", v["norm_dW"]),
        ("‖ΔW_merged‖_F", v["norm_merged"]),
    ]
    merge_rows += [(name.replace("_", " "), v[name]) for name in spec.parameters if name in v]
    if "rel_error" in v:
        merge_rows.append(("relative Frobenius error of the written update vs the exact merge", v["rel_error"]))
    if "truncation_error" in v:
        merge_rows.append(("relative Frobenius error of the rank truncation (SVD)", v["truncation_error"]))
    merge_rows += [("dtype", v["dtype"])] + ([("seed", v["seed"])] if spec.uses_seed else [])
    merge_rows.append(("PEFT add_weighted_adapter equivalent", spec.peft_equivalent))
    if "vllm_max_lora_rank" in v:
        merge_rows.append(("vLLM --max-lora-rank needed", v["vllm_max_lora_rank"] or "none (rank > 512; see warning)"))
    warnings = "".join(f"\n- warning: {w}" for w in rep.get("warnings", []))
    warnings += "".join(f"\n- note: {n}" for n in rep.get("notes", []))
    body = f"""
# {spec.title} of {m} LoRA adapters for {base}

{what[0].upper() + what[1:]}: {method_line}.

The PoC merge averages M LoRA adapters trained independently (different seeds) as
ΔW = Σ_j w_j s_j B_j A_j (the paper's weights: w_j = 1/M), the model ensemble of {PAPER}
({PAPER_LORA}): a LoRA is a mean-field network of r neurons, and by propagation of chaos the
neurons of independently trained networks behave like independent draws, so averaging them
reduces the variance. Written by `poc-lora merge`; `merge_report.json` holds the per-module details.

## Source adapters

{_table(("j", "adapter", "sha256 (weights)", "weight w_j", "rank r_j", "lora_alpha", "rsLoRA", "scale s_j",
         "λ", "seed"), src_rows)}

## Merge

{_table(("quantity", "value"), merge_rows)}{warnings}

The exact values (from `merge_report.json`):

{_yaml_block(MERGE_KEY, v)}

## Usage

{_usage(base, name, adapter=adapter_config is not None)}{_serving(base, name, v.get("vllm_max_lora_rank"), rep)}

{_citation()}
"""
    return _card(meta, body)


def _serving(base: str | None, directory_name: str, max_lora_rank: int | None, rep: dict[str, Any]) -> str:
    """How to serve a merged adapter with vLLM (every module has one rank and scale 1, so vLLM and
    llama.cpp's converter read it as PEFT does, unless it holds full tensors: then the report's
    note says what each engine does); empty for a merged model."""
    if max_lora_rank is None:
        return ""
    if rep.get("full_tensors"):
        return ("\n\nServing: this adapter holds full tensors beside its LoRA factors (the note above): PEFT "
                "loads it as trained; vLLM and llama.cpp's `convert_lora_to_gguf.py` do not take such tensors "
                "(the converter keeps norm weights only); merge into the base model to serve it elsewhere.")
    return (f"\n\nServing: every module has the same rank and scale 1 (no rank_pattern / alpha_pattern), so "
            f"vLLM and llama.cpp's `convert_lora_to_gguf.py` apply the same update as PEFT. vLLM needs "
            f"`--max-lora-rank {max_lora_rank}`:\n\n```bash\nvllm serve {base} --enable-lora --max-lora-rank "
            f"{max_lora_rank} --lora-modules merged={directory_name}\n```\n\nllama.cpp / Ollama: `poc-lora export "
            f"{directory_name} --format gguf --output merged.gguf`, then `llama-server -m BASE.gguf --lora merged.gguf` "
            f"or `ADAPTER ./merged.gguf` in an Ollama Modelfile (poc-lora's docs/serving.md).")


def write_merge_card(directory: str | Path, report: Any, method: Any) -> Path:
    """Write :func:`merge_card` as ``directory/README.md`` (replacing a base model's copied card).

    Example:
        >>> write_merge_card(tmp, report, get_method(report.method))  # doctest: +SKIP
    """
    return _write(Path(directory), merge_card(directory, report, method))
