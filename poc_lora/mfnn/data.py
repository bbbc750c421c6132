"""The paper's two synthetic data sets (Nitanda et al., ICML 2025, arXiv:2502.05784, §5.1 and
Appendix B), seeded, with an 80/20 split.

The multi-index inputs are uniform in the d-ball, as the appendix's text says (its Algorithm 2
as printed takes a fractional power of a Gaussian, which is NaN for negative draws); the
target scale ``rbar / k`` is 1 by default (Algorithm 2's sum of tanh; the main text's
(1/k) sum is ``rbar = 1``).

Example:
    >>> from poc_lora.mfnn.data import double_circle, multi_index
    >>> data = double_circle(seed=0)
    >>> data.z_train.shape, data.z_test.shape
    (torch.Size([160, 2]), torch.Size([40, 2]))
    >>> multi_index(seed=0).z_train.shape
    torch.Size([400, 100])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Inputs ``z`` (n, d) and targets ``y`` (n,) for training and testing."""

    z_train: Tensor
    y_train: Tensor
    z_test: Tensor
    y_test: Tensor

    @property
    def dim(self) -> int:
        return self.z_train.shape[1]


def _split(z: Tensor, y: Tensor, test_fraction: float, generator: torch.Generator) -> Split:
    """Shuffle, then the first (1 - test_fraction) of the points train and the rest test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(len(y), generator=generator)
    z, y = z[order], y[order]
    n_train = len(y) - int(round(test_fraction * len(y)))
    return Split(z[:n_train], y[:n_train], z[n_train:], y[n_train:])


def double_circle(
    n: int = 200,
    noise: float = 0.1,
    radii: tuple[float, float] = (1.0, 2.0),
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Two noisy concentric circles: half the points on radius ``radii[0]`` with label -1,
    half on ``radii[1]`` with label +1, uniform angle, N(0, noise^2) added per coordinate."""
    gen = torch.Generator().manual_seed(seed)
    half = n // 2
    radius = torch.cat([torch.full((half,), radii[0]), torch.full((n - half,), radii[1])])
    label = torch.cat([-torch.ones(half), torch.ones(n - half)])
    angle = 2 * torch.pi * torch.rand(n, generator=gen)
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    z = z + noise * torch.randn(n, 2, generator=gen)
    return _split(z, label, test_fraction, gen)


def multi_index(
    n: int = 500,
    d: int = 100,
    k: int = 100,
    rbar: float = 100.0,
    radius: float = 5.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Inputs uniform in the d-ball of ``radius`` (uniform direction times radius*U^(1/d));
    targets y = (rbar / k) * sum_{j<=k} tanh(z_j)."""
    if not 1 <= k <= d:
        raise ValueError(f"k must be in 1..d={d}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(n, d, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    r = radius * torch.rand(n, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)
    z = direction * r
    y = (rbar / k) * torch.tanh(z[:, :k]).sum(dim=1)
    return _split(z.float(), y.float(), test_fraction, gen)


def make_task_data(task: str, seed: int = 0, **kwargs) -> Split:
    """``double_circle`` for ``"classification"``, ``multi_index`` for ``"regression"``."""
    makers = {"classification": double_circle, "regression": multi_index}
    if task not in makers:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(makers)}")
    return makers[task](seed=seed, **kwargs)
