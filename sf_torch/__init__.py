"""Schedule-Free optimizers for PyTorch.

``AdamWScheduleFree``, ``SGDScheduleFree`` and ``RAdamScheduleFree`` are drop-in replacements
for the ``schedulefree`` classes of the same names (plus ``fused``, ``state_dtype`` and
``eval_params()``; AdamW's ``inner_momentum`` of upstream's main branch); ``ScheduleFreeWrapper``
makes any momentum-free torch optimizer Schedule-Free. The rest of schedulefree 1.4.1's surface
has the same names: the closure classes (``*Closure``, params at x between steps,
``sf_torch.closure``) and the ``*Reference`` / ``*Paper`` classes (``sf_torch.reference``).
``AdamCScheduleFreePlus`` is upstream main's ``AdamCScheduleFreePlusPaper`` (AdamC decay,
annealed Schedule-Free momentum, a Polyak step size from the loss: ``sf_torch.plus``). The
update rule is stated and implemented in ``sf_torch.rule``; ``recompute_batchnorm_stats`` gives
BatchNorm statistics at x.

``sf_torch.schedules`` (the adapter of ``sf_schedules`` schedules), ``sf_torch.deepspeed``
(DeepSpeed ZeRO), ``sf_torch.local`` (local steps: ``LocalSteps``) and ``sf_torch.integrations``
(transformers' Trainer, Lightning) are imported on first attribute access, so that
``import sf_torch`` does not import DeepSpeed or a trainer library.
"""

import importlib

from .batchnorm import batchnorm_stats_at_current_weights, recompute_batchnorm_stats
from .closure import AdamWScheduleFreeClosure, RAdamScheduleFreeClosure, SGDScheduleFreeClosure
from .optimizers import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    ScheduleFreeOptimizer,
    SGDScheduleFree,
)
from .plus import AdamCScheduleFreePlus
from .reference import (
    AdamWScheduleFreePaper,
    AdamWScheduleFreeReference,
    ScheduleFreeWrapperReference,
    SGDScheduleFreeReference,
)
from .wrapper import ScheduleFreeWrapper

# Submodules imported on first attribute access (sf_optax does the same for its own).
_LAZY_SUBMODULES = ("deepspeed", "integrations", "local", "schedules")

__all__ = [
    "AdamCScheduleFreePlus",
    "AdamWScheduleFree",
    "AdamWScheduleFreeClosure",
    "AdamWScheduleFreePaper",
    "AdamWScheduleFreeReference",
    "RAdamScheduleFree",
    "RAdamScheduleFreeClosure",
    "SGDScheduleFree",
    "SGDScheduleFreeClosure",
    "SGDScheduleFreeReference",
    "ScheduleFreeOptimizer",
    "ScheduleFreeWrapper",
    "ScheduleFreeWrapperReference",
    "batchnorm_stats_at_current_weights",
    "recompute_batchnorm_stats",
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
