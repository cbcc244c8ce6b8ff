"""sf_schedules bounds against closed forms, hand sums, an O(T^2) loop, and real runs.

- Constant lr: Theorem 1 of Schaipp et al. 2025 reduces to ``D^2/(2 T eta) + eta G^2 (1 +
  H_{T-1}) / 2`` (the third term is ``(eta G^2 / 2) sum_{k=1}^{T-1} 1/(T - k)``).
- T = 1, 2, 3: the theorem's sums written out by hand.
- Random lrs and per-step G: a direct double loop over (T, k) with suffix sums.
- The bounds hold: float64 numpy subgradient runs on convex G-Lipschitz problems (1-D
  ``G|x - x*|``, ``G||x - x*||`` in 5-D, and the stochastic ``mean_i |a_i^T x - b_i|``
  averaged over seeds) under constant / cosine / WSD / sqrt schedules, with
  ``f(iterate after n updates) - f* <= bound[n]`` at every n; the same for Schedule-Free SGD,
  whose numpy iterate is checked against ``sf_torch.SGDScheduleFree`` in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sf_schedules
import sf_schedules.bounds as bounds_module
import sf_torch

# -- independent evaluations of the theorem ------------------------------------------------------


def direct_bound(lrs, D, G):
    """Theorem 1 for every T by a double loop over (T, k), suffix sums accumulated from k = T."""
    lrs = np.asarray(lrs, dtype=np.float64)
    n = lrs.size
    G = np.broadcast_to(np.asarray(G, dtype=np.float64), (n,))
    out = np.empty(n)
    for T in range(1, n + 1):
        q = [(lrs[t] * G[t]) ** 2 for t in range(T)]
        value = (D**2 + math.fsum(q)) / (2 * math.fsum(lrs[:T]))
        s_from_k1, s_from_k, q_from_k, third = lrs[T - 1], lrs[T - 1], q[T - 1], 0.0
        for k in range(T - 1, 0, -1):  # k is 1-based: eta_k = lrs[k - 1]
            s_from_k1 = s_from_k  # sum_{t=k+1}^T eta_t
            s_from_k += lrs[k - 1]  # sum_{t=k}^T eta_t
            q_from_k += q[k - 1]  # sum_{t=k}^T eta_t^2 G_t^2
            third += lrs[k - 1] / s_from_k1 * q_from_k / s_from_k
        out[T - 1] = value + 0.5 * third
    return out


def direct_last(lrs, D, G):
    """Theorem 1 at the last step only, vectorised with suffix sums (O(T))."""
    lrs = np.asarray(lrs, dtype=np.float64)
    q = (lrs * np.broadcast_to(np.asarray(G, dtype=np.float64), lrs.shape)) ** 2
    s_suffix = np.cumsum(lrs[::-1])[::-1]  # s_suffix[k-1] = sum_{t=k}^T eta_t
    q_suffix = np.cumsum(q[::-1])[::-1]
    k = np.arange(lrs.size - 1)  # 0-based k - 1 for k = 1 .. T - 1
    third = np.sum(lrs[k] / s_suffix[k + 1] * q_suffix[k] / s_suffix[k])
    return (D**2 + q_suffix[0]) / (2 * s_suffix[0]) + 0.5 * third


def harmonic(n):
    return math.fsum(1.0 / i for i in range(1, n + 1))


# -- closed forms and hand cases -----------------------------------------------------------------


@pytest.mark.parametrize("eta,D,G", [(0.1, 1.0, 1.0), (0.003, 2.5, 0.7), (1.0, 0.01, 3.0)])
def test_constant_schedule_closed_form(eta, D, G):
    n = 2000
    b = sf_schedules.last_iterate_bound(np.full(n, eta), D, G)
    want = [D**2 / (2 * T * eta) + eta * G**2 / 2 * (1 + harmonic(T - 1)) for T in range(1, n + 1)]
    np.testing.assert_allclose(b, want, rtol=1e-12)


def test_constant_closed_form_at_long_horizon():
    n = 100_000
    b = sf_schedules.last_iterate_bound(np.full(n, 0.01), 1.0, 1.0)
    for T in (1, 2, 300, 4097, 50_000, n):
        want = 1.0 / (2 * T * 0.01) + 0.01 / 2 * (1 + harmonic(T - 1))
        assert b[T - 1] == pytest.approx(want, rel=1e-11)


def test_small_hand_cases():
    # lrs 1, 1/2, 1/4 with D = G = 1: q = 1, 1/4, 1/16
    b = sf_schedules.last_iterate_bound([1.0, 0.5, 0.25], 1.0, 1.0)
    # T = 1: (D^2 + q1) / (2 eta1) = 2 / 2
    # T = 2: (1 + 5/4) / 3 + 1/2 * (eta1/eta2) * (q1 + q2)/(eta1 + eta2) = 3/4 + 5/6
    # T = 3: (1 + 21/16) / (7/2) + 1/2 [ 1/(3/4) * (21/16)/(7/4) + (1/2)/(1/4) * (5/16)/(3/4) ]
    #      = 37/56 + 1/2 [1 + 5/6] = 37/56 + 11/12 = 265/168
    np.testing.assert_allclose(b, [1.0, 3 / 4 + 5 / 6, 265 / 168], rtol=1e-15)

    # per-step G and D = 2: eta = 0.5, 2, 1; G = 1, 0.5, 3 -> q = 1/4, 1, 9
    b = sf_schedules.last_iterate_bound([0.5, 2.0, 1.0], 2.0, [1.0, 0.5, 3.0])
    t1 = (4 + 0.25) / (2 * 0.5)
    t2 = (4 + 1.25) / (2 * 2.5) + 0.5 * (0.5 / 2.0) * (1.25 / 2.5)
    t3 = (4 + 10.25) / (2 * 3.5) + 0.5 * ((0.5 / 3.0) * (10.25 / 3.5) + (2.0 / 1.0) * (10 / 3.0))
    np.testing.assert_allclose(b, [t1, t2, t3], rtol=1e-15)


def test_zero_learning_rate_gives_infinite_bound():
    b = sf_schedules.last_iterate_bound([0.0, 1.0, 0.5, 0.0], 1.0, 1.0)
    assert b[0] == math.inf and b[3] == math.inf
    # eta_1 = 0 adds nothing (its third-term factor eta_1 / .. is 0): T = 2, 3 are the T = 1, 2
    # bounds of lrs (1, 1/2): (1 + 1)/2 and 3/4 + 5/6 (see test_small_hand_cases)
    np.testing.assert_allclose(b[1:3], [1.0, 3 / 4 + 5 / 6], rtol=1e-15)


# -- the O(T) evaluation against the double loop ---------------------------------------------------


@pytest.mark.parametrize("block", [4, 32, None])
@pytest.mark.parametrize("spread", ["uniform", "log-uniform"])
def test_fast_evaluation_matches_double_loop(monkeypatch, block, spread):
    rng = np.random.default_rng(0 if spread == "uniform" else 1)
    n = 600
    if block is not None:  # small blocks run the far-field expansion on a short schedule
        monkeypatch.setattr(bounds_module, "_BLOCK", block)
    if spread == "uniform":
        lrs = rng.uniform(0.01, 1.0, n)
    else:
        lrs = np.exp(rng.uniform(np.log(1e-4), 0.0, n))
    G = rng.uniform(0.0, 3.0, n)
    D = 0.7
    np.testing.assert_allclose(
        sf_schedules.last_iterate_bound(lrs, D, G), direct_bound(lrs, D, G), rtol=1e-12
    )
    # scalar G is the same as a constant per-step G
    np.testing.assert_allclose(
        sf_schedules.last_iterate_bound(lrs, D, 1.5),
        sf_schedules.last_iterate_bound(lrs, D, np.full(n, 1.5)),
        rtol=1e-15,
    )


def test_long_schedules_match_suffix_sums():
    n = 100_000
    cases = [
        sf_schedules.cosine(1.0, n + 1, warmup_steps=1000).values(n),  # decays to ~1e-9
        sf_schedules.wsd(0.5, n, warmup_steps=500, cooldown="1-sqrt", final_lr=1e-6).values(n),
        sf_schedules.sqrt(1.0, warmup_steps=100).values(n),
    ]
    G = np.random.default_rng(2).uniform(0.5, 2.0, n)
    for lrs in cases:
        b = sf_schedules.last_iterate_bound(lrs, 3.0, G)
        for T in (700, 33_333, n):
            assert b[T - 1] == pytest.approx(direct_last(lrs[:T], 3.0, G[:T]), rel=1e-12)


# -- optimal base lr -------------------------------------------------------------------------------


@pytest.mark.parametrize("per_step_G", [False, True])
def test_optimal_base_lr_matches_grid_search(per_step_G):
    shape = sf_schedules.cosine(1.0, 201, warmup_steps=10).values(200)
    G = np.linspace(2.0, 0.5, 200) if per_step_G else 0.5
    D = 2.0
    gamma, best = sf_schedules.optimal_base_lr(shape, D, G)
    grid = np.geomspace(1e-3, 1e2, 20_001)
    values = np.array([direct_last(g * shape, D, G) for g in grid])
    i = int(np.argmin(values))
    assert 0 < i < grid.size - 1
    assert best <= values[i] * (1 + 1e-12)  # nothing on the grid beats it
    assert best >= values[i] * (1 - 1e-6)  # and the grid gets close to it
    assert grid[i - 1] <= gamma <= grid[i + 1]
    assert best == pytest.approx(direct_last(gamma * shape, D, G), rel=1e-12)


# -- the bounds hold on real runs ----------------------------------------------------------------

N = 300
SCHEDULES = {
    "constant": sf_schedules.constant(0.05),
    "constant-warmup": sf_schedules.constant(0.2, warmup_steps=20),
    "cosine": sf_schedules.cosine(0.2, N, warmup_steps=10, final_lr=1e-3),
    "wsd-linear": sf_schedules.wsd(0.2, N, warmup_steps=10, cooldown_fraction=0.3),
    "wsd-1-sqrt": sf_schedules.wsd(0.1, N, cooldown="1-sqrt", final_lr=1e-4),
    "sqrt": sf_schedules.sqrt(0.3, warmup_steps=5),
}


class NormProblem:
    """``f(x) = G ||x - x*||_2`` (``d = 1`` is ``G |x - x*|``); f* = 0, subgradient norm G."""

    def __init__(self, d, G, seed):
        rng = np.random.default_rng(seed)
        self.G, self.x_star = G, rng.standard_normal(d)
        self.x0 = self.x_star + rng.standard_normal(d)

    def f(self, x):
        return self.G * np.linalg.norm(x - self.x_star, axis=-1)

    def grad(self, x, rng=None):
        diff = x - self.x_star
        norm = np.linalg.norm(diff, axis=-1, keepdims=True)
        return self.G * np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)


class AbsRegression:
    """``f(x) = mean_i |a_i^T x - b_i|`` with ``b = A x*`` (f* = 0); one random row per step."""

    def __init__(self, d, m, seed):
        rng = np.random.default_rng(seed)
        A = rng.standard_normal((m, d))
        self.A = A / np.linalg.norm(A, axis=1, keepdims=True) * rng.uniform(0.2, 1.0, (m, 1))
        self.G = float(np.linalg.norm(self.A, axis=1).max())
        self.x_star = rng.standard_normal(d)
        self.b = self.A @ self.x_star
        self.x0 = self.x_star + rng.standard_normal(d)

    def f(self, x):
        return np.abs(x @ self.A.T - self.b).mean(axis=-1)

    def grad(self, x, rng):
        i = rng.integers(0, self.b.size, size=x.shape[:-1])
        rows = self.A[i]
        return np.sign(np.sum(rows * x, axis=-1) - self.b[i])[..., None] * rows


def sgd_run(problem, lrs, seeds=1):
    """f at the iterates after 0 .. N-1 updates (mean over seeds) and the gradient norms."""
    rng = np.random.default_rng(123)
    x = np.tile(problem.x0, (seeds, 1))
    fs, gnorms = [], []
    for lr in lrs:
        fs.append(problem.f(x).mean())
        g = problem.grad(x, rng)
        gnorms.append(np.linalg.norm(g, axis=-1).max())
        x = x - lr * g
    return np.array(fs), np.array(gnorms)


PROBLEMS = {
    "abs-1d": lambda: NormProblem(1, 1.7, seed=0),
    "norm-5d": lambda: NormProblem(5, 0.6, seed=1),
    "abs-regression": lambda: AbsRegression(5, 40, seed=2),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_last_iterate_bound_holds_for_sgd(problem, schedule):
    prob = PROBLEMS[problem]()
    lrs = SCHEDULES[schedule].values(N)
    stochastic = isinstance(prob, AbsRegression)
    fs, gnorms = sgd_run(prob, lrs, seeds=64 if stochastic else 1)
    D = float(np.linalg.norm(prob.x0 - prob.x_star))
    bound = sf_schedules.last_iterate_bound(lrs, D, prob.G)
    assert np.all(fs <= bound), np.max(fs - bound)  # f(after n updates) <= bound[n]
    if not stochastic:  # pathwise, the theorem holds with the observed ||g_t|| as G_t
        assert np.all(fs <= sf_schedules.last_iterate_bound(lrs, D, gnorms))


def test_last_iterate_bound_is_tight_and_indexed_by_t():
    """1-D |x| from D = 0.01 with lr 1: x oscillates and f(x after 1 update) = 0.99 G.

    The bound for the iterate after one update reads eta_1, eta_2: D^2/4 + G^2 (1 + 1)/2 =
    1.000025, nearly attained; the one-lr bound (D^2 + 1)/2 ~ 0.5 does not hold there.
    """
    prob = NormProblem(1, 1.0, seed=0)
    prob.x0 = prob.x_star + 0.01
    fs, _ = sgd_run(prob, np.ones(6))
    b = sf_schedules.last_iterate_bound(np.ones(6), 0.01, 1.0)
    assert fs[1] == pytest.approx(0.99) and b[1] == pytest.approx(1.000025)
    assert np.all(fs <= b)
    assert fs[1] > b[0]


# -- Schedule-Free -------------------------------------------------------------------------------


def sf_theory_run(problem, lrs, b1, seeds=1):
    """Schedule-Free SGD in the indexing of Defazio et al.: x_t averages z_1 .. z_t."""
    rng = np.random.default_rng(7)
    z = np.tile(problem.x0, (seeds, 1))
    x = z.copy()
    weight_sum, fs, gnorms = 0.0, [], []
    for lr in lrs:
        weight_sum += lr
        c = lr / weight_sum
        x = (1 - c) * x + c * z
        fs.append(problem.f(x).mean())
        g = problem.grad((1 - b1) * z + b1 * x, rng)
        gnorms.append(np.linalg.norm(g, axis=-1).max())
        z = z - lr * g
    return np.array(fs), np.array(gnorms)


@pytest.mark.parametrize("b1", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("schedule", ["constant", "constant-warmup", "cosine", "wsd-1-sqrt"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_schedule_free_bound_holds(problem, schedule, b1):
    prob = PROBLEMS[problem]()
    lrs = SCHEDULES[schedule].values(N)
    stochastic = isinstance(prob, AbsRegression)
    fs, gnorms = sf_theory_run(prob, lrs, b1, seeds=64 if stochastic else 1)
    D = float(np.linalg.norm(prob.x0 - prob.x_star))
    assert np.all(fs <= sf_schedules.schedule_free_bound(lrs, D, prob.G))
    if not stochastic:
        assert np.all(fs <= sf_schedules.schedule_free_bound(lrs, D, gnorms))


def test_schedule_free_bound_hand_values():
    b = sf_schedules.schedule_free_bound([1.0, 0.5, 2.0], 1.0, [1.0, 2.0, 0.5])
    # (D^2 + cumsum(eta^2 G^2)) / (2 cumsum(eta)) = (1 + 1) / 2, (2 + 1) / 3, (3 + 1) / 7
    np.testing.assert_allclose(b, [1.0, 1.0, 4 / 7], rtol=1e-15)


def sf_optimizer_run(problem, lr, b1, n):
    """The optimizer's ordering (DESIGN.md 1.1): z steps first, x then takes in the new z."""
    z = problem.x0.copy()
    x = z.copy()
    weight_sum, xs = 0.0, []
    for _ in range(n):
        y = (1 - b1) * z + b1 * x
        z = z - lr * problem.grad(y[None])[0]
        weight_sum += lr
        c = lr / weight_sum
        x = (1 - c) * x + c * z
        xs.append(x)
    return np.array(xs)


@pytest.mark.parametrize("b1", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("d", [1, 5])
def test_schedule_free_optimizer_bound_and_torch_iterates(d, b1):
    prob = NormProblem(d, 0.8, seed=d)
    lr, n = 0.05, 200
    xs = sf_optimizer_run(prob, lr, b1, n)

    p = torch.nn.Parameter(torch.tensor(prob.x0))
    opt = sf_torch.SGDScheduleFree([p], lr=lr, momentum=b1)
    x_star = torch.tensor(prob.x_star)
    xs_torch = []
    for _ in range(n):
        opt.zero_grad()
        (prob.G * torch.linalg.vector_norm(p - x_star)).backward()
        opt.step()
        xs_torch.append(opt.eval_params()[0].numpy())
    np.testing.assert_allclose(np.array(xs_torch), xs, rtol=1e-12, atol=1e-14)

    D = float(np.linalg.norm(prob.x0 - prob.x_star))
    bound = sf_schedules.schedule_free_optimizer_bound(lr, n, D, prob.G)
    assert np.all(prob.f(xs) <= bound)  # bound[n - 1] is for x after n updates
    want = [(D**2 + lr**2 * prob.G**2 * (k + 1)) / (2 * k * lr) for k in range(1, n + 1)]
    np.testing.assert_allclose(bound, want, rtol=1e-14)


def test_optimizer_average_needs_the_shifted_bound():
    """The optimizer's x after one update is z_2 (z_1 gets weight 0): for 1-D |x| from D = 0.01
    and lr 1, f(z_2) = 0.99. The theory-indexed bound (D^2 + 1)/2 ~ 0.5 would not hold; the
    restarted bound (D^2 + 2)/2 does, almost with equality."""
    prob = NormProblem(1, 1.0, seed=0)
    prob.x0 = prob.x_star + 0.01
    xs = sf_optimizer_run(prob, 1.0, 0.9, 4)
    f_first = prob.f(xs[0])
    assert f_first == pytest.approx(0.99)
    assert f_first > sf_schedules.schedule_free_bound(np.ones(4), 0.01, 1.0)[0]
    bound = sf_schedules.schedule_free_optimizer_bound(1.0, 4, 0.01, 1.0)
    assert bound[0] == pytest.approx(1.00005)
    assert np.all(prob.f(xs) <= bound)


# -- validation ------------------------------------------------------------------------------------

BAD = [
    (lambda: sf_schedules.last_iterate_bound([], 1.0, 1.0), r"lrs must be a non-empty 1-D"),
    (lambda: sf_schedules.last_iterate_bound([[0.1]], 1.0, 1.0), r"lrs must be a non-empty 1-D"),
    (lambda: sf_schedules.last_iterate_bound([0.1, -0.1], 1.0, 1.0), r"lrs .*>= 0"),
    (lambda: sf_schedules.last_iterate_bound([0.1, math.nan], 1.0, 1.0), r"lrs .*finite"),
    (lambda: sf_schedules.last_iterate_bound([0.1], 0.0, 1.0), r"D .*> 0"),
    (lambda: sf_schedules.last_iterate_bound([0.1], -1.0, 1.0), r"D .*> 0"),
    (lambda: sf_schedules.last_iterate_bound([0.1], math.inf, 1.0), r"D .*finite"),
    (lambda: sf_schedules.last_iterate_bound([0.1], 1.0, -1.0), r"G .*>= 0"),
    (lambda: sf_schedules.last_iterate_bound([0.1, 0.2], 1.0, [1.0]), r"G must be .*len\(lrs\)"),
    (lambda: sf_schedules.schedule_free_bound([], 1.0, 1.0), r"lrs must be a non-empty"),
    (lambda: sf_schedules.schedule_free_bound([0.1], 0.0, 1.0), r"D .*> 0"),
    (lambda: sf_schedules.schedule_free_bound([0.1], 1.0, [1.0, 2.0]), r"G must be"),
    (lambda: sf_schedules.optimal_base_lr([], 1.0, 1.0), r"shape_lrs must be a non-empty"),
    (lambda: sf_schedules.optimal_base_lr([1.0, -1.0], 1.0, 1.0), r"shape_lrs .*>= 0"),
    (lambda: sf_schedules.optimal_base_lr([1.0, 0.0], 1.0, 1.0), r"shape_lrs must end with"),
    (lambda: sf_schedules.optimal_base_lr([1.0, 1.0], 1.0, 0.0), r"G must be > 0"),
    (lambda: sf_schedules.optimal_base_lr([1.0], 0.0, 1.0), r"D .*> 0"),
    (lambda: sf_schedules.schedule_free_optimizer_bound(0.0, 5, 1.0, 1.0), r"lr .*> 0"),
    (lambda: sf_schedules.schedule_free_optimizer_bound(0.1, 0, 1.0, 1.0), r"num_updates .*>= 1"),
    (lambda: sf_schedules.schedule_free_optimizer_bound(0.1, 3, 1.0, [1.0] * 3), r"G must be"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_named_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
