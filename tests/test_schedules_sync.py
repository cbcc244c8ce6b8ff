"""sf_schedules.sync: sync lists checked against lists computed by hand, and against a plain
round-by-round loop written here (the rule as QSR states it: decide H at the round's first step
from that step's learning rate, clamp to the steps left)."""

import math

import numpy as np
import pytest

import sf_schedules
from sf_schedules.sync import (
    QSR,
    AveragingWindow,
    Constant,
    ScheduleFreeQSR,
    averaging_weights,
    inverse_lr,
    sync_mask,
    sync_steps,
)


def test_constant_by_hand():
    assert sync_steps(Constant(4), [0.1] * 10) == (4, 8, 10)
    assert sync_steps(Constant(1), [0.1] * 3) == (1, 2, 3)
    assert sync_steps(Constant(20), [0.1] * 3) == (3,)
    mask = sync_mask(Constant(3), [0.1] * 7)
    assert mask.tolist() == [False, False, True, False, False, True, True]


def test_qsr_by_hand():
    # lr 0.1 for 4 steps, then 0.05, then 0.02; alpha 0.2: (0.2/0.1)^2 = 4,
    # (0.2/0.05)^2 = 16, (0.2/0.02)^2 = 100; h_base 2, warmup 2 steps with h_warm 1.
    lrs = [0.01, 0.05] + [0.1] * 4 + [0.05] * 20 + [0.02] * 30
    rule = QSR(h_base=2, alpha=0.2, h_warm=1, warmup_steps=2)
    # step 0: warm, H 1 -> 1; step 1: warm -> 2; step 2: lr .1 -> H 4 -> 6;
    # step 6: lr .05 -> 16 -> 22; step 22: lr .05 -> 16 -> 38; step 38: lr .02 -> 100,
    # clamped to the 18 left -> 56.
    assert sync_steps(rule, lrs) == (1, 2, 6, 22, 38, 56)
    # power 1: (0.2/0.1) = 2, (0.2/0.05) = 4, (0.2/0.02) = 10: rounds start at 2 and 4
    # (lr .1), 6 ... 22 (lr .05), 26, 36, 46 (lr .02)
    rule = inverse_lr(h_base=2, alpha=0.2, h_warm=1, warmup_steps=2)
    assert sync_steps(rule, lrs) == (1, 2, 4, 6, 10, 14, 18, 22, 26, 36, 46, 56)


def test_qsr_floor_h_base_and_cap():
    # (0.25/0.0625)^2 = 16 exactly; h_base 18 wins over it. In floats (0.3/0.1)^2 is
    # 8.999999999999998: floor 8, as float64 says (both frameworks get this same list).
    assert sync_steps(QSR(h_base=2, alpha=0.25), [0.0625] * 20) == (16, 20)
    assert sync_steps(QSR(h_base=18, alpha=0.25), [0.0625] * 20) == (18, 20)
    assert sync_steps(QSR(h_base=2, alpha=0.3), [0.1] * 20) == (8, 16, 20)
    # lr 0 (a schedule's end) is an infinite period: capped by h_max, else by the run's end
    assert sync_steps(QSR(h_base=1, alpha=1.0), [0.0] * 7) == (7,)
    assert sync_steps(QSR(h_base=1, alpha=1.0, h_max=3), [0.0] * 7) == (3, 6, 7)


def _loop(lrs, h_of):
    """The rule as QSR's paper states it, one round at a time."""
    out, step = [], 0
    while step < len(lrs):
        step += min(h_of(step, lrs[step]), len(lrs) - step)
        out.append(step)
    return tuple(out)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_qsr_on_a_cosine_schedule_matches_a_plain_loop(power):
    total, warmup = 3000, 150
    lrs = sf_schedules.cosine(0.01, total_steps=total, warmup_steps=warmup).values(total)
    alpha, h_base, h_warm = 0.03, 4, 2

    def h_of(step, lr):
        if step < warmup:
            return h_warm
        return max(h_base, math.floor((alpha / lr) ** power)) if lr > 0 else total

    rule = QSR(h_base=h_base, alpha=alpha, power=power, h_warm=h_warm, warmup_steps=warmup)
    got = sync_steps(rule, lrs)
    assert got == _loop(list(lrs), h_of)
    assert got[-1] == total and len(got) < total / h_base
    # the same list from the schedule as a callable
    assert sync_steps(rule, lambda t: lrs[t], total_steps=total) == got


def test_schedule_free_rules_against_float64_sums():
    total, warmup, lr, b1 = 400, 20, 0.01, 0.9
    lrs = [lr * min(1.0, (t + 1) / warmup) for t in range(total)]
    # c_t by hand: weight = lr_max^2 (r = 0), c = weight / running sum
    c, running, peak = [], 0.0, 0.0
    for value in lrs:
        peak = max(peak, value)
        running += peak**2
        c.append(peak**2 / running)
    assert np.array_equal(averaging_weights(lrs), np.array(c))

    def h_sf(step, value):
        effective = value * ((1 - b1) + b1 * c[step])
        return max(2, math.floor((0.002 / effective) ** 2))

    rule = ScheduleFreeQSR(h_base=2, alpha=0.002, b1=b1)
    assert sync_steps(rule, lrs) == _loop(lrs, h_sf)
    # Once c_t ~ 1/t is small the period is floor((alpha / (lr (0.1 + 0.9 c_t)))^2):
    # alpha 0.0021 at t ~ 10^4: (2.1 / 1.00009)^2 = 4.41 -> 4; QSR on lr alone: 0.044 -> h_base
    late = sync_steps(ScheduleFreeQSR(h_base=2, alpha=0.0021, b1=b1), [lr] * 10_000)
    assert set(np.diff(late[-100:-1]).tolist()) == {4}
    assert set(np.diff(sync_steps(QSR(h_base=2, alpha=0.0021), [lr] * 10_000))) == {2}

    def h_window(step, value):
        return min(64, max(1, math.floor(0.25 / c[step])))

    window = AveragingWindow(fraction=0.25, h_max=64)
    assert sync_steps(window, lrs) == _loop(lrs, h_window)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="period must be in"):
        Constant(0)
    with pytest.raises(ValueError, match="alpha must be in"):
        QSR(h_base=1, alpha=0.0)
    with pytest.raises(ValueError, match="h_max must be >= h_base"):
        QSR(h_base=4, alpha=1.0, h_max=2)
    with pytest.raises(ValueError, match="b1 must be in"):
        ScheduleFreeQSR(h_base=1, alpha=1.0, b1=1.5)
    with pytest.raises(ValueError, match="fraction must be in"):
        AveragingWindow(fraction=-1)
    with pytest.raises(ValueError, match="lrs must be finite and >= 0, got -0.1 at step 1"):
        sync_steps(Constant(2), [0.1, -0.1])
    with pytest.raises(ValueError, match="total_steps is 3 but lrs has 2"):
        sync_steps(Constant(2), [0.1, 0.1], total_steps=3)
    with pytest.raises(TypeError, match="total_steps is required"):
        sync_steps(Constant(2), lambda t: 0.1)
    with pytest.raises(TypeError, match="rule must be one of"):
        sync_steps(4, [0.1])
