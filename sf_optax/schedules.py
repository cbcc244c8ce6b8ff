"""``sf_schedules`` schedules as optax schedules.

    import optax, sf_optax, sf_schedules
    lr = sf_optax.schedules.to_optax(sf_schedules.cosine(1e-3, total_steps=10_000))
    opt = optax.adamw(learning_rate=lr)

Schedule-Free optimizers normally run with a constant lr and their own ``warmup_steps``; a
schedule passed to them scales the z step (and, through ``lr_max``, the averaging weights).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from sf_schedules import Schedule


def to_optax(schedule: Schedule) -> optax.Schedule:
    """The optax schedule ``count -> schedule(count)``, traceable under ``jax.jit``.

    optax calls a schedule with the number of updates done so far (0 for the first update),
    which is the step index of :class:`sf_schedules.Schedule`. The result has jax's default
    float dtype (float32 unless ``jax_enable_x64`` is set).

    Args:
        schedule: a :class:`sf_schedules.Schedule`.

    Returns:
        a function of the int ``count`` usable as ``learning_rate=`` of any optax optimizer.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule must be an sf_schedules.Schedule (e.g. sf_schedules.cosine(...)), "
            f"got {type(schedule).__name__}"
        )

    def learning_rate(count):
        return schedule(count, xp=jnp)

    return learning_rate
