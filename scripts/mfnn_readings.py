#!/usr/bin/env python
"""Measure readings of the paper's Table 2 protocol and write them as one Markdown table.

The paper (Nitanda et al., ICML 2025, arXiv:2502.05784, Appendix B) does not say what an
"epoch" is, the batch size, the loss scaling, the initialisation or the target scale for its
Table 2. Each ``configs/mfnn/readings/*.yaml`` is one reading (a partial ``poc-lora mfnn
table2`` config); this script runs ``run_table2`` for each and prints, per reading, the merged
test MSE per lambda at the smallest N (mean +- sd over seeds), the number of N-columns in
which the MSE falls monotonically as lambda grows, and ours / paper averaged over the cells.

    python scripts/mfnn_readings.py                              # every reading, paper grid, 3 seeds
    python scripts/mfnn_readings.py --widths 300 --num-seeds 2   # faster
    python scripts/mfnn_readings.py configs/mfnn/readings/batch_4.yaml --output readings.md
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from poc_lora.keyparser import read_yaml
from poc_lora.mfnn.config import resolve_settings
from poc_lora.mfnn.experiments import _data, run_table2
from poc_lora.outputs import atomic_write_text
from poc_lora.report import markdown_table

READINGS = Path(__file__).resolve().parents[1] / "configs" / "mfnn" / "readings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help=f"reading configs (default: {READINGS}/*.yaml)")
    parser.add_argument("--num-seeds", type=int, default=None, help="default: the config's (3)")
    parser.add_argument("--widths", default=None, help="comma-separated N (default: the paper's 300..800)")
    parser.add_argument("--num-networks", type=int, default=None, help="default: 20")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for path in args.configs or sorted(READINGS.glob("*.yaml")):
        config = read_yaml(path)
        if args.num_seeds is not None:
            config["num_seeds"] = args.num_seeds
        if args.widths:
            config["widths"] = [int(w) for w in args.widths.split(",")]
        if args.num_networks is not None:
            config["num_networks"] = args.num_networks
        settings = resolve_settings("lambda_grid", config, seed=args.seed)
        n_train = len(_data(settings).y_train)
        batch = settings["batch_size"] or n_train
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = run_table2(config=config, output=tmp, seed=args.seed, progress=False)
        wall = time.perf_counter() - start
        lams = sorted(settings["lams"], reverse=True)
        first = min(settings["widths"])
        by_key = {(r["lambda"], r["N"]): r for r in result["rows"]}
        cells = " / ".join(f"{by_key[(lam, first)]['mse_mean']:.2f} ± {by_key[(lam, first)]['mse_sd']:.2f}"
                           for lam in lams)
        ratios = [r["ratio_to_paper"] for r in result["rows"] if r["ratio_to_paper"] is not None]
        summary = result["summary"]
        var_y = sum(float(_data({**settings, "seed": s}).y_test.var()) for s in
                    range(settings["seed"], settings["seed"] + settings["num_seeds"])) / settings["num_seeds"]
        rows.append([
            f"`{path.stem}`: {result['reading']}", settings["epochs"] * -(-n_train // batch), f"{var_y:.3g}", cells,
            f"{summary['monotone_columns']} of {summary['columns']} "
            f"({', '.join(map(str, summary['monotone_columns_per_seed']))})",
            f"{sum(ratios) / len(ratios):.2f}" if ratios else "-", f"{wall:.0f}",
            f"{result['timing']['cpu_time_s']:.0f}",
        ])
        print(f"done {path.stem} in {wall:.0f} s", flush=True)
    lam_text = " / ".join(f"{lam:g}" for lam in lams)
    table = markdown_table(
        ["reading (config: settings)", "MFLD steps", "test Var(y)",
         f"merged MSE at N = {first}, λ = {lam_text} (mean ± sd over {settings['num_seeds']} seeds)",
         "N-columns with MSE falling as λ grows (per seed)", "ours / paper, mean over cells", "wall s", "CPU s"], rows)
    print(table)
    if args.output:
        atomic_write_text(args.output, table + "\n")


if __name__ == "__main__":
    main()
