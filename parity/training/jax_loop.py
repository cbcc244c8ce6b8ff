"""The training loop of every JAX runner: jit, one optax transformation, optional mesh.

Params are a ``{canonical name: array}`` dict (what the optimizer sees); the flax twin is
rebuilt around them inside each jitted function. A step takes the gradient at ``y`` on step
``t``'s batch and applies ``tx``; an evaluation computes ``x`` with the runner's
``eval_params(opt_state, params)``, recomputes BatchNorm statistics at ``x`` on a copy (the
training statistics stay as they were) and takes the eval-set loss.

With a ``mesh`` (one axis, ``"fsdp"``) every parameter is split over it along its first
dimension that divides by the mesh size (FSDP style; conv kernels along a channel axis),
replicated where none does; the optimizer state follows
its parameters (``sf_optax.state_shardings``) and training batches are split over the axis.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parity import data as data_lib
from parity import handoff
from parity.config import RunConfig
from parity.models import canonical, flax_models
from parity.training.record import Record


def run(
    config: RunConfig,
    make_tx: Callable[[RunConfig], optax.GradientTransformation],
    *,
    eval_params: Callable,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> Record:
    """Train ``config``'s model with ``make_tx(config)`` and record every step."""
    # Matmuls at full precision (on GPUs the default would be TF32/bf16 passes).
    with jax.enable_x64(config.dtype == "float64"), jax.default_matmul_precision("highest"):
        return _run(config, make_tx, eval_params, mesh, progress or (lambda step: None))


def _shard_first_axis(mesh, shape) -> NamedSharding:
    """Split the first dimension that divides by the mesh size (replicate if none does)."""
    n = mesh.shape["fsdp"]
    for axis, size in enumerate(shape):
        if size % n == 0:
            return NamedSharding(mesh, P(*([None] * axis), "fsdp"))
    return NamedSharding(mesh, P())


def _run(config, make_tx, eval_params, mesh, progress) -> Record:
    dtype = jnp.dtype(config.dtype)
    data = data_lib.for_run(config)
    shapes = canonical.param_shapes(config.model)
    tx = make_tx(config)

    if config.resume_from:
        snapshot = handoff.Snapshot.load(config.resume_from)
        if snapshot.k != config.first_step:
            raise ValueError(
                f"the snapshot is at step {snapshot.k}, the run starts at {config.first_step}"
            )
        params0, buffers0 = snapshot.params, snapshot.buffers
    else:
        params0 = canonical.init_params(config.model, config.seed)
        buffers0 = canonical.init_buffers(config.model)
    module = flax_models.build(config.model, params0, buffers0, dtype)
    graph, params, rest = flax_models.split(module)
    uses_batch_norm = flax_models.has_batch_norm(module)
    if config.resume_from:
        params, opt_state = handoff.optax_from_snapshot(snapshot, tx, dtype)
    else:
        opt_state = tx.init(params)

    replicated = batch_sharding = None
    step_kw, eval_kw = {}, {}
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        param_sh = {n: _shard_first_axis(mesh, s) for n, s in shapes.items()}
        state_sh = _state_shardings(tx, params, param_sh, replicated)
        rest_sh = jax.tree.map(lambda _: replicated, rest)
        params = jax.device_put(params, param_sh)
        opt_state = jax.device_put(opt_state, state_sh)
        rest = jax.device_put(rest, rest_sh)
        if config.batch_size % mesh.shape["fsdp"] == 0:
            batch_sharding = NamedSharding(mesh, P("fsdp"))
        else:
            batch_sharding = replicated
        step_kw = dict(out_shardings=(param_sh, state_sh, rest_sh, replicated))
        eval_kw = dict(out_shardings=replicated)

    def train_step(params, opt_state, rest, inputs, labels):
        def loss_fn(params, rest):
            model = flax_models.merge(graph, params, rest)
            loss = flax_models.loss(model(inputs), labels)
            return loss, nnx.split(model, nnx.Param, ...)[2]

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        if config.optimizer == "adamc_plus":  # its Polyak step size needs the loss at y
            updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_rest, loss

    def eval_loss(params, opt_state, rest, recal_inputs, inputs, labels):
        x = eval_params(opt_state, params)
        model = flax_models.merge(graph, x, rest)  # a copy: `rest` outside is not changed
        if uses_batch_norm:
            flax_models.recalibrate(model, recal_inputs)
        return flax_models.loss(model(inputs), labels)

    train_step = jax.jit(train_step, **step_kw)
    eval_loss = jax.jit(eval_loss, **eval_kw)

    def put(array, sharding):
        array = jnp.asarray(array, dtype if np.issubdtype(array.dtype, np.floating) else None)
        return array if sharding is None else jax.device_put(array, sharding)

    recal = tuple(put(b, replicated) for b in data.recal_inputs)
    eval_inputs, eval_labels = put(data.eval_inputs, replicated), put(data.eval_labels, replicated)

    record = Record.empty(config.first_step, config.steps, shapes, config.host_dtype)

    def observe(step):
        record.set_params(step, jax.device_get(params))
        if config.evaluates_at(step):
            loss = eval_loss(params, opt_state, rest, recal, eval_inputs, eval_labels)
            record.eval_loss[step - config.first_step] = float(loss)

    start = time.perf_counter()
    observe(config.first_step)
    for step in range(config.first_step, config.steps):
        inputs, labels = data.train_batch(step)
        params, opt_state, rest, loss = train_step(
            params, opt_state, rest, put(inputs, batch_sharding), put(labels, batch_sharding)
        )
        record.train_loss[step - config.first_step] = float(loss)
        observe(step + 1)
        progress(step + 1)
    seconds = time.perf_counter() - start

    if config.save_to:
        buffers = flax_models.from_state(rest)
        handoff.snapshot_from_optax(
            config.model, config.optimizer, params, opt_state, buffers
        ).save(config.save_to)

    devices = sorted({str(d) for leaf in jax.tree.leaves(params) for d in leaf.devices()})
    record.meta = {
        "framework": f"jax {jax.__version__}, optax {optax.__version__}",
        "devices": devices[:2] + ([f"... {len(devices)} in all"] if len(devices) > 2 else []),
        "loop_seconds": seconds,
    }
    if mesh is not None:
        record.meta["shardings"] = {n: str(a.sharding.spec) for n, a in params.items()}
    return record


def _state_shardings(tx, params, param_sh, replicated):
    """sf_optax's rule (state buffers follow their params) for any transformation."""
    import sf_optax

    try:
        return sf_optax.state_shardings(tx, params, param_sh)
    except ValueError:
        return jax.tree.map(lambda _: replicated, jax.eval_shape(tx.init, params))
