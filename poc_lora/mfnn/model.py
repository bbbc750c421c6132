"""Two-layer mean-field networks: the neuron, batched prediction, merging and pruning.

A network of N neurons is a tensor of N particles ``x = (x1, x2, x3)`` with ``x1`` in R^d,
laid out as the rows of an ``(N, d + 2)`` matrix; B networks of the same width are one
``(B, N, d + 2)`` tensor. The network's output is the mean of its neurons,

    f(z) = (1/N) sum_i h(x_i, z),     h(x, z) = R tanh(x3) tanh(x1^T z + x2),

so merging M networks (Nitanda et al., ICML 2025, arXiv:2502.05784, §3) is concatenating their particles: the mean over all
M*N particles puts weight 1/(MN) on each, which equals the average of the M outputs.

Example:
    >>> import torch
    >>> from poc_lora.mfnn.model import init_particles, predict, merge
    >>> nets = init_particles(3, 50, d=2, generator=torch.Generator().manual_seed(0))
    >>> z = torch.randn(7, 2)
    >>> predict(merge(nets), z).shape, predict(nets, z).shape
    (torch.Size([1, 7]), torch.Size([3, 7]))
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_R = 10.0


def init_particles(
    num_networks: int,
    width: int,
    d: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Draw ``num_networks`` networks of ``width`` particles from N(0, I) (the paper does not state its initialisation).

    Returns a ``(num_networks, width, d + 2)`` tensor; column ``d`` is x2, column ``d + 1`` is x3.
    """
    return torch.randn(num_networks, width, d + 2, generator=generator, dtype=dtype, device=device)


def augmented_inputs(z: Tensor) -> Tensor:
    """``[z, 1, 0]`` per input row: ``particles @ augmented_inputs(z).T`` is x1^T z + x2.

    The constant 1 picks up the bias x2 and the 0 hides x3, so one matrix product gives
    every pre-activation without slicing the particle tensor (slices would force copies).
    """
    n = z.shape[0]
    return torch.cat([z, z.new_ones(n, 1), z.new_zeros(n, 1)], dim=1)


def neurons(particles: Tensor, z: Tensor, R: float = DEFAULT_R) -> Tensor:
    """Every neuron's output h(x_i, z_j): shape ``particles.shape[:-1] + (n,)``."""
    pre = particles @ augmented_inputs(z).T
    return R * torch.tanh(particles[..., -1:]) * torch.tanh(pre)


def predict(particles: Tensor, z: Tensor, R: float = DEFAULT_R) -> Tensor:
    """Outputs f(z_j) of each network: ``(B, N, d + 2)`` particles -> ``(B, n)``.

    Computed as ``(R tanh(x3))^T tanh(pre) / N`` per network (one batched product) rather
    than by materialising every h(x_i, z_j) as :func:`neurons` does.
    """
    if particles.dim() == 2:
        return predict(particles.unsqueeze(0), z, R).squeeze(0)
    width = particles.shape[-2]
    pre = torch.tanh(particles @ augmented_inputs(z).T)  # (B, N, n)
    outer = (R / width) * torch.tanh(particles[..., -1]).unsqueeze(-2)  # (B, 1, N)
    return torch.bmm(outer, pre).squeeze(-2)


def merge(particles: Tensor | list[Tensor]) -> Tensor:
    """PoC merge: concatenate the particles of M networks into one network of M*N particles.

    Accepts a ``(M, N, p)`` tensor or a list of ``(N_j, p)`` / ``(1, N_j, p)`` tensors (widths
    may differ; then each particle gets weight 1/sum_j N_j, i.e. the networks are weighted by
    width). Returns ``(1, M*N, p)``: its :func:`predict` is the mean of the networks' outputs.
    """
    if isinstance(particles, Tensor):
        return particles.reshape(1, -1, particles.shape[-1])
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in particles], dim=0).unsqueeze(0)


def prune(particles: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Random pruning: keep ``size`` particles of each network, drawn without replacement.

    ``(B, N, p)`` -> ``(B, size, p)``; every network gets its own random subset.
    """
    batch, width, _ = particles.shape
    if not 0 < size <= width:
        raise ValueError(f"prune size must be in 1..{width}, got {size}")
    keys = torch.rand(batch, width, generator=generator, device=particles.device)
    keep = keys.argsort(dim=1)[:, :size]
    return torch.gather(particles, 1, keep.unsqueeze(-1).expand(-1, -1, particles.shape[-1]))
