"""Schedule-Free with Flax: evaluate at x, BatchNorm statistics at x, TrainState, checkpoints.

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

Both: ``sf_optax.save_checkpoint(directory, state_or_model_and_optimizer, view="train"|"eval")``
and ``sf_optax.restore_checkpoint(...)`` (Orbax), onto any mesh.

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
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

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
                sums = [
                    tuple(s.astype(jnp.promote_types(s.dtype, jnp.float32)) for s in pair)
                    for pair in stats
                ]
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
    :func:`restore_checkpoint`.
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


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints

_VIEWS = ("train", "eval")
_FORMAT = "sf_optax-checkpoint-1"


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _is_key_array(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _nest(pairs: Iterable[tuple[tuple, Any]]) -> dict:
    """A nested dict of strings from (key path, leaf) pairs: what Orbax writes best."""
    out: dict = {}
    for path, leaf in pairs:
        names = [_key_name(entry) for entry in path] or ["value"]
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def _lookup(nested: dict, path: tuple) -> Any:
    node = nested
    for name in [_key_name(entry) for entry in path] or ["value"]:
        node = node[name]
    return node


def _savable(leaf: Any) -> Any:
    if _is_key_array(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array):
        return leaf
    return np.asarray(leaf)


def _restore_target(leaf: Any) -> Any:
    """What Orbax restores into: shape, dtype and sharding; numpy for host values."""
    if _is_key_array(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_sharding_of(leaf))
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_of(leaf))
    return np.asarray(leaf)


def _sharding_of(leaf: Any) -> jax.sharding.Sharding:
    sharding = getattr(leaf, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _restored_leaf(target: Any, value: Any) -> Any:
    if _is_key_array(target):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(target))
    if isinstance(target, (bool, int, float)):
        return type(target)(np.asarray(value))
    return value


def _check_view(view: str) -> None:
    if view not in _VIEWS:
        raise ValueError(
            f"view must be 'train' (params at y) or 'eval' (params at x), got {view!r}"
        )


def _nnx_target(target: Any) -> tuple[nnx.Module, nnx.Optimizer] | None:
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], nnx.Optimizer):
        return target
    return None


def _describe(target: Any) -> str:
    return (
        "a flax TrainState or a (model, optimizer) pair of flax.nnx objects, got "
        f"{type(target).__name__}"
    )


def _checkpoint_manager(directory: Any, max_to_keep: int | None = None):
    try:
        import orbax.checkpoint as ocp  # an optional dependency: needed only for checkpoints
    except ImportError as error:
        raise ImportError(
            "sf_optax checkpoints are written with Orbax: pip install orbax-checkpoint"
        ) from error

    if isinstance(directory, (str, os.PathLike)) and "://" not in os.fspath(directory):
        directory = os.path.abspath(directory)  # Orbax wants absolute local paths
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp, ocp.CheckpointManager(directory, options=options)


def save_checkpoint(
    directory: Any,
    target: Any,
    *,
    view: str = "train",
    max_to_keep: int | None = None,
) -> int:
    """Saves a schedule-free training state with Orbax, labelled by its step; returns the step.

    What is written: the model's parameters in the chosen view, the whole optimizer state
    (``z``, ``v``, the scalars ``k``, ``weight_sum``, ``lr_max``), the step, and everything else
    the state holds (BatchNorm training statistics, RNG state, other TrainState fields). Arrays
    are written shard by shard from wherever they live; :func:`restore_checkpoint` can put them
    on another mesh. The call returns when the checkpoint is complete on disk. With several
    processes every process calls it.

    Args:
      directory: the checkpoint root (one subfolder per step, managed by Orbax).
      target: a ``flax.training.train_state.TrainState`` (e.g. :class:`ScheduleFreeTrainState`)
        or a ``(model, optimizer)`` pair of a ``flax.nnx.Module`` and its ``nnx.Optimizer``.
      view: ``"train"`` stores the parameters at ``y`` (resuming continues bit for bit);
        ``"eval"`` stores them at ``x``, so that the checkpoint's parameters are the ones to
        evaluate or ship. Resuming from an eval view recomputes ``y = b1 x + (1 - b1) z``, equal
        to the saved ``y`` up to float rounding of the two conversions (BatchNorm statistics
        are the training ones in both views).
      max_to_keep: keep only this many newest checkpoints in ``directory`` (None: all).

    Returns:
      The step the checkpoint is labelled with (``state.step``, ``optimizer.step``).
    """
    _check_view(view)
    pair = _nnx_target(target)
    if pair is not None:
        model, optimizer = pair
        step = int(np.asarray(optimizer.step[...]))
        swap = at_x(model, optimizer, eval_mode=False) if view == "eval" else None
        with swap or contextlib.nullcontext():
            tree = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            pairs = jax.tree_util.tree_flatten_with_path(tree)[0]  # the arrays, taken now
        kind = "nnx"
    elif isinstance(target, train_state.TrainState):
        step = int(np.asarray(target.step))
        if view == "eval":
            target = target.replace(params=_train_state_eval_params(target))
        pairs = jax.tree_util.tree_flatten_with_path(target)[0]
        kind = "train_state"
    else:
        raise TypeError(f"save_checkpoint: target must be {_describe(target)}")

    state = _nest((path, _savable(leaf)) for path, leaf in pairs)
    meta = {"format": _FORMAT, "view": view, "kind": kind, "step": step}
    ocp, manager = _checkpoint_manager(directory, max_to_keep)
    with manager:
        saved = manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()
    if not saved:  # Orbax skips a step it already holds, silently
        raise ValueError(
            f"{directory} already holds a checkpoint at step {step} (or a later one), so nothing "
            "was saved: save each view into its own directory, or remove the old checkpoint"
        )
    return step


def restore_checkpoint(directory: Any, target: Any, *, step: int | None = None) -> Any:
    """Restores what :func:`save_checkpoint` wrote, onto the target's shardings.

    The target gives the structure, the dtypes and where every array goes: arrays are read
    straight into the target's shardings, which may be on a different mesh (another shape,
    another number of devices) than the one that saved. Parameters come back at ``y`` whatever
    view was saved.

    Args:
      directory: the checkpoint root given to :func:`save_checkpoint`.
      target: a ``TrainState`` of the same structure, whose leaves are arrays or
        ``jax.ShapeDtypeStruct``s with a ``sharding`` (e.g. ``jax.eval_shape`` of the creation
        combined with :func:`train_state_shardings` on the new mesh); or a ``(model,
        optimizer)`` pair, restored in place onto the shardings its arrays have now.
      step: the step to restore; None for the newest.

    Returns:
      A new ``TrainState``, or the same ``(model, optimizer)`` pair, now restored.
    """
    pair = _nnx_target(target)
    if pair is not None:
        model, optimizer = pair
        tree = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        kind = "nnx"
    elif isinstance(target, train_state.TrainState):
        tree = target
        kind = "train_state"
    else:
        raise TypeError(f"restore_checkpoint: target must be {_describe(target)}")

    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    abstract = _nest((path, _restore_target(leaf)) for path, leaf in pairs)
    ocp, manager = _checkpoint_manager(directory)
    with manager:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no checkpoint in {directory}: save one with sf_optax.save_checkpoint first"
                )
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("kind") != kind:
            raise ValueError(
                f"the checkpoint at step {step} in {directory} holds a {meta.get('kind')!r} "
                f"state but the target is a {kind!r} one: restore into the kind that was saved"
            )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
        )["state"]
    leaves = [_restored_leaf(leaf, _lookup(restored, path)) for path, leaf in pairs]
    tree = jax.tree.unflatten(treedef, leaves)

    if kind == "nnx":
        nnx.update(model, tree["model"])
        nnx.update(optimizer, tree["optimizer"])
        if meta["view"] == "eval":
            wrt, graph = _optimizer_filter(optimizer)
            nnx.update(model, train_params(optimizer, nnx.state(model, wrt, graph=graph)))
        return target
    if meta["view"] == "eval":
        tree = tree.replace(params=_train_state_train_params(tree, tree.params))
    return tree
