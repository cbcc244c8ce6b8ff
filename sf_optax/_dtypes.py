"""The one dtype rule of sf_optax's arithmetic: float32 or wider.

bf16 and float16 operands are computed in float32 (as sf_torch and the reference do with their
float32 state), float64 stays float64, so that low-precision parameters do not round every
intermediate to 8 or 11 bits.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def compute_dtype(*arrays_or_dtypes: Any) -> jnp.dtype:
    """The dtype to compute in: ``jnp.result_type`` of the operands, promoted to float32 or wider.

    Args:
      *arrays_or_dtypes: arrays, scalars or dtypes, as for ``jnp.result_type``; at least one.

    Returns:
      float32 for integer, bool, bf16, float16 or float32 operands; float64 where an operand is
      (or, for a Python scalar, where ``jax_enable_x64`` makes it) float64.
    """
    return jnp.promote_types(jnp.result_type(*arrays_or_dtypes), jnp.float32)
