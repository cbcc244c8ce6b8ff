"""Small parameters stepped together: one flat state buffer per dtype for all leaves below a size.

A model's small leaves (biases, norm scales) each cost a kernel launch and a few arrays at the
jit boundary, whatever their size: on a fast GPU the 64 bias vectors of a 268M-parameter model
cost as much step time as several of its large matrices. With ``pack_small_leaves=N`` in
:func:`sf_optax.adamw`, :func:`sf_optax.sgd` or :func:`sf_optax.radam`, every leaf with fewer
than ``N`` elements is concatenated, per dtype (and per weight-decay mask value), into one flat
slot that the optimizer sees as a single parameter: its ``z``, ``v`` (and ``x``) are one flat
buffer per slot, the update is one fusion per slot, and the updates are cut back into the
params' own shapes. Large leaves keep one state buffer each, as without packing.

The numbers are those of the unpacked optimizer (the rule is elementwise); only the state's
layout differs. :func:`sf_optax.eval_params` / :func:`sf_optax.train_params`,
:func:`sf_optax.state_shardings` (a packed slot is replicated, large leaves keep their
parameter's sharding) and the Flax helpers understand the packed layout;
:func:`unpacked_state` gives the state with one buffer per parameter again (e.g. to hand it to
code that expects it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sf_schedules.validation import check_count

Slot = tuple[int, int]  # (slot index, offset in the slot's flat buffer; -1: the leaf is its slot)


class Layout:
    """Where each parameter leaf (in leaf order) lives among the packed slots. Static: it is the
    aux data of :class:`PackedState`, compared and hashed by value."""

    def __init__(self, shapes, dtypes, slots, n_slots, slot_mask, max_size):
        self.shapes: tuple[tuple[int, ...], ...] = tuple(map(tuple, shapes))
        self.dtypes: tuple[str, ...] = tuple(dtypes)
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.n_slots = int(n_slots)
        self.slot_mask: tuple[bool, ...] | None = None if slot_mask is None else tuple(slot_mask)
        self.max_size = int(max_size)
        alone = [False] * self.n_slots
        shapes_of: list[tuple[int, ...]] = [(0,)] * self.n_slots
        for shape, (slot, offset) in zip(self.shapes, self.slots):
            if offset < 0:
                alone[slot], shapes_of[slot] = True, shape
            else:
                shapes_of[slot] = (max(shapes_of[slot][0], offset + math.prod(shape)),)
        self.slots_alone: tuple[bool, ...] = tuple(alone)
        self.slot_shapes: tuple[tuple[int, ...], ...] = tuple(shapes_of)

    def _key(self):
        return (self.shapes, self.dtypes, self.slots, self.n_slots, self.slot_mask, self.max_size)

    def __eq__(self, other):
        return isinstance(other, Layout) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        packed = sum(off >= 0 for _, off in self.slots)
        return (
            f"Layout({len(self.shapes)} leaves: {len(self.shapes) - packed} alone, {packed} "
            f"packed below {self.max_size} elements; {self.n_slots} slots)"
        )

    def _leaves(self, tree, what: str):
        """The leaves and treedef of a params-shaped tree, checked against the layout."""
        leaves, treedef = jax.tree.flatten(tree)
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        if len(leaves) != len(self.shapes) or shapes != list(self.shapes):
            raise ValueError(
                f"{what} do not match the packed optimizer state: it was built for "
                f"{len(self.shapes)} leaves of shapes {_short(self.shapes)}, got {len(leaves)} "
                f"of shapes {_short(shapes)}; pass the params this state was built for"
            )
        return leaves, treedef

    def pack(self, tree, what: str = "params") -> tuple:
        """The slots (a tuple of arrays) of a tree shaped like the params."""
        leaves, _ = self._leaves(tree, what)
        parts: list[list] = [[] for _ in range(self.n_slots)]
        for leaf, (slot, offset) in zip(leaves, self.slots):
            parts[slot].append(leaf if offset < 0 else jnp.reshape(leaf, (-1,)))
        return tuple(
            part[0] if self.slots_alone[i] else jnp.concatenate(part)
            for i, part in enumerate(parts)
        )

    def unpack(self, slots, like) -> Any:
        """A tree with the structure of ``like`` (params-shaped) from the slots."""
        _, treedef = self._leaves(like, "params")
        arrays = jax.tree.leaves(slots)
        if len(arrays) != self.n_slots:
            raise ValueError(f"expected {self.n_slots} packed slots, got {len(arrays)}")
        out = []
        for shape, (slot, offset) in zip(self.shapes, self.slots):
            flat = arrays[slot]
            if offset < 0:
                out.append(flat)
            else:
                out.append(jnp.reshape(flat[offset : offset + math.prod(shape)], shape))
        return treedef.unflatten(out)


def _short(shapes) -> str:
    shapes = list(shapes)
    return str(shapes) if len(shapes) <= 4 else f"[{shapes[0]}, {shapes[1]}, ..., {shapes[-1]}]"


def _mask_bits(mask, params) -> list[bool] | None:
    if mask is None:
        return None
    tree = mask(params) if callable(mask) else mask
    treedef = jax.tree.structure(params)
    try:
        bits = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"mask must have the structure of the params: {e}") from None
    out = []
    for bit in bits:
        if isinstance(bit, jax.core.Tracer) or not isinstance(bit, (bool, np.bool_)):
            raise TypeError(
                "with pack_small_leaves the weight-decay mask must hold Python bools (it decides "
                f"which leaves share a packed slot), got {type(bit).__name__}"
            )
        out.append(bool(bit))
    return out


def make_layout(params, max_size: int, mask=None) -> Layout:
    """Leaves with fewer than ``max_size`` elements share a slot per (dtype, mask bit); the
    others are a slot each. Slots of single leaves come first, in leaf order."""
    leaves = jax.tree.leaves(params)
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    dtypes = [jnp.dtype(jnp.result_type(leaf)).name for leaf in leaves]
    bits = _mask_bits(mask, params)
    slots: list[Slot] = [(-1, -1)] * len(leaves)
    slot_mask: list[bool] = []
    n_slots = 0
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, shape in enumerate(shapes):
        bit = True if bits is None else bits[i]
        if math.prod(shape) < max_size:
            groups.setdefault((dtypes[i], bit), []).append(i)
        else:
            slots[i] = (n_slots, -1)
            slot_mask.append(bit)
            n_slots += 1
    for (_, bit), members in groups.items():
        offset = 0
        for i in members:
            slots[i] = (n_slots, offset)
            offset += math.prod(shapes[i])
        slot_mask.append(bit)
        n_slots += 1
    return Layout(shapes, dtypes, slots, n_slots, None if bits is None else slot_mask, max_size)


@jax.tree_util.register_pytree_with_keys_class
class PackedState:
    """State of a packed optimizer: the inner optimizer's state over the slots, and the
    (static) :class:`Layout` that maps the params' leaves to the slots."""

    def __init__(self, inner: optax.OptState, layout: Layout):
        self.inner = inner
        self.layout = layout

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("inner"), self.inner),), self.layout

    def tree_flatten(self):
        return (self.inner,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)

    def __repr__(self):
        return f"PackedState(inner={self.inner!r}, layout={self.layout!r})"


def check_pack_size(pack_small_leaves: Any) -> int:
    """``pack_small_leaves`` checked: None or a Python int >= 0 (None, 0: no packing). The
    default is None so that ``optax.inject_hyperparams`` does not take it for a hyperparameter."""
    if pack_small_leaves is None:
        return 0
    if isinstance(pack_small_leaves, bool) or not isinstance(pack_small_leaves, (int, np.integer)):
        raise TypeError(
            "pack_small_leaves must be a Python int (it decides the state's layout), got "
            f"{pack_small_leaves!r}; with optax.inject_hyperparams pass "
            "static_args=('pack_small_leaves',)"
        )
    return check_count("pack_small_leaves", int(pack_small_leaves))


def packed(
    build: Callable[[Any], optax.GradientTransformation], max_size: int, mask: Any = None
) -> optax.GradientTransformationExtraArgs:
    """``build(slot_mask)`` (an elementwise transformation, given the weight-decay mask of the
    slots, or None) run over the params packed by :func:`make_layout`."""
    built: dict[Any, optax.GradientTransformationExtraArgs] = {}

    def inner_for(layout: Layout):
        # One inner transformation per slot mask, built once (update runs it every step).
        if layout.slot_mask not in built:
            built[layout.slot_mask] = optax.with_extra_args_support(build(layout.slot_mask))
        return built[layout.slot_mask]

    def init_fn(params):
        layout = make_layout(params, max_size, mask)
        inner = inner_for(layout)
        return PackedState(inner.init(layout.pack(params)), layout)

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(state, PackedState):
            raise TypeError(f"expected the PackedState made by init, got {type(state).__name__}")
        if params is None:
            raise ValueError(
                "a schedule-free optimizer needs the current parameters (y): call "
                "update(grads, opt_state, params)"
            )
        layout = state.layout
        inner = inner_for(layout)
        packed_updates, inner_state = inner.update(
            layout.pack(updates, "updates"), state.inner, layout.pack(params), **extra_args
        )
        return layout.unpack(packed_updates, updates), PackedState(inner_state, layout)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nodes_of(opt_state: Any, cls: type) -> list:
    """Every ``cls`` node inside ``opt_state`` (or inside ``opt_state.opt_state`` for a holder
    such as ``flax.nnx.Optimizer`` or a ``TrainState``)."""
    holder = getattr(opt_state, "opt_state", None)
    if holder is not None and not isinstance(opt_state, cls):
        opt_state = holder
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, cls))
    return [node for node in leaves if isinstance(node, cls)]


def find_packing(opt_state: Any) -> Layout | None:
    """The layout of the one :class:`PackedState` inside ``opt_state``, or None."""
    found = nodes_of(opt_state, PackedState)
    if len(found) > 1:
        raise ValueError(f"expected at most one packed sf_optax state, found {len(found)}")
    return found[0].layout if found else None


def unpacked_state(opt_state: Any, params: optax.Params) -> Any:
    """``opt_state`` with every :class:`PackedState` replaced by its inner state with one buffer
    per parameter (shaped like ``params``), as the same optimizer without packing holds it."""

    def unpack(node):
        if not isinstance(node, PackedState):
            return node
        layout = node.layout
        slot_shapes = list(layout.slot_shapes)

        def is_slots(n) -> bool:
            leaves = jax.tree.leaves(n)
            return (
                isinstance(n, tuple)
                and len(n) == layout.n_slots
                and len(leaves) == layout.n_slots
                and [tuple(jnp.shape(a)) for a in leaves] == slot_shapes
            )

        return jax.tree.map(
            lambda n: layout.unpack(n, params) if is_slots(n) else n, node.inner, is_leaf=is_slots
        )

    return jax.tree.map(unpack, opt_state, is_leaf=lambda n: isinstance(n, PackedState))
