"""Schedule-Free with Flax: evaluate at x, BatchNorm statistics at x, TrainState, shardings.

The model's parameters hold ``y`` while training; the point to evaluate is
``x = (y - (1 - b1) z) / b1`` (:func:`sf_optax.eval_params`). This module does the bookkeeping
around that for the two ways Flax code holds a training state:

``flax.nnx`` (a model and an ``nnx.Optimizer(model, tx, wrt=...)``)::

    with sf_optax.at_x(model, optimizer):          # x in, eval mode; y back bit for bit after
        loss = evaluate(model, test_batch)
    eval_copy = sf_optax.eval_model(model, optimizer, batches=train_images)  # BatchNorm at x

``flax.training.train_state.TrainState``::

    state = sf_optax.ScheduleFreeTrainState.create(apply_fn=..., params=y, tx=sf_optax.adamw())
    state = state.apply_gradients(grads=grads)      # extra_args={...} reach tx.update
    logits = state.apply_fn(state.eval_params, batch)

Checkpoints of both (Orbax, onto any mesh) are in :mod:`sf_optax.checkpoint`:
``sf_optax.save_checkpoint(directory, state_or_model_and_optimizer, view="train"|"eval")`` and
``sf_optax.restore_checkpoint(...)``.

BatchNorm. Running statistics collected while training were measured at ``y``; a model
evaluated at ``x`` needs statistics measured at ``x``. :func:`recompute_batchnorm_stats` sets
every ``nnx.BatchNorm``'s ``mean`` and ``var`` to the equal-weight average over the given
batches of the per-batch statistics (torch's ``momentum=None``): the mean of the batch means
and the mean of the batch variances. The batch variance is the one ``nnx.BatchNorm`` itself
computes and stores, the biased one (divided by the number of reduced elements, no
``n / (n - 1)`` correction): unlike torch, nnx normalizes and tracks the same variance, so the
recomputed statistics are what a long run of nnx's own running average would converge to.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

from sf_optax._dtypes import compute_dtype
from sf_optax.sharding import state_shardings
from sf_optax.views import eval_params, train_params

# ---------------------------------------------------------------------------------------------
# flax.nnx: the model at x


def _optimizer_filter(optimizer: nnx.Optimizer) -> tuple[Any, Any]:
    """The ``wrt`` filter and graph mode the optimizer state was built with."""
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"expected a flax.nnx.Optimizer built around an sf_optax transformation, got "
            f"{type(optimizer).__name__}; for optax states use sf_optax.eval_params"
        )
    return optimizer.wrt, getattr(optimizer, "graph", None)


def _params_at_x(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.State:
    wrt, graph = _optimizer_filter(optimizer)
    return eval_params(optimizer, nnx.state(model, wrt, graph=graph))


def _mode_attributes(model: nnx.Module) -> list[tuple[nnx.Module, str, Any]]:
    """Every ``deterministic``/``use_running_average`` attribute, to put back later."""
    return [
        (module, name, getattr(module, name))
        for _, module in nnx.iter_modules(model)
        for name in ("deterministic", "use_running_average")
        if hasattr(module, name)
    ]


@contextlib.contextmanager
def at_x(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    batches: Iterable[Any] | None = None,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    eval_mode: bool = True,
) -> Iterator[nnx.Module]:
    """Within the block ``model`` holds ``x``; on exit it holds exactly what it held before.

    The parameters the optimizer trains (its ``wrt``) are replaced by
    ``x = (y - (1 - b1) z) / b1``. On exit every array of the model (``y``, BatchNorm
    statistics, RNG state) is put back as the very arrays it held on entry, so training goes on
    bit for bit as if nothing happened, whatever the block did to the model. Do not step the
    optimizer inside the block.

    Args:
      model: the ``nnx.Module`` being trained (holding ``y``).
      optimizer: its ``nnx.Optimizer``, built around an sf_optax transformation.
      batches: if given, BatchNorm statistics are recomputed at ``x`` from these batches
        (:func:`recompute_batchnorm_stats`); else the training statistics (measured at ``y``)
        are used.
      forward: ``forward(model, batch)`` for the recomputation; default ``model(batch)``.
      eval_mode: within the block, switch the model to evaluation mode (``model.eval()``:
        BatchNorm uses its running statistics, Dropout is off); the previous modes return on
        exit.

    Yields:
      ``model`` itself.
    """
    x = _params_at_x(model, optimizer)
    saved = jax.tree.leaves(nnx.state(model))  # the arrays themselves: immutable, kept as is
    saved_def = jax.tree.structure(nnx.state(model))
    modes = _mode_attributes(model)
    try:
        nnx.update(model, x)
        if batches is not None:
            recompute_batchnorm_stats(model, batches, forward)
        if eval_mode:
            model.eval()
        yield model
    finally:
        for module, name, value in modes:
            setattr(module, name, value)
        nnx.update(model, jax.tree.unflatten(saved_def, saved))


def eval_model(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    batches: Iterable[Any] | None = None,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
) -> nnx.Module:
    """A new model holding ``x``, in evaluation mode; ``model`` itself is not touched.

    Args:
      model: the ``nnx.Module`` being trained (holding ``y``).
      optimizer: its ``nnx.Optimizer``, built around an sf_optax transformation.
      batches: if given, the copy's BatchNorm statistics are recomputed at ``x`` from these
        batches (:func:`recompute_batchnorm_stats`); else the copy keeps the training ones.
      forward: ``forward(model, batch)`` for the recomputation; default ``model(batch)``.

    Returns:
      A copy of ``model`` (same graph, new variables) with ``x`` in place of the trained
      parameters, switched to ``.eval()`` (BatchNorm uses running statistics, Dropout is off).
    """
    x = _params_at_x(model, optimizer)
    copy = nnx.clone(model)
    nnx.update(copy, x)
    if batches is not None:
        recompute_batchnorm_stats(copy, batches, forward)
    copy.eval()
    return copy


def _default_forward(model: nnx.Module, batch: Any) -> Any:
    return model(batch)


@nnx.jit(static_argnums=(2,))
def _batch_statistics(model: nnx.Module, batch: Any, forward: Callable) -> list:
    # Every BatchNorm runs with momentum 0, so after the forward pass its running statistics
    # are exactly this batch's statistics (0 * old + 1 * new).
    forward(model, batch)
    return [(m.mean[...], m.var[...]) for m in _batchnorm_layers(model)]


def _batchnorm_layers(model: nnx.Module) -> list[nnx.BatchNorm]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def recompute_batchnorm_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    forward: Callable[[nnx.Module, Any], Any] | None = None,
) -> int:
    """Sets every ``nnx.BatchNorm``'s statistics to their average over ``batches`` at the
    weights the model holds now (``x`` inside :func:`at_x` or on :func:`eval_model`'s copy).

    ``mean`` becomes the mean over batches of the batch means and ``var`` the mean over batches
    of the (biased, as nnx computes them) batch variances: every batch weighs the same, as with
    torch's ``momentum=None``. No weight is written; each layer's ``momentum`` and
    ``use_running_average`` are as before when this returns. On error the statistics are put
    back too.

    Args:
      model: an ``nnx.Module``; changed in place (only BatchNorm ``mean``/``var``).
      batches: inputs, each handed to ``forward``; at least one.
      forward: ``forward(model, batch)``, which must run the BatchNorm layers on batch
        statistics (the default ``model(batch)`` does: ``use_running_average`` is switched off
        for the pass); other layers run as the model has them (a Dropout in training mode
        stays on, as in torch's recomputation). It is compiled once per function object: pass
        one defined once, not a new lambda each call.

    Returns:
      The number of batches used.
    """
    layers = _batchnorm_layers(model)
    if not layers:
        return sum(1 for _ in batches)
    saved = [(m.mean[...], m.var[...], m.momentum, m.use_running_average) for m in layers]
    forward = _default_forward if forward is None else forward
    sums = None
    count = 0
    done = False
    try:
        for m in layers:
            m.momentum = 0.0
            m.use_running_average = False
            # 0 * NaN is NaN: start from finite values, whatever training left there.
            m.mean[...] = jnp.zeros_like(m.mean[...])
            m.var[...] = jnp.ones_like(m.var[...])
        for batch in batches:
            stats = _batch_statistics(model, batch, forward)
            if sums is None:
                sums = [tuple(s.astype(compute_dtype(s.dtype)) for s in pair) for pair in stats]
            else:
                sums = [(a + m, b + v) for (a, b), (m, v) in zip(sums, stats)]
            count += 1
        if count == 0:
            raise ValueError("batches: need at least one batch to recompute BatchNorm statistics")
        for m, (mean_sum, var_sum) in zip(layers, sums):
            m.mean[...] = (mean_sum / count).astype(m.mean[...].dtype)
            m.var[...] = (var_sum / count).astype(m.var[...].dtype)
        done = True
    finally:
        for m, (mean, var, momentum, use_running_average) in zip(layers, saved):
            m.momentum = momentum
            m.use_running_average = use_running_average
            if not done:
                m.mean[...] = mean
                m.var[...] = var
    return count


# ---------------------------------------------------------------------------------------------
# flax.training.train_state.TrainState


def _train_state_eval_params(state: train_state.TrainState) -> Any:
    # fp8 training keeps "overwrite with gradient" values beside the params under
    # OVERWRITE_WITH_GRADIENT; TrainState then optimizes ``params["params"]`` only, as do these.
    params = state.params
    if isinstance(params, Mapping) and OVERWRITE_WITH_GRADIENT in params:
        return {**params, "params": eval_params(state.opt_state, params["params"])}
    return eval_params(state.opt_state, params)


def _train_state_train_params(state: train_state.TrainState, params_x: Any) -> Any:
    if isinstance(params_x, Mapping) and OVERWRITE_WITH_GRADIENT in params_x:
        return {**params_x, "params": train_params(state.opt_state, params_x["params"])}
    return train_params(state.opt_state, params_x)


class ScheduleFreeTrainState(train_state.TrainState):
    """A ``TrainState`` for sf_optax: ``params`` hold ``y``; ``eval_params`` gives ``x``.

    Create it as any ``TrainState``
    (``ScheduleFreeTrainState.create(apply_fn=..., params=..., tx=sf_optax.adamw(...))``);
    evaluate with ``state.apply_fn(state.eval_params, ...)``.
    """

    @property
    def eval_params(self) -> Any:
        """``x = (y - (1 - b1) z) / b1`` for the ``y`` in ``params`` (each leaf keeps its dtype)."""
        return _train_state_eval_params(self)

    def apply_gradients(self, *, grads, extra_args: dict | None = None, **kwargs):
        """One optimizer step: ``tx.update(grads, opt_state, params, **extra_args)``.

        Args:
          grads: gradients at ``params`` (``y``), shaped like ``params``.
          extra_args: keyword arguments for the update of a
            ``GradientTransformationExtraArgs`` (every sf_optax transformation is one), e.g.
            what a chained transformation needs beside the gradients.
          **kwargs: other fields to ``.replace()``, as in ``TrainState.apply_gradients``.

        Returns:
          The state with ``step + 1`` and the new ``params`` and ``opt_state``.
        """
        extra_args = {} if extra_args is None else dict(extra_args)
        overwrite = isinstance(grads, Mapping) and OVERWRITE_WITH_GRADIENT in grads
        grads_opt = grads["params"] if overwrite else grads
        params_opt = self.params["params"] if overwrite else self.params
        updates, new_opt_state = self.tx.update(grads_opt, self.opt_state, params_opt, **extra_args)
        new_params = optax.apply_updates(params_opt, updates)
        if overwrite:
            new_params = {
                "params": new_params,
                OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT],
            }
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
        )


def train_state_shardings(state: train_state.TrainState, param_shardings: Any):
    """The ``NamedSharding``s of a whole ``TrainState`` from those of its params.

    ``params`` take ``param_shardings``; the optimizer state follows
    :func:`sf_optax.state_shardings` (``z``, ``v`` like their parameter, scalars replicated);
    ``step`` and every other field are replicated. ``state`` may hold arrays or
    ``jax.ShapeDtypeStruct``s (``jax.eval_shape`` of the creation). Use the result as
    ``in_shardings``/``out_shardings`` of a jitted step and as the target of
    :func:`sf_optax.restore_checkpoint`.
    """
    opt_shardings = state_shardings(state.tx, state.params, param_shardings)
    mesh = next(s.mesh for s in jax.tree.leaves(param_shardings) if isinstance(s, NamedSharding))
    replicated = NamedSharding(mesh, PartitionSpec())
    fields = {
        f.name: jax.tree.map(lambda _: replicated, getattr(state, f.name))
        for f in dataclasses.fields(state)
        if f.metadata.get("pytree_node", True) and f.name not in ("params", "opt_state")
    }
    return state.replace(params=param_shardings, opt_state=opt_shardings, **fields)
