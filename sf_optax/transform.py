r"""Schedule-Free as an optax transformation: the one place where the update rule lives.

Notation (DESIGN.md section 1). The parameters handed to ``update`` are ``y``, the point where
gradients are taken; the state holds the base sequence ``z`` and the scalars. The evaluation
point ``x`` is implicit, ``x = (y - (1 - b1) z) / b1``, unless ``exact_x`` stores it. The wrapped
``base`` transformation turns the gradient into a momentum-free direction ``gn`` (for AdamW:
``g / (sqrt(v_hat) + eps) + weight_decay * y``). Step ``k`` (0-based):

.. math::

    s_k &= \min(1, (k + 1) / \text{warmup\_steps})  \\
    \gamma_k &= \text{learning\_rate}(k) \, s_k  \\
    \gamma_{\max} &= \max(\gamma_{\max}, \gamma_k)  \\
    w_k &= (k + 1)^r \, \gamma_{\max}^{\text{weight\_lr\_power}}, \qquad
    W \mathrel{+}= w_k, \qquad c = w_k / W \ (0 \text{ if } W = 0)  \\
    y &\leftarrow (1 - c)\, y + c\, z + \gamma_k (b_1 (1 - c) - 1)\, gn  \\
    z &\leftarrow z - \gamma_k\, gn

With ``exact_x`` the state also holds ``x`` and the same step reads
``x <- (1 - c) x + c z_new`` and ``y <- b1 x + (1 - b1) z_new`` (algebraically identical).

The scalars ``k``, ``weight_sum`` (W) and ``lr_max`` are kept in float32 or wider whatever the
parameters' dtype, so that the average stays an average in bf16.

References:
  Defazio et al., "The Road Less Scheduled", 2024 (arXiv:2405.15682).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sf_optax._dtypes import compute_dtype
from sf_schedules.validation import check_b1, check_count, check_nonnegative


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free`.

    Attributes:
      count: ``k``, the number of schedule-free steps taken (int32).
      weight_sum: ``W``, the sum of averaging weights so far (float32 or wider).
      lr_max: the largest learning rate seen so far (float32 or wider).
      b1: the interpolation coefficient of the last step; the eval/train views use it.
      z: the base sequence, one buffer per parameter.
      x: the averaged sequence when ``exact_x`` is on, else None.
      base_state: the state of the wrapped direction transformation.
    """

    count: jax.Array
    weight_sum: jax.Array
    lr_max: jax.Array
    b1: jax.Array
    z: optax.Params
    x: optax.Params | None
    base_state: optax.OptState


def scalar_dtype(params: optax.Params) -> jnp.dtype:
    """float32, or float64 when some parameter is float64: never narrower than float32."""
    # Leaf by leaf: a Python float leaf counts as the default float dtype (float64 under x64),
    # where one joint result_type would let the arrays' dtypes absorb it (weak typing).
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(params)]
    return compute_dtype(jnp.float32, *(d for d in dtypes if jnp.issubdtype(d, jnp.floating)))


def warmup_factor(count: jax.Array, warmup_steps: Any, dtype: jnp.dtype) -> jax.Array:
    """``(k + 1) / warmup_steps`` while ``k < warmup_steps``, then 1."""
    k = count.astype(dtype)
    warmup = jnp.asarray(warmup_steps, dtype)
    return jnp.where(k < warmup, (k + 1) / jnp.maximum(warmup, 1), jnp.ones((), dtype))


def schedule_free(
    base: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    state_dtype: Any = None,
    exact_x: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Makes a momentum-free direction transformation schedule-free.

    Args:
      base: maps gradients to the direction ``gn`` (no learning rate, no momentum), e.g.
        ``optax.identity()`` for SGD or ``sf_optax.scale_by_second_moment()`` for AdamW. Its
        updates are taken as they are; the learning rate is applied here.
      learning_rate: a scalar or an optax schedule ``k -> lr``; the warmup multiplies it.
      b1: interpolation between ``x`` and ``z`` in ``y`` (momentum), in (0, 1]; [0, 1] with
        ``exact_x``.
      warmup_steps: length of the linear warmup, an integer >= 0.
      r: power of the polynomial weighting ``(k + 1)^r`` of the average, >= 0.
      weight_lr_power: power of ``lr_max`` in the averaging weight, >= 0.
      state_dtype: dtype of ``z`` (and ``x``); None keeps each parameter's dtype.
      exact_x: also store ``x`` (a third buffer) so that evaluating never divides by ``b1``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` (``y``). The
      new parameters are ``optax.apply_updates(params, updates)``; evaluate at
      :func:`sf_optax.eval_params`.
    """
    if not isinstance(exact_x, bool):
        raise TypeError(
            f"exact_x must be a Python bool (it decides the state's layout), got {exact_x!r}; "
            "with optax.inject_hyperparams pass static_args=('exact_x',)"
        )
    # b1 = 0 makes x unrecoverable from y and z, unless x is stored.
    check_b1("b1", b1, allow_zero=exact_x)
    check_count("warmup_steps", warmup_steps)
    check_nonnegative("r", r)
    check_nonnegative("weight_lr_power", weight_lr_power)
    check_nonnegative("learning_rate", learning_rate)  # a schedule's values are not known here
    base = optax.with_extra_args_support(base)

    def init_fn(params):
        sdt = scalar_dtype(params)

        def copy(p):
            dtype = jnp.result_type(p) if state_dtype is None else state_dtype
            return jnp.array(p, dtype=dtype, copy=True)

        return ScheduleFreeState(
            count=jnp.zeros([], jnp.int32),
            weight_sum=jnp.zeros([], sdt),
            lr_max=jnp.zeros([], sdt),
            b1=jnp.asarray(b1, sdt),
            z=jax.tree.map(copy, params),
            x=jax.tree.map(copy, params) if exact_x else None,
            base_state=base.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "schedule_free needs the current parameters (y): call "
                "update(grads, opt_state, params)"
            )
        sdt = state.weight_sum.dtype
        k = state.count
        lr = learning_rate(k) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, sdt) * warmup_factor(k, warmup_steps, sdt)
        lr_max = jnp.maximum(state.lr_max, lr)
        weight = (k.astype(sdt) + 1) ** jnp.asarray(r, sdt) * lr_max ** jnp.asarray(
            weight_lr_power, sdt
        )
        weight_sum = state.weight_sum + weight
        c = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)
        beta = jnp.asarray(b1, sdt)

        gn, base_state = base.update(updates, state.base_state, params, **extra_args)

        def step_z(z, d):
            cdt = compute_dtype(z, d)
            return (z.astype(cdt) - lr.astype(cdt) * d.astype(cdt)).astype(z.dtype)

        new_z = jax.tree.map(step_z, state.z, gn)

        if exact_x:

            def step_x(x, z_new):
                cdt = compute_dtype(x, z_new)
                cc = c.astype(cdt)
                return ((1 - cc) * x.astype(cdt) + cc * z_new.astype(cdt)).astype(x.dtype)

            new_x = jax.tree.map(step_x, state.x, new_z)

            def new_y(y, x, z_new):
                cdt = compute_dtype(y, x, z_new)
                bb = beta.astype(cdt)
                return bb * x.astype(cdt) + (1 - bb) * z_new.astype(cdt)

            y_next = jax.tree.map(new_y, params, new_x, new_z)
        else:
            new_x = None
            # y' = (1 - c) y + c z + lr (b1 (1 - c) - 1) d, written with the new z (z = z' + lr d)
            # so that nothing reads the old z once z' exists: each buffer can then be updated
            # in place even where XLA computes y' and z' in separate loops (on the CPU).
            gn_coef = -lr * (1 - c) * (1 - beta)

            def new_y(y, z_new, d):
                cdt = compute_dtype(y, z_new, d)
                cc = c.astype(cdt)
                return (
                    (1 - cc) * y.astype(cdt)
                    + cc * z_new.astype(cdt)
                    + gn_coef.astype(cdt) * d.astype(cdt)
                )

            y_next = jax.tree.map(new_y, params, new_z, gn)

        new_updates = jax.tree.map(lambda yn, y: yn - y.astype(yn.dtype), y_next, params)
        new_state = ScheduleFreeState(
            count=optax.safe_increment(k),
            weight_sum=weight_sum,
            lr_max=lr_max,
            b1=beta,
            z=new_z,
            x=new_x,
            base_state=base_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
