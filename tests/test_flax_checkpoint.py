"""Orbax checkpoints of schedule-free training states: resume, views, and a change of mesh.

The reference is always the uninterrupted run in the same process: a run that saves, restores
into a state built from other values, and goes on must end where it ends (bit for bit in
float32 when the program is the same, to float32 round-off when the mesh, and so the compiled
program, differs). What an eval-view checkpoint holds on disk is read back with plain Orbax and
compared with ``(y - (1 - b1) z) / b1`` computed in float64 numpy. 8 CPU devices come from
tests/conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sf_optax

B1 = 0.9
SHAPES = {"w": (16, 8), "emb": (32, 8), "b": (8,)}
SPECS = {"w": P("fsdp", "tp"), "emb": P("fsdp", None), "b": P("tp")}
TX = sf_optax.adamw(0.02, b1=B1, warmup_steps=3, weight_decay=0.01)


def mesh_of(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("fsdp", "tp"))


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for k, s in SHAPES.items()}


def batch(step):
    return jnp.asarray(np.random.default_rng([11, step]).normal(size=(32, 16)), jnp.float32)


def loss_fn(params, data):
    hidden = jnp.tanh(data @ params["w"] + params["b"])  # (32, 8)
    codes = hidden @ params["emb"].T  # (32, 32)
    return jnp.mean((codes - data[:, :1]) ** 2) + 0.1 * jnp.mean(params["emb"] ** 2)


def create(params):
    return sf_optax.ScheduleFreeTrainState.create(apply_fn=loss_fn, params=params, tx=TX)


class Setup:
    """A mesh, the state's shardings on it, and the jitted create and step."""

    def __init__(self, shape):
        self.mesh = mesh_of(shape)
        self.param_sh = {k: NamedSharding(self.mesh, SPECS[k]) for k in SHAPES}
        self.abstract = jax.eval_shape(create, init_params())
        self.state_sh = sf_optax.train_state_shardings(self.abstract, self.param_sh)
        self.create = jax.jit(create, out_shardings=self.state_sh)
        data_sh = NamedSharding(self.mesh, P(("fsdp", "tp")))
        replicated = NamedSharding(self.mesh, P())

        def step(state, data):
            loss, grads = jax.value_and_grad(state.apply_fn)(state.params, data)
            return state.apply_gradients(grads=grads), loss

        self.step = jax.jit(
            step, in_shardings=(self.state_sh, data_sh), out_shardings=(self.state_sh, replicated)
        )

    def target(self):
        """Where to restore: shapes, dtypes and this mesh's shardings, no values."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract,
            self.state_sh,
        )

    def run(self, state, start, stop):
        losses = []
        for k in range(start, stop):
            state, loss = self.step(state, batch(k))
            losses.append(float(loss))
        return state, losses


@pytest.fixture(scope="module")
def setup42():
    return Setup((4, 2))


@pytest.fixture(scope="module")
def uninterrupted(setup42):
    return setup42.run(setup42.create(init_params()), 0, 6)


def as_numpy(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # nnx.Rngs' stream
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(as_numpy(x), as_numpy(y))


def test_train_view_resume_is_bitwise_the_uninterrupted_run(setup42, uninterrupted, tmp_path):
    state, losses = setup42.run(setup42.create(init_params()), 0, 3)
    assert sf_optax.save_checkpoint(tmp_path, state) == 3

    # Restore into a state built from other values, so nothing can leak through the template.
    template = setup42.create(init_params(seed=5))
    restored = sf_optax.restore_checkpoint(tmp_path, template)
    assert_trees_equal(restored, state)
    resumed, more = setup42.run(restored, 3, 6)
    assert losses + more == uninterrupted[1]
    assert int(resumed.step) == 6
    assert_trees_equal(resumed, uninterrupted[0])


def test_eval_view_holds_x_on_disk_and_resumes_to_float32_rounding(
    setup42, uninterrupted, tmp_path
):
    state, _ = setup42.run(setup42.create(init_params()), 0, 3)
    sf_optax.save_checkpoint(tmp_path, state, view="eval")

    on_disk = ocp.StandardCheckpointer().restore(tmp_path / "3" / "state")
    z = sf_optax.find_state(state.opt_state).z
    for k in SHAPES:
        y64, z64 = np.asarray(state.params[k], np.float64), np.asarray(z[k], np.float64)
        x64 = (y64 - (1 - B1) * z64) / B1
        assert np.abs(x64 - y64).max() > 1e-3
        np.testing.assert_allclose(np.asarray(on_disk["params"][k]), x64, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(on_disk["opt_state"]["z"][k]), np.asarray(z[k]))

    restored = sf_optax.restore_checkpoint(tmp_path, setup42.target())
    assert_trees_equal(restored.opt_state, state.opt_state)
    for k in SHAPES:  # y = b1 x + (1 - b1) z again, to float32 rounding of the two conversions
        np.testing.assert_allclose(restored.params[k], state.params[k], rtol=1e-6, atol=1e-6)
    resumed, _ = setup42.run(restored, 3, 6)
    for k in SHAPES:
        np.testing.assert_allclose(
            resumed.params[k], uninterrupted[0].params[k], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)])
def test_restore_onto_another_mesh_shape(setup42, uninterrupted, tmp_path, shape):
    state, _ = setup42.run(setup42.create(init_params()), 0, 3)
    sf_optax.save_checkpoint(tmp_path, state)

    other = Setup(shape)
    restored = sf_optax.restore_checkpoint(tmp_path, other.target())
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(other.state_sh)):
        assert leaf.sharding == sharding
    w_shards = {s.data.shape for s in restored.params["w"].addressable_shards}
    assert w_shards == {(16 // shape[0], 8 // shape[1])}  # really laid out on the new mesh
    assert_trees_equal(restored, state)  # the values did not move, only their placement

    resumed, _ = other.run(restored, 3, 6)
    # Another partitioning is another program: equal to float32 round-off, not bit for bit.
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


# --- flax.nnx: a model with BatchNorm statistics and a Dropout RNG stream ---------------------


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(6, 12, rngs=rngs)
        self.bn = nnx.BatchNorm(12, momentum=0.8, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.l2 = nnx.Linear(12, 2, rngs=rngs)

    def __call__(self, inputs):
        return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(inputs)))))


NNX_TX = sf_optax.adamw(0.05, b1=B1, warmup_steps=2)


def nnx_pair(seed):
    model = Net(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, NNX_TX, wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, data):
    grads = nnx.grad(lambda m: ((m(data) - data[:, :2]) ** 2).mean())(model)
    optimizer.update(model, grads)


def nnx_run(model, optimizer, start, stop):
    for k in range(start, stop):
        nnx_step(model, optimizer, batch(k)[:8, :6])


def test_nnx_resume_is_bitwise_including_batchnorm_stats_and_rng(tmp_path):
    reference = nnx_pair(0)
    nnx_run(*reference, 0, 6)

    model, optimizer = nnx_pair(0)
    nnx_run(model, optimizer, 0, 3)
    assert sf_optax.save_checkpoint(tmp_path / "train", (model, optimizer)) == 3
    sf_optax.save_checkpoint(tmp_path / "eval", (model, optimizer), view="eval")
    y = nnx.state(model, nnx.Param)

    fresh = nnx_pair(7)
    assert sf_optax.restore_checkpoint(tmp_path / "train", fresh) is fresh
    nnx_run(*fresh, 3, 6)
    assert int(fresh[1].step[...]) == 6
    assert_trees_equal(nnx.state(fresh[0]), nnx.state(reference[0]))  # params, stats, RNG
    assert_trees_equal(nnx.state(fresh[1]), nnx.state(reference[1]))

    from_eval = nnx_pair(8)
    sf_optax.restore_checkpoint(tmp_path / "eval", from_eval)
    for a, b in zip(jax.tree.leaves(nnx.state(from_eval[0], nnx.Param)), jax.tree.leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert_trees_equal(  # everything but the params is stored as it was
        nnx.state(from_eval[0], nnx.Not(nnx.Param)), nnx.state(model, nnx.Not(nnx.Param))
    )


def test_restore_errors_say_what_is_wrong(setup42, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sf_optax.restore_checkpoint(tmp_path / "empty", setup42.target())
    sf_optax.save_checkpoint(tmp_path / "nnx", nnx_pair(0))
    with pytest.raises(ValueError, match="'nnx' state but the target is a 'train_state'"):
        sf_optax.restore_checkpoint(tmp_path / "nnx", setup42.target())
    with pytest.raises(ValueError, match="view must be"):
        sf_optax.save_checkpoint(tmp_path / "x", nnx_pair(0), view="x")
    with pytest.raises(ValueError, match="already holds a checkpoint at step 0"):
        sf_optax.save_checkpoint(tmp_path / "nnx", nnx_pair(0), view="eval")
    with pytest.raises(TypeError, match="TrainState or a"):
        sf_optax.save_checkpoint(tmp_path / "x", {"params": {}})


# --- plain optax: the (params, opt_state) pair of a training loop ------------------------------

OPTAX_TX = optax.chain(
    optax.clip_by_global_norm(1.0),
    sf_optax.adamw(0.02, b1=B1, warmup_steps=3, weight_decay=0.01, pack_small_leaves=16),
)


@jax.jit
def optax_step(params, opt_state, data):
    grads = jax.grad(loss_fn)(params, data)
    updates, opt_state = OPTAX_TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def optax_run(params, opt_state, start, stop):
    for k in range(start, stop):
        params, opt_state = optax_step(params, opt_state, batch(k))
    return params, opt_state


def optax_fresh(seed):
    params = init_params(seed)
    return params, OPTAX_TX.init(params)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_plain_optax_pair_resumes_bitwise(tmp_path, form):
    reference = optax_run(*optax_fresh(0), 0, 6)

    params, opt_state = optax_run(*optax_fresh(0), 0, 3)
    saved = (params, opt_state) if form == "tuple" else {"params": params, "opt_state": opt_state}
    assert sf_optax.save_checkpoint(tmp_path, saved) == 3  # the schedule-free step count

    template = optax_fresh(5)  # other values: nothing can leak through the template
    target = template if form == "tuple" else dict(zip(("params", "opt_state"), template))
    restored = sf_optax.restore_checkpoint(tmp_path, target)
    assert type(restored) is type(target)
    if form == "dict":
        restored = (restored["params"], restored["opt_state"])
    assert_trees_equal(restored, (params, opt_state))
    assert_trees_equal(optax_run(*restored, 3, 6), reference)


def test_plain_optax_eval_view_holds_x_and_restores_either_form(tmp_path):
    params, opt_state = optax_run(*optax_fresh(0), 0, 3)
    sf_optax.save_checkpoint(tmp_path, {"params": params, "opt_state": opt_state}, view="eval")

    on_disk = ocp.StandardCheckpointer().restore(tmp_path / "3" / "state")
    unpacked = sf_optax.unpacked_state(opt_state, params)
    z = sf_optax.find_state(unpacked).z
    for k in SHAPES:
        y64, z64 = np.asarray(params[k], np.float64), np.asarray(z[k], np.float64)
        x64 = (y64 - (1 - B1) * z64) / B1
        assert np.abs(x64 - y64).max() > 1e-3
        np.testing.assert_allclose(np.asarray(on_disk["params"][k]), x64, rtol=1e-5, atol=1e-6)

    # Into a tuple and with ShapeDtypeStruct leaves: params come back at y.
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), optax_fresh(5)
    )
    restored_params, restored_state = sf_optax.restore_checkpoint(tmp_path, abstract)
    assert_trees_equal(restored_state, opt_state)
    for k in SHAPES:  # y = b1 x + (1 - b1) z again, to float32 rounding of the two conversions
        np.testing.assert_allclose(restored_params[k], params[k], rtol=1e-6, atol=1e-6)


def test_plain_optax_errors_say_what_is_wrong(setup42, tmp_path):
    params = init_params()
    with pytest.raises(TypeError, match="needs the state of an sf_optax optimizer"):
        sf_optax.save_checkpoint(tmp_path / "adam", (params, optax.adam(1e-3).init(params)))
    sf_optax.save_checkpoint(tmp_path / "optax", optax_fresh(0))
    with pytest.raises(ValueError, match="'optax' state but the target is a 'train_state'"):
        sf_optax.restore_checkpoint(tmp_path / "optax", setup42.target())
    with pytest.raises(TypeError, match=r"a \(params, opt_state\) tuple"):
        sf_optax.save_checkpoint(tmp_path / "x", [params, optax_fresh(0)[1]])
