#!/usr/bin/env python
"""Mean ± sd over several pipeline runs (seeds) of the report's rows, plus the adapters' spread.

Reads ``<run>/report.json`` of each pipeline output given (e.g. the same pipeline config run with
``--training.seed S`` for three seeds S) and writes ``seeds_report.md`` and
``seeds_report.json`` into ``--output``: one row per method (Base model, LoRA (best), LoRA (ave.),
PoC merge, variants), each column as mean ± sample sd over the runs, and the spread diagnostic
(mean pairwise relative distance of the adapters' ΔW) as mean ± sd. Runs without a report.json
are listed as unfinished and left out.

Usage:
    python scripts/seeds_table.py results/evidence/seed0 results/evidence/seed10 results/evidence/seed20 \
        --output results/evidence
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from eval_harness.summary import DISTANCE_COLUMNS
from poc_lora.outputs import atomic_write_text, write_json
from poc_lora.report import markdown_table


def _mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


SUMMARY_COLUMNS = ["Method", "acc", "acc_norm", "NLL", "ECE", "agreement", "KL"]


def _per_method(rep: dict) -> dict[str, dict[str, float | None]]:
    """One run's 4-suite means per report row: acc, acc_norm, NLL, ECE, and the distance to the
    output ensemble (reports of this release: ``calibration`` and ``ensemble``)."""
    avg = rep["columns"][-1]
    norm = {r["Method"]: r[avg] for r in rep.get("tables", {}).get("choice acc_norm", [])}
    cal = {r["Method"]: r for r in rep.get("calibration", [])}
    ens = rep.get("ensemble") or {}
    dist = {d["Model"]: d for d in ens.get("distances", [])}
    members = [d for k, d in dist.items() if k in ens.get("members", [])]
    out = {}
    for row in rep["table"]:
        method, model = row["Method"], row.get("Model")
        d = dist.get(method) or dist.get(model)
        if method == "LoRA (ave.)" and members:
            d = {k: statistics.mean(m[k] for m in members) for k in members[0] if k != "Model"}
        c = cal.get(method, {})
        _, agreement, kl = DISTANCE_COLUMNS
        own = d is not None and not method.startswith("LoRA ensemble")
        out[method] = {"acc": row[avg], "acc_norm": norm.get(method), "NLL": c.get("NLL"), "ECE": c.get("ECE"),
                       "agreement": d[agreement] if own else None, "KL": d[kl] if own else None}
    return out


def _summary_rows(loaded: list[dict]) -> tuple[list[dict], dict]:
    per_run = [_per_method(rep) for rep in loaded]
    if not any(rep.get("calibration") for rep in loaded):
        return [], {}
    rows = []
    for method in per_run[0]:
        row = {"Method": method}
        for col in SUMMARY_COLUMNS[1:]:
            values = [run.get(method, {}).get(col) for run in per_run]
            digits = {"NLL": 3, "ECE": 3, "KL": 4}.get(col, 2)
            row[col] = _mean_sd(values, digits) if all(v is not None for v in values) else ""
        rows.append(row)
    diffs = {}
    for name, a, b in (("PoC merge − LoRA (best)", "PoC merge", "LoRA (best)"),
                       ("PoC merge − LoRA ensemble", "PoC merge", next((m for m in per_run[0]
                                                                         if m.startswith("LoRA ensemble")), None))):
        if b and all(a in run and b in run for run in per_run):
            diffs[name] = [run[a]["acc"] - run[b]["acc"] for run in per_run]
    return rows, {"per_run": per_run, "differences": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="pipeline output directories (each with report.json)")
    ap.add_argument("--output", "-o", required=True, help="where seeds_report.md/json go")
    args = ap.parse_args()
    reports, unfinished = [], []
    for run in map(Path, args.runs):
        path = run / "report.json"
        (reports if path.is_file() else unfinished).append(run)
    if not reports:
        raise SystemExit(f"error: no report.json in {', '.join(map(str, args.runs))}")
    loaded = [json.loads((r / "report.json").read_text()) for r in reports]
    columns = loaded[0]["columns"]
    methods = [row["Method"] for row in loaded[0]["table"]]
    rows, raw = [], {}
    for method in methods:
        per_run = [next(r for r in rep["table"] if r["Method"] == method) for rep in loaded]
        raw[method] = {c: [r[c] for r in per_run] for c in columns}
        rows.append({"Method": method, **{c: _mean_sd(raw[method][c]) for c in columns}})
    summary, summary_raw = _summary_rows(loaded)
    spreads = [rep["merge_spread"].get("poc") for rep in loaded if rep.get("merge_spread")]
    spreads = [s for s in spreads if s is not None]
    md = [
        "# Over seeds: mean ± sd of accuracy (%)", "",
        f"{len(reports)} finished run(s): {', '.join(map(str, reports))}"
        + (f"; unfinished, left out: {', '.join(map(str, unfinished))}" if unfinished else ""), "",
        markdown_table(["Method", *columns], rows), "",
        f"Spread of the adapters (mean pairwise relative distance of their ΔW): {_mean_sd(spreads)}"
        if spreads else "", "",
        *(["## Accuracy, calibration and distance to the ensemble (4-suite means; mean ± sd over runs)", "",
           "acc and acc_norm in %, NLL in nats, ECE as a fraction (15 bins), agreement with the adapters' "
           "output ensemble in %, KL(ensemble ‖ model) in nats; LoRA (ave.) averages the adapters' own values.", "",
           markdown_table(SUMMARY_COLUMNS, summary), "",
           *[f"{name} per run: {', '.join(f'{v:+.2f}' for v in values)} (mean {statistics.mean(values):+.2f})"
             for name, values in summary_raw["differences"].items()], ""] if summary else []),
    ]
    out = Path(args.output)
    atomic_write_text(out / "seeds_report.md", "\n".join(md))
    write_json(out / "seeds_report.json", {"runs": [str(r) for r in reports], "unfinished": [str(r) for r in unfinished],
                                           "columns": columns, "accuracy": raw, "spread": spreads,
                                           "summary": summary_raw})
    print("\n".join(md))


if __name__ == "__main__":
    main()
