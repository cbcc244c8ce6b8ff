"""The Schedule-Free update rule, written once for torch: the math, and nothing else.

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

With ``inner_momentum`` (AdamW only; upstream schedulefree's main branch) a third buffer ``m``
(``state['exp_avg']``, zeros at the first step, only where ``inner_momentum != 0``) replaces
``g`` in the numerator::

    m           = inner_momentum m + (1-inner_momentum) g
    gn          = (m / (1 - inner_momentum**(k+1))) / (sqrt(v / (1 - b2**(k+1))) + eps)
                  +  weight_decay * y

SGD has no ``v``: ``gn = g + weight_decay * y``. RAdam has no warmup: ``sched`` is the
rectification ``rect`` of RAdam, computed from ``k`` and ``b2``; while the variance estimate is
too short (``rho_k <= 4``) the step is an SGD step (``gn = g + weight_decay * y``, ``v`` still
updated) with ``rect = 0`` under ``silent_sgd_phase`` (nothing moves) and ``rect = 1`` otherwise.

Views: ``to_x_`` writes ``x = lerp(y, z, 1 - 1/b1)`` into the params, ``to_y_`` writes
``y = lerp(x, z, 1 - b1)`` back; ``x_of`` returns ``x`` as a new tensor.

Every scalar above is a Python float (float64), whatever the params' dtype (a capturable group
computes the same float64 numbers on its device, in ``kernels.py``'s advance kernel); tensors see
them only as the coefficients of one step (``StepScalars``). Scalars and tensors advance separately,
so that a caller who steps the tensors in pieces (ZeRO-3) still counts one step: ``advance``
gives a group's counters after one more step, ``scalars`` the coefficients of the step last
counted, and ``update_loop`` (the definition) or ``update_foreach`` (torch's multi-tensor ops,
same numbers) moves the tensors. The Triton kernels that compute the same step are in
``kernels.py``; which implementation steps a group is decided in ``dispatch.py``.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch

from sf_schedules.radam import radam_rho

KINDS = ("adamw", "sgd", "radam")
# Rule variants that are no optimizer kind of their own (their optimizer's ``kind`` is "adamw"):
# "adamw_paper" is schedulefree's AdamWScheduleFreePaper, whose lr carries
# sqrt(1 - b2**(k+1)) and whose denominator is sqrt(v) + eps (no bias correction inside).
PAPER = "adamw_paper"

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
    inner_momentum: float = 0.0  # AdamW's EMA of g in the numerator (0: none, no m buffer)
    bias_correction1: float = 1.0  # 1 - inner_momentum**(k+1)
    decay_at_z: bool = False  # AdamWScheduleFreeReference(decay_at_z=True): decay at z, not y
    # Not None: the step leaves x in the params (the closure classes, schedulefree's order):
    # p = lerp(y, z, x_weight) (x_weight = 1 - 1/b1), z -= lr gn, p = lerp(p, z, c).
    x_weight: float | None = None

    @property
    def has_m(self) -> bool:
        """Whether the step reads and writes the inner-momentum buffer ``m``."""
        return self.inner_momentum != 0.0


def b1_of(group: dict, kind: str) -> float:
    """The momentum ``b1`` of a group: ``momentum`` for SGD, ``betas[0]`` otherwise."""
    return float(group["momentum"] if kind == "sgd" else group["betas"][0])


def _lr_of_step(group: dict, kind: str, k: int) -> float:
    """The learning rate of step ``k`` (0-based): base lr times warmup or rectification."""
    base_lr = float(group["lr"])
    if kind == "radam":
        rho_k, rho_inf = radam_rho(k + 1, float(group["betas"][1]))
        if rho_k > 4.0:
            num = (rho_k - 4.0) * (rho_k - 2.0) * rho_inf
            rect = math.sqrt(num / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_k))
        else:
            rect = 0.0 if group["silent_sgd_phase"] else 1.0
        return base_lr * rect
    warmup_steps = group["warmup_steps"]
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    if kind == PAPER:
        return base_lr * sched * math.sqrt(1.0 - float(group["betas"][1]) ** (k + 1))
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
        normalize = kind != "radam" or radam_rho(k + 1, b2)[0] > 4.0
    inner = float(group.get("inner_momentum", 0.0)) if kind in ("adamw", PAPER) else 0.0
    return StepScalars(
        lr=lr,
        c=c,
        y_coef=lr * (b1 * (1.0 - c) - 1.0),
        b2=b2,
        bias_correction2=1.0 if kind == PAPER else 1.0 - b2 ** (k + 1),
        eps=eps,
        weight_decay=float(group["weight_decay"]),
        has_v=kind != "sgd",
        normalize=normalize,
        inner_momentum=inner,
        bias_correction1=1.0 - inner ** (k + 1) if inner != 0.0 else 1.0,
        decay_at_z=bool(group.get("decay_at_z", False)),
    )


# ---------------------------------------------------------------------------------------------
# Views


def view_weight(view: str, b1: float) -> float:
    """The lerp weight toward z that gives a view from the other: ``x = lerp(y, z, 1 - 1/b1)``,
    ``y = lerp(x, z, 1 - b1)``."""
    if view == "x":
        return 1.0 - 1.0 / b1
    if view == "y":
        return 1.0 - b1
    raise ValueError(f"view must be 'x' or 'y', got {view!r}")


def lerp_(p: torch.Tensor, z: torch.Tensor, weight: float) -> None:
    """``p <- lerp(p, z, weight)`` in place, computed in z's dtype."""
    z = z.to(p.device)
    if p.dtype == z.dtype:
        p.lerp_(z, weight)
    else:
        p.copy_(p.to(z.dtype).lerp_(z, weight))


def to_x_(p: torch.Tensor, z: torch.Tensor, b1: float) -> None:
    """y -> x in place: ``x = (y - (1-b1) z) / b1``, computed in z's dtype."""
    lerp_(p, z, view_weight("x", b1))


def to_y_(p: torch.Tensor, z: torch.Tensor, b1: float) -> None:
    """x -> y in place: ``y = b1 x + (1-b1) z``, computed in z's dtype."""
    lerp_(p, z, view_weight("y", b1))


def x_of(p: torch.Tensor, z: torch.Tensor, b1: float) -> torch.Tensor:
    """``x`` from ``y = p`` as a new tensor, equal to what ``to_x_`` would write into ``p``."""
    x = p.detach().to(z.dtype, copy=True)
    x.lerp_(z.to(p.device), view_weight("x", b1))
    return x.to(p.dtype)


# ---------------------------------------------------------------------------------------------
# Tensor updates: y, z, v (None without v) and m (None without m; omitted: none) of one group,
# by one step with ``s``


def update_loop(ys, gs, zs, vs, s: StepScalars, ms=None) -> None:
    """One tensor at a time: the definition the other implementations are tested against."""
    if ms is None:
        ms = [None] * len(ys)
    for y, g, z, v, m in zip(ys, gs, zs, vs, ms):
        # Work in the state's dtype (float32 state for bf16 params computes in float32).
        yw = y if y.dtype == z.dtype else y.to(z.dtype)
        gw = g if g.dtype == z.dtype else g.to(z.dtype)
        at = z if s.decay_at_z else yw  # where the weight decay is evaluated
        if s.has_v:
            v.mul_(s.b2).addcmul_(gw, gw, value=1.0 - s.b2)
        if s.normalize:
            denom = v.div(s.bias_correction2).sqrt_().add_(s.eps)
            if s.has_m:
                m.mul_(s.inner_momentum).add_(gw, alpha=1.0 - s.inner_momentum)
                gn = m.div(s.bias_correction1).div_(denom)
            else:
                gn = gw.div(denom)
            if s.weight_decay != 0:
                gn.add_(at, alpha=s.weight_decay)
        else:
            gn = gw.add(at, alpha=s.weight_decay) if s.weight_decay != 0 else gw
        if s.x_weight is None:
            yw.lerp_(z, s.c)
            yw.add_(gn, alpha=s.y_coef)
            z.sub_(gn, alpha=s.lr)
        else:  # leaves x: y -> x with the old z, z steps, x averages the new z in
            yw.lerp_(z, s.x_weight)
            z.sub_(gn, alpha=s.lr)
            yw.lerp_(z, s.c)
        if yw is not y:
            y.copy_(yw)


FOREACH_CHUNK = 1 << 25  # elements per multi-tensor call: bounds its temporaries (gn, ...)


def update_foreach(ys, gs, zs, vs, s: StepScalars, ms=None) -> None:
    """torch's multi-tensor ops, one call per bucket (``buckets``) and chunk of at most
    ``FOREACH_CHUNK`` elements: the loop's numbers."""
    if ms is None:
        ms = [None] * len(ys)
    for bucket in buckets(ys, gs, zs, vs, ms).values():
        for chunk in _chunks(*bucket, limit=FOREACH_CHUNK):
            update_foreach_chunk(*chunk, s)


def update_foreach_chunk(ys_, gs_, zs_, vs_, ms_, s: StepScalars) -> None:
    """The multi-tensor step of one chunk: one device, one dtype each for y, g and the state."""
    work = zs_[0].dtype
    yw = ys_ if ys_[0].dtype == work else [y.to(work) for y in ys_]
    gw = gs_ if gs_[0].dtype == work else [g.to(work) for g in gs_]
    at = zs_ if s.decay_at_z else yw  # where the weight decay is evaluated
    if s.has_v:
        torch._foreach_mul_(vs_, s.b2)
        torch._foreach_addcmul_(vs_, gw, gw, value=1.0 - s.b2)
    if s.normalize:
        denom = torch._foreach_div(vs_, s.bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, s.eps)
        if s.has_m:
            torch._foreach_mul_(ms_, s.inner_momentum)
            torch._foreach_add_(ms_, gw, alpha=1.0 - s.inner_momentum)
            gn = torch._foreach_div(ms_, s.bias_correction1)
            torch._foreach_div_(gn, denom)
        else:
            gn = torch._foreach_div(gw, denom)
        del denom
        if s.weight_decay != 0:
            torch._foreach_add_(gn, at, alpha=s.weight_decay)
    else:
        gn = torch._foreach_add(gw, at, alpha=s.weight_decay) if s.weight_decay != 0 else gw
    if s.x_weight is None:
        torch._foreach_lerp_(yw, zs_, weight=s.c)
        torch._foreach_add_(yw, gn, alpha=s.y_coef)
        torch._foreach_sub_(zs_, gn, alpha=s.lr)
    else:  # leaves x (update_loop)
        torch._foreach_lerp_(yw, zs_, weight=s.x_weight)
        torch._foreach_sub_(zs_, gn, alpha=s.lr)
        torch._foreach_lerp_(yw, zs_, weight=s.c)
    if yw is not ys_:
        torch._foreach_copy_(ys_, yw)


def _chunks(ys, *rest, limit: int):
    """The bucket's lists cut into runs of at most ``limit`` elements (a larger tensor alone)."""
    lists = (ys, *rest)
    start, total = 0, 0
    for i, n in enumerate(map(torch.Tensor.numel, ys)):
        if total and total + n > limit:
            yield tuple(lst[start:i] for lst in lists)
            start, total = i, 0
        total += n
    if start < len(ys):
        yield tuple(lst[start:] for lst in lists)


def buckets(ys, gs, zs, *rest) -> dict:
    """The lists (y, g, z and any more aligned with them: v, m) split by ``(device index,
    y dtype, g dtype, state dtype)``: one multi-tensor call (or kernel launch) each."""
    dtype = operator.attrgetter("dtype")
    devices = set(map(torch.Tensor.get_device, ys))
    y_dtypes, g_dtypes, s_dtypes = set(map(dtype, ys)), set(map(dtype, gs)), set(map(dtype, zs))
    if len(devices) == len(y_dtypes) == len(g_dtypes) == len(s_dtypes) == 1:
        # The common case, without a key per tensor (many small tensors make this add up).
        key = (devices.pop(), y_dtypes.pop(), g_dtypes.pop(), s_dtypes.pop())
        return {key: (ys, gs, zs, *rest)}
    out: dict = {}
    for i, (y, g, z) in enumerate(zip(ys, gs, zs)):
        key = (y.get_device(), y.dtype, g.dtype, z.dtype)
        lists = out.get(key)
        if lists is None:
            lists = out[key] = tuple([] for _ in range(3 + len(rest)))
        lists[0].append(y)
        lists[1].append(g)
        lists[2].append(z)
        for lst, values in zip(lists[3:], rest):
            lst.append(values[i])
    return out
