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

from poc_lora.outputs import atomic_write_text, write_json
from poc_lora.report import markdown_table


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


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
    spreads = [rep["merge_spread"].get("poc") for rep in loaded if rep.get("merge_spread")]
    spreads = [s for s in spreads if s is not None]
    md = [
        "# Over seeds: mean ± sd of accuracy (%)", "",
        f"{len(reports)} finished run(s): {', '.join(map(str, reports))}"
        + (f"; unfinished, left out: {', '.join(map(str, unfinished))}" if unfinished else ""), "",
        markdown_table(["Method", *columns], rows), "",
        f"Spread of the adapters (mean pairwise relative distance of their ΔW): {_mean_sd(spreads)}"
        if spreads else "", "",
    ]
    out = Path(args.output)
    atomic_write_text(out / "seeds_report.md", "\n".join(md))
    write_json(out / "seeds_report.json", {"runs": [str(r) for r in reports], "unfinished": [str(r) for r in unfinished],
                                           "columns": columns, "accuracy": raw, "spread": spreads})
    print("\n".join(md))


if __name__ == "__main__":
    main()
