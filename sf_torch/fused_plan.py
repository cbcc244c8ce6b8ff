"""A fused step that is planned once and then only checked: the many-small-tensors fast path.

The general fused step (``kernels.update_fused``) is one Triton launch per bucket, but before
it the host reads every ``.grad``, checks every layout, looks up every state and sends every
address to the device: ~1-5 us per tensor, which is the whole step for models of many small
tensors (2,000 tensors of 64x64: ~10 ms of host time for a ~0.2 ms kernel).

A ``FusedPlan`` keeps what does not change from step to step on the device: the block tables,
the addresses of y, z and v, and the gradients' addresses as last sent. Each step it checks,
in C++ (``csrc/snapshot.cpp``, built on first use with torch's extension builder), that the
group still holds the same params, at the same addresses, with dense gradients of their dtype
and device, and with the same state tensors; it then sends the step's 11 coefficients, plus the
gradients' addresses only where one moved, and launches the kernel. Anything else, or any
doubt, makes the check answer "stale": the optimizer then takes the general path, which raises
every error it promises and builds a new plan. Where the extension cannot be built (no
compiler), ``PySnapshot`` makes the same checks in Python (slower, same answers).

A capturable group (``capturable=True``) sends its hyperparameters instead of coefficients, and
``step_capturable`` lets the advance kernel compute the coefficients on the device (and, given
a found-inf flag, skip the step there: counters kept, nothing stored); while a
CUDA graph is captured, the host buffer of that upload is a new one kept with the plan (the
graph's copy reads it at each replay), and a plan a graph has captured is kept alive by the
optimizer after it is replaced.

Changes to the state (a param's state dict replaced, or z replaced inside it) are seen through
``state.TrackedState``, the optimizers' ``state`` mapping, which counts them in its ``version``;
state dicts it does not track (put there by hand) are looked into at every check. Whether a
group takes its plan, and when a plan is built, is decided in ``dispatch.py``.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from . import kernels
from .rule import StepScalars

# ParamState and TrackedState lived here: whole-optimizer pickles made before
# still name them here.
from .state import ParamState as ParamState
from .state import TrackedState as TrackedState
from .state import is_tracked

SAME, GRADS_MOVED, STALE = 0, 1, 2

# A plan's device table: the coefficients, the capturable step's hyperparameters, then the
# addresses of g, y, z and v.
_HEAD = kernels.N_SCALARS + kernels.N_HYPER

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
    out[: len(values)] = torch.tensor(kernels.float_bits(values), dtype=torch.int64)


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

    def __init__(self, group, stepped, states, zs, vs, state_map, has_v: bool, ms=None):
        params = group["params"]
        ys = [p for p, s in zip(params, stepped) if s]
        self.device = ys[0].device
        self.dtypes = (ys[0].dtype, ys[0].dtype, zs[0].dtype)
        self.n = n = len(ys)
        self.fused_flag = group["fused"]
        self.state_map = state_map
        self.version = state_map.version
        self.stream = _current_stream(self.device)
        self.switchable = (
            all(stepped) and kernels.lerp_pair_problem(ys[0].dtype, zs[0].dtype) is None
        )
        numels = tuple(map(torch.Tensor.numel, ys))
        self.tables = kernels.block_tables(self.device, numels, kernels.block_size(ys[0].dtype))
        data_ptr = torch.Tensor.data_ptr
        v_addrs = list(map(data_ptr, vs)) if has_v else [0] * n
        # AdamW's inner momentum m: planned with it or without it (the group's inner_momentum
        # moving between 0 and not 0 makes the plan stale).
        self.has_m = ms is not None
        m_addrs = list(map(data_ptr, ms)) if self.has_m else [0] * n
        # The coefficients, the capturable step's hyperparameters and g's addresses come per
        # step; y's, z's, v's and m's are fixed.
        host = [0] * (_HEAD + n)
        host += [*map(data_ptr, ys), *map(data_ptr, zs), *v_addrs, *m_addrs]
        self.meta = torch.tensor(host, dtype=torch.int64).to(self.device)
        self.addresses = kernels.address_slices(self.meta, _HEAD, n, 5)
        self.head = self.meta[: _HEAD + n]
        self.scalars = self.meta[: kernels.N_SCALARS]
        self.hyper = self.meta[kernels.N_SCALARS : _HEAD]
        self.hyper_and_grads = self.meta[kernels.N_SCALARS : _HEAD + n]
        self.captured = False  # a CUDA graph holds this plan's buffers (the optimizer keeps it)
        self._captures: list[torch.Tensor] = []  # host buffers that captured copies read
        keys = ("z", "exp_avg_sq") if has_v else ("z",)
        if self.has_m:
            keys += ("exp_avg",)
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
            and (float(group.get("inner_momentum", 0.0)) != 0.0) == self.has_m
            and not group.get("decay_at_z", False)
        )

    def _host_buffer(self):
        """The next of two host staging buffers (pinned on CUDA), once the copy that last read
        it has run: the copy queued two steps ago is done long before, so the wait costs an
        event query."""
        self._turn ^= 1
        buf = self._staging[self._turn]
        if buf is None:
            host = kernels.host_int64(_HEAD + self.n, self.device)
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
            buf = (kernels.host_int64(_HEAD + self.n, self.device), None)
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

    def step(self, prepared, s: StepScalars) -> None:
        """Sends the coefficients (and the gradients' addresses where they moved) and launches
        the kernel."""
        (host, event), status = prepared
        _put_scalars(host, kernels.step_coefficients(s))
        if status == SAME:
            self.scalars.copy_(host[: kernels.N_SCALARS], non_blocking=True)
        else:
            self.head.copy_(host, non_blocking=True)
            self.snapshot.remember_grads(host, _HEAD)
        if event is not None:
            event.record()
        flags = kernels.scalar_flags(s)
        kernels.launch_update(
            self.device, self.dtypes, flags, self.scalars, self.addresses, self.tables
        )

    def step_capturable(
        self,
        prepared,
        group,
        kind: str,
        counters: torch.Tensor,
        found: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> None:
        """The capturable step: sends the hyperparameters (and the gradients' addresses where
        they moved), then one program advances ``counters`` and writes the coefficients on the
        device, and the update kernel reads them there. Nothing the step computes passes
        through the host, so a CUDA graph that captured it replays every later step.

        ``found`` (0-d, on the plan's device): where nonzero the step is skipped on the device
        (counters kept, nothing stored). ``scale`` (0-d, on the plan's device): the gradients
        are scaled by it (GradScaler's), and the kernel unscales them as it reads them."""
        (host, event), status = prepared
        _put_scalars(host[kernels.N_SCALARS :], kernels.hyperparameters(group, kind))
        if status == SAME:
            self.hyper.copy_(host[kernels.N_SCALARS : _HEAD], non_blocking=True)
        else:
            self.hyper_and_grads.copy_(host[kernels.N_SCALARS :], non_blocking=True)
            self.snapshot.remember_grads(host, _HEAD)
        if event is not None:
            event.record()
        kernels.launch_advance(
            self.device, kind, group, counters, self.scalars, self.hyper, found, scale
        )
        flags = kernels.capturable_flags(kind, group, found is not None, scale is not None)
        kernels.launch_update(
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
        """Every param ``p <- lerp(p, z, weight)`` in one launch of the lerp kernel."""
        host = kernels.host_int64(1, self.device)
        _put_scalars(host, (weight,))
        weight_slot = self.scalars[:1]
        weight_slot.copy_(host, non_blocking=True)
        p_and_z = (self.addresses[1], self.addresses[2])
        dtypes = (self.dtypes[0], self.dtypes[2])
        kernels.launch_lerp(self.device, dtypes, weight_slot, p_and_z, self.tables)
