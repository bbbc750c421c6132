"""Mean-field Langevin dynamics (MFLD): noisy gradient descent on particles.

:func:`train_cells` (Figure 1) runs full-batch steps on cells of networks of one width;
:func:`train_lambda_grid` (Figure 2, Table 2) runs full-batch, mini-batch or per-sample epochs
on a whole (lambda, N) grid at once.

One step for every particle x_i of every network (Nitanda et al., ICML 2025, arXiv:2502.05784, §2):

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
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runtime import derive_seed, torch_threads
from .data import Split
from .model import DEFAULT_R, augmented_inputs, init_particles, predict

logger = logging.getLogger(__name__)

LOSSES = ("logistic", "squared", "squared_unhalved")
ORDERS = ("shared", "per_network")

# A chunk's (B, N, n) activation buffer holds at most this many floats (1 MiB): with the
# other buffers it fits a 2 MiB L2 cache, which measured fastest on the 2-core dev machine.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class MFLDSettings:
    """Hyper-parameters of MFLD. ``lam`` is the temperature λ (noise), ``weight_decay`` is λ'.

    ``loss`` is ``"logistic"`` (log(1 + exp(-y f)), labels ±1), ``"squared"`` ((f - y)^2 / 2) or
    ``"squared_unhalved"`` ((f - y)^2, twice the drift: the paper does not say which it used).
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
    scale = 1.0 if loss == "squared_unhalved" else 0.5
    return scale * ((f - y) ** 2).mean(-1)


def _loss_grad(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """d loss / d f, element-wise."""
    if loss == "logistic":
        return -y * torch.sigmoid(-y * f)
    return 2.0 * (f - y) if loss == "squared_unhalved" else f - y


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



# ------------------------------------------------------------------ the lambda grid
@dataclass(frozen=True)
class GridSettings:
    """One training recipe for a (lambda, N) grid (Figure 2 / Table 2).

    ``batch_size`` is the number of training points per MFLD step: ``None`` is full batch
    (one step per epoch: the appendix's "noisy gradient descent" read literally), ``b`` makes an epoch one pass over the
    shuffled training points in ``ceil(n / b)`` steps, each with noise sqrt(2 lambda eta).
    ``init_std`` scales the N(0, I) initial particles. The loss is as in :class:`MFLDSettings`.
    ``order`` is ``"shared"`` (the networks of a seed see the training points in one order per
    epoch, so they differ only by their initialisation and noise, as under full-batch MFLD) or
    ``"per_network"`` (each network its own order).
    """

    eta: float = 0.01
    weight_decay: float = 0.1
    epochs: int = 5
    loss: str = "squared"
    R: float = DEFAULT_R
    batch_size: int | None = None
    init_std: float = 1.0
    order: str = "shared"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.eta <= 0 or self.weight_decay < 0 or self.epochs < 0 or self.init_std <= 0:
            raise ValueError(f"invalid grid settings: {self}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {self.batch_size}")


@dataclass
class GridResult:
    """Test predictions per (lambda, N): ``predictions[(lam, N)]`` is ``(B, n_test)`` for the B
    networks; ``history[(lam, N)]`` is ``(epochs + 1, B, n_test)`` (after each epoch, epoch 0
    the initial networks) when asked for, else empty."""

    lams: list[float]
    widths: list[int]
    predictions: dict[tuple[float, int], Tensor]
    history: dict[tuple[float, int], Tensor]


class _GridNetwork:
    """Network index ``b`` of every (lambda, N) cell, all updated by one set of tensor ops.

    Cell c (width N_c) at lambda l is rows ``offsets[c]:offsets[c] + N_c`` of particle matrix l
    (P = sum N_c rows per lambda, L lambdas). Every cell starts from the first N_c rows of the
    same N(0, init_std^2 I) draw and adds the first N_c rows of the same noise draw each step,
    scaled by sqrt(2 lambda eta): common random numbers, so the grid compares lambda and N on
    paired networks, and the noise is drawn for max(N) rows, not for L x P.

    Storage, so that a step touches each particle as few times as possible:
    ``x[l] = decay * (v[l] + scale_l * w[rows])``, where ``v`` accumulates the drift, ``w``
    (max N, d + 2) the shared noise and the scalar ``decay`` the weight-decay shrink
    (:meth:`settle` folds it back once per epoch). ``v`` is split into ``vt`` (d + 1, L * P), the
    x1, x2 columns transposed (a block's pre-activations are one product ``zaug @ vt`` with a
    contiguous (m, L * P) result), and ``v3`` (L * P,), the x3 column. ``f`` of a cell is a
    product with the (P, C) matrix ``weights`` (R / N_c on the cell's rows); ``member_t`` maps
    a cell's g back to its rows.
    """

    def __init__(self, lams: Sequence[float], widths: Sequence[int], dim: int, s: GridSettings,
                 init_gen: torch.Generator) -> None:
        p, top = dim + 2, max(widths)
        x0 = torch.randn(top, p, generator=init_gen).mul_(s.init_std)
        self.rows = torch.cat([torch.arange(w) for w in widths])
        self.shape = (len(lams), len(self.rows))
        x = x0[self.rows]  # (P, p)
        self.vt = x[:, :-1].T.repeat(1, len(lams)).contiguous()  # (d + 1, L * P)
        self.v3 = x[:, -1].repeat(len(lams)).contiguous()  # (L * P,)
        self.w = torch.zeros(top, p)
        self.decay = 1.0
        cell = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        member = torch.nn.functional.one_hot(cell, len(widths)).float()  # (P, C)
        self.weights = member * (s.R / torch.tensor(widths, dtype=torch.float32))
        self.member_t = member.T.contiguous()  # (C, P): g of a cell to its rows
        self.scales = torch.tensor([math.sqrt(2.0 * lam * s.eta) for lam in lams]).view(-1, 1)  # (L, 1)
        self.noisy = bool((self.scales > 0).any())

    def particles(self) -> Tensor:
        """The particles x ``(L, P, d + 2)`` (a new tensor)."""
        lams, width = self.shape
        x = torch.cat([self.vt.T.reshape(lams, width, -1), self.v3.view(lams, width, 1)], dim=-1)
        if self.noisy:
            x.addcmul_(self.scales.unsqueeze(-1), self.w[self.rows])
        return x.mul_(self.decay)

    def settle(self) -> None:
        """Fold ``decay`` into ``v`` and ``w`` (keeps them from growing over long runs)."""
        for t in (self.vt, self.v3, self.w):
            t.mul_(self.decay)
        self.decay = 1.0

    def outputs(self, zaug: Tensor) -> Tensor:
        """f of every cell on the rows of ``zaug`` (m, p): ``(L, m, C)``."""
        lams, width = self.shape
        zb = zaug[:, :-1]
        pre = (zb @ self.vt).view(-1, lams, width)
        x3 = self.v3.view(lams, width)
        if self.noisy:
            pre.addcmul_(self.scales, (zb @ self.w[:, :-1].T)[:, self.rows].unsqueeze(1))
            x3 = torch.addcmul(x3, self.scales, self.w[self.rows, -1])
        act = pre.mul_(self.decay).tanh_().mul_(torch.tanh(x3 * self.decay))
        return torch.matmul(act, self.weights).transpose(0, 1)

    def block_noise(self, zaug: Tensor, sizes: Sequence[int], c: Tensor,
                    gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Advance the shared noise ``w`` over consecutive steps (step k on the next ``sizes[k]``
        rows of ``zaug`` (m, p), adding ``c[k] * xi_k``, xi_k ~ N(0, I) per row) and return what
        the steps see of it: ``(w_k . zaug_j)`` for every row j of step k, ``(m, max N)``, and
        ``w_k[:, -1]`` (the x3 column), ``(K, max N)``, with w_k the noise before step k.

        A step sees w only through its projection on S = span(the block's inputs, e_x3), so the
        part of xi_k orthogonal to S only matters at the block's end, where the K parts sum to
        one Gaussian of variance sum_k c_k^2 (exact in distribution): with Q an orthonormal basis
        of S (dim m + 1), a block draws K x (m + 1) + (d + 2) numbers per row instead of
        K x (d + 2). When that is not fewer (large blocks) every xi_k is drawn whole.
        """
        top, p = self.w.shape
        m, steps = zaug.shape[0], len(sizes)
        basis = torch.cat([zaug, zaug.new_zeros(1, p)])
        basis[-1, -1] = 1.0  # e_x3: zaug's last column is 0
        start = self.w @ basis.T  # (top, m + 1)
        if steps == 1:  # the step sees only the noise before it
            self.w.add_(torch.randn(top, p, generator=gen), alpha=float(c[0]))
            return start[:, :m].T, start[:, m:].T
        subspace = steps * (m + 1) + p < steps * p
        if subspace:
            q, proj = torch.linalg.qr(basis.T)  # (p, m + 1), (m + 1, m + 1): basis.T = q @ proj
        else:
            q, proj = None, basis.T  # coordinates are xi itself
        a = torch.randn(steps, top, proj.shape[0], generator=gen)
        earlier = torch.ones(steps, steps).tril_(-1).mul_(c)  # (K, K): c_s for s < k
        before = (earlier @ a.view(steps, -1)).view(a.shape)  # (K, top, r): sum_{s < k} c_s a_s
        total = before[-1].add(a[-1], alpha=float(c[-1]))  # sum over the block
        step_of_row = torch.repeat_interleave(torch.arange(steps), torch.tensor(list(sizes)))
        seen = before if steps == m else before[step_of_row]  # (m, top, r)
        pre = torch.bmm(seen, proj[:, :m].T.unsqueeze(-1)).squeeze(-1).add_(start[:, :m].T)  # (m, top)
        x3 = (before @ proj[:, m]).add_(start[:, m])  # (K, top)
        if subspace:
            rest = torch.randn(top, p, generator=gen)
            rest.sub_((rest @ q) @ q.T).mul_(float(c.square().sum().sqrt()))
            self.w.addmm_(total, q.T).add_(rest)
        else:
            self.w.add_(total)
        return pre, x3

    def steps(self, zaug: Tensor, y: Tensor, sizes: Sequence[int], s: GridSettings, shrink: float,
              gen: torch.Generator) -> None:
        """Consecutive MFLD steps, step k on the next ``sizes[k]`` rows of ``zaug`` (m, p) and
        ``y`` (m,), for every cell at once: x <- shrink x - eta D + sqrt(2 lam eta) xi, with D as
        in :func:`drift`.

        The block reads and writes ``v`` once, not once per step: v.z for every row of the
        block is one product up front; step k adds the earlier steps' drifts lazily (their
        coefficients times the Gram matrix of the block's inputs, one product), and the drifts
        are applied together at the end. The noise the steps see is drawn up front
        (:meth:`block_noise`, in chunks of NOISE_ROWS rows).
        """
        lams, width = self.shape
        m = zaug.shape[0]
        zb = zaug[:, :-1]
        pre = (zb @ self.vt).view(m, lams, width)  # v.z_j at the block's start
        gram = zb @ zb.T
        decays = [self.decay]
        for _ in sizes:
            decays.append(decays[-1] * shrink)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        x3_noise = []
        if self.noisy:
            first = 0
            while first < len(sizes):  # chunks of whole steps, about NOISE_ROWS rows each
                last = first + 1
                while last < len(sizes) and bounds[last + 1] - bounds[first] <= NOISE_ROWS:
                    last += 1
                lo, hi = bounds[first], bounds[last]
                c = torch.tensor(decays[first + 1:last + 1]).reciprocal_()
                seen, x3 = self.block_noise(zaug[lo:hi], sizes[first:last], c, gen)
                pre[lo:hi].addcmul_(self.scales, seen[:, self.rows].unsqueeze(1))
                x3_noise += list(x3[:, self.rows])
                first = last
        coefs = torch.empty_like(pre)  # per row: its step's drift coefficient on zaug_j, in units of v
        flat = coefs.view(m, -1)
        v3 = self.v3.view(lams, width)
        for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            rows = hi - lo
            pk = pre[lo:hi]
            if lo > 0:  # the drifts of the block's earlier steps
                pk = torch.addmm(pk.view(rows, -1), gram[lo:hi, :lo], flat[:lo]).view(rows, lams, width)
            act = pk.mul(decays[k]).tanh_()  # (b, L, P)
            x3 = torch.addcmul(v3, self.scales, x3_noise[k]) if self.noisy else v3
            t = x3.mul(decays[k]).tanh_()  # (L, P)
            f = torch.matmul(act * t, self.weights)  # (b, L, C)
            g = _loss_grad(f, y[lo:hi].view(-1, 1, 1), s.loss).mul_(1.0 / rows)
            gp = torch.matmul(g, self.member_t)  # (b, L, P): each row's cell's g
            step = -s.eta / decays[k + 1]  # in units of v
            # x3 column: R (1 - t_i^2) sum_j g_j A_ij
            ga = gp * act
            v3.addcmul_(ga.sum(0) if rows > 1 else ga[0], 1.0 - t * t, value=s.R * step)
            # x1, x2 columns: R t_i g_j (1 - A_ij^2) zaug_j, applied at the block's end
            q = gp.mul_(t).mul_(s.R * step)
            torch.addcmul(q, q * act, act, value=-1.0, out=coefs[lo:hi])
        self.decay = decays[-1]
        self.vt.addmm_(zb.T, flat)


# Rows of inputs per block of steps in :meth:`_GridNetwork.steps` (per-sample steps: 32 steps
# per pass over the particles) and per chunk of noise in :meth:`_GridNetwork.block_noise`
# (per row, 16 per-sample steps draw 16 x 17 + 102 numbers instead of 16 x 102).
BLOCK_ROWS = 32
NOISE_ROWS = 16


def grid_workers() -> int:
    """Default thread count of :func:`train_lambda_grid`: the CPUs this process may use (its
    jobs run single-threaded kernels, so torch's own thread setting does not limit them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_lambda_grid(
    data: Split,
    lams: Sequence[float],
    widths: Sequence[int],
    num_networks: int,
    settings: GridSettings,
    seed: int = 0,
    record_history: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> GridResult:
    """Train ``num_networks`` networks for every (lambda, N) on ``data`` (train split) by MFLD.

    Network b of every cell is trained in one job (:class:`_GridNetwork`): its initial particles
    and noise are seeded from (``seed``, b), its data order from ``seed`` (and b if
    ``settings.order`` is ``"per_network"``), so a job's result does not depend on
    the thread count or the other jobs. ``workers`` threads (default :func:`grid_workers`)
    run the jobs with single-threaded kernels. Per-sample epochs (``batch_size=1``) on the
    paper's grid are 2000 steps of 264 000 particles; see docs/mfnn.md.

    Example:
        >>> from poc_lora.mfnn.data import multi_index
        >>> data = multi_index(n=60, d=5, k=5, rbar=5.0, seed=0)
        >>> res = train_lambda_grid(data, [0.1, 0.001], [10, 20], 3, GridSettings(batch_size=4),
        ...                         progress=False)
        >>> res.predictions[(0.1, 20)].shape
        torch.Size([3, 12])
    """
    s = settings
    lams, widths = [float(v) for v in lams], [int(w) for w in widths]
    z_train = augmented_inputs(data.z_train.float())
    z_test = augmented_inputs(data.z_test.float())
    y_train = data.y_train.float()
    n = len(y_train)
    batch = n if s.batch_size is None else min(s.batch_size, n)
    shrink = 1.0 - 2.0 * s.eta * s.weight_decay
    workers = max(1, workers or grid_workers())
    out: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def run(b: int) -> int:
        net = _GridNetwork(lams, widths, data.dim, s, torch.Generator().manual_seed(derive_seed(seed, "init", b)))
        noise_gen = torch.Generator().manual_seed(derive_seed(seed, "noise", b))
        order_key = ("order", b) if s.order == "per_network" else ("order",)
        order_gen = torch.Generator().manual_seed(derive_seed(seed, *order_key))
        hist = [net.outputs(z_test)] if record_history else []
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=order_gen) if batch < n else torch.arange(n)
            sizes = [min(batch, n - start) for start in range(0, n, batch)]
            per_block = max(1, BLOCK_ROWS // batch)
            first = 0
            for k in range(0, len(sizes), per_block):
                block = sizes[k:k + per_block]
                idx = order[first:first + sum(block)]
                net.steps(z_train[idx], y_train[idx], block, s, shrink, noise_gen)
                first += sum(block)
            net.settle()
            if record_history:
                hist.append(net.outputs(z_test))
        out[b] = (net.outputs(z_test), hist)
        return s.epochs

    with tqdm(total=num_networks * s.epochs, desc="MFLD network-epochs (all lambda, N)",
              disable=not progress) as bar, torch_threads(1):
        if workers == 1:
            for b in range(num_networks):
                bar.update(run(b))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for done in pool.map(run, range(num_networks)):
                    bar.update(done)

    final = torch.stack([out[b][0] for b in range(num_networks)])  # (B, L, n_test, C)
    predictions = {(lam, w): final[:, li, :, ci].contiguous() for li, lam in enumerate(lams)
                   for ci, w in enumerate(widths)}
    history: dict[tuple[float, int], Tensor] = {}
    if record_history:
        per_epoch = torch.stack([torch.stack(out[b][1]) for b in range(num_networks)], dim=1)  # (E+1, B, L, n, C)
        history = {(lam, w): per_epoch[:, :, li, :, ci].contiguous() for li, lam in enumerate(lams)
                   for ci, w in enumerate(widths)}
    return GridResult(lams, widths, predictions, history)
