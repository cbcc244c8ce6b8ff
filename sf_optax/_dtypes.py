"""The one dtype rule of sf_optax's arithmetic: float32 or wider.

bf16 and float16 operands are computed in float32 (as sf_torch and the reference do with their
float32 state), float64 stays float64, so that low-precision parameters do not round every
intermediate to 8 or 11 bits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(*arrays_or_dtypes: Any) -> jnp.dtype:
    """The dtype to compute in: ``jnp.result_type`` of the operands, promoted to float32 or wider.

    Args:
      *arrays_or_dtypes: arrays, scalars or dtypes, as for ``jnp.result_type``; at least one.

    Returns:
      float32 for integer, bool, bf16, float16 or float32 operands; float64 where an operand is
      (or, for a Python scalar, where ``jax_enable_x64`` makes it) float64.
    """
    return jnp.promote_types(jnp.result_type(*arrays_or_dtypes), jnp.float32)


_FLOATING = "a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64) or None"


def check_state_dtype(state_dtype: Any) -> Any:
    """``state_dtype``, returned as it is once checked: None, or a floating dtype (the state
    holds ``z``, ``v`` and ``x``, which an integer, bool or complex dtype would round or break).

    Raises:
      TypeError: the value is no dtype at all (``"foo"``, ``3``, an array).
      ValueError: a dtype that is not floating (``jnp.int32``, ``bool``, ``jnp.complex64``).
    """
    if state_dtype is None:
        return None
    try:
        if isinstance(state_dtype, np.ndarray | jax.Array):  # has a dtype, is none
            raise TypeError
        dtype = jnp.dtype(state_dtype)
    except Exception:  # noqa: BLE001  (numpy raises TypeError, or others, for non-dtypes)
        raise TypeError(f"state_dtype must be {_FLOATING}, got {state_dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"state_dtype must be {_FLOATING}, got {state_dtype!r}")
    return state_dtype
