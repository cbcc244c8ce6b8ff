"""Moving a Schedule-Free run between frameworks, mid-run, without changing its trajectory.

A run's whole state is a :class:`Snapshot` in the canonical layout (numpy only): the params at
``y``, ``z`` and ``v`` (AdamW/RAdam's second moment), BatchNorm's running statistics, and the
scalars ``k``, ``weight_sum``, ``lr_max``, ``b1``. Each framework has a pair of functions:

- sf_optax: :func:`snapshot_from_optax` (params dict + optimizer state) and
  :func:`optax_from_snapshot` (rebuilds both for a given transformation);
- sf_torch: :func:`snapshot_from_torch` (model + optimizer) and :func:`torch_state_dicts` /
  :func:`load_into_torch` (the model's and optimizer's ``state_dict``).

and :func:`optax_to_torch` / :func:`torch_to_optax` compose them. Where the state sits:

    ============  ================================  ============================================
    quantity      sf_optax                          sf_torch
    ============  ================================  ============================================
    y             params (canonical dict)           model.parameters() (torch layout)
    z             ScheduleFreeState.z               optimizer.state[p]['z']
    v             ScaleBySecondMomentState.nu       optimizer.state[p]['exp_avg_sq']
    k             ScheduleFreeState.count (and      param_group['k']
                  ScaleBySecondMomentState.count)
    weight_sum    ScheduleFreeState.weight_sum      param_group['weight_sum']
    lr_max        ScheduleFreeState.lr_max          param_group['lr_max']
    b1            ScheduleFreeState.b1              param_group['betas'][0] / ['momentum']
    ============  ================================  ============================================

JAX and torch are imported inside the functions that need them, so that a process can use one
side without the other (the runners never hold both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from parity.models import canonical


@dataclass
class Snapshot:
    model: str
    optimizer: str  # "adamw", "sgd" or "radam"
    params: dict[str, np.ndarray]  # y, canonical layout
    z: dict[str, np.ndarray]
    v: dict[str, np.ndarray] | None  # None for SGD
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    k: int = 0
    weight_sum: float = 0.0
    lr_max: float = 0.0
    b1: float = 0.9

    def save(self, path) -> None:
        arrays = {f"params/{n}": a for n, a in self.params.items()}
        arrays |= {f"z/{n}": a for n, a in self.z.items()}
        arrays |= {f"v/{n}": a for n, a in (self.v or {}).items()}
        arrays |= {f"buffers/{n}": a for n, a in self.buffers.items()}
        scalars = dict(
            model=self.model,
            optimizer=self.optimizer,
            k=self.k,
            weight_sum=self.weight_sum,
            lr_max=self.lr_max,
            b1=self.b1,
            has_v=self.v is not None,
        )
        np.savez(path, scalars=json.dumps(scalars), **arrays)

    @classmethod
    def load(cls, path) -> Snapshot:
        with np.load(path) as f:
            s = json.loads(str(f["scalars"]))

            def part(prefix):
                return {k[len(prefix) + 1 :]: f[k] for k in f.files if k.startswith(prefix + "/")}

            return cls(
                model=s["model"],
                optimizer=s["optimizer"],
                params=part("params"),
                z=part("z"),
                v=part("v") if s["has_v"] else None,
                buffers=part("buffers"),
                k=int(s["k"]),
                weight_sum=float(s["weight_sum"]),
                lr_max=float(s["lr_max"]),
                b1=float(s["b1"]),
            )


# -- sf_optax ---------------------------------------------------------------------------------


def _second_moment_states(tree):
    import jax

    import sf_optax

    kind = sf_optax.ScaleBySecondMomentState
    return [
        n
        for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, kind))
        if isinstance(n, kind)
    ]


def snapshot_from_optax(
    model: str, optimizer: str, params: dict, opt_state, buffers: dict | None = None
) -> Snapshot:
    """The state of an sf_optax run: ``params`` (y, a canonical dict), its optimizer state."""
    import jax

    import sf_optax

    state = sf_optax.find_state(opt_state)
    if state.x is not None:
        raise ValueError("exact_x states hold x as well; the torch optimizers have no place for it")
    moments = _second_moment_states(state.base_state)

    def numpy(tree):
        return {n: np.asarray(jax.device_get(a)) for n, a in tree.items()}

    return Snapshot(
        model=model,
        optimizer=optimizer,
        params=numpy(params),
        z=numpy(state.z),
        v=numpy(moments[0].nu) if moments else None,
        buffers=numpy(buffers or {}),
        k=int(state.count),
        weight_sum=float(state.weight_sum),
        lr_max=float(state.lr_max),
        b1=float(state.b1),
    )


def optax_from_snapshot(snapshot: Snapshot, tx, dtype=None):
    """``(params, opt_state)`` for the transformation ``tx`` holding the snapshot's state.

    ``params`` is a canonical dict of JAX arrays in ``dtype`` (the snapshot's when None);
    ``tx`` must be the sf_optax transformation the run uses (its hyperparameters are not in the
    snapshot, only the state is).
    """
    import jax
    import jax.numpy as jnp

    import sf_optax

    def arrays(tree):
        return {n: jnp.asarray(a, dtype=dtype) for n, a in tree.items()}

    params = arrays(snapshot.params)
    opt_state = tx.init(params)
    old = sf_optax.find_state(opt_state)
    k = jnp.asarray(snapshot.k, old.count.dtype)

    def fill_moment(node):
        if isinstance(node, sf_optax.ScaleBySecondMomentState):
            if snapshot.v is None:
                raise ValueError(f"the snapshot has no v ({snapshot.optimizer}) but tx keeps one")
            return sf_optax.ScaleBySecondMomentState(count=k, nu=arrays(snapshot.v))
        return node

    def is_moment(n):
        return isinstance(n, sf_optax.ScaleBySecondMomentState)

    base_state = jax.tree.map(fill_moment, old.base_state, is_leaf=is_moment)
    new = old._replace(
        count=k,
        weight_sum=jnp.asarray(snapshot.weight_sum, old.weight_sum.dtype),
        lr_max=jnp.asarray(snapshot.lr_max, old.lr_max.dtype),
        b1=jnp.asarray(snapshot.b1, old.b1.dtype),
        z=arrays(snapshot.z),
        base_state=base_state,
    )
    opt_state = jax.tree.map(
        lambda n: new if isinstance(n, sf_optax.ScheduleFreeState) else n,
        opt_state,
        is_leaf=lambda n: isinstance(n, sf_optax.ScheduleFreeState),
    )
    return params, opt_state


# -- sf_torch ---------------------------------------------------------------------------------


def _b1_key(group: dict) -> str:
    return "momentum" if "momentum" in group and "betas" not in group else "betas"


def snapshot_from_torch(model: str, optimizer_kind: str, module, optimizer) -> Snapshot:
    """The state of an sf_torch run (``module`` holds y: the optimizer must be in train mode).

    Also reads the ``schedulefree`` reference classes, which keep the same state keys.
    """
    from parity.models import torch_models

    groups = optimizer.param_groups
    if not all(g["train_mode"] for g in groups):
        raise ValueError("the optimizer is in eval mode (params hold x): call optimizer.train()")
    scalars = {(g["k"], g["weight_sum"], g["lr_max"]) for g in groups}
    if len(scalars) != 1:
        raise ValueError(f"param groups disagree on (k, weight_sum, lr_max): {scalars}")
    k, weight_sum, lr_max = scalars.pop()
    group = groups[0]
    b1 = group["momentum"] if _b1_key(group) == "momentum" else group["betas"][0]
    tensors = [p for g in groups for p in g["params"]]
    names = torch_models.param_names(model, module)
    if len(names) != len(tensors):
        raise ValueError("the optimizer must hold every model parameter, in module order")
    z, v = [], []
    for p in tensors:
        state = optimizer.state.get(p, {})
        z.append(state.get("z", p))  # before its first step a param's z is the param itself
        v.append(state.get("exp_avg_sq", None if optimizer_kind == "sgd" else p * 0))
    return Snapshot(
        model=model,
        optimizer=optimizer_kind,
        params=torch_models.to_canonical(model, module, tensors),
        z=torch_models.to_canonical(model, module, z),
        v=None if optimizer_kind == "sgd" else torch_models.to_canonical(model, module, v),
        buffers=torch_models.buffers_to_canonical(model, module),
        k=int(k),
        weight_sum=float(weight_sum),
        lr_max=max(float(lr_max), 0.0),  # the reference classes start lr_max at -1
        b1=float(b1),
    )


def torch_state_dicts(snapshot: Snapshot, module, optimizer) -> tuple[dict, dict]:
    """The ``state_dict()`` of ``module`` and of ``optimizer`` holding the snapshot's state.

    ``optimizer`` supplies the param-group layout and hyperparameters (one group over
    ``module.parameters()``, as built for the run); the counters, ``b1`` and the per-param
    state come from the snapshot.
    """
    import torch

    from parity.models import torch_models

    model_sd = {k: v.clone() for k, v in module.state_dict().items()}
    for name, value in {**snapshot.params, **snapshot.buffers}.items():
        key = canonical.torch_name(name)
        value = canonical.to_torch_layout(name, np.asarray(value))
        model_sd[key] = torch.tensor(np.array(value), dtype=model_sd[key].dtype)

    opt_sd = optimizer.state_dict()
    names = torch_models.param_names(snapshot.model, module)
    params = list(module.parameters())
    index = 0
    state = {}
    for group in opt_sd["param_groups"]:
        for pid in group["params"]:
            name, p = names[index], params[index]
            dtype = group.get("state_dtype") or p.dtype
            entry = {"z": torch.tensor(canonical.to_torch_layout(name, np.array(snapshot.z[name])))}
            if snapshot.v is not None:
                v = canonical.to_torch_layout(name, np.array(snapshot.v[name]))
                entry["exp_avg_sq"] = torch.tensor(v)
            state[pid] = {k: t.to(dtype=dtype).clone() for k, t in entry.items()}
            index += 1
        group.update(k=snapshot.k, weight_sum=snapshot.weight_sum, lr_max=snapshot.lr_max)
        group["train_mode"] = True
        if _b1_key(group) == "momentum":
            group["momentum"] = snapshot.b1
        else:
            group["betas"] = (snapshot.b1, group["betas"][1])
    if index != len(params):
        raise ValueError("the optimizer must hold every model parameter, in module order")
    opt_sd["state"] = state
    return model_sd, opt_sd


def load_into_torch(snapshot: Snapshot, module, optimizer) -> None:
    """Put the snapshot's state into ``module`` (y, buffers) and ``optimizer`` (train mode)."""
    model_sd, opt_sd = torch_state_dicts(snapshot, module, optimizer)
    module.load_state_dict(model_sd)
    optimizer.load_state_dict(opt_sd)


# -- both ---------------------------------------------------------------------------------------


def optax_to_torch(
    model: str,
    optimizer: str,
    params: dict,
    opt_state,
    module,
    torch_optimizer,
    buffers: dict | None = None,
) -> None:
    """sf_optax params (y) + state -> an sf_torch model and optimizer, in place."""
    load_into_torch(
        snapshot_from_optax(model, optimizer, params, opt_state, buffers), module, torch_optimizer
    )


def torch_to_optax(model: str, optimizer: str, module, torch_optimizer, tx, dtype=None):
    """An sf_torch model and optimizer -> ``(params, opt_state, buffers)`` for sf_optax ``tx``."""
    snapshot = snapshot_from_torch(model, optimizer, module, torch_optimizer)
    params, opt_state = optax_from_snapshot(snapshot, tx, dtype)
    return params, opt_state, snapshot.buffers
