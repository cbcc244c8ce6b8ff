"""Learning-rate schedules and the convex bounds that predict their loss curves.

Framework-neutral (Python and numpy only): the same :class:`Schedule` evaluates Python ints,
numpy arrays, and traced jax values (``schedule(step, xp=jax.numpy)``). Adapters:
``sf_optax.schedules.to_optax`` and ``sf_torch.schedules.scheduler``.

    import sf_schedules
    sched = sf_schedules.wsd(1e-3, total_steps=10_000, warmup_steps=500, cooldown="1-sqrt")
    lrs = sched.values(10_000)
    bound = sf_schedules.last_iterate_bound(lrs, D=1.0, G=1.0)
"""

from sf_schedules.bounds import (
    last_iterate_bound,
    optimal_base_lr,
    schedule_free_bound,
    schedule_free_optimizer_bound,
)
from sf_schedules.schedules import Schedule, constant, cosine, sqrt, wsd

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "last_iterate_bound",
    "optimal_base_lr",
    "schedule_free_bound",
    "schedule_free_optimizer_bound",
    "sqrt",
    "wsd",
]
