"""The Triton kernels of the fused step, and everything that launches them.

Three kernels, each over many tensors at once (one launch per bucket of one device and one
dtype each, ``rule.buckets``), walking flat memory block by block:

- the update kernel: ``rule.update_loop``'s step, reading y, g, z, v (and AdamW's inner
  momentum m, where it is on: ``HAS_M``) once and writing them once, from the step's
  ``N_SCALARS`` coefficients (float64 bit patterns on the device);
  capturable steps can also unscale g (GradScaler's scale) and skip the step (store nothing)
  where the advance kernel says so;
- the lerp kernel: ``p <- lerp(p, z, weight)``, the eval()/train() switch;
- the advance kernel (one program): ``rule.advance`` and ``rule.scalars`` of one group on the
  device, from its ``N_HYPER`` hyperparameters, for the capturable step (nothing it computes
  passes through the host, so a CUDA graph can replay it). Given a found-inf flag (a non-finite
  gradient somewhere in the optimizer: ``dispatch.nonfinite_found`` or GradScaler's), it leaves
  the counters as they were and tells the update kernel to skip, all on the device.

Around them: the eligibility checks (``*_problem``: why the kernel cannot run, or None), the
per-bucket block tables, the host and device buffers of coefficients and addresses, the
launches, and ``update_fused`` / ``lerp_fused``, the general (unplanned) fused step and switch.
They run on CUDA, or on the CPU in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before sf_torch was imported (slow; for tests).
"""

from __future__ import annotations

import functools
import operator
import os
import struct
from collections.abc import Sequence

import torch

from . import rule
from .rule import StepScalars

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (any failure only disables the fused path)
    triton = tl = None
try:
    from triton.language.extra import libdevice
except Exception:  # noqa: BLE001  (only the capturable step's float64 pow needs it)
    libdevice = None

# lr, c, y_coef, b2, 1 - b2, bias_correction2, eps, weight_decay, normalize (1.0 or 0.0),
# skip (1.0: store nothing), inv_scale (the gradients' unscaling factor, float32's value),
# inner_momentum, 1 - inner_momentum, bias_correction1 (AdamW's inner momentum m)
N_SCALARS = 14
# The capturable step's hyperparameters, on the device: lr, b1, b2, eps, weight_decay,
# warmup_steps, r, weight_lr_power, inner_momentum (float64 bit patterns, like the
# coefficients).
N_HYPER = 9

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_SET = frozenset(_DTYPES)
_BLOCK = 1024  # elements per program (32- and 64-bit params)
_BLOCK_16BIT = 512  # for 16-bit params: measured faster on an H200 for SGD (91% vs 88% of copy)
_NUM_WARPS = 4

# triton.jit decides at decoration (here, at import) whether kernels run in Triton's CPU
# interpreter, from TRITON_INTERPRET; the checks below and dispatch's choices follow that same
# decision, read at each call (tests set it to check both answers on one machine).
if triton is None:
    INTERPRET = False
elif getattr(triton, "knobs", None) is not None:
    INTERPRET = bool(triton.knobs.runtime.interpret)
else:
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def block_size(p_dtype: torch.dtype) -> int:
    """Elements per program of the kernels for params of ``p_dtype``."""
    return _BLOCK_16BIT if p_dtype.itemsize == 2 else _BLOCK


# ---------------------------------------------------------------------------------------------
# Why the kernel cannot run (None when it can)

_NO_TRITON = (
    "fused=True needs Triton, which could not be imported: install triton or pass fused=False"
)


def _device_problem(t: torch.Tensor) -> str | None:
    if t.dtype not in _DTYPES:
        return f"fused=True steps float16/bfloat16/float32/float64 tensors only, got {t.dtype}"
    if INTERPRET and not t.is_cpu:
        return (
            "fused=True under TRITON_INTERPRET=1 runs Triton's CPU interpreter, which steps "
            f"CPU tensors only, got a tensor on {t.device}; unset TRITON_INTERPRET"
        )
    if not INTERPRET and not t.is_cuda:
        return (
            f"fused=True needs CUDA tensors, got a tensor on {t.device}: pass fused=False, or "
            "set TRITON_INTERPRET=1 before importing sf_torch to run the kernel in Triton's "
            "CPU interpreter (slow; meant for tests)"
        )
    return None


def fused_problem(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the kernels cannot step these tensors: no Triton, a device or dtype they do not
    run on."""
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
    """The kernels walk flat memory: the buffers must share one dense layout (contiguous,
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


def group_problem(params, grads, states) -> str | None:
    """Why the update kernel cannot step a group's params with these gradients and states
    (None where the first step has yet to create one)."""
    if triton is None:
        return _NO_TRITON
    # Fast path, with C-level loops: every tensor on the kernel's device, in a dtype it steps,
    # contiguous. Anything else gets the per-tensor check below and its message.
    on_device = operator.attrgetter("is_cpu" if INTERPRET else "is_cuda")
    dtype = operator.attrgetter("dtype")
    contiguous = torch.Tensor.is_contiguous
    buffers = [
        t
        for st in states
        if st
        for t in (st.get("z"), st.get("exp_avg_sq"), st.get("exp_avg"))
        if t is not None
    ]
    if (
        all(map(on_device, params))
        and all(map(on_device, grads))
        and set(map(dtype, params)) | set(map(dtype, grads)) <= _DTYPE_SET
        and all(map(contiguous, params))
        and all(map(contiguous, grads))
        and all(map(contiguous, buffers))
    ):
        return None
    for p, g, st in zip(params, grads, states):
        z, v = (st.get("z"), st.get("exp_avg_sq")) if st else (None, None)
        m = st.get("exp_avg") if st else None
        ok_device = (p.is_cpu and g.is_cpu) if INTERPRET else (p.is_cuda and g.is_cuda)
        if not (ok_device and p.dtype in _DTYPES and g.dtype in _DTYPES):
            return _device_problem(p) or _device_problem(g)
        if not _same_dense_layout(p, g, z, v) or (m is not None and _layout(m) != _layout(p)):
            return (
                "fused=True needs each param, its grad and its state to share one dense "
                "layout (no gaps or overlaps, same strides); pass fused=False for params such "
                f"as one of shape {tuple(p.shape)} and strides {p.stride()}"
            )
    return None


def capturable_problem(params, grads, states) -> str | None:
    """Why a capturable group's params and gradients cannot be planned (None when they can):
    a capturable step is always a planned one, so the group must form one bucket (one device,
    one dtype for params and gradients) of contiguous tensors, which the update kernel steps."""
    if not params:
        return None
    problem = group_problem(params, grads, states)
    if problem is not None:
        return problem
    contiguous = torch.Tensor.is_contiguous
    for p, g in zip(params, grads):
        if not (contiguous(p) and contiguous(g)):
            return (
                "capturable=True needs contiguous params and gradients, got a param of shape "
                f"{tuple(p.shape)} with strides {p.stride()} (gradient strides {g.stride()})"
            )
    keys = rule.buckets(params, grads, params, params)
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


def lerp_pair_problem(p_dtype: torch.dtype, z_dtype: torch.dtype) -> str | None:
    """Why the lerp kernel cannot switch params of ``p_dtype`` with z of ``z_dtype``."""
    if z_dtype != p_dtype and z_dtype.itemsize <= p_dtype.itemsize:
        return (
            f"fused=True switches params whose z is as wide or wider (float32 z for bf16 "
            f"params), got {p_dtype} params with {z_dtype} z"
        )
    return None


def lerp_problem(params, zs) -> str | None:
    """Why the lerp kernel cannot switch these params with these z."""
    if triton is None:
        return _NO_TRITON
    # Fast path, with C-level loops (as in group_problem): one device, dtypes the kernel
    # switches, everything contiguous.
    on_device = operator.attrgetter("is_cpu" if INTERPRET else "is_cuda")
    dtype = operator.attrgetter("dtype")
    pairs = set(zip(map(dtype, params), map(dtype, zs)))
    if (
        all(map(on_device, params))
        and all(map(on_device, zs))
        and len(set(map(torch.Tensor.get_device, params)) | set(map(torch.Tensor.get_device, zs)))
        <= 1
        and {d for pair in pairs for d in pair} <= _DTYPE_SET
        and not any(lerp_pair_problem(*pair) for pair in pairs)
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
        problem = lerp_pair_problem(p.dtype, z.dtype)
        if problem is not None:
            return problem
        if not _same_dense_layout(p, z, None, None):
            return (
                "fused=True needs each param and its z to share one dense layout; pass "
                f"fused=False for params such as one of shape {tuple(p.shape)} and strides "
                f"{p.stride()}"
            )
    return None


# ---------------------------------------------------------------------------------------------
# The kernels

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
    def _unscale(g, inv, G_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
        """``g * inv`` as torch's ``_amp_foreach_non_finite_check_and_unscale_`` (GradScaler's
        unscale_) writes it: in float32 (float64 for float64 g), rounded to g's dtype, so that
        a step that unscales here equals one taken after ``scaler.unscale_`` bit for bit. On the
        GPU an IEEE-rounded multiply, which the compiler cannot fuse into a later add."""
        if G_DTYPE == tl.float64:
            a = g.to(tl.float64)
            b = inv.to(tl.float64)
        else:
            a = g.to(tl.float32)
            b = inv.to(tl.float32)
        if INTERPRET:
            out = a * b
        else:
            out = libdevice.mul_rn(a, b)
        if G_DTYPE == tl.bfloat16:
            return _to_bf16_rn(out)
        return out.to(G_DTYPE)

    @triton.jit
    def _update_block(
        scalars_ptr,
        g_addr_ptr,
        y_addr_ptr,
        z_addr_ptr,
        v_addr_ptr,
        m_addr_ptr,
        block_tensor_ptr,
        block_start_ptr,
        numel_ptr,
        Y_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        F64: tl.constexpr,
        HAS_V: tl.constexpr,
        HAS_M: tl.constexpr,
        NORMALIZE: tl.constexpr,
        DECAY: tl.constexpr,
        UNSCALE: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The update kernel's work on this program's block (its arguments are the kernel's)."""
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
        g = tl.load(g_ptr, mask=mask)
        if UNSCALE:
            inv = tl.load(scalars_ptr + 10).to(tl.float64, bitcast=True)
            g = _unscale(g, inv, G_DTYPE, INTERPRET)
        g = g.to(ct)
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
                denom = tl.sqrt(v / bc2) + eps
            else:
                denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
            num = g
            if HAS_M:
                # AdamW's inner momentum: m = im m + (1 - im) g; the numerator is m / bc1.
                im = tl.load(scalars_ptr + 11).to(tl.float64, bitcast=True).to(ct)
                one_minus_im = tl.load(scalars_ptr + 12).to(tl.float64, bitcast=True).to(ct)
                bc1 = tl.zeros_like(v) + tl.load(scalars_ptr + 13).to(tl.float64, bitcast=True).to(
                    ct
                )
                m_ptr = tl.load(m_addr_ptr + t).to(tl.pointer_type(S_DTYPE)) + offs
                m = tl.load(m_ptr, mask=mask).to(ct)
                m = m * im + one_minus_im * g
                _store(m_ptr, m, S_DTYPE, mask)
                if F64:
                    num = m / bc1
                else:
                    num = tl.div_rn(m, bc1)
            if F64:
                gn = num / denom
            else:
                gn = tl.div_rn(num, denom)
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
    def _fused_update_kernel(
        scalars_ptr,  # int64: the N_SCALARS coefficients as float64 bit patterns
        g_addr_ptr,  # int64 per tensor: the addresses of g, y, z, v and m
        y_addr_ptr,
        z_addr_ptr,
        v_addr_ptr,
        m_addr_ptr,
        block_tensor_ptr,  # int32 per program: which tensor it steps
        block_start_ptr,  # int64 per program: first element of its block
        numel_ptr,  # int64 per tensor
        Y_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        F64: tl.constexpr,  # compute in float64 (else float32)
        HAS_V: tl.constexpr,
        HAS_M: tl.constexpr,  # the numerator is AdamW's inner momentum m / bc1 (scalars 11-13)
        NORMALIZE: tl.constexpr,  # 0: gn = g; 1: g / (sqrt(v / bc2) + eps); 2: as scalar 8 says
        DECAY: tl.constexpr,
        SKIP: tl.constexpr,  # scalar 9 (the advance kernel's) nonzero: the step is skipped
        UNSCALE: tl.constexpr,  # g times scalar 10 (GradScaler's inverse scale)
        INTERPRET: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        if SKIP:
            # A skipped step: each program leaves before it reads y, g, z or v. (A body
            # masked off would move no memory but still spend its arithmetic: 0.7 ms of a
            # skipped step of 134M float32 params on an H200, 1.1 ms against 0.4.)
            if tl.load(scalars_ptr + 9).to(tl.float64, bitcast=True) == 0.0:
                _update_block(
                    scalars_ptr,
                    g_addr_ptr,
                    y_addr_ptr,
                    z_addr_ptr,
                    v_addr_ptr,
                    m_addr_ptr,
                    block_tensor_ptr,
                    block_start_ptr,
                    numel_ptr,
                    Y_DTYPE,
                    G_DTYPE,
                    S_DTYPE,
                    F64,
                    HAS_V,
                    HAS_M,
                    NORMALIZE,
                    DECAY,
                    UNSCALE,
                    INTERPRET,
                    BLOCK,
                )
        else:
            _update_block(
                scalars_ptr,
                g_addr_ptr,
                y_addr_ptr,
                z_addr_ptr,
                v_addr_ptr,
                m_addr_ptr,
                block_tensor_ptr,
                block_start_ptr,
                numel_ptr,
                Y_DTYPE,
                G_DTYPE,
                S_DTYPE,
                F64,
                HAS_V,
                HAS_M,
                NORMALIZE,
                DECAY,
                UNSCALE,
                INTERPRET,
                BLOCK,
            )

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
        scalars_ptr,  # int64 out: the update kernel's N_SCALARS coefficients (float64 bits)
        hyper_ptr,  # int64: the N_HYPER hyperparameters (float64 bits)
        found_ptr,  # 0-d: nonzero when a gradient is not finite (read under SKIP)
        scale_ptr,  # 0-d: GradScaler's scale, which the gradients carry (read under UNSCALE)
        KIND: tl.constexpr,  # 0 adamw, 1 sgd, 2 radam
        SILENT: tl.constexpr,  # RAdam's silent_sgd_phase
        SKIP: tl.constexpr,
        UNSCALE: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """``advance`` and ``scalars`` of one group on the device, one program: the capturable
        step's counters never leave the device, so a CUDA graph can replay the step. Under
        SKIP, a nonzero found flag leaves the counters as they were and sets the skip
        coefficient, so that the step is as if it had never been taken."""
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
        weight_sum_before = tl.load(counters_ptr + 2)
        weight_sum = weight_sum_before + weight
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
        skip = tl.zeros_like(lr)
        if SKIP:
            skip = tl.where(tl.load(found_ptr).to(tl.float64) != 0.0, 1.0, skip)
            step = tl.where(skip != 0.0, k, step)
            lr_max = tl.where(skip != 0.0, tl.load(counters_ptr + 1), lr_max)
            weight_sum = tl.where(skip != 0.0, weight_sum_before, weight_sum)
            lr_t = tl.where(skip != 0.0, tl.load(counters_ptr + 3), lr_t)
        _put_f64(scalars_ptr, 9, skip)
        inv_scale = tl.zeros_like(lr) + 1.0
        if UNSCALE:
            # GradScaler's inv_scale: float32(1 / float64(scale)).
            inv_scale = (1.0 / tl.load(scale_ptr).to(tl.float64)).to(tl.float32).to(tl.float64)
        _put_f64(scalars_ptr, 10, inv_scale)
        im = _f64_at(hyper_ptr, 8)
        _put_f64(scalars_ptr, 11, im)
        _put_f64(scalars_ptr, 12, 1.0 - im)
        _put_f64(scalars_ptr, 13, 1.0 - _pow(im, k + 1.0, INTERPRET))
        tl.store(counters_ptr + 0, step)
        tl.store(counters_ptr + 1, lr_max)
        tl.store(counters_ptr + 2, weight_sum)
        tl.store(counters_ptr + 3, lr_t)


# ---------------------------------------------------------------------------------------------
# Tables and buffers


@functools.lru_cache(maxsize=64)
def block_tables(device: torch.device, numels: tuple[int, ...], block: int = _BLOCK):
    """Per-program (tensor index, first element) tables and the numel table of one bucket, and
    the block size they are cut for."""
    blocks = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor.long()]) * block
    numel = torch.tensor(numels, dtype=torch.int64)
    return block_tensor.to(device), block_start.to(device), numel.to(device), block


def host_int64(n: int, device: torch.device) -> torch.Tensor:
    """An uninitialised int64 host buffer of ``n`` entries, pinned when ``device`` is CUDA (so
    that copying it to the device does not wait; torch's host allocator keeps a pinned block
    until the copies that read it have run)."""
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")


def float_bits(values) -> list[int]:
    """Python floats as the int64 bit patterns of their float64 values."""
    n = len(values)
    return list(struct.unpack(f"<{n}q", struct.pack(f"<{n}d", *values)))


def device_meta(bits: list[int], addrs: list[int], device: torch.device) -> torch.Tensor:
    """The scalars' bit patterns and the tensors' addresses, copied to the device in one go."""
    host = torch.tensor(bits + addrs, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def address_slices(meta: torch.Tensor, start: int, n: int, count: int) -> list[torch.Tensor]:
    """``count`` views of ``meta``, each of ``n`` addresses, from ``start`` on: the kernels'
    per-tensor address tables."""
    return [meta[start + i * n : start + (i + 1) * n] for i in range(count)]


def step_coefficients(s: StepScalars) -> tuple[float, ...]:
    """The update kernel's ``N_SCALARS`` coefficients of one step, in the kernel's order."""
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
        0.0,  # skip: a host-scalar step that is skipped is never launched
        1.0,  # inv_scale: unused (UNSCALE is off)
        s.inner_momentum,
        1.0 - s.inner_momentum,
        s.bias_correction1,
    )


def hyperparameters(group: dict, kind: str) -> tuple[float, ...]:
    """The capturable step's ``N_HYPER`` hyperparameters of a group, in the advance kernel's
    order (SGD: no b2, no eps)."""
    b2, eps = (0.0, 0.0) if kind == "sgd" else (float(group["betas"][1]), float(group["eps"]))
    warmup = 0.0 if kind == "radam" else float(group["warmup_steps"])
    return (
        float(group["lr"]),
        rule.b1_of(group, kind),
        b2,
        eps,
        float(group["weight_decay"]),
        warmup,
        float(group["r"]),
        float(group["weight_lr_power"]),
        float(group.get("inner_momentum", 0.0)) if kind == "adamw" else 0.0,
    )


def scalar_flags(s: StepScalars) -> dict:
    """The update kernel's flags (HAS_V, NORMALIZE, DECAY, SKIP, UNSCALE) for a step with host
    scalars ``s``."""
    return dict(
        HAS_V=s.has_v,
        HAS_M=s.has_m,
        NORMALIZE=int(s.normalize),
        DECAY=s.weight_decay != 0,
        SKIP=False,
        UNSCALE=False,
    )


def capturable_flags(kind: str, group: dict, skip: bool = False, unscale: bool = False) -> dict:
    """The update kernel's flags for a capturable step of ``group``: RAdam leaves normalizing
    to the advance kernel's flag (it changes after a few steps); ``skip``: the advance kernel
    may tell it to skip (a found-inf flag was given); ``unscale``: the gradients carry
    GradScaler's scale."""
    return dict(
        HAS_V=kind != "sgd",
        HAS_M=kind == "adamw" and float(group.get("inner_momentum", 0.0)) != 0.0,
        NORMALIZE={"adamw": 1, "sgd": 0, "radam": 2}[kind],
        DECAY=float(group["weight_decay"]) != 0,
        SKIP=skip,
        UNSCALE=unscale,
    )


# ---------------------------------------------------------------------------------------------
# Launches


_TL_DTYPES = {}
if tl is not None:
    _TL_DTYPES = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }


def _launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    # Triton launches on the current device: switch to the tensors' device only when it is
    # another one (the context manager costs more than the rest of a small step's launch).
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _launch_blocks(kernel, device: torch.device, tables, *args, **constexprs) -> None:
    """``kernel`` over one bucket: a program per block of ``tables`` (``block_tables``), the
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


def launch_update(
    device: torch.device,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    flags: dict,
    scalars: torch.Tensor,
    addresses: Sequence[torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    """One launch of the update kernel: ``scalars`` holds the step's coefficients (float64
    bits, on the device), ``addresses`` the g, y, z, v and m address tables (v's unused
    without v, m's without m), ``tables`` the bucket's ``block_tables``; ``dtypes`` are y's,
    g's and the state's; ``flags`` the kernel's HAS_V, HAS_M, NORMALIZE and DECAY
    (``scalar_flags`` or ``capturable_flags``)."""
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
        INTERPRET=INTERPRET,
        **flags,
    )


def launch_advance(
    device: torch.device,
    kind: str,
    group: dict,
    counters: torch.Tensor,
    scalars: torch.Tensor,
    hyper: torch.Tensor,
    found: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """One program of the advance kernel: ``counters`` (float64 k, lr_max, weight_sum,
    scheduled_lr) move one step on the device and ``scalars`` receive that step's
    coefficients, from the hyperparameters in ``hyper`` (``hyperparameters``' bits of
    ``group``, which also gives RAdam's ``silent_sgd_phase``). ``found`` (0-d, on the device):
    where nonzero the counters stay and the skip coefficient is set; ``scale`` (0-d, on the
    device): the gradients are multiplied by GradScaler's ``float32(1 / scale)``."""
    _launch(
        _advance_kernel,
        (1,),
        device,
        counters,
        scalars,
        hyper,
        counters if found is None else found,  # not read without SKIP
        counters if scale is None else scale,  # not read without UNSCALE
        KIND=rule.KINDS.index(kind),
        SILENT=bool(group.get("silent_sgd_phase", False)),
        SKIP=found is not None,
        UNSCALE=scale is not None,
        INTERPRET=INTERPRET,
    )


def launch_lerp(
    device: torch.device,
    dtypes: tuple[torch.dtype, torch.dtype],
    weight: torch.Tensor,
    addresses: Sequence[torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    """One launch of the lerp kernel: ``weight`` (float64 bits, on the device), the p and z
    address tables, the bucket's ``block_tables``; ``dtypes`` are p's and z's."""
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


# ---------------------------------------------------------------------------------------------
# The general (unplanned) fused step and switch, and a capturable group's lone advance


def update_fused(ys, gs, zs, vs, s: StepScalars, ms=None) -> None:
    """``rule.update_loop``'s step, one update-kernel launch per bucket."""
    bits = float_bits(step_coefficients(s))
    data_ptr = torch.Tensor.data_ptr
    if ms is None:
        ms = [None] * len(ys)
    bucketed = rule.buckets(ys, gs, zs, vs, ms)
    for (_, y_dtype, g_dtype, s_dtype), (ys_, gs_, zs_, vs_, ms_) in bucketed.items():
        device = ys_[0].device
        tables = block_tables(device, tuple(map(torch.Tensor.numel, ys_)), block_size(y_dtype))
        if tables[0].numel() == 0:
            continue
        addrs = [*map(data_ptr, gs_), *map(data_ptr, ys_), *map(data_ptr, zs_)]
        addrs += list(map(data_ptr, vs_)) if s.has_v else [0] * len(vs_)
        addrs += list(map(data_ptr, ms_)) if s.has_m else [0] * len(ms_)
        meta = device_meta(bits, addrs, device)
        addresses = address_slices(meta, N_SCALARS, len(ys_), 5)
        launch_update(device, (y_dtype, g_dtype, s_dtype), scalar_flags(s), meta, addresses, tables)


def lerp_fused(params, zs, weight: float) -> None:
    """Every ``p <- lerp(p, z, weight)``, one lerp-kernel launch per bucket. It reads p and z
    once and writes p once, computing in z's dtype like ``rule.lerp_`` but without its
    temporary float32 copy of p when the dtypes differ (bf16 params, float32 z)."""
    bits = float_bits([weight])
    data_ptr = torch.Tensor.data_ptr
    # rule.buckets keys by (device, y, g, state dtypes): p stands in for both y and g here.
    for (_, p_dtype, _, s_dtype), (ps, _, zs_, _) in rule.buckets(params, params, zs, zs).items():
        device = ps[0].device
        tables = block_tables(device, tuple(map(torch.Tensor.numel, ps)), block_size(p_dtype))
        if tables[0].numel() == 0:
            continue
        meta = device_meta(bits, [*map(data_ptr, ps), *map(data_ptr, zs_)], device)
        launch_lerp(device, (p_dtype, s_dtype), meta, address_slices(meta, 1, len(ps), 2), tables)


def advance_counters(
    kind: str, group: dict, counters: torch.Tensor, found: torch.Tensor | None = None
) -> None:
    """A capturable group's counters, one step on, where it has nothing to move: the advance
    kernel alone, its coefficients written to a scratch buffer (``found``: as in
    ``launch_advance``, the counters stay where it is nonzero)."""
    bits = float_bits((0.0,) * N_SCALARS + hyperparameters(group, kind))
    head = device_meta(bits, [], counters.device)
    scalars, hyper = head[:N_SCALARS], head[N_SCALARS:]
    launch_advance(counters.device, kind, group, counters, scalars, hyper, found)
