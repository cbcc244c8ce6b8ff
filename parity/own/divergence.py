"""The divergence finder: one batch through a torch model and its Flax twin, layer by layer.

Before training anything, a person porting a model needs to know where the two stop computing
the same function (a GELU of another kind, a LayerNorm epsilon, a mask applied differently).
:func:`find` copies the torch weights into the Flax model through the mapping
(:mod:`parity.own.mapping`), so both hold identical numbers, runs one batch through both and
compares, module by module:

- outputs: a torch forward hook on every submodule records its output; on the Flax side, linen
  modules are observed with ``flax.linen.intercept_methods`` (every module's ``__call__``, with
  its path, however the loss calls ``apply``), nnx modules by wrapping their classes'
  ``__call__`` for the run (instances named by ``nnx.iter_modules``). nnx runs eagerly;
  linen runs one jitted ``value_and_grad`` whose auxiliary output is every module's output
  (eagerly instead when the loss cannot be traced).
- gradients: the gradient of each side's loss with respect to every parameter, the Flax ones
  brought to the torch layout through the mapping, grouped by owning module.

Modules are paired by the mapping (``Mapping.module_pairs()``: the modules that own weights),
then by name (case-insensitive, ``.`` and ``/`` splitting the same way) for the parameter-free
ones (activations, dropout, containers) that exist once on each side. A module of one side only
is not compared (counted as unmatched). Outputs are flattened the same way on both sides: a
tensor; the first tensor of a tuple or list (the main output; later items are optional extras
such as attention weights); every tensor value of a dict or ``ModelOutput``, compared by key.
Where the two layouts differ (a conv's NCHW against NHWC) the comparison is made after the axis
move that makes the shapes agree (the smallest difference over the candidates when several
agree); an output whose shapes cannot be made to agree is "not comparable", never an error.

Figures, every one relative to the torch side (the model being ported from):

- output of a module: ``max|flax - torch| / max|torch|`` over the tensors of its output and its
  calls;
- gradient of a module: the worst, over its parameters, of ``max|flax - torch| / max|torch|``;
  a parameter whose gradient is zero in exact arithmetic (an attention key bias: softmax does
  not see a constant added to every score) holds rounding noise on both sides, so its relative
  difference says nothing. A parameter whose gradient on both sides is below ``tolerance * G``
  (``G``: the largest gradient entry of the whole model, the scale of the loss gradient) is
  indistinguishable from zero at the tolerance and is compared by ``max|flax - torch| / G``
  instead (marked ``abs`` in the table). Its rounding noise is a few ulps of the terms summed
  into it, which are of the order of ``G``, so this figure stays at round-off; a genuine
  gradient that one side loses (zero against non-zero) is still caught: its difference is the
  size of the gradient, above ``tolerance * G``.

The verdict: the first module in torch forward order (the order the hooks fire: a child before
its parent) whose output differs beyond the tolerance (``kind="output"``); if every output
agrees but the losses do not, ``kind="loss"``; if the losses agree too, the module where the
backward pass first parts (``kind="gradient"``): backward runs in reverse forward order and a
wrong gradient spoils every module before it, so that is the diverging module latest in forward
order. Otherwise nothing diverges. Tolerances: ``parity.tolerances.divergence_tolerance``.

Non-destructive: the torch model's modes, buffers and ``.grad`` and an nnx model's state are
restored afterwards; linen variables are never modified (the loaded copy is new). Runs with
``torch.set_num_threads(1)`` (restored afterwards; both frameworks share the CPU) and, for
float64, inside ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Mapping as MappingABC
from dataclasses import asdict, dataclass, field

import numpy as np

from parity.own.spec import check_batch

KINDS = ("output", "loss", "gradient")


@dataclass
class Row:
    """One torch module: its Flax twin and the two figures (None: not measured)."""

    torch_name: str
    flax_path: str | None  # "a/b/c"; None: no Flax twin found
    output: float | None = None  # relative output difference
    gradient: float | None = None  # worst parameter-gradient difference
    gradient_absolute: bool = False  # the worst gradient figure is measured against G
    note: str = ""
    parameters: dict[str, float] = field(default_factory=dict)  # gradient figure per parameter
    absolute: tuple[str, ...] = ()  # the parameters measured against G (zero gradients)


@dataclass
class Divergence:
    """What :func:`find` reports.

    Attributes:
      first: the torch module name of the first divergence (``""``: the root module), or None.
      kind: ``"output"``, ``"loss"``, ``"gradient"``, or None when nothing diverges.
      figure: the figure at the first divergence (None when nothing diverges).
      tolerance: the limit every figure is held to.
      dtype: the run's dtype.
      rows: one :class:`Row` per torch module compared, in forward order.
      losses: ``{"torch": ..., "flax": ...}``, the two losses on the batch.
      loss_difference: ``|flax - torch| / |torch|``.
      gradient_scale: ``G``, the largest gradient entry (torch side).
      unmatched: ``{"torch": [...], "flax": [...]}``, modules that ran on one side only.
      explanation: what the finder could tell about the first divergence ("" when nothing):
        at a torch BatchNorm, whether the Flax output is torch's output in the other mode
        (running averages against batch statistics).
    """

    first: str | None
    kind: str | None
    figure: float | None
    tolerance: float
    dtype: str
    rows: list[Row]
    losses: dict[str, float]
    loss_difference: float
    gradient_scale: float
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    explanation: str = ""

    @property
    def diverged(self) -> bool:
        return self.kind is not None

    def row(self, torch_name: str) -> Row:
        for r in self.rows:
            if r.torch_name == torch_name:
                return r
        raise KeyError(f"no row for torch module {torch_name!r}")

    def verdict(self) -> str:
        text = self._verdict()
        return f"{text}. {self.explanation}" if self.explanation else text

    def _verdict(self) -> str:
        tol = f"tolerance {self.tolerance:.0e}, {self.dtype}"
        if self.kind is None:
            return f"no divergence: every output, the loss and every gradient agree ({tol})"
        if self.kind == "loss":
            return (
                f"every module output agrees but the losses differ by {self.figure:.3e} "
                f"(torch {self.losses['torch']!r}, flax {self.losses['flax']!r}; {tol}): "
                "the two loss functions compute different things"
            )
        name = self.first or "(root)"
        if self.kind == "output":
            return f"first divergence: the output of {name}, {self.figure:.3e} ({tol})"
        return (
            f"every output agrees; the backward pass first parts at the parameter gradients of "
            f"{name}, {self.figure:.3e} ({tol})"
        )

    def __str__(self) -> str:
        def fig(value, absolute=False):
            if value is None:
                return "-"
            return f"{value:.2e}" + (" abs" if absolute else "")

        head = ("torch module", "flax module", "output", "gradient", "")
        lines = []
        for r in self.rows:
            mark = ""
            if self.first is not None and r.torch_name == self.first and self.kind != "loss":
                mark = f"<-- first divergence ({self.kind})"
            elif r.note:
                mark = r.note
            lines.append(
                (
                    r.torch_name or "(root)",
                    "-" if r.flax_path is None else (r.flax_path or "(root)"),
                    fig(r.output),
                    fig(r.gradient, r.gradient_absolute),
                    mark,
                )
            )
        widths = [max(len(x[i]) for x in [head] + lines) for i in range(4)]

        def fmt(x):
            return "  ".join(x[i].ljust(widths[i]) for i in range(4)) + ("  " + x[4]).rstrip()

        out = [fmt(head), "-" * (sum(widths) + 6)] + [fmt(x) for x in lines]
        out.append(
            f"loss: torch {self.losses['torch']!r}, flax {self.losses['flax']!r} "
            f"(relative difference {self.loss_difference:.2e}); gradient scale G "
            f"{self.gradient_scale:.3e}"
        )
        n_t, n_f = len(self.unmatched.get("torch", [])), len(self.unmatched.get("flax", []))
        if n_t or n_f:
            out.append(
                f"not compared: {n_t} torch and {n_f} flax modules without a twin on the other side"
            )
        out.append(self.verdict())
        return "\n".join(out)

    def to_dict(self) -> dict:
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            return value

        out = asdict(self)
        out["rows"] = [{k: clean(v) for k, v in r.items()} for r in out["rows"]]
        for key in ("figure", "loss_difference", "gradient_scale"):
            out[key] = clean(out[key])
        out["losses"] = {k: clean(v) for k, v in out["losses"].items()}
        out["verdict"] = self.verdict()
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


# -- numbers ------------------------------------------------------------------------------------


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|`` (b: torch). Equal non-finite entries (inf, NaN in both) count
    as equal; a non-finite entry on one side only is inf."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if not np.all(same | (np.isfinite(a) & np.isfinite(b))):
        return math.inf
    diff = np.where(same, 0.0, np.abs(a - b))
    worst = float(diff.max()) if diff.size else 0.0
    if worst == 0.0:
        return 0.0
    scale = float(np.max(np.abs(np.where(np.isfinite(b), b, 0.0)))) if b.size else 0.0
    return worst / scale if scale > 0 else math.inf


def _aligned(flax: np.ndarray, torch: np.ndarray) -> list[np.ndarray]:
    """The Flax array under every layout change that gives the torch shape: as it is, the
    channel axis moved last -> 1 (NHWC -> NCHW) or 1 -> last, then the same reshaped when only
    the sizes agree."""
    want = tuple(torch.shape)
    candidates = [flax]
    if flax.ndim >= 3:
        candidates.append(np.moveaxis(flax, -1, 1))
        candidates.append(np.moveaxis(flax, 1, -1))
    out = [c for c in candidates if c.shape == want]
    if not out and flax.size == torch.size:
        out = [np.reshape(c, want) for c in candidates]
    return out


def _leaves(output, is_tensor, to_numpy) -> dict[str, np.ndarray]:
    """The tensors of a module output: {"": t} for a tensor, the first tensor of a tuple or
    list, every tensor value of a mapping (ModelOutput included) by key."""
    if is_tensor(output):
        return {"": to_numpy(output)}
    if isinstance(output, MappingABC) or (
        hasattr(output, "keys") and hasattr(output, "__getitem__")
    ):
        out = {}
        for key in list(output.keys()):
            value = output[key]
            if is_tensor(value):
                out[str(key)] = to_numpy(value)
        return out
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _leaves(item, is_tensor, to_numpy)
            if found:
                return {"": next(iter(found.values()))}
    return {}


def _compare_outputs(torch_calls, flax_calls) -> tuple[float | None, str, list]:
    """The worst relative difference over calls and common keys, a note, and the figure of
    each call (None: not comparable)."""
    worst, notes, per_call = None, [], []
    if len(torch_calls) != len(flax_calls):
        notes.append(f"called {len(torch_calls)}x in torch, {len(flax_calls)}x in flax")
    for t_out, f_out in zip(torch_calls, flax_calls):
        call = None
        keys = [(k, k) for k in t_out if k in f_out]
        if not keys and t_out and f_out:
            keys = [(next(iter(t_out)), next(iter(f_out)))]
        for t_key, f_key in keys:
            t, f = t_out[t_key], f_out[f_key]
            options = _aligned(f, t)
            if not options and t.ndim == f.ndim:
                # one side broadcasts (e.g. position embeddings of shape (1, seq, d))
                try:
                    shape = np.broadcast_shapes(t.shape, f.shape)
                except ValueError:
                    shape = None
                if shape is not None:
                    t, options = np.broadcast_to(t, shape), [np.broadcast_to(f, shape)]
            if not options:
                notes.append(f"not comparable: shapes {tuple(t.shape)} vs {tuple(f.shape)}")
                continue
            diff = min(_relative(o, t) for o in options)
            worst = diff if worst is None else max(worst, diff)
            call = diff if call is None else max(call, diff)
        per_call.append(call)
    if worst is None and not notes:
        notes.append("not comparable: no tensor output on both sides")
    return worst, "; ".join(dict.fromkeys(notes)), per_call


def _norm(parts) -> tuple[str, ...]:
    return tuple(str(p).lower() for p in parts if str(p) != "")


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


# -- torch side ---------------------------------------------------------------------------------


def _torch_numpy(tensor) -> np.ndarray:
    import torch

    t = tensor.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()


def _is_torch_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _scalar(value, side: str):
    """The loss as a Python float, or a clear error."""
    shape = tuple(getattr(value, "shape", ()))
    if not hasattr(value, "shape") or shape != ():
        raise ValueError(
            f"{side}_loss must return a scalar (0-d) loss, got "
            f"{type(value).__name__}{' of shape ' + str(shape) if shape else ''}"
        )
    return value


def _torch_run(torch_model, torch_loss, batch, dtype, train):
    """Hook outputs by module name (in firing order), the loss and every parameter gradient."""
    import torch

    run_dtype = getattr(torch, dtype)
    tb = {}
    for key, value in batch.items():
        t = torch.from_numpy(np.array(value, copy=True))
        tb[key] = t.to(run_dtype) if np.issubdtype(value.dtype, np.floating) else t

    names = {id(m): n for n, m in torch_model.named_modules()}
    modes = {m: m.training for m in torch_model.modules()}
    buffers = {n: b.detach().clone() for n, b in torch_model.named_buffers()}
    params = dict(torch_model.named_parameters())
    old_grads = {n: p.grad for n, p in params.items()}
    outputs: dict[str, list] = {}
    fired: list[tuple[str, int]] = []  # (module, its call number), in firing order
    # BatchNorm outputs in the other mode (running averages in train mode, batch statistics in
    # eval mode), computed from the same input and the statistics before the call
    other_mode: dict[str, list] = {}
    batch_norm = torch.nn.modules.batchnorm._BatchNorm

    def hook(module, _inputs, output):
        name = names[id(module)]
        outputs.setdefault(name, []).append(_leaves(output, _is_torch_tensor, _torch_numpy))
        fired.append((name, len(outputs[name]) - 1))

    def pre_hook(module, inputs):
        if not inputs or not _is_torch_tensor(inputs[0]) or module.running_mean is None:
            return
        with torch.no_grad():
            other = torch.nn.functional.batch_norm(
                inputs[0],
                module.running_mean.clone(),
                module.running_var.clone(),
                module.weight,
                module.bias,
                training=not module.training,
                momentum=0.0,
                eps=module.eps,
            )
        other_mode.setdefault(names[id(module)], []).append({"": _torch_numpy(other)})

    handles = [m.register_forward_hook(hook) for m in torch_model.modules()]
    handles += [
        m.register_forward_pre_hook(pre_hook)
        for m in torch_model.modules()
        if isinstance(m, batch_norm)
    ]
    try:
        torch_model.train(train)
        for p in params.values():
            p.grad = None
        try:
            with torch.enable_grad():
                loss = _scalar(torch_loss(torch_model, tb), "torch")
        finally:
            for h in handles:
                h.remove()
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"torch_loss must return a torch tensor, got {type(loss).__name__}")
        loss_value = float(loss.detach())
        if loss.requires_grad:
            loss.backward()
        grads = {
            n: (_torch_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape)))
            for n, p in params.items()
            if p.requires_grad
        }
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            live = dict(torch_model.named_buffers())
            for n, b in buffers.items():
                if n in live:
                    live[n].copy_(b)
        for n, p in params.items():
            p.grad = old_grads[n]
    return outputs, loss_value, grads, fired, other_mode


# -- flax side ----------------------------------------------------------------------------------


def _is_jax_array(value) -> bool:
    import jax

    return isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)


def _jax_numpy(value) -> np.ndarray:
    return np.array(value, copy=True)


def _jax_batch(batch, dtype):
    import jax
    import jax.numpy as jnp

    x64 = jax.config.jax_enable_x64
    out = {}
    for key, value in batch.items():
        if np.issubdtype(value.dtype, np.floating):
            out[key] = jnp.asarray(value, dtype=dtype)
        elif np.issubdtype(value.dtype, np.integer) and not x64:
            out[key] = jnp.asarray(value.astype(np.int32))
        else:
            out[key] = jnp.asarray(value)
    return out


def _loss_of(value):
    """linen's loss may return (loss, updates)."""
    if isinstance(value, tuple) and len(value) == 2:
        return value[0]
    return value


def _linen_recorder(records: list, traced: bool):
    """An interceptor appending (module path, output tensors) for every module ``__call__``."""
    depth = [0]

    def keep(value) -> bool:
        import jax

        return isinstance(value, jax.Array) if traced else _is_jax_array(value)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        # an unbound module applied inside another's call (e.g. a tied decoder applied with
        # the embedding as its kernel) is a root of its own: its path says nothing
        nested_root = depth[0] > 0 and not path
        depth[0] += 1
        try:
            out = next_fun(*args, **kwargs)
        finally:
            depth[0] -= 1
        if not nested_root:
            records.append((path, _leaves(out, keep, (lambda x: x) if traced else _jax_numpy)))
        return out

    return interceptor


def _by_path(records) -> dict[tuple, list]:
    outputs: dict[tuple, list] = {}
    for path, leaves in records:
        outputs.setdefault(path, []).append({k: np.array(v, copy=True) for k, v in leaves.items()})
    return outputs


def _linen_grads_flat(grads) -> dict[tuple, np.ndarray]:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(grads) if hasattr(grads, "unfreeze") else grads)
    return {("params",) + tuple(str(k) for k in path): np.asarray(g) for path, g in flat.items()}


def _linen_run(flax_loss, variables, jb):
    """Outputs by module path, the loss and the parameter gradients of a linen model.

    One jitted ``value_and_grad`` whose auxiliary output is every module's output (the way the
    model trains, and one compilation instead of one per operation); a loss that cannot be
    traced (Python control flow on values, modules under ``nn.scan``) runs eagerly instead,
    forward and gradient apart.
    """
    import flax.linen as nn
    import jax

    paths: list = []  # filled while tracing

    def traced(params, batch):
        records: list = []
        with nn.intercept_methods(_linen_recorder(records, traced=True)):
            out = flax_loss({**variables, "params": params}, batch)
        paths[:] = [p for p, _ in records]
        return _scalar(_loss_of(out), "flax"), [leaves for _, leaves in records]

    try:
        (loss, leaves), grads = jax.jit(jax.value_and_grad(traced, has_aux=True))(
            variables["params"], jb
        )
    except jax.errors.JAXTypeError:
        pass
    else:
        return _by_path(zip(paths, leaves)), float(loss), _linen_grads_flat(grads)

    records: list = []
    with nn.intercept_methods(_linen_recorder(records, traced=False)):
        loss = float(_scalar(_loss_of(flax_loss(variables, jb)), "flax"))

    def f(params):
        return _scalar(_loss_of(flax_loss({**variables, "params": params}, jb)), "flax")

    grads = jax.grad(f)(variables["params"])
    return _by_path(records), loss, _linen_grads_flat(grads)


def _nnx_outputs(flax_loss, model, jb):
    from flax import nnx

    paths = {id(m): tuple(str(p) for p in path) for path, m in nnx.iter_modules(model)}
    owners = {}
    for module in {type(m) for _, m in nnx.iter_modules(model)}:
        owner = next((c for c in module.__mro__ if "__call__" in vars(c)), None)
        if owner is not None and owner is not object and owner not in owners:
            owners[owner] = vars(owner)["__call__"]
    outputs: dict[tuple, list] = {}
    active: set[int] = set()

    def wrap(original):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            key = id(self)
            if key not in paths or key in active:  # a super().__call__ inside: record once
                return original(self, *args, **kwargs)
            active.add(key)
            try:
                out = original(self, *args, **kwargs)
            finally:
                active.discard(key)
            outputs.setdefault(paths[key], []).append(_leaves(out, _is_jax_array, _jax_numpy))
            return out

        return wrapper

    try:
        for owner, original in owners.items():
            owner.__call__ = wrap(original)
        loss = _scalar(_loss_of(flax_loss(model, jb)), "flax")
    finally:
        for owner, original in owners.items():
            owner.__call__ = original
    return outputs, float(loss)


def _nnx_grads(flax_loss, model, jb):
    from flax import nnx

    def f(m):
        return _scalar(_loss_of(flax_loss(m, jb)), "flax")

    grads = nnx.grad(f)(model)
    return {
        ("params",) + tuple(str(p) for p in path): np.asarray(
            v.get_value() if hasattr(v, "get_value") else v
        )
        for path, v in nnx.to_flat_state(grads)
    }


# -- the finder ---------------------------------------------------------------------------------


def _torch_dtype_name(torch_model) -> str:
    for p in torch_model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


@contextlib.contextmanager
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pair_modules(mapping, torch_names, flax_paths):
    """{torch name: flax path} for modules recorded on both sides: the mapping's module pairs
    first, then unique case-insensitive names."""
    recorded = set(flax_paths)
    pairs: dict[str, tuple] = {}
    taken: set[tuple] = set()
    for t_name, f_path in mapping.module_pairs():
        f_path = tuple(f_path)
        if t_name in torch_names and f_path in recorded and f_path not in taken:
            pairs[t_name] = f_path
            taken.add(f_path)
    by_name: dict[tuple, list] = {}
    for f_path in flax_paths:
        if f_path not in taken:
            by_name.setdefault(_norm(f_path), []).append(f_path)
    t_by_name: dict[tuple, list] = {}
    for t_name in torch_names:
        if t_name not in pairs:
            t_by_name.setdefault(_norm(t_name.split(".") if t_name else ()), []).append(t_name)
    for key, t_names in t_by_name.items():
        f_candidates = by_name.get(key, [])
        if len(t_names) == 1 and len(f_candidates) == 1:
            pairs[t_names[0]] = f_candidates[0]
            taken.add(f_candidates[0])
    return pairs, taken


def find(
    torch_model,
    flax_model,
    torch_loss,
    flax_loss,
    batch,
    *,
    variables=None,
    mapping=None,
    overrides=None,
    ignore=(),
    dtype: str | None = None,
    rtol: float | None = None,
    train: bool = True,
) -> Divergence:
    """Run ``batch`` through both models with identical weights; report the first module whose
    outputs or gradients differ (see the module doc).

    Args:
      torch_model: a ``torch.nn.Module``; its weights are the ones both run with.
      flax_model: a ``flax.nnx.Module``, or a ``flax.linen.Module`` with ``variables``.
      torch_loss: ``torch_loss(torch_model, batch) -> 0-d tensor`` (batch of torch tensors).
      flax_loss: nnx: ``flax_loss(model, batch)``; linen: ``flax_loss(variables, batch)``;
        a 0-d array, or ``(loss, updates)`` for linen.
      batch: a dict of numpy arrays (floating ones are converted to the run's dtype).
      variables: linen's variables dict; None for nnx.
      mapping: a ``parity.own.mapping.Mapping``; default ``mapping.infer(..., overrides)``.
      overrides, ignore: passed to ``mapping.infer`` when ``mapping`` is None.
      dtype: "float64" or "float32"; default the torch model's parameter dtype (which it must
        be: the finder converts no model).
      rtol: the tolerance; default ``parity.tolerances.divergence_tolerance(dtype)``.
      train: run the torch model in train mode (as the training step does); False: eval mode.
        Dropout must be off (or the two draw different masks).

    Returns:
      A :class:`Divergence`.
    """
    import torch

    from parity import tolerances
    from parity.own import mapping as mapping_mod

    check_batch(batch, "batch")
    if not isinstance(torch_model, torch.nn.Module):
        raise TypeError(f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__}")
    for name, fn in (("torch_loss", torch_loss), ("flax_loss", flax_loss)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    kind = mapping_mod._flax_kind(flax_model, variables)
    model_dtype = _torch_dtype_name(torch_model)
    if dtype is None:
        dtype = model_dtype
    if dtype != model_dtype:
        raise ValueError(
            f"dtype is {dtype!r} but torch_model's parameters are {model_dtype}: convert the "
            "models (and build the losses) in the dtype of the run"
        )
    if rtol is None:
        rtol = tolerances.divergence_tolerance(dtype)
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    if mapping is None:
        mapping = mapping_mod.infer(
            torch_model, flax_model, variables, overrides=overrides, ignore=ignore
        )
    elif not isinstance(mapping, mapping_mod.Mapping):
        raise TypeError(
            f"mapping must be a parity.own.mapping.Mapping or None, got {type(mapping).__name__}"
        )

    import jax

    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_thread())
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        return _find(
            torch_model, flax_model, torch_loss, flax_loss, batch, variables, mapping, kind,
            dtype, float(rtol), train,
        )  # fmt: skip


def _find(torch_model, flax_model, torch_loss, flax_loss, batch, variables, mapping, kind,
          dtype, rtol, train):  # fmt: skip
    import jax
    import jax.numpy as jnp

    from parity.own import mapping as mapping_mod

    jdtype = jnp.dtype(dtype)
    weights = mapping_mod.torch_arrays(torch_model)

    def as_run_dtype(x):
        x = jnp.asarray(x)
        return x.astype(jdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    # torch
    t_outputs, t_loss, t_grads, fired, t_other = _torch_run(
        torch_model, torch_loss, batch, dtype, train
    )

    # flax, with the torch weights
    jb = _jax_batch(batch, jdtype)
    if kind == "linen":
        loaded = mapping_mod.load_flax(mapping, flax_model, weights, variables)
        loaded = jax.tree_util.tree_map(as_run_dtype, loaded)
        f_outputs, f_loss, f_grads = _linen_run(flax_loss, loaded, jb)
    else:
        from flax import nnx

        saved = nnx.clone(nnx.state(flax_model))
        try:
            mapping_mod.load_flax(mapping, flax_model, weights)
            state = nnx.state(flax_model, nnx.Param)
            nnx.update(flax_model, jax.tree_util.tree_map(as_run_dtype, state))
            f_outputs, f_loss = _nnx_outputs(flax_loss, flax_model, jb)
            f_grads = _nnx_grads(flax_loss, flax_model, jb)
        finally:
            nnx.update(flax_model, saved)

    # gradients in the torch layout, by torch name
    grads_flax: dict[str, np.ndarray] = {}
    for e in mapping.params():
        if e.flax_path in f_grads:
            converted = e.to_torch(f_grads[e.flax_path])
            for name in e.torch_names:
                grads_flax[name] = converted
    scale = max((float(np.max(np.abs(g))) for g in t_grads.values() if g.size), default=0.0)

    # modules
    torch_order = list(t_outputs)  # firing order: a child before its parent
    pairs, taken = _pair_modules(mapping, torch_order, list(f_outputs))
    rows: dict[str, Row] = {}
    per_call: dict[str, list] = {}
    for name in torch_order:
        if name not in pairs:
            continue
        diff, note, per_call[name] = _compare_outputs(t_outputs[name], f_outputs[pairs[name]])
        rows[name] = Row(name, _path_str(pairs[name]), output=diff, note=note)
    owners: dict[str, list[str]] = {}
    for pname in t_grads:
        owners.setdefault(pname.rpartition(".")[0], []).append(pname)
    for owner, pnames in owners.items():
        row = rows.get(owner)
        if row is None:
            f_path = next((p for t, p in mapping.module_pairs() if t == owner), None)
            row = rows[owner] = Row(owner, None if f_path is None else _path_str(f_path))
            row.note = "not run as a module on both sides (gradient only)"
        missing = []
        for pname in pnames:
            if pname not in grads_flax:
                missing.append(pname.rpartition(".")[2])
                continue
            a, b = grads_flax[pname], t_grads[pname]
            if a.shape != b.shape:
                missing.append(pname.rpartition(".")[2])
                continue
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            size = max(
                float(np.max(np.abs(a64), initial=0.0)), float(np.max(np.abs(b64), initial=0.0))
            )
            if size <= rtol * scale:
                absolute = True
                diff = float(np.max(np.abs(a64 - b64), initial=0.0)) / scale if scale else 0.0
            else:
                absolute = False
                diff = _relative(a64, b64)
            leaf = pname.rpartition(".")[2]
            row.parameters[leaf] = diff
            if absolute:
                row.absolute += (leaf,)
            if row.gradient is None or diff > row.gradient:
                row.gradient, row.gradient_absolute = diff, absolute
        if missing:
            extra = f"no flax gradient for {', '.join(missing)}"
            row.note = f"{row.note}; {extra}" if row.note else extra
    ordered = [rows[n] for n in torch_order if n in rows]
    ordered += [r for n, r in rows.items() if n not in t_outputs]

    loss_diff = _relative(np.asarray(f_loss), np.asarray(t_loss))
    first = kind_ = figure = None
    # the first call, in firing order, whose output differs: a module called several times (a
    # dropout after the embeddings and again after the last norm) is judged call by call
    over = [
        (name, k, per_call[name][k])
        for name, k in fired
        if k < len(per_call.get(name, ()))
        and per_call[name][k] is not None
        and not per_call[name][k] <= rtol
    ]
    explanation = ""
    if over:
        first, kind_, figure = over[0][0], "output", over[0][2]
        if first in t_other:
            other, _, _ = _compare_outputs(t_other[first], f_outputs[pairs[first]])
            if other is not None and other <= rtol:
                explanation = _batch_norm_mode(first, train, figure, other)
        calls = len(per_call[first])
        if calls > 1:
            extra = f"first differs at call {over[0][1] + 1} of {calls}"
            row = rows[first]
            row.note = f"{row.note}; {extra}" if row.note else extra
    elif not loss_diff <= rtol:
        kind_, figure = "loss", loss_diff
    else:
        over = [r for r in ordered if r.gradient is not None and not r.gradient <= rtol]
        if over:
            first, kind_, figure = over[-1].torch_name, "gradient", over[-1].gradient
    unmatched = {
        "torch": [n for n in torch_order if n not in pairs],
        "flax": [_path_str(p) for p in f_outputs if p not in taken],
    }
    return Divergence(
        first=first,
        kind=kind_,
        figure=figure,
        tolerance=rtol,
        dtype=dtype,
        rows=ordered,
        losses={"torch": t_loss, "flax": f_loss},
        loss_difference=loss_diff,
        gradient_scale=scale,
        unmatched=unmatched,
        explanation=explanation,
    )


def _batch_norm_mode(name: str, train: bool, figure: float, other: float) -> str:
    """The explanation of a BatchNorm whose Flax output is torch's output in the other mode."""
    if train:
        flax_stats, torch_stats = "its running averages", "the batch statistics (train mode)"
        flag = "linen use_running_average=True, or an nnx BatchNorm in eval mode"
    else:
        flax_stats, torch_stats = "the batch statistics", "its running averages (eval mode)"
        flag = "linen use_running_average=False, or an nnx BatchNorm in train mode"
    return (
        f"The Flax twin of BatchNorm {name} normalizes with {flax_stats} ({flag}): its output "
        f"agrees with torch's computed that way to {other:.1e}, while torch normalizes with "
        f"{torch_stats}, {figure:.2e} apart. The Flax model does not pass the train flag "
        "down to this BatchNorm, or the loss sets the other mode; in a port by someone else "
        "that is the port's own difference, not the mapping's"
    )


def find_pair(pair, batch_index: int = 0, **kwargs) -> Divergence:
    """:func:`find` on a :class:`parity.own.Pair` and its batch ``pair.batches[batch_index]``
    (its overrides and ignore passed on; keyword arguments go to :func:`find`; with
    ``train=False`` the Flax side uses ``pair.flax_eval_loss`` when there is one)."""
    from parity.own.spec import Pair

    if not isinstance(pair, Pair):
        raise TypeError(f"pair must be a parity.own.Pair, got {type(pair).__name__}")
    if not isinstance(batch_index, int) or not -len(pair.batches) <= batch_index < len(
        pair.batches
    ):
        raise ValueError(
            f"batch_index must index pair.batches ({len(pair.batches)} batches), "
            f"got {batch_index!r}"
        )
    kwargs.setdefault("overrides", pair.overrides)
    kwargs.setdefault("ignore", pair.ignore)
    train = kwargs.get("train", True)
    flax_loss = pair.flax_loss if train or pair.flax_eval_loss is None else pair.flax_eval_loss
    return find(
        pair.torch_model,
        pair.flax_model,
        pair.torch_loss,
        flax_loss,
        pair.batches[batch_index],
        variables=pair.variables,
        **kwargs,
    )
