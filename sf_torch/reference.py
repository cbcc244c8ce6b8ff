"""schedulefree's ``*Reference`` and ``*Paper`` classes, under the same names, on sf_torch's rule.

schedulefree 1.4.1 exports, besides its main classes, ``AdamWScheduleFreeReference``,
``SGDScheduleFreeReference`` and ``ScheduleFreeWrapperReference`` (the same rules written with
``x``, ``y`` and ``z`` all stored: readable, and three buffers per param) and
``AdamWScheduleFreePaper`` (the rule as first published: the bias correction of ``v`` moved
from the denominator into the learning rate). Here each takes the same constructor arguments
(same order and defaults) and computes the same numbers, measured in float64 against 1.4.1 in
tests/test_torch_surface.py, through sf_torch's rule (``rule.py``): ``x`` is not stored (the
params hold ``y`` while training, ``x = (y - (1 - b1) z) / b1``), so a step reads and writes
fewer buffers and every implementation of that rule (loop, foreach, fused) runs it.

What differs from 1.4.1's classes, for all of them: they start in train mode (at step 0
``x = y = z``, so no number changes; ``train()`` before the first step is still right); the
per-param state is ``z`` and ``exp_avg_sq`` (a 1.4.1 Reference checkpoint loads: its stored
``x`` and ``y`` are dropped, as the params hold the view of the mode it was saved in); and the
keyword-only options of the sf_torch class they build on (``fused``, ``state_dtype``,
``skip_nonfinite``) are there too.
"""

from __future__ import annotations

from typing import Any

import torch

from sf_schedules.validation import check_choice

from . import rule
from .optimizers import AdamWScheduleFree, ParamsT, ScheduleFreeOptimizer, SGDScheduleFree
from .wrapper import ScheduleFreeWrapper


class AdamWScheduleFreeReference(AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFreeReference``: Schedule-Free AdamW, as
    :class:`sf_torch.AdamWScheduleFree`, plus ``decay_at_z``.

    Args as :class:`sf_torch.AdamWScheduleFree`, in upstream main's order (``decay_at_z`` and
    ``inner_momentum`` before ``foreach``; 1.4.1 has no ``inner_momentum``), and:
        decay_at_z: True evaluates the weight decay at ``z`` (``z -= lr * weight_decay * z``)
            instead of at ``y``. The loop and foreach step it; ``fused=True`` is refused with
            it (``fused=None`` takes foreach or the loop).

    ``foreach`` is honoured (1.4.1's Reference ignores it); ``capturable`` is not offered.
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
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
    ):
        check_choice("decay_at_z", decay_at_z, (True, False))
        if decay_at_z and fused:
            raise ValueError(
                "fused=True does not step decay_at_z=True: pass fused=None or False (foreach or "
                "the loop step it)"
            )
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
            self, params, hyperparameters, foreach, fused, state_dtype, False, skip_nonfinite
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["capturable"]:
            raise ValueError(f"{type(self).__name__} does not offer capturable=True")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :class:`sf_torch.AdamWScheduleFree`'s; the ``x`` and ``y`` that schedulefree's
        Reference class stores per param are dropped (the params hold the view)."""
        super().load_state_dict(state_dict)
        _drop_views(self)


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


class SGDScheduleFreeReference(SGDScheduleFree):
    """``schedulefree.SGDScheduleFreeReference``: Schedule-Free SGD, as
    :class:`sf_torch.SGDScheduleFree` (same arguments in the same order). 1.4.1's class adds
    the weight decay into ``p.grad`` in place; here gradients are never written. ``momentum``
    may be 1 (1.4.1's Reference refuses it: (0, 1) there)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :class:`sf_torch.SGDScheduleFree`'s; a Reference checkpoint's stored ``x`` and
        ``y`` are dropped (the params hold the view)."""
        super().load_state_dict(state_dict)
        _drop_views(self)


def _drop_views(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        state.pop("x", None)
        state.pop("y", None)


class ScheduleFreeWrapperReference(ScheduleFreeWrapper):
    """``schedulefree.ScheduleFreeWrapperReference``: :class:`sf_torch.ScheduleFreeWrapper`
    under 1.4.1's argument names (``base``, ``momentum``, ``weight_decay_at_y``, ``r``,
    ``weight_lr_power``) and, as 1.4.1's, with no check on the base optimizer's own momentum
    (:class:`sf_torch.ScheduleFreeWrapper` refuses a base with momentum: with both, the result
    is no Schedule-Free method). The state dict is :class:`sf_torch.ScheduleFreeWrapper`'s
    (``z`` under ``schedule_free``), not 1.4.1's (``x``, ``y``, ``z`` in the base's state)."""

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
