"""Validation of hyperparameters, shared by every sf_optax constructor.

Values may arrive as Python numbers, numpy/JAX arrays, schedules, or tracers (when
`optax.inject_hyperparams` rebuilds the transformation inside a jitted update). Only values whose
number is known now are checked; a traced value was checked when the transformation was built.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete_float(value: Any) -> float | None:
    """The value as a Python float when it is a concrete scalar, else None."""
    if callable(value) or value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except Exception:  # an abstract value that numpy cannot read
        return None
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raises ValueError naming `name` and its range when `value` lies outside it."""
    number = concrete_float(value)
    if number is None:
        return
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    accepted = f"{left}{low}, {high}{right}"
    if integer:
        accepted = f"integers in {accepted}"
    ok = math.isfinite(number) or (number == high == math.inf and not high_open)
    ok = ok and (number > low if low_open else number >= low)
    ok = ok and (number < high if high_open else number <= high)
    if integer and ok:
        ok = float(number).is_integer()
    if not ok:
        raise ValueError(f"{name} must be in {accepted}, got {value!r}")
