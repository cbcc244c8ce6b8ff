"""sf_schedules schedules against hand formulas, in numpy, Python ints, jax (optax) and torch.

The expected values are the formulas of the brief written again here with plain ``math`` and
``if`` branches, plus literal values worked out by hand at chosen steps; every backend (numpy
arrays, Python ints, ``sf_optax.schedules.to_optax`` under ``jax.jit`` driving optax.sgd, and
``sf_torch.schedules.scheduler`` driving ``torch.optim.SGD``) must reproduce them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sf_schedules
import sf_torch
from sf_torch.schedules import scheduler


def hand_lr(kind, s, peak, total=None, warmup=0, final=0.0, frac=0.0, cooldown="linear"):
    """The schedules written out branch by branch (independent of sf_schedules)."""
    if s < warmup:
        return peak * (s + 1) / warmup
    if total is not None and s > total - 1:
        s = total - 1
    if kind == "constant":
        return peak
    if kind == "sqrt":
        return peak / math.sqrt(s - warmup + 1)
    if kind == "cosine":
        last = total - 1
        p = 1.0 if last == warmup else (s - warmup) / (last - warmup)
        return final + (peak - final) * (1 + math.cos(math.pi * p)) / 2
    n_cool = round(frac * total)
    start = total - n_cool
    if s < start:
        return peak
    q = (s - start + 1) / n_cool
    if cooldown == "linear":
        return peak + (final - peak) * q
    return final + (peak - final) * (1 - math.sqrt(q))


CASES = [
    ("constant", dict(peak=0.3), sf_schedules.constant(0.3)),
    ("constant", dict(peak=0.3, warmup=4), sf_schedules.constant(0.3, warmup_steps=4)),
    ("sqrt", dict(peak=2.0), sf_schedules.sqrt(2.0)),
    ("sqrt", dict(peak=2.0, warmup=3), sf_schedules.sqrt(2.0, warmup_steps=3)),
    ("cosine", dict(peak=1.0, total=11), sf_schedules.cosine(1.0, 11)),
    (
        "cosine",
        dict(peak=1.0, total=11, warmup=2, final=0.1),
        sf_schedules.cosine(1.0, 11, warmup_steps=2, final_lr=0.1),
    ),
    ("cosine", dict(peak=0.5, total=3, warmup=2), sf_schedules.cosine(0.5, 3, warmup_steps=2)),
    (
        "wsd",
        dict(peak=1.0, total=10, warmup=2, frac=0.3),
        sf_schedules.wsd(1.0, 10, warmup_steps=2, cooldown_fraction=0.3),
    ),
    (
        "wsd",
        dict(peak=0.8, total=12, warmup=1, frac=0.5, cooldown="1-sqrt", final=0.2),
        sf_schedules.wsd(
            0.8, 12, warmup_steps=1, cooldown_fraction=0.5, cooldown="1-sqrt", final_lr=0.2
        ),
    ),
    ("wsd", dict(peak=1.0, total=5, frac=0.0), sf_schedules.wsd(1.0, 5, cooldown_fraction=0.0)),
    ("wsd", dict(peak=1.0, total=4, frac=1.0), sf_schedules.wsd(1.0, 4, cooldown_fraction=1.0)),
]
IDS = [f"{kind}-{i}" for i, (kind, _, _) in enumerate(CASES)]
N_STEPS = 16  # beyond every horizon above, so the held final value is checked too


def expected(kind, kwargs, n=N_STEPS):
    return np.array([hand_lr(kind, s, **kwargs) for s in range(n)])


# -- hand-computed values at chosen steps -------------------------------------------------------


def test_warmup_ramps_to_peak():
    sched = sf_schedules.constant(0.3, warmup_steps=4)
    assert [sched(s) for s in range(6)] == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3])
    cos = sf_schedules.cosine(1.0, 11, warmup_steps=2, final_lr=0.1)
    assert cos(0) == pytest.approx(0.5) and cos(1) == pytest.approx(1.0)


def test_cosine_peak_midpoint_final():
    cos = sf_schedules.cosine(1.0, 11, warmup_steps=2, final_lr=0.1)
    # post-warmup updates 2..10; midpoint 6 is (peak + final) / 2
    assert cos(2) == pytest.approx(1.0, rel=1e-15)
    assert cos(6) == pytest.approx(0.55, rel=1e-15)
    assert cos(10) == pytest.approx(0.1, rel=1e-15)
    assert cos(4) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, rel=1e-15)
    assert cos(10_000) == pytest.approx(0.1, rel=1e-15)  # held after the horizon
    no_warm = sf_schedules.cosine(2.0, 5, final_lr=0.5)
    assert no_warm(0) == pytest.approx(2.0) and no_warm(2) == pytest.approx(1.25)
    assert no_warm(4) == pytest.approx(0.5)


def test_wsd_cooldown_start_and_end():
    lin = sf_schedules.wsd(1.0, 10, warmup_steps=2, cooldown_fraction=0.3)
    # round(0.3 * 10) = 3 cooldown updates: 7, 8, 9 at q = 1/3, 2/3, 1
    assert [lin(s) for s in range(2, 7)] == [1.0] * 5
    assert [lin(s) for s in (7, 8, 9, 10, 50)] == pytest.approx([2 / 3, 1 / 3, 0, 0, 0])
    sq = sf_schedules.wsd(1.0, 10, cooldown_fraction=0.3, cooldown="1-sqrt", final_lr=0.1)
    # 1-sqrt: F + (P - F) (1 - sqrt(q))
    assert sq(6) == 1.0
    assert sq(7) == pytest.approx(0.1 + 0.9 * (1 - 1 / math.sqrt(3)), rel=1e-15)
    assert sq(8) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(2 / 3)), rel=1e-15)
    assert sq(9) == pytest.approx(0.1, rel=1e-15)
    # the 1-sqrt shape lies below the linear one inside the cooldown
    lin_f = sf_schedules.wsd(1.0, 10, cooldown_fraction=0.3, final_lr=0.1)
    assert sq(7) < lin_f(7) and sq(8) < lin_f(8)


def test_wsd_cooldown_length_is_python_round():
    # round() is round-half-to-even: 2.5 -> 2, 7.5 -> 8
    assert sf_schedules.wsd(1.0, 10, cooldown_fraction=0.25).cooldown_steps == 2
    assert sf_schedules.wsd(1.0, 10, cooldown_fraction=0.75).cooldown_steps == 8
    two = sf_schedules.wsd(1.0, 10, cooldown_fraction=0.25)
    assert [two(s) for s in (7, 8, 9)] == pytest.approx([1.0, 0.5, 0.0])


def test_sqrt_values():
    sched = sf_schedules.sqrt(2.0, warmup_steps=3)
    assert [sched(s) for s in range(3)] == pytest.approx([2 / 3, 4 / 3, 2.0])
    assert sched(3) == 2.0
    assert sched(6) == pytest.approx(1.0, rel=1e-15)  # 2 / sqrt(4)
    assert sched(11) == pytest.approx(2 / 3, rel=1e-15)  # 2 / sqrt(9)


# -- every backend against the hand formulas ----------------------------------------------------


@pytest.mark.parametrize("kind,kwargs,sched", CASES, ids=IDS)
def test_numpy_and_python_ints(kind, kwargs, sched):
    want = expected(kind, kwargs)
    ints = [sched(s) for s in range(N_STEPS)]
    assert all(type(v) is float for v in ints)
    np.testing.assert_allclose(ints, want, rtol=1e-14, atol=1e-15)
    values = sched.values(N_STEPS)
    assert values.dtype == np.float64 and values.shape == (N_STEPS,)
    np.testing.assert_allclose(values, want, rtol=1e-14, atol=1e-15)
    grid = sched(np.arange(N_STEPS).reshape(4, 4))
    np.testing.assert_allclose(grid, want.reshape(4, 4), rtol=1e-14, atol=1e-15)


def test_optax_jit_matches_hand_formulas():
    import jax
    import jax.numpy as jnp
    import optax

    from sf_optax.schedules import to_optax

    for kind, kwargs, sched in CASES:
        want = expected(kind, kwargs)
        fn = to_optax(sched)
        traced = np.asarray(jax.jit(fn)(jnp.arange(N_STEPS)))
        np.testing.assert_allclose(traced, want, rtol=2e-6, atol=1e-7, err_msg=kind)

        # optax.sgd's update is -lr * grad: with grad = 1 it reads the lr back, step by step
        opt = optax.sgd(learning_rate=fn)
        params = jnp.zeros(())
        state = opt.init(params)
        step = jax.jit(lambda s, opt=opt, params=params: opt.update(jnp.ones(()), s, params))
        seen = []
        for _ in range(N_STEPS):
            updates, state = step(state)
            seen.append(-float(updates))
        np.testing.assert_allclose(seen, want, rtol=2e-6, atol=1e-7, err_msg=kind)


@pytest.mark.parametrize("kind,kwargs,sched", CASES, ids=IDS)
def test_torch_scheduler_drives_sgd(kind, kwargs, sched):
    want = expected(kind, kwargs)
    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    other = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [other], "lr": 5.0}], lr=123.0)
    sch = scheduler(opt, sched)
    seen, moved = [], []
    for _ in range(N_STEPS):
        seen.append(opt.param_groups[0]["lr"])
        before = p.detach().clone()
        p.grad = torch.ones((), dtype=torch.float64)
        opt.step()
        moved.append(float(before - p.detach()))  # SGD moved by lr * grad = lr
        sch.step()
    np.testing.assert_allclose(seen, want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(moved, want, rtol=1e-12, atol=1e-15)
    # every param group follows the schedule
    assert sch.get_last_lr() == pytest.approx([hand_lr(kind, N_STEPS, **kwargs)] * 2, rel=1e-14)
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]


def test_torch_scheduler_resume_continues_schedule(tmp_path):
    kwargs = dict(peak=1.0, total=20, warmup=3, final=0.05)
    sched = sf_schedules.cosine(1.0, 20, warmup_steps=3, final_lr=0.05)
    want = expected("cosine", kwargs, 24)

    def make():
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=0.7, momentum=0.9)
        return p, opt, scheduler(opt, sched)

    def run(p, opt, sch, n):
        lrs = []
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones_like(p)
            opt.step()
            sch.step()
        return lrs

    p, opt, sch = make()
    first = run(p, opt, sch, 9)
    torch.save({"opt": opt.state_dict(), "sch": sch.state_dict(), "p": p.detach()}, tmp_path / "c")
    rest_straight = run(p, opt, sch, 15)
    p_straight = p.detach().clone()

    ckpt = torch.load(tmp_path / "c")
    assert "schedule" not in ckpt["sch"]
    p2, opt2, sch2 = make()
    with torch.no_grad():
        p2.copy_(ckpt["p"])
    opt2.load_state_dict(ckpt["opt"])
    sch2.load_state_dict(ckpt["sch"])
    rest_resumed = run(p2, opt2, sch2, 15)
    np.testing.assert_allclose(first + rest_resumed, want, rtol=1e-14, atol=1e-15)
    assert rest_resumed == rest_straight
    torch.testing.assert_close(p2.detach(), p_straight, rtol=0, atol=0)

    # the scheduler alone (optimizer state not restored) still sets the next lr
    _, opt3, sch3 = make()
    sch3.load_state_dict(ckpt["sch"])
    assert opt3.param_groups[0]["lr"] == pytest.approx(want[9], rel=1e-15)


def sf_sgd_numpy(lrs, x0, target, b1, power):
    """Float64 numpy replay of DESIGN.md 1.1 (SGD, quadratic loss) with per-step lrs; gives x."""
    y, z, lr_max, weight_sum = x0.copy(), x0.copy(), 0.0, 0.0
    for lr in lrs:
        lr_max = max(lr_max, lr)
        weight = lr_max**power
        weight_sum += weight
        c = weight / weight_sum
        g = y - target
        y = (1 - c) * y + c * z + lr * (b1 * (1 - c) - 1) * g
        z = z - lr * g
    return (y - (1 - b1) * z) / b1


SF_SCHED = sf_schedules.wsd(0.2, 12, warmup_steps=3, cooldown_fraction=0.25, final_lr=0.02)
SF_LRS = [hand_lr("wsd", s, 0.2, total=12, warmup=3, frac=0.25, final=0.02) for s in range(12)]


def test_torch_scheduler_with_schedule_free_sgd():
    """SGDScheduleFree reads the lr the scheduler sets before each step."""
    rng = np.random.default_rng(3)
    target, x0 = rng.standard_normal(4), rng.standard_normal(4)
    p = torch.nn.Parameter(torch.tensor(x0))
    opt = sf_torch.SGDScheduleFree([p], lr=1.0, momentum=0.8, weight_lr_power=2.0)
    sch = scheduler(opt, SF_SCHED)
    for _ in range(12):
        opt.zero_grad()
        (0.5 * ((p - torch.tensor(target)) ** 2).sum()).backward()
        opt.step()
        sch.step()
    want = sf_sgd_numpy(SF_LRS, x0, target, 0.8, 2.0)
    np.testing.assert_allclose(opt.eval_params()[0].numpy(), want, rtol=1e-12, atol=1e-14)


def test_optax_schedule_with_schedule_free_sgd():
    """sf_optax.sgd calls the schedule with its step count k: same trajectory, float64."""
    import jax
    import jax.numpy as jnp
    import optax

    import sf_optax
    from sf_optax.schedules import to_optax

    rng = np.random.default_rng(3)
    target, x0 = rng.standard_normal(4), rng.standard_normal(4)
    with jax.enable_x64(True):
        tx = sf_optax.sgd(learning_rate=to_optax(SF_SCHED), b1=0.8, weight_lr_power=2.0)
        params = jnp.asarray(x0)
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            updates, state = tx.update(params - jnp.asarray(target), state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(12):
            params, state = step(params, state)
        x = np.asarray(sf_optax.eval_params(state, params))
    want = sf_sgd_numpy(SF_LRS, x0, target, 0.8, 2.0)
    np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-14)


# -- validation -----------------------------------------------------------------------------------

BAD = [
    (lambda: sf_schedules.constant(0.0), r"peak_lr .*> 0"),
    (lambda: sf_schedules.constant(-1.0), r"peak_lr .*> 0"),
    (lambda: sf_schedules.constant(math.inf), r"peak_lr .*finite"),
    (lambda: sf_schedules.constant(math.nan), r"peak_lr .*finite"),
    (lambda: sf_schedules.constant("1e-3"), r"peak_lr"),
    (lambda: sf_schedules.constant(True), r"peak_lr"),
    (lambda: sf_schedules.constant(1.0, warmup_steps=-1), r"warmup_steps .*>= 0"),
    (lambda: sf_schedules.sqrt(1.0, warmup_steps=2.0), r"warmup_steps .*int"),
    (lambda: sf_schedules.cosine(1.0, 0), r"total_steps .*>= 1"),
    (lambda: sf_schedules.cosine(1.0, 10.0), r"total_steps .*int"),
    (lambda: sf_schedules.wsd(1.0, True), r"total_steps"),
    (lambda: sf_schedules.cosine(1.0, None), r"total_steps"),
    (lambda: sf_schedules.cosine(1.0, 10, warmup_steps=10), r"warmup_steps .*\[0, 9\]"),
    (lambda: sf_schedules.cosine(1.0, 10, warmup_steps=-2), r"warmup_steps"),
    (lambda: sf_schedules.cosine(1.0, 10, final_lr=-0.1), r"final_lr .*\[0, peak_lr\]"),
    (lambda: sf_schedules.cosine(1.0, 10, final_lr=1.5), r"final_lr .*\[0, peak_lr\]"),
    (lambda: sf_schedules.wsd(1.0, 10, final_lr=2.0), r"final_lr"),
    (lambda: sf_schedules.wsd(1.0, 10, cooldown_fraction=-0.1), r"cooldown_fraction .*\[0, 1\]"),
    (lambda: sf_schedules.wsd(1.0, 10, cooldown_fraction=1.2), r"cooldown_fraction .*\[0, 1\]"),
    (lambda: sf_schedules.wsd(1.0, 10, cooldown="cosine"), r"cooldown must be in"),
    (
        lambda: sf_schedules.wsd(1.0, 10, warmup_steps=5, cooldown_fraction=0.6),
        r"warmup_steps \+ round\(cooldown_fraction \* total_steps\) must be <= total_steps",
    ),
    (lambda: sf_schedules.Schedule("linear", 1.0), r"kind must be in"),
    (lambda: sf_schedules.Schedule("sqrt", 1.0, total_steps=5), r"total_steps must be None"),
    (lambda: sf_schedules.constant(1.0)(-1), r"step must be >= 0"),
    (lambda: sf_schedules.constant(1.0)(np.array([0, -3])), r"step must be >= 0"),
    (lambda: sf_schedules.constant(1.0).values(-1), r"n must be an int >= 0"),
]


@pytest.mark.parametrize("make,match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_named_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_adapters_reject_non_schedules():
    from sf_optax.schedules import to_optax

    with pytest.raises(TypeError, match="sf_schedules.Schedule"):
        to_optax(lambda count: 0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="sf_schedules.Schedule"):
        scheduler(opt, lambda step: 0.1)


def test_schedules_are_frozen_values():
    a = sf_schedules.wsd(1.0, 10, cooldown="1-sqrt")
    assert a == sf_schedules.wsd(1.0, 10, cooldown="1-sqrt")
    with pytest.raises(AttributeError):
        a.peak_lr = 2.0
