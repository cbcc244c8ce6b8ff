"""Schedule-Free optimization as optax transformations.

    import sf_optax
    opt = sf_optax.adamw(learning_rate=1e-3, warmup_steps=100)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params are y
    params = optax.apply_updates(params, updates)
    x = sf_optax.eval_params(state, params)             # evaluate here

The update rule is in :mod:`sf_optax.transform`; the aliases in :mod:`sf_optax.alias`; the
AdamC/Polyak variant of upstream's ScheduleFree+ (``adamc_plus``, whose update takes the loss
as ``value=``) in :mod:`sf_optax.plus`; the Flax helpers (``at_x``, ``eval_model``,
``recompute_batchnorm_stats``, ``ScheduleFreeTrainState``, ``train_state_shardings``) in
:mod:`sf_optax.flax`; the Orbax checkpoints
(``save_checkpoint``/``restore_checkpoint``) in :mod:`sf_optax.checkpoint`; the adapter of
``sf_schedules`` schedules in :mod:`sf_optax.schedules`; local steps on a device mesh (workers
averaging every few steps) in :mod:`sf_optax.local`.

``sf_optax.flax``, ``sf_optax.checkpoint``, ``sf_optax.local`` and ``sf_optax.schedules`` (and
the names they export here) are imported on first use, so that ``import sf_optax`` needs neither
flax nor orbax.
"""

import importlib

from sf_optax.alias import (
    ScaleByInnerMomentumState,
    ScaleBySecondMomentState,
    adamw,
    radam,
    radam_rectification,
    scale_by_second_moment,
    sgd,
)
from sf_optax.packing import PackedState, unpacked_state
from sf_optax.plus import AdamCPlusState, adamc_plus
from sf_optax.sharding import state_shardings
from sf_optax.transform import ScheduleFreeState, schedule_free
from sf_optax.views import eval_params, find_state, train_params

# Submodules imported on first attribute access (sf_torch does the same for its own).
_LAZY_SUBMODULES = ("checkpoint", "flax", "local", "schedules")
# Names exported here from those submodules: name -> submodule.
_LAZY_EXPORTS = {
    "ScheduleFreeTrainState": "flax",
    "at_x": "flax",
    "eval_model": "flax",
    "recompute_batchnorm_stats": "flax",
    "train_state_shardings": "flax",
    "restore_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = [
    "AdamCPlusState",
    "PackedState",
    "ScaleByInnerMomentumState",
    "ScaleBySecondMomentState",
    "ScheduleFreeState",
    "adamc_plus",
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
    *sorted(_LAZY_EXPORTS),
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(f"{__name__}.{_LAZY_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES, *_LAZY_EXPORTS})
