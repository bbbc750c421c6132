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

``--grid`` benchmarks the Table 2 / Figure 2 trainer instead: per-sample MFLD epochs on the
multi-index task for every (lambda, N) of ``--widths`` (default the paper's 300..800) and the
paper's four lambdas, ``--num-networks`` networks (default 1), ``--epochs`` (default 1). The
baseline trains every cell alone, one :func:`train_mfld` step per sample (closed-form drift,
a whole noise draw per cell and step); the grid trainer is :func:`train_lambda_grid`. Both are
measured in this run, and the per-network-epoch CPU time is extrapolated to the default
``poc-lora mfnn table2`` (3 seeds x 20 networks x 5 epochs) and ``figure2`` (2 seeds).

    python scripts/bench_mfnn.py --grid              # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

from poc_lora.mfnn.data import make_task_data
from poc_lora.mfnn.mfld import (Cell, GridSettings, MFLDSettings, derive_seed, drift_autograd, train_cells,
                                train_lambda_grid, train_mfld)
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


PAPER_LAMS = [0.1, 0.01, 0.001, 0.0001]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def grid_benchmark(widths: list[int], num_networks: int, epochs: int, workers: int) -> None:
    """Per-cell train_mfld loop (baseline) vs train_lambda_grid on the same per-sample epochs."""
    data = make_task_data("regression", seed=0)
    s = GridSettings(eta=0.01, weight_decay=0.1, epochs=epochs, loss="squared", batch_size=1)
    n = len(data.y_train)

    def per_cell_loop() -> None:
        order_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        orders = [torch.randperm(n, generator=order_gen) for _ in range(epochs)]
        for b in range(num_networks):
            x0 = init_particles(1, max(widths), data.dim, generator=torch.Generator().manual_seed(b))
            for lam in PAPER_LAMS:
                step = MFLDSettings(eta=s.eta, lam=lam, weight_decay=s.weight_decay, epochs=1, loss=s.loss)
                for w in widths:
                    x = x0[:, :w].clone()
                    for order in orders:
                        for j in order.tolist():
                            train_mfld(x, data.z_train[j:j + 1], data.y_train[j:j + 1], step, noise_gen)

    torch.set_num_threads(1)
    rows = []
    base = _timed(per_cell_loop)
    rows.append(["per-cell loop of train_mfld steps (baseline)", 1, *base, 1.0, 1.0])
    for threads in sorted({1, workers}):
        t = _timed(lambda: train_lambda_grid(data, PAPER_LAMS, widths, num_networks, s, workers=threads,
                                             progress=False))
        rows.append([f"train_lambda_grid, {threads} worker(s)", threads, *t, base[0] / t[0], base[1] / t[1]])
    print(f"lambda grid: lambdas {PAPER_LAMS} x widths {widths}, {num_networks} network(s), {epochs} per-sample "
          f"epoch(s) of {n} steps, d = {data.dim}; torch {torch.__version__}")
    print(markdown_table(["method", "threads", "wall s", "CPU s", "speed-up (wall)", "speed-up (CPU)"], rows))
    per_network_epoch = rows[1][3] / (num_networks * epochs)
    for name, seeds in (("table2", 3), ("figure2", 2)):  # valid for the paper's widths (the default)
        cpu = per_network_epoch * seeds * 20 * 5
        print(f"default `poc-lora mfnn {name}` ({seeds} seeds x 20 networks x 5 epochs, these widths): about {cpu:.0f} s CPU "
              f"(training only), so about {cpu / 2:.0f} s wall on 2 idle cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="classification")
    parser.add_argument("--widths", default=None, help="default 50,250,500 (--grid: 300,400,...,800)")
    parser.add_argument("--num-networks", type=int, default=None, help="default 20 (--grid: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the paper's T for the task")
    parser.add_argument("--workers", type=int, default=2, help="threads of the vectorised trainer")
    parser.add_argument("--quick", action="store_true", help="widths 50,100, 6 networks, 30 epochs")
    parser.add_argument("--grid", action="store_true", help="benchmark the Table 2 / Figure 2 trainer")
    args = parser.parse_args()
    if args.grid:
        widths = [int(w) for w in (args.widths or "300,400,500,600,700,800").split(",")]
        grid_benchmark(widths, args.num_networks or 1, args.epochs or 1, args.workers)
        return
    args.widths, args.num_networks = args.widths or "50,250,500", args.num_networks or 20
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
