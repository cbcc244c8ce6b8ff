"""RAdam's variance-rectification lengths, written once for sf_optax and sf_torch.

Pure arithmetic on whatever the caller passes: Python floats (sf_torch computes its scalars on
the host in float64) or JAX arrays of the caller's dtype (sf_optax, inside ``jax.jit``).
"""

from __future__ import annotations

from typing import Any


def radam_rho(step: Any, b2: Any) -> tuple[Any, Any]:
    """``(rho_t, rho_inf)``: the length of RAdam's approximated simple moving average at the
    1-based ``step``, and its limit ``2 / (1 - b2) - 1``. RAdam rectifies (and divides by
    ``sqrt(v)``) only once ``rho_t > 4``."""
    rho_inf = 2 / (1 - b2) - 1
    b2_t = b2**step
    return rho_inf - 2 * step * b2_t / (1 - b2_t), rho_inf
