"""The training loop of the ``local_optax`` runner: K JAX CPU devices, one worker each.

The workers lie along the mesh axis ``"workers"``; ``sf_optax.local.make_local_train_step``
steps them all at once under ``shard_map`` (each on its own params, optimizer state and rows of
step ``t``'s batch, ``local_plan.share``) and averages the params and ``z`` with a ``pmean``
where the mask says. The mask is ``local_plan.sync_steps`` as flags, the same steps the torch
ranks sync on; it is an argument of the one compiled step.

Recording (``local_plan``'s module docstring says what the record holds): after every step the
stacked params come to the host, where their mean and spread are taken in numpy. An evaluation
takes ``x`` of the workers' averaged ``y`` and ``z`` (``sf_optax.local.local_eval_params``;
plain SGD: the mean params); for the CNN, ``sf_optax.local.make_local_batch_stats`` has every
worker compute the BatchNorm statistics at that ``x`` on each of its rows of the recalibration
batches, averages them over its batches and then over the workers, and the eval-set loss is
taken with those statistics. The BatchNorm running statistics of training are never read (the
twins normalise with batch statistics while training, and an evaluation recomputes them), so
each step starts from the initial ones and drops what the forward pass wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sf_optax.local as sf_local
from parity import data as data_lib
from parity.config import RunConfig
from parity.models import canonical, flax_models
from parity.training import local_plan
from parity.training.record import Record

AXIS = "workers"


def run(
    config: RunConfig,
    make_tx: Callable[[RunConfig], optax.GradientTransformation],
    *,
    devices,
    progress: Callable[[int], None] | None = None,
) -> Record:
    """Train ``config``'s model on ``local_plan.workers(config)`` of ``devices``."""
    with jax.enable_x64(config.dtype == "float64"), jax.default_matmul_precision("highest"):
        return _run(config, make_tx, devices, progress or (lambda step: None))


def _norms(module) -> list:
    return [m for _, m in nnx.iter_modules(module) if isinstance(m, flax_models.BatchNorm)]


def _run(config, make_tx, devices, progress) -> Record:
    k = local_plan.workers(config)
    dtype = jnp.dtype(config.dtype)
    data = data_lib.for_run(config)
    mesh = Mesh(np.array(devices[:k]), (AXIS,))
    shapes = canonical.param_shapes(config.model)
    params0 = canonical.init_params(config.model, config.seed)
    module = flax_models.build(config.model, params0, canonical.init_buffers(config.model), dtype)
    graph, params, rest = flax_models.split(module)
    uses_batch_norm = flax_models.has_batch_norm(module)
    plain = local_plan.plain_sgd(config)
    if plain:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(config.lr))
    else:
        tx = make_tx(config)
    steps = local_plan.sync_steps(config)
    mask = np.zeros(config.steps, dtype=bool)
    mask[np.asarray(steps) - 1] = True

    def loss_fn(p, batch):
        inputs, labels = batch
        model = flax_models.merge(graph, p, rest)
        return flax_models.loss(model(inputs), labels)

    step = sf_local.make_local_train_step(loss_fn, tx, mesh, AXIS)
    stacked_params, opt_state = sf_local.local_init(tx, params, mesh, AXIS)
    per_worker = NamedSharding(mesh, P(AXIS))
    n = config.batch_size // k

    def split(array) -> np.ndarray:
        """(B, ...) -> (workers, B / workers, ...): worker w's rows are local_plan.share(w)."""
        return array.reshape(k, n, *array.shape[1:])

    def put(array, sharding=None):
        array = jnp.asarray(array, dtype if np.issubdtype(array.dtype, np.floating) else None)
        return array if sharding is None else jax.device_put(array, sharding)

    def stats_fn(x, batch):
        model = flax_models.merge(graph, x, rest)
        flax_models.set_batch_stats_mode(model, use_running_average=False, momentum=1.0)
        model(batch)  # momentum 1: the running statistics become this batch's
        return [(m.mean[...], m.var[...]) for m in _norms(model)]

    batch_stats = sf_local.make_local_batch_stats(stats_fn, mesh, AXIS) if uses_batch_norm else None
    if uses_batch_norm:
        # (workers, batches, rows, ...): worker w's rows of each recalibration batch.
        recal = put(np.stack([split(b) for b in data.recal_inputs], axis=1), per_worker)

    @jax.jit
    def eval_loss(x, stats, inputs, labels):
        model = flax_models.merge(graph, x, rest)
        for m, (mean, var) in zip(_norms(model), stats):
            m.mean[...] = mean
            m.var[...] = var
        flax_models.set_batch_stats_mode(model, use_running_average=True)
        return flax_models.loss(model(inputs), labels)

    @jax.jit
    def mean_params(p):
        return jax.tree.map(lambda a: jnp.mean(a, axis=0), p)

    eval_inputs, eval_labels = put(data.eval_inputs), put(data.eval_labels)
    record = Record.empty(0, config.steps, shapes, config.host_dtype)
    spread = [0.0] * (config.steps + 1)
    worker_losses = np.full((config.steps, k), np.nan)

    def evaluate() -> float:
        if plain:
            x = mean_params(stacked_params)
        else:
            x = sf_local.local_eval_params(stacked_params, opt_state)
        stats = []
        if uses_batch_norm:
            stats = batch_stats(sf_local.stack(x, mesh, AXIS), recal)
        return float(eval_loss(x, stats, eval_inputs, eval_labels))

    def observe(t: int) -> None:
        host = jax.device_get(stacked_params)
        means, spread[t] = local_plan.summarize(host, config.host_dtype)
        record.set_params(t, means)
        if config.evaluates_at(t):
            record.eval_loss[t] = evaluate()

    start = time.perf_counter()
    observe(0)
    for t in range(config.steps):
        inputs, labels = data.train_batch(t)
        batch = (put(split(inputs), per_worker), put(split(labels), per_worker))
        stacked_params, opt_state, losses = step(stacked_params, opt_state, batch, mask[t])
        worker_losses[t] = np.asarray(losses, np.float64)
        observe(t + 1)
        progress(t + 1)
    seconds = time.perf_counter() - start

    record.train_loss[:] = worker_losses.mean(axis=1)
    record.meta = {
        "framework": f"jax {jax.__version__}, optax {optax.__version__}",
        "devices": [f"{k} CPU devices along mesh axis {AXIS!r}"],
        "optimizer": "optax.sgd" if plain else config.optimizer,
        "loop_seconds": seconds,
        "compilations": step.compilations(),  # programs the local step compiled
        **local_plan.meta(config, worker_losses, spread),
    }
    return record
