"""Schedule-Free AdamW, SGD and RAdam: the reference classes' optimizers as optax transformations.

Each alias is :func:`sf_optax.schedule_free` around a momentum-free direction; the update rule
itself lives in :mod:`sf_optax.transform`. Hyperparameters follow optax naming
(``learning_rate``, ``b1``, ``b2``) and the defaults of the ``schedulefree`` reference classes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sf_optax._dtypes import check_state_dtype, compute_dtype
from sf_optax.packing import check_pack_size, packed
from sf_optax.transform import _schedule_free, all_valid, nan_unless, traced_in_range
from sf_schedules.radam import radam_rho
from sf_schedules.validation import check_b2, check_nonnegative, check_real


class ScaleBySecondMomentState(NamedTuple):
    """State of :func:`scale_by_second_moment`: the step count and ``v``, nothing else."""

    count: jax.Array
    nu: optax.Updates


class ScaleByInnerMomentumState(NamedTuple):
    """State of :func:`scale_by_second_moment` with ``inner_momentum != 0``: the step count, the
    EMA of the gradient ``mu`` (upstream's ``exp_avg``) and ``v``."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _inner_momentum_layout(inner_momentum: Any) -> bool:
    """Whether the state holds ``mu``: ``inner_momentum`` is known and not 0. The layout is
    decided when ``init`` runs, so the value must be a number there (also with
    ``optax.inject_hyperparams``, whose ``init`` sees concrete arrays outside ``jax.jit``)."""
    value = check_real("inner_momentum", inner_momentum, 0.0, 1.0, high_open=True)
    if value is None:
        raise TypeError(
            "inner_momentum decides the state's layout (a mu buffer when it is not 0), so init "
            f"needs its number: a real number in [0, 1), got {inner_momentum!r}; with "
            "optax.inject_hyperparams call init outside jax.jit"
        )
    return value != 0


def scale_by_second_moment(
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    rectify: bool = False,
    state_dtype: Any = None,
    inner_momentum: float = 0.0,
) -> optax.GradientTransformation:
    r"""Adam's direction without a first moment: ``g / (sqrt(v / (1 - b2^t)) + eps)``.

    Keeps only ``v`` (one buffer per parameter), unlike ``optax.scale_by_adam(b1=0)`` which
    also stores a first moment. With ``inner_momentum`` (upstream schedulefree's main branch,
    ``AdamWScheduleFree(inner_momentum=...)``) the numerator is instead a bias-corrected EMA of
    the gradient, in a second buffer ``mu`` that exists only when ``inner_momentum != 0``:

    .. math::
        v_t = b_2 v_{t-1} + (1 - b_2) g^2, \qquad
        m_t = \beta m_{t-1} + (1 - \beta) g, \qquad
        d_t = \frac{m_t / (1 - \beta^t)}{\sqrt{v_t / (1 - b_2^t)} + \epsilon}

    (:math:`\beta` = ``inner_momentum``; with 0, :math:`d_t = g / (\sqrt{v_t / (1 - b_2^t)} +
    \epsilon)`).

    Args:
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      rectify: RAdam's rule: while the SMA length ``rho_t <= 4`` the direction is ``g`` itself.
      state_dtype: dtype of ``v`` (and ``mu``), a floating dtype; None keeps each parameter's
        dtype.
      inner_momentum: EMA coefficient of the gradient in the numerator, in [0, 1); 0 (default)
        keeps the state to ``count`` and ``nu``
        (:class:`ScaleBySecondMomentState`), otherwise :class:`ScaleByInnerMomentumState`.
        Not with ``rectify``.

    ``b2``, ``eps`` or ``inner_momentum`` traced inside ``jax.jit``
    (``optax.inject_hyperparams``) and out of range make the direction and ``v`` NaN; so does a
    traced ``inner_momentum`` other than 0 for a state built without ``mu``.
    """
    check_b2("b2", b2)
    check_nonnegative("eps", eps)
    check_state_dtype(state_dtype)
    if callable(inner_momentum):
        raise TypeError(f"inner_momentum must be a real number in [0, 1), got {inner_momentum!r}")
    inner_known = check_real("inner_momentum", inner_momentum, 0.0, 1.0, high_open=True)
    if rectify and inner_known not in (None, 0.0):
        raise ValueError(
            f"inner_momentum must be 0 with rectify=True (RAdam), got {inner_momentum!r}"
        )

    def init_fn(params):
        def zeros(p):
            return jnp.zeros(
                jnp.shape(p), jnp.result_type(p) if state_dtype is None else state_dtype
            )

        count = jnp.zeros([], jnp.int32)
        if _inner_momentum_layout(inner_momentum):
            return ScaleByInnerMomentumState(
                count=count, mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
            )
        return ScaleBySecondMomentState(count=count, nu=jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        has_mu = isinstance(state, ScaleByInnerMomentumState)
        step = optax.safe_increment(state.count)
        sdt = compute_dtype(*jax.tree.leaves(state.nu) or [0.0])
        valid = all_valid(
            traced_in_range(b2, 0.0, 1.0, high_open=True),
            traced_in_range(eps),
            # Without mu, only 0 is in range (the state has no buffer for another value).
            traced_in_range(inner_momentum, 0.0, 1.0 if has_mu else 0.0, high_open=has_mu),
        )
        beta = nan_unless(valid, jnp.asarray(b2, sdt))
        correction = 1 - beta ** step.astype(sdt)
        use_adam = radam_rho(step.astype(sdt), beta)[0] > 4 if rectify else True

        def second_moment(v, g):
            cdt = compute_dtype(v, g)
            g = g.astype(cdt)
            return (beta.astype(cdt) * v.astype(cdt) + (1 - beta.astype(cdt)) * g * g).astype(
                v.dtype
            )

        nu = jax.tree.map(second_moment, state.nu, updates)

        def denominator(v, g):
            cdt = compute_dtype(v, g)
            return jnp.sqrt(v.astype(cdt) / correction.astype(cdt)) + jnp.asarray(eps, cdt)

        if not has_mu:

            def direction(g, v):
                g = g.astype(compute_dtype(v, g))
                return jnp.where(use_adam, g / denominator(v, g), g)

            return jax.tree.map(direction, updates, nu), ScaleBySecondMomentState(step, nu)

        im = jnp.asarray(inner_momentum, sdt)
        correction1 = 1 - im ** step.astype(sdt)

        def first_moment(m, g):
            cdt = compute_dtype(m, g)
            imc = im.astype(cdt)
            return (imc * m.astype(cdt) + (1 - imc) * g.astype(cdt)).astype(m.dtype)

        mu = jax.tree.map(first_moment, state.mu, updates)

        def direction_mu(m, v, g):
            cdt = compute_dtype(m, v, g)
            m_hat = m.astype(cdt) / correction1.astype(cdt)
            return m_hat / denominator(v, g)

        return (
            jax.tree.map(direction_mu, mu, nu, updates),
            ScaleByInnerMomentumState(step, mu, nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def radam_rectification(b2: float, silent_sgd_phase: bool = True):
    """The schedule ``k -> rect`` by which RAdam scales the learning rate at 0-based step ``k``.

    ``sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))`` once ``rho_t > 4``;
    before that 0 with ``silent_sgd_phase`` (no step at all), else 1 (an SGD step).
    """

    def schedule(count):
        dtype = compute_dtype(b2)
        rho_t, rho_inf = radam_rho(jnp.asarray(count + 1, dtype), jnp.asarray(b2, dtype))
        safe_rho = jnp.where(rho_t > 4, rho_t, 5.0)
        rect = jnp.sqrt(
            (safe_rho - 4) * (safe_rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe_rho)
        )
        early = jnp.where(jnp.asarray(silent_sgd_phase), 0.0, 1.0).astype(dtype)
        return jnp.where(rho_t > 4, rect, early)

    return schedule


def add_decayed_weights(weight_decay: Any = 0.0, mask: Any = None):
    """``gn + weight_decay * y``, computed in float32 or wider.

    ``optax.add_decayed_weights`` multiplies in the params' dtype: with bf16 params both the
    coefficient (0.01 becomes 0.01001) and the product are rounded to 8 bits, where sf_torch
    (and the reference) decay in the state's float32. ``mask`` as in optax.
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs the current parameters (y)")

        def add(d, y):
            cdt = compute_dtype(d, y)
            return d.astype(cdt) + jnp.asarray(weight_decay, cdt) * y.astype(cdt)

        return jax.tree.map(add, updates, params), state

    decay = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
    return decay if mask is None else optax.masked(decay, mask)


_MASK = (
    "mask must be None, a tree of Python bools shaped like the params (or a prefix of them), "
    "or a function params -> such a tree"
)


def _is_mask_bit(bit: Any) -> bool:
    if isinstance(bit, bool | np.bool_):
        return True
    # A concrete 0-d bool array is accepted, as optax.masked accepts it; a traced one is not.
    return (
        isinstance(bit, np.ndarray | jax.Array)
        and not isinstance(bit, jax.core.Tracer)
        and bit.shape == ()
        and bit.dtype == np.bool_
    )


def _checked_mask_tree(tree: Any) -> Any:
    bits = jax.tree.leaves(tree)
    for bit in bits:
        if not _is_mask_bit(bit):
            raise TypeError(f"{_MASK}; found a leaf {bit!r} ({type(bit).__name__})")
    return tree


def check_mask(mask: Any) -> Any:
    """``mask`` checked (a tree's leaves now, a function's result when it is called), as
    ``optax.masked`` takes it: every leaf of the tree a bool."""
    if mask is None:
        return None
    if callable(mask):
        return lambda params: _checked_mask_tree(mask(params))
    if isinstance(mask, str | bytes):
        raise TypeError(f"{_MASK}, got {mask!r}")
    return _checked_mask_tree(mask)


def _direction_with_decay(direction, weight_decay, mask):
    check_nonnegative("weight_decay", weight_decay)
    return optax.chain(direction, add_decayed_weights(weight_decay, check_mask(mask)))


def _traced_valid(learning_rate=None, b2=None, eps=None, weight_decay=None):
    """The in-range condition of the aliases' hyperparameters that ``schedule_free`` does not
    see itself (they go into its base), for those traced inside ``jax.jit``."""

    def valid():
        return all_valid(
            traced_in_range(learning_rate),
            traced_in_range(b2, 0.0, 1.0, high_open=True),
            traced_in_range(eps),
            traced_in_range(weight_decay),
        )

    return valid


def _schedule_free_with_decay(
    direction, weight_decay, mask, learning_rate, pack_small_leaves, also_valid, **kwargs
):
    """``schedule_free`` around ``direction`` + weight decay, or with ``pack_small_leaves`` > 0
    the same over packed small leaves (:mod:`sf_optax.packing`), where the mask becomes the
    slots' mask. The unpacked optimizer is built here in both cases, so that bad
    hyperparameters raise when the optimizer is made."""
    size = check_pack_size(pack_small_leaves)

    def build(mask):
        return _schedule_free(
            _direction_with_decay(direction, weight_decay, mask),
            learning_rate,
            also_valid=also_valid,
            **kwargs,
        )

    tx = build(mask)
    return tx if size == 0 else packed(build, size, mask)


def adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: Any = None,
    state_dtype: Any = None,
    exact_x: bool = False,
    pack_small_leaves: int | None = None,
    inner_momentum: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Schedule-Free AdamW, as ``schedulefree.AdamWScheduleFree``.

    Weight decay is taken at ``y`` and added to the normalized gradient (decoupled from ``v``).

    Args:
      learning_rate: peak learning rate (scalar or schedule), >= 0.
      b1: interpolation coefficient (the reference's ``betas[0]``), in (0, 1].
      b2: second-moment decay (``betas[1]``), in [0, 1).
      eps: denominator offset, >= 0.
      weight_decay: decoupled weight decay at ``y``, >= 0.
      warmup_steps: linear warmup length.
      r: polynomial weighting power of the average.
      weight_lr_power: power of ``lr_max`` in the averaging weights.
      mask: optax-style mask of the params that get weight decay: a tree of Python bools shaped
        like the params (or a prefix of them), or a function params -> such a tree.
      state_dtype: a floating dtype for ``z`` and ``v`` (e.g. float32 state for bf16 params);
        None keeps each parameter's dtype.
      exact_x: also store ``x``; allows ``b1 = 0``.
      pack_small_leaves: leaves with fewer elements than this share one flat state buffer per
        dtype and are stepped together (:mod:`sf_optax.packing`); None (default) or 0: one
        buffer per parameter.
      inner_momentum: in [0, 1): an EMA of the gradient, bias-corrected by
        ``1 - inner_momentum^(k+1)``, replaces the gradient in the numerator of the direction
        (``AdamWScheduleFree(inner_momentum=...)`` of upstream schedulefree's main branch; 0.9
        is upstream's suggestion when used). The weight decay is added after it, at ``y``. 0
        (default): no EMA and no buffer for it, the state of earlier versions; otherwise a
        third buffer ``mu`` per parameter (:func:`scale_by_second_moment`). Its value must be
        known when ``init`` runs (it decides the state's layout).

    Out-of-range values raise (naming the argument) when the optimizer is made; values known only
    when the step runs (a schedule's, or traced inside ``jax.jit``, e.g. changed in an
    ``optax.inject_hyperparams`` state) make that step's updates and new state NaN instead of
    stepping the wrong way: see :func:`sf_optax.schedule_free`.
    """
    direction = scale_by_second_moment(
        b2, eps, state_dtype=state_dtype, inner_momentum=inner_momentum
    )
    return _schedule_free_with_decay(
        direction,
        weight_decay,
        mask,
        learning_rate,
        pack_small_leaves,
        _traced_valid(b2=b2, eps=eps, weight_decay=weight_decay),
        b1=b1,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        state_dtype=state_dtype,
        exact_x=exact_x,
    )


def sgd(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    *,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: Any = None,
    state_dtype: Any = None,
    exact_x: bool = False,
    pack_small_leaves: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Schedule-Free SGD, as ``schedulefree.SGDScheduleFree`` (``b1`` is its ``momentum``).

    ``gn = g + weight_decay * y``; one buffer (``z``) per parameter. ``mask``, ``state_dtype``,
    ``pack_small_leaves`` as in :func:`adamw`.

    Out-of-range values raise (naming the argument) when the optimizer is made; values known only
    when the step runs (a schedule's, or traced inside ``jax.jit``, e.g. changed in an
    ``optax.inject_hyperparams`` state) make that step's updates and new state NaN instead of
    stepping the wrong way: see :func:`sf_optax.schedule_free`.
    """
    return _schedule_free_with_decay(
        optax.identity(),
        weight_decay,
        mask,
        learning_rate,
        pack_small_leaves,
        _traced_valid(weight_decay=weight_decay),
        b1=b1,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        state_dtype=state_dtype,
        exact_x=exact_x,
    )


def radam(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    silent_sgd_phase: bool = True,
    mask: Any = None,
    state_dtype: Any = None,
    exact_x: bool = False,
    pack_small_leaves: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Schedule-Free RAdam, as ``schedulefree.RAdamScheduleFree``: no warmup is needed.

    The rectification scales the learning rate (and hence the averaging weight); while the
    variance estimate is unreliable (``rho_t <= 4``) the step is skipped (``silent_sgd_phase``)
    or is a plain SGD step. ``mask``, ``state_dtype``, ``pack_small_leaves`` as in
    :func:`adamw`.

    Out-of-range values raise (naming the argument) when the optimizer is made; values known only
    when the step runs (a schedule's, or traced inside ``jax.jit``, e.g. changed in an
    ``optax.inject_hyperparams`` state) make that step's updates and new state NaN instead of
    stepping the wrong way: see :func:`sf_optax.schedule_free`.
    """
    check_b2("b2", b2)
    check_nonnegative("learning_rate", learning_rate)
    rect = radam_rectification(b2, silent_sgd_phase)
    if callable(learning_rate):
        schedule = lambda k: learning_rate(k) * rect(k)  # noqa: E731
    else:
        schedule = lambda k: learning_rate * rect(k)  # noqa: E731
    direction = scale_by_second_moment(b2, eps, rectify=True, state_dtype=state_dtype)
    return _schedule_free_with_decay(
        direction,
        weight_decay,
        mask,
        schedule,
        pack_small_leaves,
        # The schedule is learning_rate * rect, where a negative rate times rect = 0 is -0.0.
        _traced_valid(learning_rate=learning_rate, b2=b2, eps=eps, weight_decay=weight_decay),
        b1=b1,
        r=r,
        weight_lr_power=weight_lr_power,
        state_dtype=state_dtype,
        exact_x=exact_x,
    )
