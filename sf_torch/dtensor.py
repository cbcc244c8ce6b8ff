"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): stepped on their local shards.

Every tensor update of the rule is elementwise, so where a param, its gradient, its ``z`` and
its ``v`` are DTensors on one device mesh with the same placements (Shard or Replicate, the
same local shape), the step of the DTensors is the step of their local tensors, element for
element. ``dispatch`` then runs every implementation (loop, foreach, the fused Triton kernel)
and every eval()/train() switch on the local tensors (``to_local()``, which shares their
storage): the same numbers as DTensor ops, without DTensor's per-op dispatch, and without
handing a DTensor's storage to a kernel (a DTensor has no data of its own).

Where they do not match (a gradient with other placements, a ``z`` set by hand), the loop and
the multi-tensor ops take DTensor ops, which redistribute as DTensor does; the fused kernel and
``capturable=True`` cannot, and are refused with the reason. The state the optimizers create
(``z`` a copy of the param, ``v`` zeros like it) is a DTensor with the param's placements.

A decision that must be one across the ranks (``skip_nonfinite``: whether some gradient holds
an inf or a NaN) is all-reduced over the gradients' device meshes (``agree``).
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Partial
except Exception:  # noqa: BLE001  (torch without torch.distributed: no DTensor can reach us)
    DTensor = Partial = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors) -> bool:
    """Whether one of ``tensors`` (None entries allowed) is a DTensor."""
    if DTensor is None:
        return False
    return any(isinstance(t, DTensor) for t in tensors)


def describe(t) -> str:
    """A tensor's kind, shape and (for a DTensor) placements, for error messages."""
    if is_dtensor(t):
        return (
            f"DTensor of shape {tuple(t.shape)} with placements {tuple(t.placements)} on a mesh "
            f"of shape {tuple(t.device_mesh.shape)}"
        )
    return f"plain tensor of shape {tuple(t.shape)}"


def _same_spec(p, t) -> bool:
    if not is_dtensor(t):
        return False
    if t.placements != p.placements:
        return False
    mesh, other = p.device_mesh, t.device_mesh
    if mesh is not other and mesh != other:
        return False
    return t._local_tensor.shape == p._local_tensor.shape


def pair_problem(p, named) -> str | None:
    """Why ``p`` and the tensors of ``named`` (``(name, tensor or None)`` pairs: its gradient,
    z, v) cannot be stepped as local tensors: None where none is a DTensor, or where ``p`` and
    all of them are DTensors with one mesh, one set of placements (no Partial) and one local
    shape."""
    if not is_dtensor(p):
        for name, t in named:
            if is_dtensor(t):
                return f"its {name} is a {describe(t)}, and the param a {describe(p)}"
        return None
    if Partial is not None and any(isinstance(pl, Partial) for pl in p.placements):
        return f"the param is a {describe(p)}: a Partial param has no value of its own"
    for name, t in named:
        if t is not None and not _same_spec(p, t):
            return f"its {name} is a {describe(t)}, and the param a {describe(p)}"
    return None


def step_problem(params, grads, states) -> str | None:
    """``pair_problem`` of the first param (with its gradient and state) that has one."""
    for p, g, st in zip(params, grads, states):
        z, v, m = (st.get("z"), st.get("exp_avg_sq"), st.get("exp_avg")) if st else (None,) * 3
        named = (("gradient", g), ("z", z), ("exp_avg_sq (v)", v), ("exp_avg (m)", m))
        problem = pair_problem(p, named)
        if problem is not None:
            return problem
    return None


def switch_problem(params, zs) -> str | None:
    """``pair_problem`` of the first param and its z that has one."""
    for p, z in zip(params, zs):
        problem = pair_problem(p, (("z", z),))
        if problem is not None:
            return problem
    return None


def local(tensors) -> list:
    """Each DTensor's local tensor (its storage, not a copy; None and plain tensors as they
    are)."""
    with torch.no_grad():
        return [t.to_local() if is_dtensor(t) else t for t in tensors]


def local_states(states) -> list:
    """Per-param state dicts with their z and v as local tensors (None kept), for checks."""
    out = []
    for st in states:
        if not st:
            out.append(st)
            continue
        out.append({k: t.to_local() if is_dtensor(t) else t for k, t in st.items()})
    return out


def agree(flags: dict, grads) -> None:
    """Sums each device's 0-d flag in ``flags`` over every device mesh of the DTensors among
    ``grads`` (all its dimensions), in place: every rank then holds the same answer. No-op
    without DTensors. Every rank of the meshes must call it (every rank steps the optimizer)."""
    if not any_dtensor(grads):
        return
    import torch.distributed as dist

    meshes = []
    for g in grads:
        if is_dtensor(g) and not any(g.device_mesh is m for m in meshes):
            meshes.append(g.device_mesh)
    for flag in flags.values():
        for mesh in meshes:
            for dim in range(mesh.ndim):
                group = mesh.get_group(dim)
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(flag, group=group)
