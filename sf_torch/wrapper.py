"""Schedule-Free around any torch optimizer: the base optimizer moves ``z``, the wrapper averages.

With the base optimizer's own momentum off (SGD ``momentum=0``, AdamW ``betas=(0, b2)``,
RMSprop ``momentum=0``), one step of the wrapper, gradient ``g`` taken at ``y``, is (notation
of ``rule.py``; ``lr`` is the group's current lr, times ``d`` where the base keeps one)::

    z  = z - lr * weight_decay_at_y * y             (x kept: y moves by (1-b1) of that)
    z  = base_step(z, g)                            (the base optimizer, on the z buffer)
    lr_max = max(lr_max, lr); weight = (k+1)**r * lr_max**weight_lr_power
    weight_sum += weight;  c = weight / weight_sum  (0 if weight_sum == 0)
    x  = (1-c) x + c z
    y  = b1 x + (1-b1) z
    k += 1

``b1`` is the wrapper's ``momentum``. The wrapper keeps ``z`` in a state of its own
(``sf_state[p]['z']``), apart from the base optimizer's state, which it never touches: that is
what lets bases that create their state lazily (AdamW, RMSprop, ...) work. The counters ``k``,
``weight_sum`` and ``lr_max`` live in the base's param groups and advance once per step in every
group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sf_schedules.validation import check_b1, check_nonnegative

from . import dispatch, rule

_COUNTERS = {"k": 0, "weight_sum": 0.0, "lr_max": 0.0}


def _nonzero(value) -> bool:
    try:
        return float(value) != 0.0
    except (TypeError, ValueError, RuntimeError):
        return True  # not a number: not "off" either


def _momentum_problem(name: str, group: dict[str, Any]) -> str | None:
    """What is wrong with a base optimizer's param group (``name``: its class) that has a
    momentum of its own, with what to pass instead; None when it has none."""
    if group.get("nesterov"):
        return f"nesterov={group['nesterov']!r}: pass {name}(momentum=0, nesterov=False)"
    if "momentum" in group and _nonzero(group["momentum"]):
        return f"momentum={group['momentum']!r}: pass {name}(momentum=0)"
    betas = group.get("betas")
    if isinstance(betas, list | tuple) and len(betas) == 2 and _nonzero(betas[0]):
        b2 = betas[1]
        try:
            b2 = float(b2)
        except (TypeError, ValueError, RuntimeError):
            pass
        return f"betas={tuple(betas)!r}: pass {name}(betas=(0.0, {b2!r}))"
    return None


def _check_momentum_free(base: torch.optim.Optimizer, group: dict[str, Any], index: int) -> None:
    problem = _momentum_problem(type(base).__name__, group)
    if problem is not None:
        raise ValueError(
            "base_optimizer must have its own momentum off (the wrapper's momentum takes its "
            f"place; with both, the result is not Schedule-Free): param group {index} has "
            f"{problem}"
        )


class ScheduleFreeWrapper:
    """Make ``base_optimizer`` Schedule-Free. Call ``train()`` before training and ``eval()``
    before evaluating or saving a checkpoint.

    Args:
        base_optimizer: a torch optimizer over the params, with its own momentum off (SGD or
            RMSprop ``momentum=0``, no ``nesterov``; Adam, AdamW, NAdam, RAdam, Adamax
            ``betas=(0.0, b2)``); one with momentum is refused (ValueError), at construction
            and in ``add_param_group``.
        weight_decay_at_y: weight decay evaluated at y and applied to z, >= 0 (weight decay set
            on the base optimizer is evaluated at z instead).
        momentum: the wrapper's b1, in (0, 1].
        weight_lr_power: the average weighs step k by ``lr_max**weight_lr_power``, >= 0 ...
        r: ... and by ``(k+1)**r``, >= 0.

    The positional order is ``schedulefree.ScheduleFreeWrapper``'s (1.4.1).
    """

    # Refuse a base optimizer with a momentum of its own (ScheduleFreeWrapperReference: no).
    _momentum_free_base = True

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        weight_decay_at_y: float = 0.0,
        momentum: float = 0.9,
        weight_lr_power: float = 2.0,
        r: float = 0.0,
    ):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}"
            )
        # required=True: the wrapper needs every number now (None, a callable: no).
        self.momentum = check_b1("momentum", momentum, required=True)
        self.weight_decay_at_y = check_nonnegative(
            "weight_decay_at_y", weight_decay_at_y, required=True
        )
        self.r = check_nonnegative("r", r, required=True)
        self.weight_lr_power = check_nonnegative("weight_lr_power", weight_lr_power, required=True)
        if self._momentum_free_base:
            for index, group in enumerate(base_optimizer.param_groups):
                _check_momentum_free(base_optimizer, group, index)
        self.base = base_optimizer
        self.train_mode = True
        self.sf_state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for group in self.base.param_groups:
            for key, value in _COUNTERS.items():
                group.setdefault(key, value)

    # -- what a torch optimizer exposes --------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @property
    def state(self):
        """The base optimizer's state (z is in ``sf_state``)."""
        return self.base.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # The group as the base will complete it (its defaults), checked before it is added.
        completed = {**self.base.defaults, **param_group}
        if self._momentum_free_base:
            _check_momentum_free(self.base, completed, len(self.base.param_groups))
        self.base.add_param_group(param_group)
        for key, value in _COUNTERS.items():
            self.base.param_groups[-1].setdefault(key, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict, plus z (by param index) and the mode."""
        index = {p: i for i, p in enumerate(self._params())}
        return {
            "base": self.base.state_dict(),
            "schedule_free": {
                "train_mode": self.train_mode,
                "z": {index[p]: st["z"] for p, st in self.sf_state.items() if p in index},
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        params = self._params()
        saved = state_dict["schedule_free"]
        self.sf_state = {
            params[i]: {"z": z.to(device=params[i].device, dtype=params[i].dtype, copy=True)}
            for i, z in saved["z"].items()
        }
        self.train_mode = bool(saved["train_mode"])

    # -- views ---------------------------------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` into the params. Idempotent."""
        if self.train_mode:
            self._switch("x")
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` back into the params. Idempotent."""
        if not self.train_mode:
            self._switch("y")
        self.train_mode = True

    def _switch(self, view: str) -> None:
        # The optimizers' switch: one Triton launch on CUDA, the per-tensor lerp elsewhere.
        params = list(self.sf_state)
        zs = [st["z"] for st in self.sf_state.values()]
        weight = rule.view_weight(view, self.momentum)
        dispatch.switch_(dispatch.switch_impl(params, zs, None), params, zs, weight)

    @torch.no_grad()
    def eval_params(self) -> list[torch.Tensor]:
        """``x`` of every param as new tensors (order of ``param_groups``); changes nothing."""
        out = []
        for p in self._params():
            st = self.sf_state.get(p)
            if self.train_mode and st is not None:
                out.append(rule.x_of(p, st["z"], self.momentum))
            else:
                out.append(p.detach().clone())
        return out

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
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
                    f"ScheduleFreeWrapper does not support sparse gradients (got a "
                    f"{p.grad.layout} gradient for a param of shape {tuple(p.shape)})"
                )
        m = self.momentum

        # The base steps the params buffer, so put z there; the z buffer keeps x meanwhile.
        for group in self.param_groups:
            decay = float(group["lr"]) * self.weight_decay_at_y
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.sf_state.setdefault(p, {})
                if "z" not in st:
                    st["z"] = p.detach().clone(memory_format=torch.preserve_format)
                z = st["z"]
                if decay != 0:
                    z.sub_(p, alpha=decay)
                    p.mul_(1.0 - decay * (1.0 - m))
                x = rule.x_of(p, z, m)
                p.copy_(z)
                st["z"] = x

        self.base.step()

        for group in self.param_groups:
            k = int(group["k"])
            lr = float(group["lr"]) * float(group.get("d", 1.0))
            lr_max = max(float(group["lr_max"]), lr)
            weight = rule.averaging_weight(k, lr_max, self.r, self.weight_lr_power)
            weight_sum = float(group["weight_sum"]) + weight
            c = weight / weight_sum if weight_sum != 0 else 0.0
            group.update(k=k + 1, lr_max=lr_max, weight_sum=weight_sum)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.sf_state[p]
                x = st["z"]  # holds x since the first loop; p holds the new z
                x.lerp_(p, c)
                y = torch.lerp(x, p, 1.0 - m)
                x.copy_(p)
                p.copy_(y)
        return loss
