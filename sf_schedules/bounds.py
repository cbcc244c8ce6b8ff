"""Convex bounds that predict how a learning-rate schedule shapes the loss curve.

Setting: ``f`` convex with minimiser ``x*``, ``D = ||x_1 - x*||``, and (stochastic) subgradients
``g_t`` at the iterates with ``E ||g_t||^2 <= G_t^2``. Learning rates ``eta_1, eta_2, ...`` are
passed 0-based: ``lrs[t - 1] = eta_t`` is the lr of update ``t``. Everything is float64.

- :func:`last_iterate_bound`: SGD's last iterate (Theorem 1 of Schaipp et al. 2025).
- :func:`optimal_base_lr`: the best multiplier of a schedule shape for that bound.
- :func:`schedule_free_bound`: the lr-weighted average of Schedule-Free SGD (Defazio et al.
  2024).

References:
    F. Schaipp, A. Hägele, A. Taylor, U. Simsekli, F. Bach. The surprising agreement between
    convex optimization theory and learning-rate scheduling for large model training. 2025.
    A. Defazio, A. Cutkosky, H. Mehta, K. Mishchenko. Optimal linear decay learning rate
    schedules and further refinements. 2023.
    A. Defazio, X. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky. The road less
    scheduled. 2024.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

# Targets per block of the far-field sweep in last_iterate_bound; sources closer than one block
# are summed exactly. Tests lower it to exercise the far field on short schedules.
_BLOCK = 256
# Step of the trapezoidal rule 1/x = int exp(u - x e^u) du; h = 1/4 gives a relative error
# below 1e-15 (the error decays like exp(-pi^2 / h)).
_QUAD_STEP = 0.25


def _check_lrs(lrs: Any, name: str = "lrs") -> np.ndarray:
    arr = np.asarray(lrs, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of learning rates >= 0, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        bad = arr[~(np.isfinite(arr) & (arr >= 0))][0]
        raise ValueError(f"{name} must be finite and >= 0, got an entry {bad!r}")
    return arr


def _check_D(D: Any) -> float:
    if not (isinstance(D, numbers.Real) and not isinstance(D, bool)) or not (
        math.isfinite(D) and D > 0
    ):
        raise ValueError(f"D (= ||x_1 - x*||) must be a finite number > 0, got {D!r}")
    return float(D)


def _check_G(G: Any, n: int) -> np.ndarray:
    arr = np.asarray(G, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    elif arr.shape != (n,):
        raise ValueError(
            f"G must be a number or a 1-D array of len(lrs) = {n} per-step bounds, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("G must be finite and >= 0 (a bound on the gradient norms)")
    return arr


def _quadrature(x_lo: float, x_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``s`` and weights ``w`` with ``1/x = sum_i w_i exp(-s_i x)`` on ``[x_lo, x_hi]``.

    Trapezoidal rule in ``u = log s`` for ``1/x = int exp(u - x e^u) du``, truncated where the
    neglected tails are below 1e-17 relative: ``x_hi e^u_min = 1e-17`` and
    ``exp(-x_lo e^u_max) < 1e-19``.
    """
    u = np.arange(math.log(1e-17 / x_hi), math.log(45.0 / x_lo) + _QUAD_STEP, _QUAD_STEP)
    s = np.exp(u)
    return s, _QUAD_STEP * s


def _cauchy_sums(lrs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``out[t] = sum_{j <= t - 2} weights[j] / (lrs[j + 1] + ... + lrs[t])`` for every ``t``.

    All terms are >= 0 (distances are positive wherever ``lrs[t] > 0``; entries with
    ``lrs[t] == 0`` are not used by the caller). Sources within one block of the target are
    summed exactly; older ones through the exponential-sum form of 1/x, whose per-node running
    sums ``M_i = sum_j weights[j] exp(-s_i dist(ref, j))`` carry from block to block. Both sums
    have positive terms, so the relative error is that of the quadrature (~1e-15). Distances
    are summed within a block (not as differences of a global cumsum), so they stay accurate
    when the schedule is long and the last lrs are small. Time ``O(n (block + nodes))``,
    memory ``O(n + block * nodes)``.
    """
    n = lrs.size
    out = np.zeros(n)
    block = _BLOCK
    if n <= 2:
        return out
    positive = lrs > 0
    valid = np.zeros(n, dtype=bool)
    valid[1:] = positive[1:]
    # Every far pair (t, j <= t - 2) spans at least lrs[t - 1] + lrs[t] and at most sum(lrs).
    pair = lrs[1:] + lrs[:-1]
    pair = pair[valid[1:]]
    far = n > block and pair.size > 0
    if far:
        s, w = _quadrature(float(pair.min()), float(lrs.sum()))
        m = np.zeros_like(s)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        for a in range(0, n, block):
            b = min(a + block, n)
            # pos[i - (a - 1)] = lrs[a] + .. + lrs[i]: the distance from index a - 1 to index i,
            # for i in a - 1 .. b - 1 (a sum of positives, so accurate to a few ulps).
            pos = np.concatenate(([0.0], np.cumsum(lrs[a:b])))
            targets = np.arange(a, b)
            lo = max(a - 1, 0)
            sources = np.arange(lo, b - 1)
            # dist[r, c] = lrs[j + 1] + .. + lrs[t] for target t = targets[r], source
            # j = sources[c]: summed from the target backwards rather than as a difference of
            # cumsums, which would lose the small distances next to the target.
            ahead = sources[None, :] + 1 <= targets[:, None]
            steps = np.where(ahead, lrs[lo + 1 : b][None, :], 0.0)
            dist = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
            near = np.where(
                sources[None, :] <= targets[:, None] - 2, weights[lo : b - 1][None, :] / dist, 0.0
            )
            out[a:b] = near.sum(axis=1)
            if far:
                if a > 0:
                    decay = np.exp(-np.outer(pos[1:], s))
                    out[a:b] += decay @ (w * m)
                # Move the reference point from index a - 1 to b - 1, adding the sources that
                # become far for the next block: j in lo .. b - 2, at distance
                # lrs[j + 1] + .. + lrs[b - 1] (a suffix sum).
                m = m * np.exp(-s * pos[-1])
                if sources.size:
                    d_new = np.cumsum(lrs[lo + 1 : b][::-1])[::-1]
                    m = m + np.exp(-np.outer(s, d_new)) @ weights[lo : b - 1]
    return out


def last_iterate_bound(lrs: Any, D: float, G: Any) -> np.ndarray:
    r"""Theorem 1 of Schaipp et al. 2025 for every prefix of ``lrs``.

    SGD ``x_{t+1} = x_t - eta_t g_t`` on a convex problem; the bound on ``E f(x_T) - f*`` uses
    ``eta_1 .. eta_T`` (``x_T`` is the iterate after ``T - 1`` updates)::

        b_T = (D^2 + sum_{t=1}^T eta_t^2 G_t^2) / (2 sum_{t=1}^T eta_t)
            + 1/2 sum_{k=1}^{T-1} eta_k / (sum_{t=k+1}^T eta_t)
                  * (sum_{t=k}^T eta_t^2 G_t^2) / (sum_{t=k}^T eta_t)

    For a constant ``eta`` and ``G`` this is ``D^2/(2 T eta) + eta G^2 (1 + H_{T-1}) / 2``.

    All prefixes are evaluated together in ``O(T (block + nodes))`` time and
    ``O(T + block * nodes)`` memory (block 256, nodes ~ 4 log(1e19 * sum(lrs) / min step pair),
    about 250; ~0.5 s for T = 1e5): with ``C_k = eta_1 + .. + eta_k`` and
    ``q_t = eta_t^2 G_t^2``, ``eta_k / ((C_T - C_k)(C_T - C_{k-1}))`` telescopes, and summing
    by parts turns the last term into a sum of non-negative terms::

        1/(2 C_T) [ sum_{j=1}^{T-2} q_j C_j / (C_T - C_j) + (q_{T-1} + q_T) C_{T-1} / eta_T ]

    whose Cauchy sum over ``j`` is evaluated for every ``T`` by a block sweep (exact near the
    target, an exponential-sum expansion of ``1/x`` farther away; relative error ~1e-14).

    Args:
        lrs: the learning rates ``eta_1 .. eta_n`` (1-D, finite, >= 0).
        D: ``||x_1 - x*||`` > 0.
        G: a bound >= 0 on the gradient norms, a number or one per step (``G[t - 1] = G_t``).

    Returns:
        float64 array ``b`` of length ``n`` with ``b[T - 1] = b_T``: the bound on ``f`` at the
        iterate after ``T - 1`` updates. ``b[T - 1]`` is ``inf`` where ``lrs[T - 1] == 0`` (the
        theorem needs ``eta_T > 0``; ``eta_T`` itself never moves ``x_T``, so to bound the
        iterate after a schedule that ends at 0, extend ``lrs`` by one positive entry).
    """
    eta = _check_lrs(lrs)
    D = _check_D(D)
    g = _check_G(G, eta.size)
    first, rest = _bound_terms(eta, g, D)
    return first + rest


def _bound_terms(eta: np.ndarray, g: np.ndarray, D: float) -> tuple[np.ndarray, np.ndarray]:
    """``(D^2 / (2 C_T), rest)``: the part of the bound that scales as 1/gamma and the rest."""
    n = eta.size
    q = (eta * g) ** 2
    cum = np.cumsum(eta)
    cum_q = np.cumsum(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = D**2 / (2.0 * cum)
        rest = cum_q / (2.0 * cum)
        if n >= 2:
            tail = np.zeros(n)
            tail[1:] = (q[:-1] + q[1:]) * cum[:-1] / eta[1:]
            tail += _cauchy_sums(eta, q * cum)
            rest = rest + tail / (2.0 * cum)
    zero = eta == 0
    first = np.where(zero, np.inf, first)
    rest = np.where(zero, np.inf, rest)
    return first, rest


def optimal_base_lr(shape_lrs: Any, D: float, G: Any) -> tuple[float, float]:
    """The multiplier ``gamma`` of ``shape_lrs`` that minimises the last-step bound.

    The bound of :func:`last_iterate_bound` at the last step for ``lrs = gamma * shape_lrs`` is
    ``A / gamma + B gamma`` with ``A = D^2 / (2 sum(shape_lrs))`` and ``B`` the rest of the
    bound at ``gamma = 1``; it is smallest at ``gamma* = sqrt(A / B)``, where it equals
    ``2 sqrt(A B)``.

    Args:
        shape_lrs: the schedule shape (1-D, finite, >= 0, last entry > 0).
        D: ``||x_1 - x*||`` > 0.
        G: gradient-norm bound, a number or one per step, not all 0.

    Returns:
        ``(gamma*, bound at gamma*)`` as Python floats.
    """
    eta = _check_lrs(shape_lrs, "shape_lrs")
    D = _check_D(D)
    g = _check_G(G, eta.size)
    if eta[-1] == 0:
        raise ValueError(
            "shape_lrs must end with a learning rate > 0 (the bound is infinite otherwise)"
        )
    first, rest = _bound_terms(eta, g, D)
    a, b = float(first[-1]), float(rest[-1])
    if b == 0:
        raise ValueError("G must be > 0 at some step with a learning rate > 0 (else gamma* = inf)")
    return math.sqrt(a / b), 2.0 * math.sqrt(a * b)


def schedule_free_bound(lrs: Any, D: float, G: Any) -> np.ndarray:
    r"""Bound on ``f`` at the lr-weighted average of Schedule-Free SGD, for every prefix.

    Schedule-Free SGD with any ``b1`` in ``[0, 1]`` (Defazio et al. 2024), in the indexing of
    their theory: ``z_1 = x_1``, and for ``t = 1, 2, ...``::

        x_t = sum_{s<=t} eta_s z_s / sum_{s<=t} eta_s      (weights proportional to the lrs)
        y_t = (1 - b1) z_t + b1 x_t,   g_t in subgradient of f at y_t
        z_{t+1} = z_t - eta_t g_t

    The online-to-batch conversion of Defazio et al. (their Theorem 2) gives
    ``f(x_t) - f* <= sum_{s<=t} eta_s <g_s, z_s - x*> / sum_{s<=t} eta_s`` for any ``b1``:
    with ``W_s = eta_1 + .. + eta_s``, the subgradient inequality at ``y_s`` leaves the extra
    terms ``W_s B(x_s, y_s) - W_{s-1} B(x_{s-1}, y_s) - eta_s B(x*, y_s)`` (``B`` the Bregman
    gap of ``f`` at ``y_s``, convex and >= 0 in its first argument), which are <= 0 because
    ``x_s`` lies on the segment from ``y_s`` to ``x_{s-1}`` at fraction
    ``(1 - b1) W_{s-1} / (W_s - b1 W_{s-1}) <= W_{s-1} / W_s``. The regret of gradient
    descent on ``z`` bounds the numerator by ``(D^2 + sum_{s<=t} eta_s^2 ||g_s||^2) / 2``::

        b_t = (D^2 + sum_{s<=t} eta_s^2 G_s^2) / (2 sum_{s<=t} eta_s)

    Our optimizers (like ``schedulefree``) leave ``z_1`` out of the average: after ``n``
    updates their ``x`` is the ``w``-weighted mean of ``z_2 .. z_{n+1}``, ``w_s`` the weight of
    update ``s``. With a constant lr ``eta`` (any ``weight_lr_power``, no warmup, ``r = 0``)
    that is the theorem for the run restarted at ``z_2``, whose distance to ``x*`` obeys
    ``||z_2 - x*||^2 <= D^2 + eta^2 G_1^2`` (``g_1`` is taken at ``z_1``), so::

        f(x after n updates) - f* <= (D^2 + eta^2 sum_{t=1}^{n+1} G_t^2) / (2 n eta)
            = schedule_free_bound(lrs[1:], sqrt(D^2 + lrs[0]^2 G_1^2), G[1:])[n - 1]

    which :func:`schedule_free_optimizer_bound` evaluates.

    Args:
        lrs: the z learning rates ``eta_1 .. eta_n`` (1-D, finite, >= 0).
        D: ``||z_1 - x*||`` > 0.
        G: gradient-norm bound at the ``y_t``, a number or one per step.

    Returns:
        float64 array ``b`` with ``b[t - 1] = b_t`` (``inf`` while the lrs sum to 0).
    """
    eta = _check_lrs(lrs)
    D = _check_D(D)
    g = _check_G(G, eta.size)
    cum = np.cumsum(eta)
    with np.errstate(divide="ignore"):
        return (D**2 + np.cumsum((eta * g) ** 2)) / (2.0 * cum)


def schedule_free_optimizer_bound(lr: float, num_updates: int, D: float, G: Any) -> np.ndarray:
    """Bound on ``f(x) - f*`` for ``sf_torch.SGDScheduleFree`` / ``sf_optax.sgd`` at constant lr.

    ``b[n - 1] = (D^2 + lr^2 sum_{t=1}^{n+1} G_t^2) / (2 n lr)`` bounds ``f`` at the optimizer's
    ``x`` after ``n = 1 .. num_updates`` updates (any ``momentum``/``b1``, ``warmup_steps=0``,
    ``r=0``, no weight decay); :func:`schedule_free_bound` states the argument.

    Args:
        lr: the constant learning rate > 0.
        num_updates: how many updates to bound, an int >= 1.
        D: ``||x_1 - x*||`` > 0.
        G: gradient-norm bound at ``y_1 .. y_{num_updates + 1}``, a number or
            ``num_updates + 1`` values.

    Returns:
        float64 array of length ``num_updates``.
    """
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool)) or not (
        math.isfinite(lr) and lr > 0
    ):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(num_updates, numbers.Integral) and not isinstance(num_updates, bool)) or (
        num_updates < 1
    ):
        raise ValueError(f"num_updates must be an int >= 1, got {num_updates!r}")
    D = _check_D(D)
    g = _check_G(G, num_updates + 1)
    eta = np.full(num_updates + 1, float(lr))
    d_restart = math.sqrt(D**2 + (lr * g[0]) ** 2)
    return schedule_free_bound(eta[1:], d_restart, g[1:])
