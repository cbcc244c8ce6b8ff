"""The Schedule-Free update rule, written once for torch.

Notation (DESIGN.md, section 1.1). The params buffer holds ``y`` while training. Per parameter
the state holds ``z`` (``state['z']``, a copy of the params at the first step) and, for AdamW
and RAdam, ``v`` (``state['exp_avg_sq']``, zeros at the first step); both live in the group's
``state_dtype`` (the param dtype when None). The average ``x`` is never stored:
``x = (y - (1 - b1) z) / b1``.

One set of scalars per param group, kept in the group dict: ``k`` (steps taken), ``weight_sum``,
``lr_max``, and ``scheduled_lr`` (this step's lr, for logging). Step ``k`` (0-based), with the
gradient ``g`` taken at ``y``::

    sched       = (k+1)/warmup_steps  if k < warmup_steps else 1
    lr          = base_lr * sched
    lr_max      = max(lr_max, lr)
    weight      = (k+1)**r * lr_max**weight_lr_power
    weight_sum += weight
    c           = weight / weight_sum          (0 if weight_sum == 0)
    v           = b2 v + (1-b2) g*g
    gn          = g / (sqrt(v / (1 - b2**(k+1))) + eps)  +  weight_decay * y
    y           = (1-c) y + c z  +  lr (b1 (1-c) - 1) gn
    z           = z - lr gn
    k          += 1

SGD has no ``v``: ``gn = g + weight_decay * y``. RAdam has no warmup: ``sched`` is the
rectification ``rect`` of RAdam, computed from ``k`` and ``b2``; while the variance estimate is
too short (``rho_k <= 4``) the step is an SGD step (``gn = g + weight_decay * y``, ``v`` still
updated) with ``rect = 0`` under ``silent_sgd_phase`` (nothing moves) and ``rect = 1`` otherwise.

Views: ``to_x_`` writes ``x = lerp(y, z, 1 - 1/b1)`` into the params, ``to_y_`` writes
``y = lerp(x, z, 1 - b1)`` back; ``x_of`` returns ``x`` as a new tensor.

Every scalar above is a Python float (float64), whatever the params' dtype (for a capturable
group, a float64 number on the device computed by ``_advance_kernel``); tensors see them
only as the coefficients ``lr``, ``c``, ``lr (b1 (1-c) - 1)``, ``b2``, ``1 - b2``,
``1 - b2**(k+1)``, ``eps`` and ``weight_decay`` of one step (``StepScalars``).

Scalars and tensors advance separately, so that a caller who steps the tensors in pieces (ZeRO-3
steps one sub-group at a time, with the other groups' param lists empty) still counts one step:

- ``advance(group, kind)`` gives a group's counters after one more step (``k``, ``lr_max``,
  ``weight_sum``, ``scheduled_lr``); the optimizers' ``advance_scalars()`` stores them, once
  for every group.
- ``scalars(group, kind)`` gives the ``StepScalars`` of the step last counted, from the group's
  counters alone; the optimizers' ``apply_update()`` reads it and moves the tensors.
- ``update(impl, ys, gs, zs, vs, s)`` moves the tensors of one group, with the step
  implementation ``impl`` that ``choose_impl`` picked: ``"loop"`` (one tensor at a time; it
  defines the math), ``"foreach"`` (torch's multi-tensor ops) or ``"fused"`` (one Triton kernel
  over many tensors that reads y, g, z, v once and writes y, z, v once; CUDA, or CPU under
  ``TRITON_INTERPRET=1``).

``averaging_weight`` is the ``weight`` line above, shared with ``ScheduleFreeWrapper``. The
gradient is only read, never written.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (any failure only disables the fused path)
    triton = tl = None
try:
    from triton.language.extra import libdevice
except Exception:  # noqa: BLE001  (only the capturable step's float64 pow needs it)
    libdevice = None

KINDS = ("adamw", "sgd", "radam")

# ---------------------------------------------------------------------------------------------
# Scalars


class StepScalars(NamedTuple):
    """The coefficients of one step, as Python floats."""

    lr: float  # this step's learning rate (warmup or rectification applied)
    c: float  # weight of z in the new average: weight / weight_sum
    y_coef: float  # lr * (b1 (1 - c) - 1): the coefficient of gn in y
    b2: float  # decay of v (unused without v)
    bias_correction2: float  # 1 - b2**(k+1)
    eps: float
    weight_decay: float
    has_v: bool  # AdamW and RAdam keep v
    normalize: bool  # gn divides g by sqrt(v / bias_correction2) + eps


def b1_of(group: dict, kind: str) -> float:
    """The momentum ``b1`` of a group: ``momentum`` for SGD, ``betas[0]`` otherwise."""
    return float(group["momentum"] if kind == "sgd" else group["betas"][0])


def _radam_rho(b2: float, step: int) -> tuple[float, float]:
    """RAdam's (rho_inf, rho_k) for the 1-based step ``step``."""
    b2_t = b2**step
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    return rho_inf, rho_inf - 2.0 * step * b2_t / (1.0 - b2_t)


def _lr_of_step(group: dict, kind: str, k: int) -> float:
    """The learning rate of step ``k`` (0-based): base lr times warmup or rectification."""
    base_lr = float(group["lr"])
    if kind == "radam":
        rho_inf, rho_k = _radam_rho(float(group["betas"][1]), k + 1)
        if rho_k > 4.0:
            num = (rho_k - 4.0) * (rho_k - 2.0) * rho_inf
            rect = math.sqrt(num / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_k))
        else:
            rect = 0.0 if group["silent_sgd_phase"] else 1.0
        return base_lr * rect
    warmup_steps = group["warmup_steps"]
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    return base_lr * sched


def averaging_weight(k: int, lr_max: float, r: float, weight_lr_power: float) -> float:
    """Weight of step ``k`` (0-based) in the average x: ``(k+1)**r * lr_max**weight_lr_power``."""
    return float((k + 1) ** float(r) * float(lr_max) ** float(weight_lr_power))


def _weight(group: dict, k: int, lr_max: float) -> float:
    return averaging_weight(k, lr_max, group["r"], group["weight_lr_power"])


def advance(group: dict, kind: str) -> dict:
    """The counters of ``group`` after one more step: ``k``, ``lr_max``, ``weight_sum`` and
    ``scheduled_lr``, as a dict for ``group.update`` (the group itself is left unchanged)."""
    k = int(group["k"])
    lr = _lr_of_step(group, kind, k)
    lr_max = max(float(group["lr_max"]), lr)
    return {
        "k": k + 1,
        "lr_max": lr_max,
        "weight_sum": float(group["weight_sum"]) + _weight(group, k, lr_max),
        "scheduled_lr": lr,
    }


def scalars(group: dict, kind: str) -> StepScalars:
    """The ``StepScalars`` of the step that ``advance`` counted last in ``group``."""
    k = int(group["k"]) - 1
    if k < 0:
        raise RuntimeError("no step counted yet: call advance_scalars() before apply_update()")
    lr = _lr_of_step(group, kind, k)
    weight_sum = float(group["weight_sum"])
    c = _weight(group, k, float(group["lr_max"])) / weight_sum if weight_sum != 0 else 0.0
    b1 = b1_of(group, kind)
    if kind == "sgd":
        b2, eps, normalize = 0.0, 0.0, False
    else:
        b2, eps = float(group["betas"][1]), float(group["eps"])
        normalize = kind == "adamw" or _radam_rho(b2, k + 1)[1] > 4.0
    return StepScalars(
        lr=lr,
        c=c,
        y_coef=lr * (b1 * (1.0 - c) - 1.0),
        b2=b2,
        bias_correction2=1.0 - b2 ** (k + 1),
        eps=eps,
        weight_decay=float(group["weight_decay"]),
        has_v=kind != "sgd",
        normalize=normalize,
    )


# ---------------------------------------------------------------------------------------------
# Views


def _lerp_(p: torch.Tensor, z: torch.Tensor, weight: float) -> None:
    z = z.to(p.device)
    if p.dtype == z.dtype:
        p.lerp_(z, weight)
    else:
        p.copy_(p.to(z.dtype).lerp_(z, weight))


def view_weight(view: str, b1: float) -> float:
    """The lerp weight toward z that gives a view from the other: ``x = lerp(y, z, 1 - 1/b1)``,
    ``y = lerp(x, z, 1 - b1)``."""
    if view == "x":
        return 1.0 - 1.0 / b1
    if view == "y":
        return 1.0 - b1
    raise ValueError(f"view must be 'x' or 'y', got {view!r}")


def to_x_(p: torch.Tensor, z: torch.Tensor, b1: float) -> None:
    """y -> x in place: ``x = (y - (1-b1) z) / b1``, computed in z's dtype."""
    _lerp_(p, z, view_weight("x", b1))


def to_y_(p: torch.Tensor, z: torch.Tensor, b1: float) -> None:
    """x -> y in place: ``y = b1 x + (1-b1) z``, computed in z's dtype."""
    _lerp_(p, z, view_weight("y", b1))


def switch_impl(params, zs, fused: bool | None) -> str:
    """The implementation ``switch_`` uses for these params: ``"fused"`` (one Triton kernel
    per (device, dtype) bucket) or ``"loop"``; ``fused`` as in ``choose_impl`` (True raises a
    RuntimeError saying why the kernel cannot run)."""
    if fused or (fused is None and not _INTERPRET):
        problem = _lerp_fused_problem(params, zs)
        if problem is None:
            return "fused"
        if fused:
            raise RuntimeError(problem)
    return "loop"


def switch_(view: str, params, zs, b1: float, impl: str = "loop") -> None:
    """``to_x_`` (``view="x"``) or ``to_y_`` (``view="y"``) for many params at once.

    The fused kernel reads p and z once and writes p once, computing in z's dtype like
    ``_lerp_`` but without its temporary float32 copy of p when the dtypes differ (bf16 params,
    float32 z).
    """
    weight = view_weight(view, b1)
    if impl == "fused":
        _lerp_fused(params, zs, weight)
    else:
        for p, z in zip(params, zs):
            _lerp_(p, z, weight)


def x_of(p: torch.Tensor, z: torch.Tensor, b1: float) -> torch.Tensor:
    """``x`` from ``y = p`` as a new tensor, equal to what ``to_x_`` would write into ``p``."""
    x = p.detach().to(z.dtype, copy=True)
    x.lerp_(z.to(p.device), view_weight("x", b1))
    return x.to(p.dtype)


# ---------------------------------------------------------------------------------------------
# Tensor update: loop (the definition), foreach, fused


def _update_loop(ys, gs, zs, vs, s: StepScalars) -> None:
    for y, g, z, v in zip(ys, gs, zs, vs):
        # Work in the state's dtype (float32 state for bf16 params computes in float32).
        yw = y if y.dtype == z.dtype else y.to(z.dtype)
        gw = g if g.dtype == z.dtype else g.to(z.dtype)
        if s.has_v:
            v.mul_(s.b2).addcmul_(gw, gw, value=1.0 - s.b2)
        if s.normalize:
            gn = gw.div(v.div(s.bias_correction2).sqrt_().add_(s.eps))
            if s.weight_decay != 0:
                gn.add_(yw, alpha=s.weight_decay)
        else:
            gn = gw.add(yw, alpha=s.weight_decay) if s.weight_decay != 0 else gw
        yw.lerp_(z, s.c)
        yw.add_(gn, alpha=s.y_coef)
        z.sub_(gn, alpha=s.lr)
        if yw is not y:
            y.copy_(yw)


_FOREACH_CHUNK = 1 << 25  # elements per multi-tensor call: bounds its temporaries (gn, ...)


def _chunks(ys, gs, zs, vs, limit: int):
    """The bucket's lists cut into runs of at most ``limit`` elements (a larger tensor alone)."""
    start, total = 0, 0
    for i, n in enumerate(map(torch.Tensor.numel, ys)):
        if total and total + n > limit:
            yield ys[start:i], gs[start:i], zs[start:i], vs[start:i]
            start, total = i, 0
        total += n
    if start < len(ys):
        yield ys[start:], gs[start:], zs[start:], vs[start:]


def _update_foreach(ys, gs, zs, vs, s: StepScalars) -> None:
    for bucket in _buckets(ys, gs, zs, vs).values():
        for chunk in _chunks(*bucket, _FOREACH_CHUNK):
            _update_foreach_chunk(*chunk, s)


def _update_foreach_chunk(ys_, gs_, zs_, vs_, s: StepScalars) -> None:
    work = zs_[0].dtype
    yw = ys_ if ys_[0].dtype == work else [y.to(work) for y in ys_]
    gw = gs_ if gs_[0].dtype == work else [g.to(work) for g in gs_]
    if s.has_v:
        torch._foreach_mul_(vs_, s.b2)
        torch._foreach_addcmul_(vs_, gw, gw, value=1.0 - s.b2)
    if s.normalize:
        denom = torch._foreach_div(vs_, s.bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, s.eps)
        gn = torch._foreach_div(gw, denom)
        del denom
        if s.weight_decay != 0:
            torch._foreach_add_(gn, yw, alpha=s.weight_decay)
    else:
        gn = torch._foreach_add(gw, yw, alpha=s.weight_decay) if s.weight_decay != 0 else gw
    torch._foreach_lerp_(yw, zs_, weight=s.c)
    torch._foreach_add_(yw, gn, alpha=s.y_coef)
    torch._foreach_sub_(zs_, gn, alpha=s.lr)
    if yw is not ys_:
        torch._foreach_copy_(ys_, yw)


def _buckets(ys, gs, zs, vs) -> dict:
    """Split the lists by (device, y dtype, g dtype, state dtype): one multi-tensor call each."""
    dtype = operator.attrgetter("dtype")
    devices = set(map(torch.Tensor.get_device, ys))
    y_dtypes, g_dtypes, s_dtypes = set(map(dtype, ys)), set(map(dtype, gs)), set(map(dtype, zs))
    if len(devices) == len(y_dtypes) == len(g_dtypes) == len(s_dtypes) == 1:
        # The common case, without a key per tensor (many small tensors make this add up).
        key = (devices.pop(), y_dtypes.pop(), g_dtypes.pop(), s_dtypes.pop())
        return {key: (ys, gs, zs, vs)}
    out: dict = {}
    for y, g, z, v in zip(ys, gs, zs, vs):
        key = (y.get_device(), y.dtype, g.dtype, z.dtype)
        lists = out.get(key)
        if lists is None:
            lists = out[key] = ([], [], [], [])
        lists[0].append(y)
        lists[1].append(g)
        lists[2].append(z)
        lists[3].append(v)
    return out


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DTYPE_SET = frozenset(_FUSED_DTYPES)
# lr, c, y_coef, b2, 1 - b2, bias_correction2, eps, weight_decay, normalize (1.0 or 0.0)
_N_SCALARS = 9
# The capturable step's hyperparameters, on the device: lr, b1, b2, eps, weight_decay,
# warmup_steps, r, weight_lr_power (float64 bit patterns, like the coefficients).
_N_HYPER = 8
_BLOCK = 1024  # elements per program (32- and 64-bit params)
_BLOCK_16BIT = 512  # for 16-bit params: measured faster on an H200 for SGD (91% vs 88% of copy)
_NUM_WARPS = 4


def block_size(p_dtype: torch.dtype) -> int:
    """Elements per program of the kernels for params of ``p_dtype``."""
    return _BLOCK_16BIT if p_dtype.itemsize == 2 else _BLOCK


# triton.jit decides at decoration (here, at import) whether kernels run in Triton's CPU
# interpreter, from TRITON_INTERPRET; the checks below follow that same decision.
if triton is None:
    _INTERPRET = False
elif getattr(triton, "knobs", None) is not None:
    _INTERPRET = bool(triton.knobs.runtime.interpret)
else:
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether the fused kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 was set
    before sf_torch was imported)."""
    return _INTERPRET


def _device_problem(t: torch.Tensor) -> str | None:
    if t.dtype not in _FUSED_DTYPES:
        return f"fused=True steps float16/bfloat16/float32/float64 tensors only, got {t.dtype}"
    if _INTERPRET and not t.is_cpu:
        return (
            "fused=True under TRITON_INTERPRET=1 runs Triton's CPU interpreter, which steps "
            f"CPU tensors only, got a tensor on {t.device}; unset TRITON_INTERPRET"
        )
    if not _INTERPRET and not t.is_cuda:
        return (
            f"fused=True needs CUDA tensors, got a tensor on {t.device}: pass fused=False, or "
            "set TRITON_INTERPRET=1 before importing sf_torch to run the kernel in Triton's "
            "CPU interpreter (slow; meant for tests)"
        )
    return None


_NO_TRITON = (
    "fused=True needs Triton, which could not be imported: install triton or pass fused=False"
)


def fused_problem(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the fused kernel cannot step these tensors (None when it can)."""
    if triton is None:
        return _NO_TRITON
    for t in tensors:
        problem = _device_problem(t)
        if problem is not None:
            return problem
    return None


def _layout(t: torch.Tensor) -> tuple[int, ...] | None:
    """The strides of a dense (gap-free, non-overlapping) tensor, size-1 dims left out; None
    for a tensor that is not dense."""
    strides = tuple(st for st, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for st, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if st != expected:
            return None
        expected *= n
    return strides


def _same_dense_layout(p: torch.Tensor, g, z, v) -> bool:
    """The fused kernel walks flat memory: the buffers must share one dense layout (contiguous,
    channels_last, transposed, ...)."""
    if (
        p.is_contiguous()
        and g.is_contiguous()
        and (z is None or z.is_contiguous())
        and (v is None or v.is_contiguous())
    ):
        return True
    layout = _layout(p)
    return layout is not None and all(t is None or _layout(t) == layout for t in (g, z, v))


def _group_fused_problem(params, grads, states) -> str | None:
    if triton is None:
        return _NO_TRITON
    # Fast path, with C-level loops: every tensor on the kernel's device, in a dtype it steps,
    # contiguous. Anything else gets the per-tensor check below and its message.
    on_device = operator.attrgetter("is_cpu" if _INTERPRET else "is_cuda")
    dtype = operator.attrgetter("dtype")
    contiguous = torch.Tensor.is_contiguous
    buffers = [
        t for st in states if st for t in (st.get("z"), st.get("exp_avg_sq")) if t is not None
    ]
    if (
        all(map(on_device, params))
        and all(map(on_device, grads))
        and set(map(dtype, params)) | set(map(dtype, grads)) <= _FUSED_DTYPE_SET
        and all(map(contiguous, params))
        and all(map(contiguous, grads))
        and all(map(contiguous, buffers))
    ):
        return None
    for p, g, st in zip(params, grads, states):
        z, v = (st.get("z"), st.get("exp_avg_sq")) if st else (None, None)
        ok_device = (p.is_cpu and g.is_cpu) if _INTERPRET else (p.is_cuda and g.is_cuda)
        if not (ok_device and p.dtype in _FUSED_DTYPES and g.dtype in _FUSED_DTYPES):
            return _device_problem(p) or _device_problem(g)
        if not _same_dense_layout(p, g, z, v):
            return (
                "fused=True needs each param, its grad and its state to share one dense "
                "layout (no gaps or overlaps, same strides); pass fused=False for params such "
                f"as one of shape {tuple(p.shape)} and strides {p.stride()}"
            )
    return None


def choose_impl(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict | None],
    foreach: bool | None,
    fused: bool | None,
) -> str:
    """The one place that picks the step implementation of a group.

    ``fused=True``: the Triton kernel, or a RuntimeError saying why it cannot run.
    ``fused=None``: the Triton kernel when every param is a CUDA tensor it can step (never the
    interpreter), else as ``fused=False``. ``fused=False``: ``foreach=True``: torch's
    multi-tensor ops; ``foreach=False``: the loop; ``foreach=None``: multi-tensor ops when every
    param is a CUDA tensor, else the loop (as torch's optimizers choose: on the CPU the
    multi-tensor ops run the same per-tensor kernels, and their whole-list temporaries cost
    memory and time, e.g. DeepSpeed's CPU-offloaded masters).
    """
    if fused or (fused is None and not _INTERPRET):
        problem = _group_fused_problem(params, grads, states)
        if problem is None:
            return "fused"
        if fused:
            raise RuntimeError(problem)
    if foreach is None:
        foreach = all(map(operator.attrgetter("is_cuda"), params))
    return "foreach" if foreach else "loop"


def update(impl: str, ys, gs, zs, vs, s: StepScalars) -> None:
    """Move ``y``, ``z`` and ``v`` (None for SGD) of one group by one step with ``s``."""
    if impl == "fused":
        _update_fused(ys, gs, zs, vs, s)
    elif impl == "foreach":
        _update_foreach(ys, gs, zs, vs, s)
    else:
        _update_loop(ys, gs, zs, vs, s)


if triton is not None:

    @triton.jit
    def _to_bf16_rn(x):
        """``x.to(tl.bfloat16)`` rounding to nearest even, in integer arithmetic: Triton's
        interpreter truncates instead, and the kernel must round the same way in both."""
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _program_block(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK: tl.constexpr):
        """This program's tensor index, element offsets within it, and the in-bounds mask."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid)
        offs = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK)
        return t, offs, offs < tl.load(numel_ptr + t)

    @triton.jit
    def _lerp(a, b, w):
        """torch.lerp's two-sided formula, so that fused results track torch's closely."""
        return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))

    @triton.jit
    def _store(ptr, value, DTYPE: tl.constexpr, mask):
        out = _to_bf16_rn(value) if DTYPE == tl.bfloat16 else value.to(DTYPE)
        tl.store(ptr, out, mask=mask)

    @triton.jit
    def _fused_update_kernel(
        scalars_ptr,  # int64: the _N_SCALARS coefficients as float64 bit patterns
        g_addr_ptr,  # int64 per tensor: the addresses of g, y, z and v
        y_addr_ptr,
        z_addr_ptr,
        v_addr_ptr,
        block_tensor_ptr,  # int32 per program: which tensor it steps
        block_start_ptr,  # int64 per program: first element of its block
        numel_ptr,  # int64 per tensor
        Y_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        F64: tl.constexpr,  # compute in float64 (else float32)
        HAS_V: tl.constexpr,
        NORMALIZE: tl.constexpr,  # 0: gn = g; 1: g / (sqrt(v / bc2) + eps); 2: as scalar 8 says
        DECAY: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t, offs, mask = _program_block(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
        ct = tl.float64 if F64 else tl.float32

        lr = tl.load(scalars_ptr + 0).to(tl.float64, bitcast=True).to(ct)
        c = tl.load(scalars_ptr + 1).to(tl.float64, bitcast=True).to(ct)
        y_coef = tl.load(scalars_ptr + 2).to(tl.float64, bitcast=True).to(ct)
        b2 = tl.load(scalars_ptr + 3).to(tl.float64, bitcast=True).to(ct)
        one_minus_b2 = tl.load(scalars_ptr + 4).to(tl.float64, bitcast=True).to(ct)
        bias_correction2 = tl.load(scalars_ptr + 5).to(tl.float64, bitcast=True).to(ct)
        eps = tl.load(scalars_ptr + 6).to(tl.float64, bitcast=True).to(ct)
        weight_decay = tl.load(scalars_ptr + 7).to(tl.float64, bitcast=True).to(ct)

        y_ptr = tl.load(y_addr_ptr + t).to(tl.pointer_type(Y_DTYPE)) + offs
        g_ptr = tl.load(g_addr_ptr + t).to(tl.pointer_type(G_DTYPE)) + offs
        z_ptr = tl.load(z_addr_ptr + t).to(tl.pointer_type(S_DTYPE)) + offs

        y = tl.load(y_ptr, mask=mask).to(ct)
        g = tl.load(g_ptr, mask=mask).to(ct)
        z = tl.load(z_ptr, mask=mask).to(ct)
        if HAS_V:
            v_ptr = tl.load(v_addr_ptr + t).to(tl.pointer_type(S_DTYPE)) + offs
            v = tl.load(v_ptr, mask=mask).to(ct)
            v = v * b2 + one_minus_b2 * g * g
            _store(v_ptr, v, S_DTYPE, mask)
        if NORMALIZE != 0:
            # IEEE-rounded sqrt and division in float32, as torch computes them.
            bc2 = tl.zeros_like(v) + bias_correction2
            if F64:
                gn = g / (tl.sqrt(v / bc2) + eps)
            else:
                gn = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
            if NORMALIZE == 2:  # RAdam's capturable step: the advance kernel decided
                flag = tl.load(scalars_ptr + 8).to(tl.float64, bitcast=True)
                gn = tl.where(flag != 0.0, gn, g)
        else:
            gn = g
        if DECAY:
            gn = gn + weight_decay * y
        y = _lerp(y, z, c) + y_coef * gn
        z = z - lr * gn
        _store(y_ptr, y, Y_DTYPE, mask)
        _store(z_ptr, z, S_DTYPE, mask)

    @triton.jit
    def _fused_lerp_kernel(
        weight_ptr,  # int64: the lerp weight as float64 bits
        p_addr_ptr,  # int64 per tensor: the addresses of p and z
        z_addr_ptr,
        block_tensor_ptr,
        block_start_ptr,
        numel_ptr,
        P_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        F64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t, offs, mask = _program_block(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
        ct = tl.float64 if F64 else tl.float32
        w = tl.load(weight_ptr).to(tl.float64, bitcast=True).to(ct)
        p_ptr = tl.load(p_addr_ptr + t).to(tl.pointer_type(P_DTYPE)) + offs
        z_ptr = tl.load(z_addr_ptr + t).to(tl.pointer_type(S_DTYPE)) + offs
        p = tl.load(p_ptr, mask=mask).to(ct)
        z = tl.load(z_ptr, mask=mask).to(ct)
        _store(p_ptr, _lerp(p, z, w), P_DTYPE, mask)

    @triton.jit
    def _pow(x, p, INTERPRET: tl.constexpr):
        """``x ** p`` in float64 for ``x >= 0`` as Python computes it (``0 ** 0 == 1``).
        libdevice's pow on the GPU; the interpreter has no libdevice, but its exp and log are
        numpy's float64 ones (on the GPU, Triton's float64 exp and log are not: ~1e-8)."""
        safe = tl.where(x > 0.0, x, 1.0)
        if INTERPRET:
            out = tl.exp(p * tl.log(safe))
        else:
            out = libdevice.pow(safe, p)
        out = tl.where(x > 0.0, out, 0.0)
        return tl.where(p == 0.0, 1.0, out)

    @triton.jit
    def _f64_at(ptr, i):
        return tl.load(ptr + i).to(tl.float64, bitcast=True)

    @triton.jit
    def _put_f64(ptr, i, value):
        tl.store(ptr + i, value.to(tl.float64).to(tl.int64, bitcast=True))

    @triton.jit
    def _advance_kernel(
        counters_ptr,  # float64: k, lr_max, weight_sum, scheduled_lr (read, then advanced)
        scalars_ptr,  # int64 out: the update kernel's _N_SCALARS coefficients (float64 bits)
        hyper_ptr,  # int64: the _N_HYPER hyperparameters (float64 bits)
        KIND: tl.constexpr,  # 0 adamw, 1 sgd, 2 radam
        SILENT: tl.constexpr,  # RAdam's silent_sgd_phase
        INTERPRET: tl.constexpr,
    ):
        """``advance`` and ``scalars`` of one group on the device, one program: the capturable
        step's counters never leave the device, so a CUDA graph can replay the step."""
        lr = _f64_at(hyper_ptr, 0)
        b1 = _f64_at(hyper_ptr, 1)
        b2 = _f64_at(hyper_ptr, 2)
        warmup = _f64_at(hyper_ptr, 5)
        k = tl.load(counters_ptr + 0)
        step = k + 1.0
        b2_t = _pow(b2, step, INTERPRET)
        if KIND == 2:
            rho_inf = 2.0 / tl.where(b2 < 1.0, 1.0 - b2, 1.0) - 1.0
            rho_k = rho_inf - 2.0 * step * b2_t / tl.where(b2_t < 1.0, 1.0 - b2_t, 1.0)
            on = rho_k > 4.0
            num = (rho_k - 4.0) * (rho_k - 2.0) * rho_inf
            den = tl.where(on, (rho_inf - 4.0) * (rho_inf - 2.0) * rho_k, 1.0)
            rect = tl.sqrt(tl.where(on, num / den, 1.0))
            lr_t = lr * tl.where(on, rect, 0.0 if SILENT else 1.0)
            normalize = tl.where(on, 1.0, 0.0)
        else:
            sched = tl.where(k < warmup, step / tl.maximum(warmup, 1.0), 1.0)
            lr_t = lr * sched
            normalize = tl.zeros_like(lr) + (1.0 if KIND == 0 else 0.0)
        lr_max = tl.maximum(tl.load(counters_ptr + 1), lr_t)
        weight = _pow(step, _f64_at(hyper_ptr, 6), INTERPRET) * _pow(
            lr_max, _f64_at(hyper_ptr, 7), INTERPRET
        )
        weight_sum = tl.load(counters_ptr + 2) + weight
        c = tl.where(weight_sum != 0.0, weight / tl.where(weight_sum != 0.0, weight_sum, 1.0), 0.0)
        _put_f64(scalars_ptr, 0, lr_t)
        _put_f64(scalars_ptr, 1, c)
        _put_f64(scalars_ptr, 2, lr_t * (b1 * (1.0 - c) - 1.0))
        _put_f64(scalars_ptr, 3, b2)
        _put_f64(scalars_ptr, 4, 1.0 - b2)
        _put_f64(scalars_ptr, 5, 1.0 - b2_t)
        _put_f64(scalars_ptr, 6, _f64_at(hyper_ptr, 3))
        _put_f64(scalars_ptr, 7, _f64_at(hyper_ptr, 4))
        _put_f64(scalars_ptr, 8, normalize)
        tl.store(counters_ptr + 0, step)
        tl.store(counters_ptr + 1, lr_max)
        tl.store(counters_ptr + 2, weight_sum)
        tl.store(counters_ptr + 3, lr_t)


@functools.lru_cache(maxsize=64)
def _block_tables(device: torch.device, numels: tuple[int, ...], block: int = _BLOCK):
    """Per-program (tensor index, first element) tables and the numel table of one bucket, and
    the block size they are cut for."""
    blocks = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor.long()]) * block
    numel = torch.tensor(numels, dtype=torch.int64)
    return block_tensor.to(device), block_start.to(device), numel.to(device), block


_TL_DTYPES = {}
if tl is not None:
    _TL_DTYPES = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }


def _lerp_pair_problem(p_dtype: torch.dtype, z_dtype: torch.dtype) -> str | None:
    if z_dtype != p_dtype and z_dtype.itemsize <= p_dtype.itemsize:
        return (
            f"fused=True switches params whose z is as wide or wider (float32 z for bf16 "
            f"params), got {p_dtype} params with {z_dtype} z"
        )
    return None


def _lerp_fused_problem(params, zs) -> str | None:
    if triton is None:
        return _NO_TRITON
    # Fast path, with C-level loops (as in _group_fused_problem): one device, dtypes the
    # kernel switches, everything contiguous.
    on_device = operator.attrgetter("is_cpu" if _INTERPRET else "is_cuda")
    dtype = operator.attrgetter("dtype")
    pairs = set(zip(map(dtype, params), map(dtype, zs)))
    if (
        all(map(on_device, params))
        and all(map(on_device, zs))
        and len(set(map(torch.Tensor.get_device, params)) | set(map(torch.Tensor.get_device, zs)))
        <= 1
        and {d for pair in pairs for d in pair} <= _FUSED_DTYPE_SET
        and not any(_lerp_pair_problem(*pair) for pair in pairs)
        and all(map(torch.Tensor.is_contiguous, params))
        and all(map(torch.Tensor.is_contiguous, zs))
    ):
        return None
    for p, z in zip(params, zs):
        problem = _device_problem(p) or _device_problem(z)
        if problem is not None:
            return problem
        if p.device != z.device:
            return f"fused=True needs z on the param's device ({p.device}), got {z.device}"
        problem = _lerp_pair_problem(p.dtype, z.dtype)
        if problem is not None:
            return problem
        if not _same_dense_layout(p, z, None, None):
            return (
                "fused=True needs each param and its z to share one dense layout; pass "
                f"fused=False for params such as one of shape {tuple(p.shape)} and strides "
                f"{p.stride()}"
            )
    return None


def _launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    # Triton launches on the current device: switch to the tensors' device only when it is
    # another one (the context manager costs more than the rest of a small step's launch).
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _launch_blocks(kernel, device: torch.device, tables, *args, **constexprs) -> None:
    """``kernel`` over one bucket: a program per block of ``tables`` (``_block_tables``), the
    tables after ``args``, the block size as ``BLOCK``."""
    block_tensor, block_start, numel, block = tables
    grid = (block_tensor.numel(),)
    _launch(
        kernel,
        grid,
        device,
        *args,
        block_tensor,
        block_start,
        numel,
        BLOCK=block,
        num_warps=_NUM_WARPS,
        **constexprs,
    )


def host_int64(n: int, device: torch.device) -> torch.Tensor:
    """An uninitialised int64 host buffer of ``n`` entries, pinned when ``device`` is CUDA (so
    that copying it to the device does not wait; torch's host allocator keeps a pinned block
    until the copies that read it have run)."""
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")


def float_bits(values) -> list[int]:
    """Python floats as the int64 bit patterns of their float64 values."""
    n = len(values)
    return list(struct.unpack(f"<{n}q", struct.pack(f"<{n}d", *values)))


def step_coefficients(s: StepScalars) -> tuple[float, ...]:
    """The update kernel's ``_N_SCALARS`` coefficients of one step, in the kernel's order."""
    return (
        s.lr,
        s.c,
        s.y_coef,
        s.b2,
        1.0 - s.b2,
        s.bias_correction2,
        s.eps,
        s.weight_decay,
        1.0 if s.normalize else 0.0,
    )


def hyperparameters(group: dict, kind: str) -> tuple[float, ...]:
    """The capturable step's ``_N_HYPER`` hyperparameters of a group, in the advance kernel's
    order (SGD: no b2, no eps)."""
    b2, eps = (0.0, 0.0) if kind == "sgd" else (float(group["betas"][1]), float(group["eps"]))
    warmup = 0.0 if kind == "radam" else float(group["warmup_steps"])
    return (
        float(group["lr"]),
        b1_of(group, kind),
        b2,
        eps,
        float(group["weight_decay"]),
        warmup,
        float(group["r"]),
        float(group["weight_lr_power"]),
    )


def capturable_flags(kind: str, group: dict) -> dict:
    """The update kernel's HAS_V / NORMALIZE / DECAY for a capturable step of ``group``: RAdam
    leaves normalizing to the advance kernel's flag (it changes after a few steps)."""
    return dict(
        HAS_V=kind != "sgd",
        NORMALIZE={"adamw": 1, "sgd": 0, "radam": 2}[kind],
        DECAY=float(group["weight_decay"]) != 0,
    )


def _meta(bits: list[int], addrs: list[int], device: torch.device) -> torch.Tensor:
    """The scalars' bit patterns and the tensors' addresses, copied to the device in one go."""
    host = torch.tensor(bits + addrs, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def address_slices(meta: torch.Tensor, start: int, n: int, count: int) -> list[torch.Tensor]:
    """``count`` views of ``meta``, each of ``n`` addresses, from ``start`` on: the kernels'
    per-tensor address tables."""
    return [meta[start + i * n : start + (i + 1) * n] for i in range(count)]


def launch_update(
    device: torch.device,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    flags: dict,
    scalars: torch.Tensor,
    addresses: Sequence[torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    """One launch of the update kernel: ``scalars`` holds the step's coefficients (float64
    bits, on the device), ``addresses`` the g, y, z and v address tables (v's unused without
    v), ``tables`` the bucket's ``_block_tables``; ``dtypes`` are y's, g's and the state's;
    ``flags`` the kernel's HAS_V, NORMALIZE and DECAY (``scalar_flags`` or
    ``capturable_flags``)."""
    y_dtype, g_dtype, s_dtype = dtypes
    _launch_blocks(
        _fused_update_kernel,
        device,
        tables,
        scalars,
        *addresses,
        Y_DTYPE=_TL_DTYPES[y_dtype],
        G_DTYPE=_TL_DTYPES[g_dtype],
        S_DTYPE=_TL_DTYPES[s_dtype],
        F64=torch.float64 in (y_dtype, s_dtype),
        **flags,
    )


def scalar_flags(s: StepScalars) -> dict:
    """The update kernel's HAS_V / NORMALIZE / DECAY for a step with host scalars ``s``."""
    return dict(HAS_V=s.has_v, NORMALIZE=int(s.normalize), DECAY=s.weight_decay != 0)


def launch_advance(
    device: torch.device,
    kind: str,
    group: dict,
    counters: torch.Tensor,
    scalars: torch.Tensor,
    hyper: torch.Tensor,
) -> None:
    """One program of the advance kernel: ``counters`` (float64 k, lr_max, weight_sum,
    scheduled_lr) move one step on the device and ``scalars`` receive that step's
    coefficients, from the hyperparameters in ``hyper`` (``hyperparameters``' bits of
    ``group``, which also gives RAdam's ``silent_sgd_phase``)."""
    _launch(
        _advance_kernel,
        (1,),
        device,
        counters,
        scalars,
        hyper,
        KIND=KINDS.index(kind),
        SILENT=bool(group.get("silent_sgd_phase", False)),
        INTERPRET=_INTERPRET,
    )


def launch_lerp(
    device: torch.device,
    dtypes: tuple[torch.dtype, torch.dtype],
    weight: torch.Tensor,
    addresses: Sequence[torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    """One launch of the switch kernel: ``weight`` (float64 bits, on the device), the p and z
    address tables, the bucket's ``_block_tables``; ``dtypes`` are p's and z's."""
    p_dtype, s_dtype = dtypes
    _launch_blocks(
        _fused_lerp_kernel,
        device,
        tables,
        weight,
        *addresses,
        P_DTYPE=_TL_DTYPES[p_dtype],
        S_DTYPE=_TL_DTYPES[s_dtype],
        F64=torch.float64 in (p_dtype, s_dtype),
    )


def _lerp_fused(params, zs, weight: float) -> None:
    bits = float_bits([weight])
    data_ptr = torch.Tensor.data_ptr
    # _buckets keys by (device, y, g, state dtypes): p stands in for both y and g here.
    for (_, p_dtype, _, s_dtype), (ps, _, zs_, _) in _buckets(params, params, zs, zs).items():
        device = ps[0].device
        tables = _block_tables(device, tuple(map(torch.Tensor.numel, ps)), block_size(p_dtype))
        if tables[0].numel() == 0:
            continue
        meta = _meta(bits, [*map(data_ptr, ps), *map(data_ptr, zs_)], device)
        launch_lerp(device, (p_dtype, s_dtype), meta, address_slices(meta, 1, len(ps), 2), tables)


def _update_fused(ys, gs, zs, vs, s: StepScalars) -> None:
    bits = float_bits(step_coefficients(s))
    data_ptr = torch.Tensor.data_ptr
    for (_, y_dtype, g_dtype, s_dtype), (ys_, gs_, zs_, vs_) in _buckets(ys, gs, zs, vs).items():
        device = ys_[0].device
        tables = _block_tables(device, tuple(map(torch.Tensor.numel, ys_)), block_size(y_dtype))
        if tables[0].numel() == 0:
            continue
        addrs = [*map(data_ptr, gs_), *map(data_ptr, ys_), *map(data_ptr, zs_)]
        addrs += list(map(data_ptr, vs_)) if s.has_v else [0] * len(vs_)
        meta = _meta(bits, addrs, device)
        addresses = address_slices(meta, _N_SCALARS, len(ys_), 4)
        launch_update(device, (y_dtype, g_dtype, s_dtype), scalar_flags(s), meta, addresses, tables)
