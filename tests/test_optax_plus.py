"""sf_optax's ScheduleFree+ options (upstream schedulefree main, commit 43e5c2d), in float64.

- ``sf_optax.adamw(inner_momentum=...)`` against upstream's ``AdamWScheduleFree`` (foreach
  and loop paths) and its ``AdamWScheduleFreeReference``;
- ``sf_optax.adamc_plus`` against upstream's ``AdamCScheduleFreePlusPaper`` (``step_func(f)``),

both from ``../shared/reference/schedulefree_main/`` loaded by path (skipped when that folder
is absent), and both against a float64 numpy simulation written here from the formulas with
explicit ``x``, ``y`` and ``z`` (runs always). Level "math" of DESIGN section 3: max relative
difference <= 1e-12 after 200 steps, at ``y`` and at ``x`` (upstream's params after its
``eval()``; ours from ``sf_optax.eval_params``). The adamw grid runs through
``optax.inject_hyperparams`` (one compiled step per state layout).
"""

import importlib.util
import itertools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_problems import Problem, max_rel_diff

import sf_optax

STEPS = 200
TOL = 1e-12
UPSTREAM = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/schedulefree_main"

pytestmark = pytest.mark.usefixtures("x64")


# ---------------------------------------------------------------- the upstream files, by path

_MODULES = {}


def upstream(name):
    """The upstream module ``name`` (a file in UPSTREAM), imported by path; skip when absent."""
    path = UPSTREAM / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"upstream reference not present: {path}")
    if name not in _MODULES:
        torch = pytest.importorskip("torch")
        torch.set_num_threads(1)  # torch beside JAX in one process: one thread, or 10x slower
        spec = importlib.util.spec_from_file_location(f"_upstream_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def loss(problem, params):
    """The problem's deterministic loss (its gradient without the noise), numpy float64."""
    total = 0.0
    for name, t in params.items():
        t = np.asarray(t, dtype=np.float64)
        d = (t - problem.centers[name]).reshape(-1)
        total += 0.5 * d @ problem.mats[name] @ d + 0.1 * np.sum(np.logaddexp(t, -t) - np.log(2))
    return float(total)


def run_upstream(cls, problem, steps, *, with_value=False, **kwargs):
    """(y, x) of an upstream torch class after ``steps`` (``step_func(f)`` with ``with_value``)."""
    import torch

    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in problem.init.items()}
    opt = cls(list(params.values()), **kwargs)
    opt.train()
    for step in range(steps):
        current = {k: p.numpy() for k, p in params.items()}
        grads = problem.grads(current, step)
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        if with_value:
            opt.step_func(loss(problem, current))
        else:
            opt.step()
    y = {k: p.numpy().copy() for k, p in params.items()}
    opt.eval()
    return y, {k: p.numpy().copy() for k, p in params.items()}


def run_ours(tx, problem, steps, *, with_value=False, set_hyperparams=None, apply=None):
    """(y, x, state) of an sf_optax transformation after ``steps``, one jitted update."""
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state = tx.init(params)
    if set_hyperparams is not None:
        state = set_hyperparams(state)
    if apply is None:
        apply = jitted_apply(tx)
    for step in range(steps):
        current = {k: np.asarray(v) for k, v in params.items()}
        value = loss(problem, current) if with_value else None
        params, state = apply(problem.grads(current, step), state, params, value)
    as_np = lambda t: {k: np.asarray(v) for k, v in t.items()}  # noqa: E731
    return as_np(params), as_np(sf_optax.eval_params(state, params)), state


def jitted_apply(tx):
    @jax.jit
    def apply(grads, state, params, value):
        extra = {} if value is None else {"value": value}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return apply


# ---------------------------------------------------------------- the float64 numpy oracles


def numpy_adamw(problem, steps, lr, b1, b2, eps, weight_decay, warmup_steps, r, wlp, inner):
    """Schedule-Free AdamW with inner momentum, x, y, z explicit (the paper's three sequences)."""
    y = {k: v.astype(np.float64).copy() for k, v in problem.init.items()}
    z = {k: v.copy() for k, v in y.items()}
    x = {k: v.copy() for k, v in y.items()}
    v = {k: np.zeros_like(t) for k, t in y.items()}
    m = {k: np.zeros_like(t) for k, t in y.items()}
    lr_max = weight_sum = 0.0
    for k in range(steps):
        g = problem.grads(y, k)
        step_lr = lr * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
        lr_max = max(lr_max, step_lr)
        weight = (k + 1) ** r * lr_max**wlp
        weight_sum += weight
        c = weight / weight_sum if weight_sum > 0 else 0.0
        for n in y:
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            num = g[n]
            if inner != 0:
                m[n] = inner * m[n] + (1 - inner) * g[n]
                num = m[n] / (1 - inner ** (k + 1))
            d = num / (np.sqrt(v[n] / (1 - b2 ** (k + 1))) + eps) + weight_decay * y[n]
            z[n] = z[n] - step_lr * d
            x[n] = (1 - c) * x[n] + c * z[n]
            y[n] = b1 * x[n] + (1 - b1) * z[n]
    return y, x


def numpy_adamc_plus(
    problem,
    steps,
    learning_rate=1.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.0,
    sf_b1=0.9,
    sf_b1_max=0.965,
    sf_b1_anneal_steps=0,
    polyak_b=0.0,
    c_warmup=0,
    r=0.0,
    weight_lr_power=2.0,
):
    """AdamC + Schedule-Free + Polyak from the formulas in sf_optax.plus's docstring."""
    y = {k: v.astype(np.float64).copy() for k, v in problem.init.items()}
    z = {k: t.copy() for k, t in y.items()}
    x = {k: t.copy() for k, t in y.items()}
    m = {k: np.zeros_like(t) for k, t in y.items()}
    v = {k: np.zeros_like(t) for k, t in y.items()}
    ema, lr_max, weight_sum = 0.0, eps, 0.0
    for k in range(steps):
        g = problem.grads(y, k)
        f = loss(problem, y)
        if sf_b1_anneal_steps > 0:
            p = min(k / sf_b1_anneal_steps, 1.0)
            beta = 1 - (1 - sf_b1) ** (1 - p) * (1 - sf_b1_max) ** p
        else:
            beta = sf_b1
        l1 = sum(np.abs(g[n]).sum() for n in y)
        gap = beta * sum((g[n] * (z[n] - x[n])).sum() for n in y)
        ema = polyak_b * ema + (1 - polyak_b) * math.sqrt(math.pi / 2) * l1
        ema = ema / (1 - polyak_b ** (k + 1))
        eta = max(learning_rate, eps) * max(0.0, f + gap) / ema
        lr_max = max(lr_max, eta)
        if k < c_warmup:
            c = 1.0
        else:
            weight = (k + 1) ** r * lr_max**weight_lr_power
            weight_sum += weight
            c = weight / weight_sum
        for n in y:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            adam = (m[n] / (1 - b1 ** (k + 1))) / (np.sqrt(v[n] / (1 - b2 ** (k + 1))) + eps)
            z[n] = z[n] - eta**2 * weight_decay * y[n] - eta * adam
            x[n] = (1 - c) * x[n] + c * z[n]
            y[n] = beta * x[n] + (1 - beta) * z[n]
    return y, x


def assert_close(name, ours, ref, tol=TOL):
    (oy, ox), (ry, rx) = ours, ref
    dy, dx = max_rel_diff(oy, ry), max_rel_diff(ox, rx)
    assert dy <= tol and dx <= tol, f"{name}: rel diff y={dy:.2e} x={dx:.2e} (tol {tol})"
    return dy, dx


# ---------------------------------------------------------------- inner_momentum in adamw

ADAMW_GRID = [
    dict(inner_momentum=im, warmup_steps=w, weight_decay=wd, r=r)
    for im, w, wd, r in itertools.product((0.0, 0.5, 0.9), (0, 10), (0.0, 0.1), (0.0, 1.0))
]
ADAMW_FIXED = dict(lr=0.05, b1=0.9, b2=0.99, eps=1e-8, wlp=2.0)

_INJECTED = {}


def injected_adamw(has_mu):
    """One jitted inject_hyperparams AdamW per state layout (with or without ``mu``): built with
    inner_momentum 0 or 0.5, every grid value is then written into the state."""
    if has_mu not in _INJECTED:
        tx = optax.inject_hyperparams(sf_optax.adamw)(
            learning_rate=0.1,
            b1=0.9,
            b2=0.999,
            weight_decay=0.0,
            warmup_steps=0,
            r=0.0,
            inner_momentum=0.5 if has_mu else 0.0,
        )
        _INJECTED[has_mu] = (tx, jitted_apply(tx))
    return _INJECTED[has_mu]


def setter(**values):
    def set_hyperparams(state):
        for name, value in values.items():
            old = state.hyperparams[name]
            state.hyperparams[name] = jnp.asarray(value, dtype=old.dtype)
        return state

    return set_hyperparams


@pytest.mark.parametrize("hp", ADAMW_GRID, ids=str)
def test_adamw_inner_momentum_grid(hp):
    problem = Problem(seed=11)
    fx = ADAMW_FIXED
    im = hp["inner_momentum"]
    tx, apply = injected_adamw(im != 0)
    ours_y, ours_x, state = run_ours(
        tx,
        problem,
        STEPS,
        apply=apply,
        set_hyperparams=setter(
            learning_rate=fx["lr"],
            b1=fx["b1"],
            b2=fx["b2"],
            weight_decay=hp["weight_decay"],
            warmup_steps=hp["warmup_steps"],
            r=hp["r"],
            inner_momentum=im,
        ),
    )
    inner_state = state.inner_state.base_state[0]
    assert isinstance(
        inner_state, sf_optax.ScaleByInnerMomentumState if im else sf_optax.ScaleBySecondMomentState
    )
    args = (fx["lr"], fx["b1"], fx["b2"], fx["eps"], hp["weight_decay"], hp["warmup_steps"])
    oracle = numpy_adamw(problem, STEPS, *args, hp["r"], fx["wlp"], im)
    assert max_rel_diff(problem.init, oracle[0]) > 1e-2  # the params moved
    assert_close("adamw vs numpy", (ours_y, ours_x), oracle)
    if im:  # the momentum makes a difference the comparison can see
        plain = numpy_adamw(problem, STEPS, *args, hp["r"], fx["wlp"], 0.0)
        assert max_rel_diff(oracle[0], plain[0]) > 1e-3

    mod = upstream("adamw_schedulefree")
    kw = dict(
        lr=fx["lr"],
        betas=(fx["b1"], fx["b2"]),
        weight_decay=hp["weight_decay"],
        warmup_steps=hp["warmup_steps"],
        r=hp["r"],
        inner_momentum=im,
    )
    for foreach in (True, False):
        ref = run_upstream(mod.AdamWScheduleFree, problem, STEPS, foreach=foreach, **kw)
        assert_close(f"adamw vs upstream (foreach={foreach})", (ours_y, ours_x), ref)


def test_adamw_inner_momentum_plain_and_exact_x_vs_upstream_reference():
    """Python hyperparameters (no inject_hyperparams), exact_x, against upstream's
    AdamWScheduleFreeReference (x, y, z stored; weight decay applied to z at y)."""
    problem = Problem(seed=12)
    kw = dict(lr=0.03, betas=(0.8, 0.995), weight_decay=0.05, warmup_steps=7, r=0.5)
    for exact in (False, True):
        tx = sf_optax.adamw(
            0.03, 0.8, 0.995, 1e-8, 0.05, warmup_steps=7, r=0.5, inner_momentum=0.9, exact_x=exact
        )
        ours_y, ours_x, _ = run_ours(tx, problem, STEPS)
        oracle = numpy_adamw(problem, STEPS, 0.03, 0.8, 0.995, 1e-8, 0.05, 7, 0.5, 2.0, 0.9)
        assert_close("adamw plain vs numpy", (ours_y, ours_x), oracle)
    mod = upstream("adamw_schedulefree_reference")
    ref = run_upstream(mod.AdamWScheduleFreeReference, problem, STEPS, inner_momentum=0.9, **kw)
    assert_close("adamw vs upstream reference", (ours_y, ours_x), ref)


def _params():
    return {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "s": jnp.asarray(0.5)}


def test_inner_momentum_zero_keeps_the_state_layout():
    """inner_momentum=0 gives exactly the state of before (count and nu, no mu); a non-zero value
    adds one params-shaped mu and nothing else."""
    params = _params()
    old = sf_optax.adamw(0.01).init(params)  # the default: no inner momentum
    zero = sf_optax.adamw(0.01, inner_momentum=0.0).init(params)
    expected = sf_optax.ScheduleFreeState(
        count=0,
        weight_sum=0,
        lr_max=0,
        b1=0,
        z=params,
        x=None,
        base_state=(sf_optax.ScaleBySecondMomentState(0, params), optax.EmptyState()),
    )
    assert jax.tree.structure(old) == jax.tree.structure(expected)
    assert jax.tree.structure(zero) == jax.tree.structure(expected)
    assert len(jax.tree.leaves(zero)) == 4 + 3 + 1 + 3
    with_mu = sf_optax.adamw(0.01, inner_momentum=0.9).init(params)
    mu_state = with_mu.base_state[0]
    assert type(mu_state).__name__ == "ScaleByInnerMomentumState"
    assert mu_state._fields == ("count", "mu", "nu")
    assert len(jax.tree.leaves(with_mu)) == 4 + 3 + 1 + 3 + 3
    # The other aliases and the packed layout are untouched as well.
    packed = sf_optax.adamw(0.01, inner_momentum=0.9, pack_small_leaves=10).init(params)
    assert "ScaleByInnerMomentumState" in repr(jax.tree.structure(packed))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 2])
def test_inner_momentum_out_of_range(bad):
    with pytest.raises(ValueError, match=r"inner_momentum must be in \[0, 1\)"):
        sf_optax.adamw(0.01, inner_momentum=bad)


@pytest.mark.parametrize("bad", ["0.9", True, (0.9,), lambda k: 0.9])
def test_inner_momentum_not_a_number(bad):
    with pytest.raises(TypeError, match=r"inner_momentum must be a real number in \[0, 1\)"):
        sf_optax.adamw(0.01, inner_momentum=bad)


def test_inner_momentum_not_with_rectify():
    with pytest.raises(ValueError, match="inner_momentum must be 0 with rectify"):
        sf_optax.scale_by_second_moment(rectify=True, inner_momentum=0.9)


def test_inner_momentum_traced_out_of_range_is_nan():
    """A traced inner_momentum out of range, or non-zero for a state built without mu, makes
    the step NaN (never a step the wrong way); 0 in a state with mu is a plain AdamW step."""
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    for built, traced, finite in ((0.5, 1.5, False), (0.0, 0.5, False), (0.5, 0.0, True)):
        tx = optax.inject_hyperparams(sf_optax.adamw)(learning_rate=0.1, inner_momentum=built)
        state = tx.init(params)
        state.hyperparams["inner_momentum"] = jnp.asarray(traced)
        updates, _ = jax.jit(tx.update)(grads, state, params)
        leaves = jnp.concatenate([u.ravel() for u in jax.tree.leaves(updates)])
        assert bool(jnp.all(jnp.isfinite(leaves))) == finite, (built, traced)
        if finite:  # the first step of AdamW without momentum: -lr * sign(g) (bias-corrected)
            np.testing.assert_allclose(leaves, -0.1 * 0.3 / (0.3 + 1e-8), rtol=1e-12)


def test_inner_momentum_direction_in_schedule_free():
    """The direction with mu passes schedule_free's momentum check (upstream's AdamW has it on
    top of b1), while optax's own Adam first moment is still refused."""
    params = _params()
    tx = sf_optax.schedule_free(
        sf_optax.scale_by_second_moment(0.999, inner_momentum=0.9), learning_rate=0.1
    )
    tx.init(params)
    with pytest.raises(ValueError, match="momentum-free"):
        sf_optax.schedule_free(optax.scale_by_adam(), learning_rate=0.1).init(params)


# ---------------------------------------------------------------- adamc_plus

PLUS_CONFIGS = [
    dict(learning_rate=0.2),
    dict(
        learning_rate=0.3,
        weight_decay=5.0,
        polyak_b=0.9,
        c_warmup=10,
        sf_b1_anneal_steps=100,
        r=1.0,
    ),
    dict(
        learning_rate=0.5,
        b1=0.8,
        b2=0.99,
        weight_decay=2.0,
        sf_b1=0.8,
        sf_b1_max=0.97,
        sf_b1_anneal_steps=50,
        polyak_b=0.5,
        weight_lr_power=1.0,
    ),
]
_RENAME = {
    "learning_rate": "lr",
    "sf_b1": "sf_beta1",
    "sf_b1_max": "sf_beta1_max",
    "sf_b1_anneal_steps": "sf_beta1_anneal_steps",
    "polyak_b": "polyak_beta",
}


def upstream_kwargs(config):
    kw = {_RENAME.get(k, k): v for k, v in config.items() if k not in ("b1", "b2")}
    kw["betas"] = (config.get("b1", 0.9), config.get("b2", 0.95))
    return kw


@pytest.mark.parametrize("exact_x", [True, False])
@pytest.mark.parametrize("config", PLUS_CONFIGS, ids=str)
def test_adamc_plus(config, exact_x):
    problem = Problem(seed=13)
    ours_y, ours_x, state = run_ours(
        sf_optax.adamc_plus(**config, exact_x=exact_x), problem, STEPS, with_value=True
    )
    assert (state.x is not None) == exact_x
    oracle = numpy_adamc_plus(problem, STEPS, **config)
    assert max_rel_diff(problem.init, oracle[0]) > 1e-2
    assert max_rel_diff(oracle[1], oracle[0]) > 1e-3  # x and y apart: both are checked
    assert_close("adamc_plus vs numpy", (ours_y, ours_x), oracle)
    # train_params maps upstream's x back to its y with the last step's (annealed) b1.
    back = sf_optax.train_params(state, {k: jnp.asarray(v) for k, v in oracle[1].items()})
    assert max_rel_diff({k: np.asarray(v) for k, v in back.items()}, oracle[0]) <= TOL

    mod = upstream("adamc_schedulefree_plus_paper")
    ref = run_upstream(
        mod.AdamCScheduleFreePlusPaper, problem, STEPS, with_value=True, **upstream_kwargs(config)
    )
    assert_close("adamc_plus vs upstream", (ours_y, ours_x), ref)


def test_adamc_plus_composes():
    """The value reaches adamc_plus through optax.chain and optax.inject_hyperparams (with a
    traced learning rate and annealing length) and gives the same numbers."""
    problem = Problem(seed=14)
    config = dict(learning_rate=0.3, weight_decay=5.0, polyak_b=0.9, sf_b1_anneal_steps=100)
    oracle = numpy_adamc_plus(problem, 60, **config)
    chained = optax.chain(optax.identity(), sf_optax.adamc_plus(**config))
    assert_close("chain", run_ours(chained, problem, 60, with_value=True)[:2], oracle)
    injected = optax.inject_hyperparams(sf_optax.adamc_plus)(
        learning_rate=0.1, weight_decay=0.0, polyak_b=0.9, sf_b1_anneal_steps=10
    )
    ours = run_ours(
        injected,
        problem,
        60,
        with_value=True,
        set_hyperparams=setter(learning_rate=0.3, weight_decay=5.0, sf_b1_anneal_steps=100),
    )
    assert_close("inject_hyperparams", ours[:2], oracle)
    # A traced value out of range makes the step NaN.
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state = injected.init(params)
    state.hyperparams["polyak_b"] = jnp.asarray(1.0)
    grads = problem.grads(problem.init, 0)
    updates, _ = jax.jit(injected.update)(grads, state, params, value=1.0)
    assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates))


def test_adamc_plus_mask():
    """A mask leaves some params without weight decay (torch: a param group with
    weight_decay=0): against the numpy oracle run on the decayed and undecayed parts."""
    problem = Problem(seed=15)
    mask = {"w": True, "b": False, "s": False}
    tx = sf_optax.adamc_plus(0.3, weight_decay=10.0, mask=mask)
    ours_y, _, _ = run_ours(tx, problem, 40, with_value=True)
    unmasked_y, _, _ = run_ours(
        sf_optax.adamc_plus(0.3, weight_decay=10.0), problem, 40, with_value=True
    )
    # The Polyak step couples the leaves, so only the step-0 update is leaf-separable: check
    # the first step by hand, then that the mask changed the run.
    y0 = {k: jnp.asarray(v) for k, v in problem.init.items()}
    one_masked = run_ours(tx, problem, 1, with_value=True)[0]
    g0 = problem.grads(problem.init, 0)
    f0 = loss(problem, problem.init)
    l1 = sum(np.abs(g).sum() for g in g0.values()) * math.sqrt(math.pi / 2)
    eta = 0.3 * f0 / l1
    for k in g0:
        adam = g0[k] / (np.abs(g0[k]) + 1e-8)
        decay = 10.0 if mask[k] else 0.0
        z1 = np.asarray(y0[k]) - eta**2 * decay * np.asarray(y0[k]) - eta * adam
        np.testing.assert_allclose(one_masked[k], z1, rtol=1e-13, atol=1e-15)  # c = 1: y = z
    assert max_rel_diff(ours_y, unmasked_y) > 1e-4


def _mesh(n):
    devices = jax.devices()
    if len(devices) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    return jax.sharding.Mesh(np.array(devices[:n]), ("d",))


def _sharded_problem():
    rng = np.random.default_rng(16)
    target, w0 = rng.normal(size=8), rng.normal(size=8)

    def f(w):
        return 0.5 * jnp.sum((w - target) ** 2) + 0.1 * jnp.sum(jnp.log(jnp.cosh(w)))

    return f, w0


def _run(tx, f, w, steps=30, shard=None):
    """``steps`` updates in one lax.scan; ``shard``: under shard_map, the device's slice of the
    full gradient (the loss is the global one, the same on every device)."""

    def body(carry, _):
        w, state = carry
        full = w if shard is None else jax.lax.all_gather(w, shard, tiled=True)
        value, g = jax.value_and_grad(f)(full)
        if shard is not None:
            g = g.reshape(2, -1)[jax.lax.axis_index(shard)]
        u, state = tx.update(g, state, w, value=value)
        return (optax.apply_updates(w, u), state), None

    if steps == 1:  # no scan: the state's scalars may vary over the axis after the step
        (w, state), _ = body((w, tx.init(w)), None)
    else:
        (w, state), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
    return w, sf_optax.eval_params(state, w)


def test_adamc_plus_under_shard_map_with_axis_name():
    """Under shard_map each device holds half the parameter: with axis_name its L1 norm and
    inner product are summed over the axis, giving the single-device run."""
    from jax.sharding import PartitionSpec as P

    mesh = _mesh(2)
    f, w0 = _sharded_problem()
    config = dict(learning_rate=0.5, sf_b1_anneal_steps=20, polyak_b=0.5, weight_decay=2.0)
    ref_y, ref_x = jax.jit(lambda w: _run(sf_optax.adamc_plus(**config), f, w))(jnp.asarray(w0))
    assert float(jnp.max(jnp.abs(ref_y - jnp.asarray(w0)))) > 1e-2

    def sharded(tx):
        run = jax.shard_map(
            lambda w: _run(tx, f, w, shard="d"), mesh=mesh, in_specs=P("d"), out_specs=P("d")
        )
        return jax.jit(run)(jnp.asarray(w0))

    y, x = sharded(sf_optax.adamc_plus(**config, axis_name="d"))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref_x), rtol=1e-13, atol=1e-14)
    # Without axis_name each shard sees only its own half: another step from the first one on.
    y_one, _ = jax.jit(lambda w: _run(sf_optax.adamc_plus(**config), f, w, steps=1))(w0)
    one = jax.shard_map(
        lambda w: _run(sf_optax.adamc_plus(**config), f, w, steps=1, shard="d"),
        mesh=mesh,
        in_specs=P("d"),
        out_specs=P("d"),
    )
    y_local, _ = jax.jit(one)(jnp.asarray(w0))
    assert float(jnp.max(jnp.abs(y_local - y_one))) > 1e-6


def test_adamc_plus_jit_over_sharded_arrays():
    """Under jax.jit with a sharded parameter no axis_name is needed: the sums are global."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _mesh(2)
    f, w0 = _sharded_problem()
    tx = sf_optax.adamc_plus(0.5, sf_b1_anneal_steps=20, weight_decay=2.0)

    @jax.jit
    def step(w, state):
        value, g = jax.value_and_grad(f)(w)
        u, state = tx.update(g, state, w, value=value)
        return optax.apply_updates(w, u), state

    results = []
    for w in (jnp.asarray(w0), jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P("d")))):
        state = tx.init(w)
        for _ in range(30):
            w, state = step(w, state)
        results.append(np.asarray(w))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
        (dict(b2=-0.1), ValueError, r"b2 must be in \[0, 1\)"),
        (dict(sf_b1=1.0, sf_b1_anneal_steps=10), ValueError, r"sf_b1 must be in \[0, 1\)"),
        (dict(sf_b1=0.0, exact_x=False), ValueError, r"sf_b1 must be in \(0, 1\]"),
        (dict(sf_b1_max=1.0), ValueError, r"sf_b1_max must be in \[0, 1\)"),
        (dict(polyak_b=1.0), ValueError, r"polyak_b must be in \[0, 1\)"),
        (dict(c_warmup=-1), ValueError, r"c_warmup must be in \{0, 1, 2, \.\.\.\}"),
        (dict(sf_b1_anneal_steps=2.5), ValueError, "sf_b1_anneal_steps must be in"),
        (dict(weight_decay=-1.0), ValueError, r"weight_decay must be in \[0, inf\)"),
        (dict(learning_rate=-1.0), ValueError, r"learning_rate must be in \[0, inf\)"),
        (dict(exact_x=1), TypeError, "exact_x must be a Python bool"),
        (dict(axis_name=3), TypeError, "axis_name must be None"),
        (dict(mask="w"), TypeError, "mask must be None"),
    ],
)
def test_adamc_plus_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf_optax.adamc_plus(**kwargs)


def test_adamc_plus_needs_params_and_a_scalar_value():
    params = _params()
    tx = sf_optax.adamc_plus()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"value=loss"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="current parameters"):
        tx.update(params, state, value=1.0)
    with pytest.raises(ValueError, match="value must be the scalar loss"):
        tx.update(params, state, params, value=jnp.ones(3))
