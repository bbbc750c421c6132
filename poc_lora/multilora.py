"""Several LoRA adapters of one base model in one forward pass: the layer, the shared trunk, the loss.

The batched ensemble strategy (:mod:`poc_lora.batched`) trains M members at once, and a
multi-model evaluation can score M models at once, on one copy of the base. Three pieces make
that work; they are plain torch, independent of PEFT and of the training loop:

* :class:`MultiLoraLinear` wraps a frozen linear layer ``base`` and holds member m's LoRA
  factors ``A_m`` (r, in) and ``B_m`` (out, r) as separate parameters (so each member's
  optimizer owns plain leaf tensors, and PEFT's key names map onto them one to one). Its input
  holds the members' rows one after another, ``(M * b, ..., in)``; member m's rows get
  ``base(x) + s_m * B_m A_m dropout(x)``, computed for all members at once with two batched
  matrix products (``torch.bmm``), on any device, without a Python loop over members.
* :class:`SharedTrunk` makes the layers below the first adapted layer run once on a batch of b
  rows and repeats the hidden states (and every per-row tensor the decoder layers receive:
  attention mask, rotary position embeddings) M times from that layer on. Members that read the
  same batch compute the same trunk, so computing it once is exact.
* :func:`supervised_lm_loss` applies the LM head only to the positions that have a label (not
  ``-100`` after the causal shift) and returns each member's cross-entropy, defined exactly as
  transformers' ``ForCausalLMLoss`` (sum over the supervised tokens divided by
  ``num_items_in_batch``, else their mean). With ``train_on_inputs: false`` most positions are
  prompt, and the head (a vocabulary-sized matrix product) is the most expensive single layer.

Dropout: the batched layer draws one dropout mask over all M * b rows (:func:`keep_mask`, a
faster CPU draw than ``F.dropout``'s), so members get independent masks, but not the masks a
sequential run would draw from its own RNG stream: with ``lora_dropout > 0`` batched and
sequential members are equal in distribution, not bit for bit.

Example:
    >>> import torch
    >>> from poc_lora.multilora import MultiLoraLinear
    >>> base = torch.nn.Linear(4, 3)
    >>> layer = MultiLoraLinear(base, [torch.zeros(2, 4)] * 2, [torch.zeros(3, 2)] * 2, scaling=2.0)
    >>> layer(torch.ones(2 * 5, 4)).shape  # 2 members x 5 rows each
    torch.Size([10, 3])
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # transformers' label for "no loss here"


def _as_parameter(t: torch.Tensor, trainable: bool) -> nn.Parameter:
    """``t`` itself when it is already a Parameter (so an optimizer built on it keeps working)."""
    if isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach().clone(), requires_grad=trainable)


def keep_mask(shape: Sequence[int] | torch.Size, keep_prob: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A dropout keep-mask: a bool tensor of ``shape``, each entry True with probability ``keep_prob``.

    On a CPU, torch's ``bernoulli_`` (behind ``F.dropout``) draws one 32-bit number per entry
    and was 3-4x slower here than this: one 64-bit draw from the default generator gives four
    16-bit uniforms, each compared with ``keep_prob`` rounded to a multiple of 2^-16. Elsewhere
    (CUDA) it is ``torch.rand(shape) < keep_prob``. Seeded by ``torch.manual_seed`` like dropout.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> keep_mask((1000, 64), 0.95).float().mean().round(decimals=2)
        tensor(0.9500)
    """
    shape = torch.Size(shape)
    device = torch.device(device)
    if device.type != "cpu":
        return torch.rand(shape, device=device) < keep_prob
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    threshold = round(keep_prob * 65536) - 32768  # int16 lanes are uniform on [-32768, 32767]
    if threshold > 32767:  # keep everything (the int16 comparison cannot express it)
        return torch.ones(shape, dtype=torch.bool)
    return (words.view(torch.int16)[:n] < threshold).view(shape)


class MultiLoraLinear(nn.Module):
    """A frozen linear layer with M LoRA adapters, one per block of rows of the input.

    Args:
        base: the frozen layer (``nn.Linear`` or any module mapping ``(..., in)`` to ``(..., out)``,
            such as a bitsandbytes 4-bit linear).
        lora_A: M tensors (r_m, in); nn.Parameters are kept as they are (the same objects).
        lora_B: M tensors (out, r_m). Ranks may differ: the stacked factors are zero-padded to the
            largest rank, which adds exactly zero. An all-zero member is the base layer.
        scaling: the LoRA scale alpha / r, one float or one per member.
        dropout: dropout probability on the LoRA input (PEFT's ``lora_dropout``), active in
            training mode only.
        trainable: whether new parameters (from plain tensors) require grad.
        compute_dtype: the dtype of the LoRA products outside autocast. None: the factors' dtype
            (float32 factors on a bfloat16 base compute in float32, as PEFT's LoRA layer does).
            Under autocast they run in the autocast dtype either way.

    Input ``x``: (M * b, ..., in), member m's rows at [m * b, (m + 1) * b). Output: (M * b, ..., out).
    Cost: ``base`` once on all rows, plus two ``bmm`` of (M, b * T, in) x (M, in, r) and
    (M, b * T, r) x (M, r, out). Raises ValueError when the row count is not a multiple of M.

    Example:
        >>> layer = MultiLoraLinear(torch.nn.Linear(8, 8), [torch.randn(2, 8)] * 3,
        ...                         [torch.zeros(8, 2)] * 3, scaling=[1.0, 1.0, 0.5])
        >>> layer(torch.randn(3 * 4, 5, 8)).shape
        torch.Size([12, 5, 8])
    """

    def __init__(self, base: nn.Module, lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                 scaling: float | Sequence[float] = 1.0, dropout: float = 0.0, trainable: bool = True,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if len(lora_A) != len(lora_B) or not lora_A:
            raise ValueError(f"MultiLoraLinear: need as many lora_A as lora_B factors (>= 1), got "
                             f"{len(lora_A)} and {len(lora_B)}")
        for m, (a, b) in enumerate(zip(lora_A, lora_B)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"MultiLoraLinear: member {m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                 "are not (r, in) and (out, r)")
        self.base_layer = base
        self.lora_A = nn.ParameterList([_as_parameter(a, trainable) for a in lora_A])
        self.lora_B = nn.ParameterList([_as_parameter(b, trainable) for b in lora_B])
        scales = [float(scaling)] * len(lora_A) if isinstance(scaling, (int, float)) else [float(s) for s in scaling]
        if len(scales) != len(lora_A):
            raise ValueError(f"MultiLoraLinear: {len(scales)} scalings for {len(lora_A)} members")
        self.register_buffer("scaling", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.dropout = float(dropout)
        self.compute_dtype = compute_dtype

    @property
    def num_members(self) -> int:
        return len(self.lora_A)

    def stacked(self, dtype: torch.dtype | None = None, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, r, in) and (M, out, r): the factors stacked (zero-padded to the largest rank), each
        member's B multiplied by its scale times ``factor``, cast to ``dtype`` (None: as stored).

        The stack is part of the autograd graph, so each member's own parameters get their
        gradients. Without grad (evaluation) it is computed once and cached: the key notices any
        in-place change of a factor (its version counter) and a move to another device or dtype.
        """
        if torch.is_grad_enabled():
            return self._stack_factors(dtype, factor)
        key = (self.lora_A[0].device, self.lora_A[0].dtype, dtype, factor,
               *(p._version for p in [*self.lora_A, *self.lora_B]))
        if getattr(self, "_stack_key", None) != key:
            self._stack_key, self._stack = key, self._stack_factors(dtype, factor)
        return self._stack

    def _stack_factors(self, dtype: torch.dtype | None, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        ranks = {a.shape[0] for a in self.lora_A}
        if len(ranks) == 1:
            a, b = torch.stack(list(self.lora_A)), torch.stack(list(self.lora_B))
        else:
            r = max(ranks)  # evaluation of models of different ranks (merges)
            a = torch.stack([F.pad(t, (0, 0, 0, r - t.shape[0])) for t in self.lora_A])
            b = torch.stack([F.pad(t, (0, r - t.shape[1])) for t in self.lora_B])
        # The scale multiplies B (M x out x r), not the (M, b * T, out) update: the same product,
        # a rank-sized multiplication instead of an activation-sized one in forward and backward.
        b = b * (self.scaling * factor).to(b.dtype).view(-1, 1, 1)
        return (a, b) if dtype is None else (a.to(dtype), b.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        result = self.base_layer(x)
        m = self.num_members
        if x.shape[0] % m:
            raise ValueError(f"MultiLoraLinear: {x.shape[0]} input rows are not {m} members' blocks")
        # PEFT casts the input to the adapter's dtype (fp32 adapters on a bf16 base); under
        # autocast the products below run in the autocast dtype anyway, so cast once, to that.
        device = x.device.type
        autocast = device != "meta" and torch.is_autocast_enabled(device)  # meta: traced by poc-lora plan
        dtype = torch.get_autocast_dtype(device) if autocast else (self.compute_dtype or self.lora_A[0].dtype)
        h = x.to(dtype)
        p = self.dropout if self.training else 0.0
        if p > 0:
            # one draw over all rows: independent masks per member; 1 / (1 - p) goes into B's scale
            h = torch.where(keep_mask(h.shape, 1.0 - p, h.device), h, 0.0)
        a, b = self.stacked(None if autocast else dtype, 1.0 / (1.0 - p))
        h = h.reshape(m, -1, h.shape[-1])  # (M, b * T, in)
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        out = result + delta.reshape(result.shape)
        return out.to(result.dtype)

    def extra_repr(self) -> str:
        ranks = sorted({a.shape[0] for a in self.lora_A})
        return f"members={self.num_members}, r={ranks if len(ranks) > 1 else ranks[0]}, dropout={self.dropout}"


# --------------------------------------------------------------------------- shared trunk
_LAYER_INDEX = re.compile(r"^(?P<list>.*?)\.(?P<index>\d+)(?:\.|$)")


def first_adapted_layer(names: Sequence[str]) -> tuple[str, int] | None:
    """The decoder-layer list and the smallest layer index among adapted module ``names``.

    ``names`` are module paths such as ``model.layers.22.self_attn.q_proj``. Returns
    ``("model.layers", 22)``, or None when some module is not inside a numbered layer list (an
    adapted embedding or LM head) or the modules sit in different lists: no trunk can be shared.

    Example:
        >>> first_adapted_layer(["model.layers.3.mlp.up_proj", "model.layers.1.self_attn.q_proj"])
        ('model.layers', 1)
    """
    found: set[str] = set()
    indices = []
    for name in names:
        match = _LAYER_INDEX.match(name)
        if match is None:
            return None
        found.add(match["list"])
        indices.append(int(match["index"]))
    if len(found) != 1 or not indices:
        return None
    return found.pop(), min(indices)


def _repeat_rows(value: Any, rows: int, times: int) -> Any:
    """Every tensor in ``value`` (nested tuples/lists/dicts) whose first dimension is ``rows``,
    tiled ``times`` along it (block m of the result is the original); anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == rows:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_rows(v, rows, times) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_rows(v, rows, times) for k, v in value.items()}
    return value


class SharedTrunk:
    """Run the layers below ``layers[first]`` once per batch, and the layers from it on per member.

    Installs forward pre-hooks (``with_kwargs=True``) on ``layers[first:]``. While active (inside
    ``with trunk.share(b):``), each hook tiles M times, along the batch dimension, every tensor
    argument whose first dimension is the trunk batch ``b``: the hidden states at the first
    adapted layer, and at every layer the per-row tensors the model computed once (attention
    mask, rotary cos/sin, position ids). Block m of the tiled batch is member m's, the layout
    :class:`MultiLoraLinear` expects. Outside ``share`` the hooks do nothing (stacked per-member
    batches pass through unchanged).

    Assumes decoder layers whose tensor arguments are per-row (batch first) or broadcast (batch
    1), as in transformers' Llama, Mistral, Qwen and similar decoders. With b = 1, broadcast
    tensors are tiled too, which changes nothing.

    Example:
        >>> trunk = SharedTrunk(model.model.layers, first=22, num_members=4)  # doctest: +SKIP
        >>> with trunk.share(input_ids.shape[0]):  # doctest: +SKIP
        ...     hidden = model.model(input_ids, attention_mask=mask).last_hidden_state  # (4 * b, T, d)
    """

    def __init__(self, layers: Sequence[nn.Module], first: int, num_members: int) -> None:
        self.num_members, self.first = num_members, first
        self._rows: int | None = None
        self._handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True)
                         for layer in list(layers)[first:]] if num_members > 1 else []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._rows is None:
            return None
        return _repeat_rows(args, self._rows, self.num_members), _repeat_rows(kwargs, self._rows, self.num_members)

    def share(self, rows: int) -> "_Sharing":
        """Context manager: inside it, a forward on a batch of ``rows`` rows shares the trunk."""
        return _Sharing(self, rows)

    def remove(self) -> None:
        """Remove the hooks (the layers behave as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Sharing:
    def __init__(self, trunk: SharedTrunk, rows: int) -> None:
        self.trunk, self.rows = trunk, rows

    def __enter__(self) -> None:
        self.trunk._rows = self.rows

    def __exit__(self, *exc: Any) -> None:
        self.trunk._rows = None


# --------------------------------------------------------------------------- loss
def supervised_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, num_members: int,
                       num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Each member's causal-LM cross-entropy, with the LM head applied to supervised positions only.

    Args:
        hidden: (M * b, T, d) last hidden states (after the final norm), member m's rows at
            [m * b, (m + 1) * b).
        labels: (M * b, T) token ids, ``-100`` where there is no loss; or (b, T), shared by all
            members. Position t's hidden state predicts ``labels[:, t + 1]`` (the causal shift).
        lm_head: the output projection (d -> vocabulary).
        num_members: M.
        num_items_in_batch: the divisor per member, a scalar or (M,): the supervised tokens of
            the whole accumulated batch, as transformers' Trainer passes it; None: each member's
            mean over its supervised tokens in this batch.

    Returns:
        (M,) float32 losses. Equal to transformers' ``ForCausalLMLoss`` on the full logits
        (logits upcast to float32, ``cross_entropy`` summed and divided by
        ``num_items_in_batch``, or averaged), without computing the (M * b, T, vocabulary)
        logits of unsupervised positions. A member with no supervised token gets 0 (HF: NaN
        for the mean).

    Example:
        >>> losses = supervised_lm_loss(hidden, labels, model.lm_head, 4, num_items_in_batch=n)  # doctest: +SKIP
        >>> losses.sum().backward()  # members' parameters are disjoint: each gets its own gradient
    """
    rows = hidden.shape[0]
    if rows % num_members:
        raise ValueError(f"supervised_lm_loss: {rows} rows are not {num_members} members' blocks")
    if labels.shape[0] != rows:
        if labels.shape[0] * num_members != rows:
            raise ValueError(f"supervised_lm_loss: labels {tuple(labels.shape)} fit neither {rows} rows nor "
                             f"{rows // num_members} shared rows")
        labels = labels.repeat(num_members, 1)
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)  # label of the next token
    keep = target != IGNORE_INDEX  # (M * b, T)
    member = torch.arange(rows, device=hidden.device).div(rows // num_members, rounding_mode="floor")
    member = member[:, None].expand_as(keep)[keep]  # member of each supervised position
    logits = lm_head(hidden[keep]).float()  # (K, vocabulary): the only logits computed
    token_loss = F.cross_entropy(logits, target[keep], reduction="none")
    sums = torch.zeros(num_members, dtype=token_loss.dtype, device=hidden.device).index_add(0, member, token_loss)
    if num_items_in_batch is None:
        counts = torch.zeros(num_members, dtype=token_loss.dtype, device=hidden.device).index_add(
            0, member, torch.ones_like(token_loss))
        return sums / counts.clamp(min=1)
    n = torch.as_tensor(num_items_in_batch, device=hidden.device).to(sums.dtype)
    return sums / n


def lora_members(module: nn.Module) -> Iterator[tuple[str, MultiLoraLinear]]:
    """The (name, layer) pairs of every :class:`MultiLoraLinear` in ``module``, in module order."""
    for name, sub in module.named_modules():
        if isinstance(sub, MultiLoraLinear):
            yield name, sub


__all__ = ["IGNORE_INDEX", "MultiLoraLinear", "keep_mask", "SharedTrunk", "first_adapted_layer", "lora_members",
           "supervised_lm_loss"]
