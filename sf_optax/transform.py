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

from sf_optax._dtypes import check_state_dtype, compute_dtype
from sf_schedules.validation import check_b1, check_count, check_nonnegative

Valid = bool | jax.Array  # True, or a traced bool: whether traced hyperparameters are in range


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


def traced_in_range(
    value: Any,
    low: float = 0.0,
    high: float = float("inf"),
    *,
    low_open: bool = False,
    high_open: bool = False,
    whole: bool = False,
) -> Valid:
    """Whether ``value`` is a finite number in the interval (and whole, with ``whole``), for a
    value that could not be checked when the optimizer was made: a JAX tracer (inside
    ``jax.jit``, e.g. a hyperparameter of ``optax.inject_hyperparams``). A traced bool then;
    True (a Python bool, no computation) for any other value, which the constructors'
    ``sf_schedules.validation`` checks have already accepted."""
    if not isinstance(value, jax.core.Tracer):
        return True
    v = jnp.asarray(value)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        v = v.astype(jnp.float32)
    ok = jnp.isfinite(v)
    ok = ok & ((v > low) if low_open else (v >= low))
    ok = ok & ((v < high) if high_open else (v <= high))
    if whole:
        ok = ok & (v == jnp.round(v))
    return ok


def all_valid(*conditions: Valid) -> Valid:
    """The conjunction of :func:`traced_in_range` results; True when none is traced."""
    out: Valid = True
    for condition in conditions:
        if condition is not True:
            out = condition if out is True else out & condition
    return out


def nan_unless(valid: Valid, scalar: jax.Array) -> jax.Array:
    """``scalar`` where ``valid``, else NaN: a scalar of the step, so that every value computed
    from it is NaN. The same array (no operation at all) when ``valid`` is True; otherwise one
    ``jnp.where`` on a scalar, which returns ``scalar`` unchanged, bit for bit, when valid."""
    if valid is True:
        return scalar
    return jnp.where(valid, scalar, jnp.asarray(jnp.nan, scalar.dtype))


# Fields that hold a first moment (momentum) in optax's states (ScaleByAdamState,
# ScaleByAmsgradState, ScaleByBeliefState, ScaleByLionState, ScaleByNovogradState,
# ScaleBySM3State, TraceState, and in optax.contrib MuonState, SophiaState, and the
# exp_avg of DAdaptAdamWState, ProdigyState, MomoState, MomoAdamState).
_MOMENTUM_FIELDS = ("mu", "trace", "exp_avg")
# optax states with a first moment under another name: ScaleByAdanState (m),
# ScaleByAdemamixState (m1, m2), ScaleBySimplifiedAdEMAMixState (m), MadgradState (s).
_MOMENTUM_STATES = {
    "ScaleByAdanState": "m",
    "ScaleByAdemamixState": "m1",
    "ScaleBySimplifiedAdEMAMixState": "m",
    "MadgradState": "s",
}
# A ``mu`` that is no momentum: the running mean of the gradients by which the centred RMS
# (optax.scale_by_stddev, optax.rmsprop(centered=True)) centres its denominator.
_NOT_MOMENTUM = ("ScaleByRStdDevState", "ScaleByRStdDevWithCountState")
# sf_optax's own inner momentum (sf_optax.scale_by_second_moment(inner_momentum=...)): an EMA
# of the gradient inside the direction, which upstream's AdamWScheduleFree has on top of b1.
_INNER_MOMENTUM = ("ScaleByInnerMomentumState",)


def _momentum_buffer(node: Any) -> str | None:
    """``"Type.field"`` when ``node`` is a state that keeps a first moment, else None."""
    name = type(node).__name__
    fields = getattr(type(node), "_fields", None)
    if not isinstance(fields, tuple) or name in _NOT_MOMENTUM + _INNER_MOMENTUM:
        return None
    if isinstance(node, ScheduleFreeState) or (
        name == "ScheduleFreeState" and "base_optimizer_state" in fields
    ):
        return f"{name}.z"  # a schedule-free optimizer inside: its average is the momentum
    if _MOMENTUM_STATES.get(name) in fields:
        return f"{name}.{_MOMENTUM_STATES[name]}"
    for field in _MOMENTUM_FIELDS:
        if field in fields:
            return f"{name}.{field}"
    return None


def check_momentum_free(base_state: optax.OptState) -> None:
    """ValueError naming ``base`` when its state keeps a momentum (first-moment) buffer: the
    interpolation ``b1`` of schedule-free is its momentum, and a second one makes the result
    something else, whatever the base's momentum coefficient (a momentum of 0 is refused too:
    pass the base without it)."""
    found: list[str] = []

    def visit(node: Any) -> bool:
        buffer = _momentum_buffer(node)
        if buffer is not None:
            found.append(buffer)
        return buffer is not None

    jax.tree.leaves(base_state, is_leaf=visit)
    if found:
        buffers = ", ".join(dict.fromkeys(found))
        raise ValueError(
            "base must be a momentum-free direction (schedule_free's interpolation b1 is the "
            f"momentum), but its state keeps a momentum buffer ({buffers}). "
            "Pass the direction without momentum: sf_optax.scale_by_second_moment(b2, eps) or "
            "optax.scale_by_rms() instead of optax.adam/adamw/scale_by_adam (also with b1=0); "
            "optax.identity() or optax.sgd(learning_rate) with momentum=None instead of "
            "optax.sgd(momentum=...); no optax.trace or other momentum in an optax.chain. "
            "Or use sf_optax.adamw, sf_optax.sgd or sf_optax.radam."
        )


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

    Raises:
      TypeError, ValueError: a hyperparameter outside its range, naming it, when the optimizer
        is made (``init`` for ``optax.inject_hyperparams`` outside ``jax.jit``); a ``base``
        whose state keeps a momentum (``optax.adam``, ``optax.sgd(momentum=0.9)``,
        ``optax.trace``, ...), when ``init`` runs.

    Values that cannot raise, because their number is known only when the step runs (a
    learning-rate schedule's values, hyperparameters traced inside ``jax.jit``, e.g. changed in
    an ``optax.inject_hyperparams`` state), are checked in the step: when one is out of range
    (a negative or non-finite learning rate, ``b1`` outside (0, 1], ...), the step's updates and
    the new state are NaN (the parameters and the loss show it at once), never a step the wrong
    way. To skip such a step instead, keep the previous parameters and state where the updates
    are not finite: ``optax.apply_if_finite(optimizer, ...)`` checks the gradients it is given,
    not the updates, and does not catch it. Valid values give the same bits as without the
    check.
    """
    return _schedule_free(
        base,
        learning_rate,
        b1=b1,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        state_dtype=state_dtype,
        exact_x=exact_x,
    )


def _schedule_free(
    base: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: Any = 0.9,
    warmup_steps: Any = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    state_dtype: Any = None,
    exact_x: bool = False,
    also_valid: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """:func:`schedule_free`, with ``also_valid``: None, or a function ``() -> Valid`` giving the
    in-range condition of the traced hyperparameters the caller put into ``base`` (weight
    decay, ``b2``, ``eps``), checked with this function's own into the step's learning rate."""
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
    check_state_dtype(state_dtype)
    base = optax.with_extra_args_support(base)

    def hyperparameters_valid() -> Valid:
        """True, or (traced hyperparameters) whether they are all in range."""
        return all_valid(
            traced_in_range(b1, 0.0, 1.0, low_open=not exact_x),
            traced_in_range(warmup_steps, whole=True),
            traced_in_range(r),
            traced_in_range(weight_lr_power),
            traced_in_range(learning_rate),
            True if also_valid is None else also_valid(),
        )

    def init_fn(params):
        sdt = scalar_dtype(params)
        base_state = base.init(params)
        check_momentum_free(base_state)

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
            base_state=base_state,
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
        # Out-of-range values known only now (traced, or a schedule's) make the step's
        # learning rate NaN, and with it the updates and the new state: never a silent step
        # the wrong way. One select on a scalar: valid values keep their bits (a select on
        # each buffer instead would change how XLA fuses the step, and so its rounding).
        valid = hyperparameters_valid()
        if callable(learning_rate):
            valid = all_valid(valid, jnp.isfinite(lr) & (lr >= 0))
        lr = nan_unless(valid, lr)
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
