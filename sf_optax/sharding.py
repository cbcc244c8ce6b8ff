"""Shardings of a schedule-free optimizer state, derived from the parameters' shardings.

Every buffer shaped like the parameters (``z``, ``v``, ``x``) takes its parameter's sharding;
everything else (the scalars ``k``, ``weight_sum``, ``lr_max``, ``b1`` and any base state that
is not parameter-shaped) is replicated over the mesh. With ``pack_small_leaves`` a slot of
packed small leaves is replicated too; parameters big enough to be a slot alone keep their
sharding. Use the result as ``out_shardings`` of a jitted ``init`` and as
``in_shardings``/``out_shardings`` of the train step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sf_optax.packing import PackedState


def state_shardings(
    optimizer: optax.GradientTransformation,
    params: optax.Params,
    param_shardings: Any,
) -> optax.OptState:
    """Returns a tree of ``NamedSharding`` shaped like ``optimizer.init(params)``.

    Args:
      optimizer: any transformation (sf_optax's alone or inside a chain, MultiSteps, ...).
      params: the parameters, or their ``jax.ShapeDtypeStruct``s (nothing is computed).
      param_shardings: a tree of ``NamedSharding`` with the structure of ``params``.
    """
    param_leaves, param_def = jax.tree.flatten(params)
    sharding_leaves = param_def.flatten_up_to(param_shardings)
    meshes = {s.mesh for s in sharding_leaves if isinstance(s, NamedSharding)}
    if len(meshes) != 1:
        raise ValueError(
            "param_shardings must be NamedShardings on one mesh, found "
            f"{len(meshes)} meshes among {len(sharding_leaves)} leaves"
        )
    replicated = NamedSharding(meshes.pop(), PartitionSpec())
    abstract = jax.eval_shape(optimizer.init, params)
    return _assign(abstract, param_leaves, param_def, sharding_leaves, replicated)


def _assign(abstract, param_leaves, param_def, sharding_leaves, replicated):
    shapes = [jax.numpy.shape(p) for p in param_leaves]

    def params_shaped(node) -> bool:
        leaves, treedef = jax.tree.flatten(node)
        return treedef == param_def and [leaf.shape for leaf in leaves] == shapes

    def packed_state(node) -> bool:
        return isinstance(node, PackedState)

    def assign(node):
        if packed_state(node):
            # Inside, the params are the layout's slots: a leaf alone keeps its sharding, a
            # slot of packed small leaves is replicated.
            layout = node.layout
            slot_leaves = [
                jax.ShapeDtypeStruct(shape, jax.numpy.float32) for shape in layout.slot_shapes
            ]
            slot_shardings = [replicated] * layout.n_slots
            for sharding, (slot, offset) in zip(sharding_leaves, layout.slots):
                if offset < 0:
                    slot_shardings[slot] = sharding
            slot_def = jax.tree.structure(tuple(slot_leaves))
            inner = _assign(node.inner, slot_leaves, slot_def, slot_shardings, replicated)
            return PackedState(inner, layout)
        if params_shaped(node):
            return param_def.unflatten(sharding_leaves)
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(assign, abstract, is_leaf=lambda n: packed_state(n) or params_shaped(n))
