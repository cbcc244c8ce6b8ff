"""Schedule-Free optimizers for PyTorch.

``AdamWScheduleFree``, ``SGDScheduleFree`` and ``RAdamScheduleFree`` are drop-in replacements
for the ``schedulefree`` classes of the same names (plus ``fused``, ``state_dtype`` and
``eval_params()``); ``ScheduleFreeWrapper`` makes any momentum-free torch optimizer
Schedule-Free. The update rule is stated and implemented in ``sf_torch.rule``.
"""

from .batchnorm import batchnorm_stats_at_current_weights
from .optimizers import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    ScheduleFreeOptimizer,
    SGDScheduleFree,
)
from .wrapper import ScheduleFreeWrapper

__all__ = [
    "batchnorm_stats_at_current_weights",
    "AdamWScheduleFree",
    "RAdamScheduleFree",
    "SGDScheduleFree",
    "ScheduleFreeOptimizer",
    "ScheduleFreeWrapper",
]
