"""Hyperparameter checks shared by sf_optax, sf_torch, sf_schedules and the parity CLI.

Framework-neutral: a value may be a Python number, a numpy, JAX or torch scalar, or a value
whose number is not known yet (a JAX tracer inside ``jax.jit``, an optax schedule). Known
values are checked now; unknown ones are left to the caller (``None`` is returned).

Every failure names the argument and what it accepts:

- ``TypeError``: the value is not a real number at all (a string, a bool, a tuple, a
  non-scalar array): ``"b1 must be a real number in (0, 1], got '0.9'"``;
- ``ValueError``: a number outside the accepted range, or not finite:
  ``"b1 must be in (0, 1], got 1.5"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """The interval as it is written in error messages, e.g. ``[0, inf)`` or ``(0, 1]``."""
    high_open = high_open or high == math.inf
    low_open = low_open or low == -math.inf
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _counts(minimum: int) -> str:
    return f"{{{minimum}, {minimum + 1}, {minimum + 2}, ...}}"


def known_number(name: str, value: Any, accepted: str, required: bool = False) -> float | None:
    """``value`` as a Python float when its number is known now; None when it is not (a JAX
    tracer, a callable schedule, None). TypeError when it is no real scalar, or when
    ``required`` (a number must be known now, as in torch) and it is not."""
    if value is None or callable(value):
        if required:
            raise TypeError(f"{name} must be a real number in {accepted}, got {value!r}")
        return None
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"{name} must be a real number in {accepted}, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    dtype = str(getattr(value, "dtype", ""))
    if shape is None or tuple(shape) != () or "bool" in dtype or "complex" in dtype:
        raise TypeError(f"{name} must be a real number in {accepted}, got {value!r}")
    try:
        return float(value)
    except Exception:  # noqa: BLE001  (a traced or abstract value: its number is not known now)
        if required:
            raise TypeError(f"{name} must be a real number in {accepted}, got {value!r}") from None
        return None


def check_real(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    required: bool = False,
) -> float | None:
    """Checks that ``value`` is a finite number in the interval; returns it as a float (None
    when its number is not known now, which ``required`` refuses)."""
    accepted = interval(low, high, low_open, high_open)
    x = known_number(name, value, accepted, required)
    if x is None:
        return None
    ok = math.isfinite(x)
    ok = ok and (x > low if low_open else x >= low)
    ok = ok and (x < high if high_open else x <= high)
    if not ok:
        raise ValueError(f"{name} must be in {accepted}, got {value!r}")
    return x


def check_nonnegative(name: str, value: Any, required: bool = False) -> float | None:
    """A finite number >= 0 (learning rates, eps, weight decay, r, weight_lr_power)."""
    return check_real(name, value, 0.0, math.inf, required=required)


def check_b1(
    name: str, value: Any, *, allow_zero: bool = False, required: bool = False
) -> float | None:
    """The interpolation momentum ``b1`` (``momentum``, ``betas[0]``): in (0, 1], or [0, 1]
    where x is stored (b1 = 0 makes x impossible to recover from y and z)."""
    return check_real(name, value, 0.0, 1.0, low_open=not allow_zero, required=required)


def check_b2(name: str, value: Any, required: bool = False) -> float | None:
    """The second-moment decay ``b2`` (``betas[1]``): in [0, 1)."""
    return check_real(name, value, 0.0, 1.0, high_open=True, required=required)


def check_count(name: str, value: Any, minimum: int = 0, required: bool = False) -> int | None:
    """A whole number >= ``minimum`` (steps, sizes); returned as an int (None when not known
    now). Whole-valued floats and integer arrays count as whole numbers."""
    accepted = _counts(minimum)
    x = known_number(name, value, accepted, required)
    if x is None:
        return None
    if not (math.isfinite(x) and x.is_integer() and x >= minimum):
        raise ValueError(f"{name} must be in {accepted}, got {value!r}")
    return int(x)


def check_pair(name: str, value: Any, names: tuple[str, str]) -> tuple[Any, Any]:
    """``value`` unpacked as a pair (``betas``); ValueError naming the argument otherwise."""
    if isinstance(value, str | bytes):
        value = (value,)
    try:
        first, second = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair ({names[0]}, {names[1]}), got {value!r}") from None
    return first, second


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` when it is one of ``choices`` (compared with ``is`` for None/True/False)."""
    for choice in choices:
        if value is choice or (
            not isinstance(choice, bool | None) and type(value) is type(choice) and value == choice
        ):
            return value
    shown = ", ".join(map(repr, choices))
    raise ValueError(f"{name} must be in ({shown}), got {value!r}")
