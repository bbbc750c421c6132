"""Tests of poc_lora.mfnn: drift, noise, merge, data, experiments, CLI, determinism."""

from __future__ import annotations

import copy

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from poc_lora.cli import main as cli_main
from poc_lora.errors import ConfigError, OutputError
from poc_lora.mfnn.config import CONFIG_FILES, PAPER_SETTINGS, resolve_settings
from poc_lora.mfnn.data import double_circle, multi_index
from poc_lora.mfnn.experiments import describe_reading, merge_sup_errors, run_figure1, run_figure2, run_table2
from poc_lora.mfnn.mfld import (Cell, GridSettings, MFLDSettings, _GridNetwork, drift, drift_autograd,
                                train_cells, train_lambda_grid, train_mfld)
from poc_lora.mfnn.model import augmented_inputs, init_particles, merge, predict, prune
from poc_lora.runtime import derive_seed

REPO = Path(__file__).resolve().parents[1]


def _direct_outputs(particles: torch.Tensor, z: torch.Tensor, R: float) -> torch.Tensor:
    """f_b(z_j) = mean_i R tanh(x3) tanh(x1 . z_j + x2), written out independently of the model."""
    d = z.shape[1]
    x1, x2, x3 = particles[..., :d], particles[..., d], particles[..., d + 1]
    pre = torch.einsum("bnd,jd->bnj", x1, z) + x2[..., None]
    return (R * torch.tanh(x3)[..., None] * torch.tanh(pre)).mean(dim=1)


def _objective(particles, z, y, s: MFLDSettings) -> torch.Tensor:
    f = _direct_outputs(particles, z, s.R)
    if s.loss == "logistic":
        loss = torch.log1p(torch.exp(-y * f)).mean(-1)
    else:
        loss = (0.5 if s.loss == "squared" else 1.0) * ((f - y) ** 2).mean(-1)
    return loss + s.weight_decay * (particles**2).sum(-1).mean(-1)


# ------------------------------------------------------------------------ drift, noise
@pytest.mark.parametrize("loss", ["logistic", "squared", "squared_unhalved"])
def test_drift_equals_n_times_gradient(loss):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.sign(torch.randn(30, generator=gen, dtype=torch.float64)) if loss == "logistic" else \
        3 * torch.randn(30, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 9, 5, generator=gen, dtype=torch.float64)
    s = MFLDSettings(eta=0.1, lam=0.01, weight_decay=0.3, epochs=1, loss=loss, R=10.0)
    ours = drift(x, z, y, s)
    torch.testing.assert_close(ours, drift_autograd(x, z, y, s), rtol=1e-9, atol=1e-10)
    # central finite differences of N * objective, on a few coordinates
    width, eps = x.shape[1], 1e-6
    for b, i, k in [(0, 0, 0), (1, 4, 3), (0, 8, 4), (1, 2, 2)]:
        plus, minus = x.clone(), x.clone()
        plus[b, i, k] += eps
        minus[b, i, k] -= eps
        fd = width * (_objective(plus, z, y, s)[b] - _objective(minus, z, y, s)[b]) / (2 * eps)
        assert math.isclose(ours[b, i, k].item(), fd.item(), rel_tol=1e-5, abs_tol=1e-7)


def test_one_step_noise_has_variance_2_lambda_eta():
    gen = torch.Generator().manual_seed(2)
    data = double_circle(seed=0)
    s = MFLDSettings(eta=0.05, lam=0.2, weight_decay=0.1, epochs=1, loss="logistic")
    x0 = torch.randn(4, 5000, 4, generator=gen, dtype=torch.float64)
    x1 = x0.clone()
    train_mfld(x1, data.z_train.double(), data.y_train.double(), s, torch.Generator().manual_seed(3))
    residual = (x1 - (x0 - s.eta * drift(x0, data.z_train.double(), data.y_train.double(), s))).flatten()
    n, target = residual.numel(), 2 * s.lam * s.eta
    assert abs(residual.mean().item()) < 5 * math.sqrt(target / n)
    # the sample variance of n Gaussians has standard deviation target * sqrt(2 / (n - 1))
    assert abs(residual.var().item() - target) < 5 * target * math.sqrt(2 / (n - 1))
    # and lam = 0 is plain gradient descent
    x2 = x0.clone()
    train_mfld(x2, data.z_train.double(), data.y_train.double(), MFLDSettings(0.05, 0.0, 0.1, 1, "logistic"))
    torch.testing.assert_close(x2, x0 - 0.05 * drift(x0, data.z_train.double(), data.y_train.double(),
                                                      MFLDSettings(0.05, 0.0, 0.1, 1, "logistic")))


# ------------------------------------------------------------------------ merge, prune
def test_merge_is_the_average_of_the_networks():
    gen = torch.Generator().manual_seed(4)
    nets = init_particles(5, 30, d=2, generator=gen, dtype=torch.float64)
    z = torch.randn(11, 2, generator=gen, dtype=torch.float64)
    singles = _direct_outputs(nets, z, 10.0)  # (5, 11)
    merged = merge(nets)
    assert merged.shape == (1, 150, 4)
    torch.testing.assert_close(predict(merged, z)[0], singles.mean(0))
    torch.testing.assert_close(predict(nets, z), singles)
    # networks of different widths: every particle weighs 1 / (total particles)
    wide = init_particles(1, 70, d=2, generator=gen, dtype=torch.float64)
    expected = (30 * singles[0] + 70 * _direct_outputs(wide, z, 10.0)[0]) / 100
    torch.testing.assert_close(predict(merge([nets[0], wide]), z)[0], expected)


def test_prune_keeps_distinct_particles_of_each_network():
    nets = init_particles(3, 40, d=2, generator=torch.Generator().manual_seed(5))
    pruned = prune(nets, 10, torch.Generator().manual_seed(6))
    assert pruned.shape == (3, 10, 4)
    for b in range(3):
        rows = {tuple(r.tolist()) for r in nets[b]}
        kept = [tuple(r.tolist()) for r in pruned[b]]
        assert len(set(kept)) == 10 and set(kept) <= rows
    with pytest.raises(ValueError):
        prune(nets, 41)


def test_merge_sup_errors_endpoints():
    gen = torch.Generator().manual_seed(7)
    preds, ref = torch.randn(6, 9, generator=gen), torch.randn(9, generator=gen)
    errors = merge_sup_errors(preds, ref, num_draws=200, generator=gen)
    singles = (preds - ref).abs().amax(-1)
    assert errors.shape == (6,)
    assert math.isclose(errors[-1].item(), (preds.mean(0) - ref).abs().max().item(), rel_tol=1e-6)
    assert singles.min() <= errors[0] <= singles.max()
    assert abs(errors[0].item() - singles.mean().item()) < 0.25 * singles.std().item()


# -------------------------------------------------------------------------------- data
def test_double_circle():
    data = double_circle(seed=0)
    assert data.z_train.shape == (160, 2) and data.z_test.shape == (40, 2)
    y = torch.cat([data.y_train, data.y_test])
    z = torch.cat([data.z_train, data.z_test])
    assert set(y.tolist()) == {-1.0, 1.0} and (y == 1).sum() == 100
    assert 0.25 < (data.y_test == 1).float().mean() < 0.75  # shuffled before the split
    r_inner, r_outer = z[y == -1].norm(dim=1), z[y == 1].norm(dim=1)
    assert abs(r_inner.mean() - 1) < 0.05 and abs(r_outer.mean() - 2) < 0.05
    assert r_inner.max() < 1.5 < r_outer.min()
    assert torch.equal(double_circle(seed=0).z_test, data.z_test)
    assert not torch.equal(double_circle(seed=1).z_test, data.z_test)


def test_multi_index():
    data = multi_index(seed=0)
    assert data.z_train.shape == (400, 100) and data.z_test.shape == (100, 100)
    z = torch.cat([data.z_train, data.z_test]).double()
    y = torch.cat([data.y_train, data.y_test]).double()
    norms = z.norm(dim=1)
    assert norms.max() <= 5 + 1e-5
    assert abs(norms.mean().item() - 5 * 100 / 101) < 0.05  # uniform in the ball: E r = R d / (d + 1)
    torch.testing.assert_close(y, torch.tanh(z).sum(1), rtol=1e-5, atol=1e-4)  # (100 / 100) sum_j tanh z_j
    small = multi_index(n=50, d=10, k=3, rbar=6.0, radius=2.0, seed=1)
    zs = torch.cat([small.z_train, small.z_test])
    torch.testing.assert_close(torch.cat([small.y_train, small.y_test]), 2.0 * torch.tanh(zs[:, :3]).sum(1))
    assert zs.norm(dim=1).max() <= 2 + 1e-6


# ---------------------------------------------------------------------- determinism
def test_cells_do_not_depend_on_thread_count():
    data = double_circle(seed=0)
    s = MFLDSettings(eta=0.1, lam=0.01, weight_decay=0.1, epochs=15, loss="logistic")
    cells = [Cell(("N", 40), 9, 40, s), Cell(("wide",), 1, 300, s)]
    one = train_cells(cells, data, seed=3, workers=1, progress=False)
    two = train_cells(cells, data, seed=3, workers=2, progress=False)
    alone = train_cells(cells[1:], data, seed=3, workers=2, progress=False)
    for a, b in zip(one, two):
        assert torch.equal(a.particles, b.particles)
    assert torch.equal(one[1].particles, alone[0].particles)  # a cell's result ignores the other cells
    other = train_cells(cells[:1], data, seed=4, progress=False)
    assert not torch.equal(one[0].particles, other[0].particles)


# ----------------------------------------------------------------- experiments, CLI
def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_figure1_quick_writes_files_and_shows_the_trends(tmp_path):
    out = tmp_path / "mfnn"
    assert cli_main(["mfnn", "figure1", "--quick", "--output", str(out)]) == 0
    for ext in ("csv", "md", "png", "json"):
        assert (out / f"figure1_classification.{ext}").stat().st_size > 0
    rows = _read_csv(out / "figure1_classification.csv")
    quick = PAPER_SETTINGS["figure1_classification"]["quick"]
    assert list(rows[0]) == ["task", "N", "M", "log_sup_norm"]
    assert len(rows) == len(quick["widths"]) * quick["num_networks"]
    value = {(int(r["N"]), int(r["M"])): float(r["log_sup_norm"]) for r in rows}
    m_max, widths = quick["num_networks"], quick["widths"]
    for n in widths:
        assert value[(n, m_max)] < value[(n, 1)] - 0.3  # merging many networks is clearly closer
    mean_over_m = {n: sum(value[(n, m)] for m in range(1, m_max + 1)) / m_max for n in widths}
    assert mean_over_m[max(widths)] < mean_over_m[min(widths)]
    meta = json.loads((out / "figure1_classification.json").read_text())
    assert meta["settings"]["widths"] == widths and meta["settings"]["quick_mode"] is True
    assert meta["timing"]["wall_time_s"] > 0 and meta["summary"]["m_trend"] is True
    # refuses to overwrite, then overwrites when asked
    assert cli_main(["mfnn", "figure1", "--quick", "--output", str(out)]) == 1
    assert cli_main(["mfnn", "figure1", "--quick", "--output", str(out), "--overwrite"]) == 0


def test_figure1_is_deterministic_by_seed(tmp_path):
    small = {"wide_width": 300, "widths": [10, 30], "num_networks": 4, "num_draws": 5, "epochs": 20}
    texts = []
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        run_figure1("classification", config=small, output=tmp_path / name, seed=seed, progress=False)
        texts.append((tmp_path / name / "figure1_classification.csv").read_text())
    assert texts[0] == texts[1] and texts[0] != texts[2]


_SMALL_GRID = {"widths": [20, 40], "num_networks": 3, "lams": [0.1, 0.001], "num_seeds": 2, "epochs": 2,
               "batch_size": 8, "data": {"n": 100, "d": 10, "k": 10}}


def test_lambda_grid_files(tmp_path):
    fig2 = run_figure2(config=_SMALL_GRID, output=tmp_path, progress=False)
    rows = _read_csv(tmp_path / "figure2.csv")
    assert list(rows[0]) == ["lambda", "N", "epoch", "log_mse_mean", "log_mse_sd", "seeds"]
    assert len(rows) == 2 * 2 * 3 == len(fig2["rows"]) and {r["seeds"] for r in rows} == {"2"}
    assert (tmp_path / "figure2.png").stat().st_size > 0
    assert fig2["reading"] == describe_reading(resolve_settings("lambda_grid", _SMALL_GRID))
    t2 = run_table2(config=_SMALL_GRID, output=tmp_path, progress=False)
    rows = _read_csv(tmp_path / "table2.csv")
    assert list(rows[0]) == ["lambda", "N", "mse_mean", "mse_sd", "seeds", "paper_mse", "ratio_to_paper"]
    assert len(rows) == 4 and all(float(r["mse_mean"]) > 0 for r in rows)
    # mean and sample sd of the per-seed values in the JSON
    for r in rows:
        values = t2["summary"]["per_seed_mse"][f"{float(r['lambda']):g}/N={r['N']}"]
        assert float(r["mse_mean"]) == pytest.approx(sum(values) / 2)
        assert float(r["mse_sd"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    md = (tmp_path / "table2.md").read_text()
    assert t2["reading"] in md and "| 0.1 |" in md and "±" in md
    assert "(0.9132" not in md  # the paper's values only beside the paper's widths
    assert json.loads((tmp_path / "table2.json").read_text())["settings"]["lams"] == [0.1, 0.001]


def test_table2_compares_with_the_paper_and_counts_monotone_columns(tmp_path):
    config = {**_SMALL_GRID, "widths": [300, 400], "lams": [0.1, 0.01, 0.001], "num_networks": 2,
              "epochs": 1, "batch_size": 40}
    result = run_table2(config=config, output=tmp_path, progress=False)
    rows = _read_csv(tmp_path / "table2.csv")
    mse = {(float(r["lambda"]), int(r["N"])): float(r["mse_mean"]) for r in rows}
    paper = {(0.1, 300): 0.9132, (0.01, 300): 1.2325, (0.001, 300): 1.5718,
             (0.1, 400): 0.9041, (0.01, 400): 1.2230, (0.001, 400): 1.5669}  # the paper's Table 2
    for r in rows:
        key = (float(r["lambda"]), int(r["N"]))
        assert float(r["paper_mse"]) == paper[key]
        assert float(r["ratio_to_paper"]) == pytest.approx(mse[key] / paper[key])
    falling = sum(mse[(0.1, w)] < mse[(0.01, w)] < mse[(0.001, w)] for w in (300, 400))
    assert result["summary"]["monotone_columns"] == falling
    md = (tmp_path / "table2.md").read_text()
    assert f"**{falling} of 2**" in md
    assert f"{mse[(0.1, 300)]:.3f} ± " in md and f"(0.9132, ×{mse[(0.1, 300)] / 0.9132:.2f})" in md


def test_lambda_grid_is_deterministic_by_seed_and_thread_count(tmp_path):
    texts = []
    for name, seed, workers in [("a", 0, 1), ("b", 0, 2), ("c", 5, 2)]:
        run_table2(config={**_SMALL_GRID, "workers": workers}, output=tmp_path / name, seed=seed, progress=False)
        texts.append((tmp_path / name / "table2.csv").read_bytes())
    assert texts[0] == texts[1] and texts[0] != texts[2]


def _reference_sgd(x: torch.Tensor, data, s: GridSettings, order_seed: int, lam: float = 0.0) -> torch.Tensor:
    """Per-sample (or mini-batch) epochs written as a loop of one-step train_mfld calls."""
    gen = torch.Generator().manual_seed(order_seed)
    n = len(data.y_train)
    batch = s.batch_size or n
    step = MFLDSettings(eta=s.eta, lam=lam, weight_decay=s.weight_decay, epochs=1, loss=s.loss, R=s.R)
    for _ in range(s.epochs):
        order = torch.randperm(n, generator=gen) if batch < n else torch.arange(n)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            train_mfld(x, data.z_train[idx], data.y_train[idx], step)
    return x


@pytest.mark.parametrize("batch_size,loss,order", [(None, "squared", "shared"), (1, "squared", "shared"),
                                                   (1, "squared", "per_network"), (7, "squared_unhalved", "shared")])
def test_grid_trainer_equals_one_network_at_a_time(batch_size, loss, order):
    """Without noise, every (lambda, N) cell of the vectorised grid trainer (blocks of steps,
    shared initial draw) equals the same network trained alone by train_mfld, step by step."""
    data = multi_index(n=60, d=5, k=5, rbar=5.0, seed=0)
    s = GridSettings(eta=0.005, weight_decay=0.1, epochs=2, loss=loss, batch_size=batch_size, init_std=0.7,
                     order=order)
    result = train_lambda_grid(data, [0.0], [7, 13], 2, s, seed=3, workers=2, progress=False)
    for b in range(2):
        x0 = 0.7 * torch.randn(13, 7, generator=torch.Generator().manual_seed(derive_seed(3, "init", b)))
        order_seed = derive_seed(3, "order", b) if order == "per_network" else derive_seed(3, "order")
        for w in (7, 13):
            x = _reference_sgd(x0[:w].clone().unsqueeze(0), data, s, order_seed)
            torch.testing.assert_close(result.predictions[(0.0, w)][b], predict(x, data.z_test)[0],
                                       rtol=1e-4, atol=1e-4)


def test_grid_noise_is_shared_and_has_variance_2_lambda_eta():
    """One full-batch step at two temperatures: the residual after the drift is sqrt(2 lam eta)
    times one standard normal draw shared by every lambda and width (common random numbers)."""
    data = multi_index(n=40, d=3, k=3, rbar=3.0, seed=0)
    s = GridSettings(eta=0.02, weight_decay=0.3, epochs=1, batch_size=None)
    lams, widths = [0.5, 0.02], [3000, 5000]
    net = _GridNetwork(lams, widths, data.dim, s, torch.Generator().manual_seed(0))
    x0 = net.particles().clone()
    zaug = augmented_inputs(data.z_train)
    net.steps(zaug, data.y_train, [len(data.y_train)], s, 1 - 2 * s.eta * s.weight_decay, torch.Generator().manual_seed(1))
    x1 = net.particles()
    rows = [0, 3000, 8000]  # cell boundaries
    residuals = []
    for li, lam in enumerate(lams):
        for c, w in enumerate(widths):
            cell0 = x0[li, rows[c]:rows[c + 1]].unsqueeze(0)
            expected = cell0 - s.eta * drift(cell0.double(), data.z_train.double(), data.y_train.double(),
                                              MFLDSettings(s.eta, lam, s.weight_decay, 1, s.loss, s.R)).float()
            r = (x1[li, rows[c]:rows[c + 1]] - expected[0]) / math.sqrt(2 * lam * s.eta)
            residuals.append(r)
            n = r.numel()
            assert abs(r.mean().item()) < 5 / math.sqrt(n)
            assert abs(r.var().item() - 1) < 5 * math.sqrt(2 / (n - 1))
    # the same draw: lambda 0.5 and 0.02 at N = 3000, and the first 3000 rows of N = 5000
    torch.testing.assert_close(residuals[0], residuals[2], atol=2e-3, rtol=0)
    torch.testing.assert_close(residuals[0], residuals[3][:3000], atol=2e-3, rtol=0)


def test_grid_block_noise_has_the_covariance_of_explicit_draws():
    """block_noise draws only the noise's projection on the block's inputs (plus a remainder at the
    block's end); what the steps see and the final w must have exactly the joint law of
    w_k = sum_{s<k} c_s xi_s with xi_s ~ N(0, I) drawn whole (covariance by formula)."""
    data = multi_index(n=40, d=10, k=10, rbar=10.0, seed=0)
    s = GridSettings(eta=0.02, weight_decay=0.3, epochs=1, batch_size=1)
    net = _GridNetwork([0.1], [20000], data.dim, s, torch.Generator().manual_seed(0))
    zaug = augmented_inputs(data.z_train[:4])
    c = torch.tensor([1.0, 1.2, 0.7, 1.5])
    pre, x3 = net.block_noise(zaug, [1, 1, 1, 1], c, torch.Generator().manual_seed(1))
    p = zaug.shape[1]
    assert 4 * (4 + 1) + p < 4 * p  # the subspace path
    # features per row: w_j . zaug_j (j = 0..3), w_k[:, -1] (k = 0..3), w_end (p columns)
    feats = torch.cat([pre.T, x3.T, net.w], dim=1).double()
    units = [zaug[j] for j in range(4)] + [torch.eye(p)[-1]] * 4 + list(torch.eye(p))
    steps = [0, 1, 2, 3, 0, 1, 2, 3] + [4] * p  # how many noise draws each feature has seen
    var = torch.cat([torch.zeros(1), c.square().cumsum(0)]).double()
    expected = torch.tensor([[float(var[min(a, b)]) * float(u @ v) for b, v in zip(steps, units)]
                             for a, u in zip(steps, units)], dtype=torch.float64)
    empirical = feats.T @ feats / feats.shape[0]
    scale = expected.diagonal().clamp(min=1.0).sqrt()
    torch.testing.assert_close(empirical / scale[:, None] / scale[None, :],
                               expected / scale[:, None] / scale[None, :], atol=0.06, rtol=0)


def test_grid_trainer_with_noise_equals_autograd_steps(monkeypatch):
    """Per-sample noisy steps of the grid trainer (blocks, transposed storage, lazy in-block
    drifts, decay folding) equal plain steps x <- x - eta N grad (autograd) + sqrt(2 lam eta) xi
    of each (lambda, N) network alone, given the same xi (drawn whole, recorded)."""
    draws: list[torch.Tensor] = []

    def explicit_noise(self, zaug, sizes, c, gen):
        pre, x3, lo = [], [], 0
        for k, size in enumerate(sizes):
            pre.append(zaug[lo:lo + size] @ self.w.T)
            x3.append(self.w[:, -1].clone())
            xi = torch.randn(self.w.shape, generator=gen)
            draws.append(xi)
            self.w.add_(xi, alpha=float(c[k]))
            lo += size
        return torch.cat(pre), torch.stack(x3)

    monkeypatch.setattr(_GridNetwork, "block_noise", explicit_noise)
    data = multi_index(n=50, d=5, k=5, rbar=5.0, seed=0)
    s = GridSettings(eta=0.01, weight_decay=0.1, epochs=2, batch_size=1, init_std=0.8)
    lams, widths = [0.05, 0.001], [7, 13]
    result = train_lambda_grid(data, lams, widths, 1, s, seed=4, workers=1, progress=False)
    n = len(data.y_train)
    assert len(draws) == s.epochs * n
    x0 = 0.8 * torch.randn(13, 7, generator=torch.Generator().manual_seed(derive_seed(4, "init", 0)))
    step = MFLDSettings(eta=s.eta, lam=0.0, weight_decay=s.weight_decay, epochs=1, loss=s.loss, R=s.R)
    for lam in lams:
        for w in widths:
            x = x0[:w].double().unsqueeze(0)
            gen, k = torch.Generator().manual_seed(derive_seed(4, "order")), 0
            for _ in range(s.epochs):
                for j in torch.randperm(n, generator=gen).tolist():
                    z, y = data.z_train[j:j + 1].double(), data.y_train[j:j + 1].double()
                    x = x - s.eta * drift_autograd(x, z, y, step) + math.sqrt(2 * lam * s.eta) * draws[k][:w].double()
                    k += 1
            torch.testing.assert_close(result.predictions[(lam, w)][0].double(),
                                       predict(x, data.z_test.double())[0], rtol=1e-4, atol=1e-4)


def test_describe_reading_follows_the_settings():
    default = describe_reading(resolve_settings("lambda_grid"))
    assert default.startswith("epoch = 400 steps of 1 sample") and "(f-y)^2/2" in default
    assert "data order shared by the networks" in default
    other = describe_reading(resolve_settings("lambda_grid", {"batch_size": None, "loss": "squared_unhalved",
                                                              "init_std": 0.5, "data": {"rbar": 1.0}}))
    assert other.startswith("epoch = 1 full-batch step") and "loss (f-y)^2," in other
    assert "N(0, 0.5^2 I)" in other and "y = 0.01 sum_j tanh(z_j)" in other


def test_readings_configs_are_valid_and_distinct():
    paths = sorted((REPO / "configs" / "mfnn" / "readings").glob("*.yaml"))
    assert len(paths) >= 5
    readings = [describe_reading(resolve_settings("lambda_grid", p)) for p in paths]
    assert len(set(readings)) == len(readings)
    assert describe_reading(resolve_settings("lambda_grid", REPO / "configs/mfnn/readings/per_sample.yaml")) \
        == describe_reading(resolve_settings("lambda_grid"))  # the default reading


def test_experiments_refuse_an_existing_output_clearly(tmp_path, capsys):
    small = {"wide_width": 50, "widths": [10], "num_networks": 2, "num_draws": 2, "epochs": 2}
    out = tmp_path / "mfnn"
    run_figure1("classification", config=small, output=out, progress=False)
    with pytest.raises(OutputError, match="figure1_classification.csv already exists"):
        run_figure1("classification", config=small, output=out, progress=False)
    assert cli_main(["mfnn", "figure1", "--quick", "--output", str(out)]) == 1
    assert "error:" in capsys.readouterr().err
    (out / "table2.csv").mkdir()  # a directory where a result file goes: refused even with overwrite
    with pytest.raises(OutputError, match="is a directory"):
        run_table2(config=_SMALL_GRID, output=out, overwrite=True, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        run_figure2(config=_SMALL_GRID, output=blocker, progress=False)
    assert blocker.read_text() == "x"


# ------------------------------------------------------------------------------ config
def test_config_files_keep_the_paper_settings():
    # One source: the templates set nothing the paper's settings do not already hold (figure1's
    # task picks which), so loading one gives PAPER_SETTINGS itself, plain and --quick.
    for experiment, name in CONFIG_FILES.items():
        path = REPO / "configs" / "mfnn" / name
        loaded = yaml.safe_load(path.read_text())
        key = "lambda_grid" if experiment == "table2" else experiment
        assert set(loaded) <= {"task"} and loaded.get("task", PAPER_SETTINGS[key]["task"]) == PAPER_SETTINGS[key]["task"]
        for quick in (False, True):
            expected = copy.deepcopy(PAPER_SETTINGS[key])
            quick_section = expected.pop("quick")
            if quick:
                for k, v in quick_section.items():
                    expected[k] = v
            assert resolve_settings(key, path, quick=quick) == {**expected, "quick_mode": quick}, name


def test_mfnn_cli_keys_override_the_paper_settings_last():
    """`poc-lora mfnn figure2 --epochs 3 --data.n 300 --quick`: the keys win over --quick's grid."""
    from poc_lora.cli import parse_command
    from poc_lora.mfnn.config import with_overrides

    args, sections = parse_command("mfnn", ["figure2", "--quick", "--epochs", "3", "--mfnn.data.n", "300",
                                            "--widths", "50,60"])
    assert sections == {"mfnn": {"epochs": 3, "data.n": 300, "widths": [50, 60]}}
    settings = resolve_settings("figure2", with_overrides(args.config, sections["mfnn"], "figure2"), quick=True)
    paper = PAPER_SETTINGS["figure2"]
    assert settings["epochs"] == 3 and settings["widths"] == [50, 60] and settings["data"]["n"] == 300
    assert settings["data"]["d"] == paper["data"]["d"]  # the other data keys stay the paper's
    assert settings["lams"] == paper["quick"]["lams"]  # --quick's other reductions still apply


def test_bad_config_key_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eta: 0.1\nepoch: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'epoch'"):
        resolve_settings("figure1_classification", bad)
    with pytest.raises(ConfigError, match=r"'data\.radius'"):
        resolve_settings("figure1_classification", {"data": {"radius": 3}})
    with pytest.raises(ConfigError, match=r"'quick\.widht'"):
        resolve_settings("lambda_grid", {"quick": {"widht": [3]}})
    with pytest.raises(ConfigError, match=r"'eta'"):
        resolve_settings("lambda_grid", {"eta": -1})
    assert cli_main(["mfnn", "table2", "--config", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()
