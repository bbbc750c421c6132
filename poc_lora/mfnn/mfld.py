"""Mean-field Langevin dynamics (MFLD): full-batch noisy gradient descent on particles.

One step for every particle x_i of every network (PAPER.md §1):

    x_i <- x_i - eta * D_i + sqrt(2 * lam * eta) * xi,       xi ~ N(0, I)
    D_i  = N * grad_{x_i} [ F0 + weight_decay * mean_i ||x_i||^2 ]
         = sum_j g_j grad_x h(x_i, z_j) + 2 * weight_decay * x_i,   g_j = loss'(f(z_j), y_j) / n

The drift is computed in closed form (:func:`drift`) instead of by autograd: with the
pre-activations computed once as one matrix product, the whole step is two matrix products
and a handful of in-place element-wise passes over one preallocated (B, N, n) buffer.
``scripts/bench_mfnn.py`` measures it against ``torch.autograd`` (:func:`drift_autograd`,
kept as the reference the tests compare with); the closed form is several times faster.

Speed on a CPU (:func:`train_cells`): the networks of a cell are split into chunks small
enough that a chunk's buffers stay in the L2 cache for all T steps, and the chunks run on a
pool of threads with single-threaded kernels (intra-op threading on small matrices costs
more than it gains). Each chunk draws its noise from its own generator, seeded from the
experiment seed and the chunk's identity, so results do not depend on the thread count or
the order in which chunks finish.

Example:
    >>> import torch
    >>> from poc_lora.mfnn.data import double_circle
    >>> from poc_lora.mfnn.mfld import Cell, MFLDSettings, train_cells
    >>> data = double_circle(seed=0)
    >>> cell = Cell(key=("N", 50), num_networks=4, width=50,
    ...             settings=MFLDSettings(eta=0.1, lam=0.01, weight_decay=0.1, epochs=20))
    >>> [result] = train_cells([cell], data, seed=0, progress=False)
    >>> result.test_predictions.shape
    torch.Size([4, 40])
"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runtime import derive_seed, torch_threads
from .data import Split
from .model import DEFAULT_R, augmented_inputs, init_particles, predict

logger = logging.getLogger(__name__)

LOSSES = ("logistic", "squared")

# A chunk's (B, N, n) activation buffer holds at most this many floats (1 MiB): with the
# other buffers it fits a 2 MiB L2 cache, which measured fastest on the 2-core dev machine.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class MFLDSettings:
    """Hyper-parameters of MFLD. ``lam`` is the temperature λ (noise), ``weight_decay`` is λ'.

    ``loss`` is ``"logistic"`` (log(1 + exp(-y f)), labels ±1) or ``"squared"`` ((f - y)^2 / 2).
    """

    eta: float = 0.1
    lam: float = 0.01
    weight_decay: float = 0.1
    epochs: int = 200
    loss: str = "logistic"
    R: float = DEFAULT_R

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.eta <= 0 or self.lam < 0 or self.weight_decay < 0 or self.epochs < 0:
            raise ValueError(f"invalid MFLD settings: {self}")


def loss_value(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """Mean loss over the last dimension (the data points)."""
    if loss == "logistic":
        return torch.nn.functional.softplus(-y * f).mean(-1)
    return 0.5 * ((f - y) ** 2).mean(-1)


def _loss_grad(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """d loss / d f, element-wise."""
    if loss == "logistic":
        return -y * torch.sigmoid(-y * f)
    return f - y


class _Buffers:
    """Preallocated per-chunk tensors, so a step allocates only small (B, n) vectors."""

    def __init__(self, particles: Tensor, n: int) -> None:
        batch, width, p = particles.shape
        self.act = particles.new_empty(batch, width, n)
        self.drift = particles.new_empty(batch, width, p)
        self.noise = particles.new_empty(batch, width, p)


def _drift_into(x: Tensor, zaug: Tensor, zaug_t: Tensor, y: Tensor, s: MFLDSettings, buf: _Buffers) -> Tensor:
    """Write the drift without the weight-decay term into ``buf.drift`` and return it.

    With A = tanh(x1^T z + x2) (B, N, n), t = tanh(x3), g = loss'(f, y) / n:
      x1, x2 columns: R t_i sum_j g_j (1 - A_ij^2) [z_j, 1]  = R t_i (g @ zaug - (A^2 * g) @ zaug)_i
      x3 column:      R (1 - t_i^2) sum_j g_j A_ij
    (the 1/N of f cancels against the mean-field factor N).
    """
    batch, width, p = x.shape
    n = zaug.shape[0]
    act = buf.act
    torch.mm(x.view(batch * width, p), zaug_t, out=act.view(batch * width, n))
    act.tanh_()
    t = torch.tanh(x[..., -1])  # (B, N)
    f = torch.bmm((t * (s.R / width)).unsqueeze(1), act).squeeze(1)  # (B, n)
    g = _loss_grad(f, y, s.loss).mul_(1.0 / n)  # (B, n)
    u = torch.bmm(act, g.unsqueeze(-1)).squeeze(-1)  # (B, N): sum_j g_j A_ij
    g_total = g @ zaug  # (B, p): sum_j g_j zaug_j
    act.square_()
    drift = torch.bmm(act, g.unsqueeze(-1) * zaug, out=buf.drift)  # sum_j g_j A_ij^2 zaug_j
    drift.sub_(g_total.unsqueeze(1)).mul_(t.unsqueeze(-1) * -s.R)
    drift[..., -1] = (1.0 - t * t).mul_(s.R) * u  # zaug's last column is 0: overwrite it
    return drift


def drift(particles: Tensor, z: Tensor, y: Tensor, settings: MFLDSettings) -> Tensor:
    """Closed-form MFLD drift D (same shape as ``particles`` (B, N, d + 2)), incl. weight decay.

    Equals N times the autograd gradient of ``loss + weight_decay * mean_i ||x_i||^2``
    (:func:`drift_autograd`).
    """
    x = particles.contiguous()
    zaug = augmented_inputs(z.to(x.dtype))
    d = _drift_into(x, zaug, zaug.T.contiguous(), y.to(x.dtype), settings, _Buffers(x, len(y))).clone()
    return d.add_(x, alpha=2.0 * settings.weight_decay)


def drift_autograd(particles: Tensor, z: Tensor, y: Tensor, settings: MFLDSettings) -> Tensor:
    """Reference drift: N * d/dx [mean loss + weight_decay * mean_i ||x_i||^2], by autograd."""
    x = particles.detach().clone().requires_grad_(True)
    width = x.shape[-2]
    objective = loss_value(predict(x, z, settings.R), y, settings.loss)
    objective = objective + settings.weight_decay * (x**2).sum(-1).mean(-1)
    (grad,) = torch.autograd.grad(objective.sum(), x)  # networks are independent: sum is fine
    return width * grad


def train_mfld(
    particles: Tensor,
    z: Tensor,
    y: Tensor,
    settings: MFLDSettings,
    generator: torch.Generator | None = None,
    eval_z: Tensor | None = None,
) -> Tensor | None:
    """Run ``settings.epochs`` MFLD steps on ``(B, N, d + 2)`` particles, in place, as one batch.

    With ``eval_z`` returns the networks' predictions on it before training and after every
    step, ``(epochs + 1, B, len(eval_z))``; otherwise ``None``.
    """
    s = settings
    x = particles
    if not x.is_contiguous():
        raise ValueError("particles must be contiguous (they are updated in place)")
    zaug = augmented_inputs(z.to(x.dtype))
    zaug_t = zaug.T.contiguous()
    y = y.to(x.dtype)
    buf = _Buffers(x, len(y))
    shrink = 1.0 - 2.0 * s.eta * s.weight_decay
    noise_scale = math.sqrt(2.0 * s.lam * s.eta)
    history = [predict(x, eval_z, s.R)] if eval_z is not None else None
    for _ in range(s.epochs):
        d = _drift_into(x, zaug, zaug_t, y, s, buf)
        x.mul_(shrink).sub_(d, alpha=s.eta)
        if noise_scale > 0:
            x.add_(buf.noise.normal_(generator=generator), alpha=noise_scale)
        if history is not None:
            history.append(predict(x, eval_z, s.R))
    return torch.stack(history) if history is not None else None


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """``num_networks`` networks of ``width`` particles trained with ``settings``.

    ``key`` names the cell (e.g. ``("N", 100)``); the cell's initial particles and noise
    are seeded from (experiment seed, key), so a cell's result does not depend on which
    other cells are trained with it.
    """

    key: tuple
    num_networks: int
    width: int
    settings: MFLDSettings


@dataclass
class CellResult:
    """Trained particles ``(B, N, d + 2)``, test predictions ``(B, n_test)`` and, when asked,
    the test predictions after every epoch ``(epochs + 1, B, n_test)``."""

    cell: Cell
    particles: Tensor
    test_predictions: Tensor
    test_history: Tensor | None = None


def train_cells(
    cells: Sequence[Cell],
    data: Split,
    seed: int = 0,
    record_history: bool = False,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[CellResult]:
    """Train every cell on ``data`` (train split) and predict its test split.

    ``workers`` threads (default: ``torch.get_num_threads()``) train cache-sized chunks of
    networks concurrently on a CPU; on a GPU each cell is one batch. ``record_history``
    keeps the test predictions after every epoch (Figure 2).
    """
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    z_train, y_train = data.z_train.to(device), data.y_train.to(device)
    z_test = data.z_test.to(device)
    n = len(y_train)
    workers = max(1, workers or torch.get_num_threads()) if on_cpu else 1

    jobs: list[tuple[int, slice, int]] = []  # (cell index, networks, noise seed)
    tensors: list[Tensor] = []
    for ci, cell in enumerate(cells):
        init_gen = torch.Generator().manual_seed(derive_seed(seed, "init", *cell.key))
        x = init_particles(cell.num_networks, cell.width, data.dim, generator=init_gen).to(device)
        tensors.append(x)
        per_chunk = max(1, CHUNK_ELEMENTS // (cell.width * n)) if on_cpu else cell.num_networks
        for start in range(0, cell.num_networks, per_chunk):
            jobs.append((ci, slice(start, min(start + per_chunk, cell.num_networks)),
                         derive_seed(seed, "noise", start, *cell.key)))
    histories: dict[tuple[int, int], Tensor] = {}

    def run(job: tuple[int, slice, int]) -> int:
        ci, rows, noise_seed = job
        cell = cells[ci]
        gen = torch.Generator(device=device).manual_seed(noise_seed)
        hist = train_mfld(tensors[ci][rows], z_train, y_train, cell.settings, gen,
                          eval_z=z_test if record_history else None)
        if hist is not None:
            histories[(ci, rows.start)] = hist
        return cell.width * (rows.stop - rows.start) * cell.settings.epochs

    # Largest jobs first so the pool's threads finish together.
    jobs.sort(key=lambda j: -cells[j[0]].width * (j[1].stop - j[1].start) * cells[j[0]].settings.epochs)
    total = sum(c.width * c.num_networks * c.settings.epochs for c in cells)
    # Single-threaded kernels on a CPU whatever the pool size: the same arithmetic for any
    # thread count (bit-identical results), and OpenMP barriers on these small products cost
    # more than they save, badly so on a busy machine (measured 10x slower under contention).
    threads = torch_threads(1) if on_cpu else contextlib.nullcontext()
    with tqdm(total=total, desc="MFLD particle-epochs", unit_scale=True, disable=not progress) as bar, threads:
        if workers == 1:
            for job in jobs:
                bar.update(run(job))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for done in pool.map(run, jobs):
                    bar.update(done)

    results = []
    for ci, cell in enumerate(cells):
        x = tensors[ci]
        hist = None
        if record_history:
            parts = sorted((k[1], h) for k, h in histories.items() if k[0] == ci)
            hist = torch.cat([h for _, h in parts], dim=1).cpu()
        with torch_threads(1) if on_cpu else contextlib.nullcontext():  # same sums as training
            results.append(CellResult(cell, x.cpu(), predict(x, z_test, cell.settings.R).cpu(), hist))
    return results

