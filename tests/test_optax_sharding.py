"""sf_optax under jax.jit with NamedSharding on an 8-device CPU mesh (tests/conftest.py sets it).

Buffers shaped like the params keep their parameter's sharding through steps, eval views and
donation; scalars are replicated; the sharded run equals the single-device run to float32
round-off (the two are different compiled programs, so fusion may round a few ulps apart).
Gradients come from numpy so that both runs see identical inputs and the comparison measures
the optimizer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sf_optax

SHAPES = {"w": (16, 8), "b": (8,), "emb": (32, 4), "scale": ()}
SPECS = {"w": P("fsdp", "tp"), "b": P("tp"), "emb": P("fsdp", None), "scale": P()}


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.fail("the sharding tests need 8 CPU devices: XLA_FLAGS is set in tests/conftest.py")
    return Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tp"))


def init_params():
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def numpy_grads(params, step):
    rng = np.random.default_rng([7, step])
    return {
        k: (np.asarray(params[k]) * 0.5 + rng.normal(size=s)).astype(np.float32)
        for k, s in SHAPES.items()
    }


OPTIMIZERS = {
    "adamw": lambda: sf_optax.adamw(0.01, warmup_steps=3, weight_decay=0.01),
    "sgd_exact_x": lambda: sf_optax.sgd(0.1, exact_x=True),
    "radam_chain": lambda: optax.chain(optax.clip(10.0), sf_optax.radam(0.01)),
}


def run(tx, steps, shardings=None, donate=False):
    params = {k: jnp.asarray(v) for k, v in init_params().items()}
    if shardings is None:
        init = jax.jit(tx.init)
        kw = {}
    else:
        params = jax.device_put(params, shardings)
        state_sh = sf_optax.state_shardings(tx, params, shardings)
        init = jax.jit(tx.init, out_shardings=state_sh)
        kw = dict(
            in_shardings=(shardings, state_sh, shardings), out_shardings=(shardings, state_sh)
        )
    state = init(params)

    def apply(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step_fn = jax.jit(apply, donate_argnums=(1, 2) if donate else (), **kw)
    for step in range(steps):
        grads = numpy_grads(params, step)
        if shardings is not None:
            grads = jax.device_put(grads, shardings)
        old_params = params
        params, state = step_fn(grads, state, params)
        if donate and donation_honoured():
            assert all(v.is_deleted() for v in jax.tree.leaves(old_params))
    return params, state


def donation_honoured() -> bool:
    """Whether this JAX/XLA build reuses donated buffers on this platform (a hint XLA may
    decline): probed on a plain jit, so the check below tests sf_optax and not the platform."""
    probe = jnp.ones(16)
    jax.jit(lambda a: a + 1, donate_argnums=0)(probe)
    return probe.is_deleted()


def param_shaped_leaves(state):
    sf = sf_optax.find_state(state)
    trees = [sf.z] + ([sf.x] if sf.x is not None else [])
    for node in jax.tree.leaves(sf.base_state, is_leaf=lambda n: isinstance(n, dict)):
        if isinstance(node, dict) and set(node) == set(SHAPES):
            trees.append(node)
    return trees


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("donate", [False, True])
def test_sharded_run_keeps_shardings_and_equals_single_device(mesh, name, donate):
    tx = OPTIMIZERS[name]()
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
    params, state = run(tx, 12, shardings, donate=donate)
    ref_params, ref_state = run(tx, 12)

    trees = param_shaped_leaves(state)
    assert len(trees) >= 1 + (name != "sgd_exact_x")  # z, and v for the Adam-type ones
    for tree in trees + [params]:
        for k, leaf in tree.items():
            assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), (k, leaf.sharding)
    sf = sf_optax.find_state(state)
    for scalar in (sf.count, sf.weight_sum, sf.lr_max, sf.b1):
        assert scalar.sharding.is_fully_replicated

    x = jax.jit(sf_optax.eval_params)(state, params)
    ref_x = sf_optax.eval_params(ref_state, ref_params)
    for k in SHAPES:
        assert x[k].sharding.is_equivalent_to(shardings[k], x[k].ndim)
        # same elementwise math, compiled as different programs: equal up to float32 round-off
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(ref_params[k]), 1e-6, 1e-6)
        np.testing.assert_allclose(np.asarray(x[k]), np.asarray(ref_x[k]), 1e-6, 1e-6)
    assert not np.allclose(np.asarray(params["w"]), init_params()["w"])


def test_state_shardings_helper(mesh):
    tx = optax.MultiSteps(sf_optax.adamw(1e-3, exact_x=True), every_k_schedule=2)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
    state_sh = sf_optax.state_shardings(tx, params, shardings)
    sf = sf_optax.find_state(state_sh)
    for tree in (sf.z, sf.x, sf.base_state[0].nu, state_sh.acc_grads):
        assert tree == shardings
    for scalar in (sf.count, sf.weight_sum, sf.lr_max, sf.b1, state_sh.mini_step):
        assert scalar.spec == P() and scalar.mesh == mesh


def test_state_shardings_rejects_non_named(mesh):
    tx = sf_optax.adamw()
    params = {"a": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with pytest.raises(ValueError, match="NamedShardings on one mesh"):
        sf_optax.state_shardings(tx, params, {"a": jax.devices()[0]})


def test_propagation_without_explicit_shardings(mesh):
    """A plain jit (no in/out shardings) also keeps the state on the params' shardings."""
    tx = sf_optax.adamw(0.01)
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
    params = jax.device_put({k: jnp.asarray(v) for k, v in init_params().items()}, shardings)
    state = jax.jit(tx.init)(params)
    grads = jax.device_put(numpy_grads(params, 0), shardings)
    updates, state = jax.jit(tx.update)(grads, state, params)
    for k, leaf in sf_optax.find_state(state).z.items():
        assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim)


def test_packed_small_leaves_sharded_run(mesh):
    # w (128 elements) and emb (128) are slots alone and keep their shardings; b (8) and scale
    # (1) share one replicated slot. The sharded run equals the unpacked single-device run.
    tx = sf_optax.adamw(0.01, warmup_steps=3, weight_decay=0.01, pack_small_leaves=64)
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
    params, state = run(tx, 12, shardings, donate=True)
    ref_params, ref_state = run(sf_optax.adamw(0.01, warmup_steps=3, weight_decay=0.01), 12)
    sf = sf_optax.find_state(state)
    z_slots, v_slots = sf.z, sf.base_state[0].nu
    # leaf order b, emb, scale, w: the slots alone first (emb, w), then b and scale (8 + 1)
    assert [tuple(a.shape) for a in z_slots] == [(32, 4), (16, 8), (9,)]
    for slots in (z_slots, v_slots):
        assert slots[0].sharding.is_equivalent_to(shardings["emb"], 2)
        assert slots[1].sharding.is_equivalent_to(shardings["w"], 2)
        assert slots[2].sharding.is_fully_replicated
    x = jax.jit(sf_optax.eval_params)(state, params)
    ref_x = sf_optax.eval_params(ref_state, ref_params)
    for k in SHAPES:
        assert x[k].shape == SHAPES[k]
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(ref_params[k]), 1e-6, 1e-6)
        np.testing.assert_allclose(np.asarray(x[k]), np.asarray(ref_x[k]), 1e-6, 1e-6)
