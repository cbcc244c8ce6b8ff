"""Schedule-Free optimization as optax transformations.

    import sf_optax
    opt = sf_optax.adamw(learning_rate=1e-3, warmup_steps=100)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params are y
    params = optax.apply_updates(params, updates)
    x = sf_optax.eval_params(state, params)             # evaluate here

The update rule is in :mod:`sf_optax.transform`; the aliases in :mod:`sf_optax.alias`.
"""

from sf_optax.alias import (
    ScaleBySecondMomentState,
    adamw,
    radam,
    radam_rectification,
    scale_by_second_moment,
    sgd,
)
from sf_optax.sharding import state_shardings
from sf_optax.transform import ScheduleFreeState, schedule_free
from sf_optax.views import eval_params, find_state, train_params

__all__ = [
    "ScaleBySecondMomentState",
    "ScheduleFreeState",
    "adamw",
    "eval_params",
    "find_state",
    "radam",
    "radam_rectification",
    "scale_by_second_moment",
    "schedule_free",
    "sgd",
    "state_shardings",
    "train_params",
]
