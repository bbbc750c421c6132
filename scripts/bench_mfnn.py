#!/usr/bin/env python
"""Benchmark the vectorised MFLD trainer against per-network Python loops on the same work.

The work is a slice of Figure 1 at the paper's settings: ``--num-networks`` networks for each
width in ``--widths``, trained for ``--epochs`` full-batch steps (classification: 160 training
points in R^2; regression: 400 in R^100). Every method trains the same networks from the same
initial particles; the table reports wall and CPU seconds and the speed-up over the baseline
(a Python loop over networks, autograd drift), all measured in this run.

    python scripts/bench_mfnn.py                     # classification, widths 50,250,500, 20 nets
    python scripts/bench_mfnn.py --task regression --epochs 20
    python scripts/bench_mfnn.py --quick             # a few seconds
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

from poc_lora.mfnn.data import make_task_data
from poc_lora.mfnn.mfld import Cell, MFLDSettings, derive_seed, drift_autograd, train_cells, train_mfld
from poc_lora.mfnn.model import init_particles
from poc_lora.report import markdown_table

TASKS = {
    "classification": MFLDSettings(eta=0.1, lam=0.01, weight_decay=0.1, epochs=200, loss="logistic"),
    "regression": MFLDSettings(eta=0.01, lam=0.01, weight_decay=0.1, epochs=100, loss="squared"),
}


def _autograd_train(x: torch.Tensor, z, y, s: MFLDSettings, gen: torch.Generator) -> torch.Tensor:
    """What one would write first: autograd drift, out-of-place update."""
    scale = math.sqrt(2 * s.lam * s.eta)
    for _ in range(s.epochs):
        x = x - s.eta * drift_autograd(x, z, y, s) + scale * torch.randn(x.shape, generator=gen)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="classification")
    parser.add_argument("--widths", default="50,250,500")
    parser.add_argument("--num-networks", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=None, help="default: the paper's T for the task")
    parser.add_argument("--workers", type=int, default=2, help="threads of the vectorised trainer")
    parser.add_argument("--quick", action="store_true", help="widths 50,100, 6 networks, 30 epochs")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.num_networks, args.epochs = "50,100", 6, 30
    s = TASKS[args.task]
    if args.epochs is not None:
        s = MFLDSettings(s.eta, s.lam, s.weight_decay, args.epochs, s.loss, s.R)
    widths = [int(w) for w in args.widths.split(",")]
    data = make_task_data(args.task, seed=0)
    z, y = data.z_train, data.y_train
    cells = [Cell(("N", w), args.num_networks, w, s) for w in widths]
    inits = {w: init_particles(args.num_networks, w, data.dim,
                               generator=torch.Generator().manual_seed(derive_seed(0, "init", "N", w)))
             for w in widths}

    def loop(step: Callable) -> None:
        gen = torch.Generator().manual_seed(1)
        for w in widths:
            for j in range(args.num_networks):
                step(inits[w][j : j + 1].clone(), gen)

    def batched_autograd() -> None:
        gen = torch.Generator().manual_seed(1)
        for w in widths:
            _autograd_train(inits[w].clone(), z, y, s, gen)

    methods: list[tuple[str, int, Callable[[], object]]] = [
        ("loop over networks, autograd drift (baseline)", 1, lambda: loop(lambda x, g: _autograd_train(x, z, y, s, g))),
        ("loop over networks, closed-form drift", 1, lambda: loop(lambda x, g: train_mfld(x, z, y, s, g))),
        ("batched per width, autograd drift", 1, batched_autograd),
        ("vectorised trainer (train_cells), 1 worker", 1,
         lambda: train_cells(cells, data, seed=0, workers=1, progress=False)),
        (f"vectorised trainer (train_cells), {args.workers} workers", args.workers,
         lambda: train_cells(cells, data, seed=0, workers=args.workers, progress=False)),
    ]
    rows, base, base_cpu = [], None, None
    default_threads = torch.get_num_threads()
    for name, threads, fn in methods:
        torch.set_num_threads(threads)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        torch.set_num_threads(default_threads)
        base, base_cpu = base or wall, base_cpu or cpu
        rows.append([name, threads, wall, cpu, base / wall, base_cpu / cpu])
    print(f"MFLD, {args.task}: {args.num_networks} networks x widths {widths}, {s.epochs} full-batch steps, "
          f"{len(y)} training points, d={data.dim}; torch {torch.__version__}")
    print(markdown_table(["method", "threads", "wall s", "CPU s", "speed-up (wall)", "speed-up (CPU)"], rows))


if __name__ == "__main__":
    main()
