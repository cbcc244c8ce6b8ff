"""``sf_schedules`` schedules as torch learning-rate schedulers.

    import sf_schedules, sf_torch, torch
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = sf_torch.schedules.to_torch(opt, sf_schedules.wsd(0.1, total_steps=1000))
    for batch in data:
        loss(batch).backward(); opt.step(); opt.zero_grad()
        sched.step()                      # after opt.step(): sets the lr of the next one

``to_torch`` mirrors ``sf_optax.schedules.to_optax``; ``scheduler`` is its older name, kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from sf_schedules import Schedule


class ScheduleLR(LRScheduler):
    """Sets every param group's ``lr`` to ``schedule(step)`` before optimizer step ``step``.

    Construction sets ``schedule(0)`` (the first ``optimizer.step()`` uses it); the ``n``-th
    call of :meth:`step` sets ``schedule(n)``. ``state_dict()`` holds the step count (not the
    schedule: build the scheduler with the same schedule, then ``load_state_dict``), and
    ``load_state_dict`` also writes the lr of the next step into the param groups, so a resumed
    run continues the schedule even when the optimizer state was not restored.

    Works with any ``torch.optim.Optimizer``, including the ``sf_torch`` Schedule-Free ones.
    Those normally run with a constant lr and their own ``warmup_steps``: a schedule here
    multiplies their z step and, through ``lr_max``, their averaging weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1):
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be an sf_schedules.Schedule (e.g. sf_schedules.cosine(...)), "
                f"got {type(schedule).__name__}"
            )
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = self.schedule(int(self.last_epoch))
        return [lr for _ in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k not in ("optimizer", "schedule")}
        self.__dict__.update(state)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)


def to_torch(optimizer: torch.optim.Optimizer, schedule: Schedule) -> ScheduleLR:
    """A :class:`ScheduleLR` driving ``optimizer`` with ``schedule``; call ``.step()`` after
    each ``optimizer.step()``.

    Args:
        optimizer: any torch optimizer (``torch.optim.SGD``, ``sf_torch.SGDScheduleFree``, ...).
            For Schedule-Free optimizers a constant lr with their own ``warmup_steps`` is the
            usual choice; a decaying schedule is allowed and scales the z steps.
        schedule: a :class:`sf_schedules.Schedule`.

    Returns:
        the scheduler, which has already set ``schedule(0)`` as the lr of the first step.
    """
    return ScheduleLR(optimizer, schedule)


scheduler = to_torch  # the name before to_torch mirrored sf_optax.schedules.to_optax
