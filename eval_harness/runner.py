"""Evaluate a base model, its adapters and their merges on the commonsense suites.

The base model is loaded once. In rank and choice modes the models (base, adapters, merged
adapters) are scored together, one suite at a time, on one copy of the base
(:mod:`eval_harness.multimodel`; memory: one base plus every model's LoRA factors). Otherwise
(generate mode, ``batch_models=False``, or models it refuses) each adapter is attached with
PEFT, evaluated on every suite, and dropped again before the next one is attached, so memory
stays at one base model plus one adapter. A merged *full* model is just another base model.

Output layout (``output``)::

    <model>/<suite>/predictions.jsonl   one line per example (index, prompt_sha256, generated
                                        text or candidate scores, prediction, label, correct)
    <model>/<suite>/summary.json        accuracy, unparsed count, settings, timing
    summary.json                        every model and suite, averages, mode, templates, timing
    results.md, results.csv             the paper's table layout (SIQA ... HellaSwag, Ave.)

A finished suite/model pair (its ``summary.json`` exists with the same settings, and its stage
marker, :mod:`poc_lora.stages`, vouches that both files are intact) is skipped on a re-run;
``overwrite=True`` recomputes it, as does a missing, truncated or changed file. Different
settings in the same output are refused.

Example:
    >>> from eval_harness import evaluate
    >>> result = evaluate("poc-lora/tiny-llama", adapters=["runs/a0", "runs/a1"],
    ...                   merged_adapters=["runs/merged"], data_dir="data/synthetic",
    ...                   mode="rank", output="results/eval")  # doctest: +SKIP
    >>> result.models["merged"].average  # doctest: +SKIP
    0.91
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm
from poc_lora.config import CHOICE_FORMATS, EVAL_MODES, EvalArguments
from poc_lora.stages import differing_keys, stage_problems

from poc_lora.adapters import sha256_file
from poc_lora.data.suites import TABLE_COLUMNS, Suite, parse_tasks
from poc_lora.data.templates import get_template, template_hash
from poc_lora.errors import ConfigError, DataError, OutputError
from poc_lora.outputs import write_json
from poc_lora.report import markdown_table, write_table

from .choice import choice_predictions, choice_request
from .data import AVAILABLE, available_suites, load_suite, suite_file
from .loading import DEFAULT_TEMPLATE, ModelSpec, _ModelHolder, _model_specs
from .results import EvalResult, ModelResult, SuiteResult
from .summary import (CALIBRATION_COLUMNS, DISTANCE_COLUMNS, add_ensemble, calibration_table, distance_table, model_result,
                      results_table, write_pair)
from .scoring import (CANDIDATE_FORMAT, candidate_labels, continuation_logprobs, extract_answer, generate_responses,
                      rank_prediction, rank_scores)

logger = logging.getLogger(__name__)

MODES = EVAL_MODES  # generate, rank, choice
# The one source of the evaluation defaults (the eval section of the configuration tree).
DEFAULTS = EvalArguments()


def _settings(spec: ModelSpec, suite: Suite, data_dir: Path, base_model: str, opts: dict[str, Any]) -> dict[str, Any]:
    settings = {
        "mode": opts["mode"],
        "base_model": base_model,
        "adapter": str(spec.adapter) if spec.adapter else None,
        "adapter_sha256": spec.adapter_sha256,
        "template": spec.template.name,
        "template_sha256": template_hash(spec.template),
        "data_file": str(suite_file(data_dir, suite)),
        "data_sha256": sha256_file(suite_file(data_dir, suite)),
        "limit": opts["limit"],
        "dtype": opts["dtype"],
        "load_in_4bit": opts["load_in_4bit"],
    }
    if "engine" in opts:  # recorded only off the default, so earlier results stay reusable
        settings.update(engine=opts["engine"])
    if opts["mode"] == "generate":
        settings.update(num_beams=opts["num_beams"], max_new_tokens=opts["max_new_tokens"])
    elif opts["mode"] == "choice":
        settings.update(choice_format=opts["choice_format"])
    else:
        settings.update(completion_format=CANDIDATE_FORMAT)
    return settings


def _finished(path: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """True if ``path`` (a pair's summary.json) holds a result for these exact settings."""
    if overwrite or not path.is_file():
        return False
    try:
        old = json.loads(path.read_text()).get("settings", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        logger.warning("%s is unreadable; recomputing this pair", path)
        return False
    diff = differing_keys(old, settings)
    if diff:
        raise OutputError(
            f"{path} was computed with other settings ({', '.join(diff)}); "
            "pass --overwrite (overwrite=True) or use another output directory"
        )
    problems = stage_problems(path.parent)
    if problems:
        logger.warning("%s cannot be reused (%s); recomputing this pair", path.parent, "; ".join(problems))
    return not problems


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _score_suite(model: Any, tokenizer: Any, specs: Sequence[ModelSpec], suite: Suite,
                 records: list[dict[str, str]], opts: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Prediction rows of ``suite`` for each of ``specs`` (in order): one model, or a
    :class:`~eval_harness.multimodel.MultiModel` of ``len(specs)`` models whose prompts are the same
    (:func:`_prompt_group`), each prompt read once for all of them."""
    spec = specs[0]
    prompts = [spec.template.eval_prompt(r) for r in records]
    truncated: list[int] = []  # prompts left-truncated to fit the model's context (scoring's one rule)
    many = len(specs) > 1
    desc = f"{spec.key if not many else f'{len(specs)} models'}/{suite.name}"
    with tqdm(total=len(records), desc=desc, unit="ex", leave=False) as bar:
        if opts["mode"] == "generate":
            texts = generate_responses(
                model, tokenizer, prompts, batch_size=opts["batch_size"], num_beams=opts["num_beams"],
                max_new_tokens=opts["max_new_tokens"], response_split=spec.template.response_split,
                progress=bar.update, truncated=truncated,
            )
            outputs = [[{"generated": t, "prediction": extract_answer(suite, t)} for t in texts]]
        elif opts["mode"] == "choice":
            requests = [choice_request(suite, r, spec.template, opts["choice_format"]) for r in records]
            logprobs = continuation_logprobs(model, tokenizer, [q.pairs for q in requests],
                                             batch_size=opts["batch_size"], progress=bar.update, truncated=truncated)
            outputs = []
            for per_model in (logprobs if many else [logprobs]):
                outputs.append([])
                for q, lps in zip(requests, per_model):
                    pred, pred_norm = choice_predictions(q, lps)
                    outputs[-1].append({"scores": dict(zip(q.labels, lps)), "lengths": dict(zip(q.labels, q.lengths)),
                                        "prediction": pred, "prediction_norm": pred_norm})
            prompts = [q.pairs[0][0] for q in requests]
        else:
            cands = [candidate_labels(suite, r["instruction"]) for r in records]
            scores = rank_scores(model, tokenizer, prompts, cands, batch_size=opts["batch_size"], progress=bar.update,
                                 truncated=truncated)
            outputs = [[{"scores": s, "prediction": rank_prediction(s)} for s in per_model]
                       for per_model in (scores if many else [scores])]
    cut = set(truncated)
    result = []
    for per_model in outputs:
        rows = [
            {"index": i, "prompt_sha256": _sha(p), **o, "label": r["answer"], "correct": o["prediction"] == r["answer"],
             "prompt_truncated": i in cut}
            for i, (p, r, o) in enumerate(zip(prompts, records, per_model))
        ]
        for row in rows:
            if "prediction_norm" in row:
                row["correct_norm"] = row["prediction_norm"] == row["label"]
        result.append(rows)
    return result


def _prompt_group(spec: ModelSpec, opts: dict[str, Any]) -> str:
    """Models with the same key here read the same prompts (rank mode and choice mode's
    ``template`` format use the model's template; lm-eval's choice prompts do not)."""
    if opts["mode"] == "choice" and opts["choice_format"] != "template":
        return ""
    return template_hash(spec.template)


def _run_pairs(model: Any, holder: "_ModelHolder", specs: Sequence[ModelSpec], suite: Suite,
               records: list[dict[str, str]], output: Path, settings: dict[str, dict[str, Any]],
               opts: dict[str, Any], warned: set[str]) -> dict[str, SuiteResult]:
    """Score ``suite`` for ``specs`` on ``model`` (one model, or a MultiModel of them) and write each
    (model, suite) pair; the suite's wall time is split evenly over the models scored together."""
    t0 = time.perf_counter()
    per_spec = _score_suite(model, holder.tokenizer, specs, suite, records, opts)
    seconds = (time.perf_counter() - t0) / len(specs)
    out: dict[str, SuiteResult] = {}
    for spec, rows in zip(specs, per_spec):
        summary = write_pair(output / spec.key / suite.name, spec.key, spec.kind, suite, rows, settings[spec.key],
                             seconds)
        if summary.truncated_prompts and suite.name not in warned:
            warned.add(suite.name)
            logger.warning("%s: %d of %d prompts are longer than the model's context minus the completion; they "
                           "were left-truncated (truncated_prompts in the suite summaries)", suite.name,
                           summary.truncated_prompts, len(rows))
        logger.info("%s/%s: accuracy %.4f", spec.key, suite.name, summary.accuracy)
        out[spec.key] = summary
    return out


def evaluate(
    base_model: str,
    adapters: Sequence[str | Path] = (),
    merged_adapters: Sequence[str | Path] = (),
    *,
    data_dir: str | Path,
    output: str | Path,
    tasks: str | Sequence[str] = DEFAULTS.tasks,
    mode: str = DEFAULTS.mode,
    limit: int | None = DEFAULTS.limit,
    batch_size: int = DEFAULTS.batch_size,
    num_beams: int = DEFAULTS.num_beams,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    template: str | None = None,
    include_base: bool | None = None,
    choice_format: str = DEFAULTS.choice_format,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    overwrite: bool = False,
    batch_models: bool = DEFAULTS.batch_models,
    ensemble: bool = DEFAULTS.ensemble,
    engine: str = "transformers",
    tokenizer: str | None = None,
) -> EvalResult:
    """Evaluate ``base_model`` alone and/or with each adapter and merged adapter; write the results.

    Args:
        base_model: hub id or path (a merged full model is passed here too).
        adapters: PEFT adapter directories, evaluated one after the other ("LoRA" rows).
        merged_adapters: merged adapter directories ("PoC merge" row when ``adapters`` are given).
        data_dir: holds ``<suite>/test.json`` (LLM-Adapters layout).
        output: result directory (created; existing finished pairs are reused).
        tasks: ``"all"``, ``"available"`` (the suites whose test file ``data_dir`` holds) or
            suite names (comma-separated string or list).
        mode: ``"generate"`` (the paper's beam search + label extraction), ``"rank"``
            (argmax log-likelihood of "the correct answer is <label>") or ``"choice"`` (the
            log-likelihood of each option's text, lm-evaluation-harness's ``acc``; ``acc_norm``
            too, in each suite's result).
        choice_format: choice mode's requests: ``lm-eval`` (lm-evaluation-harness's prompts) or
            ``template`` (the adapter's prompt + "the correct answer is <option text>"); see
            :mod:`eval_harness.choice`.
        limit: evaluate the first ``limit`` examples of each suite.
        template: prompt template for adapters that record none (default ``llm-adapters``).
        include_base: also evaluate the plain base; default: only when no adapter is given.
        overwrite: recompute finished suite/model pairs.
        batch_models: rank and choice modes: score the models whose pair is not finished
            together, one suite at a time (:mod:`eval_harness.multimodel`: each prompt read
            once, the layers below the first adapted layer shared, the models above it
            batched; results equal to one-by-one evaluation). Refused cases (DoRA, quantized
            bases, ...; logged) and generate mode evaluate one model at a time. Each pair's
            ``seconds`` is then the suite's wall time divided by the number of models scored
            together.
        ensemble: with two or more ``adapters``, also write their output ensemble as the model
            ``lora-ensemble`` ("LoRA ensemble (M = ..., M forward passes)"), built from their
            prediction rows without a forward pass (:mod:`eval_harness.ensemble`), and every
            other model's distance to it (``EvalResult.ensemble``).
        engine: ``transformers`` (PEFT) or ``llama.cpp`` (``base_model`` and the adapters are GGUF
            files; rank and choice modes; :mod:`eval_harness.llama_cpp`).
        tokenizer: llama.cpp engine: where the tokenizer comes from (default: the base GGUF's).

    Rank and choice modes also give each model's calibration (NLL, Brier, ECE, confidence of the
    option softmax, :mod:`eval_harness.calibration`) per suite and averaged, and write
    ``calibration.md|csv``.

    Returns:
        An :class:`~eval_harness.results.EvalResult` (``to_dict()`` is what ``summary.json``
        holds): ``models[key]`` with ``kind``, ``adapter``, ``suites[suite]`` (a
        :class:`~eval_harness.results.SuiteResult`) and ``average``; accuracies are fractions,
        the ``table`` is in %.

    Example:
        >>> evaluate("poc-lora/tiny-llama", data_dir="data", output="out", tasks="boolq",
        ...          mode="rank").models["tiny-llama"].average  # doctest: +SKIP
        0.5
    """
    start = time.perf_counter()
    suites = available_suites(data_dir) if tasks == AVAILABLE else parse_tasks(tasks)
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)} (one per evaluation)")
    if choice_format not in CHOICE_FORMATS:
        raise ConfigError(f"unknown choice_format {choice_format!r}; valid: {', '.join(CHOICE_FORMATS)}")
    for name, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    data_dir, output = Path(data_dir), Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a directory")
    # Everything the user can get wrong is checked before the (slow) model load.
    data = {s.name: load_suite(data_dir, s, limit) for s in suites}
    if mode == "choice":  # every option list parsed before the model loads
        for s in suites:
            for i, rec in enumerate(data[s.name]):
                try:
                    choice_request(s, rec, get_template(DEFAULT_TEMPLATE), choice_format)
                except DataError as exc:
                    raise DataError(f"{suite_file(data_dir, s)}: record {i}: {exc}") from None
    # A single path passed without a list is one adapter, not a sequence of characters.
    adapters, merged_adapters = ([a] if isinstance(a, (str, Path)) else list(a) for a in (adapters, merged_adapters))
    opts = dict(mode=mode, limit=limit, batch_size=batch_size, num_beams=num_beams,
                max_new_tokens=max_new_tokens, dtype=dtype, load_in_4bit=load_in_4bit, choice_format=choice_format)
    if engine == "llama.cpp":  # GGUF files scored by llama.cpp (same requests and scoring code)
        from . import llama_cpp
        holder: Any = llama_cpp.LlamaCppHolder(base_model, tokenizer, mode)
        specs = llama_cpp.gguf_model_specs(base_model, adapters, merged_adapters, template, include_base)
        opts["engine"] = engine
    elif engine != "transformers":
        raise ConfigError(f"unknown engine {engine!r}; valid: transformers, llama.cpp")
    else:
        specs = _model_specs(base_model, adapters, merged_adapters, template, include_base)
        holder = _ModelHolder(base_model, dtype, load_in_4bit)
    models: dict[str, ModelResult] = {}
    warned: set[str] = set()  # suites whose over-long prompts were already reported
    settings = {s.name: {spec.key: _settings(spec, s, data_dir, base_model, opts) for spec in specs} for s in suites}
    done: dict[tuple[str, str], SuiteResult] = {}  # (model, suite) pairs scored together with other models
    if batch_models and mode != "generate" and len(specs) > 1:
        for suite in suites:
            todo = [spec for spec in specs
                    if not _finished(output / spec.key / suite.name / "summary.json", settings[suite.name][spec.key],
                                     overwrite)]
            groups: dict[str, list[ModelSpec]] = {}
            for spec in todo:
                groups.setdefault(_prompt_group(spec, opts), []).append(spec)
            for group in (g for g in groups.values() if len(g) > 1):
                multi = holder.multi(group)
                if multi is None:
                    break  # refused (logged): every model is evaluated one at a time below
                results = _run_pairs(multi, holder, group, suite, data[suite.name], output, settings[suite.name],
                                     opts, warned)
                done.update({(key, suite.name): r for key, r in results.items()})
        holder.release_multi()
    for index, spec in enumerate(specs):
        summaries: dict[str, SuiteResult] = {}
        for suite in suites:
            pair_dir = output / spec.key / suite.name
            if (spec.key, suite.name) in done:
                summaries[suite.name] = done[spec.key, suite.name]
                continue
            if _finished(pair_dir / "summary.json", settings[suite.name][spec.key], overwrite):
                logger.info("skipping %s/%s: already evaluated", spec.key, suite.name)
                summaries[suite.name] = SuiteResult.from_dict(json.loads((pair_dir / "summary.json").read_text()),
                                                              str(pair_dir / "summary.json"))
                continue
            model = holder.get(spec, index)
            summaries[suite.name] = _run_pairs(model, holder, [spec], suite, data[suite.name], output,
                                               settings[suite.name], opts, warned)[spec.key]
        models[spec.key] = model_result(spec.kind, str(spec.adapter) if spec.adapter else None, spec.template.name,
                                        spec.template_source, summaries)
    ens = add_ensemble(output, models, suites, mode) if ensemble else None
    rows = results_table(models, suites, ens)
    md, csv = write_table(output / "results", ["Method", "Model", *TABLE_COLUMNS], rows)
    files = {"summary": str(output / "summary.json"), "results_md": str(md), "results_csv": str(csv)}
    cal_rows = calibration_table(models, ens)
    if cal_rows:
        cal_md, cal_csv = write_table(output / "calibration", CALIBRATION_COLUMNS, cal_rows, floatfmt=".4f")
        files.update(calibration_md=str(cal_md), calibration_csv=str(cal_csv))
    result = EvalResult(
        mode=mode,
        base_model=base_model,
        data_dir=str(data_dir),
        tasks=[s.name for s in suites],
        models=models,
        table=rows,
        files=files,
        seconds={"model_loading": round(holder.load_seconds, 3), "total": round(time.perf_counter() - start, 3)},
        ensemble=ens,
        calibration_table=cal_rows,
    )
    write_json(output / "summary.json", result.to_dict())
    return result


def main_eval(args: argparse.Namespace) -> int:
    """``poc-lora eval``: run :func:`evaluate` with the CLI's arguments and print the table."""
    result = evaluate(
        args.base_model,
        args.adapter,
        args.merged_adapter,
        data_dir=args.data_dir,
        output=args.output,
        tasks=args.tasks,
        mode=args.mode,
        limit=args.limit,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        include_base=True if getattr(args, "include_base", False) else None,
        choice_format=getattr(args, "choice_format", DEFAULTS.choice_format),
        dtype=getattr(args, "dtype", "auto"),
        load_in_4bit=args.load_in_4bit,
        overwrite=args.overwrite,
        batch_models=getattr(args, "batch_models", DEFAULTS.batch_models),
        ensemble=getattr(args, "ensemble", DEFAULTS.ensemble),
        engine=getattr(args, "engine", "transformers"),
        tokenizer=getattr(args, "tokenizer", None),
    )
    print(markdown_table(["Method", "Model", *TABLE_COLUMNS], result.table))
    if result.calibration_table:
        print("\nCalibration (option softmax; NLL in nats, Brier and ECE as fractions, accuracy and confidence in %):")
        print(markdown_table(CALIBRATION_COLUMNS, result.calibration_table, floatfmt=".4f"))
    if result.ensemble:
        print(f"\nDistance to the {result.ensemble.label} (members' mean pairwise disagreement "
              f"{100 * result.ensemble.disagreement['average']:.2f} %):")
        print(markdown_table(DISTANCE_COLUMNS, distance_table(result.ensemble), floatfmt=".4f"))
    print(f"\nresults: {result.files['results_md']}, {result.files['summary']}")
    return 0
