"""Which implementation steps a param group, and which one switches it: decided here only.

A step (``choose_step``; every check runs before anything moves), one of:

- ``"planned"``: the group has a ``FusedPlan`` whose check finds it current; the plan steps it
  without per-tensor Python (``fused_plan``).
- ``"capturable"``: a group with ``capturable=True``, always stepped by a plan whose advance
  kernel computes the coefficients on the device; where no plan is current (the first step,
  or one after a change) the optimizer creates the missing state and plans the group first.
- ``"fused"``, ``"foreach"`` or ``"loop"`` (``choose_impl``): the general fused step
  (``kernels.update_fused``), torch's multi-tensor ops (``rule.update_foreach``) or one tensor
  at a time (``rule.update_loop``); ``update`` runs the one chosen. A fused step over one
  bucket of contiguous tensors leaves a plan for the next steps (``plans_after``).

A switch between the views x and y (``choose_switch``), one of ``"planned"`` (the plan's
launch), ``"fused"`` (``kernels.lerp_fused``) or ``"loop"`` (``rule.lerp_``); ``switch_``
runs it.

While a CUDA graph is captured, only a capturable group with a current plan can step: anything
else raises before it is recorded.

Whether a step is skipped for a non-finite gradient (``choose_skip``): with ``skip_nonfinite``
every gradient is checked on its device (``nonfinite_found``, torch's GradScaler check), or
GradScaler hands its own flag (and scale) to an optimizer whose groups are all capturable. A
group whose counters live on the host needs the answer there (one host sync per step, as
GradScaler's own skip); where every group is capturable the answer stays on the device, and
each group's advance kernel keeps its counters and tells its update kernel to store nothing.
A skipped step leaves every param, state tensor and counter as it was, in every group.

DTensor params (FSDP2's ``fully_shard``, tensor parallelism; ``dtensor.py``): where a param,
its gradient, z and v share one mesh and placements, every check and every implementation runs
on their local tensors; elsewhere the loop and foreach take DTensor ops and ``fused=True``
raises. Such groups get no plan (a plan tracks the params' own storage, which a DTensor does
not have), so ``capturable=True`` is refused for them; ``skip_nonfinite``'s answer is
all-reduced over the gradients' meshes, so that every rank skips or none.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

from . import dtensor, kernels, rule
from .fused_plan import FusedPlan

_CAPTURE_STALE = (
    "a CUDA graph is being captured, but param group {index} has no current fused plan "
    "(no step yet, or its params, gradients' layout or state changed): take at least one "
    "step outside the capture first (torch's warm-up iterations), with the gradients the "
    "captured step will have"
)
_CAPTURE_NOT_CAPTURABLE = (
    "a CUDA graph is being captured, but param group {index} has capturable=False: its step "
    "computes its scalars on the host, which a replay would not repeat; pass capturable=True"
)


_CAPTURABLE_DTENSOR = (
    "capturable=True steps through a plan that keeps the params' storage on the device, and "
    "DTensor params (FSDP2's fully_shard, tensor parallelism) are stepped through their local "
    "shards, which a plan does not track: pass capturable=False (fused=True steps the local "
    "shards with the same kernel)"
)
_FUSED_DTENSOR = (
    "fused=True steps DTensor params on their local shards, which needs the param, its "
    "gradient, z and v to be DTensors on one mesh with the same placements, but for a param "
    "of shape {shape} {problem}: pass fused=False (DTensor ops, which redistribute)"
)


class PlannedStep(NamedTuple):
    """A group's current plan and what its check prepared for this step."""

    plan: FusedPlan
    prepared: Any  # FusedPlan.prepare_step's answer: the host buffer and the check's status


class GroupStep(NamedTuple):
    """One group's step as chosen: the implementation and what it steps."""

    group: dict
    params: list  # the params with a gradient (empty when the plan steps the group)
    grads: list
    states: list  # their state dicts, None where the first step has yet to create one
    impl: str | None  # "planned", "capturable", "fused", "foreach", "loop"; None: no gradient
    planned: PlannedStep | None  # the current plan ("planned"; "capturable" where one is)


class Skip(NamedTuple):
    """How a step treats non-finite gradients (``choose_skip``)."""

    now: bool  # skip the whole step: the host knows already, nothing is launched
    found: dict | None  # device -> 0-d flag for capturable groups (nonzero: skip), or None
    scale: dict | None  # device -> GradScaler's scale, carried by the gradients, or None


NO_SKIP = Skip(False, None, None)


class GroupSwitch(NamedTuple):
    """One group's switch between x and y as chosen."""

    group: dict
    params: list  # the params with a z (empty when the plan switches the group)
    zs: list
    impl: str  # "planned", "fused" or "loop"
    plan: FusedPlan | None  # "planned" only


def check_new_group(group: dict) -> None:
    """A RuntimeError now, rather than at the first step, for a group that asks for the fused
    kernel (``fused=True``, ``capturable=True``) with params it cannot step."""
    if not (group["fused"] or group["capturable"]):
        return
    if group["capturable"] and dtensor.any_dtensor(group["params"]):
        raise RuntimeError(_CAPTURABLE_DTENSOR)
    problem = kernels.fused_problem(dtensor.local(group["params"]))
    if problem is None:
        return
    if group["capturable"]:
        problem = (
            "capturable=True steps with the fused kernel, which cannot step these params (pass "
            f"capturable=False to step them otherwise): {problem}"
        )
    raise RuntimeError(problem)


def choose_step(
    index: int, group: dict, plan: FusedPlan | None, state_map, capturing: bool, owner: str
) -> GroupStep:
    """How param group ``index`` steps, given its last plan (None if none) and the optimizer's
    ``state``; ``owner`` names the optimizer in errors. Changes nothing; each ``.grad`` and
    each state is looked up once."""
    if capturing and not group["capturable"]:
        raise RuntimeError(_CAPTURE_NOT_CAPTURABLE.format(index=index))
    if plan is not None:
        prepared = plan.prepare_step(group, state_map, capturing)
        if prepared is not None:
            impl = "capturable" if group["capturable"] else "planned"
            return GroupStep(group, [], [], [], impl, PlannedStep(plan, prepared))
    if capturing:
        raise RuntimeError(_CAPTURE_STALE.format(index=index))
    params, grads = _with_grads(group["params"], owner)
    states = [state_map.get(p) for p in params]
    if float(group.get("inner_momentum", 0.0)) != 0.0:
        _check_inner_momentum_state(index, params, states)
    if group["capturable"]:
        if dtensor.any_dtensor(params):
            raise RuntimeError(_CAPTURABLE_DTENSOR)
        problem = kernels.capturable_problem(params, grads, states)
        if problem is not None:
            raise RuntimeError(problem)
        impl = "capturable"
    elif params:
        fused = group["fused"]
        if group.get("decay_at_z"):
            if fused:
                raise RuntimeError(
                    "fused=True does not step decay_at_z=True (AdamWScheduleFreeReference's "
                    "weight decay at z): pass fused=False (foreach or the loop step it)"
                )
            fused = False
        impl = choose_impl(params, grads, states, group["foreach"], fused)
    else:
        impl = None
    return GroupStep(group, params, grads, states, impl, None)


def _check_inner_momentum_state(index: int, params, states) -> None:
    """A RuntimeError where a param of a group with ``inner_momentum != 0`` has a state
    without the inner-momentum buffer ``exp_avg`` (made while ``inner_momentum`` was 0, or
    loaded from a checkpoint of such a run): its EMA and bias correction would start from
    nothing in the middle of the run."""
    for p, st in zip(params, states):
        if st and "z" in st and "exp_avg" not in st:
            raise RuntimeError(
                f"param group {index} has inner_momentum != 0, but a param of shape "
                f"{tuple(p.shape)} has a state without exp_avg (the inner-momentum buffer): it "
                "was created, or loaded from a checkpoint, with inner_momentum=0. Keep "
                "inner_momentum=0 for this run, or start a new one with it set"
            )


def _with_grads(group_params, owner: str) -> tuple[list, list]:
    params, grads = [], []
    for p in group_params:
        g = p.grad
        if g is not None:
            params.append(p)
            grads.append(g)
    sparse = [i for i, g in enumerate(grads) if g.layout != torch.strided]
    if sparse:
        p, g = params[sparse[0]], grads[sparse[0]]
        raise RuntimeError(
            f"{owner} does not support sparse gradients (got a {g.layout} gradient for a param "
            f"of shape {tuple(p.shape)}); use dense gradients (e.g. nn.Embedding(sparse=False))"
        )
    return params, grads


def choose_impl(params, grads, states, foreach: bool | None, fused: bool | None) -> str:
    """The general step of a group's params with gradients: ``"fused"``, ``"foreach"`` or
    ``"loop"``.

    ``fused=True``: the Triton kernel, or a RuntimeError saying why it cannot run.
    ``fused=None``: the Triton kernel when every param is a CUDA tensor it can step (never the
    interpreter), else as ``fused=False``. ``fused=False``: ``foreach=True``: torch's
    multi-tensor ops; ``foreach=False``: the loop; ``foreach=None``: multi-tensor ops when every
    param is a CUDA tensor, else the loop (as torch's optimizers choose: on the CPU the
    multi-tensor ops run the same per-tensor kernels, and their whole-list temporaries cost
    memory and time, e.g. DeepSpeed's CPU-offloaded masters).

    DTensor params: the choice and its checks are made on the local tensors, where
    ``dtensor.step_problem`` finds none; elsewhere ``fused=True`` raises and the loop or
    foreach (DTensor ops) steps them.
    """
    if dtensor.any_dtensor(params):
        problem = dtensor.step_problem(params, grads, states)
        if problem is not None:
            if fused:
                shape = next(tuple(p.shape) for p in params if dtensor.is_dtensor(p))
                raise RuntimeError(_FUSED_DTENSOR.format(shape=shape, problem=problem))
            fused = False
        else:
            params, grads = dtensor.local(params), dtensor.local(grads)
            states = dtensor.local_states(states)
    if fused or (fused is None and not kernels.INTERPRET):
        problem = kernels.group_problem(params, grads, states)
        if problem is None:
            return "fused"
        if fused:
            raise RuntimeError(problem)
    if foreach is None:
        foreach = all(map(operator.attrgetter("is_cuda"), params))
    return "foreach" if foreach else "loop"


def update(impl: str, ys, gs, zs, vs, s: rule.StepScalars, ms=None) -> None:
    """Moves ``y``, ``z``, ``v`` (None without v) and ``m`` (None, or omitted, without m) of
    one group by one step with ``s``, with the general step ``impl`` that ``choose_impl``
    picked (on the local tensors of DTensors that ``dtensor.step_problem`` lets through, as
    ``choose_impl`` checked them)."""
    if ms is None:
        ms = [None] * len(ys)
    if dtensor.any_dtensor(ys) and _locally(ys, gs, zs, vs, ms):
        ys, gs, zs, vs, ms = map(dtensor.local, (ys, gs, zs, vs, ms))
    if impl == "fused":
        kernels.update_fused(ys, gs, zs, vs, s, ms)
    elif impl == "foreach":
        rule.update_foreach(ys, gs, zs, vs, s, ms)
    else:
        rule.update_loop(ys, gs, zs, vs, s, ms)


def _locally(ys, gs, zs, vs, ms) -> bool:
    states = [{"z": z, "exp_avg_sq": v, "exp_avg": m} for z, v, m in zip(zs, vs, ms)]
    return dtensor.step_problem(ys, gs, states) is None


def plans_after(impl: str, ys, gs, zs, vs, has_v: bool, ms=None) -> bool:
    """Whether the general step ``impl`` just taken leaves a plan for the next steps: a fused
    step over one bucket, everything contiguous. (The kernel also steps other dense layouts,
    e.g. channels_last, but a plan's check would find those stale at every step and a plan
    would be rebuilt for nothing.) DTensor params get no plan: it would track their storage."""
    if impl != "fused" or not ys or dtensor.any_dtensor(ys):
        return False
    contiguous = torch.Tensor.is_contiguous
    tensors = (ys, gs, zs, vs) if has_v else (ys, gs, zs)
    if ms is not None:
        tensors += (ms,)
    if not all(all(map(contiguous, ts)) for ts in tensors):
        return False
    return len(rule.buckets(ys, gs, zs, vs if has_v else zs)) == 1


def choose_switch(group: dict, plan: FusedPlan | None, state_map) -> GroupSwitch:
    """How the params of ``group`` that have a z switch between x and y."""
    if plan is not None and plan.can_switch(group, state_map):
        return GroupSwitch(group, [], [], "planned", plan)
    params, zs = [], []
    for p in group["params"]:
        state = state_map.get(p)
        if state and "z" in state:
            params.append(p)
            zs.append(state["z"])
    return GroupSwitch(group, params, zs, switch_impl(params, zs, group["fused"]), None)


def switch_impl(params, zs, fused: bool | None) -> str:
    """The unplanned switch of these params: ``"fused"`` (one lerp-kernel launch per bucket)
    or ``"loop"``; ``fused`` as in ``choose_impl`` (True raises a RuntimeError saying why the
    kernel cannot run). DTensor params as in ``choose_impl``: on their local tensors where
    they match their z, else ``"loop"`` (DTensor ops) or, with ``fused=True``, the error."""
    if dtensor.any_dtensor(params) or dtensor.any_dtensor(zs):
        problem = dtensor.switch_problem(params, zs)
        if problem is not None:
            if fused:
                shape = next(tuple(p.shape) for p in params if dtensor.is_dtensor(p))
                raise RuntimeError(_FUSED_DTENSOR.format(shape=shape, problem=problem))
            return "loop"
        params, zs = dtensor.local(params), dtensor.local(zs)
    if fused or (fused is None and not kernels.INTERPRET):
        problem = kernels.lerp_problem(params, zs)
        if problem is None:
            return "fused"
        if fused:
            raise RuntimeError(problem)
    return "loop"


def switch_(impl: str, params, zs, weight: float, plan: FusedPlan | None = None) -> None:
    """Every ``p <- lerp(p, z, weight)`` (``rule.view_weight`` gives the weight of a view),
    with the switch ``impl`` chosen by ``choose_switch`` or ``switch_impl``."""
    if impl == "planned":
        plan.switch(weight)
        return
    if (dtensor.any_dtensor(params) or dtensor.any_dtensor(zs)) and (
        dtensor.switch_problem(params, zs) is None
    ):
        params, zs = dtensor.local(params), dtensor.local(zs)
    if impl == "fused":
        kernels.lerp_fused(params, zs, weight)
    else:
        for p, z in zip(params, zs):
            rule.lerp_(p, z, weight)


# ---------------------------------------------------------------------------------------------
# Non-finite gradients

# What torch's GradScaler check runs on (it casts to float32, or computes in float64)...
_AMP_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
# ... except (device type, dtype) pairs found to have no kernel for it (torch 2.11 has none for
# bfloat16 on CUDA), which the inf-norm checks instead.
_NO_AMP_CHECK: set = set()
_GRAD, _DEVICE, _DTYPE = map(operator.attrgetter, ("grad", "device", "dtype"))


def step_grads(steps: list[GroupStep]) -> list:
    """Every gradient the step reads: those the general path gathered, and those of groups
    their plan steps (which gathers none in Python)."""
    grads = []
    for step in steps:
        if step.planned is not None:
            grads += [g for g in map(_GRAD, step.group["params"]) if g is not None]
        else:
            grads += step.grads
    return grads


def nonfinite_found(grads) -> dict:
    """Per device, a float32 0-d tensor that is nonzero where one of ``grads`` on that device
    holds an inf or a NaN. torch's ``_amp_foreach_non_finite_check_and_unscale_`` (GradScaler's
    check) with a scale of 1, one call per device and dtype: a device op, no host sync, and the
    gradients keep their values bit for bit. Where torch has no such check for a dtype on a
    device, and for complex gradients, the largest ``|g|`` of each tensor (``_foreach_norm``
    with ``ord=inf``: NaN or inf exactly where one element is). DTensor gradients: their local
    tensors are checked, and the flags summed over their meshes (``dtensor.agree``)."""
    dtensors = grads if dtensor.any_dtensor(grads) else None
    if dtensors is not None:
        grads = dtensor.local(grads)
    devices, dtypes = set(map(_DEVICE, grads)), set(map(_DTYPE, grads))
    if len(devices) == len(dtypes) == 1:  # the common case, without a key per tensor
        by_key = {(devices.pop(), dtypes.pop()): grads}
    else:
        by_key: dict = {}
        for g in grads:
            by_key.setdefault((g.device, g.dtype), []).append(g)
    found: dict = {}
    for (device, dtype), gs in by_key.items():
        flag = found.get(device)
        if flag is None:
            flag = found[device] = torch.zeros((), dtype=torch.float32, device=device)
        key = (device.type, dtype)
        if dtype in _AMP_DTYPES and key not in _NO_AMP_CHECK:
            ones = torch.ones((), dtype=torch.float32, device=device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(gs, flag, ones)
                continue
            except RuntimeError:
                # no kernel of torch's AMP check for this device and dtype (torch says so before
                # any kernel runs: nothing was written); the norm check below takes over
                _NO_AMP_CHECK.add(key)
        norms = torch._foreach_norm(gs, float("inf"))
        flag.add_(torch.stack(norms).isfinite().logical_not_().any())
    if dtensors is not None:
        dtensor.agree(found, dtensors)
    return found


def _on(flags: dict, device: torch.device) -> torch.Tensor:
    """The sum of the per-device ``flags`` on ``device`` (copies between devices, no sync)."""
    own = flags.get(device)
    if own is not None and len(flags) == 1:
        return own
    return sum(f.to(device) for f in flags.values())


def choose_skip(
    steps: list[GroupStep],
    skip_nonfinite: bool,
    found_inf: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> Skip:
    """Whether and where the step is skipped for a non-finite gradient, before anything moves.

    ``found_inf`` and ``grad_scale``: GradScaler's flag and scale (``optimizer.found_inf`` and
    ``optimizer.grad_scale``, set by ``GradScaler.step`` where the optimizer says it supports
    them), else None. Without ``found_inf``, ``skip_nonfinite`` checks every gradient. Every
    group capturable: the flags stay on the device (``Skip.found``, one per device of a
    group); otherwise the answer comes to the host (one sync) and ``Skip.now`` says it."""
    if found_inf is None and grad_scale is None and not skip_nonfinite:
        return NO_SKIP
    every_capturable = all(step.group["capturable"] for step in steps)
    if grad_scale is not None and not every_capturable:
        raise RuntimeError(
            "grad_scale (GradScaler's scale, handed to the optimizer) is read by capturable "
            "groups only; with capturable=False, GradScaler unscales the gradients itself"
        )
    if found_inf is not None:
        flags = {found_inf.device: found_inf}
    elif skip_nonfinite:
        flags = nonfinite_found(step_grads(steps))
    else:
        flags = {}
    if not every_capturable:
        return Skip(bool(_on(flags, next(iter(flags))).item()), None, None) if flags else NO_SKIP
    devices = {step.group["params"][0].device for step in steps}
    found = {d: _on(flags, d) for d in devices} if flags else None
    scale = None if grad_scale is None else {d: grad_scale.to(d) for d in devices}
    return Skip(False, found, scale)
