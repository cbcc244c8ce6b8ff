"""Schedule-Free optimization as optax transformations.

    import sf_optax
    opt = sf_optax.adamw(learning_rate=1e-3, warmup_steps=100)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params are y
    params = optax.apply_updates(params, updates)
    x = sf_optax.eval_params(state, params)             # evaluate here

The update rule is in :mod:`sf_optax.transform`; the aliases in :mod:`sf_optax.alias`; the Flax
helpers (``at_x``, ``eval_model``, ``recompute_batchnorm_stats``, ``ScheduleFreeTrainState``,
``save_checkpoint``/``restore_checkpoint``) in :mod:`sf_optax.flax`.
"""

from sf_optax.alias import (
    ScaleBySecondMomentState,
    adamw,
    radam,
    radam_rectification,
    scale_by_second_moment,
    sgd,
)
from sf_optax.packing import PackedState, unpacked_state
from sf_optax.sharding import state_shardings
from sf_optax.transform import ScheduleFreeState, schedule_free
from sf_optax.views import eval_params, find_state, train_params

__all__ = [
    "PackedState",
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
    "unpacked_state",
]

# The Flax helpers (sf_optax/flax.py) import flax, and their checkpoints orbax, when first used,
# so that ``import sf_optax`` needs neither.
_FLAX_EXPORTS = (
    "ScheduleFreeTrainState",
    "at_x",
    "eval_model",
    "recompute_batchnorm_stats",
    "restore_checkpoint",
    "save_checkpoint",
    "train_state_shardings",
)
__all__ += list(_FLAX_EXPORTS)


def __getattr__(name: str):
    if name in _FLAX_EXPORTS:
        from sf_optax import flax as flax_helpers

        return getattr(flax_helpers, name)
    raise AttributeError(f"module 'sf_optax' has no attribute {name!r}")
