"""The anytime study's JAX side: the models and the training loop.

Models: parity's flax twins (``parity.models.flax_models``) for digits (the CNN) and charlm (the
LM with the problem's sizes), and :class:`Linear` for convex. Parameters are a ``{canonical
name: array}`` dict; the model is rebuilt around them inside each jitted function. A float64
problem runs under ``jax.enable_x64``, inside the trainer only: the caller's process keeps its
float32 default.

One :class:`Trainer` per problem compiles the gradient and the evaluation once, and one
optimizer update per optimizer (:func:`make_tx`) for all runs of the sweep: ``sf_optax.adamw`` /
``sgd`` for Schedule-Free (evaluated at ``x = sf_optax.eval_params(state, y)``), ``optax.adamw``
/ ``sgd`` for the baselines and ``sf_optax.adamc_plus`` (given the batch loss) for SF+, whose
learning rates are their sf_schedules schedule through ``sf_optax.schedules.to_optax``.
Before every evaluation of the CNN, BatchNorm statistics are recomputed at the evaluated
weights from fixed training batches (as ``parity.training.jax_loop`` does), for every method.
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
from bench.anytime.problems import Problem
from bench.anytime.runs import PLUS, RunSpec, run_record
from parity.models import flax_models


class Linear(nnx.Module):
    """Logits ``inputs @ W`` (convex: the bias is a constant input feature)."""

    def __init__(self, w: jax.Array):
        self.w = nnx.Param(w)

    def __call__(self, x):
        return x @ self.w[...]


def build_model(problem: Problem) -> nnx.Module:
    """The flax model of ``problem`` holding its canonical initial weights (and, for the CNN,
    BatchNorm statistics)."""
    if problem.name == "convex":
        return Linear(jnp.asarray(problem.params0["w"]))
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

    Inside ``optax.inject_hyperparams`` the learning rate is
    ``state.hyperparams["learning_rate"]``, so one compiled update serves every run of the
    sweep (each would otherwise compile its own), and the rate each step used can be read back.
    The value given here is a placeholder; :meth:`Trainer.run` sets it before every step.
    """
    wd = spec.weight_decay
    if spec.optimizer == "sgd":
        if spec.method != "sf":
            return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
        sf_sgd = optax.inject_hyperparams(sf_optax.sgd, static_args=("warmup_steps",))
        return sf_sgd(learning_rate=0.0, b1=spec.b1, weight_decay=wd, warmup_steps=spec.warmup)
    adam = dict(learning_rate=0.0, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=wd)
    if spec.method == PLUS:
        plus = optax.inject_hyperparams(sf_optax.adamc_plus, static_args=("c_warmup",))
        return plus(c_warmup=spec.warmup, **adam)
    if spec.method != "sf":
        return optax.inject_hyperparams(optax.adamw)(**adam)
    static = ("warmup_steps", "inner_momentum")  # inner_momentum decides the state's layout
    sf_adamw = optax.inject_hyperparams(sf_optax.adamw, static_args=static)
    return sf_adamw(warmup_steps=spec.warmup, inner_momentum=spec.inner_momentum, **adam)


def _with_lr(opt_state, lr):
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def _flat(params: dict) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in params.values()])


class Trainer:
    """Trains ``problem``'s model with one :class:`RunSpec` at a time, from the same start."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self._x64 = problem.dtype == np.float64
        with jax.enable_x64(self._x64):
            self._build(problem)

    def _build(self, problem: Problem) -> None:
        module = build_model(problem)
        graph, self.params0, self.rest0 = flax_models.split(module)
        uses_batch_norm = flax_models.has_batch_norm(module)

        def loss_and_grad(params, rest, all_inputs, all_labels, step):
            inputs, labels = all_inputs[step], all_labels[step]

            def loss_fn(params, rest):
                model = flax_models.merge(graph, params, rest)
                loss = flax_models.loss(model(inputs), labels)
                if problem.l2:
                    loss = loss + 0.5 * problem.l2 * sum(jnp.sum(p * p) for p in params.values())
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
        self._norms = jax.jit(lambda *trees: [optax.tree.norm(t) for t in trees])
        self._recal = tuple(jnp.asarray(b) for b in problem.recal_inputs)
        self._eval_inputs = jnp.asarray(problem.eval_inputs)
        self._eval_labels = jnp.asarray(problem.eval_labels)
        self._train_inputs, self._train_labels = map(jnp.asarray, problem.all_train_batches())
        self._optimizers = {}

    def _optimizer(self, spec: RunSpec):
        """``(tx, jitted update)``, built once per distinct optimizer apart from the lr."""
        key = (spec.optimizer, spec.method, spec.warmup, spec.b1, spec.b2, spec.eps)
        key += (spec.weight_decay, spec.inner_momentum)
        if key not in self._optimizers:
            tx = make_tx(spec)
            extra = spec.method == PLUS  # SF+'s Polyak step needs the loss at y

            @jax.jit
            def update(grads, opt_state, params, lr, loss):
                kw = dict(value=loss) if extra else {}
                updates, opt_state = tx.update(grads, _with_lr(opt_state, lr), params, **kw)
                return optax.apply_updates(params, updates), opt_state

            self._optimizers[key] = tx, update
        return self._optimizers[key]

    def run(self, spec: RunSpec) -> dict:
        """Train ``spec.horizon`` steps; losses (and accuracies) at ``spec.eval_steps``, for
        the baselines the learning rate of every step as the optimizer state recorded it, and
        for a scored problem its ``trajectory``.

        Schedule-Free runs at the constant ``spec.lr`` (its warmup is its own); a baseline's
        rate at step ``k`` is ``sf_optax.schedules.to_optax(spec.schedule)(k)``.
        """
        # Full float32 matmuls, as the torch side computes them (GPUs would default to TF32).
        with jax.default_matmul_precision("highest"), jax.enable_x64(self._x64):
            return self._run(spec)

    def _run(self, spec: RunSpec) -> dict:
        tx, update = self._optimizer(spec)
        dtype, scored = self.problem.dtype, self.problem.score is not None
        sf = spec.method in ("sf", PLUS)
        if spec.method == "sf":
            lrs = np.full(spec.horizon, spec.lr, dtype)
        else:
            schedule = sf_optax.schedules.to_optax(spec.schedule)
            lrs = np.asarray(jax.vmap(schedule)(jnp.arange(spec.horizon)), dtype)
        params, rest = self.params0, self.rest0
        opt_state = tx.init(params)
        evals = set(spec.eval_steps)
        losses, accs, used, snaps, norms = [], [], [], [], []

        def observe():
            x = self._eval_params(opt_state, params) if sf else params
            if scored:
                snaps.append(x)
                return
            loss, acc = self._evaluate(x, rest, self._recal, self._eval_inputs, self._eval_labels)
            losses.append(float(loss))
            accs.append(float(acc))

        start = time.perf_counter()
        if 0 in evals:
            observe()
        for step in range(spec.horizon):
            loss, grads, rest = self._loss_and_grad(
                params, rest, self._train_inputs, self._train_labels, step
            )
            if scored:
                norms.append(self._norms(params, grads))
            params, opt_state = update(grads, opt_state, params, lrs[step], loss)
            if spec.method != "sf":
                used.append(opt_state.hyperparams["learning_rate"])  # fetched once, at the end
            if step + 1 in evals:
                observe()
        seconds = time.perf_counter() - start
        lrs_used = [float(v) for v in jax.device_get(used)] if used else None
        trajectory = None
        if scored:
            w_norm, g_norm = np.array(jax.device_get(norms)).T
            trajectory = {
                "snaps": np.stack([_flat(x) for x in jax.device_get(snaps)]),
                "w_norm": np.append(w_norm, jax.device_get(self._norms(params))),
                "g_norm": g_norm,
            }
            losses, accs = self.problem.score(trajectory["snaps"])
        accs = accs if self.problem.has_accuracy else None
        return {**run_record(spec, losses, accs, lrs_used, seconds), "trajectory": trajectory}


def backend() -> str:
    """Where JAX computes, for the report."""
    return f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0]})"
