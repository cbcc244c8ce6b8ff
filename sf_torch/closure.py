"""Schedule-Free optimizers whose params hold ``x`` between steps: schedulefree's closure classes.

``AdamWScheduleFreeClosure``, ``SGDScheduleFreeClosure`` and ``RAdamScheduleFreeClosure`` take
the constructor arguments of the ``schedulefree`` 1.4.1 classes of the same names (same order,
same defaults) and need no ``train()``/``eval()``: the params hold ``x`` (the point to evaluate
and to save) before and after every ``step(closure)``. A step puts ``y`` into the params, runs
the closure there (the gradient is taken at ``y``), takes the optimizer's step and puts ``x``
back. For code that cannot call ``train()``/``eval()`` (trainer loops that own the mode).

Each is the sf_torch optimizer of the same rule with that step around it, so every
implementation (loop, foreach, fused Triton kernel, the planned step) and option
(``state_dtype``, ``skip_nonfinite``, ...) works as there; the switches to ``y`` and back cost
two passes over the params per step (one kernel launch each on CUDA; the loop and foreach
need only the first).

What differs from schedulefree 1.4.1's closure classes:

- 1.4.1 extrapolates every param to ``y`` but puts back ``x`` only for params with a gradient:
  a param without one stays at ``y`` after the step, and the next step extrapolates it again
  (it drifts toward ``z``). Here every param with a state is back at ``x`` after each step.
- The loop and foreach take 1.4.1's order of operations (``y -> x`` with the old ``z``, the
  ``z`` step, ``x = lerp(x, z, c)``: ``rule.StepScalars.x_weight``), so they give 1.4.1's
  numbers bit for bit (measured in float64 over 200 steps, also on problems that amplify
  round-off: tests/test_torch_surface.py). The fused kernel steps ``y`` and switches back to
  ``x``: within 1e-12 of them in float64.
- ``step()`` without a closure raises TypeError (1.4.1: its closure argument is required),
  except the state probe of ``torch.distributed.checkpoint`` (lr 0, zero gradients, no state
  yet), which creates the state and moves nothing, as in the other sf_torch optimizers.
- ``train()`` and ``eval()`` exist and do nothing (1.4.1 has neither), so that code written
  for the other classes runs; ``eval_params()`` returns copies of the params (``x``).
- ``advance_scalars()``, ``apply_update()`` and ``plan_update()`` are not available: a step
  is the closure's evaluation at ``y`` and the update together.

A checkpoint holds ``x`` in the model's params, as 1.4.1's does; ``load_state_dict`` takes
this package's or 1.4.1's closure-class state dicts (and those of the train/eval classes saved
in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import dispatch, rule
from .optimizers import (
    AdamWScheduleFree,
    ParamsT,
    RAdamScheduleFree,
    ScheduleFreeOptimizer,
    SGDScheduleFree,
)


class _ClosureStep:
    """The closure classes' step and mode handling, in front of a ``ScheduleFreeOptimizer``."""

    def _hold_x(self: Any) -> None:
        """Every group in eval mode (the params hold x), also for groups added later."""
        self.defaults["train_mode"] = False
        for group in self.param_groups:
            group["train_mode"] = False

    @torch.no_grad()
    def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        """Put ``y`` into the params, run ``closure`` there (with grad on), take one step, put
        ``x`` back.

        Args:
            closure: re-evaluates the model and returns the loss; it must compute the
                gradients (``loss.backward()``) at the params it finds (``y``).

        Returns:
            The closure's loss.
        """
        if closure is None:
            if self._state_probe():
                return None
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that computes the loss and its "
                "gradients (the params hold x between steps; the closure runs at y)"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        # The hyperparameters' checks before the params move: a bad value moves nothing.
        for group in self.param_groups:
            self._check_group(group)
        self._skip_nonfinite()
        self._switch("y")
        self.__dict__["_closure_step"] = True
        try:
            return ScheduleFreeOptimizer.step(self, closure)
        finally:
            self.__dict__["_closure_step"] = False
            self._switch("x")  # the groups that the x-form step did not leave at x

    def _general_step(self: Any, index: int, step: dispatch.GroupStep) -> None:
        """In a closure step, the loop and foreach take schedulefree's order and leave ``x``
        in the params (``rule.StepScalars.x_weight``): the numbers of 1.4.1's closure classes
        bit for bit. The fused kernel steps ``y``, switched back to ``x`` after the step."""
        if not self.__dict__.get("_closure_step") or step.impl not in ("loop", "foreach"):
            ScheduleFreeOptimizer._general_step(self, index, step)
            return
        group, params = step.group, step.params
        b1 = rule.b1_of(group, self.kind)
        s = rule.scalars(group, self._rule_kind)._replace(x_weight=rule.view_weight("x", b1))
        _, zs, vs, ms = self._buffers(group, params, step.states, s.has_v, s.has_m)
        dispatch.update(step.impl, params, step.grads, zs, vs, s, ms)
        # The group's params without a gradient hold y: x for them too, then the group is
        # at x (the switch after the step leaves it).
        stepped = set(map(id, params))
        rest = [p for p in group["params"] if id(p) not in stepped]
        rest = [(p, self.state[p]["z"]) for p in rest if "z" in self.state.get(p, ())]
        if rest:
            ps, zs_rest = zip(*rest)
            impl = dispatch.switch_impl(list(ps), list(zs_rest), False)
            dispatch.switch_(impl, list(ps), list(zs_rest), rule.view_weight("x", b1))
        group["train_mode"] = False

    def train(self: Any) -> None:
        """Does nothing: the params hold ``x`` between steps (kept for code written for the
        train/eval classes)."""

    def eval(self: Any) -> None:
        """Does nothing: the params hold ``x`` between steps (kept for code written for the
        train/eval classes)."""

    def _no_closure_split(self: Any, name: str) -> None:
        raise RuntimeError(
            f"{name}() is not available in {type(self).__name__} (a step is the closure's "
            "evaluation at y and the update together): call step(closure)"
        )

    def advance_scalars(self: Any) -> None:
        self._no_closure_split("advance_scalars")

    def apply_update(self: Any) -> None:
        self._no_closure_split("apply_update")

    def plan_update(self: Any):
        self._no_closure_split("plan_update")

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        """The base class's ``load_state_dict``; the groups then say eval mode (the params
        hold x), whatever the state dict says."""
        ScheduleFreeOptimizer.load_state_dict(self, state_dict)
        self._hold_x()

    def __setstate__(self: Any, state: dict[str, Any]) -> None:
        ScheduleFreeOptimizer.__setstate__(self, state)
        self._hold_x()


class AdamWScheduleFreeClosure(_ClosureStep, AdamWScheduleFree):
    """Schedule-Free AdamW with a closure: the params hold ``x`` between steps, and
    ``step(closure)`` evaluates the closure at ``y`` (module docstring). No ``train()`` /
    ``eval()`` needed. Arguments as ``schedulefree.AdamWScheduleFreeClosure`` (1.4.1), plus
    those of :class:`sf_torch.AdamWScheduleFree` as keywords (``inner_momentum``, ``fused``,
    ``state_dtype``, ``capturable``, ``skip_nonfinite``; ``capturable=True`` steps, but the
    switches around it cannot be captured in a CUDA graph)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        *,
        inner_momentum: float = 0.0,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            inner_momentum=inner_momentum,
            foreach=foreach,
            fused=fused,
            state_dtype=state_dtype,
            capturable=capturable,
            skip_nonfinite=skip_nonfinite,
        )
        self._hold_x()


class SGDScheduleFreeClosure(_ClosureStep, SGDScheduleFree):
    """Schedule-Free SGD with a closure: the params hold ``x`` between steps (module
    docstring). Arguments as ``schedulefree.SGDScheduleFreeClosure`` (1.4.1; note its order:
    ``lr, weight_decay, momentum``, unlike ``SGDScheduleFree``'s ``lr, momentum,
    weight_decay``), plus :class:`sf_torch.SGDScheduleFree`'s keywords. ``momentum`` may be 1
    here (1.4.1 refuses it: (0, 1) there)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1.0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            fused=fused,
            state_dtype=state_dtype,
            capturable=capturable,
            skip_nonfinite=skip_nonfinite,
        )
        self._hold_x()


class RAdamScheduleFreeClosure(_ClosureStep, RAdamScheduleFree):
    """Schedule-Free RAdam with a closure: the params hold ``x`` between steps (module
    docstring). Arguments as ``schedulefree.RAdamScheduleFreeClosure`` (1.4.1), plus
    :class:`sf_torch.RAdamScheduleFree`'s keywords."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        silent_sgd_phase: bool = True,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            silent_sgd_phase=silent_sgd_phase,
            fused=fused,
            state_dtype=state_dtype,
            capturable=capturable,
            skip_nonfinite=skip_nonfinite,
        )
        self._hold_x()
