"""sf_optax with ``pack_small_leaves``: small leaves share flat state slots, same numbers.

Checked against the `schedulefree` 1.4.1 reference classes in float64 (the DESIGN "math" level,
<= 1e-12 relative at y and at x after 200 steps), including a weight-decay mask against the
reference's param groups; the state given back per parameter, the views, errors, a Flax
TrainState and an Orbax checkpoint round trip. The 8-device sharded run is in
tests/test_optax_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import schedulefree
from optax_problems import Problem, max_rel_diff, run_optax, run_reference

import sf_optax

STEPS = 200
TOL = 1e-12


pytestmark = pytest.mark.usefixtures("x64")


def run_packed(tx, problem, steps=STEPS):
    params, state = run_optax(tx, problem, steps)
    x = sf_optax.eval_params(state, params)
    as_np = lambda t: {k: np.asarray(v) for k, v in t.items()}  # noqa: E731
    return as_np(params), as_np(x), state


CASES = {
    "adamw": (
        lambda **kw: sf_optax.adamw(0.05, warmup_steps=10, weight_decay=0.01, **kw),
        schedulefree.AdamWScheduleFree,
        dict(lr=0.05, warmup_steps=10, weight_decay=0.01),
    ),
    "sgd": (
        lambda **kw: sf_optax.sgd(0.1, weight_decay=0.01, **kw),
        schedulefree.SGDScheduleFree,
        dict(lr=0.1, weight_decay=0.01),
    ),
    "radam": (
        lambda **kw: sf_optax.radam(0.05, weight_decay=0.01, silent_sgd_phase=False, **kw),
        schedulefree.RAdamScheduleFree,
        dict(lr=0.05, weight_decay=0.01, silent_sgd_phase=False),
    ),
}


# The problem's leaves: b (4 elements), s (1), w (24). Below 10: b and s share a slot, w alone;
# below 25: all three in one slot.
@pytest.mark.parametrize("size, slot_shapes", [(10, [(6, 4), (5,)]), (25, [(29,)])])
@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_matches_reference(name, size, slot_shapes):
    make, ref_cls, ref_kwargs = CASES[name]
    problem = Problem(seed=3)
    y, x, state = run_packed(make(pack_small_leaves=size), problem)
    ref_y, ref_x = run_reference(ref_cls, problem, STEPS, **ref_kwargs)
    assert max_rel_diff(y, ref_y) <= TOL
    assert max_rel_diff(x, ref_x) <= TOL
    assert [tuple(a.shape) for a in sf_optax.find_state(state).z] == slot_shapes


def test_mask_matches_reference_param_groups():
    # Decay on w and s only: the packed slots split by mask value (s alone among the small
    # decayed leaves, b in the other slot); the reference gets two param groups.
    problem = Problem(seed=4)
    mask = {"w": True, "b": False, "s": True}
    tx = sf_optax.adamw(0.05, weight_decay=0.1, mask=mask, pack_small_leaves=25)
    y, x, state = run_packed(tx, problem)
    assert len(sf_optax.find_state(state).z) == 2

    groups = [(("w", "s"), {"weight_decay": 0.1}), (("b",), {"weight_decay": 0.0})]
    ref_y, ref_x = run_reference(
        schedulefree.AdamWScheduleFree, problem, STEPS, groups=groups, lr=0.05
    )
    assert max_rel_diff(y, ref_y) <= TOL
    assert max_rel_diff(x, ref_x) <= TOL
    # and the mask mattered: without it b would have been decayed too
    y_all, _, _ = run_packed(sf_optax.adamw(0.05, weight_decay=0.1, pack_small_leaves=25), problem)
    assert max_rel_diff(y_all, ref_y) > 1e-6


def test_unpacked_state_is_the_state_without_packing():
    problem = Problem(seed=5)
    kw = dict(exact_x=True)
    _, _, packed_state = run_packed(sf_optax.adamw(0.05, pack_small_leaves=10, **kw), problem, 30)
    _, _, plain_state = run_packed(sf_optax.adamw(0.05, **kw), problem, 30)
    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    back = sf_optax.unpacked_state(packed_state, params)
    assert jax.tree.structure(back) == jax.tree.structure(plain_state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain_state)):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(float(jnp.max(jnp.abs(b))), 1e-300)
        assert float(jnp.max(jnp.abs(a - b))) / scale <= TOL


def test_views_round_trip_and_keep_dtypes():
    params = {
        "big": jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(8, 8),
        "bias": jnp.arange(5, dtype=jnp.bfloat16),
        "gain": jnp.ones(3, jnp.float32),
    }
    tx = sf_optax.sgd(0.1, b1=0.5, pack_small_leaves=16)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.25, p.dtype), params)
    updates, state = tx.update(grads, state, params)
    y = optax.apply_updates(params, updates)
    x = sf_optax.eval_params(state, y)
    z = sf_optax.unpacked_state(state, params)
    for k in params:
        assert x[k].dtype == params[k].dtype and x[k].shape == params[k].shape
        # x = (y - (1 - b1) z) / b1 with b1 = 0.5, in float64 numpy
        want = (
            np.asarray(y[k], np.float64) - 0.5 * np.asarray(sf_optax.find_state(z).z[k], np.float64)
        ) / 0.5
        np.testing.assert_allclose(
            np.asarray(x[k], np.float64), want, rtol=1e-2 if k == "bias" else 1e-6, atol=1e-6
        )
    back = sf_optax.train_params(state, x)
    for k in params:
        np.testing.assert_allclose(
            np.asarray(back[k], np.float64),
            np.asarray(y[k], np.float64),
            rtol=1e-2 if k == "bias" else 1e-6,
        )


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_sizes_are_clear_errors(bad):
    with pytest.raises((TypeError, ValueError), match="pack_small_leaves"):
        sf_optax.adamw(pack_small_leaves=bad)


def test_wrong_params_and_traced_masks_are_clear_errors():
    params = {"a": jnp.ones(3), "b": jnp.ones((4, 4))}
    tx = sf_optax.adamw(pack_small_leaves=8)
    state = tx.init(params)
    with pytest.raises(ValueError, match="do not match the packed optimizer state"):
        tx.update(params, state, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="do not match the packed optimizer state"):
        sf_optax.eval_params(state, {"a": jnp.ones(2), "b": jnp.ones((4, 4))})
    traced = sf_optax.adamw(
        weight_decay=0.1, mask=lambda p: jax.tree.map(lambda a: a.sum() > 0, p), pack_small_leaves=8
    )
    with pytest.raises(TypeError, match="Python bools"):
        jax.jit(traced.init)(params)


def test_inject_hyperparams_with_static_size():
    params = {"a": jnp.ones(3), "b": jnp.ones((4, 4))}
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(sf_optax.adamw)(learning_rate=0.1, pack_small_leaves=8).init(
            params
        )
    tx = optax.inject_hyperparams(sf_optax.adamw, static_args=("pack_small_leaves",))(
        learning_rate=0.1, pack_small_leaves=8
    )
    plain = sf_optax.adamw(0.1)
    state, ref = tx.init(params), plain.init(params)
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    for _ in range(3):
        u, state = tx.update(grads, state, params)
        r, ref = plain.update(grads, ref, params)
    for k in params:
        np.testing.assert_allclose(np.asarray(u[k]), np.asarray(r[k]), rtol=1e-12)


def test_train_state_and_checkpoint_round_trip(tmp_path):
    params = {"dense": {"kernel": jnp.ones((6, 4)) * 0.1, "bias": jnp.zeros(4)}}
    apply_fn = lambda p, xb: xb @ p["dense"]["kernel"] + p["dense"]["bias"]  # noqa: E731
    tx = sf_optax.adamw(0.01, pack_small_leaves=16)
    state = sf_optax.ScheduleFreeTrainState.create(apply_fn=apply_fn, params=params, tx=tx)
    xb = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)))

    def loss(p):
        return jnp.mean(apply_fn(p, xb) ** 2 - apply_fn(p, xb))

    for _ in range(5):
        state = state.apply_gradients(grads=jax.grad(loss)(state.params))
    x = state.eval_params
    want = jax.tree.map(
        lambda y, z: (y - 0.1 * z) / 0.9,
        state.params,
        sf_optax.find_state(sf_optax.unpacked_state(state.opt_state, params)).z,
    )
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)

    sf_optax.save_checkpoint(tmp_path / "ckpt", state)
    fresh = sf_optax.ScheduleFreeTrainState.create(apply_fn=apply_fn, params=params, tx=tx)
    restored = sf_optax.restore_checkpoint(tmp_path / "ckpt", fresh)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
