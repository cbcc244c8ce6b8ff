"""Hyperparameter checks shared by the optimizers and the wrapper.

Every failure is a ValueError of the form ``"<name> must be in <range>, got <value>"``.
"""

from __future__ import annotations

import math
import numbers


def _fail(name: str, accepted: str, value) -> ValueError:
    return ValueError(f"{name} must be in {accepted}, got {value!r}")


def check_real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """Check ``value`` lies in the interval and return it as a float."""
    accepted = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if isinstance(value, bool):
        raise _fail(name, accepted, value)
    try:
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise _fail(name, accepted, value) from None
    if not math.isfinite(x):
        raise _fail(name, accepted, value)
    ok_lo = x > lo if lo_open else x >= lo
    ok_hi = x < hi if hi_open else x <= hi
    if not (ok_lo and ok_hi):
        raise _fail(name, accepted, value)
    return x


def check_nonnegative(name: str, value) -> float:
    return check_real(name, value, 0.0, math.inf, lo_open=False, hi_open=True)


def check_momentum(name: str, value) -> float:
    return check_real(name, value, 0.0, 1.0, lo_open=True, hi_open=False)


def check_count(name: str, value) -> int:
    """A whole number of steps, >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _fail(name, "{0, 1, 2, ...}", value)
    return int(value)


def check_betas(value) -> tuple[float, float]:
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}") from None
    return (
        check_real("betas[0]", b1, 0.0, 1.0, lo_open=True, hi_open=False),
        check_real("betas[1]", b2, 0.0, 1.0, lo_open=False, hi_open=True),
    )
