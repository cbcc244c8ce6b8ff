"""Orbax checkpoints of a schedule-free training state, in the train (``y``) or eval (``x``) view.

    sf_optax.save_checkpoint(directory, state, view="eval")     # a TrainState
    sf_optax.save_checkpoint(directory, (model, optimizer))     # flax.nnx
    sf_optax.save_checkpoint(directory, (params, opt_state))    # plain optax
    state = sf_optax.restore_checkpoint(directory, target)      # onto the target's shardings

The targets: those of :mod:`sf_optax.flax`, a ``flax.training.train_state.TrainState`` (e.g.
:class:`sf_optax.ScheduleFreeTrainState`) or a ``(model, optimizer)`` pair of flax.nnx objects;
and what a plain optax loop holds, a ``(params, opt_state)`` tuple or a ``{"params": ...,
"opt_state": ...}`` dict. Orbax is imported on the first save or restore, so the module needs
it only then.

Format (``sf_optax-checkpoint-1``): one Orbax step folder per checkpoint, holding ``state``
(the target's arrays in a nested dict keyed by strings, PRNG keys as their key data) and ``meta``
(JSON: format, view, kind of target, step).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.training import train_state

from sf_optax.flax import (
    _optimizer_filter,
    _train_state_eval_params,
    _train_state_train_params,
    at_x,
)
from sf_optax.views import eval_params, find_state, train_params
from sf_schedules.validation import check_choice

_VIEWS = ("train", "eval")  # the params at y, or at x
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


def _nnx_target(target: Any) -> tuple[nnx.Module, nnx.Optimizer] | None:
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], nnx.Optimizer):
        return target
    return None


_OPTAX_KEYS = ("params", "opt_state")


def _optax_target(target: Any) -> tuple[Any, Any] | None:
    """``(params, opt_state)`` of a plain-optax target: a tuple of the two, or a dict with
    exactly the keys ``"params"`` and ``"opt_state"``; None for anything else."""
    if type(target) is tuple and len(target) == 2:
        return target
    if isinstance(target, dict) and sorted(target) == sorted(_OPTAX_KEYS):
        return target["params"], target["opt_state"]
    return None


def _check_optax_state(opt_state: Any, what: str) -> None:
    try:
        find_state(opt_state)
    except ValueError as error:
        raise TypeError(
            f"{what}: a (params, opt_state) target needs the state of an sf_optax optimizer as "
            f"opt_state: {error}"
        ) from None


def _describe(target: Any) -> str:
    return (
        "a flax TrainState or a (model, optimizer) pair of flax.nnx objects, or what a plain "
        "optax loop holds: a (params, opt_state) tuple or a {'params': ..., 'opt_state': ...} "
        f"dict; got {type(target).__name__}"
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
        or a ``(model, optimizer)`` pair of a ``flax.nnx.Module`` and its ``nnx.Optimizer``; or,
        from a plain optax loop, a ``(params, opt_state)`` tuple or a ``{"params": ...,
        "opt_state": ...}`` dict, where ``opt_state`` holds an sf_optax optimizer's state
        (through any optax wrapper) and ``params`` are ``y``.
      view: ``"train"`` stores the parameters at ``y`` (resuming continues bit for bit);
        ``"eval"`` stores them at ``x``, so that the checkpoint's parameters are the ones to
        evaluate or ship. Resuming from an eval view recomputes ``y = b1 x + (1 - b1) z``, equal
        to the saved ``y`` up to float rounding of the two conversions (BatchNorm statistics
        are the training ones in both views).
      max_to_keep: keep only this many newest checkpoints in ``directory`` (None: all).

    Returns:
      The step the checkpoint is labelled with (``state.step``, ``optimizer.step``; for a
      ``(params, opt_state)`` target the schedule-free step count ``k`` of the state, which
      steps skipped by ``optax.apply_if_finite`` or accumulated by ``optax.MultiSteps`` do not
      advance).
    """
    check_choice("view", view, _VIEWS)
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
    elif (optax_pair := _optax_target(target)) is not None:
        params, opt_state = optax_pair
        _check_optax_state(opt_state, "save_checkpoint")
        step = int(np.asarray(find_state(opt_state).count))
        if view == "eval":
            params = eval_params(opt_state, params)
        tree = {"params": params, "opt_state": opt_state}
        pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
        kind = "optax"
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
        optimizer)`` pair, restored in place onto the shardings its arrays have now; or a
        ``(params, opt_state)`` tuple or ``{"params": ..., "opt_state": ...}`` dict (either
        form restores what either saved), whose leaves are arrays or ``ShapeDtypeStruct``s as
        for a ``TrainState`` (e.g. ``opt.init(params)`` and ``params`` themselves, or
        :func:`sf_optax.state_shardings` for the shardings).
      step: the step to restore; None for the newest.

    Returns:
      A new ``TrainState``; the same ``(model, optimizer)`` pair, now restored; a new
      ``(params, opt_state)`` tuple or dict, in the target's form, with ``params`` at ``y``.
    """
    pair = _nnx_target(target)
    if pair is not None:
        model, optimizer = pair
        tree = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        kind = "nnx"
    elif isinstance(target, train_state.TrainState):
        tree = target
        kind = "train_state"
    elif (optax_pair := _optax_target(target)) is not None:
        _check_optax_state(optax_pair[1], "restore_checkpoint")
        tree = dict(zip(_OPTAX_KEYS, optax_pair))
        kind = "optax"
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
    if kind == "optax":
        params, opt_state = tree["params"], tree["opt_state"]
        if meta["view"] == "eval":
            params = train_params(opt_state, params)
        return (
            (params, opt_state)
            if isinstance(target, tuple)
            else dict(zip(_OPTAX_KEYS, (params, opt_state)))
        )
    if meta["view"] == "eval":
        tree = tree.replace(params=_train_state_train_params(tree, tree.params))
    return tree
