"""Which torch tensor is which Flax leaf: a mapping inferred from a torch model and its Flax twin.

A user hands over a torch module and its Flax twin (a ``flax.nnx.Module``, or a
``flax.linen.Module`` with its variables dict). :func:`infer` pairs every torch parameter and
floating buffer with one Flax leaf, by names first and by structure second, and records the
layout rule of each pair (the rules of ``parity/models/canonical.py``):

- ``"linear"``: a ``torch.nn.Linear`` weight ``(out, in)`` is the transposed Flax kernel
  ``(in, out)``;
- ``"conv"``: a ``torch.nn.ConvNd`` weight ``(O, I, *k)`` is the Flax kernel ``(*k, I, O)``;
- ``"same"``: everything else (embeddings, norms, biases, raw parameters);
- ``"custom"``: a pair of functions given in ``overrides`` (e.g. a multi-dimensional
  DenseGeneral kernel that is a reshaped torch weight).

Every conversion is a pure transpose (or the user's functions), so torch -> Flax -> torch is
bit-exact.

Flax leaves are named by a :data:`Path`, a tuple of strings whose first element is the
collection: ``("params", ...)`` for parameters (linen's ``params``, nnx's ``nnx.Param``) and
``("batch_stats", ...)`` for BatchNorm statistics (linen's ``batch_stats``, nnx's
``nnx.BatchStat``). Other collections and variable types (RNG state, caches) are not mapped.

Torch tensors are named as in ``state_dict()``. Integer buffers (BatchNorm's
``num_batches_tracked`` among them) have no Flax counterpart and are skipped silently;
non-persistent buffers are not in ``state_dict()`` and are skipped too. Tied tensors (one
storage under several names) form one entry, the other names in ``aliases``.

Matching, in this order:

1. ``overrides`` (``{torch_name: flax_path}``, ``{torch_name: (flax_path, layout)}``,
   ``{torch_name: (flax_path, to_flax_fn, to_torch_fn)}``, or ``{torch_name: None}`` to leave
   a torch tensor unmapped on purpose);
2. names: the torch module path split on ``"."`` and the Flax path compared case-insensitively,
   the leaf renamed by the owning torch module's class (``weight`` -> ``kernel`` for Linear and
   Conv, ``scale`` for norms, ``embedding`` for Embedding; ``running_mean`` -> ``mean``,
   ``running_var`` -> ``var``); a linen list attribute ``blocks_0`` also matches torch's
   ``blocks.0``; the shape after the layout rule must agree; a weight-norm pair
   (``torch.nn.utils.parametrizations.weight_norm``'s ``<module>.parametrizations.<w>.
   original0``/``original1``, or the legacy ``<module>.<w>_g``/``<w>_v``) is the Flax
   ``<module>/<w>_g``/``<w>_v`` (transformers' naming), g and v in one layout: as they are
   (transformers' Flax ports, checked against its converter) or the normed module's (a port
   that keeps v as a Flax kernel), whichever fits both shapes;
3. structure: walking both trees from the root, children whose names agree are entered
   together; the remaining children are paired when the shapes of what is left unmatched in
   them (after the layout rules) agree one-to-one, and the leaves of two paired modules are
   paired by leaf name and shape, or by shape alone when that is one-to-one (never a Flax
   ``kernel`` by shape alone with a raw torch parameter: its layout is unknown). A module
   that only wraps the model on one side (torch ``model.net.*`` against Flax ``*``) is seen
   through when the shapes left on both sides agree. Ties are never broken by definition
   order: two children or leaves of the same shapes with no telling names are an error that
   names the candidates.

Anything left over, or with several candidates, is a ``ValueError`` that lists every unmapped
torch tensor and Flax leaf with its shape (and the candidates) and says how to pass
``overrides`` (and ``ignore=[...]``, spelled out, for Flax leaves without a torch tensor).

numpy only at import time; torch, jax and flax are imported inside the functions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Path = tuple[str, ...]

LAYOUTS = ("same", "linear", "conv", "custom")
_COLLECTIONS = ("params", "batch_stats")
_LIST_ITEM = re.compile(r"^(.*[^_\d].*?)_(\d+)$")


# -- layouts ------------------------------------------------------------------------------------


def _layout_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The Flax shape of a torch tensor of ``shape`` under ``layout`` (None: not applicable)."""
    if layout == "same":
        return tuple(shape)
    if layout == "linear":
        return tuple(shape[::-1]) if len(shape) == 2 else None
    if layout == "conv":
        return tuple(shape[2:]) + (shape[1], shape[0]) if len(shape) >= 3 else None
    return None


def _copy(array: np.ndarray) -> np.ndarray:
    return np.array(array, order="C", copy=True)


def _to_flax_layout(layout: str, array: np.ndarray) -> np.ndarray:
    if layout == "linear":
        return _copy(array.T)
    if layout == "conv":
        n = array.ndim
        return _copy(array.transpose(tuple(range(2, n)) + (1, 0)))
    return _copy(array)


def _to_torch_layout(layout: str, array: np.ndarray) -> np.ndarray:
    if layout == "linear":
        return _copy(array.T)
    if layout == "conv":
        n = array.ndim
        return _copy(array.transpose((n - 1, n - 2) + tuple(range(n - 2))))
    return _copy(array)


# -- the mapping --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One torch tensor and its Flax leaf.

    ``to_flax(array)`` / ``to_torch(array)`` convert one array between the two layouts (for a
    ``"custom"`` entry with the user's ``to_flax_fn`` / ``to_torch_fn``).
    """

    torch_name: str
    flax_path: Path
    kind: str
    layout: str
    aliases: tuple[str, ...] = ()
    torch_shape: tuple[int, ...] = ()
    flax_shape: tuple[int, ...] = ()
    to_flax_fn: Callable[[np.ndarray], np.ndarray] | None = field(
        default=None, compare=False, repr=False
    )
    to_torch_fn: Callable[[np.ndarray], np.ndarray] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def torch_names(self) -> tuple[str, ...]:
        """The torch name and its aliases."""
        return (self.torch_name,) + self.aliases

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "custom":
            return np.asarray(self.to_flax_fn(np.asarray(array)))
        return _to_flax_layout(self.layout, np.asarray(array))

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "custom":
            return np.asarray(self.to_torch_fn(np.asarray(array)))
        return _to_torch_layout(self.layout, np.asarray(array))


def _path_str(path: Path) -> str:
    return "/".join(path)


class Mapping:
    """Every mapped torch tensor and its Flax leaf (:class:`Entry`), in torch ``state_dict()``
    order (parameters and buffers of a module together, as ``named_parameters()`` and
    ``named_buffers()`` list them).

    ``unmapped``: torch names left unmapped on purpose (``overrides={name: None}``);
    ``ignored``: Flax paths left unmapped on purpose (``infer(..., ignore=...)``).
    """

    def __init__(
        self,
        entries,
        *,
        unmapped: tuple[str, ...] = (),
        ignored: tuple[Path, ...] = (),
    ):
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.unmapped = tuple(unmapped)
        self.ignored = tuple(ignored)
        self._by_path = {e.flax_path: e for e in self.entries}
        self._by_name = {n: e for e in self.entries for n in e.torch_names}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"Mapping({len(self.entries)} entries)"

    def entry(self, key: str | Path) -> Entry:
        """The entry of a torch name (or alias) or of a Flax path."""
        found = self._by_name.get(key) if isinstance(key, str) else self._by_path.get(tuple(key))
        if found is None:
            raise KeyError(f"no entry for {key!r}")
        return found

    def params(self) -> tuple[Entry, ...]:
        """The entries of trained parameters (``kind == "param"``)."""
        return tuple(e for e in self.entries if e.kind == "param")

    def buffers(self) -> tuple[Entry, ...]:
        """The entries of BatchNorm statistics and other floating buffers."""
        return tuple(e for e in self.entries if e.kind == "buffer")

    def module_pairs(self) -> list[tuple[str, Path]]:
        """Torch module name <-> Flax module path, one pair per module that owns an entry.

        The torch side is the entry's name without its last part (``""``: the root module);
        the Flax side is the entry's path without the collection and the leaf name (so a
        BatchNorm's params and batch_stats give one pair). Deduplicated, in torch order. What
        the modules compute is not looked at.
        """
        seen, out = set(), []
        for e in self.entries:
            pair = (e.torch_name.rpartition(".")[0], tuple(e.flax_path[1:-1]))
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
        return out

    def to_flax(self, torch_arrays: MappingABC[str, np.ndarray]) -> dict[Path, np.ndarray]:
        """Torch arrays (by ``state_dict()`` name; any alias of a tied tensor will do) -> Flax
        arrays by path. Pure transposes: exact."""
        out, missing = {}, []
        for e in self.entries:
            name = next((n for n in e.torch_names if n in torch_arrays), None)
            if name is None:
                missing.append(f"{e.torch_name} {e.torch_shape}")
                continue
            array = np.asarray(torch_arrays[name])
            if tuple(array.shape) != e.torch_shape:
                raise ValueError(
                    f"torch_arrays[{name!r}] has shape {tuple(array.shape)}, "
                    f"the mapping expects {e.torch_shape}"
                )
            out[e.flax_path] = e.to_flax(array)
        if missing:
            raise ValueError("torch_arrays lacks " + ", ".join(missing))
        return out

    def to_torch(self, flax_arrays: MappingABC[Path, np.ndarray]) -> dict[str, np.ndarray]:
        """Flax arrays by path -> torch arrays by name; every alias of a tied tensor gets the
        same array. Exact."""
        out, missing = {}, []
        for e in self.entries:
            if e.flax_path not in flax_arrays:
                missing.append(f"{_path_str(e.flax_path)} {e.flax_shape}")
                continue
            array = np.asarray(flax_arrays[e.flax_path])
            if tuple(array.shape) != e.flax_shape:
                raise ValueError(
                    f"flax_arrays[{e.flax_path!r}] has shape {tuple(array.shape)}, "
                    f"the mapping expects {e.flax_shape}"
                )
            converted = e.to_torch(array)
            for name in e.torch_names:
                out[name] = converted
        if missing:
            raise ValueError("flax_arrays lacks " + ", ".join(missing))
        return out

    def describe(self) -> str:
        """A table, one line per entry: torch name and shape, Flax path and shape, layout."""
        rows = [("torch", "shape", "flax", "shape", "layout")]
        for e in self.entries:
            name = e.torch_name + (f" (= {', '.join(e.aliases)})" if e.aliases else "")
            kind = "" if e.kind == "param" else f" [{e.kind}]"
            rows.append(
                (
                    name + kind,
                    str(e.torch_shape),
                    _path_str(e.flax_path),
                    str(e.flax_shape),
                    e.layout,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines += [f"{n}: unmapped (overrides)" for n in self.unmapped]
        lines += [f"{_path_str(p)}: ignored" for p in self.ignored]
        return "\n".join(lines)


# -- the torch side -----------------------------------------------------------------------------


@dataclass
class _TorchTensor:
    names: list[str]
    kind: str  # "param" | "buffer"
    shape: tuple[int, ...]
    module_type: str
    leaf: str  # the expected Flax leaf name
    layout: str  # the layout rule of the owning module's class
    tensor: Any = None
    # weight norm: (the module that owns the normed weight, the weight's name, "g" or "v",
    # the layout of that weight's module class); None for any other tensor
    weight_norm: tuple[tuple[str, ...], str, str, str] | None = None

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def module(self) -> tuple[str, ...]:
        """The module the tensor belongs to (for a weight-norm pair: the normed module, not
        torch's ``parametrizations.<name>`` list)."""
        if self.weight_norm is not None:
            return self.weight_norm[0]
        return tuple(self.name.split(".")[:-1])

    @property
    def flax_shape(self) -> tuple[int, ...] | None:
        return _layout_shape(self.layout, self.shape)


def _torch_rule(module, leaf: str, ndim: int) -> tuple[str, str]:
    """(Flax leaf name, layout) of the torch tensor ``leaf`` of ``module``, by module class."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    norms = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        norms += (nn.RMSNorm,)
    if leaf == "weight":
        if isinstance(module, nn.Linear) and ndim == 2:
            return "kernel", "linear"
        if isinstance(module, _ConvNd) and not module.transposed and ndim >= 3:
            return "kernel", "conv"
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return "embedding", "same"
        if isinstance(module, norms):
            return "scale", "same"
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        if leaf == "running_mean":
            return "mean", "same"
        if leaf == "running_var":
            return "var", "same"
    return leaf, "same"


def _storage_key(tensor):
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return ("id", id(tensor))
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _torch_tensors(torch_model) -> list[_TorchTensor]:
    """Parameters and floating persistent buffers, one per storage, in state_dict order."""
    import torch

    if not isinstance(torch_model, torch.nn.Module):
        raise TypeError(f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__}")
    params = {id(p) for p in torch_model.parameters()}
    out: dict[Any, _TorchTensor] = {}
    for name, tensor in torch_model.state_dict(keep_vars=True).items():
        is_param = isinstance(tensor, torch.nn.Parameter) or id(tensor) in params
        if not is_param and not (tensor.is_floating_point() or tensor.is_complex()):
            continue  # num_batches_tracked and other integer buffers: no Flax counterpart
        key = _storage_key(tensor)
        if key in out:
            out[key].names.append(name)
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = torch_model.get_submodule(owner_name) if owner_name else torch_model
        flax_leaf, layout = _torch_rule(owner, leaf, tensor.dim())
        module_type = type(owner).__name__
        norm = _weight_norm(torch_model, name)
        if norm is not None:
            normed, weight, part, weight_layout = norm
            flax_leaf = f"{weight}_{part}"
            layout = "same"
            cls = type(torch_model.get_submodule(".".join(normed)))
            if cls.__name__.startswith("Parametrized") and len(cls.__mro__) > 1:
                cls = cls.__mro__[1]  # torch.nn.utils.parametrize's subclass: the class it wraps
            owner_type = cls.__name__
            module_type = f"{owner_type} weight_norm"
        out[key] = _TorchTensor(
            names=[name],
            kind="param" if is_param else "buffer",
            shape=tuple(tensor.shape),
            module_type=module_type,
            leaf=flax_leaf,
            layout=layout,
            tensor=tensor,
            weight_norm=norm,
        )
    return list(out.values())


def _weight_norm(torch_model, name: str) -> tuple[tuple[str, ...], str, str, str] | None:
    """(normed module path, weight name, "g" or "v", layout of the weight) when ``name`` is one
    half of a weight-norm pair, else None.

    Two forms: ``torch.nn.utils.parametrizations.weight_norm`` stores ``<module>.
    parametrizations.<weight>.original0`` (the magnitude g) and ``.original1`` (the direction
    v); the legacy ``torch.nn.utils.weight_norm`` stores ``<module>.<weight>_g`` and
    ``<module>.<weight>_v`` and keeps a ``WeightNorm`` forward pre-hook on the module."""
    parts = name.split(".")
    if (
        len(parts) >= 3
        and parts[-3] == "parametrizations"
        and parts[-1] in ("original0", "original1")
    ):
        module_path, weight = tuple(parts[:-3]), parts[-2]
        module = torch_model.get_submodule(".".join(module_path)) if module_path else torch_model
        plist = getattr(getattr(module, "parametrizations", None), weight, None)
        if plist is None or len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm":
            return None
        part = "g" if parts[-1] == "original0" else "v"
    else:
        module_path, leaf = tuple(parts[:-1]), parts[-1]
        module = torch_model.get_submodule(".".join(module_path)) if module_path else torch_model
        hooks = [
            h
            for h in getattr(module, "_forward_pre_hooks", {}).values()
            if type(h).__name__ == "WeightNorm" and isinstance(getattr(h, "name", None), str)
        ]
        hit = next((h for h in hooks if leaf in (h.name + "_g", h.name + "_v")), None)
        if hit is None:
            return None
        weight, part = hit.name, leaf[-1]
    shape = tuple(getattr(module, weight).shape)  # the normed weight, computed by torch
    return module_path, weight, part, _torch_rule(module, weight, len(shape))[1]


def _to_numpy(tensor) -> np.ndarray:
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _from_numpy(array: np.ndarray, like):
    import torch

    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        t = torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(array, order="C", copy=True))
    return t.to(device=like.device, dtype=like.dtype)


def torch_arrays(torch_model) -> dict[str, np.ndarray]:
    """``state_dict()`` as numpy: parameters and floating buffers (detached copies, dtype
    kept; bfloat16 as ``ml_dtypes.bfloat16``). Tied tensors appear under each name."""
    import torch

    if not isinstance(torch_model, torch.nn.Module):
        raise TypeError(f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__}")
    params = {id(p) for p in torch_model.parameters()}
    out = {}
    for name, tensor in torch_model.state_dict(keep_vars=True).items():
        is_param = isinstance(tensor, torch.nn.Parameter) or id(tensor) in params
        if is_param or tensor.is_floating_point() or tensor.is_complex():
            out[name] = _to_numpy(tensor)
    return out


def load_torch(mapping: Mapping, torch_model, flax_arrays: MappingABC[Path, np.ndarray]) -> None:
    """Copy Flax values into the torch model in place (every alias; no_grad; the dtype and
    device of the torch tensors)."""
    import torch

    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a parity.own.mapping.Mapping, got {type(mapping)}")
    values = mapping.to_torch(flax_arrays)
    state = torch_model.state_dict(keep_vars=True)
    missing = [n for n in values if n not in state]
    if missing:
        raise ValueError(f"torch_model has no tensors named {missing} (a different model?)")
    with torch.no_grad():
        for name, array in values.items():
            state[name].copy_(_from_numpy(array, state[name]))


# -- the Flax side ------------------------------------------------------------------------------


def _flax_kind(flax_model, variables) -> str:
    """ "nnx" or "linen", with the variables argument checked."""
    if flax_model is not None:
        try:
            from flax import nnx
        except ImportError:  # pragma: no cover - flax without nnx
            nnx = None
        if nnx is not None and isinstance(flax_model, nnx.Module):
            if variables is not None:
                raise ValueError(
                    "variables must be None for a flax.nnx model (its state is inside it), got "
                    f"{type(variables).__name__}"
                )
            return "nnx"
        from flax import linen

        module = getattr(flax_model, "module", flax_model)  # transformers' Flax wrappers
        if not isinstance(module, linen.Module):
            raise TypeError(
                "flax_model must be a flax.nnx.Module or a flax.linen.Module, got "
                f"{type(flax_model).__name__}"
            )
    if not isinstance(variables, MappingABC) or "params" not in variables:
        got = sorted(variables) if isinstance(variables, MappingABC) else type(variables).__name__
        raise ValueError(
            "variables must be the linen model's variables dict with a 'params' collection "
            f"(e.g. {{'params': params, 'batch_stats': stats}}), got {got}"
        )
    return "linen"


def _get(var):
    """An nnx Variable's value (``get_value`` where flax has it, ``.value`` before)."""
    return var.get_value() if hasattr(var, "get_value") else var.value


def _set(var, value) -> None:
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def _nnx_leaves(model) -> list[tuple[Path, Any, Any]]:
    """(Path, state path, Variable) of every nnx.Param / nnx.BatchStat of the model."""
    from flax import nnx

    out = []
    for state_path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var, nnx.Param):
            collection = "params"
        elif isinstance(var, nnx.BatchStat):
            collection = "batch_stats"
        else:
            continue
        out.append(((collection,) + tuple(str(p) for p in state_path), state_path, var))
    return out


def _linen_leaves(variables) -> list[tuple[Path, Any]]:
    out = []

    def walk(tree, prefix):
        for key, value in tree.items():
            path = prefix + (str(key),)
            if isinstance(value, MappingABC):
                walk(value, path)
            else:
                out.append((path, value))

    for collection in _COLLECTIONS:
        if collection in variables:
            walk(variables[collection], (collection,))
    return out


def _flax_shapes(flax_model, variables) -> dict[Path, tuple[int, ...]]:
    kind = _flax_kind(flax_model, variables)
    if kind == "nnx":
        return {p: tuple(np.shape(_get(v))) for p, _, v in _nnx_leaves(flax_model)}
    return {p: tuple(np.shape(v)) for p, v in _linen_leaves(variables)}


def flax_arrays(flax_model, variables=None) -> dict[Path, np.ndarray]:
    """Every parameter and BatchNorm statistic of the Flax model as numpy copies, by Path.

    ``flax_model``: an nnx Module (``variables`` None), or a linen Module (or None) with its
    ``variables`` dict.
    """
    kind = _flax_kind(flax_model, variables)
    if kind == "nnx":
        return {p: np.array(_get(v)) for p, _, v in _nnx_leaves(flax_model)}
    return {p: np.array(v) for p, v in _linen_leaves(variables)}


def _cast_like(array: np.ndarray, old):
    import jax
    import jax.numpy as jnp

    if isinstance(old, jax.Array):
        new = jnp.asarray(array, dtype=old.dtype)
        sharding = getattr(old, "sharding", None)
        return jax.device_put(new, sharding) if sharding is not None else new
    return np.array(array, dtype=np.asarray(old).dtype)


def load_flax(
    mapping: Mapping, flax_model, torch_arrays: MappingABC[str, np.ndarray], variables=None
):
    """Torch values into the Flax model, cast to the dtype of each Flax leaf.

    nnx: updates the model in place and returns it. linen: returns a new variables dict with
    the tree structure (dict or FrozenDict) of ``variables``, unmapped leaves kept.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a parity.own.mapping.Mapping, got {type(mapping)}")
    values = mapping.to_flax(torch_arrays)
    kind = _flax_kind(flax_model, variables)
    if kind == "nnx":
        from flax import nnx

        state = nnx.state(flax_model)
        leaves = {p: var for p, _, var in _nnx_leaves_of_state(state)}
        missing = [p for p in values if p not in leaves]
        if missing:
            raise ValueError(f"flax_model has no leaves {missing} (a different model?)")
        for path, array in values.items():
            _set(leaves[path], _cast_like(array, _get(leaves[path])))
        nnx.update(flax_model, state)
        return flax_model

    from flax.core import FrozenDict

    done = set()

    def rebuild(tree, prefix):
        items = {}
        for key, value in tree.items():
            path = prefix + (str(key),)
            if isinstance(value, MappingABC):
                items[key] = rebuild(value, path)
            elif path in values:
                items[key] = _cast_like(values[path], value)
                done.add(path)
            else:
                items[key] = value
        return FrozenDict(items) if isinstance(tree, FrozenDict) else items

    new = {}
    for key, value in variables.items():
        if key in _COLLECTIONS and isinstance(value, MappingABC):
            new[key] = rebuild(value, (key,))
        else:
            new[key] = value
    missing = [p for p in values if p not in done]
    if missing:
        raise ValueError(f"variables has no leaves {missing} (a different model?)")
    return FrozenDict(new) if isinstance(variables, FrozenDict) else new


def _nnx_leaves_of_state(state):
    from flax import nnx

    for state_path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            collection = "params"
        elif isinstance(var, nnx.BatchStat):
            collection = "batch_stats"
        else:
            continue
        yield (collection,) + tuple(str(p) for p in state_path), state_path, var


# -- inference ----------------------------------------------------------------------------------


@dataclass
class _FlaxLeaf:
    path: Path
    shape: tuple[int, ...]

    @property
    def collection(self) -> str:
        return self.path[0]

    @property
    def module(self) -> tuple[str, ...]:
        return self.path[1:-1]

    @property
    def leaf(self) -> str:
        return self.path[-1]


def _compatible(t: _TorchTensor, f: _FlaxLeaf) -> bool:
    """Parameters go to params, buffers to another collection."""
    return (t.kind == "param") == (f.collection == "params")


def _name_keys(path: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Lower-cased path, and the same with linen list items ``blocks_0`` split as ``blocks.0``."""
    plain = tuple(p.lower() for p in path)
    split = []
    for p in plain:
        m = _LIST_ITEM.match(p)
        split.extend(m.groups() if m else (p,))
    return {plain, tuple(split)}


def _parse_path(value, argument: str) -> Path:
    if isinstance(value, str):
        parts = value.split("/") if "/" in value else value.split(".")
    elif isinstance(value, (tuple, list)) and all(isinstance(p, (str, int)) for p in value):
        parts = [str(p) for p in value]
    else:
        raise ValueError(f"{argument} must be a Flax path (a tuple or 'a/b/c'), got {value!r}")
    if not parts or not all(parts):
        raise ValueError(f"{argument}: empty Flax path {value!r}")
    return tuple(parts)


def _natural(path: Path):
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path)


def _shape_s(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class _Matcher:
    def __init__(self, tensors: list[_TorchTensor], leaves: list[_FlaxLeaf]):
        self.tensors = tensors
        self.leaves = leaves
        self.pairs: dict[int, tuple[_FlaxLeaf, str, Any, Any]] = {}  # tensor index -> match
        self.claimed: set[Path] = set()
        self.skipped: set[int] = set()
        self.notes: dict[int, list[str]] = {}
        self.ambiguous: dict[int, list[_FlaxLeaf]] = {}
        # square raw weights against a Flax kernel: (leaf, why the layout is unknown[, the
        # layout to suggest when not 'linear'])
        self.ambiguous_layout: dict[int, tuple] = {}
        # tensors whose pairing needs the user (a weight-norm pair whose layout is unknown):
        # never matched by the passes after the one that found them
        self.held: set[int] = set()

    def take(self, i: int, leaf: _FlaxLeaf, layout: str, fns=(None, None)) -> None:
        self.pairs[i] = (leaf, layout, *fns)
        self.claimed.add(leaf.path)
        self.ambiguous.pop(i, None)
        self.ambiguous_layout.pop(i, None)

    def open_tensors(self) -> list[int]:
        return [
            i for i in range(len(self.tensors)) if i not in self.pairs and i not in self.skipped
        ]

    def open_leaves(self) -> list[_FlaxLeaf]:
        return [f for f in self.leaves if f.path not in self.claimed]

    # names ----------------------------------------------------------------------------------

    def by_names(self) -> None:
        index: dict[tuple[str, ...], list[_FlaxLeaf]] = {}
        for f in self.open_leaves():
            for key in _name_keys(f.path[1:]):
                index.setdefault(key, []).append(f)
        self._weight_norms(index)
        self._raw_kernels(index)
        wanted: dict[Path, list[int]] = {}
        found: dict[int, _FlaxLeaf] = {}
        for i in self.open_tensors():
            if i in self.held:
                continue
            t = self.tensors[i]
            key = tuple(p.lower() for p in t.module + (t.leaf,))
            named = list(
                {f.path: f for f in index.get(key, []) if f.path not in self.claimed}.values()
            )
            hits = [f for f in named if _compatible(t, f)]
            if not hits and t.kind == "buffer":
                # a torch buffer that the port keeps as a parameter (transformers' BART family:
                # final_logits_bias), same name and shape: the same tensor; check holds it fixed
                hits = [f for f in named if f.collection == "params" and f.shape == t.flax_shape]
            good = [f for f in hits if f.shape == t.flax_shape]
            if len(good) == 1:
                found[i] = good[0]
                wanted.setdefault(good[0].path, []).append(i)
            elif len(good) > 1:
                self.ambiguous[i] = good
            for f in hits:
                if f.shape != t.flax_shape:
                    self.notes.setdefault(i, []).append(_shape_note(t, f))
        for i, f in found.items():
            if len(wanted[f.path]) == 1:
                self.take(i, f, self.tensors[i].layout)
            else:
                self.ambiguous[i] = [f]

    def _weight_norms(self, index: dict[tuple[str, ...], list[_FlaxLeaf]]) -> None:
        """A torch weight-norm pair (g and v of ``<module>.<weight>``) against the Flax leaves
        ``<module>/<weight>_g`` and ``<module>/<weight>_v`` (transformers' Flax ports name
        them so). g and v take one layout together: as they are (``"same"``: transformers'
        ports keep v in torch's order) or the layout of the normed module's weight (``"conv"``
        or ``"linear"``: a port that stores v as a Flax kernel), whichever fits both shapes;
        where both fit, the pair is an ambiguity that names the two tensors."""
        pairs: dict[tuple[tuple[str, ...], str], dict[str, int]] = {}
        for i in self.open_tensors():
            norm = self.tensors[i].weight_norm
            if norm is not None:
                pairs.setdefault((norm[0], norm[1]), {})[norm[2]] = i
        for (module, weight), ids in pairs.items():
            if set(ids) != {"g", "v"}:
                continue
            found = {}
            for part, i in ids.items():
                t = self.tensors[i]
                key = tuple(p.lower() for p in module + (f"{weight}_{part}",))
                hits = [f for f in index.get(key, []) if _compatible(t, f)]
                hits = [f for f in {f.path: f for f in hits}.values() if f.path not in self.claimed]
                if len(hits) == 1:
                    found[part] = hits[0]
            if len(found) != 2:
                continue
            g, v = self.tensors[ids["g"]], self.tensors[ids["v"]]
            options = list(dict.fromkeys(("same", g.weight_norm[3])))

            def g_layout(layout, shape=g.shape):  # a scalar g (dim=None) has no layout
                return layout if _layout_shape(layout, shape) is not None else "same"

            fits = [
                lo
                for lo in options
                if _layout_shape(g_layout(lo), g.shape) == found["g"].shape
                and _layout_shape(lo, v.shape) == found["v"].shape
            ]
            if len(fits) == 1:
                self.take(ids["g"], found["g"], g_layout(fits[0]))
                self.take(ids["v"], found["v"], fits[0])
            elif len(fits) == 2:
                for part, i in ids.items():
                    self.held.add(i)
                    self.ambiguous_layout[i] = (
                        found[part],
                        f"a weight-norm pair whose shapes fit both 'same' and {fits[1]!r}",
                        g_layout(fits[1]) if part == "g" else fits[1],
                    )
            else:
                for part, i in ids.items():
                    self.held.add(i)
                    self.notes.setdefault(i, []).append(
                        f"weight norm: the name matches {_path_str(found[part].path)} "
                        f"{_shape_s(found[part].shape)}, but g {_shape_s(g.shape)} and v "
                        f"{_shape_s(v.shape)} fit the Flax g {_shape_s(found['g'].shape)} and "
                        f"v {_shape_s(found['v'].shape)} under none of {options}"
                    )

    def _raw_kernels(self, index: dict[tuple[str, ...], list[_FlaxLeaf]]) -> None:
        """A 2-D ``weight`` of a torch module that is neither Linear nor Conv (transformers'
        ``Conv1D``, a user's own layer) against the Flax ``kernel`` of the module of the same
        name: its layout is not known from its class. Where one of ``"same"`` and ``"linear"``
        fits the shapes, the shapes decide; a square one takes the layout that every other
        instance of its torch class (and Flax leaf name) was found to have; a class without
        such instances, or with both, is an ambiguity that names the tensor."""
        votes: dict[str, set[str]] = {}
        square: list[tuple[int, _FlaxLeaf]] = []
        for i in self.open_tensors():
            t = self.tensors[i]
            if t.layout != "same" or t.leaf != "weight" or len(t.shape) != 2:
                continue
            key = tuple(p.lower() for p in t.module + ("kernel",))
            hits = [f for f in index.get(key, []) if _compatible(t, f) and len(f.shape) == 2]
            hits = list({f.path: f for f in hits}.values())
            if len(hits) != 1 or hits[0].path in self.claimed:
                continue
            f = hits[0]
            fits = [lo for lo in ("same", "linear") if _layout_shape(lo, t.shape) == f.shape]
            if len(fits) == 1:
                self.take(i, f, fits[0])
                votes.setdefault(t.module_type, set()).add(fits[0])
            elif len(fits) == 2:
                square.append((i, f))
        for i, f in square:
            t = self.tensors[i]
            seen = votes.get(t.module_type, set())
            if len(seen) == 1:
                self.take(i, f, next(iter(seen)))
                continue
            why = (
                f"its other instances fit both {sorted(seen)}"
                if seen
                else f"no other {t.module_type} weight has a non-square shape that tells"
            )
            self.ambiguous_layout[i] = (f, why)

    # structure ------------------------------------------------------------------------------

    def by_structure(self) -> None:
        self._walk((), ())

    def _subtree(self, t_prefix, f_prefix):
        tensors = [
            i for i in self.open_tensors() if self.tensors[i].module[: len(t_prefix)] == t_prefix
        ]
        leaves = [f for f in self.open_leaves() if f.module[: len(f_prefix)] == f_prefix]
        return tensors, leaves

    def _walk(self, t_prefix: tuple[str, ...], f_prefix: tuple[str, ...]) -> None:
        tensors, leaves = self._subtree(t_prefix, f_prefix)
        if not tensors or not leaves:
            return
        n_t, n_f = len(t_prefix), len(f_prefix)
        self._direct(
            [i for i in tensors if len(self.tensors[i].module) == n_t],
            [f for f in leaves if len(f.module) == n_f],
        )
        t_children: dict[str, list[int]] = {}
        for i in tensors:
            m = self.tensors[i].module
            if len(m) > n_t and i not in self.pairs:
                t_children.setdefault(m[n_t], []).append(i)
        f_children: dict[str, list[_FlaxLeaf]] = {}
        for f in leaves:
            if len(f.module) > n_f and f.path not in self.claimed:
                f_children.setdefault(f.module[n_f], []).append(f)
        # children by name
        f_lower = {}
        for name in f_children:
            f_lower.setdefault(name.lower(), []).append(name)
        rest_t = []
        for name in t_children:
            same = f_lower.get(name.lower(), [])
            if len(same) == 1:
                self._walk(t_prefix + (name,), f_prefix + (same[0],))
                f_children.pop(same[0])
            else:
                rest_t.append(name)
        # the rest by the shapes left unmatched in them
        rest_t = [n for n in rest_t if any(i not in self.pairs for i in t_children[n])]
        rest_f = [n for n in f_children if any(f.path not in self.claimed for f in f_children[n])]

        def t_sig(name):
            return tuple(
                sorted(
                    (self.tensors[i].kind == "param", self.tensors[i].flax_shape or ())
                    for i in t_children[name]
                    if i not in self.pairs
                )
            )

        def f_sig(name):
            return tuple(
                sorted(
                    (f.collection == "params", f.shape)
                    for f in f_children[name]
                    if f.path not in self.claimed
                )
            )

        t_sigs = {n: t_sig(n) for n in rest_t}
        f_sigs = {n: f_sig(n) for n in rest_f}
        for name, sig in t_sigs.items():
            t_same = [n for n, s in t_sigs.items() if s == sig]
            f_same = [n for n, s in f_sigs.items() if s == sig]
            if len(t_same) == 1 and len(f_same) == 1:
                self._walk(t_prefix + (name,), f_prefix + (f_same[0],))
            elif f_same:
                candidates = [f for n in f_same for f in f_children[n]]
                for i in t_children[name]:
                    if i not in self.pairs:
                        t = self.tensors[i]
                        self.ambiguous[i] = [
                            f
                            for f in candidates
                            if f.shape == t.flax_shape
                            and _compatible(t, f)
                            and f.path not in self.claimed
                        ]
        self._wrapper(t_prefix, f_prefix)

    def _wrapper(self, t_prefix: tuple[str, ...], f_prefix: tuple[str, ...]) -> None:
        """A module that only wraps another on one side (torch ``model.net.*`` against Flax
        ``*``): when everything left on one side sits in a single child and what is left has
        the same shapes on both sides, that child is paired with the other side's module."""
        tensors, leaves = self._subtree(t_prefix, f_prefix)
        if not tensors or not leaves:
            return
        t_sig = sorted(
            (self.tensors[i].kind == "param", self.tensors[i].flax_shape or ()) for i in tensors
        )
        f_sig = sorted((f.collection == "params", f.shape) for f in leaves)
        if t_sig != f_sig:
            return
        n_t, n_f = len(t_prefix), len(f_prefix)
        t_heads = {self.tensors[i].module[n_t : n_t + 1] for i in tensors}
        f_heads = {f.module[n_f : n_f + 1] for f in leaves}
        if len(t_heads) == 1 and () not in t_heads and len(f_heads) > 1:
            self._walk(t_prefix + t_heads.pop(), f_prefix)
        elif len(f_heads) == 1 and () not in f_heads and len(t_heads) > 1:
            self._walk(t_prefix, f_prefix + f_heads.pop())

    def _fits(self, i: int, f: _FlaxLeaf) -> bool:
        """Shape (after the layout rule) and collection agree. A Flax ``kernel`` whose torch
        tensor is not a Linear or Conv weight (a raw parameter of the user's module) has an
        unknown layout: not a candidate unless the names agree; a note says so."""
        t = self.tensors[i]
        if f.shape != t.flax_shape or not _compatible(t, f):
            return False
        if f.leaf == "kernel" and t.layout == "same" and t.leaf != "kernel" and len(t.shape) > 1:
            self.notes.setdefault(i, []).append(
                f"{_path_str(f.path)} {_shape_s(f.shape)} has this shape, but a Flax kernel "
                f"is (in, out) and {t.name} belongs to a {t.module_type}, not a torch Linear or "
                "Conv: give its layout in overrides (flax_path, 'same' or 'linear')"
            )
            return False
        return True

    def _direct(self, tensors: list[int], leaves: list[_FlaxLeaf]) -> None:
        """Leaves of two paired modules: by leaf name and shape, then by shape one-to-one."""
        leaves = [f for f in leaves if f.path not in self.claimed]
        tensors = [i for i in tensors if i not in self.pairs]
        cands = {i: [f for f in leaves if i not in self.held and self._fits(i, f)] for i in tensors}
        # leaf name agrees
        for i in tensors:
            named = [f for f in cands[i] if f.leaf.lower() == self.tensors[i].leaf.lower()]
            if len(named) == 1 and named[0].path not in self.claimed:
                rivals = [
                    j
                    for j in tensors
                    if j != i
                    and j not in self.pairs
                    and named[0] in cands[j]
                    and self.tensors[j].leaf.lower() == named[0].leaf.lower()
                ]
                if not rivals:
                    self.take(i, named[0], self.tensors[i].layout)
        # shape alone, one-to-one
        changed = True
        while changed:
            changed = False
            open_t = [i for i in tensors if i not in self.pairs]
            for i in open_t:
                mine = [f for f in cands[i] if f.path not in self.claimed]
                if len(mine) == 1:
                    rivals = [j for j in open_t if j != i and mine[0] in cands[j]]
                    if not rivals:
                        self.take(i, mine[0], self.tensors[i].layout)
                        changed = True
                elif len(mine) > 1:
                    self.ambiguous[i] = mine
            for i in open_t:
                if i not in self.pairs:
                    mine = [f for f in cands[i] if f.path not in self.claimed]
                    if mine:
                        self.ambiguous[i] = mine


def _shape_note(t: _TorchTensor, f: _FlaxLeaf) -> str:
    note = (
        f"the name matches {_path_str(f.path)} {_shape_s(f.shape)} but the shape does not "
        f"(expected {_shape_s(t.flax_shape or t.shape)} under layout {t.layout!r})"
    )
    if int(np.prod(f.shape)) == int(np.prod(t.shape)):
        note += (
            "; the sizes agree, so it may be the same tensor reshaped (e.g. a DenseGeneral "
            "kernel): pass overrides={name: (flax_path, to_flax_fn, to_torch_fn)}"
        )
    return note


def _apply_override(m: _Matcher, i: int, value, leaves: dict[Path, _FlaxLeaf], argument: str):
    t = m.tensors[i]
    fns = (None, None)
    layout = None
    if isinstance(value, tuple) and len(value) == 3 and callable(value[1]):
        raw, fns = value[0], (value[1], value[2])
        if not callable(value[2]):
            raise ValueError(f"{argument}: to_torch_fn must be callable, got {value[2]!r}")
        layout = "custom"
    elif isinstance(value, tuple) and len(value) == 2 and value[1] in LAYOUTS:
        raw, layout = value
        if layout not in ("same", "linear", "conv"):
            raise ValueError(
                f"{argument}: layout must be 'same', 'linear' or 'conv' (or give "
                f"(flax_path, to_flax_fn, to_torch_fn) for a custom one), got {layout!r}"
            )
    else:
        raw = value
    path = _parse_path(raw, argument)
    if path not in leaves:
        prefixed = ("params" if t.kind == "param" else "batch_stats",) + path
        if prefixed in leaves:
            path = prefixed
        else:
            names = ["/".join(p) for p in leaves]
            close = difflib.get_close_matches("/".join(path), names, n=5, cutoff=0.5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(
                f"{argument}: the Flax model has no leaf {_path_str(path)!r}{hint} (paths start "
                f"with the collection, 'params' or 'batch_stats')"
            )
    f = leaves[path]
    if f.path in m.claimed:
        raise ValueError(f"{argument}: {_path_str(path)!r} is already given to another tensor")
    if layout == "custom":
        sample = _to_numpy(t.tensor)
        out = np.asarray(fns[0](sample))
        if tuple(out.shape) != f.shape:
            raise ValueError(
                f"{argument}: to_flax_fn gives shape {_shape_s(out.shape)}, the Flax leaf "
                f"{_path_str(path)} has {_shape_s(f.shape)}"
            )
        back = np.asarray(fns[1](out))
        if back.shape != sample.shape or not np.array_equal(back, sample, equal_nan=True):
            raise ValueError(
                f"{argument}: to_torch_fn(to_flax_fn(x)) is not x for {t.name} (the two "
                "functions must invert each other exactly)"
            )
    else:
        options = [layout] if layout else [t.layout, "same", "linear", "conv"]
        layout = next((lo for lo in options if _layout_shape(lo, t.shape) == f.shape), None)
        if layout is None:
            raise ValueError(
                f"{argument}: {t.name} {_shape_s(t.shape)} does not fit {_path_str(path)} "
                f"{_shape_s(f.shape)} under layout {options[0]!r}; give "
                "(flax_path, to_flax_fn, to_torch_fn) for another layout"
            )
    m.take(i, f, layout, fns)


def infer(
    torch_model,
    flax_model,
    variables=None,
    *,
    overrides: MappingABC[str, Any] | None = None,
    ignore=(),
) -> Mapping:
    """Pair every torch parameter and floating buffer with its Flax leaf (see the module doc).

    Args:
      torch_model: a ``torch.nn.Module``.
      flax_model: a ``flax.nnx.Module``, or a ``flax.linen.Module`` (or None) with ``variables``.
      variables: linen's variables dict (``{"params": ..., "batch_stats": ...}``); required for
        linen, refused for nnx.
      overrides: ``{torch_name: flax_path}`` (a tuple, ``"a/b/c"`` or ``"a.b.c"``; the
        collection may be left out), ``{torch_name: (flax_path, layout)}`` with layout
        ``"same"``, ``"linear"`` or ``"conv"``, ``{torch_name: (flax_path, to_flax_fn,
        to_torch_fn)}`` for any other exact conversion, or ``{torch_name: None}`` to leave a
        torch tensor unmapped on purpose. Any alias of a tied tensor may be the key.
      ignore: Flax paths without a torch counterpart on purpose.

    Returns:
      A :class:`Mapping`.

    Raises:
      ValueError: listing every unmapped torch tensor and Flax leaf with its shape, and the
        candidates where several fit.
    """
    tensors = _torch_tensors(torch_model)
    shapes = _flax_shapes(flax_model, variables)
    leaves = {p: _FlaxLeaf(p, s) for p, s in shapes.items()}
    m = _Matcher(tensors, list(leaves.values()))

    ignored = []
    for k, raw in enumerate(ignore):
        path = _parse_path(raw, f"ignore[{k}]")
        if path not in leaves:
            raise ValueError(f"ignore[{k}]: the Flax model has no leaf {_path_str(path)!r}")
        m.claimed.add(path)
        ignored.append(path)

    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, MappingABC):
        raise ValueError(f"overrides must be a dict {{torch_name: ...}}, got {type(overrides)}")
    by_name = {n: i for i, t in enumerate(tensors) for n in t.names}
    unmapped = []
    for name, value in overrides.items():
        argument = f"overrides[{name!r}]"
        if name not in by_name:
            close = difflib.get_close_matches(str(name), list(by_name), n=5, cutoff=0.5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(
                f"{argument}: torch_model has no parameter or floating buffer named {name!r}{hint}"
            )
        i = by_name[name]
        if i in m.pairs or i in m.skipped:
            raise ValueError(f"{argument}: {tensors[i].name} is overridden twice (tied names)")
        if value is None:
            m.skipped.add(i)
            unmapped.append(tensors[i].name)
        else:
            _apply_override(m, i, value, leaves, argument)

    m.by_names()
    m.by_structure()

    open_t, open_f = m.open_tensors(), m.open_leaves()
    if open_t or open_f:
        raise ValueError(_error(m, open_t, open_f))

    entries = []
    for i, t in enumerate(tensors):
        if i in m.skipped:
            continue
        f, layout, to_f, to_t = m.pairs[i]
        entries.append(
            Entry(
                torch_name=t.name,
                flax_path=f.path,
                kind=t.kind,
                layout=layout,
                aliases=tuple(t.names[1:]),
                torch_shape=t.shape,
                flax_shape=f.shape,
                to_flax_fn=to_f,
                to_torch_fn=to_t,
            )
        )
    return Mapping(entries, unmapped=tuple(unmapped), ignored=tuple(ignored))


def _error(m: _Matcher, open_t: list[int], open_f: list[_FlaxLeaf]) -> str:
    lines = ["cannot pair every torch tensor with a Flax leaf."]
    layout = [i for i in open_t if i in m.ambiguous_layout]
    lonely = [i for i in open_t if not m.ambiguous.get(i) and i not in m.ambiguous_layout]
    amb = [i for i in open_t if m.ambiguous.get(i) and i not in m.ambiguous_layout]
    if layout:
        lines.append(
            "torch tensors whose layout is unknown (a square weight of a module that is neither "
            "a torch Linear nor a Conv: as it is ('same') and transposed ('linear') both fit "
            "the Flax kernel):"
        )
        for i in layout:
            t, (f, why) = m.tensors[i], m.ambiguous_layout[i][:2]
            lines.append(
                f"  {t.name} {_shape_s(t.shape)} [{t.module_type}] -> {_path_str(f.path)} "
                f"{_shape_s(f.shape)}: {why}"
            )
        lines.append(
            "  Say which: overrides={"
            + ", ".join(
                f"{m.tensors[i].name!r}: ({_path_str(m.ambiguous_layout[i][0].path)!r}, "
                f"{(m.ambiguous_layout[i][2:] or ('linear',))[0]!r})"
                for i in layout[:3]
            )
            + (", ..." if len(layout) > 3 else "")
            + "} ('linear' when the Flax kernel is the torch weight transposed, 'same' when not)."
        )
    if lonely:
        lines.append("torch tensors without a Flax counterpart:")
        for i in lonely:
            t = m.tensors[i]
            names = t.name + (f" (= {', '.join(t.names[1:])})" if len(t.names) > 1 else "")
            want = _shape_s(t.flax_shape) if t.flax_shape else "?"
            lines.append(
                f"  {names} {_shape_s(t.shape)} [{t.module_type} {t.kind}; as Flax "
                f"'{t.leaf}' {want}, layout {t.layout!r}]"
            )
            lines += [f"      {note}" for note in m.notes.get(i, [])]
            frozen = t.kind == "param" and not getattr(t.tensor, "requires_grad", True)
            if frozen or (t.kind == "buffer" and t.leaf == t.name.rpartition(".")[2]):
                what = "requires_grad=False" if frozen else "a buffer"
                lines.append(
                    f"      {what}: a constant of the torch model (a port may compute it "
                    "instead of storing it, e.g. a sinusoidal position table); if so, leave it "
                    "out with overrides={name: None}"
                )
    if amb:
        lines.append("torch tensors with several Flax candidates (same shape, no telling name):")
        for i in amb:
            t = m.tensors[i]
            cands = ", ".join(
                f"{_path_str(f.path)} {_shape_s(f.shape)}"
                for f in sorted(m.ambiguous[i], key=lambda f: _natural(f.path))
            )
            lines.append(f"  {t.name} {_shape_s(t.shape)}: candidates {cands}")
    if lonely:
        listed = ", ".join(f"{m.tensors[i].name!r}: None" for i in lonely[:6])
        more = ", ..." if len(lonely) > 6 else ""
        lines.append(
            f"If the port has no such tensors on purpose: overrides={{{listed}{more}}} leaves "
            "them unmapped (they are then neither copied nor compared)."
        )
    if open_f:
        lines.append("Flax leaves without a torch counterpart:")
        ordered = sorted(open_f, key=lambda f: _natural(f.path))
        for f in ordered:
            lines.append(f"  {_path_str(f.path)} {_shape_s(f.shape)}")
        listed = ", ".join(repr(_path_str(f.path)) for f in ordered[:6])
        more = ", ..." if len(ordered) > 6 else ""
        lines.append(
            f"If the port has such leaves on purpose (the torch model has no such tensor, e.g. "
            f"one it creates only under another config): ignore=[{listed}{more}] leaves them "
            "out (they keep their Flax values and are neither copied nor compared)."
        )
    example = next(
        (f"{{{m.tensors[i].name!r}: {_path_str(m.ambiguous[i][0].path)!r}}}" for i in amb), None
    )
    if example:
        lines.append(f"For example overrides={example} says which leaf a tensor is.")
    lines.append(
        "Pass overrides={torch_name: flax_path} to infer() (flax_path a tuple or 'params/a/b'; "
        "or (flax_path, layout) with layout 'same'/'linear'/'conv'; or (flax_path, to_flax_fn, "
        "to_torch_fn) for a reshape; or None to leave a torch tensor unmapped), and ignore=[path] "
        "for a Flax leaf without a torch counterpart."
    )
    return "\n".join(lines)
