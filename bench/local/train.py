"""The JAX side of ``python -m bench.local``: K workers, one compiled program per run.

Every run is a ``lax.scan`` over the steps; each step runs the K workers, each with its own
params and optimizer state, on its own slice of the batch. Local rows average the workers
(``sf_optax.local.average``: the params and, for Schedule-Free, ``z``) after the steps where the
row's sync mask, computed on the host by ``sf_schedules.sync``, says; the mask is an argument,
so every rule of an optimizer shares one compilation. Data-parallel rows all-reduce (``pmean``)
the gradient every step and take the same optimizer step on every worker. Evaluation: the
workers' average (they are equal after the last sync), at ``x`` for Schedule-Free
(``sf_optax.local.local_eval_params``).

Two backends, the same arithmetic:

- ``vmap`` (default): the workers are a ``jax.vmap`` over a named axis on one device, the
  averages are ``pmean`` over that axis. No cross-thread collectives: robust on a busy CPU.
- ``mesh``: one worker per device of a ``("workers",)`` mesh, ``jax.shard_map`` through
  ``sf_optax.local.make_local_train_step``. It needs ``workers`` devices: on the CPU
  ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` before jax is imported
  (``bench.local.cli`` sets it). On an overloaded 2-core machine XLA's CPU collectives can
  abort: a device thread that has not reached an all-reduce within 40 s ends the process
  (seen on the char LM while other jobs held the cores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sf_optax
import sf_optax.local
import sf_optax.schedules
import sf_schedules
from bench.local import rows
from bench.local.rows import Settings

BACKENDS = ("vmap", "mesh")


def _mlp(params, x):
    h = jax.nn.relu(x @ params["hidden.kernel"] + params["hidden.bias"])
    return h @ params["out.kernel"] + params["out.bias"]


@functools.cache
def model(s: Settings):
    """``forward(params, inputs) -> logits`` of the task's model: the MLP written out for
    digits, parity's flax LM twin (rebuilt around the params dict) for charlm."""
    if s.task == "digits":
        return _mlp
    from flax import nnx

    from parity.models import flax_models

    lm = rows.lm_sizes(s)
    shapes = nnx.eval_shape(lambda: flax_models.LM(jnp.float32, nnx.Rngs(0), lm))
    graph, _, rest = flax_models.split(shapes)

    def forward(params, x):
        return flax_models.merge(graph, params, rest)(x)

    return forward


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss(s: Settings):
    """``loss(params, (inputs, labels))``: the mean cross-entropy of one worker's batch."""
    forward = model(s)

    def loss_fn(params, batch):
        x, y = batch
        return _cross_entropy(forward(params, x), y)

    return loss_fn


def make_tx(s: Settings, optimizer: str) -> optax.GradientTransformation:
    """optax.adamw on warmup + cosine (``"adamw"``), or sf_optax.adamw (``"sf"``)."""
    if optimizer == "adamw":
        sched = sf_schedules.cosine(s.lr, s.steps, warmup_steps=s.warmup)
        return optax.adamw(sf_optax.schedules.to_optax(sched), weight_decay=s.weight_decay)
    return sf_optax.adamw(s.sf_lr, b1=s.b1, weight_decay=s.weight_decay, warmup_steps=s.warmup)


def mesh_for(s: Settings) -> Mesh:
    if jax.device_count() < s.workers:
        raise RuntimeError(
            f"{s.workers} workers need {s.workers} devices, jax has {jax.device_count()}: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={s.workers} before importing jax"
        )
    # A Mesh of Auto axes: jax.make_mesh's Explicit axes (its default in jax 0.10) make the
    # indexing in sf_optax.local.local_eval_params fail on the stacked arrays.
    return Mesh(np.array(jax.devices()[: s.workers]), ("workers",))


def _data_parallel_step(loss_fn, tx, mesh):
    spec = PartitionSpec("workers")

    def one_worker(params, opt_state, batch):
        params, opt_state, batch = jax.tree.map(lambda a: a[0], (params, opt_state, batch))
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grads = jax.lax.pmean(grads, "workers")  # the all-reduce of every step
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return jax.tree.map(lambda a: jnp.asarray(a)[None], (params, opt_state, loss))

    return jax.shard_map(
        one_worker, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec, spec)
    )


def _vmap_step(loss_fn, tx, data_parallel: bool):
    """The workers as a ``jax.vmap`` over a named axis on one device: the same arithmetic as
    the mesh, with the gradient ``pmean`` (data-parallel) or ``sf_optax.local.average`` (the
    function the mesh step calls at a sync) over the vmapped axis."""

    def one_worker(params, opt_state, batch, sync):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        if data_parallel:
            grads = jax.lax.pmean(grads, "workers")
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if not data_parallel:
            params, opt_state = jax.lax.cond(
                sync,
                lambda p, st: sf_optax.local.average(p, st, "workers"),
                lambda p, st: (p, st),
                params,
                opt_state,
            )
        return params, opt_state, loss

    return jax.vmap(one_worker, in_axes=(0, 0, 0, None), axis_name="workers")


@functools.cache
def _runner(s: Settings, optimizer: str, data_parallel: bool, backend: str):
    """``(tx, mesh, run)``; ``run(params, state, batches, mask) -> (params, state, losses)``
    compiled once per settings, optimizer, kind and backend."""
    tx = make_tx(s, optimizer)
    mesh = mesh_for(s) if backend == "mesh" else None
    loss_fn = make_loss(s)
    if backend == "vmap":
        step = _vmap_step(loss_fn, tx, data_parallel)
    elif data_parallel:
        dp = _data_parallel_step(loss_fn, tx, mesh)

        def step(p, st, b, sync):
            return dp(p, st, b)
    else:
        step = sf_optax.local.make_local_train_step(loss_fn, tx, mesh).jitted

    @jax.jit
    def scan_run(params, opt_state, batches, mask):
        def body(carry, inputs):
            p, st = carry
            b, sync = inputs
            p, st, loss = step(p, st, b, sync)
            return (p, st), loss

        (p, st), losses = jax.lax.scan(body, (params, opt_state), (batches, mask))
        return p, st, losses

    return tx, mesh, scan_run


@functools.cache
def _evaluator(s: Settings):
    forward = model(s)

    @jax.jit
    def evaluate(params, x, y):
        logits = forward(params, x)
        return _cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

    return evaluate


def run(
    s: Settings,
    optimizer: str,
    data_parallel: bool,
    mask: np.ndarray,
    params0: dict,
    batches: tuple[np.ndarray, np.ndarray],
    eval_set: tuple[np.ndarray, np.ndarray],
    backend: str = "vmap",
) -> dict:
    """One run from ``params0`` over ``batches`` (``(steps, workers, batch, ...)``), syncing
    after step ``t`` where ``mask[t]`` (ignored for data-parallel). Returns the final eval loss
    and accuracy, the mean training loss of the last tenth of the steps (over workers), the
    largest difference between two workers' params at the end, and the evaluated weights."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    tx, mesh, compiled = _runner(s, optimizer, data_parallel, backend)
    if mesh is None:
        state0 = tx.init(params0)
        params, state = jax.tree.map(
            lambda a: jnp.broadcast_to(jnp.asarray(a)[None], (s.workers, *jnp.shape(a))),
            (params0, state0),
        )
        batches = tuple(jnp.asarray(b) for b in batches)
    else:
        params, state = sf_optax.local.local_init(tx, params0, mesh)
        spec = NamedSharding(mesh, PartitionSpec(None, "workers"))
        batches = jax.device_put(tuple(jnp.asarray(b) for b in batches), spec)
    params, state, losses = compiled(params, state, batches, jnp.asarray(mask, bool))
    if optimizer == "sf":
        final = sf_optax.local.local_eval_params(params, state)
    else:
        final = jax.tree.map(lambda a: jnp.mean(a, axis=0), params)
    loss, acc = _evaluator(s)(final, *map(jnp.asarray, eval_set))
    losses = np.asarray(losses)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "eval_loss": float(loss),
        "eval_accuracy": float(acc),
        "train_loss_tail": float(tail.mean()),
        "worker_spread": max(
            float(np.ptp(np.asarray(a), axis=0).max()) for a in jax.tree.leaves(params)
        ),
        "weights": {k: np.asarray(v) for k, v in final.items()},
    }
