"""schedulefree's ``*Reference`` and ``*Paper`` classes, under the same names, on sf_torch's rule.

schedulefree 1.4.1 exports, besides its main classes, ``AdamWScheduleFreeReference``,
``SGDScheduleFreeReference`` and ``ScheduleFreeWrapperReference`` (the same rules written with
``x``, ``y`` and ``z`` all stored) and ``AdamWScheduleFreePaper`` (the rule as first published:
the bias correction of ``v`` moved from the denominator into the learning rate). Here each
takes the same constructor arguments (same order and defaults) and computes the same numbers,
measured in float64 against 1.4.1 in tests/test_torch_surface.py:

- ``AdamWScheduleFreePaper`` is sf_torch's rule (``rule.py``) with the paper's learning rate
  and denominator (``rule.PAPER``), in every implementation (loop, foreach, fused): the same
  bits as 1.4.1's in float64 (the same order of operations).
- ``AdamWScheduleFreeReference`` and ``SGDScheduleFreeReference`` keep ``x`` as 1.4.1's do
  (state ``z``, ``x``, ``exp_avg_sq``; the params hold ``y`` while training) and step it in
  1.4.1's order, one tensor at a time (``foreach`` is accepted and ignored, as there; no fused
  kernel): the same bits as 1.4.1's. The scalars (lr, warmup, the averaging weight) are
  ``rule.py``'s. ``eval()`` copies ``x`` into the params and keeps ``y`` (``state['y']``, only
  while in eval mode) for ``train()``; 1.4.1 keeps ``y`` always. 1.4.1 Reference checkpoints
  load.
- ``ScheduleFreeWrapperReference`` is :class:`sf_torch.ScheduleFreeWrapper` with ``x`` stored
  beside ``z`` and stepped in 1.4.1's order: the same bits as 1.4.1's.

What differs from 1.4.1's classes, for all of them: they start in train mode (at step 0
``x = y = z``, so no number changes; ``train()`` before the first step is still right), and
the keyword-only options of the sf_torch class they build on (``state_dtype``,
``skip_nonfinite``, and ``fused`` for the Paper class) are there too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sf_schedules.validation import check_choice

from . import dispatch, dtensor, rule
from .optimizers import AdamWScheduleFree, ParamsT, ScheduleFreeOptimizer, SGDScheduleFree
from .wrapper import ScheduleFreeWrapper

# -- views of an optimizer that stores x (these classes, sf_torch.plus) -------------------------


def eval_stored_x(optimizer: Any) -> None:
    """Put each state's ``x`` into its param, keeping a copy of ``y`` in ``state['y']`` for
    :func:`train_stored_x`; groups already in eval mode are left alone."""
    for group in optimizer.param_groups:
        if not group["train_mode"]:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "x" in state:
                state["y"] = p.detach().clone(memory_format=torch.preserve_format)
                p.copy_(state["x"])
        group["train_mode"] = False


def train_stored_x(optimizer: Any, b_of: Callable[[dict[str, Any]], float]) -> None:
    """Put ``y`` back into the params: the kept copy, bit for bit, or, for a state without
    one (a train-mode checkpoint of another library, say), ``lerp(x, z, 1 - b)`` with the
    group's ``b_of(group)``; groups already in train mode are left alone."""
    for group in optimizer.param_groups:
        if group["train_mode"]:
            continue
        b = None
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "y" in state:
                p.copy_(state.pop("y"))
            elif state and "x" in state:
                b = b_of(group) if b is None else b
                p.copy_(torch.lerp(state["x"], state["z"], 1 - b))
        group["train_mode"] = True


def stored_x_params(optimizer: Any) -> list[torch.Tensor]:
    """``x`` of every param as new tensors in the params' dtype (order of the param groups),
    without changing anything; a param without state gives a copy of itself."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "x" in state:
                out.append(state["x"].to(p.dtype, copy=True))
            else:
                out.append(p.detach().clone())
    return out


class _StoredX:
    """The Reference classes' step and views: ``x`` stored, 1.4.1's order of operations."""

    def init_state(self: Any, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = ScheduleFreeOptimizer.init_state(self, p, group)
        if "x" not in state:
            state["x"] = state["z"].clone(memory_format=torch.preserve_format)
        return state

    def _general_step(self: Any, index: int, step: dispatch.GroupStep) -> None:
        group, params = step.group, step.params
        s = rule.scalars(group, self._rule_kind)
        b1 = rule.b1_of(group, self.kind)
        dicts, zs, vs, ms = self._buffers(group, params, step.states, s.has_v, s.has_m)
        xs = [st["x"] for st in dicts]
        if ms is None:
            ms = [None] * len(params)
        lists = [params, step.grads, zs, xs, vs, ms]
        if dtensor.any_dtensor(params):
            lists = [dtensor.local(lst) for lst in lists]
        for y, g, z, x, v, m in zip(*lists):
            yw = y if y.dtype == z.dtype else y.to(z.dtype)
            gw = g if g.dtype == z.dtype else g.to(z.dtype)
            if s.has_v:  # AdamW: decay, then the Adam step on z
                if s.weight_decay != 0:
                    z.sub_(z if s.decay_at_z else yw, alpha=s.lr * s.weight_decay)
                v.mul_(s.b2).addcmul_(gw, gw, value=1 - s.b2)
                denom = v.div(s.bias_correction2).sqrt_().add_(s.eps)
                if s.has_m:
                    m.mul_(s.inner_momentum).add_(gw, alpha=1 - s.inner_momentum)
                    num = m.div(s.bias_correction1)
                else:
                    num = gw
                z.addcdiv_(num, denom, value=-s.lr)
            else:  # SGD: the decay joins the gradient
                gn = gw.add(yw, alpha=s.weight_decay) if s.weight_decay != 0 else gw
                z.sub_(gn, alpha=s.lr)
            x.mul_(1 - s.c).add_(z, alpha=s.c)
            y.copy_(x.mul(b1).add_(z, alpha=1 - b1))

    @torch.no_grad()
    def eval(self: Any) -> None:
        """Put ``x`` into the params (``y`` kept for ``train()``). Idempotent."""
        eval_stored_x(self)

    @torch.no_grad()
    def train(self: Any) -> None:
        """Put ``y`` back into the params, bit for bit. Idempotent."""
        train_stored_x(self, lambda group: rule.b1_of(group, self.kind))

    @torch.no_grad()
    def eval_params(self: Any) -> list[torch.Tensor]:
        """``x`` of every param as new tensors (order of the param groups); a param without
        state gives a copy of itself."""
        return stored_x_params(self)

    def _check_group(self: Any, group: dict[str, Any]) -> None:
        ScheduleFreeOptimizer._check_group(self, group)
        if group["capturable"] or group["fused"]:
            raise ValueError(
                f"{type(self).__name__} steps one tensor at a time, as schedulefree's "
                "Reference classes: fused and capturable must be off"
            )

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        """As the sf_torch class's (this class's or 1.4.1's Reference state dicts); ``x``
        (a copy of ``z`` where missing) in ``state_dtype``, and ``y`` only in eval mode."""
        ScheduleFreeOptimizer.load_state_dict(self, state_dict)
        for group in self.param_groups:
            dtype = group["state_dtype"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "z" not in state:
                    continue
                x = state.get("x", state["z"])
                state["x"] = x.to(device=p.device, dtype=dtype or p.dtype, copy=True)
                if group["train_mode"]:
                    state.pop("y", None)
                elif "y" in state:
                    state["y"] = state["y"].to(device=p.device, dtype=p.dtype, copy=True)


class AdamWScheduleFreeReference(_StoredX, AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFreeReference``: Schedule-Free AdamW, as
    :class:`sf_torch.AdamWScheduleFree`, plus ``decay_at_z``.

    Args as :class:`sf_torch.AdamWScheduleFree`, in upstream main's order (``decay_at_z`` and
    ``inner_momentum`` before ``foreach``; 1.4.1 has no ``inner_momentum``), and:
        decay_at_z: True evaluates the weight decay at ``z`` (``z -= lr * weight_decay * z``)
            instead of at ``y``.

    ``x`` is stored and stepped in 1.4.1's order, one tensor at a time (module docstring);
    ``foreach`` is accepted and ignored, as in 1.4.1; no ``fused``, no ``capturable``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0,
        weight_lr_power: float = 2,
        decay_at_z: bool = False,
        inner_momentum: float = 0.0,
        foreach: bool | None = False,
        *,
        state_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
    ):
        check_choice("decay_at_z", decay_at_z, (True, False))
        hyperparameters = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            inner_momentum=inner_momentum,
            decay_at_z=decay_at_z,
        )
        ScheduleFreeOptimizer.__init__(
            self, params, hyperparameters, foreach, False, state_dtype, False, skip_nonfinite
        )


class AdamWScheduleFreePaper(AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFreePaper``: Schedule-Free AdamW as first published.

    Two changes to :class:`sf_torch.AdamWScheduleFree`'s rule, step ``k`` (0-based): the
    learning rate is ``lr * sched * sqrt(1 - b2**(k+1))`` (so ``lr_max`` and the averaging
    weights see that value too), and the denominator is ``sqrt(v) + eps``, without the bias
    correction inside; the weight decay is scaled by that learning rate. Args as
    :class:`sf_torch.AdamWScheduleFree` without ``inner_momentum`` and ``capturable`` (the
    capturable kernel computes the other rule's learning rate).
    """

    rule_kind = rule.PAPER

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
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
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
        )
        ScheduleFreeOptimizer.__init__(
            self, params, hyperparameters, foreach, fused, state_dtype, False, skip_nonfinite
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["capturable"]:
            raise ValueError("AdamWScheduleFreePaper does not offer capturable=True")
        if float(group.get("inner_momentum", 0.0)) != 0.0:
            raise ValueError(
                "AdamWScheduleFreePaper has no inner_momentum (upstream's Paper class has "
                f"none): got {group['inner_momentum']!r}; use AdamWScheduleFree"
            )


class SGDScheduleFreeReference(_StoredX, SGDScheduleFree):
    """``schedulefree.SGDScheduleFreeReference``: Schedule-Free SGD with ``x`` stored, stepped
    in 1.4.1's order (module docstring); same arguments in the same order. 1.4.1's class adds
    the weight decay into ``p.grad`` in place; here gradients are never written. ``momentum``
    may be 1 (1.4.1's Reference refuses it: (0, 1) there). No ``fused``, no ``capturable``."""

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
        state_dtype: torch.dtype | None = None,
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
            fused=False,
            state_dtype=state_dtype,
            skip_nonfinite=skip_nonfinite,
        )


class ScheduleFreeWrapperReference(ScheduleFreeWrapper):
    """``schedulefree.ScheduleFreeWrapperReference``: :class:`sf_torch.ScheduleFreeWrapper`
    under 1.4.1's argument names (``base``, ``momentum``, ``weight_decay_at_y``, ``r``,
    ``weight_lr_power``), with ``x`` stored beside ``z`` and stepped in 1.4.1's order (the same
    bits), and, as 1.4.1's, with no check on the base optimizer's own momentum
    (:class:`sf_torch.ScheduleFreeWrapper` refuses a base with momentum: with both, the result
    is no Schedule-Free method).

    What differs from 1.4.1's: ``x`` and ``z`` live in ``sf_state`` (1.4.1 puts ``x``, ``y``,
    ``z`` into the base optimizer's state, which breaks bases that create their state when it
    is empty, e.g. Adam, RMSprop), so the state dict is :class:`sf_torch.ScheduleFreeWrapper`'s
    layout with ``x`` (and ``y`` in eval mode) added; only params with a gradient are stepped
    (1.4.1 also decays and re-averages the others); it starts in train mode."""

    _momentum_free_base = False

    def __init__(
        self,
        base: torch.optim.Optimizer,
        momentum: float = 0.9,
        weight_decay_at_y: float = 0.0,
        r: float = 0,
        weight_lr_power: float = 2,
    ):
        super().__init__(
            base,
            momentum=momentum,
            weight_decay_at_y=weight_decay_at_y,
            r=r,
            weight_lr_power=weight_lr_power,
        )

    # -- 1.4.1's order: x stored -------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self.train_mode:
            raise RuntimeError(
                "step() was called in eval mode: call optimizer.train() before training steps "
                "(and optimizer.eval() before evaluating or saving a checkpoint)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [p for p in self._params() if p.grad is not None]
        for p in active:
            if p.grad.layout != torch.strided:
                raise RuntimeError(
                    "ScheduleFreeWrapperReference does not support sparse gradients (got a "
                    f"{p.grad.layout} gradient for a param of shape {tuple(p.shape)})"
                )
        stepped = []
        for group in self.param_groups:
            alpha = float(group["lr"]) * self.weight_decay_at_y
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.sf_state.setdefault(p, {})
                if "z" not in st:
                    st["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    st["x"] = p.detach().clone(memory_format=torch.preserve_format)
                if alpha != 0:
                    st["z"].sub_(p, alpha=alpha)  # at y, which the params hold
                p.copy_(st["z"])
                stepped.append(p)
        self.base.step()
        stepped_ids = set(map(id, stepped))
        for group in self.param_groups:
            k = int(group["k"])
            lr = float(group["lr"]) * float(group.get("d", 1.0))
            lr_max = max(float(group["lr_max"]), lr)
            weight = rule.averaging_weight(k, lr_max, self.r, self.weight_lr_power)
            weight_sum = float(group["weight_sum"]) + weight
            c = weight / weight_sum if weight_sum != 0 else 0.0
            group.update(k=k + 1, lr_max=lr_max, weight_sum=weight_sum)
            for p in group["params"]:
                if id(p) not in stepped_ids:
                    continue
                st = self.sf_state[p]
                z, x = st["z"], st["x"]
                z.copy_(p)
                x.lerp_(z, c)
                p.copy_(x.clone().lerp_(z, 1 - self.momentum))
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` into the params (``y`` kept for ``train()``). Idempotent."""
        if self.train_mode:
            for p, st in self.sf_state.items():
                st["y"] = p.detach().clone(memory_format=torch.preserve_format)
                p.copy_(st["x"])
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` back into the params, bit for bit. Idempotent."""
        if not self.train_mode:
            for p, st in self.sf_state.items():
                if "y" in st:
                    p.copy_(st.pop("y"))
                else:
                    p.copy_(torch.lerp(st["x"], st["z"], 1 - self.momentum))
        self.train_mode = True

    @torch.no_grad()
    def eval_params(self) -> list[torch.Tensor]:
        out = []
        for p in self._params():
            st = self.sf_state.get(p)
            out.append(st["x"].clone() if st is not None else p.detach().clone())
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict, plus ``z``, ``x`` (and ``y`` in eval mode) by param index,
        and the mode."""
        out = super().state_dict()
        index = {p: i for i, p in enumerate(self._params())}
        for key in ("x", "y"):
            out["schedule_free"][key] = {
                index[p]: st[key] for p, st in self.sf_state.items() if p in index and key in st
            }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        params = self._params()
        saved = state_dict["schedule_free"]
        for key in ("x", "y"):
            for i, t in saved.get(key, {}).items():
                p = params[i]
                self.sf_state[p][key] = t.to(device=p.device, dtype=p.dtype, copy=True)
        for p, st in self.sf_state.items():
            if "x" not in st:  # a ScheduleFreeWrapper's state dict: x from the params' view
                held = p.detach()
                st["x"] = (
                    rule.x_of(held, st["z"], self.momentum) if self.train_mode else held.clone()
                )
            if self.train_mode:
                st.pop("y", None)
