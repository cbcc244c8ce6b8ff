"""Local steps: workers along a mesh axis step on their own data and average every few steps.

Each worker holds its own params and optimizer state; the step runs all of them at once under
``jax.shard_map`` over one mesh axis (default ``"workers"``), one worker per index along it (a
worker's params may be sharded further over the mesh's other axes: :func:`local_init`'s
``param_specs``). After a step the workers average (a ``pmean`` over the axis) when that step's
``sync`` flag is set. The flags come from one host-side list for the whole run,
``sf_schedules.sync.sync_mask`` (the same schedule sf_torch's local steps use), and are handed
to the step as an array argument, so that one compiled step serves every period.

What a sync averages (:func:`average`): the params and, inside every sf_optax state in any
nesting, ``z`` (and the stored ``x`` with ``exact_x``). ``x = (y - (1 - b1) z) / b1`` is then
averaged exactly (up to the rounding of the map), being the same linear map of ``y`` and ``z``
on every worker. The second moment ``v`` (and other optax transformations' buffers:
optax.adamw's ``mu`` and ``nu``) stays per worker unless asked for
(``average_second_moment=True``, ``average=("mu", "nu")``), as in sf_torch.local. The counters
(``k``, ``weight_sum``, ``lr_max``) are identical on every worker and never communicated.

    mask = sf_schedules.sync.sync_mask(QSR(h_base=4, alpha=0.01), lrs)     # host, float64
    mesh = jax.make_mesh((n_workers,), ("workers",))
    step = sf_optax.local.make_local_train_step(loss_fn, tx, mesh)
    params, opt_state = sf_optax.local.local_init(tx, params, mesh)          # leading axis: workers
    for t, batch in enumerate(batches):                                     # batch: (workers, ...)
        params, opt_state, losses = step(params, opt_state, batch, mask[t])
    x = sf_optax.local.local_eval_params(params, opt_state)                 # evaluate here

(:func:`run_local` is that loop, taking the sync as flags, sync steps or ``(rule, lrs)``.)

On GPUs: the mesh axis runs over the devices, ``jax.make_mesh((jax.device_count(),),
("workers",))``, one worker per GPU. On several hosts, call ``jax.distributed.initialize()`` on
each process first (before any other JAX call); ``jax.devices()`` then lists every host's GPUs,
the same mesh spans them, and each process feeds the batches of its own devices' workers (e.g.
``jax.make_array_from_process_local_data`` with ``NamedSharding(mesh, P("workers"))``). Only
the syncs cross the network. Workers x model sharding: a mesh such as ``("workers", "model")``
and ``local_init(..., param_specs=...)``; the sync's ``pmean`` then runs between the devices
that hold the same shard.

BatchNorm at the averaged ``x``: :func:`make_local_batch_stats` has every worker re-estimate the
statistics at ``x`` from a few of its own batches (the mean over batches) and averages them over
the workers; :func:`nnx_batchnorm_stats_fn` and :func:`set_nnx_batchnorm_stats` connect it to
``flax.nnx.BatchNorm`` layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sf_optax._dtypes import compute_dtype
from sf_optax.packing import PackedState
from sf_optax.sharding import state_shardings as sf_optax_state_shardings
from sf_optax.transform import ScheduleFreeState
from sf_optax.views import eval_params
from sf_schedules import sync as sync_rules

__all__ = [
    "LocalStep",
    "average",
    "local_eval_params",
    "local_init",
    "make_local_batch_stats",
    "make_local_train_step",
    "nnx_batchnorm_stats_fn",
    "resolve_sync_mask",
    "run_local",
    "set_nnx_batchnorm_stats",
    "stack",
    "worker",
]


# ---------------------------------------------------------------------------------------------
# The average


def _check_axis_bound(axis_name: Any, where: str) -> None:
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{where} must run inside jax.shard_map (or pmap) with the mesh axis "
            f"axis_name={axis_name!r} bound: it averages over that axis; outside, use "
            "make_local_train_step, which runs it there"
        ) from None


def _pmean(tree: Any, axis_name: Any) -> Any:
    """The mean over the axis of every floating leaf, in float32 or wider; dtypes kept."""

    def mean(a):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jax.lax.pmean(a.astype(compute_dtype(a.dtype)), axis_name).astype(a.dtype)

    return jax.tree.map(mean, tree)


def _average_state(node, param_def, shapes, reduce, names: frozenset, found: set):
    """``node`` with the schedule-free ``z``/``x`` reduced, and the fields called one of
    ``names`` of every state ``NamedTuple`` when they hold a buffer shaped like the params (or,
    inside a packed state, like its slots); the names met are added to ``found``."""

    def params_shaped(n) -> bool:
        leaves, treedef = jax.tree.flatten(n)
        return (
            bool(leaves)
            and treedef == param_def
            and [tuple(jnp.shape(a)) for a in leaves] == shapes
        )

    def named(n) -> bool:
        fields = getattr(type(n), "_fields", None)
        return isinstance(n, tuple) and isinstance(fields, tuple) and bool(names & set(fields))

    def special(n) -> bool:
        return isinstance(n, (PackedState, ScheduleFreeState)) or named(n)

    def recurse(n):
        return _average_state(n, param_def, shapes, reduce, names, found)

    def visit(n):
        if isinstance(n, PackedState):
            layout = n.layout
            slots = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in layout.slot_shapes)
            slot_def, slot_shapes = jax.tree.structure(slots), list(layout.slot_shapes)
            inner = _average_state(n.inner, slot_def, slot_shapes, reduce, names, found)
            return PackedState(inner, layout)
        if isinstance(n, ScheduleFreeState):
            x = None if n.x is None else reduce(n.x)
            return n._replace(z=reduce(n.z), x=x, base_state=recurse(n.base_state))
        if named(n):
            fields = {}
            for field in n._fields:
                value = getattr(n, field)
                if field in names and params_shaped(value):
                    found.add(field)
                    fields[field] = reduce(value)
                else:
                    fields[field] = recurse(value)
            return n._replace(**fields)
        return n

    return jax.tree.map(visit, node, is_leaf=special)


def _average_names(average: Any, average_second_moment: Any) -> frozenset:
    if isinstance(average, str) or not all(isinstance(n, str) for n in average):
        raise TypeError(f"average must be a sequence of state field names (str), got {average!r}")
    if not isinstance(average_second_moment, bool):
        raise TypeError(
            f"average_second_moment must be a Python bool, got {average_second_moment!r}"
        )
    return frozenset([*average, *(["nu"] if average_second_moment else [])])


def average(
    params: optax.Params,
    opt_state: optax.OptState,
    axis_name: Any = "workers",
    *,
    average: Sequence[str] = (),
    average_second_moment: bool = False,
) -> tuple[optax.Params, optax.OptState]:
    """The workers' average: ``pmean`` over ``axis_name`` of what a sync averages.

    Runs inside ``jax.shard_map`` (or ``pmap``) with ``axis_name`` bound, on one worker's
    (unstacked) params and state. Averaged: the params (``y`` for sf_optax) and, in every
    sf_optax state in any nesting (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
    packed states), ``z`` and the stored ``x``. Never averaged: integer leaves and the
    scalars (``k``, ``weight_sum``, ``lr_max``, ``b1``, schedule counts), identical on every
    worker. Means are taken in float32 or wider, each leaf keeps its dtype.

    Args:
      params, opt_state: one worker's.
      axis_name: the workers' mesh axis.
      average: names of further state fields to average, in any optax state ``NamedTuple``
        where the field holds a buffer shaped like the params: e.g. ``("mu", "nu")`` for
        ``optax.adamw``'s moments. Each name must be found somewhere (ValueError otherwise).
      average_second_moment: adds ``"nu"``: sf_optax's second moment ``v`` (AdamW, RAdam),
        optax.adam's ``nu``; by default ``v`` stays per worker.

    Returns:
      ``(params, opt_state)`` averaged.
    """
    names = _average_names(average, average_second_moment)
    _check_axis_bound(axis_name, "average")
    param_leaves, param_def = jax.tree.flatten(params)
    shapes = [tuple(jnp.shape(a)) for a in param_leaves]

    def reduce(tree):
        return _pmean(tree, axis_name)

    found: set = set()
    new_state = _average_state(opt_state, param_def, shapes, reduce, names, found)
    missing = sorted(names - found)
    if missing:
        raise ValueError(
            f"average names {missing}: no state in opt_state has such a field holding a buffer "
            "shaped like the params (sf_optax's v is 'nu' in ScaleBySecondMomentState; "
            "optax.adam's moments are 'mu' and 'nu'; sf_optax.sgd has no second moment)"
        )
    return reduce(params), new_state


_average = average  # for the functions below whose ``average`` argument hides it


# ---------------------------------------------------------------------------------------------
# Stacked per-worker trees


def _n_workers(mesh: Any, axis_name: Any) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name {axis_name!r} is not an axis of the mesh, whose axes are "
            f"{tuple(mesh.axis_names)}: make the mesh with a workers axis, e.g. "
            f"jax.make_mesh((n_workers,), ({axis_name!r},))"
        )
    return int(mesh.shape[axis_name])


def _stacked_spec(spec: Any, axis_name: Any) -> PartitionSpec:
    """``spec`` (one worker's leaf, over the other mesh axes) behind the workers' axis."""
    if spec is None:
        spec = PartitionSpec()
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"specs must hold PartitionSpecs, got {type(spec).__name__}")
    for entry in spec:
        names = entry if isinstance(entry, tuple) else (entry,)
        if axis_name in names:
            raise ValueError(
                f"specs: {spec} uses the workers' axis {axis_name!r}; a worker's leaves may be "
                "sharded over the mesh's other axes only"
            )
    return PartitionSpec(axis_name, *spec)


def stack(tree: Any, mesh: Mesh, axis_name: Any = "workers", specs: Any = None) -> Any:
    """One copy of ``tree`` per worker: every leaf gets a leading axis of length the number of
    workers (``mesh.shape[axis_name]``), sharded over ``axis_name``.

    ``specs``: None (each worker's copy whole on its devices), or a tree of ``PartitionSpec``
    shaped like ``tree`` sharding each worker's leaf over the mesh's other axes (e.g.
    ``P(None, "model")`` on a ``("workers", "model")`` mesh); the step keeps that sharding.
    """
    n = _n_workers(mesh, axis_name)
    leaves, treedef = jax.tree.flatten(tree)
    if specs is None:
        spec_leaves = [None] * len(leaves)
    else:
        spec_leaves = treedef.flatten_up_to(specs)

    def copies(a, spec):
        a = jnp.asarray(a)
        sharding = NamedSharding(mesh, _stacked_spec(spec, axis_name))
        return jax.device_put(jnp.broadcast_to(a[None], (n, *a.shape)), sharding)

    return treedef.unflatten([copies(a, spec) for a, spec in zip(leaves, spec_leaves)])


def local_init(
    tx: optax.GradientTransformation,
    params: optax.Params,
    mesh: Mesh,
    axis_name: Any = "workers",
    param_specs: Any = None,
) -> tuple[optax.Params, optax.OptState]:
    """Every worker's params and ``tx.init(params)``, stacked (:func:`stack`): the workers start
    from the same point.

    ``param_specs``: None, or a tree of ``PartitionSpec`` shaped like ``params`` that shards
    each worker's params over the mesh's other axes (workers x model sharding); the state
    follows :func:`sf_optax.state_shardings` (buffers like their parameter, scalars whole).
    """
    state = tx.init(params)
    if param_specs is None:
        return stack(params, mesh, axis_name), stack(state, mesh, axis_name)
    param_def = jax.tree.structure(params)
    one = param_def.unflatten(
        [NamedSharding(mesh, s) for s in param_def.flatten_up_to(param_specs)]
    )
    state_specs = jax.tree.map(lambda sh: sh.spec, sf_optax_state_shardings(tx, params, one))
    return (
        stack(params, mesh, axis_name, param_specs),
        stack(state, mesh, axis_name, state_specs),
    )


def worker(tree: Any, index: int) -> Any:
    """Worker ``index``'s slice of a stacked tree (its params, state or batch)."""
    leaves = jax.tree.leaves(tree)
    n = jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else 0
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise ValueError(f"index must be an int in [0, {n}) (the workers), got {index!r}")
    return jax.tree.map(lambda a: _take(a, index), tree)


def _take(a: Any, index: int) -> Any:
    """``a[index]``; on a mesh with explicit axes (``jax.make_mesh``'s default) the workers
    axis is gathered first, as explicit sharding refuses a slice of a sharded dimension."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return a[index]
    spec = tuple(sharding.spec) + (None,) * (jnp.ndim(a) - len(sharding.spec))
    return jax.sharding.reshard(a, NamedSharding(mesh, PartitionSpec(None, *spec[1:])))[index]


def local_eval_params(
    params: optax.Params, opt_state: optax.OptState, index: int | None = None
) -> optax.Params:
    """The evaluation point ``x`` (:func:`sf_optax.eval_params`) from stacked per-worker trees.

    ``index=None``: ``x`` of the workers' average (the params and ``z``/``x`` averaged over the
    workers, as a sync does, then viewed at ``x``), what every worker holds right after a sync
    (to the rounding of this mean; ``index=0`` then gives the workers' bits); ``index=i``:
    worker ``i``'s own ``x``.
    """
    if index is not None:
        return eval_params(worker(opt_state, index), worker(params, index))

    def mean(tree):
        # The mean over the workers, kept stacked (every slice the mean) so that worker 0's
        # slice below is the averaged tree.
        def m(a):
            avg = jnp.mean(a.astype(compute_dtype(a.dtype)), axis=0, keepdims=True)
            return jnp.broadcast_to(avg.astype(a.dtype), a.shape)

        return jax.tree.map(m, tree)

    param_def = jax.tree.structure(params)
    shapes = [tuple(jnp.shape(a)) for a in jax.tree.leaves(params)]
    averaged = _average_state(opt_state, param_def, shapes, mean, frozenset(), set())
    return eval_params(worker(averaged, 0), worker(mean(params), 0))


# ---------------------------------------------------------------------------------------------
# The step


def _as_varying(new: Any, old: Any, axis_name: Any) -> Any:
    """``new`` typed as varying over the axis where ``old`` is (after a pmean, which makes a
    value invariant), so that both branches of the sync's ``lax.cond`` have one type."""

    def fix(n, o):
        new_type = getattr(jax.typeof(n), "manual_axis_type", None)
        old_type = getattr(jax.typeof(o), "manual_axis_type", None)
        if new_type is None or old_type is None:
            return n
        if axis_name in old_type.varying and axis_name not in new_type.varying:
            return jax.lax.pcast(n, (axis_name,), to="varying")
        return n

    return jax.tree.map(fix, new, old)


def _check_sync(sync: Any) -> jax.Array:
    if isinstance(sync, (bool, np.bool_)):
        return jnp.asarray(bool(sync))
    dtype = getattr(sync, "dtype", None)
    if dtype is None or dtype != np.bool_:
        raise TypeError(
            "sync must be a bool (a Python bool or a bool array of shape ()), the entry of "
            f"sf_schedules.sync.sync_mask for this step; got {type(sync).__name__}"
            + ("" if dtype is None else f" of dtype {dtype}")
        )
    if jnp.shape(sync) != ():
        raise ValueError(f"sync must be a scalar (shape ()), got shape {jnp.shape(sync)}")
    return sync


class LocalStep:
    """One local step of every worker, with the sync when asked: the callable made by
    :func:`make_local_train_step`.

    ``step(params, opt_state, batch, sync) -> (params, opt_state, losses)`` (and ``aux`` last
    with ``has_aux``): ``params``, ``opt_state`` and every leaf of ``batch`` carry a leading
    axis of length :attr:`n_workers` (worker ``i``'s slice is its own); ``sync`` is a bool
    scalar (a Python bool or a bool array), True to average after this step. ``losses`` has
    shape ``(n_workers,)``: each worker's loss at its params before the step.
    """

    def __init__(self, jitted, n_workers: int, axis_name: Any, mesh: Mesh | None = None):
        self.jitted = jitted
        self.n_workers = n_workers
        self.axis_name = axis_name
        # On a mesh with explicit axes (jax.make_mesh's default) shard_map takes arrays only
        # as sharded as its in_specs say: a batch from the host is split over the workers here.
        explicit = mesh is not None and AxisType.Explicit in tuple(mesh.axis_types)
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(axis_name)) if explicit else None

    def _place(self, batch):
        def put(a):
            spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", ())
            if len(spec) and spec[0] == self.axis_name:
                return a
            return jax.device_put(a, self._batch_sharding)

        return jax.tree.map(put, batch)

    def _check_stacked(self, name: str, tree: Any) -> None:
        for leaf in jax.tree.leaves(tree):
            shape = jnp.shape(leaf)
            if not shape or shape[0] != self.n_workers:
                raise ValueError(
                    f"{name}: every leaf needs a leading axis of length {self.n_workers} (one "
                    f"slice per worker along mesh axis {self.axis_name!r}), got a leaf of shape "
                    f"{shape}; stack a single copy with sf_optax.local.stack or local_init"
                )

    def __call__(self, params, opt_state, batch, sync):
        sync = _check_sync(sync)
        self._check_stacked("params", params)
        self._check_stacked("opt_state", opt_state)
        self._check_stacked("batch", batch)
        if self._batch_sharding is not None:
            batch = self._place(batch)
        return self.jitted(params, opt_state, batch, sync)

    def compilations(self) -> int:
        """How many programs the step has compiled (1 for a run whose shapes stay fixed)."""
        return self.jitted._cache_size()


def make_local_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    axis_name: Any = "workers",
    *,
    average: Sequence[str] = (),
    average_second_moment: bool = False,
    has_aux: bool = False,
    donate: bool = False,
) -> LocalStep:
    """Builds the jitted step of ``mesh.shape[axis_name]`` workers taking local steps.

    Each worker computes ``loss_fn(params, batch)`` and its gradient at its own params (``y``
    for sf_optax) on its own batch, steps with ``tx`` (any optax transformation: sf_optax's
    ``adamw``/``sgd``/``radam``/``schedule_free(base)``, alone or inside ``optax.chain``, or
    plain optax), and, when ``sync`` is true, the workers average (:func:`average`) under a
    ``lax.cond``: no communication on the other steps, and one compiled program whatever the
    periods.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (a scalar), or ``(loss, aux)`` with
        ``has_aux``; ``params`` and ``batch`` are one worker's, without the worker axis.
      tx: the optimizer, each worker's copy stepped on its own.
      mesh: a mesh with the axis ``axis_name``; one worker per index along it, each on the
        devices of its slice (sharded over the other axes as its arrays are).
      axis_name: the workers' mesh axis.
      average, average_second_moment: further state fields averaged at a sync (see
        :func:`average`): ``average_second_moment=True`` for sf_optax's ``v``,
        ``average=("mu", "nu")`` for optax.adamw's moments; by default they stay per worker.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the step then returns the stacked ``aux``.
      donate: donate the params and state buffers to the step (they are invalid afterwards).

    Returns:
      A :class:`LocalStep`.
    """
    n = _n_workers(mesh, axis_name)
    _average_names(average, average_second_moment)
    for name, value in (("has_aux", has_aux), ("donate", donate)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a Python bool, got {value!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    spec = PartitionSpec(axis_name)

    def one_worker(params, opt_state, batch, sync):
        params, opt_state, batch = jax.tree.map(lambda a: a[0], (params, opt_state, batch))
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
        loss, aux = out if has_aux else (out, None)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        def synced(p, s):
            new = _average(
                p, s, axis_name, average=average, average_second_moment=average_second_moment
            )
            return _as_varying(new, (p, s), axis_name)

        params, opt_state = jax.lax.cond(sync, synced, lambda p, s: (p, s), params, opt_state)
        outs = (params, opt_state, loss) + ((aux,) if has_aux else ())
        return jax.tree.map(lambda a: jnp.asarray(a)[None], outs)

    n_out = 4 if has_aux else 3
    sharded = jax.shard_map(
        one_worker,
        mesh=mesh,
        in_specs=(spec, spec, spec, PartitionSpec()),
        out_specs=(spec,) * n_out,
        # Manual over the workers' axis only: a worker's params may be sharded over the
        # mesh's other axes (stack's specs), which XLA then handles inside each worker.
        axis_names=frozenset({axis_name}),
    )
    jitted = jax.jit(sharded, donate_argnums=(0, 1) if donate else ())
    return LocalStep(jitted, n, axis_name, mesh)


def resolve_sync_mask(sync: Any, total_steps: int | None = None) -> np.ndarray:
    """The sync flags of a run, one per step (True: average after that step), as a numpy bool
    array, from any of the forms sf_torch.local's ``sync`` takes, or the flags themselves:

    - a bool array or sequence (``sf_schedules.sync.sync_mask(rule, lrs)``), one per step;
    - the sync steps: 1-based step counts, strictly increasing, the last the run's length
      (``sf_schedules.sync.sync_steps(rule, lrs)``);
    - ``(rule, lrs)`` or ``(rule, schedule, total_steps)``, handed to ``sync_mask``.

    ``total_steps``, when given, must be the number of flags.
    """
    if (
        isinstance(sync, (tuple, list))
        and 2 <= len(sync) <= 3
        and isinstance(sync[0], sync_rules.RULES)
    ):
        flags = sync_rules.sync_mask(*sync)
    elif isinstance(sync, sync_rules.RULES):
        raise TypeError(
            "sync: a rule needs the run's learning rates: pass (rule, lrs) or "
            "(rule, schedule, total_steps), or sf_schedules.sync.sync_mask(rule, lrs)"
        )
    else:
        arr = np.asarray(sync)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                "sync must be a non-empty 1-d sequence (bool flags per step, or 1-based sync "
                f"steps), got shape {arr.shape}"
            )
        if arr.dtype == np.bool_:
            flags = arr
        elif np.issubdtype(arr.dtype, np.integer):
            low = np.r_[1, arr[:-1] + 1]
            bad = np.flatnonzero(arr < low)
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"sync[{i}] must be in [{int(low[i])}, inf) (1-based step counts, strictly "
                    f"increasing), got {int(arr[i])}"
                )
            flags = np.zeros(int(arr[-1]), dtype=bool)
            flags[arr - 1] = True
        else:
            raise TypeError(
                "sync must hold bools (one flag per step, True: average after that step) or "
                f"ints (1-based sync steps), got dtype {arr.dtype}; e.g. "
                "sf_schedules.sync.sync_mask(rule, lrs)"
            )
    if total_steps is not None and len(flags) != total_steps:
        raise ValueError(
            f"sync has {len(flags)} steps but the run has {total_steps}: compute it for the "
            "run's learning rates (one per step)"
        )
    return np.asarray(flags, dtype=bool)


def run_local(
    step: LocalStep,
    params: optax.Params,
    opt_state: optax.OptState,
    batches: Iterable[Any],
    sync: Any,
) -> tuple[optax.Params, optax.OptState, np.ndarray]:
    """Runs ``step`` over ``batches`` (one stacked batch per step), syncing where ``sync`` says
    (any form of :func:`resolve_sync_mask`: flags, sync steps, or ``(rule, lrs)``).

    Returns the final stacked params and state and the losses, shape ``(steps, n_workers)``.
    There must be one batch per step of ``sync``.
    """
    flags = resolve_sync_mask(sync)
    if hasattr(batches, "__len__") and len(batches) != len(flags):
        raise ValueError(f"sync has {len(flags)} steps but {len(batches)} batches came")
    losses = []
    for t, batch in enumerate(batches):
        if t >= len(flags):
            raise ValueError(f"sync has {len(flags)} steps but more batches came")
        params, opt_state, loss, *_ = step(params, opt_state, batch, flags[t])
        losses.append(loss)
    if len(losses) != len(flags):
        raise ValueError(f"sync has {len(flags)} steps but {len(losses)} batches came")
    return params, opt_state, np.asarray(jnp.stack(losses))


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics at x


def make_local_batch_stats(
    stats_fn: Callable[[Any, Any], Any], mesh: Mesh, axis_name: Any = "workers"
) -> Callable[[Any, Any], Any]:
    """Builds ``f(params, batches) -> stats``: every worker's statistics at ``params`` averaged
    over its batches, then over the workers.

    Args:
      stats_fn: ``stats_fn(params, batch) -> tree``: one batch's statistics at one worker's
        params (e.g. each BatchNorm's batch mean and biased variance; see
        :func:`nnx_batchnorm_stats_fn`).
      mesh, axis_name: the workers' mesh axis.

    ``f``'s ``params`` are stacked per worker (the ``x`` of :func:`local_eval_params` after a
    sync, :func:`stack`-ed); every leaf of ``batches`` has shape ``(n_workers, n_batches,
    ...)``. ``stats`` is the tree ``stats_fn`` returns, unstacked: the mean over workers of each
    worker's mean over its batches (every batch weighs the same), computed in float32 or wider
    and cast back.
    """
    n = _n_workers(mesh, axis_name)
    spec = PartitionSpec(axis_name)

    def one_worker(params, batches):
        params, batches = jax.tree.map(lambda a: a[0], (params, batches))
        count = jax.tree.leaves(batches)[0].shape[0]

        def widen(tree):
            return jax.tree.map(lambda a: a.astype(compute_dtype(a.dtype)), tree)

        first = stats_fn(params, jax.tree.map(lambda a: a[0], batches))

        def body(total, batch):
            return jax.tree.map(jnp.add, total, widen(stats_fn(params, batch))), None

        rest = jax.tree.map(lambda a: a[1:], batches)
        total, _ = jax.lax.scan(body, widen(first), rest)
        local = jax.tree.map(lambda a: a / count, total)
        mean = jax.lax.pmean(local, axis_name)
        return jax.tree.map(lambda m, f: m.astype(f.dtype), mean, first)

    sharded = jax.jit(
        jax.shard_map(
            one_worker,
            mesh=mesh,
            in_specs=(spec, spec),
            out_specs=PartitionSpec(),
            axis_names=frozenset({axis_name}),
        )
    )

    def batch_stats(params, batches):
        for name, tree in (("params", params), ("batches", batches)):
            for leaf in jax.tree.leaves(tree):
                if not jnp.ndim(leaf) or jnp.shape(leaf)[0] != n:
                    raise ValueError(
                        f"{name}: every leaf needs a leading axis of length {n} (the workers), "
                        f"got shape {jnp.shape(leaf)}"
                    )
        for leaf in jax.tree.leaves(batches):
            if jnp.ndim(leaf) < 2 or jnp.shape(leaf)[1] < 1:
                raise ValueError(
                    "batches: every leaf needs shape (n_workers, n_batches >= 1, ...), got "
                    f"{jnp.shape(leaf)}"
                )
        return sharded(params, batches)

    return batch_stats


def nnx_batchnorm_stats_fn(model: Any, forward: Callable | None = None) -> Callable:
    """``stats_fn(params, batch)`` for :func:`make_local_batch_stats` from a ``flax.nnx`` model:
    runs ``forward(model, batch)`` (default ``model(batch)``) at ``params`` (the model's
    ``nnx.Param`` state, e.g. ``x``) with every ``nnx.BatchNorm`` on batch statistics, and
    returns ``[(mean, var), ...]`` per BatchNorm in module order (the biased variance, as nnx
    computes it). The model itself is not changed. Write the result into a model with
    :func:`set_nnx_batchnorm_stats`."""
    from flax import nnx

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    forward = (lambda m, b: m(b)) if forward is None else forward

    def stats_fn(params, batch):
        # Fresh variables made in this trace (the captured ones belong to the caller's).
        copy = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
        layers = [m for _, m in nnx.iter_modules(copy) if isinstance(m, nnx.BatchNorm)]
        for m in layers:
            # Momentum 0: after the pass the running statistics are this batch's statistics.
            m.momentum = 0.0
            m.use_running_average = False
        forward(copy, batch)
        return [(m.mean[...], m.var[...]) for m in layers]

    return stats_fn


def set_nnx_batchnorm_stats(model: Any, stats: list) -> None:
    """Writes ``[(mean, var), ...]`` (from :func:`make_local_batch_stats` with
    :func:`nnx_batchnorm_stats_fn`) into the model's ``nnx.BatchNorm`` layers, in module order."""
    from flax import nnx

    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    if len(stats) != len(layers):
        raise ValueError(f"stats has {len(stats)} entries for the model's {len(layers)} BatchNorms")
    for m, (mean, var) in zip(layers, stats):
        m.mean[...] = jnp.asarray(mean, m.mean[...].dtype)
        m.var[...] = jnp.asarray(var, m.var[...].dtype)
