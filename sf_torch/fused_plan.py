"""A fused step that is planned once and then only checked: the many-small-tensors fast path.

The general fused step (``rule.update`` with ``impl="fused"``) is one Triton launch, but before
it the host reads every ``.grad``, checks every layout, looks up every state and sends every
address to the device: ~1-5 us per tensor, which is the whole step for models of many small
tensors (2,000 tensors of 64x64: ~10 ms of host time for a ~0.2 ms kernel).

A ``FusedPlan`` keeps what does not change from step to step on the device: the block tables,
the addresses of y, z and v, and the gradients' addresses as last sent. Each step it checks,
in C++ (``csrc/snapshot.cpp``, built on first use with torch's extension builder), that the
group still holds the same params, at the same addresses, with dense gradients of their dtype
and device, and with the same state tensors; it then sends the step's 9 coefficients, plus the
gradients' addresses only where one moved, and launches the kernel. Anything else, or any
doubt, makes the check answer "stale": the optimizer then takes the general path, which raises
every error it promises and builds a new plan. Where the extension cannot be built (no
compiler), ``PySnapshot`` makes the same checks in Python (slower, same answers).

A capturable group (``capturable=True``) sends its hyperparameters instead of coefficients, and
``step_capturable`` lets the advance kernel compute the coefficients on the device; while a
CUDA graph is captured, the host buffer of that upload is a new one kept with the plan (the
graph's copy reads it at each replay), and a plan a graph has captured is kept alive by the
optimizer after it is replaced.

Changes to the state (a param's state dict replaced, or z replaced inside it) are seen through
``TrackedState``, the optimizers' ``state`` mapping, which counts them in its ``version``; state
dicts it does not track (put there by hand) are looked into at every check.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import defaultdict

import torch

from . import rule

SAME, GRADS_MOVED, STALE = 0, 1, 2

# A plan's device table: the coefficients, the capturable step's hyperparameters, then the
# addresses of g, y, z and v.
_HEAD = rule._N_SCALARS + rule._N_HYPER

# ---------------------------------------------------------------------------------------------
# The optimizers' state mapping


class ParamState(dict):
    """One param's state dict inside a ``TrackedState``: every change to it counts in the
    owner's ``version``. Pickles and copies as a plain dict."""

    __slots__ = ("_owner",)

    def __init__(self, owner: TrackedState | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _changed(self) -> None:
        if self._owner is not None:
            self._owner.version += 1

    def __reduce__(self):
        return (dict, (dict(self),))


class TrackedState(defaultdict):
    """The optimizers' ``state``: a ``defaultdict`` of per-param dicts that counts every change,
    to its entries and (for the ``ParamState`` dicts it creates) inside them, in ``version``.
    A plan built at one version is current while the version stays."""

    def __init__(self, items=()):
        super().__init__(self._new_entry)
        self.version = 0
        for key, value in dict(items).items():
            # Plain dicts from a checkpoint or a copy are taken in as tracked dicts.
            if type(value) is dict:
                value = ParamState(self, value)
            super().__setitem__(key, value)

    def _new_entry(self) -> ParamState:
        return ParamState(self)

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self):
        return type(self)(self)

    def _changed(self) -> None:
        self.version += 1


def _counting(cls, name):
    base = getattr(dict, name)

    def method(self, *args, **kwargs):
        self._changed()
        return base(self, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"{cls.__name__}.{name}"
    setattr(cls, name, method)


for _cls in (ParamState, TrackedState):
    for _name in (
        "__setitem__",
        "__delitem__",
        "__ior__",
        "clear",
        "pop",
        "popitem",
        "setdefault",
        "update",
    ):
        _counting(_cls, _name)


def tracked(state) -> TrackedState:
    """``state`` as a ``TrackedState`` (the same entries, plain dicts taken in as tracked
    ones; ``state`` itself when it already is one)."""
    if isinstance(state, TrackedState):
        return state
    return TrackedState(state)


def is_tracked(entry, state_map: TrackedState) -> bool:
    """Whether changes inside ``entry`` (a param's state dict) count in ``state_map``."""
    return type(entry) is ParamState and entry._owner is state_map


# ---------------------------------------------------------------------------------------------
# The per-step check: C++ where it builds, else the same checks in Python


class PySnapshot:
    """What ``csrc/snapshot.cpp``'s ``Snapshot`` checks, in Python (the fallback, and the
    definition the C++ one is tested against)."""

    def __init__(self, params, stepped, states, checked, keys):
        if len(params) != len(stepped):
            raise ValueError("stepped: one bool per param")
        if not len(states) == len(checked) == sum(map(bool, stepped)):
            raise ValueError("states, checked: one per stepped param")
        self._checked = [bool(c) for c in checked]
        self._params = [(p, p.data_ptr(), p.numel(), p.dtype, p.device) for p in params]
        self._stepped = [bool(s) for s in stepped]
        self._keys = tuple(keys)
        self._states = list(states)
        self._buffers = [[(st[k], st[k].data_ptr()) for k in self._keys] for st in self._states]
        self._grads = [0] * len(self._states)

    def check(self, params, out, offset, with_grads):
        if len(params) != len(self._params):
            return STALE
        moved = False
        j = 0
        for obj, (p, data, numel, dtype, device), stepped in zip(
            params, self._params, self._stepped
        ):
            if obj is not p:
                return STALE
            if (
                p.data_ptr() != data
                or p.numel() != numel
                or p.dtype != dtype
                or p.device != device
                or not p.is_contiguous()
            ):
                return STALE
            if with_grads:
                g = p.grad
                if (g is not None) != stepped:
                    return STALE
                if not stepped:
                    continue
                if (
                    g.layout != torch.strided
                    or g.dtype != dtype
                    or g.device != device
                    or g.numel() != numel
                    or not g.is_contiguous()
                ):
                    return STALE
                address = g.data_ptr()
                moved |= address != self._grads[j]
                out[offset + j] = address
            elif not stepped:
                continue
            if not self._checked[j]:
                j += 1
                continue
            st = self._states[j]
            for key, (buf, buf_data) in zip(self._keys, self._buffers[j]):
                now = st.get(key)
                if now is not buf or buf.data_ptr() != buf_data or not buf.is_contiguous():
                    return STALE
            j += 1
        return GRADS_MOVED if moved else SAME

    def remember_grads(self, out, offset):
        self._grads = out[offset : offset + len(self._states)].tolist()


def py_put_scalars(out: torch.Tensor, values) -> None:
    out[: len(values)] = torch.tensor(rule.float_bits(values), dtype=torch.int64)


_NATIVE_LOCK = threading.Lock()
_native_module = None
_native_error: str | None = None


def native():
    """The compiled ``Snapshot`` module, built on first use, or None where it cannot be (the
    reason is in ``native_error()``). ``SF_TORCH_NATIVE=0`` turns it off."""
    global _native_module, _native_error
    if _native_module is not None or _native_error is not None:
        return _native_module
    with _NATIVE_LOCK:
        if _native_module is not None or _native_error is not None:
            return _native_module
        if os.environ.get("SF_TORCH_NATIVE", "1").lower() in ("0", "false", "off", "no"):
            _native_error = "turned off by SF_TORCH_NATIVE=0"
            return None
        try:
            from torch.utils.cpp_extension import load

            source = os.path.join(os.path.dirname(__file__), "csrc", "snapshot.cpp")
            _native_module = load(
                name="sf_torch_snapshot", sources=[source], extra_cflags=["-O2"], verbose=False
            )
        except Exception as e:  # noqa: BLE001  (no compiler, no ninja, ...: fall back)
            _native_error = f"{type(e).__name__}: {e}"
            warnings.warn(
                "sf_torch: the C++ step check could not be built, using its Python twin "
                f"(slower for many small tensors): {_native_error[:300]}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _native_module


def native_error() -> str | None:
    """Why ``native()`` is None (None while it is not known yet or when it built)."""
    return _native_error


def make_snapshot(params, stepped, states, checked, keys):
    """A ``Snapshot`` (C++) or, where it cannot be built, a ``PySnapshot``."""
    module = native()
    args = (list(params), list(stepped), list(states), list(checked), list(keys))
    return module.Snapshot(*args) if module is not None else PySnapshot(*args)


def _put_scalars(out: torch.Tensor, values) -> None:
    module = native()
    if module is not None:
        module.put_scalars(out, list(values))
    else:
        py_put_scalars(out, values)


# ---------------------------------------------------------------------------------------------
# The plan


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class FusedPlan:
    """One param group's fused step, planned: see the module docstring.

    Built by the optimizer right after a general fused step of the group (so every stepped
    param has its state), for groups whose stepped tensors form one bucket (one device, one
    dtype each for y/g and for the state), all contiguous.
    """

    def __init__(self, group, stepped, states, zs, vs, state_map, has_v: bool):
        params = group["params"]
        ys = [p for p, s in zip(params, stepped) if s]
        self.device = ys[0].device
        self.dtypes = (ys[0].dtype, ys[0].dtype, zs[0].dtype)
        self.n = n = len(ys)
        self.fused_flag = group["fused"]
        self.state_map = state_map
        self.version = state_map.version
        self.stream = _current_stream(self.device)
        self.switchable = all(stepped) and rule._lerp_pair_problem(ys[0].dtype, zs[0].dtype) is None
        numels = tuple(map(torch.Tensor.numel, ys))
        self.tables = rule._block_tables(self.device, numels, rule.block_size(ys[0].dtype))
        data_ptr = torch.Tensor.data_ptr
        v_addrs = list(map(data_ptr, vs)) if has_v else [0] * n
        # The coefficients, the capturable step's hyperparameters and g's addresses come per
        # step; y's, z's and v's are fixed.
        host = [0] * (_HEAD + n)
        host += [*map(data_ptr, ys), *map(data_ptr, zs), *v_addrs]
        self.meta = torch.tensor(host, dtype=torch.int64).to(self.device)
        self.addresses = rule.address_slices(self.meta, _HEAD, n, 4)
        self.head = self.meta[: _HEAD + n]
        self.scalars = self.meta[: rule._N_SCALARS]
        self.hyper = self.meta[rule._N_SCALARS : _HEAD]
        self.hyper_and_grads = self.meta[rule._N_SCALARS : _HEAD + n]
        self.captured = False  # a CUDA graph holds this plan's buffers (the optimizer keeps it)
        self._captures: list[torch.Tensor] = []  # host buffers that captured copies read
        keys = ("z", "exp_avg_sq") if has_v else ("z",)
        # State dicts whose changes count in state_map's version need no look inside.
        checked = [not is_tracked(st, state_map) for st in states]
        self.snapshot = make_snapshot(params, stepped, states, checked, keys)
        self._no_grads = torch.empty(0, dtype=torch.int64)
        self._staging = [None, None]
        self._turn = 0

    def _usable(self, group, state_map, any_stream: bool = False) -> bool:
        return (
            type(group["params"]) is list
            and group["fused"] is self.fused_flag
            and state_map is self.state_map
            and state_map.version == self.version
            and (any_stream or _current_stream(self.device) == self.stream)
        )

    def _host_buffer(self):
        """The next of two host staging buffers (pinned on CUDA), once the copy that last read
        it has run: the copy queued two steps ago is done long before, so the wait costs an
        event query."""
        self._turn ^= 1
        buf = self._staging[self._turn]
        if buf is None:
            host = rule.host_int64(_HEAD + self.n, self.device)
            event = torch.cuda.Event() if self.device.type == "cuda" else None
            buf = self._staging[self._turn] = (host, event)
        elif buf[1] is not None:
            buf[1].synchronize()
        return buf

    def prepare_step(self, group, state_map, capturing: bool = False):
        """The gradients' addresses, checked, for ``step``; None when the plan is stale.
        Changes nothing the step depends on.

        ``capturing`` (a CUDA graph is being captured): the host buffer is a new one that the
        plan keeps (the graph's copy reads it at every replay), and the gradients' addresses
        are sent even where they did not move, so that each replay restores its own."""
        if not self._usable(group, state_map, any_stream=capturing):
            return None
        if capturing:
            buf = (rule.host_int64(_HEAD + self.n, self.device), None)
        else:
            buf = self._host_buffer()
        status = self.snapshot.check(group["params"], buf[0], _HEAD, True)
        if status == STALE:
            return None
        if capturing:
            self._captures.append(buf[0])
            self.captured = True
            status = GRADS_MOVED
        return buf, status

    def step(self, prepared, s: rule.StepScalars) -> None:
        """Sends the coefficients (and the gradients' addresses where they moved) and launches
        the kernel."""
        (host, event), status = prepared
        _put_scalars(host, rule.step_coefficients(s))
        if status == SAME:
            self.scalars.copy_(host[: rule._N_SCALARS], non_blocking=True)
        else:
            self.head.copy_(host, non_blocking=True)
            self.snapshot.remember_grads(host, _HEAD)
        if event is not None:
            event.record()
        flags = rule.scalar_flags(s)
        rule.launch_update(
            self.device, self.dtypes, flags, self.scalars, self.addresses, self.tables
        )

    def step_capturable(self, prepared, group, kind: str, counters: torch.Tensor) -> None:
        """The capturable step: sends the hyperparameters (and the gradients' addresses where
        they moved), then one program advances ``counters`` and writes the coefficients on the
        device, and the update kernel reads them there. Nothing the step computes passes
        through the host, so a CUDA graph that captured it replays every later step."""
        (host, event), status = prepared
        _put_scalars(host[rule._N_SCALARS :], rule.hyperparameters(group, kind))
        if status == SAME:
            self.hyper.copy_(host[rule._N_SCALARS : _HEAD], non_blocking=True)
        else:
            self.hyper_and_grads.copy_(host[rule._N_SCALARS :], non_blocking=True)
            self.snapshot.remember_grads(host, _HEAD)
        if event is not None:
            event.record()
        rule.launch_advance(self.device, kind, group, counters, self.scalars, self.hyper)
        flags = rule.capturable_flags(kind, group)
        rule.launch_update(
            self.device, self.dtypes, flags, self.scalars, self.addresses, self.tables
        )

    def can_switch(self, group, state_map) -> bool:
        """Whether ``switch`` may move this group's params (each has a z, as built)."""
        return (
            self.switchable
            and self._usable(group, state_map)
            and self.snapshot.check(group["params"], self._no_grads, 0, False) != STALE
        )

    def switch(self, weight: float) -> None:
        """Every param ``p <- lerp(p, z, weight)`` in one launch (``rule.switch_``'s kernel)."""
        host = rule.host_int64(1, self.device)
        _put_scalars(host, (weight,))
        weight_slot = self.scalars[:1]
        weight_slot.copy_(host, non_blocking=True)
        p_and_z = (self.addresses[1], self.addresses[2])
        dtypes = (self.dtypes[0], self.dtypes[2])
        rule.launch_lerp(self.device, dtypes, weight_slot, p_and_z, self.tables)


def capturable_problem(params, grads, states) -> str | None:
    """Why a capturable group's params and gradients cannot be planned (None when they can):
    a capturable step is always a planned one, so the group must form one bucket (one device,
    one dtype for params and gradients) of contiguous tensors, which the fused kernel steps."""
    if not params:
        return None
    problem = rule._group_fused_problem(params, grads, states)
    if problem is not None:
        return problem
    contiguous = torch.Tensor.is_contiguous
    for p, g in zip(params, grads):
        if not (contiguous(p) and contiguous(g)):
            return (
                "capturable=True needs contiguous params and gradients, got a param of shape "
                f"{tuple(p.shape)} with strides {p.stride()} (gradient strides {g.stride()})"
            )
    keys = rule._buckets(params, grads, params, params)
    if len(keys) != 1:
        found = sorted(
            f"{y} params with {g} gradients" + (f" on cuda:{dev}" if dev >= 0 else "")
            for dev, y, g, _ in keys
        )
        return (
            "capturable=True needs one device and one dtype per param group (params and "
            f"gradients alike), got {', '.join(found)}: put each in a group of its own"
        )
    return None


def plannable(ys, gs, zs, vs, has_v: bool) -> bool:
    """Whether a group's fused step can be planned: one bucket, everything contiguous. (The
    fused kernel also steps other dense layouts, e.g. channels_last, but the plan's check
    would find those stale at every step and a plan would be rebuilt for nothing.)"""
    if not ys:
        return False
    contiguous = torch.Tensor.is_contiguous
    tensors = (ys, gs, zs, vs) if has_v else (ys, gs, zs)
    if not all(all(map(contiguous, ts)) for ts in tensors):
        return False
    return len(rule._buckets(ys, gs, zs, vs if has_v else zs)) == 1
