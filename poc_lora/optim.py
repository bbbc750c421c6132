"""NoisyAdamW: torch's AdamW followed by Langevin noise (mean-field Langevin dynamics for LoRA).

One step is exactly ``torch.optim.AdamW.step`` (torch's own single-tensor / foreach / fused
kernels), then every parameter that has a gradient receives

    p <- p + sqrt(2 * lr * temperature) * xi,        xi ~ N(0, I) per element,

with ``lr`` the group's learning rate in force at that step (so LR schedulers scale the noise)
and ``temperature`` a per-group option (0 = plain AdamW, bit for bit).

Noise layout (what makes runs reproducible and resumable)
--------------------------------------------------------
* Stream key: the noise of a parameter comes from a stream chosen by (its device *slot*: the
  order in which devices of a type first appear in ``param_groups``, so ``cuda:0`` on rank 0 and
  ``cuda:1`` on rank 1 are both slot 0; its draw dtype: float64 for float64 parameters, float32
  otherwise; its shard key: empty for ordinary tensors, the mesh coordinates along sharded mesh
  dimensions for DTensor parameters, the shard's start offset for FSDP1 ``FlatParameter``s).
* Per step: each stream's ``torch.Generator`` is re-seeded with ``mix(seed, noise_step, key)``
  (counter-based seeding). Resuming therefore needs only ``seed`` and ``noise_step`` (saved in
  ``state_dict()["noise"]``), works across ranks and devices that hold different generator
  objects, and never depends on how many numbers an earlier step drew.
* Within a step, the stream's parameters (param-group order, then parameter order; complex
  parameters as their real view) are laid end to end and filled from one reused buffer of at most
  ``NOISE_CHUNK_NUMEL[device type]`` elements with ``buf.normal_(generator=g)``, chunk after
  chunk. The chunk size is part of the layout (torch's samplers are not split-invariant), so it
  is a fixed constant saved in the state dict; noise memory is one chunk per (device, dtype).

Example:
    >>> import torch
    >>> from poc_lora.optim import NoisyAdamW
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> opt = NoisyAdamW([w], lr=1e-3, temperature=1e-5, seed=0)
    >>> w.grad = torch.ones(3); opt.step()
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import AdamW
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from .errors import ConfigError
from .runtime import derive_seed

logger = logging.getLogger(__name__)

# Elements per noise chunk, by device type. On a CPU 1 Mi (4 MiB of float32) keeps the buffer
# cache-resident between the draw and the add and measured fastest (1/4 Mi and 4 Mi were ~5-10%
# slower; far smaller chunks much slower); on accelerators 16 Mi keeps kernel launches few even
# for full fine-tuning. Memory for noise stays bounded by one chunk per (device, dtype). The
# sizes shape the noise values, so the ones in use are saved in the state dict.
NOISE_CHUNK_NUMEL = {"cpu": 1 << 20, "default": 1 << 24}
_STATE_KEY = "noise"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _unhooked(fn: Callable) -> Callable:
    """The function under torch's per-class step-profiling wrapper (see ``NoisyAdamW.step``)."""
    while getattr(fn, "hooked", False):
        fn = fn.__wrapped__
    return fn


def _draw_seed() -> int:
    """A seed from torch's global RNG; under torch.distributed rank 0's value is broadcast."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)  # replicas must draw identical noise
        seed = int(box[0])
    return seed


def _listed(item: Any) -> Any:
    if isinstance(item, dict) and not isinstance(item["params"], torch.Tensor):
        return {**item, "params": list(item["params"])}
    if isinstance(item, dict):
        return {**item, "params": [item["params"]]}
    return item


def _fused_supported(params: list) -> bool | None:
    """True when torch's fused AdamW kernel takes every parameter (a real float tensor on a device
    with fused kernels), else None (torch's own default). Defaulting to fused matches Trainer's
    default ``optim="adamw_torch_fused"``; on a CPU torch's default is a per-tensor loop ~3x slower."""
    devices = set(_get_fused_kernels_supported_devices())
    tensors = []
    for item in params:
        tensors += item["params"] if isinstance(item, dict) else [item]
    tensors = [t[1] if isinstance(t, tuple) else t for t in tensors]  # (name, tensor) pairs
    ok = bool(tensors) and all(
        t.device.type in devices and torch.is_floating_point(t) for t in tensors)
    return True if ok else None


def _check_nonneg(name: str, value: Any) -> None:
    if not float(value) >= 0.0:  # also rejects NaN
        raise ValueError(f"NoisyAdamW: {name} must be >= 0, got {value!r}")


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor  # lazy: torch builds without distributed lack it

    return DTensor


def _flat_shard_key(p: torch.Tensor) -> tuple:
    """Shard key of an FSDP1 ``FlatParameter`` (``use_orig_params=False``): where this rank's
    shard starts in the padded unsharded flat parameter.

    FSDP1 hands the optimizer one 1-D local shard per rank, all with the same shape; keyed by
    nothing, every rank would draw the same noise. The start offset differs between shards and
    is equal between replicas of one shard (HYBRID_SHARD, NO_SHARD), exactly as the DTensor key.
    It is found from FSDP's own per-parameter shard records (``_shard_param_infos``).
    """
    infos = getattr(p, "_shard_param_infos", None)
    numels = getattr(p, "_numels_with_padding", None)
    padding = getattr(p, "_is_padding_mask", None)
    if infos is None or numels is None or padding is None:
        raise ConfigError(
            "NoisyAdamW: got an FSDP1 FlatParameter without FSDP's shard records, so it cannot give each "
            "shard its own noise; use FSDP2 (fully_shard) or FSDP1 with use_orig_params=True")
    starts, offset = [], 0
    for numel, is_pad in zip(numels, padding):  # global start of each original (non-padding) parameter
        if not is_pad:
            starts.append(offset)
        offset += numel
    for start, info in zip(starts, infos):
        if info.in_shard:
            return (("flat_shard", start + info.intra_param_start_idx - info.offset_in_shard),)
    return (("flat_shard", "padding"),)  # a shard of padding only: its noise reaches no parameter


def _local_and_shard_key(p: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
    """The tensor to add noise to and its shard key (see the module docstring)."""
    key: tuple = ()
    if getattr(p, "_is_flat_param", False):  # what isinstance(p, FlatParameter) checks
        return p, _flat_shard_key(p)
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(p, dtensor):
        coord = p.device_mesh.get_coordinate()
        if coord is None:  # this rank holds no piece of the parameter
            return None, ()
        key = tuple((d, coord[d]) for d, pl in enumerate(p.placements) if pl.is_shard())
        p = p.to_local()
    return (torch.view_as_real(p) if p.is_complex() else p), key


class NoisyAdamW(AdamW):
    """AdamW plus Langevin noise ``sqrt(2 * lr * temperature) * N(0, I)`` after every step.

    Args:
        params: parameters or param-group dicts (a group may set its own ``temperature``).
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused: as ``torch.optim.AdamW``,
            except that with neither ``foreach`` nor ``fused`` given it uses the fused kernel when
            every parameter supports it (as Trainer's default ``adamw_torch_fused`` does). With
            the same explicit choice and ``temperature=0`` every step is bit-identical to AdamW.
        temperature: Langevin temperature (the paper's lambda); 0 disables the noise.
        seed: seed of the noise streams; ``None`` draws one from torch's global RNG (rank 0's
            draw is broadcast when torch.distributed is initialised, so DDP replicas agree).

    Example:
        >>> opt = NoisyAdamW(model.parameters(), lr=3e-4, temperature=1e-5, seed=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        temperature: float = 1e-5,
        *,
        seed: int | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        # Our own messages first: torch's say "Invalid learning rate" without the argument name.
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("temperature", temperature)):
            _check_nonneg(name, value)
        if len(betas) != 2:
            raise ValueError(f"NoisyAdamW: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"NoisyAdamW: betas[{i}] must be in [0, 1), got {beta!r}")
        if seed is not None:
            try:
                seed = operator.index(seed)  # ints, numpy ints; not floats or strings
            except TypeError:
                raise TypeError(f"NoisyAdamW: seed must be an int or None, got {type(seed).__name__}") from None
        self._temperature_default = temperature  # read by add_param_group during super().__init__
        if isinstance(params, torch.Tensor):
            raise TypeError("NoisyAdamW: params must be an iterable of tensors or dicts, got a single tensor")
        params = [_listed(item) for item in params]  # generators inside groups are read once
        if fused is None and foreach is None:
            fused = _fused_supported(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, fused=fused)
        self.defaults["temperature"] = temperature
        self.noise_seed = _draw_seed() if seed is None else seed
        self.noise_step = 0
        self.noise_chunk_numel = dict(NOISE_CHUNK_NUMEL)  # device type (or "default") -> elements
        self._generators: dict[tuple, torch.Generator] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._low_precision_warned = False
        self.last_noise_scales: list[float] = []  # per param group, of the latest step (for logging)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault("temperature", self._temperature_default)
        _check_nonneg("temperature", param_group["temperature"])
        super().add_param_group(param_group)

    # -- state -------------------------------------------------------------------------------

    _NOISE_ATTRS = ("noise_seed", "noise_step", "noise_chunk_numel", "_temperature_default")

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy keep the noise stream
        return {**super().__getstate__(), **{a: getattr(self, a) for a in self._NOISE_ATTRS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict with state/param_groups only
        for attr, default in (("_generators", {}), ("_buffers", {}), ("_low_precision_warned", False),
                              ("last_noise_scales", [])):
            self.__dict__.setdefault(attr, default)

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state dict plus ``"noise"``: seed, step counter and chunk size (plain ints only,
        so ``torch.load(..., weights_only=True)`` reads it, as Trainer does)."""
        sd = super().state_dict()
        sd[_STATE_KEY] = {"seed": self.noise_seed, "step": self.noise_step,
                          "chunk_numel": dict(self.noise_chunk_numel)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        noise = state_dict.get(_STATE_KEY)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _STATE_KEY})
        if noise is None:
            logger.warning("NoisyAdamW.load_state_dict: no %r entry (a plain AdamW state?); keeping seed %d, "
                           "noise step %d", _STATE_KEY, self.noise_seed, self.noise_step)
            return
        self.noise_seed, self.noise_step = int(noise["seed"]), int(noise["step"])
        self.noise_chunk_numel = {k: int(v) for k, v in noise.get("chunk_numel", NOISE_CHUNK_NUMEL).items()}
        self._buffers.clear()

    # -- step --------------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One AdamW step (torch's kernels), then the Langevin noise; returns the closure's loss."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"NoisyAdamW does not support sparse gradients (param_groups[{gi}]['params'][{pi}], "
                        f"shape {tuple(p.shape)}); use a dense layer, e.g. nn.Embedding(..., sparse=False)")
        # Call AdamW's step function itself: ``super().step`` may be torch's profiling wrapper
        # (installed once an AdamW instance exists), which would run step hooks a second time.
        loss = _unhooked(AdamW.step)(self, closure)
        if self._update_was_skipped():
            return loss
        with torch.no_grad():
            self._add_noise()
        self.noise_step += 1
        return loss

    def _update_was_skipped(self) -> bool:
        # With fused=True, GradScaler calls step() and the fused kernel itself skips the update on
        # inf/nan gradients (found_inf); the noise must be skipped with it.
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item())

    def _add_noise(self) -> None:
        """The Langevin term for every group with temperature > 0 (layout: module docstring)."""
        streams: dict[tuple, list[tuple[torch.Tensor, float]]] = defaultdict(list)
        slots: dict[torch.device, int] = {}
        low_precision: list[tuple[torch.Tensor, float]] = []
        self.last_noise_scales = []
        for group in self.param_groups:
            lr = float(group["lr"])
            std = math.sqrt(2.0 * lr * group["temperature"])
            self.last_noise_scales.append(std)
            if std == 0.0:
                continue
            peak_std = math.sqrt(2.0 * float(group.get("initial_lr", lr)) * group["temperature"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                local, shard_key = _local_and_shard_key(p)
                if local is None:
                    continue
                slot = slots.setdefault(local.device, sum(d.type == local.device.type for d in slots))
                dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
                streams[(local.device.type, slot, dtype, shard_key)].append((local, std))
                if local.dtype in _LOW_PRECISION:
                    low_precision.append((local, peak_std))
        if low_precision and not self._low_precision_warned and (self.noise_step & (self.noise_step - 1)) == 0:
            self._warn_if_noise_lost(low_precision)  # checked at steps 0, 1, 2, 4, 8, ... until it fires
        for key, items in streams.items():
            device = items[0][0].device
            gen = self._generators.get((device, key[3]))
            if gen is None:
                gen = self._generators[(device, key[3])] = torch.Generator(device=device)
            gen.manual_seed(derive_seed(self.noise_seed, self.noise_step, key))
            self._fill_and_add(items, gen, key[2])

    def _fill_and_add(self, items: list[tuple[torch.Tensor, float]], gen: torch.Generator, dtype: torch.dtype) -> None:
        """``p += std * xi`` for the items of one stream, xi drawn chunk by chunk into one buffer."""
        device = items[0][0].device
        total = sum(t.numel() for t, _ in items)
        sizes = self.noise_chunk_numel
        chunk = min(sizes.get(device.type, sizes["default"]), total)
        buf = self._buffers.get((device, dtype))
        if buf is None or buf.numel() < chunk:
            buf = self._buffers[(device, dtype)] = torch.empty(chunk, device=device, dtype=dtype)
        # Flat views; a non-contiguous tensor is updated through a contiguous copy written back.
        flats, write_back = [], []
        for t, _ in items:
            flat = t.reshape(-1)  # a view when t is contiguous, else a copy
            flats.append(flat)
            if not t.is_contiguous():
                write_back.append((t, flat))
        item, pos = 0, 0
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            noise = buf[:n]
            noise.normal_(generator=gen)
            by_std: dict[float, tuple[list, list]] = defaultdict(lambda: ([], []))
            filled = 0
            while filled < n:  # lay the chunk over the parameters it covers
                flat, std = flats[item], items[item][1]
                take = min(flat.numel() - pos, n - filled)
                targets, sources = by_std[std]
                targets.append(flat[pos:pos + take])
                sources.append(noise[filled:filled + take])
                filled, pos = filled + take, pos + take
                if pos == flat.numel():
                    item, pos = item + 1, 0
            for std, (targets, sources) in by_std.items():
                torch._foreach_add_(targets, sources, alpha=std)
        for t, flat in write_back:
            t.copy_(flat.view_as(t))

    def _warn_if_noise_lost(self, items: list[tuple[torch.Tensor, float]]) -> None:
        """Warn once when bf16/fp16 rounding would swallow the noise.

        A value of magnitude m in a dtype with machine epsilon e sits on a grid of spacing about
        m * e; an increment below half of it rounds back to m. We compare the noise std at the
        group's peak learning rate (``initial_lr`` under a scheduler, so warm-up does not trigger
        it) with half the spacing at the parameter's mean absolute value.
        """
        mags = torch._foreach_norm([t for t, _ in items], 1, dtype=torch.float32)
        lost = sum(
            1 for (t, std), mag in zip(items, mags)
            if std < 0.5 * torch.finfo(t.dtype).eps * float(mag) / max(t.numel(), 1)
        )
        if lost:
            self._low_precision_warned = True
            warnings.warn(
                f"NoisyAdamW: for {lost} of {len(items)} bf16/fp16 parameters the Langevin noise std is below "
                "half the dtype's rounding step at the parameter's magnitude, so the noise is mostly rounded "
                "away. Keep the trainable (adapter) weights in float32, as PEFT does by default "
                "(autocast_adapter_dtype=True), e.g. `for p in model.parameters(): "
                "p.data = p.data.float() if p.requires_grad else p.data`.",
                UserWarning, stacklevel=3)
