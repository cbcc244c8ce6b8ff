r"""Schedule-Free AdamC with a Polyak step size ("ScheduleFree+"), as an optax transformation.

The rule of upstream schedulefree's research class ``AdamCScheduleFreePlusPaper`` (main branch,
commit 43e5c2d, "Added ScheduleFree+"), one set of scalars for the whole parameter tree (one
torch param group). Step ``k`` (0-based), gradient ``g`` and loss ``f`` both taken at ``y``,
sums over every parameter element:

.. math::

    p &= \min(k / \text{sf\_b1\_anneal\_steps}, 1), \qquad
    \beta_k = 1 - (1 - \text{sf\_b1})^{1 - p} (1 - \text{sf\_b1\_max})^{p}
    \quad (\beta_k = \text{sf\_b1} \text{ without annealing})  \\
    e &= \text{polyak\_b}\, e + (1 - \text{polyak\_b}) \sqrt{\pi / 2}\, \textstyle\sum |g|,
    \qquad e \leftarrow e / (1 - \text{polyak\_b}^{k+1})  \\
    \eta_k &= \max(\text{learning\_rate}(k), \epsilon)\,
        \max(0, f + \beta_k \textstyle\sum g (z - x)) / e  \\
    \eta_{\max} &= \max(\eta_{\max}, \eta_k) \quad (\text{initially } \epsilon)  \\
    c &= 1 \text{ while } k < \text{c\_warmup}, \text{ else }
        w_k = (k + 1)^r \eta_{\max}^{\text{weight\_lr\_power}},\ W \mathrel{+}= w_k,\ c = w_k / W \\
    m &= b_1 m + (1 - b_1) g, \qquad v = b_2 v + (1 - b_2) g^2  \\
    z &\leftarrow z - \eta_k^2\, \text{weight\_decay}\, y
        - \eta_k \frac{m / (1 - b_1^{k+1})}{\sqrt{v / (1 - b_2^{k+1})} + \epsilon}  \\
    x &\leftarrow (1 - c)\, x + c\, z, \qquad y \leftarrow \beta_k x + (1 - \beta_k) z

The Polyak factor takes the minimum of the loss as 0: on a least-squares problem whose
minimum is 0 a float32 run (``learning_rate=0.5``, annealed ``sf_b1``) went from loss 4.39 to
0.04 in 300 steps; on one whose minimum is 0.28 the same run rose from 0.64 to 1.12.

As upstream does, ``e`` is stored after its bias correction, so that the next step's EMA starts
from the corrected value (with ``polyak_b = 0``, the default, there is no difference). Where the
gradient is zero everywhere (``e = 0``) the Polyak factor is taken as 0; upstream raises
``ZeroDivisionError`` there.

The state is a :class:`sf_optax.ScheduleFreeState` (``count``, ``weight_sum``, ``lr_max``,
``b1`` = the ``beta_k`` of the last step, ``z``, ``x``) whose ``base_state`` is a
:class:`AdamCPlusState` (``mu``, ``nu``, the EMA ``e`` and the last step size), so
:func:`sf_optax.eval_params`, :func:`sf_optax.train_params`, :func:`sf_optax.state_shardings`
and the Flax helpers work on it as on the other aliases. Because ``beta_k`` changes from step to
step, ``y = beta_k x + (1 - beta_k) z`` holds with the ``beta_k`` of the step that made ``y``:
the state keeps it in ``b1``, and by default also keeps ``x`` itself (``exact_x=True``, as
upstream keeps its ``x``).

References:
  Defazio et al., "The Road Less Scheduled", 2024 (arXiv:2405.15682).
  Defazio et al., "Why Gradients Rapidly Increase Near the End of Training", 2025
  (arXiv:2506.02285): the AdamC weight decay scaled by the squared step size.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sf_optax._dtypes import check_state_dtype, compute_dtype
from sf_optax.alias import check_mask
from sf_optax.transform import (
    ScheduleFreeState,
    all_valid,
    nan_unless,
    scalar_dtype,
    traced_in_range,
)
from sf_schedules.validation import check_count, check_nonnegative, check_real


class AdamCPlusState(NamedTuple):
    """``base_state`` of :func:`adamc_plus`'s :class:`sf_optax.ScheduleFreeState`.

    Attributes:
      mu: the first moment ``m`` (upstream's ``exp_avg``), one buffer per parameter.
      nu: the second moment ``v`` (``exp_avg_sq``), one buffer per parameter.
      grad_l1_ema: ``e``, the bias-corrected EMA of ``sqrt(pi/2)`` times the gradient's L1
        norm (upstream's ``grad_l1_ema``).
      step_size: the last step's ``eta_k = max(learning_rate, eps) * polyak``, upstream's
        ``scheduled_lr`` (for logging; 0 before the first step).
    """

    mu: optax.Updates
    nu: optax.Updates
    grad_l1_ema: jax.Array
    step_size: jax.Array


def _check_axis_name(axis_name: Any) -> Any:
    if axis_name is None or isinstance(axis_name, str):
        return axis_name
    if isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name):
        return axis_name
    raise TypeError(
        "axis_name must be None, a mesh axis name (str) or a non-empty tuple of them, "
        f"got {axis_name!r}"
    )


def _decay_bits(mask: Any, params: optax.Params) -> list[bool]:
    """One Python bool per parameter leaf: whether it gets weight decay."""
    leaves, treedef = jax.tree.flatten(params)
    if mask is None:
        return [True] * len(leaves)
    tree = mask(params) if callable(mask) else mask
    try:
        full = jax.tree.map(lambda bit, sub: jax.tree.map(lambda _: bool(bit), sub), tree, params)
    except ValueError as error:
        raise ValueError(
            f"mask must have the structure of the params (or a prefix of it): {error}"
        ) from None
    return treedef.flatten_up_to(full)


def adamc_plus(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    sf_b1: float = 0.9,
    sf_b1_max: float = 0.965,
    sf_b1_anneal_steps: int = 0,
    polyak_b: float = 0.0,
    c_warmup: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: Any = None,
    state_dtype: Any = None,
    exact_x: bool = True,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-Free AdamC with a Polyak step size, as upstream's
    ``AdamCScheduleFreePlusPaper``; the update needs the loss: ``update(grads, state, params,
    value=loss)``.

    Upstream's arguments map as ``lr`` -> ``learning_rate``, ``betas`` -> ``(b1, b2)`` (Adam's
    moments), ``sf_beta1`` -> ``sf_b1``, ``sf_beta1_max`` -> ``sf_b1_max``,
    ``sf_beta1_anneal_steps`` -> ``sf_b1_anneal_steps``, ``polyak_beta`` -> ``polyak_b``; the
    others keep their names and defaults. The rule is in the module docstring
    (:mod:`sf_optax.plus`).

    Args:
      learning_rate: the base step size (scalar or schedule ``k -> lr``), >= 0, floored at
        ``eps``; the step size is this times the Polyak factor.
      b1: Adam's first-moment decay, in [0, 1).
      b2: Adam's second-moment decay, in [0, 1).
      eps: added to Adam's denominator; also the floor of ``learning_rate`` and the initial
        ``lr_max``, >= 0.
      weight_decay: AdamC decay: ``z -= eta_k^2 * weight_decay * y``, >= 0 (upstream: values
        like 20 or 50, not AdamW's 0.1).
      sf_b1: Schedule-Free interpolation ``y = sf_b1 x + (1 - sf_b1) z``, in (0, 1] ([0, 1]
        with ``exact_x``; below 1 when annealed).
      sf_b1_max: the interpolation at the end of the annealing, in (0, 1) ([0, 1) with
        ``exact_x``).
      sf_b1_anneal_steps: steps over which ``1 - sf_b1`` moves geometrically to
        ``1 - sf_b1_max``; 0 (default): no annealing.
      polyak_b: EMA decay of the gradient's L1 norm in the Polyak denominator, in [0, 1).
      c_warmup: steps during which ``x = z`` (``c = 1``; the averaging weights start after).
      r: power of the polynomial weighting ``(k + 1)^r`` of the average, >= 0.
      weight_lr_power: power of ``lr_max`` in the averaging weight, >= 0.
      mask: which params get weight decay, as in :func:`sf_optax.adamw` (a tree of Python
        bools shaped like the params or a prefix of them, or a function params -> such a tree).
      state_dtype: a floating dtype for ``z``, ``x``, ``mu``, ``nu``; None keeps each
        parameter's dtype.
      exact_x: keep ``x`` in the state (default, as upstream). False saves that buffer: ``x``
        is then ``(y - (1 - b) z) / b`` with the ``b`` of the step that made ``y`` (kept in the
        state's ``b1``), exact in exact arithmetic however ``sf_b1`` is annealed. Keep the
        default with bf16 params: the Polyak step's inner product uses ``z - x``, which a
        rounded ``y`` spoils (measured: a bf16 least-squares run whose step size fell to 0).
      axis_name: None, or the mesh axis name(s) over which the parameters are sharded under
        ``shard_map``: the L1 norm and the inner product are then summed (``psum``) and the
        loss averaged (``pmean``) over it, as upstream all-reduces across DTensor ranks.
        Under ``jax.jit`` with sharded arrays, no name is needed: the sums over the params
        are already global. Leave it None where each device holds whole (replicated) params,
        e.g. data parallelism with averaged gradients; pass the averaged loss there.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``update(grads, state, params,
      value=loss)`` with ``params`` the current ``y`` and ``loss`` the scalar loss at ``y``.
      Evaluate at :func:`sf_optax.eval_params`.

    Raises:
      TypeError, ValueError: a hyperparameter outside its range, naming it, when the
        optimizer is made; ``update`` without ``params`` or ``value``, or a ``value`` that is
        not a scalar.

    As in :func:`sf_optax.schedule_free`, values known only when the step runs (a schedule's,
    or traced inside ``jax.jit`` by ``optax.inject_hyperparams``) and out of range make the
    step's updates and new state NaN.
    """
    if not isinstance(exact_x, bool):
        raise TypeError(
            f"exact_x must be a Python bool (it decides the state's layout), got {exact_x!r}; "
            "with optax.inject_hyperparams pass static_args=('exact_x',)"
        )
    check_nonnegative("learning_rate", learning_rate)
    check_real("b1", b1, 0.0, 1.0, high_open=True)
    check_real("b2", b2, 0.0, 1.0, high_open=True)
    check_nonnegative("eps", eps)
    check_nonnegative("weight_decay", weight_decay)
    anneal = check_count("sf_b1_anneal_steps", sf_b1_anneal_steps)
    if anneal:
        check_real("sf_b1", sf_b1, 0.0, 1.0, low_open=not exact_x, high_open=True)
    else:
        check_real("sf_b1", sf_b1, 0.0, 1.0, low_open=not exact_x)
    check_real("sf_b1_max", sf_b1_max, 0.0, 1.0, low_open=not exact_x, high_open=True)
    check_real("polyak_b", polyak_b, 0.0, 1.0, high_open=True)
    check_count("c_warmup", c_warmup)
    check_nonnegative("r", r)
    check_nonnegative("weight_lr_power", weight_lr_power)
    mask = check_mask(mask)
    check_state_dtype(state_dtype)
    axis_name = _check_axis_name(axis_name)

    def annealed_b1_valid() -> Any:
        """Annealing needs sf_b1 < 1 (a traced bool where either value is traced)."""
        if not any(isinstance(v, jax.core.Tracer) for v in (sf_b1, sf_b1_anneal_steps)):
            return True
        return (jnp.asarray(sf_b1_anneal_steps) <= 0) | (jnp.asarray(sf_b1) < 1)

    def hyperparameters_valid() -> Any:
        """True, or (traced hyperparameters) whether they are all in range."""
        return all_valid(
            traced_in_range(learning_rate),
            traced_in_range(b1, 0.0, 1.0, high_open=True),
            traced_in_range(b2, 0.0, 1.0, high_open=True),
            traced_in_range(eps),
            traced_in_range(weight_decay),
            traced_in_range(sf_b1, 0.0, 1.0, low_open=not exact_x),
            traced_in_range(sf_b1_max, 0.0, 1.0, low_open=not exact_x, high_open=True),
            annealed_b1_valid(),
            traced_in_range(sf_b1_anneal_steps, whole=True),
            traced_in_range(polyak_b, 0.0, 1.0, high_open=True),
            traced_in_range(c_warmup, whole=True),
            traced_in_range(r),
            traced_in_range(weight_lr_power),
        )

    def init_fn(params):
        sdt = scalar_dtype(params)

        def copy(p):
            dtype = jnp.result_type(p) if state_dtype is None else state_dtype
            return jnp.array(p, dtype=dtype, copy=True)

        def zeros(p):
            # zeros_like, not zeros(shape): under shard_map the buffers then vary over the
            # same mesh axes as their parameter (a lax.scan carry must keep its type).
            dtype = jnp.result_type(p) if state_dtype is None else state_dtype
            return jnp.zeros_like(p, dtype=dtype)

        return ScheduleFreeState(
            count=jnp.zeros([], jnp.int32),
            weight_sum=jnp.zeros([], sdt),
            lr_max=jnp.asarray(eps, sdt),
            b1=jnp.asarray(sf_b1, sdt),
            z=jax.tree.map(copy, params),
            x=jax.tree.map(copy, params) if exact_x else None,
            base_state=AdamCPlusState(
                mu=jax.tree.map(zeros, params),
                nu=jax.tree.map(zeros, params),
                grad_l1_ema=jnp.zeros([], sdt),
                step_size=jnp.zeros([], sdt),
            ),
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "adamc_plus needs the current parameters (y): call "
                "update(grads, opt_state, params, value=loss)"
            )
        if value is None:
            raise ValueError(
                "adamc_plus needs the loss at params for its Polyak step size: call "
                "update(grads, opt_state, params, value=loss)"
            )
        if jnp.shape(value) != ():
            raise ValueError(f"value must be the scalar loss, got shape {jnp.shape(value)}")
        sdt = state.weight_sum.dtype
        k = state.count
        kf = k.astype(sdt)
        one = jnp.ones((), sdt)

        # The interpolation of this step: 1 - beta_k moves geometrically (log-linearly).
        beta_start = jnp.asarray(sf_b1, sdt)
        steps = jnp.asarray(sf_b1_anneal_steps, sdt)
        progress = jnp.minimum(kf / jnp.where(steps > 0, steps, 1), 1)
        log_gap = (
            jnp.log(1 - beta_start) * (1 - progress)
            + jnp.log(1 - jnp.asarray(sf_b1_max, sdt)) * progress
        )
        beta = jnp.where(steps > 0, 1 - jnp.exp(log_gap), beta_start)
        beta_prev = state.b1.astype(sdt)

        # The two sums over every parameter element (global ones: see axis_name).
        def implicit_x(y, z):
            cdt = compute_dtype(y, z, beta_prev)
            b = beta_prev.astype(cdt)
            return (y.astype(cdt) - (1 - b) * z.astype(cdt)) / b

        if exact_x:
            x_old = state.x
        else:
            x_old = jax.tree.map(implicit_x, params, state.z)
        l1 = sum(
            (
                jnp.sum(jnp.abs(g.astype(compute_dtype(g, sdt)))).astype(sdt)
                for g in jax.tree.leaves(updates)
            ),
            jnp.zeros((), sdt),
        )

        def gap(g, z, x):
            cdt = compute_dtype(g, z, x, sdt)
            return jnp.sum(g.astype(cdt) * (z.astype(cdt) - x.astype(cdt))).astype(sdt)

        gaps = jax.tree.leaves(jax.tree.map(gap, updates, state.z, x_old))
        inner = beta * sum(gaps, jnp.zeros((), sdt))
        f = jnp.asarray(value).astype(sdt)
        if axis_name is not None:
            l1 = jax.lax.psum(l1, axis_name)
            inner = jax.lax.psum(inner, axis_name)
            f = jax.lax.pmean(f, axis_name)

        pb = jnp.asarray(polyak_b, sdt)
        ema = pb * state.base_state.grad_l1_ema + (1 - pb) * l1.astype(sdt) * math.sqrt(math.pi / 2)
        ema = ema / (1 - pb ** (kf + 1))
        polyak = jnp.maximum(f + inner, 0) / jnp.where(ema > 0, ema, 1)
        polyak = jnp.where(ema > 0, polyak, 0)

        lr = learning_rate(k) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, sdt)
        valid = hyperparameters_valid()
        if callable(learning_rate):
            valid = all_valid(valid, jnp.isfinite(lr) & (lr >= 0))
        lr = nan_unless(valid, jnp.maximum(lr, jnp.asarray(eps, sdt)))
        step_size = lr * polyak
        lr_max = jnp.maximum(state.lr_max, step_size)
        in_c_warmup = kf < jnp.asarray(c_warmup, sdt)
        weight = (kf + 1) ** jnp.asarray(r, sdt) * lr_max ** jnp.asarray(weight_lr_power, sdt)
        weight_sum = jnp.where(in_c_warmup, state.weight_sum, state.weight_sum + weight)
        c = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)
        c = jnp.where(in_c_warmup, one, c)

        bm = jnp.asarray(b1, sdt)
        bv = jnp.asarray(b2, sdt)
        correction1 = 1 - bm ** (kf + 1)
        correction2 = 1 - bv ** (kf + 1)
        decay = [
            jnp.asarray(weight_decay, sdt) if bit else jnp.zeros((), sdt)
            for bit in _decay_bits(mask, params)
        ]
        decay = jax.tree.unflatten(jax.tree.structure(params), decay)

        def step(y, g, z, x, m, v, wd):
            cdt = compute_dtype(y, g, z, x, m, v, sdt)
            as_c = lambda a: a.astype(cdt)  # noqa: E731
            y_, g_, z_, x_ = as_c(y), as_c(g), as_c(z), as_c(x)
            eta, cc, b = as_c(step_size), as_c(c), as_c(beta)
            z_ = z_ - eta * eta * as_c(wd) * y_
            m_new = as_c(bm) * as_c(m) + (1 - as_c(bm)) * g_
            v_new = as_c(bv) * as_c(v) + (1 - as_c(bv)) * g_ * g_
            denom = jnp.sqrt(v_new / as_c(correction2)) + jnp.asarray(eps, cdt)
            z_ = z_ - eta * ((m_new / as_c(correction1)) / denom)
            x_ = (1 - cc) * x_ + cc * z_
            y_new = b * x_ + (1 - b) * z_
            return (
                y_new,
                z_.astype(z.dtype),
                x_,
                m_new.astype(m.dtype),
                v_new.astype(v.dtype),
            )

        out = jax.tree.map(
            step,
            params,
            updates,
            state.z,
            x_old,
            state.base_state.mu,
            state.base_state.nu,
            decay,
        )
        treedef = jax.tree.structure(params)
        y_next, new_z, new_x, mu, nu = (
            treedef.unflatten(column) for column in zip(*treedef.flatten_up_to(out))
        )
        if exact_x:
            new_x = jax.tree.map(lambda xn, x: xn.astype(x.dtype), new_x, state.x)
        else:
            new_x = None
        new_updates = jax.tree.map(lambda yn, y: yn - y.astype(yn.dtype), y_next, params)
        new_state = ScheduleFreeState(
            count=optax.safe_increment(k),
            weight_sum=weight_sum,
            lr_max=lr_max,
            b1=beta,
            z=new_z,
            x=new_x,
            base_state=AdamCPlusState(mu=mu, nu=nu, grad_l1_ema=ema, step_size=step_size),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
