"""Switching views: the training point ``y`` and the evaluation point ``x``.

``x = (y - (1 - b1) z) / b1`` and back ``y = b1 x + (1 - b1) z`` (or the stored ``x`` with
``exact_x``). The schedule-free state is found wherever it sits in the optimizer state: inside
``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``, a
``flax.nnx.Optimizer`` (whose leaves are wrapped in variables) or a ``TrainState``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sf_optax._dtypes import compute_dtype
from sf_optax.packing import find_packing, nodes_of
from sf_optax.transform import ScheduleFreeState


def find_state(opt_state: Any) -> ScheduleFreeState:
    """Returns the one :class:`ScheduleFreeState` inside ``opt_state``.

    ``opt_state`` may also be an object holding it as ``.opt_state`` (``flax.nnx.Optimizer``,
    ``flax.training.train_state.TrainState``).
    """
    found = nodes_of(opt_state, ScheduleFreeState)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one sf_optax ScheduleFreeState in the optimizer state, found "
            f"{len(found)}; pass the state returned by an sf_optax transformation's init/update"
        )
    return found[0]


def _array(node: Any) -> jax.Array:
    """The array inside a scalar field, unwrapping a flax.nnx variable if there is one."""
    leaves = jax.tree.leaves(node)
    if len(leaves) != 1:
        raise ValueError(f"expected one array in a schedule-free scalar, found {len(leaves)}")
    return leaves[0]


def _map_params(fn, params: optax.Params, *state_trees: optax.Params) -> optax.Params:
    """Applies ``fn(param, *state_leaves)`` leaf by leaf, returning a tree shaped like params.

    State trees are matched to the params by leaf order, so wrappers such as flax.nnx's
    optimizer variables (which change the tree structure but not the leaves) are accepted.
    """
    param_leaves, treedef = jax.tree.flatten(params)
    columns = [jax.tree.leaves(tree) for tree in state_trees]
    for column in columns:
        if len(column) != len(param_leaves):
            raise ValueError(
                f"params have {len(param_leaves)} arrays but the schedule-free state holds "
                f"{len(column)}: pass the params this optimizer state was built for"
            )
    return treedef.unflatten([fn(p, *leaves) for p, *leaves in zip(param_leaves, *columns)])


def _through_packing(view):
    """``view(opt_state, tree)`` also for a packed state (``pack_small_leaves``): the tree is
    packed into the state's slots and the result cut back into the tree's shapes."""

    def wrapped(opt_state: Any, tree: optax.Params) -> optax.Params:
        layout = find_packing(opt_state)
        if layout is None:
            return view(opt_state, tree)
        return layout.unpack(view(opt_state, layout.pack(tree)), tree)

    wrapped.__name__, wrapped.__doc__ = view.__name__, view.__doc__
    return wrapped


@_through_packing
def eval_params(opt_state: Any, params: optax.Params) -> optax.Params:
    """The evaluation point ``x`` for training params ``y``; each leaf keeps its dtype."""
    state = find_state(opt_state)
    if state.x is not None:
        return _map_params(lambda y, x: x.astype(jnp.result_type(y)), params, state.x)
    b1 = _array(state.b1)

    def to_x(y, z):
        cdt = compute_dtype(y, z, b1)
        b = b1.astype(cdt)
        return ((y.astype(cdt) - (1 - b) * z.astype(cdt)) / b).astype(jnp.result_type(y))

    return _map_params(to_x, params, state.z)


@_through_packing
def train_params(opt_state: Any, eval_params: optax.Params) -> optax.Params:
    """The training point ``y = b1 x + (1 - b1) z`` for evaluation params ``x``."""
    state = find_state(opt_state)
    b1 = _array(state.b1)

    def to_y(x, z):
        cdt = compute_dtype(x, z, b1)
        b = b1.astype(cdt)
        return (b * x.astype(cdt) + (1 - b) * z.astype(cdt)).astype(jnp.result_type(x))

    return _map_params(to_y, eval_params, state.z)
