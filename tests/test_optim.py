"""NoisyAdamW against torch's AdamW and against the statistics of N(0, 2 * lr * temperature)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from poc_lora.optim import NoisyAdamW

SIGMAS = 6.0  # every statistical bound below is 6 standard errors: false alarm rate ~2e-9 per check


def make_params(seed: int, shapes=((40, 30), (17,), (5, 7, 3))) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def run_steps(opt, params, steps: int, grad_seed: int, scheduler=None, start: int = 0) -> None:
    """``steps`` steps whose gradients depend only on (grad_seed, global step index)."""
    for i in range(start, start + steps):
        set_grads(params, torch.Generator().manual_seed(grad_seed * 1000 + i))
        opt.step()
        if scheduler is not None:
            scheduler.step()


# ---- temperature 0 is torch's AdamW, bit for bit ---------------------------------------------

COMBOS = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, amsgrad=True),
    dict(maximize=True, weight_decay=0.05),
    dict(foreach=True, weight_decay=0.1, amsgrad=True),
    dict(foreach=False, weight_decay=0.1, maximize=True),
    dict(fused=True, weight_decay=0.1),
    dict(fused=True, amsgrad=True, maximize=True),
    dict(foreach=True, betas=(0.8, 0.99), eps=1e-6, lr=3e-3),
]


@pytest.mark.parametrize("kwargs", COMBOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_temperature_zero_is_bit_identical_to_torch_adamw(kwargs):
    params = make_params(0)
    ref = clone(params)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 5e-3, "weight_decay": 0.0}]  # noqa: E731
    noisy = NoisyAdamW(groups(params), temperature=0.0, seed=1, **kwargs)
    ref_kwargs = dict(kwargs)
    if "fused" not in kwargs and "foreach" not in kwargs:
        ref_kwargs["fused"] = True  # NoisyAdamW's documented default on fused-capable devices
    torch_opt = torch.optim.AdamW(groups(ref), **ref_kwargs)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[1e-2, 2e-2], total_steps=8) for o in (noisy, torch_opt)]
    run_steps(noisy, params, 7, grad_seed=3, scheduler=schedulers[0])
    run_steps(torch_opt, ref, 7, grad_seed=3, scheduler=schedulers[1])
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
    assert any(not torch.equal(p, q) for p, q in zip(params, make_params(0)))  # it did move


def test_zero_temperature_group_stays_adamw_while_other_group_gets_noise():
    params, ref = make_params(0), None
    ref = clone(params)
    noisy = NoisyAdamW([{"params": params[:1], "temperature": 0.0}, {"params": params[1:]}],
                       temperature=1e-2, seed=0, fused=True)
    torch_opt = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:]}], fused=True)
    run_steps(noisy, params, 3, grad_seed=1)
    run_steps(torch_opt, ref, 3, grad_seed=1)
    assert torch.equal(params[0], ref[0])
    assert not torch.equal(params[1], ref[1])


# ---- the noise is N(0, 2 lr T), independent across elements, parameters and steps -------------

def _noise_after_zero_grad_steps(n_per_param: int, lr: float, temperature: float, steps: int, chunk=None):
    """Noise increments of ``steps`` steps on two parameters with zero gradients and no weight decay.

    With zero gradients AdamW's update is exactly 0 (m = v = 0, so m / (sqrt(v) + eps) = 0), hence
    each step changes a parameter by the noise alone, up to float32 rounding of p + noise
    (relative error ~1e-7 of |p| ~ 1, i.e. < 1e-5 of the noise std used here: negligible).
    """
    params = make_params(7, shapes=((n_per_param,), (n_per_param // 2, 2)))
    opt = NoisyAdamW(params, lr=lr, weight_decay=0.0, temperature=temperature, seed=11)
    if chunk is not None:
        opt.noise_chunk_numel = {"cpu": chunk, "default": chunk}
    increments = []
    for _ in range(steps):
        before = [p.detach().clone().reshape(-1) for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        increments.append([(p.detach().reshape(-1).double() - b.double()) for p, b in zip(params, before)])
    return increments


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("chunk", [None, 100_003], ids=["default-chunks", "small-chunks"])
def test_noise_statistics(chunk):
    n, lr, temperature = 600_000, 1e-3, 0.05  # two parameters -> 1.2e6 elements per step
    std = math.sqrt(2 * lr * temperature)  # 0.01
    steps = _noise_after_zero_grad_steps(n, lr, temperature, steps=2, chunk=chunk)
    z = torch.cat(steps[0]) / std  # should be i.i.d. N(0, 1)
    m = z.numel()
    assert m >= 1_000_000
    # mean: SE = 1/sqrt(m);  variance: Var(s^2) = 2/(m-1) for normal data, SE = sqrt(2/m)
    assert abs(float(z.mean())) < SIGMAS / math.sqrt(m)
    assert abs(float(z.var()) - 1.0) < SIGMAS * math.sqrt(2.0 / m)
    # shape: P(|z| < 1) = 0.6827 for a standard normal; a binomial proportion has SE sqrt(p(1-p)/m)
    p1 = math.erf(1 / math.sqrt(2))
    assert abs(float((z.abs() < 1).double().mean()) - p1) < SIGMAS * math.sqrt(p1 * (1 - p1) / m)
    # independence: a sample correlation of independent pairs has SE ~ 1/sqrt(pairs)
    a, b = steps[0]
    assert abs(_corr(a, b)) < SIGMAS / math.sqrt(a.numel())  # across parameters
    assert abs(_corr(z[:-1], z[1:])) < SIGMAS / math.sqrt(m)  # neighbouring elements
    z2 = torch.cat(steps[1]) / std
    assert abs(_corr(z, z2)) < SIGMAS / math.sqrt(m)  # across steps
    assert abs(float(z2.var()) - 1.0) < SIGMAS * math.sqrt(2.0 / m)


def test_per_group_temperature_and_current_lr_set_the_variance():
    n = 200_000
    a, b, frozen = make_params(3, shapes=((n,), (n,), (1000,)))
    groups = [{"params": [a], "lr": 1e-3, "temperature": 0.02}, {"params": [b], "lr": 4e-3}, {"params": [frozen]}]
    opt = NoisyAdamW(groups, weight_decay=0.0, temperature=0.5, seed=0)
    lr_scale = [1.0, 0.25]  # second step: a scheduler-like change of every group's lr
    for step, scale in enumerate(lr_scale):
        for g, base in zip(opt.param_groups, (1e-3, 4e-3, 1e-3)):
            g["lr"] = base * scale
        before = [a.detach().clone(), b.detach().clone(), frozen.detach().clone()]
        a.grad, b.grad, frozen.grad = torch.zeros_like(a), torch.zeros_like(b), None
        opt.step()
        for p, old, lr, t in ((a, before[0], 1e-3 * scale, 0.02), (b, before[1], 4e-3 * scale, 0.5)):
            var = float((p.detach().double() - old.double()).var())
            expected = 2 * lr * t
            assert abs(var / expected - 1.0) < SIGMAS * math.sqrt(2.0 / n), (step, var, expected)
        assert torch.equal(frozen, before[2])  # no gradient: neither AdamW nor noise touches it


# ---- randomness: seeded, private, resumable ----------------------------------------------------

def _noisy_run(seed, steps=3, **kwargs):
    params = make_params(0)
    opt = NoisyAdamW(params, temperature=1e-3, seed=seed, **kwargs)
    run_steps(opt, params, steps, grad_seed=5)
    return params


def test_same_seed_same_result_and_different_seeds_differ():
    p1, p2, p3 = _noisy_run(4), _noisy_run(4), _noisy_run(5)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(not torch.equal(a, c) for a, c in zip(p1, p3))


def test_noise_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _noisy_run(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    # seed=None: one seed is drawn from the global RNG when the optimizer is built, none per step
    params = make_params(0)
    opt = NoisyAdamW(params, temperature=1e-3)
    after_init = torch.get_rng_state()
    run_steps(opt, params, 3, grad_seed=5)
    assert torch.equal(torch.get_rng_state(), after_init)


@pytest.mark.parametrize("kwargs", [dict(fused=True), dict(foreach=False, amsgrad=True)], ids=["fused", "single"])
def test_resume_is_bit_identical(kwargs):
    n, k = 7, 3
    full = make_params(0, shapes=((300, 20), (2000,), (33, 3)))
    start = clone(full)

    def optimizer(params, seed):
        opt = NoisyAdamW([{"params": params[:2]}, {"params": params[2:], "temperature": 2e-3}],
                         lr=1e-2, temperature=1e-3, seed=seed, weight_decay=0.1, **kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return opt, sched

    opt, sched = optimizer(full, seed=42)
    opt.noise_chunk_numel = {"cpu": 1000, "default": 1000}  # chunks cross parameters; saved in the state
    run_steps(opt, full, n, grad_seed=9, scheduler=sched)

    first = clone(start)
    opt, sched = optimizer(first, seed=42)
    opt.noise_chunk_numel = {"cpu": 1000, "default": 1000}
    run_steps(opt, first, k, grad_seed=9, scheduler=sched)
    blob = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in first]}, blob)
    blob.seek(0)
    ckpt = torch.load(blob, weights_only=True)  # how Trainer reads optimizer.pt

    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt, sched = optimizer(resumed, seed=999)  # a different seed: the checkpoint's must win
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    run_steps(opt, resumed, n - k, grad_seed=9, scheduler=sched, start=k)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_deepcopy_continues_the_same_stream():
    import copy

    params = make_params(0)
    opt = NoisyAdamW(params, temperature=1e-3, seed=8)
    run_steps(opt, params, 2, grad_seed=4)
    twin = copy.deepcopy({"opt": opt, "params": params})  # deepcopy keeps optimizer <-> param links
    run_steps(opt, params, 2, grad_seed=4, start=2)
    run_steps(twin["opt"], twin["params"], 2, grad_seed=4, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, twin["params"]))


# ---- integration with torch's optimizer machinery ---------------------------------------------

def test_step_hooks_run_once_even_after_torch_patched_adamw_step():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # makes torch wrap AdamW.step
    params = make_params(0)
    opt = NoisyAdamW(params, seed=0)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    run_steps(opt, params, 2, grad_seed=1)
    assert calls == ["pre", "post", "pre", "post"]


def test_fused_step_skipped_by_grad_scaler_adds_no_noise():
    # GradScaler hands fused optimizers found_inf and lets the kernel skip; the noise must skip too.
    params = make_params(0)
    before = clone(params)
    opt = NoisyAdamW(params, fused=True, temperature=1e-2, seed=0)
    set_grads(params, torch.Generator().manual_seed(0))
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_low_precision_warning_counts_affected_parameters_once():
    gen = torch.Generator().manual_seed(0)
    big = [torch.nn.Parameter((0.1 * torch.randn(64, 64, generator=gen) + 3).bfloat16()) for _ in range(3)]
    zero = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))  # LoRA B at init: grid is fine at 0
    params = [*big, zero]
    before = clone(big)
    opt = NoisyAdamW(params, lr=1e-4, temperature=1e-5, weight_decay=0.0, seed=0)  # std ~4.5e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
    lost = [w for w in caught if "NoisyAdamW" in str(w.message)]
    assert len(lost) == 1
    assert "3 of 4" in str(lost[0].message) and "float32" in str(lost[0].message)
    # and the warning is right: bf16 values in [2, 4) (grid 2^-6) did not move at all
    assert all(torch.equal(p, b) for p, b in zip(big, before))


def test_no_low_precision_warning_for_float32():
    params = [torch.nn.Parameter(torch.randn(64, 64) + 3) for _ in range(3)]
    opt = NoisyAdamW(params, lr=1e-4, temperature=1e-5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_steps(opt, params, 3, grad_seed=0)


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"),
    (dict(eps=-1e-8), "eps"),
    (dict(temperature=-1e-5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(betas=(0.9,)), "betas"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NoisyAdamW(make_params(0), **kwargs)


def test_invalid_group_temperature():
    with pytest.raises(ValueError, match="temperature"):
        NoisyAdamW([{"params": make_params(0), "temperature": -1.0}])


def test_sparse_gradient_is_a_clear_error_and_changes_nothing():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = NoisyAdamW(emb.parameters(), seed=0)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)
