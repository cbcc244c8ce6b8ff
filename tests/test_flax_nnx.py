"""The Flax helpers against independent numbers: x rebuilt in float64 numpy, BatchNorm statistics
measured by a numpy forward pass of the same network at x, and trajectories stepped by hand.

Covers ``sf_optax.at_x``, ``sf_optax.eval_model``, ``sf_optax.recompute_batchnorm_stats`` (flax.nnx)
and ``sf_optax.ScheduleFreeTrainState`` (flax.training).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sf_optax

B1, EPS, MOMENTUM = 0.8, 1e-5, 0.5


class Net(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm: both norms see inputs numpy can redo."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(5, 6, rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, momentum=MOMENTUM, epsilon=EPS, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)
        self.bn2 = nnx.BatchNorm(3, momentum=MOMENTUM, epsilon=EPS, rngs=rngs)

    def __call__(self, inputs):
        return self.bn2(self.l2(jax.nn.relu(self.bn1(self.l1(inputs)))))


# Built once: the transformation is part of what nnx.jit compiles for, so reusing it reuses
# the compiled step.
OPTIMIZERS = {
    "adamw": sf_optax.adamw(0.05, b1=B1, warmup_steps=2, weight_decay=0.01),
    # nested in a chain, with the stored x: the helpers must find the state and use it
    "chain_sgd_exact_x": optax.chain(
        optax.clip_by_global_norm(5.0), sf_optax.sgd(0.2, b1=B1, exact_x=True)
    ),
}


def inputs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


@nnx.jit
def train_step(model, optimizer, batch):
    target = jnp.tanh(2 * batch[:, :3] * batch[:, 2:])  # something for every layer to learn
    grads = nnx.grad(lambda m: ((m(batch) - target) ** 2).mean())(model)
    optimizer.update(model, grads)


def trained(name: str, steps: int = 8):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name], wrt=nnx.Param)
    for step in range(steps):
        train_step(model, optimizer, inputs(100 + step, 16))
    return model, optimizer


def param_arrays(tree) -> dict:
    """{"l1/kernel": float64 array, ...} from a model or a State of the params."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:2]): np.asarray(
            leaf, np.float64
        )
        for path, leaf in flat
    }


def numpy_x(model, optimizer) -> dict:
    y = param_arrays(model)
    z = param_arrays(sf_optax.find_state(optimizer).z)
    return {k: (y[k] - (1 - B1) * z[k]) / B1 for k in y}


def all_arrays(model) -> list:
    return jax.tree.leaves(nnx.state(model))


def assert_same_arrays(before: list, after: list):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_at_x_and_eval_model_hold_x_and_training_resumes_bitwise(name):
    model, optimizer = trained(name)
    expected = numpy_x(model, optimizer)
    library = param_arrays(sf_optax.eval_params(optimizer, nnx.state(model, nnx.Param)))
    y = param_arrays(model)
    # x and y apart (biases before a BatchNorm get no gradient, kernels do): the comparisons
    # below can tell them apart.
    for key in ("l1/kernel", "l2/kernel", "bn2/scale"):
        assert np.abs(expected[key] - y[key]).max() > 1e-3, key

    before = all_arrays(model)
    with sf_optax.at_x(model, optimizer) as inside:
        assert inside is model
        assert model.bn1.use_running_average and model.bn2.use_running_average
        got = param_arrays(model)
        for key in expected:
            np.testing.assert_array_equal(got[key], library[key])
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
        # evaluating inside the block, even in training mode, must not leak out of it
        model.train()
        model(inputs(7, 16))
    after = all_arrays(model)
    assert all(a is b for a, b in zip(before, after)), "y's arrays were not put back as they were"
    assert not model.bn1.use_running_average  # the training mode is back too

    copy = sf_optax.eval_model(model, optimizer)
    got = param_arrays(copy)
    for key in expected:
        np.testing.assert_array_equal(got[key], library[key])
    assert copy.bn1.use_running_average and not model.bn1.use_running_average
    assert_same_arrays(before, all_arrays(model))
    # the copy keeps the training statistics when no batches are given
    np.testing.assert_array_equal(copy.bn1.var[...], model.bn1.var[...])

    # Training after the evaluations is the training without them, bit for bit.
    plain_model, plain_optimizer = trained(name, steps=10)
    for step in range(8, 10):
        train_step(model, optimizer, inputs(100 + step, 16))
    assert_same_arrays(all_arrays(plain_model), all_arrays(model))
    assert_same_arrays(
        jax.tree.leaves(nnx.state(plain_optimizer)), jax.tree.leaves(nnx.state(optimizer))
    )


def numpy_batchnorm_stats(x: dict, model: Net, batches: list) -> dict:
    """Each BatchNorm's input, computed at x in float64, and its per-batch mean and biased
    variance averaged over the batches with equal weights."""
    seen = {"bn1": [], "bn2": []}
    for batch in batches:
        h1 = batch.astype(np.float64) @ x["l1/kernel"] + x["l1/bias"]
        seen["bn1"].append(h1)
        mean, var = h1.mean(0), h1.var(0)  # numpy's var: biased, as nnx.BatchNorm's
        normed = (h1 - mean) / np.sqrt(var + EPS) * x["bn1/scale"] + x["bn1/bias"]
        h2 = np.maximum(normed, 0.0) @ x["l2/kernel"] + x["l2/bias"]
        seen["bn2"].append(h2)
    return {
        name: (
            np.mean([h.mean(0) for h in hs], axis=0),
            np.mean([h.var(0) for h in hs], axis=0),
        )
        for name, hs in seen.items()
    }


def test_batchnorm_stats_recomputed_at_x_equal_numpy_stats_of_the_layer_inputs():
    model, optimizer = trained("adamw")
    # Batches of unequal size: each batch weighs the same (mean of batch means), as in torch's
    # momentum=None, which differs from pooling all samples.
    batches = [inputs(200, 16), inputs(201, 16), inputs(202, 5)]
    expected = numpy_batchnorm_stats(numpy_x(model, optimizer), model, batches)
    pooled_mean = (
        np.concatenate(
            [b.astype(np.float64) @ numpy_x(model, optimizer)["l1/kernel"] for b in batches]
        ).mean(0)
        + numpy_x(model, optimizer)["l1/bias"]
    )
    assert np.abs(pooled_mean - expected["bn1"][0]).max() > 1e-3  # the weighting matters here

    for name, (mean, _) in expected.items():  # statistics at y are not statistics at x
        assert np.abs(np.asarray(getattr(model, name).mean[...]) - mean).max() > 1e-2, name
    before = all_arrays(model)

    def check(holder):
        for name, (mean, var) in expected.items():
            layer = getattr(holder, name)
            np.testing.assert_allclose(layer.mean[...], mean, rtol=1e-5, atol=1e-5, err_msg=name)
            np.testing.assert_allclose(layer.var[...], var, rtol=1e-5, atol=1e-5, err_msg=name)

    with sf_optax.at_x(model, optimizer, batches=iter(batches)):
        check(model)
        assert model.bn1.momentum == MOMENTUM  # the layer settings are back after the pass
        out_x = np.asarray(model(batches[0]))
    assert_same_arrays(before, all_arrays(model))
    assert all(a is b for a, b in zip(before, all_arrays(model)))

    copy = sf_optax.eval_model(model, optimizer, batches=batches)
    check(copy)
    np.testing.assert_array_equal(np.asarray(copy(batches[0])), out_x)
    assert_same_arrays(before, all_arrays(model))
    assert not model.bn1.use_running_average and model.bn1.momentum == MOMENTUM

    # In place on the copy, with a forward of the user's own, counting the batches it used.
    def forward(m, batch):
        return m(batch["images"])

    copy.train()
    used = sf_optax.recompute_batchnorm_stats(copy, [{"images": b} for b in batches], forward)
    assert used == 3
    check(copy)
    assert not copy.bn1.use_running_average  # as it was: train mode


def test_recompute_without_batches_raises_and_leaves_the_statistics():
    model, _ = trained("adamw", steps=2)
    before = all_arrays(model)
    with pytest.raises(ValueError, match="at least one batch"):
        sf_optax.recompute_batchnorm_stats(model, [])
    assert_same_arrays(before, all_arrays(model))
    assert model.bn1.momentum == MOMENTUM and not model.bn1.use_running_average


def test_at_x_rejects_a_plain_optax_state():
    model, optimizer = trained("adamw", steps=1)
    with pytest.raises(TypeError, match="nnx.Optimizer"):
        with sf_optax.at_x(model, optimizer.opt_state):
            pass


# --- flax.training.train_state --------------------------------------------------------------


def scale_by_extra_arg() -> optax.GradientTransformationExtraArgs:
    """Multiplies the gradients by the ``scale`` keyword given to ``update``."""

    def update(updates, state, params=None, *, scale=1.0, **extra):
        del params, extra
        return jax.tree.map(lambda g: g * scale, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def linear_params():
    rng = np.random.default_rng(3)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
        "b": jnp.zeros((2,), jnp.float32),
    }


def linear_grads(params, step):
    rng = np.random.default_rng([5, step])
    return jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def test_train_state_eval_params_and_extra_args_reach_the_update():
    tx = sf_optax.schedule_free(scale_by_extra_arg(), 0.1, b1=B1, warmup_steps=2)
    state = sf_optax.ScheduleFreeTrainState.create(apply_fn=None, params=linear_params(), tx=tx)
    step = jax.jit(lambda s, g, scale: s.apply_gradients(grads=g, extra_args={"scale": scale}))

    # The same rule stepped with the gradients pre-scaled by hand, through plain optax.
    plain_tx = sf_optax.schedule_free(optax.identity(), 0.1, b1=B1, warmup_steps=2)
    params, opt_state = linear_params(), plain_tx.init(linear_params())
    for k in range(6):
        scale = 0.5 + 0.25 * k
        state = step(state, linear_grads(state.params, k), scale)
        grads = jax.tree.map(lambda g, s=scale: g * s, linear_grads(params, k))
        updates, opt_state = plain_tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert int(state.step) == 6
    for key in params:
        np.testing.assert_allclose(state.params[key], params[key], rtol=1e-6, atol=1e-7)

    z = sf_optax.find_state(state.opt_state).z
    for key in params:
        y64, z64 = np.asarray(state.params[key], np.float64), np.asarray(z[key], np.float64)
        expected = (y64 - (1 - B1) * z64) / B1
        assert np.abs(expected - y64).max() > 1e-3
        np.testing.assert_allclose(state.eval_params[key], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            state.eval_params[key], sf_optax.eval_params(state.opt_state, state.params)[key]
        )


def test_train_state_shardings_follow_the_params():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tp"))
    P = jax.sharding.PartitionSpec
    param_sh = {
        "w": jax.sharding.NamedSharding(mesh, P("fsdp", "tp")),
        "b": jax.sharding.NamedSharding(mesh, P("tp")),
    }
    tx = sf_optax.adamw(0.1)
    abstract = jax.eval_shape(
        lambda: sf_optax.ScheduleFreeTrainState.create(apply_fn=None, params=linear_params(), tx=tx)
    )
    shardings = sf_optax.train_state_shardings(abstract, param_sh)
    create = jax.jit(
        lambda p: sf_optax.ScheduleFreeTrainState.create(apply_fn=None, params=p, tx=tx),
        out_shardings=shardings,
    )
    state = create(linear_params())
    step = jax.jit(
        lambda s, g: s.apply_gradients(grads=g),
        in_shardings=(shardings, param_sh),
        out_shardings=shardings,
    )
    state = step(state, linear_grads(state.params, 0))
    state_ = sf_optax.find_state(state.opt_state)
    for key in param_sh:
        assert state.params[key].sharding == param_sh[key]
        assert state_.z[key].sharding == param_sh[key]
    assert state.step.sharding.spec == P() and state_.count.sharding.spec == P()
