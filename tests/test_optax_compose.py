"""sf_optax inside optax combinators and Flax containers, against the reference classes.

Every case runs the same seeded float64 problem through sf_optax wrapped in a combinator and
through `schedulefree.AdamWScheduleFree` driven by hand the way the combinator should behave
(clipped gradients, a changed learning rate, accumulated gradients, a skipped step), and
compares y and x (found by eval_params through the nesting) to 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import schedulefree
import torch
from flax import nnx
from flax.training import train_state
from optax_problems import Problem, max_rel_diff

import sf_optax

TOL = 1e-12
HP = dict(lr=0.05, betas=(0.9, 0.995), weight_decay=0.01, warmup_steps=5)


pytestmark = pytest.mark.usefixtures("x64")


def sf_adamw(**overrides):
    kw = dict(
        learning_rate=HP["lr"],
        b1=HP["betas"][0],
        b2=HP["betas"][1],
        weight_decay=HP["weight_decay"],
        warmup_steps=HP["warmup_steps"],
    )
    kw.update(overrides)
    return sf_optax.adamw(**kw)


class Reference:
    """The reference optimizer on the problem, stepped with gradients we choose."""

    def __init__(self, problem, **overrides):
        self.params = {k: torch.tensor(v) for k, v in problem.init.items()}
        self.opt = schedulefree.AdamWScheduleFree(list(self.params.values()), **{**HP, **overrides})
        self.opt.train()

    def numpy(self):
        return {k: p.numpy().copy() for k, p in self.params.items()}

    def step(self, grads):
        for k, p in self.params.items():
            p.grad = torch.tensor(grads[k])
        self.opt.step()

    def x(self):
        self.opt.eval()
        x = self.numpy()
        self.opt.train()
        return x


def to_np(tree):
    return {k: np.asarray(v) for k, v in tree.items()}


def jitted(tx):
    @jax.jit
    def apply(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return apply


def check(params, state, ref):
    y_diff = max_rel_diff(to_np(params), ref.numpy())
    x_diff = max_rel_diff(to_np(sf_optax.eval_params(state, params)), ref.x())
    assert y_diff <= TOL and x_diff <= TOL, (y_diff, x_diff)


def test_chain_with_clipping():
    problem, max_norm = Problem(seed=21, noise=1.0), 0.5
    tx = optax.chain(optax.clip_by_global_norm(max_norm), sf_adamw())
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state, apply, ref = tx.init(params), jitted(tx), Reference(problem)
    clipped = 0
    for step in range(150):
        grads = problem.grads(params, step)
        params, state = apply(grads, state, params)
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
        scale = min(1.0, max_norm / norm)
        clipped += scale < 1
        ref.step({k: g * scale for k, g in grads.items()})
    assert clipped > 10
    check(params, state, ref)


def test_inject_hyperparams_changes_lr_and_b1_mid_run():
    problem = Problem(seed=22)
    tx = optax.inject_hyperparams(sf_optax.adamw)(
        learning_rate=HP["lr"], b1=0.9, b2=0.995, weight_decay=0.01, warmup_steps=5
    )
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state, apply, ref = tx.init(params), jitted(tx), Reference(problem)
    for step in range(120):
        if step == 60:
            state.hyperparams["learning_rate"] = jnp.asarray(0.02, jnp.float64)
            state.hyperparams["b1"] = jnp.asarray(0.8, jnp.float64)
            ref.opt.param_groups[0]["lr"] = 0.02
            ref.opt.param_groups[0]["betas"] = (0.8, 0.995)
        grads = problem.grads(params, step)
        params, state = apply(grads, state, params)
        ref.step(grads)
    check(params, state, ref)


def test_multisteps_one_schedule_free_step_per_applied_update():
    problem, every = Problem(seed=23), 3
    tx = optax.MultiSteps(sf_adamw(), every_k_schedule=every, accumulator_dtype=jnp.float64)
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state, apply, ref = tx.init(params), jitted(tx), Reference(problem)
    acc = {k: np.zeros_like(v) for k, v in problem.init.items()}
    for step in range(every * 40):
        grads = problem.grads(params, step)
        params, state = apply(grads, state, params)
        n = step % every  # MultiSteps keeps a running mean (Welford)
        acc = {k: acc[k] + (grads[k] - acc[k]) / (n + 1) for k in grads}
        if n == every - 1:
            ref.step(acc)
            acc = {k: np.zeros_like(v) for k, v in acc.items()}
    assert int(sf_optax.find_state(state).count) == 40
    check(params, state, ref)


def test_apply_if_finite_skipped_step_changes_nothing():
    problem = Problem(seed=24)
    tx = optax.apply_if_finite(sf_adamw(), max_consecutive_errors=5)
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state, apply, ref = tx.init(params), jitted(tx), Reference(problem)
    for step in range(60):
        grads = problem.grads(params, step)
        if step in (10, 11, 40):
            bad = dict(grads)
            bad["w"] = np.where(np.arange(bad["w"].size).reshape(bad["w"].shape) == 3, np.nan, 1.0)
            before = (params, sf_optax.find_state(state))
            params, state = apply(bad, state, params)
            after = sf_optax.find_state(state)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((params, after))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            continue
        params, state = apply(grads, state, params)
        ref.step(grads)
    assert int(state.total_notfinite) == 3
    check(params, state, ref)


def test_views_found_through_deep_nesting():
    problem = Problem(seed=25)
    inner = optax.inject_hyperparams(sf_optax.adamw)(learning_rate=0.05, b1=0.9, b2=0.995)
    tx = optax.MultiSteps(
        optax.apply_if_finite(optax.chain(optax.identity(), inner), 3), every_k_schedule=1
    )
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state, apply = tx.init(params), jitted(tx)
    ref = Reference(problem, warmup_steps=0, weight_decay=0.0)
    for step in range(50):
        grads = problem.grads(params, step)
        params, state = apply(grads, state, params)
        ref.step(grads)
    check(params, state, ref)
    y = sf_optax.train_params(state, sf_optax.eval_params(state, params))
    assert max_rel_diff(to_np(y), ref.numpy()) <= TOL


def test_find_state_errors_are_clear():
    with pytest.raises(ValueError, match="exactly one sf_optax ScheduleFreeState"):
        sf_optax.eval_params(optax.adam(1e-3).init({"a": jnp.ones(2)}), {"a": jnp.ones(2)})
    two = (sf_adamw().init({"a": jnp.ones(2)}), sf_adamw().init({"a": jnp.ones(2)}))
    with pytest.raises(ValueError, match="found 2"):
        sf_optax.find_state(two)
    state = sf_adamw().init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="params have 2 arrays"):
        sf_optax.eval_params(state, {"a": jnp.ones(2), "b": jnp.ones(2)})


class Holder(nnx.Module):
    """An nnx module whose parameters are the test problem's tensors."""

    def __init__(self, init):
        for name, value in init.items():
            setattr(self, name, nnx.Param(jnp.asarray(value)))


def test_flax_nnx_optimizer():
    problem = Problem(seed=26)
    model = Holder(problem.init)
    optimizer = nnx.Optimizer(model, sf_adamw(), wrt=nnx.Param)
    ref = Reference(problem)

    @nnx.jit
    def step(model, optimizer, grads):
        optimizer.update(model, grads)

    for k in range(80):
        params = nnx.state(model, nnx.Param)
        grads_np = problem.grads({n: getattr(model, n)[...] for n in problem.init}, k)
        paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        grads = treedef.unflatten([jnp.asarray(grads_np[path[0].key]) for path, _ in paths])
        step(model, optimizer, grads)
        ref.step(grads_np)
    params = nnx.state(model, nnx.Param)
    x_state = sf_optax.eval_params(optimizer, params)
    eval_model = nnx.clone(model)
    nnx.update(eval_model, x_state)
    x = {n: np.asarray(getattr(eval_model, n)[...]) for n in problem.init}
    y = {n: np.asarray(getattr(model, n)[...]) for n in problem.init}
    assert max_rel_diff(y, ref.numpy()) <= TOL
    assert max_rel_diff(x, ref.x()) <= TOL


def test_flax_train_state():
    problem = Problem(seed=27)
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    ts = train_state.TrainState.create(apply_fn=None, params=params, tx=sf_adamw())
    ref = Reference(problem)
    apply = jax.jit(lambda ts, grads: ts.apply_gradients(grads=grads))
    for k in range(80):
        grads = problem.grads(ts.params, k)
        ts = apply(ts, grads)
        ref.step(grads)
    assert max_rel_diff(to_np(ts.params), ref.numpy()) <= TOL
    assert max_rel_diff(to_np(sf_optax.eval_params(ts, ts.params)), ref.x()) <= TOL


def test_weight_decay_mask_matches_reference_param_groups():
    """An optax mask that decays only "w" equals the reference with two param groups."""
    problem = Problem(seed=28)
    tx = sf_adamw(weight_decay=0.2, mask=lambda p: {k: k == "w" for k in p})
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state, apply = tx.init(params), jitted(tx)
    torch_params = {k: torch.tensor(v) for k, v in problem.init.items()}
    groups = [
        {"params": [torch_params["w"]], "weight_decay": 0.2},
        {"params": [torch_params["b"], torch_params["s"]], "weight_decay": 0.0},
    ]
    ref = schedulefree.AdamWScheduleFree(groups, **{**HP, "weight_decay": 0.0})
    ref.train()
    for step in range(100):
        grads = problem.grads(params, step)
        params, state = apply(grads, state, params)
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        ref.step()
    ours = to_np(params)
    assert max_rel_diff(ours, {k: p.numpy() for k, p in torch_params.items()}) <= TOL
    # and the mask mattered: decaying everything lands elsewhere
    tx_all = sf_adamw(weight_decay=0.2)
    p_all = {k: jnp.asarray(v) for k, v in problem.init.items()}
    s_all, apply_all = tx_all.init(p_all), jitted(tx_all)
    for step in range(100):
        p_all, s_all = apply_all(problem.grads(p_all, step), s_all, p_all)
    assert max_rel_diff(to_np(p_all), ours) > 1e-3
