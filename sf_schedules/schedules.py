"""Learning-rate schedules written once for any array namespace.

Every schedule maps the 0-based update index ``step`` (step 0 is the first update) to the
learning rate of that update. The formula is written with an array namespace ``xp`` (numpy by
default; ``jax.numpy`` from :func:`sf_optax.schedules.to_optax`), using only ``xp.where``,
``xp.minimum``, ``xp.maximum``, ``xp.cos`` and ``xp.sqrt``, so that one definition serves Python
ints, numpy arrays and traced jax values. A Python int step gives a Python float.

Notation (all schedules): ``P = peak_lr``, ``F = final_lr``, ``W = warmup_steps``,
``T = total_steps``, ``s = step``.

- Warmup (every schedule, ``s < W``): ``lr(s) = P * (s + 1) / W``, so the first update uses
  ``P / W`` and update ``W - 1`` uses ``P``.
- Schedules with a horizon hold their last value after it: ``lr(s) = lr(T - 1)`` for
  ``s >= T``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

_KINDS = ("constant", "cosine", "wsd", "sqrt")
_COOLDOWNS = ("linear", "1-sqrt")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_peak_lr(peak_lr: Any) -> None:
    if not (_is_real(peak_lr) and math.isfinite(peak_lr) and peak_lr > 0):
        raise ValueError(f"peak_lr must be a finite number > 0, got {peak_lr!r}")


def _check_total_steps(total_steps: Any) -> None:
    if not (_is_int(total_steps) and total_steps >= 1):
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")


def _check_warmup_steps(warmup_steps: Any, total_steps: int | None) -> None:
    if total_steps is None:
        if not (_is_int(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    elif not (_is_int(warmup_steps) and 0 <= warmup_steps < total_steps):
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps - 1] = [0, {total_steps - 1}], "
            f"got {warmup_steps!r}"
        )


def _check_final_lr(final_lr: Any, peak_lr: float) -> None:
    if not (_is_real(final_lr) and 0 <= final_lr <= peak_lr):
        raise ValueError(
            f"final_lr must be a number in [0, peak_lr] = [0, {peak_lr}], got {final_lr!r}"
        )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``schedule(step)`` is the lr of update ``step`` (0-based).

    Build one with :func:`constant`, :func:`cosine`, :func:`wsd` or :func:`sqrt`; their
    docstrings state the formulas. Fields that a kind does not use keep their defaults.

    Attributes:
        kind: one of ``"constant"``, ``"cosine"``, ``"wsd"``, ``"sqrt"``.
        peak_lr: the largest learning rate, reached at update ``warmup_steps`` (or 0).
        warmup_steps: length of the linear warmup, ``lr(s) = peak_lr * (s + 1) / warmup_steps``.
        total_steps: the horizon (``cosine``, ``wsd``); None for schedules without one.
        final_lr: the lr of the last update ``total_steps - 1`` (``cosine``, ``wsd``).
        cooldown_fraction: ``wsd`` decays over the last ``round(cooldown_fraction *
            total_steps)`` updates.
        cooldown: ``wsd`` decay shape, ``"linear"`` or ``"1-sqrt"``.
    """

    kind: str
    peak_lr: float
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr: float = 0.0
    cooldown_fraction: float = 0.0
    cooldown: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be in {_KINDS}, got {self.kind!r}")
        _check_peak_lr(self.peak_lr)
        has_horizon = self.kind in ("cosine", "wsd")
        if has_horizon:
            _check_total_steps(self.total_steps)
        elif self.total_steps is not None:
            raise ValueError(
                f"total_steps must be None for a {self.kind!r} schedule, got {self.total_steps!r}"
            )
        _check_warmup_steps(self.warmup_steps, self.total_steps)
        _check_final_lr(self.final_lr, self.peak_lr)
        fraction = self.cooldown_fraction
        if not (_is_real(fraction) and 0 <= fraction <= 1):
            raise ValueError(f"cooldown_fraction must be a number in [0, 1], got {fraction!r}")
        if self.cooldown not in _COOLDOWNS:
            raise ValueError(f"cooldown must be in {_COOLDOWNS}, got {self.cooldown!r}")
        if self.kind == "wsd" and self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise ValueError(
                "warmup_steps + round(cooldown_fraction * total_steps) must be <= total_steps; "
                f"got warmup_steps={self.warmup_steps} and {self.cooldown_steps} cooldown steps "
                f"(cooldown_fraction={fraction}) with total_steps={self.total_steps}"
            )

    @property
    def cooldown_steps(self) -> int:
        """Number of decaying updates at the end of a ``wsd`` schedule (0 for other kinds)."""
        if self.kind != "wsd":
            return 0
        return int(round(self.cooldown_fraction * self.total_steps))

    def __call__(self, step: Any, xp: Any = np) -> Any:
        """The learning rate of update ``step`` (0-based).

        Args:
            step: a Python int (gives a Python float), an integer or float array of the
                namespace ``xp``, or a traced jax value when ``xp`` is ``jax.numpy``. Steps
                must be >= 0 (checked for Python ints and numpy arrays).
            xp: array namespace providing ``asarray``, ``where``, ``minimum``, ``maximum``,
                ``cos``, ``sqrt``.

        Returns:
            the learning rate(s), of the shape of ``step``.
        """
        python_scalar = _is_int(step)
        if python_scalar or isinstance(step, np.ndarray | np.generic | list | tuple):
            concrete = np.asarray(step)
            if concrete.size and not np.all(concrete >= 0):
                raise ValueError(f"step must be >= 0, got {step!r}")
        # Float arithmetic from here on (float64 in numpy, the default float under jax).
        s = xp.asarray(step) * 1.0
        lr = _FORMULAS[self.kind](self, s, xp)
        if python_scalar:
            return float(lr)
        return lr

    def values(self, n: int) -> np.ndarray:
        """Float64 numpy array of the learning rates of updates ``0 .. n - 1``."""
        if not (_is_int(n) and n >= 0):
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        return np.asarray(self(np.arange(n, dtype=np.float64)), dtype=np.float64)


def _warmup(sched: Schedule, s: Any, lr_after: Any, xp: Any) -> Any:
    """``P (s + 1) / W`` for ``s < W``, else ``lr_after``."""
    if sched.warmup_steps == 0:
        return lr_after
    ramp = sched.peak_lr * (s + 1.0) / sched.warmup_steps
    return xp.where(s < sched.warmup_steps, ramp, lr_after)


def _constant(sched: Schedule, s: Any, xp: Any) -> Any:
    return _warmup(sched, s, sched.peak_lr + 0.0 * s, xp)


def _cosine(sched: Schedule, s: Any, xp: Any) -> Any:
    peak, final, w = sched.peak_lr, sched.final_lr, sched.warmup_steps
    last = sched.total_steps - 1
    # The post-warmup updates w .. last map to progress 0 .. 1; with a single post-warmup
    # update (w == last) that update is the last one, so it gets progress 1 (final_lr).
    span = last - w
    progress = 1.0 + 0.0 * s if span == 0 else (xp.minimum(s, last) - w) / span
    progress = xp.maximum(progress, 0.0)
    decayed = final + (peak - final) * 0.5 * (1.0 + xp.cos(math.pi * progress))
    return _warmup(sched, s, decayed, xp)


def _wsd(sched: Schedule, s: Any, xp: Any) -> Any:
    peak, final = sched.peak_lr, sched.final_lr
    total, n_cool = sched.total_steps, sched.cooldown_steps
    start = total - n_cool
    # Cooldown update j = 1 .. n_cool (s = start + j - 1) sits at fraction q = j / n_cool, so
    # every cooldown update is below peak_lr and the last one is exactly final_lr.
    q = (xp.minimum(s, total - 1) - start + 1.0) / max(n_cool, 1)
    q = xp.minimum(xp.maximum(q, 0.0), 1.0)
    if sched.cooldown == "linear":
        decayed = peak + (final - peak) * q
    else:
        decayed = final + (peak - final) * (1.0 - xp.sqrt(q))
    stable_or_cool = xp.where(s >= start, decayed, peak + 0.0 * s) if n_cool else peak + 0.0 * s
    return _warmup(sched, s, stable_or_cool, xp)


def _sqrt(sched: Schedule, s: Any, xp: Any) -> Any:
    # max(., 1) only keeps the (discarded) warmup branch of xp.where free of sqrt(negative).
    decayed = sched.peak_lr / xp.sqrt(xp.maximum(s - sched.warmup_steps + 1.0, 1.0))
    return _warmup(sched, s, decayed, xp)


_FORMULAS = {"constant": _constant, "cosine": _cosine, "wsd": _wsd, "sqrt": _sqrt}


def constant(peak_lr: float, *, warmup_steps: int = 0) -> Schedule:
    """Linear warmup, then constant: ``lr(s) = P (s + 1) / W`` for ``s < W``, else ``P``.

    Args:
        peak_lr: ``P``, finite and > 0.
        warmup_steps: ``W``, an int >= 0.
    """
    return Schedule("constant", peak_lr, warmup_steps=warmup_steps)


def cosine(
    peak_lr: float, total_steps: int, *, warmup_steps: int = 0, final_lr: float = 0.0
) -> Schedule:
    """Linear warmup, then a half cosine from ``peak_lr`` down to ``final_lr``.

    With ``L = T - 1`` the last update and ``p(s) = (min(s, L) - W) / (L - W)`` (``p = 1`` when
    ``L == W``)::

        lr(s) = P (s + 1) / W                          s < W
        lr(s) = F + (P - F) (1 + cos(pi p(s))) / 2     s >= W

    so ``lr(W) = P``, ``lr(L) = F``, the midpoint ``s = W + (L - W) / 2`` has ``(P + F) / 2``,
    and updates after the horizon keep ``F``.

    Args:
        peak_lr: ``P``, finite and > 0.
        total_steps: ``T``, the number of updates, an int >= 1.
        warmup_steps: ``W``, an int in ``[0, T - 1]``.
        final_lr: ``F``, in ``[0, P]``.
    """
    return Schedule(
        "cosine", peak_lr, warmup_steps=warmup_steps, total_steps=total_steps, final_lr=final_lr
    )


def wsd(
    peak_lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    cooldown_fraction: float = 0.2,
    cooldown: str = "linear",
    final_lr: float = 0.0,
) -> Schedule:
    """Warmup-stable-decay: warmup, constant ``peak_lr``, then a cooldown to ``final_lr``.

    With ``C = round(cooldown_fraction * T)`` cooldown updates starting at ``S = T - C`` and
    ``q(s) = (min(s, T - 1) - S + 1) / C`` (so ``q = 1/C, 2/C, ..., 1`` over the cooldown)::

        lr(s) = P (s + 1) / W                 s < W
        lr(s) = P                             W <= s < S
        lr(s) = P + (F - P) q(s)              s >= S, cooldown="linear"
        lr(s) = F + (P - F) (1 - sqrt(q(s)))  s >= S, cooldown="1-sqrt"

    The last update ``T - 1`` has exactly ``F`` and later updates keep it. With ``C = 0`` the
    schedule stays at ``P`` to the end.

    Args:
        peak_lr: ``P``, finite and > 0.
        total_steps: ``T``, the number of updates, an int >= 1.
        warmup_steps: ``W``, an int >= 0 with ``W + C <= T`` and ``W < T``.
        cooldown_fraction: in ``[0, 1]``.
        cooldown: ``"linear"`` or ``"1-sqrt"`` (Hägele et al. 2024).
        final_lr: ``F``, in ``[0, P]``.
    """
    return Schedule(
        "wsd",
        peak_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        final_lr=final_lr,
        cooldown_fraction=cooldown_fraction,
        cooldown=cooldown,
    )


def sqrt(peak_lr: float, *, warmup_steps: int = 0) -> Schedule:
    """Warmup, then inverse square root: ``lr(s) = P / sqrt(s - W + 1)`` for ``s >= W``.

    ``lr(s) = P (s + 1) / W`` for ``s < W``; ``lr(W) = P``; no horizon.

    Args:
        peak_lr: ``P``, finite and > 0.
        warmup_steps: ``W``, an int >= 0.
    """
    return Schedule("sqrt", peak_lr, warmup_steps=warmup_steps)
