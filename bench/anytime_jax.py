"""The anytime benchmark's JAX side: the models and the training loop.

Both models are parity's flax twins (``parity.models.flax_models``): the digits CNN, and the
LM with its sizes taken from the problem. Parameters are a ``{canonical name: array}`` dict;
the model is rebuilt around them inside each jitted function.

One :class:`Trainer` per problem compiles the gradient and the evaluation once, and one
optimizer update per optimizer (Schedule-Free per ``b1``, AdamW) for all runs of the sweep:
``sf_optax.adamw`` for
Schedule-Free (evaluated at ``x = sf_optax.eval_params(state, y)``), ``optax.adamw`` for the
baselines, each inside ``optax.inject_hyperparams`` so that the learning rate is a value of the
state rather than a constant of the compiled code. A baseline's learning rates are its
sf_schedules schedule through ``sf_optax.schedules.to_optax`` (evaluated for every step at
once), handed to the update step by step; the rate each step used is read back from the
state. Before every evaluation of the CNN, BatchNorm statistics are recomputed at the
evaluated weights from fixed training batches (as ``parity.training.jax_loop`` does), for every
method alike.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sf_optax
import sf_optax.schedules
from bench.anytime_problems import Problem
from bench.anytime_runs import RunSpec, run_record
from parity.models import flax_models


def build_model(problem: Problem) -> nnx.Module:
    """The flax model of ``problem`` holding its canonical initial weights (and, for the CNN,
    BatchNorm statistics)."""
    if problem.name == "digits":

        def make():
            return flax_models.CNN(jnp.float32, nnx.Rngs(0))
    else:

        def make():
            return flax_models.LM(jnp.float32, nnx.Rngs(0), problem.lm)

    # Shapes only: flax's own random init would be thrown away (and costs seconds to compile).
    graphdef, state, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    state = flax_models.to_state(state, problem.params0, jnp.float32)
    if problem.buffers0:
        rest = flax_models.to_state(rest, problem.buffers0, jnp.float32)
    return nnx.merge(graphdef, state, rest)


def make_tx(spec: RunSpec) -> optax.GradientTransformation:
    """The optimizer of ``spec`` with its learning rate held in the state, not in the code.

    Schedule-Free AdamW or AdamW, inside ``optax.inject_hyperparams``: the learning rate is
    ``state.hyperparams["learning_rate"]``, so one compiled update serves every run of the
    sweep (each would otherwise compile its own), and the rate each step used can be read back.
    The value given here is a placeholder; :meth:`Trainer.run` sets it before every step.
    """
    common = dict(
        learning_rate=0.0, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay
    )
    if spec.method == "sf":
        return optax.inject_hyperparams(sf_optax.adamw, static_args=("warmup_steps",))(
            warmup_steps=spec.warmup, **common
        )
    return optax.inject_hyperparams(optax.adamw)(**common)


def _with_lr(opt_state, lr):
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


class Trainer:
    """Trains ``problem``'s model with one :class:`RunSpec` at a time, from the same start."""

    framework = "jax"

    def __init__(self, problem: Problem):
        self.problem = problem
        module = build_model(problem)
        graph, self.params0, self.rest0 = flax_models.split(module)
        uses_batch_norm = flax_models.has_batch_norm(module)

        def loss_and_grad(params, rest, all_inputs, all_labels, step):
            inputs, labels = all_inputs[step], all_labels[step]

            def loss_fn(params, rest):
                model = flax_models.merge(graph, params, rest)
                loss = flax_models.loss(model(inputs), labels)
                return loss, nnx.split(model, nnx.Param, ...)[2]

            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
            return loss, grads, new_rest

        def evaluate(params, rest, recal, inputs, labels):
            model = flax_models.merge(graph, params, rest)  # a copy: `rest` is not changed
            if uses_batch_norm:
                flax_models.recalibrate(model, recal)
            logits = model(inputs)
            accuracy = (logits.argmax(-1) == labels).mean()
            return flax_models.loss(logits, labels), accuracy

        self._loss_and_grad = jax.jit(loss_and_grad)
        self._evaluate = jax.jit(evaluate)
        self._eval_params = jax.jit(sf_optax.eval_params)
        self._recal = tuple(jnp.asarray(b) for b in problem.recal_inputs)
        self._eval_inputs = jnp.asarray(problem.eval_inputs)
        self._eval_labels = jnp.asarray(problem.eval_labels)
        self._train_inputs, self._train_labels = map(jnp.asarray, problem.all_train_batches())
        self._optimizers = {}

    def _optimizer(self, spec: RunSpec):
        """``(tx, jitted update)``, built once per distinct optimizer apart from the lr."""
        key = (spec.method == "sf", spec.warmup, spec.b1, spec.b2, spec.eps, spec.weight_decay)
        if key not in self._optimizers:
            tx = make_tx(spec)

            @jax.jit
            def update(grads, opt_state, params, lr):
                updates, opt_state = tx.update(grads, _with_lr(opt_state, lr), params)
                return optax.apply_updates(params, updates), opt_state

            self._optimizers[key] = tx, update
        return self._optimizers[key]

    def run(self, spec: RunSpec) -> dict:
        """Train ``spec.horizon`` steps; eval loss (and accuracy) at ``spec.eval_steps``, and
        for the baselines the learning rate of every step as the optimizer state recorded it.

        Schedule-Free runs at the constant ``spec.lr`` (its warmup is its own); a baseline's
        rate at step ``k`` is ``sf_optax.schedules.to_optax(spec.schedule)(k)``.
        """
        # Full float32 matmuls, as the torch side computes them (GPUs would default to TF32).
        with jax.default_matmul_precision("highest"):
            return self._run(spec)

    def _run(self, spec: RunSpec) -> dict:
        tx, update = self._optimizer(spec)
        if spec.method == "sf":
            lrs = np.full(spec.horizon, spec.lr, np.float32)
        else:
            schedule = sf_optax.schedules.to_optax(spec.schedule)
            lrs = np.asarray(jax.vmap(schedule)(jnp.arange(spec.horizon)), np.float32)
        params, rest = self.params0, self.rest0
        opt_state = tx.init(params)
        evals = set(spec.eval_steps)
        losses, accs, used = [], [], []

        def observe():
            x = params if spec.method != "sf" else self._eval_params(opt_state, params)
            loss, acc = self._evaluate(x, rest, self._recal, self._eval_inputs, self._eval_labels)
            losses.append(float(loss))
            accs.append(float(acc))

        start = time.perf_counter()
        if 0 in evals:
            observe()
        for step in range(spec.horizon):
            _, grads, rest = self._loss_and_grad(
                params, rest, self._train_inputs, self._train_labels, step
            )
            params, opt_state = update(grads, opt_state, params, lrs[step])
            if spec.method != "sf":
                used.append(opt_state.hyperparams["learning_rate"])  # fetched once, at the end
            if step + 1 in evals:
                observe()
        seconds = time.perf_counter() - start
        lrs_used = [float(v) for v in jax.device_get(used)] if used else None
        accs = accs if self.problem.has_accuracy else None
        return run_record(spec, losses, accs, lrs_used, seconds)


def backend() -> str:
    """Where JAX computes, for the report."""
    return f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0]})"
