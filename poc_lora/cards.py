"""Model cards: a filled ``README.md`` for every adapter and merge directory poc-lora writes.

Built with ``huggingface_hub.ModelCard`` / ``ModelCardData`` (the hub's own format), so a card
parses with ``ModelCard.load`` and shows on the hub. Metadata follows PEFT's adapter cards
(``base_model`` = the adapter's ``base_model_name_or_path``, ``library_name: peft``,
``pipeline_tag``, ``base_model:adapter:<base>`` tag) plus ``lora`` / ``noisy-adamw`` /
``poc-merge`` tags, ``license`` and ``datasets`` when they are known. The body says what the
directory holds, the method and its citation, the settings (a table for people and a
``yaml`` block with the exact values, as mergekit's cards carry their configuration), and the
evaluation table once the pipeline has evaluated the model.

Writers (each replaces ``README.md``, e.g. PEFT's empty template, atomically):

* :func:`write_training_card`: a trained adapter (``poc_lora.train``), from its config and record;
* :func:`write_merge_card`: a merged adapter or model (``poc_lora.merge``), from its MergeReport;
* :func:`add_ensemble_section`: which ensemble member an adapter is (``poc_lora.ensemble``);
* :func:`add_evaluation_cards`: the evaluation table and ``model-index`` results (``poc_lora.pipeline``).

Example:
    >>> from huggingface_hub import ModelCard
    >>> card = ModelCard.load("runs/merged/README.md")  # doctest: +SKIP
    >>> card.data.base_model, card.data.tags  # doctest: +SKIP
    ('poc-lora/tiny-llama', ['base_model:adapter:poc-lora/tiny-llama', 'lora', 'poc-merge', ...])
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from .adapters import sha256_file
from .citation import BIBTEX, PAPER, PAPER_URL
from .outputs import atomic_write_text

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
# Where the paper trains LoRA adapters with Noisy AdamW and merges them (its LoRA experiments).
PAPER_LORA = "§5.2, Tables 1 and 3"
# Keys of the machine-readable blocks in the card body (yaml code blocks).
TRAINING_KEY = "poc_lora_training"
MERGE_KEY = "poc_lora_merge"
_TRAIN_RECORD = "poc_lora_train.json"  # poc_lora.train.DONE_FILE (not imported: train imports us)
_TRAIN_CONFIG = "poc_lora_config.json"
_SECTION = re.compile(r"^## (.+)$", re.M)


# ----------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load_card(path: Path) -> Any:
    """A card's metadata, or None when there is none or it does not parse (never fatal)."""
    try:
        return ModelCard.load(path, ignore_metadata_errors=True) if path.is_file() else None
    except Exception:  # a foreign README without metadata, unreadable YAML...
        return None


def _base_card(base_model: str | None) -> Any:
    """The base model's own card: a local directory's README.md, or the hub cache's (no network)."""
    if not base_model:
        return None
    local = Path(base_model)
    if local.is_dir():
        return _load_card(local / CARD_NAME)
    try:
        cached = try_to_load_from_cache(base_model, CARD_NAME)
    except Exception:  # not a repo id
        return None
    return _load_card(Path(cached)) if isinstance(cached, str) else None


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _hub_dataset(data_path: str | None) -> list[str]:
    """``datasets`` metadata: the training data when it is a hub dataset id (not a file, not synthetic)."""
    if not data_path or data_path == "synthetic" or Path(data_path).exists():
        return []
    return [data_path] if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", data_path) else []


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(v) for v in value)
    return "n/a" if value is None else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _yaml_block(key: str, values: dict[str, Any]) -> str:
    text = yaml.safe_dump({key: values}, sort_keys=False, allow_unicode=True, width=120)
    return f"```yaml\n{text}```"


def read_card_block(card_text: str, key: str) -> dict[str, Any] | None:
    """The exact values a card carries under ``key`` (:data:`TRAINING_KEY`, :data:`MERGE_KEY`).

    Example:
        >>> read_card_block(Path("runs/merged/README.md").read_text(), MERGE_KEY)["spread"]  # doctest: +SKIP
        0.93
    """
    for block in re.findall(r"```yaml\n(.*?)```", card_text, re.S):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and key in data:
            return data[key]
    return None


def _card(metadata: dict[str, Any], body: str) -> Any:
    data = ModelCardData(**{k: v for k, v in metadata.items() if v not in (None, [], {})})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def _write(directory: Path, card: Any) -> Path:
    path = directory / CARD_NAME
    text = str(card)
    # An unchanged card is not rewritten: reruns of the pipeline must leave every file as it was.
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return atomic_write_text(path, text)


def _adapter_metadata(adapter_config: dict[str, Any], extra_tags: Sequence[str]) -> dict[str, Any]:
    """PEFT's own adapter metadata (as ``save_pretrained`` writes it) plus our tags."""
    base = adapter_config.get("base_model_name_or_path")
    tags = ([f"base_model:adapter:{base}"] if base else []) + ["lora", *extra_tags, "transformers", "poc-lora"]
    task = adapter_config.get("task_type")
    return {"base_model": base, "library_name": "peft", "tags": list(dict.fromkeys(tags)),
            "pipeline_tag": "text-generation" if task in (None, "CAUSAL_LM") else None}


def _usage(base: str | None, directory_name: str, adapter: bool) -> str:
    if not adapter:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{directory_name}")\n```')
    return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{directory_name}")\n```')


def _citation() -> str:
    return f"## Citation\n\n{PAPER} ({PAPER_URL}).\n\n```bibtex\n{BIBTEX}\n```"


def _sections(text: str) -> list[tuple[str | None, str]]:
    """The card body split at ``## `` headings: [(heading or None for the preamble, text)]."""
    cuts = [m.start() for m in _SECTION.finditer(text)]
    parts = [(None, text[: cuts[0]] if cuts else text)]
    for start, end in zip(cuts, cuts[1:] + [len(text)]):
        chunk = text[start:end]
        parts.append((_SECTION.match(chunk).group(1).strip(), chunk))
    return parts


def _upsert_section(text: str, heading: str, content: str, before: str = "Citation") -> str:
    """Replace the ``## heading`` section of a card body (or insert it before ``## before``)."""
    new = f"## {heading}\n\n{content.strip()}\n\n"
    parts = _sections(text)
    if any(h == heading for h, _ in parts):
        return "".join(new if h == heading else chunk for h, chunk in parts)
    at = next((i for i, (h, _) in enumerate(parts) if h == before), len(parts))
    chunks = [chunk for _, chunk in parts]
    if at == len(parts) and chunks and not chunks[-1].endswith("\n\n"):
        chunks[-1] = chunks[-1].rstrip("\n") + "\n\n"
    return "".join(chunks[:at] + [new] + chunks[at:])


# ----------------------------------------------------------------------------- training
def training_values(cfg: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """The training essentials a card records (exact values): λ, lr, steps, seeds, data and its sha256.

    ``cfg``: the run's :class:`~poc_lora.config.TrainConfig`; ``record``: its ``poc_lora_train.json``.
    ``data_sha256`` is None when the data are not a local file (a hub dataset id).

    Example:
        >>> training_values(cfg, json.loads(Path("runs/a0/poc_lora_train.json").read_text()))["temperature"]  # doctest: +SKIP
        1e-05
    """
    tr, lo, data = cfg.training, cfg.lora, cfg.data
    data_file = record.get("data_file")
    is_file = bool(data_file) and Path(data_file).is_file()
    metrics = record.get("metrics") or {}
    world = int(getattr(tr, "world_size", 1) or 1)
    return {
        "base_model": cfg.model.model_name_or_path,
        "optimizer": "NoisyAdamW",
        "temperature": cfg.poc.temperature,
        "learning_rate": tr.learning_rate,
        "lr_scheduler_type": str(getattr(tr.lr_scheduler_type, "value", tr.lr_scheduler_type)),
        "warmup_steps": tr.warmup_steps,
        "weight_decay": tr.weight_decay,
        "max_steps": tr.max_steps,
        "num_train_epochs": tr.num_train_epochs,
        "global_step": record.get("global_step"),
        "per_device_train_batch_size": tr.per_device_train_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "world_size": world,
        "seed": tr.seed,
        "noise_seed": cfg.noise_seed,
        "data_seed": tr.data_seed,
        "lora_r": lo.lora_r,
        "lora_alpha": lo.lora_alpha,
        "lora_dropout": lo.lora_dropout,
        "lora_target_modules": list(lo.lora_target_modules),
        "use_rslora": lo.use_rslora,
        "data_path": data.data_path,
        "data_file": str(data_file) if data_file else None,
        "data_sha256": sha256_file(Path(data_file)) if is_file else None,
        "prompt_template": data.prompt_template,
        "cutoff_len": data.cutoff_len,
        "train_on_inputs": data.train_on_inputs,
        "train_records": record.get("train_records"),
        "val_records": record.get("val_records"),
        "train_loss": metrics.get("train_loss"),
    }


def training_card(directory: str | Path, cfg: Any, record: Mapping[str, Any]) -> Any:
    """The card of a trained adapter in ``directory`` (which holds its ``adapter_config.json``).

    Example:
        >>> training_card("runs/a0", cfg, record).data.tags  # doctest: +SKIP
        ['base_model:adapter:poc-lora/tiny-llama', 'lora', 'noisy-adamw', 'transformers', 'poc-lora']
    """
    directory = Path(directory)
    name = Path(cfg.training.output_dir).name  # ``directory`` may be the temporary sibling
    adapter_config = _read_json(directory / "adapter_config.json") or {}
    v = training_values(cfg, record)
    base = adapter_config.get("base_model_name_or_path") or v["base_model"]
    base_card = _base_card(base)
    tags = ["noisy-adamw"] if v["temperature"] > 0 else ["adamw"]
    meta = _adapter_metadata({**adapter_config, "base_model_name_or_path": base}, tags)
    meta.update(license=getattr(getattr(base_card, "data", None), "license", None), datasets=_hub_dataset(v["data_path"]))
    batch = v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] * v["world_size"]
    steps = v["global_step"] if v["global_step"] is not None else v["max_steps"]
    data = v["data_path"] if v["data_path"] != "synthetic" else "synthetic commonsense suites (offline)"
    rows = [
        ("base model", base),
        ("optimizer", f"Noisy AdamW, temperature λ = {_num(v['temperature'])}" + (" (= AdamW)" if v["temperature"] == 0 else "")),
        ("learning rate", f"{_num(v['learning_rate'])} ({v['lr_scheduler_type']}, {_num(v['warmup_steps'])} warm-up steps)"),
        ("steps", f"{steps} " + (f"(max_steps {v['max_steps']})" if v["max_steps"] and v["max_steps"] > 0
                                 else f"({_num(v['num_train_epochs'])} epochs)")),
        ("batch", f"{batch} = {v['per_device_train_batch_size']} per device × {v['gradient_accumulation_steps']} "
                  f"accumulation × {v['world_size']} process(es)"),
        ("seed / noise seed", f"{v['seed']} / {v['noise_seed']}"),
        ("LoRA", f"r = {v['lora_r']}, α = {_num(v['lora_alpha'])}, dropout {_num(v['lora_dropout'])}, rsLoRA "
                 f"{'yes' if v['use_rslora'] else 'no'}, on {', '.join(v['lora_target_modules'])}"),
        ("data", f"{data}; {v['train_records']} training / {v['val_records']} validation records"),
        ("data file sha256", f"`{v['data_sha256']}`" if v["data_sha256"] else "n/a (not a local file)"),
        ("prompt template", f"{v['prompt_template']} (cutoff {v['cutoff_len']} tokens)"),
        ("final training loss", _num(v["train_loss"])),
    ]
    body = f"""
# LoRA adapter for {base}, trained with Noisy AdamW

A PEFT LoRA adapter trained by poc-lora with **Noisy AdamW**: after every AdamW update each
trainable parameter receives Gaussian noise `sqrt(2·λ·η_k)·N(0, 1)` (η_k the learning rate of
step k), the mean-field Langevin training of {PAPER} ({PAPER_LORA}).
Several adapters trained like this with different seeds are meant to be combined by the PoC
merge (`poc-lora merge`), which averages their updates ΔW = (1/M) Σ_j s_j B_j A_j.

## Training

{_table(("setting", "value"), rows)}

The exact values (`poc_lora_config.yaml` in this directory reruns the training:
`poc-lora train --config {name}/poc_lora_config.yaml`):

{_yaml_block(TRAINING_KEY, v)}

## Usage

{_usage(base, name, adapter=True)}

{_citation()}
"""
    return _card(meta, body)


def write_training_card(directory: str | Path, cfg: Any, record: Mapping[str, Any]) -> Path | None:
    """Write :func:`training_card` as ``directory/README.md`` (replacing PEFT's empty template).

    A card that cannot be built (e.g. the data file became unreadable) is logged and skipped
    (None): the adapter it describes cost hours of training and must not be lost over its card.

    Example:
        >>> write_training_card(tmp, run.cfg, record)  # doctest: +SKIP
        PosixPath('.../README.md')
    """
    try:
        card = training_card(directory, cfg, record)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logger.warning("no model card for %s: %s: %s", cfg.training.output_dir, type(exc).__name__, exc)
        return None
    return _write(Path(directory), card)


# ----------------------------------------------------------------------------- merges
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


# ----------------------------------------------------------------------------- later additions
def _update(directory: Path, heading: str, content: str, metadata: Mapping[str, Any] | None = None) -> Path | None:
    """Replace one section (and some metadata) of an existing card, atomically."""
    card = _load_card(directory / CARD_NAME)
    if card is None:
        logger.warning("%s has no model card to update", directory)
        return None
    text = _upsert_section(card.text, heading, content)
    data = card.data.to_dict()
    data.update(metadata or {})
    return _write(directory, _card(data, text) if data else ModelCard(text))


def add_ensemble_section(members: Sequence[str | Path], seeds: Sequence[int], merged: str | Path | None = None) -> None:
    """Note in each member's card that it is member j of an ensemble of M (seed = seed_0 + j).

    Example:
        >>> add_ensemble_section(["runs/e/adapter_0", "runs/e/adapter_1"], [0, 1], "runs/e/merged")  # doctest: +SKIP
    """
    m = len(members)
    for j, (path, seed) in enumerate(zip(members, seeds)):
        text = (f"Member {j} of an ensemble of M = {m} adapters trained independently with the same settings "
                f"and seeds {', '.join(map(str, seeds))} (this one: {seed}), trained by `poc-lora ensemble`."
                + (f" Their PoC merge is `{merged}`." if merged else ""))
        _update(Path(path), "Ensemble", text)


def add_evaluation_cards(
    evaluation: Mapping[str, Any],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    dataset_names: Mapping[str, str] | None = None,
) -> list[Path]:
    """Add the evaluation table (and ``model-index`` results) to the card of every evaluated adapter.

    ``evaluation``: :func:`eval_harness.evaluate`'s result, or its ``summary.json`` mapping (``models[key]["adapter"]`` is the
    directory, ``models[key]["suites"][suite]["accuracy"]`` a fraction); ``columns`` / ``rows``:
    the table to show (accuracy in %, e.g. the pipeline report's); ``dataset_names``: suite ->
    display name for the metadata. Returns the cards written.

    Example:
        >>> add_evaluation_cards(evaluation, report["columns"], report["table"])  # doctest: +SKIP
    """
    if hasattr(evaluation, "to_dict"):  # an eval_harness EvalResult: its summary.json layout
        evaluation = evaluation.to_dict()  # type: ignore[union-attr]
    names = dict(dataset_names or {})
    header = ["Method", *columns]
    table = _table(header, [[r.get(c) for c in header] for r in rows])
    written = []
    for key, model in evaluation.get("models", {}).items():
        if not model.get("adapter"):
            continue
        suites = model.get("suites", {})
        n = sorted({s.get("n") for s in suites.values()})
        text = (f"Evaluated by the poc-lora pipeline (`eval_harness`, mode `{evaluation.get('mode')}`, "
                f"{'/'.join(map(str, n))} examples per suite; this model is `{key}`). Accuracy in %:\n\n{table}")
        results = [EvalResult(task_type="text-generation", dataset_type=suite, dataset_name=names.get(suite, suite),
                              metric_type="accuracy", metric_value=s["accuracy"], metric_name="accuracy")
                   for suite, s in suites.items()]
        card = _load_card(Path(model["adapter"]) / CARD_NAME)
        if card is None:
            logger.warning("%s has no model card; its evaluation is not recorded there", model["adapter"])
            continue
        data = card.data.to_dict()
        data.pop("model-index", None)
        new = ModelCardData(**data, eval_results=results, model_name=Path(model["adapter"]).name)
        path = _update(Path(model["adapter"]), "Evaluation", text, new.to_dict())
        if path is not None:
            written.append(path)
    return written


__all__ = [
    "CARD_NAME", "MERGE_KEY", "TRAINING_KEY", "add_ensemble_section", "add_evaluation_cards", "merge_card",
    "merge_values", "read_card_block", "training_card", "training_values", "write_merge_card",
    "write_training_card",
]
