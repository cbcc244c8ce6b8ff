"""Schedule-Free AdamW, SGD and RAdam as torch optimizers.

The math lives in ``rule.py``, the Triton kernels in ``kernels.py``; ``dispatch.py`` chooses how
each group steps and switches, and this file keeps the optimizer's groups, state, checks and
checkpoints.

Drop-in for the ``schedulefree`` classes of the same names: same constructor arguments and
defaults, same per-group keys (``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr``,
``train_mode``, ...), same state keys (``z``, ``exp_avg_sq``), closures as in torch. Added:
``fused``, ``state_dtype``, ``capturable`` and ``skip_nonfinite`` (keyword-only), and
``eval_params()``; AdamW's ``inner_momentum`` of upstream's main branch (state key
``exp_avg``, only when not 0). Variants of these classes under schedulefree's other names:
``closure.py`` (``*Closure``) and ``reference.py`` (``*Reference``, ``*Paper``).

What differs on purpose: the optimizers start in train mode (at step 0, ``y = x = z``, so this
changes no number), ``step()`` in eval mode raises RuntimeError, gradients are never written,
and every step's scalars are Python floats. A first step without closure, with every lr 0 and
every gradient zero (the probe by which ``torch.distributed.checkpoint.state_dict`` creates an
optimizer's state) creates the state and counts nothing, in either mode.

DTensor params (FSDP2's ``fully_shard``, tensor parallelism): ``z`` and ``v`` are DTensors
with the param's placements; every implementation steps and switches the local shards
(``dtensor.py``), ``eval_params()`` returns DTensors, and ``capturable=True`` is refused.

A step is two methods, so that a caller that steps the tensors in pieces (DeepSpeed ZeRO-3 calls
``step()`` once per sub-group, with the other groups' param lists empty) still counts one step:

- ``advance_scalars()`` counts one step in every group (``k``, ``lr_max``, ``weight_sum``,
  ``scheduled_lr``), whatever the groups hold. Call it once per training step.
- ``apply_update()`` moves ``y``, ``z`` and ``v`` of every param that has a gradient by the step
  that ``advance_scalars()`` counted last. It can be called once per piece; it changes no
  counter.

A caller that counts the steps itself (``sf_torch.deepspeed``: once per group per engine step)
uses ``plan_update()`` (every check; changes nothing) and ``apply_planned(plan)`` instead.

``step(closure=None)`` is ``advance_scalars()`` followed by ``apply_update()``. Every check
(mode, hyperparameters, sparse gradients, the fused kernel's needs) runs before any tensor or
counter changes, so a step that raises leaves the optimizer as it was.

``capturable=True`` groups step so that a CUDA graph can replay the step: they always take the
planned fused step (``fused_plan``), their counters are one float64 tensor on the params'
device (the group's ``k``, ``lr_max``, ``weight_sum`` and ``scheduled_lr`` are 0-d views of
it), and one program of ``kernels``' advance kernel advances them and writes the step's
coefficients on the device. ``state_dict()`` saves the counters as Python numbers. Under a
capture, a group without a current plan, a group with ``capturable=False`` and ``eval()`` /
``train()`` raise a RuntimeError before anything is recorded.

Non-finite gradients: as in the reference, an inf or NaN gradient makes ``z`` (and ``y``) NaN
for good. ``skip_nonfinite=True`` (one setting for the whole optimizer) checks every gradient
first and skips the whole step where one is not finite: params, ``z``, ``v`` and the counters
stay as they were, in every group. With host counters the answer comes to the host (one sync
per step); with ``capturable=True`` in every group it stays on the device (the advance kernel
keeps the counters, the update kernel stores nothing). ``torch.amp.GradScaler`` works as with
any optimizer (its ``unscale_``, one sync, ``step()`` skipped); where every group is
capturable the optimizer takes GradScaler's scale and found-inf flag itself
(``_step_supports_amp_scaling``) and unscales and skips on the device.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from sf_schedules.validation import (
    check_b1,
    check_b2,
    check_choice,
    check_count,
    check_nonnegative,
    check_pair,
    check_real,
)

from . import dispatch, dtensor, kernels, rule
from .fused_plan import FusedPlan
from .state import tracked

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

_EVAL_MODE_STEP = (
    "step() was called in eval mode: call optimizer.train() before training steps "
    "(and optimizer.eval() before evaluating or saving a checkpoint)"
)


# Group entries that the optimizer itself changes every step (not hyperparameters to check).
_COUNTERS = frozenset(("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"))
# The counters a capturable group keeps on its device, in the advance kernel's order.
_DEVICE_COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")
_IMMUTABLE = frozenset((float, int, bool, type(None), str, torch.dtype))


def _frozen(value):
    """``value`` where it cannot change in place, else a new object (never ``is`` anything)."""
    kind = type(value)
    if kind in _IMMUTABLE or (kind is tuple and all(type(v) in _IMMUTABLE for v in value)):
        return value
    return object()


_CLASS_NAMES = {
    "adamw": "AdamWScheduleFree",
    "sgd": "SGDScheduleFree",
    "radam": "RAdamScheduleFree",
}


def _saved_group_kind(group: dict[str, Any]) -> tuple[str | None, str]:
    """The kind of optimizer a saved param group is from, told by its keys (SGD: ``momentum``;
    AdamW: ``betas`` and ``warmup_steps``; RAdam: ``betas`` and ``silent_sgd_phase``, no
    ``warmup_steps``), and the keys that tell it. None where they do not tell (both ``betas``
    and ``momentum``: a key set by hand)."""
    if "momentum" in group and "betas" not in group:
        return "sgd", "momentum"
    if "betas" in group and "momentum" not in group:
        if "silent_sgd_phase" in group:
            return "radam", "betas and silent_sgd_phase"
        if "warmup_steps" not in group:
            return "radam", "betas and no warmup_steps"
        return "adamw", "betas and warmup_steps"
    return None, "betas and momentum"


def _check_saved_kind(state_dict: Any, kind: str) -> None:
    """ValueError when ``state_dict`` is that of another kind of optimizer than ``kind`` (its
    param groups' keys, or its per-param state: v, ``exp_avg_sq``, is AdamW's and RAdam's).
    What is no state dict at all is left to torch's ``load_state_dict`` to refuse."""
    want = _CLASS_NAMES[kind]
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list | tuple):
        return
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            return
        # Every Schedule-Free optimizer's group counts its steps in k, and has betas or momentum.
        missing = None
        if "k" not in group:
            missing = "'k'"
        elif "betas" not in group and "momentum" not in group:
            missing = "'betas' nor 'momentum'"
        if missing is not None:
            raise ValueError(
                f"load_state_dict: param group {index} of the state dict has no {missing}: it "
                f"is no Schedule-Free optimizer's state dict, and this optimizer is an {want}"
            )
        saved, keys = _saved_group_kind(group)
        if saved is not None and saved != kind:
            raise ValueError(
                f"load_state_dict: the state dict is an {_CLASS_NAMES[saved]}'s (param group "
                f"{index} has {keys}), and this optimizer is an {want}: load it into an "
                f"{_CLASS_NAMES[saved]}"
            )
    states = state_dict.get("state")
    for entry in states.values() if isinstance(states, dict) else ():
        if not isinstance(entry, dict):
            continue
        if kind == "sgd" and "exp_avg_sq" in entry:
            raise ValueError(
                "load_state_dict: the state dict is an AdamWScheduleFree's or an "
                "RAdamScheduleFree's (its per-param state has exp_avg_sq), and this optimizer is "
                "an SGDScheduleFree: load it into the optimizer it was saved from"
            )
        if kind != "sgd" and "z" in entry and "exp_avg_sq" not in entry:
            raise ValueError(
                "load_state_dict: the state dict is an SGDScheduleFree's (its per-param state "
                f"has z and no exp_avg_sq), and this optimizer is an {want}: load it into an "
                "SGDScheduleFree"
            )


class ScheduleFreeOptimizer(torch.optim.Optimizer):
    """Train/eval views, state, checks and dispatch shared by the three optimizers.

    Subclasses set ``kind`` (one of ``rule.KINDS``) and pass their hyperparameters.
    """

    kind: str
    # The variant of the rule the steps follow (``rule.PAPER`` for AdamWScheduleFreePaper);
    # ``kind`` tells the state and checkpoints.
    rule_kind: str | None = None

    @property
    def _rule_kind(self) -> str:
        return self.rule_kind or self.kind

    def __init__(
        self,
        params: ParamsT,
        hyperparameters: dict[str, Any],
        foreach: bool | None,
        fused: bool | None,
        state_dtype: torch.dtype | None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        defaults = dict(
            hyperparameters,
            k=0,
            train_mode=True,
            weight_sum=0.0,
            lr_max=0.0,
            scheduled_lr=0.0,
            foreach=foreach,
            fused=fused,
            state_dtype=state_dtype,
            capturable=capturable,
            skip_nonfinite=skip_nonfinite,
        )
        self._plans: dict[int, FusedPlan] = {}  # group index -> planned fused step
        # capturable groups: group index -> (float64 counters on the device, their views)
        self._counters: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._retired: list[FusedPlan] = []  # replaced plans a CUDA graph may read
        super().__init__(params, defaults)
        self.state = tracked(self.state)

    # -- groups and checks ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            if group["capturable"] and not group["params"]:
                raise ValueError(
                    "capturable=True needs params in the group: its counters live on their device"
                )
            dispatch.check_new_group(group)
            self._skip_nonfinite()
        except Exception:
            self.param_groups.pop()
            raise
        # A group added in eval mode is in eval mode (its params have no z yet either way).
        group["train_mode"] = self.param_groups[0]["train_mode"]

    def _check_group(self, group: dict[str, Any]) -> None:
        # required=True: a torch step needs every number now (None, a callable schedule: no).
        check_nonnegative("lr", group["lr"], required=True)
        if self.kind == "sgd":
            check_b1("momentum", group["momentum"], required=True)
        else:
            b1, b2 = check_pair("betas", group["betas"], ("beta1", "beta2"))
            check_b1("betas[0]", b1, required=True)
            check_b2("betas[1]", b2, required=True)
            check_nonnegative("eps", group["eps"], required=True)
        check_nonnegative("weight_decay", group["weight_decay"], required=True)
        if "inner_momentum" in group:
            check_real(
                "inner_momentum", group["inner_momentum"], 0.0, 1.0, high_open=True, required=True
            )
        if "decay_at_z" in group:
            check_choice("decay_at_z", group["decay_at_z"], (True, False))
        if self.kind != "radam":
            check_count("warmup_steps", group["warmup_steps"], required=True)
        check_nonnegative("r", group["r"], required=True)
        check_nonnegative("weight_lr_power", group["weight_lr_power"], required=True)
        state_dtype = group["state_dtype"]
        if state_dtype is not None and not (
            isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
        ):
            raise ValueError(
                f"state_dtype must be in floating torch dtypes or None, got {state_dtype!r}"
            )
        for name in ("foreach", "fused"):
            check_choice(name, group[name], (None, True, False))
        check_choice("capturable", group["capturable"], (True, False))
        check_choice("skip_nonfinite", group["skip_nonfinite"], (True, False))
        if group["capturable"] and group["fused"] is False:
            raise ValueError(
                "capturable=True steps with the fused kernel: fused must be in (None, True), "
                "got False"
            )

    def _skip_nonfinite(self) -> bool:
        """The groups' ``skip_nonfinite``, one value: a ValueError where they differ (a step
        is skipped in every group or in none, or the groups' counters would part)."""
        first = self.param_groups[0]["skip_nonfinite"]
        for index, group in enumerate(self.param_groups):
            if group["skip_nonfinite"] is not first:
                raise ValueError(
                    "skip_nonfinite is one setting for the whole optimizer (a step is skipped in "
                    f"every group or in none): param group {index} has "
                    f"{group['skip_nonfinite']!r}, param group 0 {first!r}"
                )
        return first

    def _check_ready(self) -> None:
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(_EVAL_MODE_STEP)
        checked = self.__dict__.setdefault("_checked_groups", {})
        keys = [k for k in self.defaults if k not in _COUNTERS]
        for index, group in enumerate(self.param_groups):
            # The checks run again whenever a hyperparameter is not the very (immutable) object
            # they last passed: a new value, a group replaced, or a mutable value (a tensor lr,
            # a list of betas), which is checked every step.
            values = tuple(map(_frozen, map(group.get, keys)))
            last = checked.get(index)
            if last is not None and last[0] is group and all(map(operator.is_, values, last[1])):
                continue
            self._check_group(group)
            checked[index] = (group, values)

    def _plan(self) -> list[dispatch.GroupStep]:
        """Each group's step as ``dispatch.choose_step`` chooses it; changes nothing."""
        steps = []
        capturing = self._capturing()
        owner = type(self).__name__
        for index, group in enumerate(self.param_groups):
            planned = self._plans.get(index)
            step = dispatch.choose_step(index, group, planned, self.state, capturing, owner)
            if capturing and not self._counters_current(index, group):
                raise RuntimeError(
                    f"a CUDA graph is being captured, but param group {index}'s counters (k, "
                    "lr_max, weight_sum, scheduled_lr) were set by hand since its last step: "
                    "take one step outside the capture first"
                )
            steps.append(step)
        return steps

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler's contract: True (every group capturable) makes GradScaler.step
        hand its scale and found-inf flag over (``grad_scale``, ``found_inf``) and call step(),
        which unscales the gradients as the kernel reads them (``.grad`` keeps the scaled
        values) and skips on the device, without GradScaler's host sync; else GradScaler
        unscales ``.grad`` in place, syncs and skips step() itself."""
        return all(group["capturable"] for group in self.param_groups)

    @staticmethod
    def _capturing() -> bool:
        """Whether a CUDA graph is being captured on the current stream."""
        return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()

    # -- capturable groups' counters -----------------------------------------------------------

    def _counters_current(self, index: int, group: dict[str, Any]) -> bool:
        entry = self._counters.get(index)
        return entry is not None and all(
            group[key] is view for key, view in zip(_DEVICE_COUNTERS, entry[1])
        )

    def _device_counters(self, index: int, group: dict[str, Any]) -> torch.Tensor:
        """A capturable group's counters as one float64 tensor on its params' device; the
        group's ``k``, ``lr_max``, ``weight_sum`` and ``scheduled_lr`` are 0-d views of it.
        Values set by hand (or loaded) are copied into the same tensor, which a captured graph
        keeps reading."""
        entry = self._counters.get(index)
        device = group["params"][0].device
        if entry is not None and entry[0].device == device and self._counters_current(index, group):
            return entry[0]
        values = torch.tensor([float(group[key]) for key in _DEVICE_COUNTERS], dtype=torch.float64)
        if entry is not None and entry[0].device == device:
            counters = entry[0]
            counters.copy_(values)
        else:
            counters = values.to(device)
        views = tuple(counters[i] for i in range(len(_DEVICE_COUNTERS)))
        group.update(zip(_DEVICE_COUNTERS, views))
        self._counters[index] = (counters, views)
        return counters

    def _drop_plan(self, index: int) -> None:
        planned = self._plans.pop(index, None)
        if planned is not None and planned.captured:
            self._retired.append(planned)  # a graph may still read its device tables

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step: ``advance_scalars()``, then ``apply_update()``.

        Args:
            closure: optional; re-evaluates the model and returns the loss (run with grad on).

        Returns:
            The closure's loss, or None.
        """
        if closure is None and self._state_probe():
            return None
        self._check_ready()
        skip_nonfinite = self._skip_nonfinite()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        # GradScaler.step sets these for the duration of the call, where
        # _step_supports_amp_scaling says the optimizer unscales and skips by itself.
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        skip = dispatch.choose_skip(plan, skip_nonfinite, found_inf, grad_scale)
        if skip.now:
            return loss
        self._advance()
        self._apply(plan, skip)
        return loss

    def _state_probe(self) -> bool:
        """Whether this step is torch.distributed.checkpoint's probe, and if so takes it: the
        state is created (``z`` a copy of each param, ``v`` zeros) and nothing else changes.

        ``get_state_dict``/``set_state_dict`` (``torch.distributed.checkpoint.state_dict``)
        create the state of an optimizer that has none by a step with every lr 0 and every
        gradient zero. The rule's step would count it (k = 1: the warmup and v's bias
        correction one step on), or raise in eval mode; as a probe it counts nothing, in
        either mode. Only a step without closure, before the optimizer has any state, with
        every lr 0 and every gradient zero (on this rank's shards, for DTensors) is one."""
        if self.state or not all(float(group["lr"]) == 0.0 for group in self.param_groups):
            return False
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.requires_grad]
        if not grads or any(g is None for g in grads):
            return False
        if any(bool(g.any()) for g in dtensor.local(grads)):
            return False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.init_state(p, group)
        return True

    def advance_scalars(self) -> None:
        """Count one step in every param group (``k``, ``lr_max``, ``weight_sum``)."""
        self._check_ready()
        self._no_split_step("advance_scalars")
        self._advance()

    @torch.no_grad()
    def apply_update(self) -> None:
        """Move every param that has a gradient by the step last counted by advance_scalars()."""
        self._check_ready()
        self._no_split_step("apply_update")
        steps = self._plan()
        for step in steps:
            if (step.params or step.planned is not None) and step.group["k"] < 1:
                raise RuntimeError(
                    "apply_update() needs a counted step: call advance_scalars() first"
                )
        self._apply(steps)

    def plan_update(self) -> list[dispatch.GroupStep]:
        """Every check of a step (mode, hyperparameters, gradients, the fused kernel's needs),
        then each param group's update as it will run; changes nothing. For callers that count
        steps themselves (``sf_torch.deepspeed``): ``plan_update()``, then the counters, then
        ``apply_planned(plan)``."""
        self._check_ready()
        self._no_skip_split("plan_update")
        return self._plan()

    @torch.no_grad()
    def apply_planned(self, plan: list[dispatch.GroupStep]) -> None:
        """Move the params by ``plan`` (from ``plan_update()``, with no param, gradient or state
        changed since), with the groups' counters as they are now. No checks of its own."""
        self._apply(plan)

    def _no_skip_split(self, name: str) -> None:
        if self._skip_nonfinite():
            raise RuntimeError(
                f"{name}() is not available with skip_nonfinite=True (a step is taken or "
                "skipped whole, after every gradient is checked): call step(); under DeepSpeed, "
                "its fp16 loss scaler skips overflowing steps"
            )

    def _no_split_step(self, name: str) -> None:
        self._no_skip_split(name)
        if any(group["capturable"] for group in self.param_groups):
            raise RuntimeError(
                f"{name}() is not available with capturable=True (its counters advance on the "
                "device, with the update): call step()"
            )

    def _advance(self) -> None:
        # Every group's new counters first, then all stored: an error leaves none counted.
        # Capturable groups count on the device, in _apply.
        groups = [group for group in self.param_groups if not group["capturable"]]
        counters = [rule.advance(group, self._rule_kind) for group in groups]
        for group, new in zip(groups, counters):
            group.update(new)

    def _apply(self, steps: list[dispatch.GroupStep], skip: dispatch.Skip = dispatch.NO_SKIP):
        for index, step in enumerate(steps):
            if step.planned is None:
                self._drop_plan(index)
            if step.impl == "planned":
                step.planned.plan.step(
                    step.planned.prepared, rule.scalars(step.group, self._rule_kind)
                )
            elif step.impl == "capturable":
                self._capturable_step(index, step, skip)
            elif step.impl is not None:
                self._general_step(index, step)

    def _general_step(self, index: int, step: dispatch.GroupStep) -> None:
        group, params, grads = step.group, step.params, step.grads
        s = rule.scalars(group, self._rule_kind)
        dicts, zs, vs, ms = self._buffers(group, params, step.states, s.has_v, s.has_m)
        dispatch.update(step.impl, params, grads, zs, vs, s, ms)
        if dispatch.plans_after(step.impl, params, grads, zs, vs, s.has_v, ms):
            self._plans[index] = self._new_plan(group, params, dicts, zs, vs, s.has_v, ms)

    def _capturable_step(self, index: int, step: dispatch.GroupStep, skip: dispatch.Skip) -> None:
        """A capturable group's step: its counters advance on the device, by the plan's
        kernels (or stay, where ``skip``'s flag on the device says so). Without a current plan
        (outside any capture), the missing state is created and the group planned first."""
        group = step.group
        counters = self._device_counters(index, group)
        found = None if skip.found is None else skip.found[counters.device]
        scale = None if skip.scale is None else skip.scale[counters.device]
        planned = step.planned
        if planned is None:
            if not step.params:  # nothing to move: the counters still advance, as in every group
                kernels.advance_counters(self.kind, group, counters, found)
                return
            has_v = self.kind != "sgd"
            has_m = self.kind == "adamw" and float(group.get("inner_momentum", 0.0)) != 0.0
            dicts, zs, vs, ms = self._buffers(group, step.params, step.states, has_v, has_m)
            plan = self._new_plan(group, step.params, dicts, zs, vs, has_v, ms)
            prepared = plan.prepare_step(group, self.state)
            if prepared is None:  # cannot happen right after planning: it would be a bug here
                raise AssertionError("a new capturable plan found itself stale")
            planned = dispatch.PlannedStep(plan, prepared)
        planned.plan.step_capturable(planned.prepared, group, self.kind, counters, found, scale)
        self._plans[index] = planned.plan

    def _buffers(self, group, params, states, has_v: bool, has_m: bool = False):
        """The state dicts of ``params`` (created where missing), their z, their v (None
        without v) and their m (None without AdamW's inner momentum; the list itself None)."""
        dicts = [
            st if st and "z" in st else self.init_state(p, group) for p, st in zip(params, states)
        ]
        zs = [st["z"] for st in dicts]
        vs = [st["exp_avg_sq"] for st in dicts] if has_v else [None] * len(dicts)
        ms = [st["exp_avg"] for st in dicts] if has_m else None
        return dicts, zs, vs, ms

    def _new_plan(self, group, params, dicts, zs, vs, has_v: bool, ms=None) -> FusedPlan:
        """A ``FusedPlan`` of ``group`` for the step that just found ``params`` with gradients."""
        stepped_ids = set(map(id, params))
        stepped = [id(p) in stepped_ids for p in group["params"]]
        return FusedPlan(group, stepped, dicts, zs, vs, self.state, has_v, ms)

    def init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``p``'s state, created as the first step finds it if missing: ``z`` a copy of the
        param, ``v`` zeros (AdamW, RAdam), ``m`` zeros (AdamW with ``inner_momentum != 0``
        only), all in the group's ``state_dtype``. Moves nothing."""
        state = self.state[p]
        if "z" not in state:
            dtype = group["state_dtype"] or p.dtype
            state["z"] = p.detach().to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
            if self.kind != "sgd":
                state["exp_avg_sq"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )
            if self.kind == "adamw" and float(group.get("inner_momentum", 0.0)) != 0.0:
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )
        return state

    # -- views ---------------------------------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` into the params (for evaluation and checkpoints). Idempotent."""
        self._switch("x")

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` back into the params (for training steps). Idempotent."""
        self._switch("y")

    def _switch(self, view: str) -> None:
        if self._capturing():
            # The switch sends its weight from a host buffer of the moment: a replay would read
            # whatever that memory holds by then.
            raise RuntimeError(
                "eval()/train() cannot be captured in a CUDA graph: call them outside the "
                "capture (only step() is capturable, with capturable=True)"
            )
        to_train = view == "y"
        # Every group's implementation first: an error moves nothing.
        switches = [
            dispatch.choose_switch(group, self._plans.get(index), self.state)
            for index, group in enumerate(self.param_groups)
            if group["train_mode"] != to_train
        ]
        for switch in switches:
            weight = rule.view_weight(view, rule.b1_of(switch.group, self.kind))
            dispatch.switch_(switch.impl, switch.params, switch.zs, weight, switch.plan)
            switch.group["train_mode"] = to_train

    @torch.no_grad()
    def eval_params(self) -> list[torch.Tensor]:
        """``x`` for every param, as new tensors, without changing the params or the mode.

        The order is ``[p for g in param_groups for p in g['params']]``. A param without state
        (it never had a gradient) gives a copy of itself, as does every param in eval mode.
        Each tensor equals what ``eval()`` would write into its param.
        """
        out = []
        for group in self.param_groups:
            b1 = rule.b1_of(group, self.kind)
            for p in group["params"]:
                state = self.state.get(p)
                if group["train_mode"] and state and "z" in state:
                    out.append(rule.x_of(p, state["z"], b1))
                else:
                    out.append(p.detach().clone())
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with a capturable group's device counters as Python numbers
        (``k`` an int), as every other group keeps them. Every per-param state is a plain
        ``dict`` (the tensors themselves are shared, as in torch), so that
        ``torch.load(path)`` reads the checkpoint with its default ``weights_only=True``."""
        out = super().state_dict()
        out["state"] = {key: dict(value) for key, value in out["state"].items()}
        for group in out["param_groups"]:
            for key in _DEVICE_COUNTERS:
                value = group.get(key)
                if isinstance(value, torch.Tensor):
                    group[key] = int(value.item()) if key == "k" else float(value.item())
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, for a state dict of this optimizer's kind (sf_torch's or
        the ``schedulefree`` class of the same name): that of another kind (an AdamW one into
        SGD, ...) is refused with a ValueError before anything changes."""
        _check_saved_kind(state_dict, self.kind)
        for index in list(self._plans):
            self._drop_plan(index)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            # Checkpoints of the reference classes lack this package's keys (fused, state_dtype).
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # torch casts every floating state tensor to the param's dtype and may alias the
        # checkpoint's tensors; z and v belong in state_dtype and in buffers of their own.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for group in self.param_groups:
            for p, saved_id in zip(group["params"], saved_ids):
                saved = state_dict["state"].get(saved_id)
                if not saved:
                    continue
                dtype = group["state_dtype"] or p.dtype
                for key in ("z", "exp_avg_sq", "exp_avg"):
                    if key in saved:
                        self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = tracked(self.state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_counters", {})
        self.__dict__.setdefault("_retired", [])
        for index in list(self._plans):
            self._drop_plan(index)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


class AdamWScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free AdamW. Call ``train()`` before training and ``eval()`` before evaluating
    or saving a checkpoint; no learning-rate schedule is needed (use ``warmup_steps``).

    Args:
        params: params or param-group dicts; every hyperparameter below can be set per group.
        lr: base learning rate, >= 0.
        betas: ``(b1, b2)``: b1 in (0, 1] weighs x against z in y; b2 in [0, 1) decays v.
        eps: added to ``sqrt(v)``, >= 0.
        weight_decay: decoupled decay evaluated at y, >= 0.
        warmup_steps: linear warmup of the lr over this many steps, >= 0.
        r: the average weighs step k by ``(k+1)**r``, >= 0.
        weight_lr_power: ... and by ``lr_max**weight_lr_power``, >= 0.
        inner_momentum: in [0, 1), as in upstream schedulefree's main branch (unreleased on
            PyPI; 0.9 is its suggestion when used): an EMA ``m`` of the gradient, divided by
            its bias correction ``1 - inner_momentum**(k+1)``, replaces the gradient in the
            numerator of the AdamW direction (``rule.py``). 0 (default): no EMA, and no
            buffer for it; otherwise a third state buffer ``exp_avg`` per param, created at
            the first step. Every implementation (loop, foreach, fused, capturable) steps it.
            A param whose state was made with 0 (or loaded from such a checkpoint) cannot
            step with another value (RuntimeError at the step).
        foreach: True: torch's multi-tensor ops; False: one tensor at a time; None: the
            multi-tensor ops for CUDA params, one tensor at a time on the CPU (as torch does).
        fused: True: one Triton kernel per group (CUDA; CPU under TRITON_INTERPRET=1), an error
            if it cannot run. None: that kernel where every param is a CUDA tensor, else as
            False. It takes precedence over ``foreach``.
        state_dtype: dtype of z and v (e.g. torch.float32 for bf16 params); None: the params'.
        capturable: True: the step can be captured in a CUDA graph (``torch.cuda.graph``) and
            replayed. The fused kernel steps each group (``fused`` must not be False; one
            device and dtype per group, contiguous tensors), and the counters (``k``,
            ``lr_max``, ``weight_sum``, ``scheduled_lr``) live on the device as 0-d float64
            tensors in the group (``state_dict()`` saves them as numbers). Take one step
            before capturing (torch's warm-up iterations); a replay uses the hyperparameters
            and gradient buffers of the captured step, as every CUDA graph does.
            ``advance_scalars()``/``apply_update()`` are not available.
        skip_nonfinite: True: before each step every gradient is checked (torch's GradScaler
            check, on the device), and where one holds an inf or a NaN the whole step is
            skipped: params, z, v and counters stay as they were in every group, as if the
            step had not been taken (False, the reference's behaviour: the NaN reaches z for
            good). Costs one pass over the gradients on the device (their values kept), plus
            one host sync per step unless every group is capturable (then the skip is decided
            on the device, and a CUDA graph replays it). One value for all groups;
            ``advance_scalars()``/``apply_update()`` are not available. fp16 with
            ``torch.amp.GradScaler`` needs no option: GradScaler skips overflowing steps itself
            (one host sync), or, where every group is capturable, hands its scale and flag to
            the optimizer, which unscales as it reads the gradients and skips on the device.
    """

    kind = "adamw"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        inner_momentum: float = 0.0,
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        hyperparameters = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            inner_momentum=inner_momentum,
        )
        super().__init__(
            params, hyperparameters, foreach, fused, state_dtype, capturable, skip_nonfinite
        )


class SGDScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free SGD. Call ``train()`` before training and ``eval()`` before evaluating
    or saving a checkpoint; no learning-rate schedule is needed (use ``warmup_steps``).

    Args are those of ``AdamWScheduleFree`` with ``momentum`` (b1, in (0, 1]) in place of
    ``betas`` and no ``eps``; the default lr is 1.0.
    """

    kind = "sgd"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        hyperparameters = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
        )
        super().__init__(
            params, hyperparameters, foreach, fused, state_dtype, capturable, skip_nonfinite
        )


class RAdamScheduleFree(ScheduleFreeOptimizer):
    """Schedule-Free RAdam: no warmup and no schedule to set. Call ``train()`` before training
    and ``eval()`` before evaluating or saving a checkpoint.

    Args are those of ``AdamWScheduleFree`` without ``warmup_steps``, plus
    ``silent_sgd_phase``: while RAdam's variance estimate is too short to rectify (the first
    steps; 5 with b2 = 0.999), True leaves the params still (lr 0), False takes SGD steps.
    """

    kind = "radam"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        silent_sgd_phase: bool = True,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        hyperparameters = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            r=r,
            weight_lr_power=weight_lr_power,
            silent_sgd_phase=silent_sgd_phase,
        )
        super().__init__(
            params, hyperparameters, foreach, fused, state_dtype, capturable, skip_nonfinite
        )
