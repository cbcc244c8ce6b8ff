"""sf_optax against the `schedulefree` 1.4.1 reference classes, in float64.

DESIGN section 3, level "math": max relative parameter difference <= 1e-12 after 200 steps, at y
(the params while training) and at x (the reference after its eval()), over a grid of
hyperparameters. The grid runs through `optax.inject_hyperparams`, so one compiled step serves
every combination (and the injected path is checked too); a few combinations also run with
plain Python hyperparameters and with exact_x.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import schedulefree
from optax_problems import Problem, max_rel_diff, run_reference

import sf_optax

STEPS = 200
TOL = 1e-12


pytestmark = pytest.mark.usefixtures("x64")


def _jitted_apply(tx):
    @jax.jit
    def apply(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return apply


def run_sf_optax(tx, problem, steps=STEPS, apply=None, set_hyperparams=None):
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state = tx.init(params)
    if set_hyperparams is not None:
        state = set_hyperparams(state)
    apply = apply or _jitted_apply(tx)
    for step in range(steps):
        grads = problem.grads(params, step)
        params, state = apply(grads, state, params)
    x = sf_optax.eval_params(state, params)
    as_np = lambda t: {k: np.asarray(v) for k, v in t.items()}  # noqa: E731
    return as_np(params), as_np(x), state


_INJECTED = {}


def injected_run(factory, problem, hyper, steps=STEPS):
    """One compiled update serves every value of the numeric hyperparameters: they live in the
    inject_hyperparams state as traced arrays and are overwritten for each grid point."""
    static = {k: v for k, v in hyper.items() if isinstance(v, bool)}
    key = (factory, tuple(sorted(static.items())))
    if key not in _INJECTED:
        tx = optax.inject_hyperparams(factory)(**hyper)
        _INJECTED[key] = (tx, _jitted_apply(tx))
    tx, apply = _INJECTED[key]

    def set_hyperparams(state):
        for name, value in hyper.items():
            if name not in static:
                old = state.hyperparams[name]
                state.hyperparams[name] = jnp.asarray(value, dtype=old.dtype)
        return state

    return run_sf_optax(tx, problem, steps, apply=apply, set_hyperparams=set_hyperparams)


COMMON = dict(r=(0.0, 1.0), weight_lr_power=(0.0, 2.0), weight_decay=(0.0, 0.1))


def grid(**axes):
    names = list(axes)
    for values in itertools.product(*axes.values()):
        yield dict(zip(names, values))


ADAMW_GRID = list(
    grid(warmup_steps=(0, 10), betas=((0.9, 0.999), (0.5, 0.99)), lr=(0.01, 0.3), **COMMON)
)
SGD_GRID = list(grid(warmup_steps=(0, 10), momentum=(0.9, 0.5), lr=(0.05, 0.5), **COMMON))
RADAM_GRID = list(
    grid(
        silent_sgd_phase=(True, False),
        betas=((0.9, 0.999), (0.5, 0.99)),
        lr=(0.01, 0.3),
        **COMMON,
    )
)


def assert_close(name, ours_y, ours_x, ref_y, ref_x):
    dy, dx = max_rel_diff(ours_y, ref_y), max_rel_diff(ours_x, ref_x)
    assert dy <= TOL and dx <= TOL, f"{name}: rel diff y={dy:.2e} x={dx:.2e} (tol {TOL})"
    return dy, dx


@pytest.mark.parametrize("hp", ADAMW_GRID, ids=str)
def test_adamw_grid(hp):
    problem = Problem(seed=1)
    b1, b2 = hp["betas"]
    ours_y, ours_x, _ = injected_run(
        sf_optax.adamw,
        problem,
        dict(
            learning_rate=hp["lr"],
            b1=b1,
            b2=b2,
            weight_decay=hp["weight_decay"],
            warmup_steps=hp["warmup_steps"],
            r=hp["r"],
            weight_lr_power=hp["weight_lr_power"],
        ),
    )
    ref_y, ref_x = run_reference(
        schedulefree.AdamWScheduleFree,
        problem,
        STEPS,
        lr=hp["lr"],
        betas=hp["betas"],
        weight_decay=hp["weight_decay"],
        warmup_steps=hp["warmup_steps"],
        r=hp["r"],
        weight_lr_power=hp["weight_lr_power"],
    )
    assert max_rel_diff(problem.init, ref_y) > 1e-3
    assert_close("adamw", ours_y, ours_x, ref_y, ref_x)


@pytest.mark.parametrize("hp", SGD_GRID, ids=str)
def test_sgd_grid(hp):
    problem = Problem(seed=2)
    ours_y, ours_x, _ = injected_run(
        sf_optax.sgd,
        problem,
        dict(
            learning_rate=hp["lr"],
            b1=hp["momentum"],
            weight_decay=hp["weight_decay"],
            warmup_steps=hp["warmup_steps"],
            r=hp["r"],
            weight_lr_power=hp["weight_lr_power"],
        ),
    )
    ref_y, ref_x = run_reference(schedulefree.SGDScheduleFree, problem, STEPS, **hp)
    assert max_rel_diff(problem.init, ref_y) > 1e-3
    assert_close("sgd", ours_y, ours_x, ref_y, ref_x)


@pytest.mark.parametrize("hp", RADAM_GRID, ids=str)
def test_radam_grid(hp):
    problem = Problem(seed=3)
    b1, b2 = hp["betas"]
    ours_y, ours_x, _ = injected_run(
        sf_optax.radam,
        problem,
        dict(
            learning_rate=hp["lr"],
            b1=b1,
            b2=b2,
            weight_decay=hp["weight_decay"],
            r=hp["r"],
            weight_lr_power=hp["weight_lr_power"],
            silent_sgd_phase=hp["silent_sgd_phase"],
        ),
    )
    ref_y, ref_x = run_reference(schedulefree.RAdamScheduleFree, problem, STEPS, **hp)
    assert max_rel_diff(problem.init, ref_y) > 1e-3
    assert_close("radam", ours_y, ours_x, ref_y, ref_x)


PLAIN_CASES = [
    (
        "adamw",
        lambda exact: sf_optax.adamw(
            0.05, 0.9, 0.995, 1e-8, 0.05, warmup_steps=20, r=0.5, exact_x=exact
        ),
        schedulefree.AdamWScheduleFree,
        dict(lr=0.05, betas=(0.9, 0.995), weight_decay=0.05, warmup_steps=20, r=0.5),
    ),
    (
        "sgd",
        lambda exact: sf_optax.sgd(0.2, 0.8, 0.01, warmup_steps=5, exact_x=exact),
        schedulefree.SGDScheduleFree,
        dict(lr=0.2, momentum=0.8, weight_decay=0.01, warmup_steps=5),
    ),
    (
        "radam",
        lambda exact: sf_optax.radam(0.05, 0.9, 0.999, weight_decay=0.01, exact_x=exact),
        schedulefree.RAdamScheduleFree,
        dict(lr=0.05, betas=(0.9, 0.999), weight_decay=0.01),
    ),
]


@pytest.mark.parametrize("exact_x", [False, True])
@pytest.mark.parametrize("name,make,ref_cls,ref_kwargs", PLAIN_CASES, ids=lambda c: str(c)[:8])
def test_plain_hyperparameters(name, make, ref_cls, ref_kwargs, exact_x):
    problem = Problem(seed=4)
    ours_y, ours_x, state = run_sf_optax(make(exact_x), problem)
    ref_y, ref_x = run_reference(ref_cls, problem, STEPS, **ref_kwargs)
    assert_close(name, ours_y, ours_x, ref_y, ref_x)
    assert (sf_optax.find_state(state).x is not None) == exact_x
    # the view round trip x -> y reproduces the training params
    back = sf_optax.train_params(state, {k: jnp.asarray(v) for k, v in ours_x.items()})
    assert max_rel_diff({k: np.asarray(v) for k, v in back.items()}, ref_y) <= TOL


def test_scalars_follow_the_formula():
    """k, weight_sum and lr_max against the DESIGN formula evaluated in float64 numpy."""
    lr, warmup, r, power = 0.1, 7, 1.5, 2.0
    problem = Problem(seed=5)
    _, _, state = run_sf_optax(
        sf_optax.adamw(lr, warmup_steps=warmup, r=r, weight_lr_power=power), problem, steps=30
    )
    state = sf_optax.find_state(state)
    k = np.arange(30)
    sched = np.where(k < warmup, (k + 1) / warmup, 1.0)
    lr_max = np.maximum.accumulate(lr * sched)
    weight_sum = np.sum((k + 1.0) ** r * lr_max**power)
    assert int(state.count) == 30
    assert state.weight_sum.dtype == jnp.float64
    np.testing.assert_allclose(float(state.weight_sum), weight_sum, rtol=1e-14)
    np.testing.assert_allclose(float(state.lr_max), lr_max[-1], rtol=1e-15)
