"""When local-step workers average their models: the sync-period rules, host-side in float64.

Local steps: each data-parallel worker takes ``H`` optimizer steps on its own data, then the
workers average their models (one all-reduce instead of ``H``). A *rule* decides ``H`` once per
round, at the round's first step, from the learning rate of that step; the list of sync steps
is a pure function of the rule and the learning rates of the run, computed here in Python
floats (float64), so that sf_torch and sf_optax sync on exactly the same steps.

    lrs = sf_schedules.cosine(1e-3, total_steps=T, warmup_steps=W).values(T)
    steps = sync_steps(QSR(h_base=4, alpha=0.01, warmup_steps=W), lrs)   # (4, 8, ..., T)
    mask = sync_mask(QSR(...), lrs)                                      # bool per step

``lrs[t]`` is the learning rate step ``t`` (0-based) uses; ``sync_steps`` returns the number
of steps taken when each sync happens (1-based counts), ending with ``len(lrs)``: a round never
runs past the last step (its period is clamped to the steps left), so the run ends averaged.
A gradient-accumulation micro-step is not a step here: ``H`` counts optimizer steps.

The rules:

- :class:`Constant`: ``H`` fixed.
- :class:`QSR` (Gu et al., "A Quadratic Synchronization Rule for Distributed Deep Learning",
  ICLR 2024): ``H = max(h_base, floor((alpha / lr) ** power))`` with ``power = 2``; ``h_warm``
  during warmup. The learning rate falls as a schedule decays, so rounds grow towards the end,
  where QSR's analysis says longer local phases help generalisation most.
- :func:`inverse_lr`: the same with ``power = 1``, QSR's baseline.
- :class:`ScheduleFreeQSR` and :class:`AveragingWindow`, for Schedule-Free, whose learning rate
  is constant after warmup (so QSR on it is a constant period); see their docstrings for why
  each is the natural period there. :func:`schedule_free_default` is the recommended one
  (ScheduleFreeQSR with ``alpha = lr / 2``), chosen by ``python -m bench.local``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sf_schedules import validation


def _count(name: str, value, minimum: int = 1) -> int:
    return validation.check_count(name, value, minimum, required=True)


def _cap(name: str, value) -> int | None:
    return None if value is None else _count(name, value)


@dataclass(frozen=True)
class Constant:
    """Sync every ``period`` steps (``period = 1``: data-parallel, one average per step)."""

    period: int

    def __post_init__(self):
        _count("period", self.period)

    def periods(self, lrs: np.ndarray) -> np.ndarray:
        return np.full(len(lrs), self.period, dtype=np.int64)


@dataclass(frozen=True)
class QSR:
    """``H = max(h_base, floor((alpha / lr) ** power))``; ``h_warm`` for rounds that start
    during the first ``warmup_steps`` steps (default ``h_base``); at most ``h_max`` when given.

    ``lr`` is the learning rate of the round's first step. A round starting where ``lr`` is 0
    (the last step of a schedule decaying to 0) lasts until ``h_max`` or the end of the run.
    """

    h_base: int
    alpha: float
    power: float = 2.0
    h_warm: int | None = None
    warmup_steps: int = 0
    h_max: int | None = None

    def __post_init__(self):
        _count("h_base", self.h_base)
        validation.check_real("alpha", self.alpha, 0.0, math.inf, low_open=True, required=True)
        validation.check_real("power", self.power, 0.0, math.inf, low_open=True, required=True)
        _cap("h_warm", self.h_warm)
        _count("warmup_steps", self.warmup_steps, 0)
        _cap("h_max", self.h_max)
        if self.h_max is not None and self.h_max < self.h_base:
            raise ValueError(f"h_max must be >= h_base ({self.h_base}), got {self.h_max}")

    def _rule(self, effective_lrs: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", over="ignore"):
            grown = np.floor((self.alpha / np.asarray(effective_lrs, np.float64)) ** self.power)
        grown = np.nan_to_num(grown, nan=np.inf, posinf=np.inf)
        # A round never outlasts the run: len(lrs) bounds an infinite period (lr 0).
        limit = len(grown) if self.h_max is None else min(self.h_max, len(grown))
        h = np.clip(grown, self.h_base, max(limit, self.h_base)).astype(np.int64)
        warm = self.h_base if self.h_warm is None else self.h_warm
        h[: self.warmup_steps] = warm
        return h

    def periods(self, lrs: np.ndarray) -> np.ndarray:
        return self._rule(lrs)


def inverse_lr(h_base: int, alpha: float, **kwargs) -> QSR:
    """QSR's baseline: ``H = max(h_base, floor(alpha / lr))`` (power 1)."""
    return QSR(h_base, alpha, power=1.0, **kwargs)


def averaging_weights(lrs: Sequence[float], r: float = 0.0, weight_lr_power: float = 2.0):
    """``c_t``, the weight Schedule-Free's average ``x`` gives step ``t``'s ``z`` (DESIGN.md
    section 1: ``weight = (t+1)**r * lr_max**weight_lr_power``, ``c = weight / weight_sum``),
    for the learning rates ``lrs``; float64."""
    lrs = np.asarray(lrs, np.float64)
    lr_max = np.maximum.accumulate(lrs)
    weight = np.arange(1, len(lrs) + 1, dtype=np.float64) ** r * lr_max**weight_lr_power
    total = np.cumsum(weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weight / total, 0.0)


@dataclass(frozen=True)
class ScheduleFreeQSR:
    """QSR on the learning rate Schedule-Free's ``y`` actually moves with.

    Gradients are taken at ``y = (1 - b1) z + b1 x``. A gradient moves ``z`` by ``lr`` and ``x``
    by ``c_t lr`` at once (``x`` averages ``z`` with weight ``c_t``), so ``y`` moves by
    ``lr ((1 - b1) + b1 c_t)``: the effective learning rate of the iterate whose drift between
    workers a sync repairs. Early on ``c_t`` is large (``1/t``), the effective rate is ``lr``
    and rounds are short; once ``c_t`` is small it is ``(1 - b1) lr``, a tenth of ``lr`` at
    ``b1 = 0.9``, and QSR's ``(alpha / ((1 - b1) lr))**2`` gives rounds 100 times longer than
    plain QSR on ``lr`` would. ``b1``, ``r`` and ``weight_lr_power`` are the optimizer's.
    """

    h_base: int
    alpha: float
    b1: float = 0.9
    power: float = 2.0
    h_warm: int | None = None
    warmup_steps: int = 0
    h_max: int | None = None
    r: float = 0.0
    weight_lr_power: float = 2.0

    def __post_init__(self):
        validation.check_b1("b1", self.b1, required=True)
        validation.check_nonnegative("r", self.r, required=True)
        validation.check_nonnegative("weight_lr_power", self.weight_lr_power, required=True)
        self._qsr  # noqa: B018  (checks the QSR fields)

    @property
    def _qsr(self) -> QSR:
        return QSR(self.h_base, self.alpha, self.power, self.h_warm, self.warmup_steps, self.h_max)

    def effective_lrs(self, lrs: np.ndarray) -> np.ndarray:
        c = averaging_weights(lrs, self.r, self.weight_lr_power)
        return np.asarray(lrs, np.float64) * ((1.0 - self.b1) + self.b1 * c)

    def periods(self, lrs: np.ndarray) -> np.ndarray:
        return self._qsr._rule(self.effective_lrs(lrs))


@dataclass(frozen=True)
class AveragingWindow:
    """A period tied to the averaging weight: ``H = clip(floor(fraction / c_t), h_base, h_max)``.

    ``x`` is an average over roughly the last ``1 / c_t`` steps (all of them at ``r = 0`` and a
    constant ``lr``: ``1 / c_t = t``). Syncing ``fraction`` of that window keeps what one
    worker's ``x`` took in alone between syncs a fixed share of its average, so the workers'
    ``x`` stay as close as the share allows while the number of syncs grows only like
    ``log(T) / fraction``; ``h_max`` bounds how far the ``y`` (where gradients are taken) drift.
    """

    fraction: float
    h_base: int = 1
    h_max: int = 1024
    warmup_steps: int = 0
    h_warm: int | None = None
    r: float = 0.0
    weight_lr_power: float = 2.0

    def __post_init__(self):
        validation.check_real(
            "fraction", self.fraction, 0.0, math.inf, low_open=True, required=True
        )
        _count("h_base", self.h_base)
        _count("h_max", self.h_max)
        if self.h_max < self.h_base:
            raise ValueError(f"h_max must be >= h_base ({self.h_base}), got {self.h_max}")
        _count("warmup_steps", self.warmup_steps, 0)
        _cap("h_warm", self.h_warm)
        validation.check_nonnegative("r", self.r, required=True)
        validation.check_nonnegative("weight_lr_power", self.weight_lr_power, required=True)

    def periods(self, lrs: np.ndarray) -> np.ndarray:
        c = averaging_weights(lrs, self.r, self.weight_lr_power)
        with np.errstate(divide="ignore"):
            grown = np.floor(np.where(c > 0, self.fraction / c, np.inf))
        h = np.clip(grown, self.h_base, self.h_max).astype(np.int64)  # inf -> h_max
        h[: self.warmup_steps] = self.h_base if self.h_warm is None else self.h_warm
        return h


def schedule_free_default(
    lr: float,
    warmup_steps: int = 0,
    b1: float = 0.9,
    h_base: int = 4,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> ScheduleFreeQSR:
    """The recommended rule for Schedule-Free: :class:`ScheduleFreeQSR` with
    ``alpha = lr / 2`` (``lr``: the optimizer's peak learning rate), ``h_base`` in warmup and
    until ``y``'s effective lr falls below ``alpha / sqrt(h_base)``; late rounds last
    ``(0.5 / (1 - b1))**2`` = 25 steps at ``b1 = 0.9``.

    Measured by ``python -m bench.local`` (bench/RESULTS.md section 6; K = 4, T = 600) against
    :class:`AveragingWindow` (fraction 0.1 and 0.25): on the char LM (3 seeds) the two lie on
    one loss-vs-volume curve (ScheduleFreeQSR at 70 units +0.159 over data-parallel's eval
    loss, AveragingWindow interpolated to the same volume +0.158), both about 0.01 below
    constant ``H`` at equal volume; on the digits MLP (5 seeds) ScheduleFreeQSR reaches the
    smallest paired gap (+0.0046 at 5% of data-parallel's volume, AveragingWindow +0.0051 at
    8.7%). ScheduleFreeQSR is kept as the default, with the smaller ``alpha`` of the two
    measured (lr / 2 rather than lr), the better of them on the char LM. Neither reaches
    data-parallel's final eval loss on the char LM at 600 steps.
    """
    return ScheduleFreeQSR(
        h_base,
        0.5 * validation.check_real("lr", lr, 0.0, math.inf, low_open=True, required=True),
        b1=b1,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )


Rule = Constant | QSR | ScheduleFreeQSR | AveragingWindow
RULES = (Constant, QSR, ScheduleFreeQSR, AveragingWindow)


def _lrs(lrs: Sequence[float] | Callable[[int], float], total_steps: int | None) -> np.ndarray:
    if callable(lrs):
        if total_steps is None:
            raise TypeError("total_steps is required when lrs is a schedule (a callable)")
        lrs = [float(lrs(t)) for t in range(_count("total_steps", total_steps))]
    out = np.asarray(lrs, dtype=np.float64)
    if out.ndim != 1 or len(out) == 0:
        raise ValueError(f"lrs must be a non-empty 1-d sequence of learning rates, got {out.shape}")
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        bad = int(np.flatnonzero(~np.isfinite(out) | (out < 0))[0])
        raise ValueError(f"lrs must be finite and >= 0, got {out[bad]} at step {bad}")
    if total_steps is not None and _count("total_steps", total_steps) != len(out):
        raise ValueError(f"total_steps is {total_steps} but lrs has {len(out)} entries")
    return out


def sync_steps(
    rule: Rule, lrs: Sequence[float] | Callable[[int], float], total_steps: int | None = None
) -> tuple[int, ...]:
    """The step counts after which the workers average, in order; the last is the run's end.

    Args:
      rule: one of :data:`RULES`.
      lrs: the learning rate of every step (``lrs[t]`` for 0-based step ``t``), or a schedule
        ``lr(t)`` with ``total_steps``.
      total_steps: the run's length (required with a schedule; checked against ``lrs``).
    """
    if not isinstance(rule, RULES):
        names = ", ".join(r.__name__ for r in RULES)
        raise TypeError(f"rule must be one of {names}, got {type(rule).__name__}")
    lrs = _lrs(lrs, total_steps)
    periods = rule.periods(lrs)
    total, step, out = len(lrs), 0, []
    while step < total:
        step += int(min(periods[step], total - step))
        out.append(step)
    return tuple(out)


def sync_mask(
    rule: Rule, lrs: Sequence[float] | Callable[[int], float], total_steps: int | None = None
) -> np.ndarray:
    """``mask[t]``: whether the workers average right after step ``t`` (0-based); bool array."""
    steps = sync_steps(rule, lrs, total_steps)
    mask = np.zeros(steps[-1], dtype=bool)
    mask[np.asarray(steps) - 1] = True
    return mask
