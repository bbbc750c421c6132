"""The merge-method registry: what each method is, in one place, and its pure tensor function.

A method turns the M input adapters of one module into the two factors of one LoRA update.
It sees them as a :class:`LoraStack`: ``a = [A_1; ...; A_M]`` (N x in, N = sum_j r_j) and
``b = [s_1 B_1 ... s_M B_M]`` (out x N, each B_j scaled by PEFT's s_j), the weights w_j and the
block sizes r_j, so that the exact weighted merge is ``dW = stack.weighted_b() @ stack.a``
(Nitanda et al., ICML 2025, arXiv:2502.05784, §3). It returns :class:`Factors` ``(b, a)`` whose
product ``b @ a`` is the written update, with PEFT's scale 1. Method functions are pure: no
file access, no in-place change of their inputs; randomness only from the generator passed in.

Every place that needs to know the methods reads this registry: the CLI's ``--method`` choices
and help, merge validation (which methods need ``--rank``, which need equal ranks), the report
summary, the model card, the pipeline's row labels and :func:`methods_markdown` (the README's
table). Each ``*.py`` module in this package is imported below and registers its method, so a
new method is one new file here plus its tests (``_``-prefixed modules hold code that several
methods share, e.g. :mod:`._task_ops` for TIES and DARE); :func:`register` and
:func:`unregister` add or remove one at run time.

Methods that take parameters beyond ``--rank``/``--seed`` (``density``,
``majority_sign_method``) declare them in :attr:`MergeMethod.parameters`; their defaults and
checks are :data:`PARAMETERS` and :func:`resolve_parameters`, the one place the CLI, the
config, the pipeline, the report and the card read them from.

This module and the method modules import no torch at import time: the CLI builds its
``--method`` choices from the registry when it starts, and importing torch takes 4-7 s on the
project's 2-core machines (measured) against 0.5 s for ``poc-lora merge --help``. The method
functions import torch when they run.

Example:
    >>> from poc_lora.merge.methods import get_method, method_names
    >>> method_names()[0], get_method("svd").needs_rank
    ('poc', True)
    >>> get_method("svd").row_label(16)
    'PoC merge, SVD rank 16'
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

from ...errors import ConfigError

if TYPE_CHECKING:  # annotations only; see the module docstring
    import torch


@dataclass(frozen=True)
class LoraStack:
    """The M adapters' factors of one module, the input of every merge method.

    ``a``: ``[A_1; ...; A_M]``, shape (N, in), N = sum_j r_j. ``b``: ``[s_1 B_1 ... s_M B_M]``,
    shape (out, N), each B_j times PEFT's scale s_j (alpha/r, or alpha/sqrt(r) with rsLoRA);
    both float32, never modified. ``weights``: w_j as given (Python floats). ``sizes``: r_j.
    """

    a: torch.Tensor
    b: torch.Tensor
    weights: tuple[float, ...]
    sizes: tuple[int, ...]

    @property
    def num_adapters(self) -> int:
        return len(self.sizes)

    @property
    def total_rank(self) -> int:
        return sum(self.sizes)

    def blocks(self) -> list[slice]:
        """The slice of adapter j's neurons (rows of ``a``, columns of ``b``)."""
        out, lo = [], 0
        for r in self.sizes:
            out.append(slice(lo, lo + r))
            lo += r
        return out

    @cached_property
    def weight_tensor(self) -> torch.Tensor:
        """w_j as a float32 tensor, shape (M,)."""
        return self.a.new_tensor(self.weights, dtype=self.a.dtype)

    @cached_property
    def column_weights(self) -> torch.Tensor:
        """w_j repeated r_j times: the weight of each neuron, shape (N,)."""
        w = self.weight_tensor
        return w.repeat_interleave(w.new_tensor(self.sizes).long())

    @cached_property
    def weighted_b(self) -> torch.Tensor:
        """``[w_1 s_1 B_1 ... w_M s_M B_M]`` (out, N): with ``a``, the factors of the exact merge
        ``dW = sum_j w_j s_j B_j A_j``. Computed once, a new tensor (``b`` is left as it is)."""
        return self.b * self.column_weights[None, :]

    @cached_property
    def gram_a(self) -> torch.Tensor:
        """``A' A'^T`` (N x N), float32; computed once and shared by the method and the report."""
        return self.a @ self.a.T

    @cached_property
    def gram_b(self) -> torch.Tensor:
        """``B'^T B'`` (N x N, unweighted B' = [s_1 B_1 ... s_M B_M]), float32; computed once."""
        return self.b.T @ self.b

    @cached_property
    def inner_products(self) -> torch.Tensor:
        """``P[i, j] = <dW_i, dW_j>_F`` (M x M, float64) of the unweighted updates
        ``dW_j = s_j B_j A_j``, from the Gram matrices: ``tr((B_i^T B_j)(A_j A_i^T))``, the sum of
        the r_i x r_j block of ``gram_b * gram_a``; no out x in matrix is formed."""
        return gram_inner(self.gram_b, self.gram_a, self.sizes)


def gram_inner(gb: torch.Tensor, ga: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``P[i, j] = <dW_i, dW_j>_F`` (M x M, float64) from the Gram matrices of the stacked
    factors, ``gb = B^T B`` and ``ga = A A^T`` (N x N, N = sum sizes): sums of r_i x r_j blocks
    of their elementwise product (summed in float64)."""
    import torch  # at call time: the CLI reads this registry at start-up (see the module docstring)

    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    s = torch.nn.functional.one_hot(owner, len(sizes)).double()
    return s.T @ (gb.double() * ga.double()) @ s


class Factors(NamedTuple):
    """A method's result: the written update is ``b @ a`` (PEFT scale 1).

    ``b``: (out, K), ``a``: (K, in), float32 (float64 is accepted and cast). ``err_sq``: the
    squared Frobenius distance to the exact merge when the method knows it (svd does, from the
    singular values it drops); None lets the caller compute it from Gram matrices.
    ``trunc_sq`` / ``target_sq``: for a method that computes a full out x in update and
    factorises it to rank K (ties, dare_*), the squared error of that factorisation and the
    squared norm of the full update (None: the method writes its result as it is).
    ``extra``: per-module numbers the method reports beside the standard ones (JSON scalars,
    written into the module's entry of ``merge_report.json``, e.g. Model Stock's ``t``).
    """

    b: torch.Tensor
    a: torch.Tensor
    err_sq: float | None = None
    trunc_sq: float | None = None
    target_sq: float | None = None
    extra: dict[str, float | int | None] | None = None


# (stack, rank, generator, **parameters) -> Factors; the parameters are those the method declares
MergeFunction = Callable[..., Factors]

# The merge parameters beyond rank and seed: name -> (default, what the CLI/config help says).
PARAMETERS: dict[str, tuple[object, str]] = {
    "density": (0.5, "fraction of each update's entries kept (TIES: top magnitudes; DARE: random, rescaled "
                     "by 1/density), in (0, 1]"),
    "majority_sign_method": ("total", "TIES sign election: total (sign of the sum) or frequency (sign of the "
                                      "count of signs)"),
    "exact_svd": (False, "ties/dare_*: true = the earlier exact path (all M full updates at once, DARE's draws "
                         "PEFT's, full SVD to rank K); default false = blocked, seeded randomized SVD "
                         "(squared error within 1.01x the optimum, checked by the bench)"),
}
MAJORITY_SIGN_METHODS = ("total", "frequency")
# what the methods table shows for a parameter in a report label
_PARAMETER_SYMBOLS = {"density": "d", "majority_sign_method": "total", "exact_svd": "false"}


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its name, how it is reported, what it needs, its source, its function.

    ``label``: the report row (tables, pipeline), ``{rank}`` replaced by the written rank.
    ``description``: one line for ``--help`` and the README. ``reference``: where it comes
    from. ``card_text``: what is written, for the model card (``{rank}``, ``{seed}`` filled).
    ``needs_rank``: takes ``--rank K`` (output rank K, at most a module's total rank);
    otherwise ``--rank`` is refused. ``equal_ranks``: every input has the same rank per module
    (output rank = that rank); else, without a rank, the output rank is sum_j r_j.
    ``uses_seed``: draws random numbers (``--seed``). ``exact``: writes the exact merge (no
    ``rel_error`` is reported). ``title``: the model card's heading, "<title> of M LoRA
    adapters" ("PoC merge" for the paper's merge and its variants). ``tags``: model-card tags.
    ``parameters``: the names in :data:`PARAMETERS` it takes (passed to ``function`` as keyword
    arguments; ``{density}`` etc. may appear in ``label`` and ``card_text``). ``dense``: it
    computes each module's full out x in update and factorises it to rank K, so K is bounded by
    min(out, in) rather than sum_j r_j. ``positive_weights``: it needs every w_j > 0 (a sign
    election over weighted updates means nothing otherwise). ``peft_equivalent``: the
    ``combination_type`` of PEFT's ``add_weighted_adapter`` that computes the same update, with
    its conditions, or "none". ``summary_extras``: ``(key, description)`` of the numbers in
    :attr:`Factors.extra` that the merge summary shows as a mean and range over the modules.
    """

    name: str
    label: str
    description: str
    reference: str
    function: MergeFunction
    card_text: str = ""
    needs_rank: bool = False
    equal_ranks: bool = False
    uses_seed: bool = False
    exact: bool = False
    title: str = "PoC merge"
    tags: tuple[str, ...] = field(default=())
    parameters: tuple[str, ...] = field(default=())
    dense: bool = False
    positive_weights: bool = False
    peft_equivalent: str = "none"
    summary_extras: tuple[tuple[str, str], ...] = field(default=())

    def row_label(self, rank: int | str | None = None, **params: object) -> str:
        """The report row of this method; ``rank`` is the written adapter's rank, ``params`` its
        parameters (defaults from :data:`PARAMETERS` where not given)."""
        values = {p: PARAMETERS[p][0] for p in self.parameters}
        values.update({k: v for k, v in params.items() if v is not None})
        return self.label.format(rank=rank, **values)

    def output_rank(self, ranks: Sequence[int], rank: int | None) -> int:
        """The rank this method writes for a module whose inputs have ranks ``ranks``."""
        if self.needs_rank:
            return int(rank)
        return ranks[0] if self.equal_ranks else sum(ranks)

    def __call__(self, stack: LoraStack, rank: int | None = None, generator: torch.Generator | None = None,
                 **params: object) -> Factors:
        """Run the method; ``params`` may hold any merge parameters, it gets those it declares
        (defaults from :data:`PARAMETERS` for the ones not given)."""
        mine = {p: params[p] if params.get(p) is not None else PARAMETERS[p][0] for p in self.parameters}
        return self.function(stack, rank, generator, **mine)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry (a name may be registered once).

    Raises:
        ValueError: when the name is taken (a programming error, not user input).
    """
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> MergeMethod:
    """Remove a method registered with :func:`register` and return it."""
    return _REGISTRY.pop(name)


def method_names(where: Callable[[MergeMethod], bool] | None = None) -> tuple[str, ...]:
    """The registered method names, ``poc`` (the default) first; with ``where``, only those
    methods for which it is true (e.g. ``lambda m: m.needs_rank``)."""
    names = sorted(_REGISTRY, key=lambda n: (n != "poc", n))
    return tuple(n for n in names if where is None or where(_REGISTRY[n]))


def get_method(name: str) -> MergeMethod:
    """The method called ``name``.

    Raises:
        ConfigError: naming the valid methods when there is none of that name.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"method must be one of {', '.join(method_names())}, got {name!r}") from None


def check_rank(name: str, rank: int | None) -> None:
    """Refuse a rank a method does not take, or a missing/non-positive one it needs.

    Raises:
        ConfigError: naming the method and ``--rank``.
    """
    method = get_method(name)
    if method.needs_rank:
        if rank is None or rank <= 0:
            raise ConfigError(f"--method {name} needs a positive --rank K, got {rank}")
    elif rank is not None:
        users = "/".join(method_names(lambda m: m.needs_rank))
        raise ConfigError(f"--rank is only used by --method {users}, not {name}")


def resolve_parameters(name: str, **given: object) -> dict[str, object]:
    """The parameters method ``name`` runs with: each it declares, as given or its default.

    ``given``: ``density``, ``majority_sign_method`` and ``exact_svd`` as the user gave them
    (None: not given).

    Raises:
        ConfigError: an unknown parameter, a value out of range, or a parameter given to a
            method that does not use it (naming the methods that do).

    Example:
        >>> resolve_parameters("ties", density=0.2)
        {'density': 0.2, 'majority_sign_method': 'total', 'exact_svd': False}
    """
    method = get_method(name)
    for key, value in given.items():
        if key not in PARAMETERS:
            raise ConfigError(f"unknown merge parameter {key!r}; known: {', '.join(PARAMETERS)}")
        if value is None:
            continue
        if key not in method.parameters:
            users = "/".join(method_names(lambda m, k=key: k in m.parameters))
            raise ConfigError(f"--{key} is only used by --method {users}, not {name}")
    out = {p: given[p] if given.get(p) is not None else PARAMETERS[p][0] for p in method.parameters}
    if "density" in out:
        density = out["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < float(density) <= 1:
            raise ConfigError(f"--density must be a number in (0, 1], got {density!r}")
        out["density"] = float(density)
    if "exact_svd" in out and not isinstance(out["exact_svd"], bool):
        raise ConfigError(f"--exact_svd must be true or false, got {out['exact_svd']!r}")
    if "majority_sign_method" in out and out["majority_sign_method"] not in MAJORITY_SIGN_METHODS:
        raise ConfigError(f"--majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
                          f"got {out['majority_sign_method']!r}")
    return out


def methods_help() -> str:
    """One line per method for ``--method`` help: ``name: description``."""
    text = "; ".join(f"{m.name}: {m.description}" for m in map(get_method, method_names()))
    return text.replace("%", "%%")  # argparse formats help strings with %


def methods_markdown() -> str:
    """A Markdown table of the registered methods (for the README/docs generator).

    Example:
        >>> print(methods_markdown().splitlines()[0])
        | method | what is written | rank | report label | reference | PEFT `add_weighted_adapter` |
    """
    rows = ["| method | what is written | rank | report label | reference | PEFT `add_weighted_adapter` |",
            "|---|---|---|---|---|---|"]
    for m in map(get_method, method_names()):
        rank = "K (`--rank`)" if m.needs_rank else ("r (equal ranks)" if m.equal_ranks else "Σ_j r_j")
        symbols = {p: _PARAMETER_SYMBOLS.get(p, p) for p in m.parameters}
        rows.append(f"| `{m.name}`{' (default)' if m.name == 'poc' else ''} | {m.description} | {rank} | "
                    f"{m.row_label('K', **symbols)} | {m.reference} | {m.peft_equivalent} |")
    return "\n".join(rows)


# every public module of this package defines and registers one method (``_`` modules: shared code)
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
del _info

__all__ = ["Factors", "LoraStack", "MAJORITY_SIGN_METHODS", "MergeMethod", "PARAMETERS", "check_rank", "get_method",
           "gram_inner", "method_names", "methods_help", "methods_markdown", "register", "resolve_parameters",
           "unregister"]
