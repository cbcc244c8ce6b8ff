"""BatchNorm statistics for the evaluation point x.

Running statistics collected while training were measured at y, not at x, so a model evaluated
at x needs its own: :func:`recompute_batchnorm_stats` recomputes them with the weights the model
holds now (x after ``optimizer.eval()`` or ``sf_torch.deepspeed.eval(engine)``) from batches the
user gives, and puts the training statistics back when the block ends.

The name and arguments are those of ``sf_optax.recompute_batchnorm_stats``. There the function
returns and the caller's ``sf_optax.at_x`` (or ``eval_model``'s copy) undoes it; torch has no such
snapshot of the model, so here it is a context manager that restores the statistics itself. The
statistics are each framework's own: torch tracks the unbiased batch variance, nnx the biased one.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

_NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


def _norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, _NORM_TYPES) and m.track_running_stats]


@contextlib.contextmanager
def recompute_batchnorm_stats(
    model: torch.nn.Module,
    batches: Iterable[Any],
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
) -> Iterator[int]:
    """Within the block, every BatchNorm layer's running mean and variance are the exact
    averages over ``batches`` at the model's current weights; the model is in eval mode.

    On exit the statistics, ``num_batches_tracked``, momentum and train/eval mode the model had
    before are restored, so training continues as if nothing happened. Weights are never
    written.

    Args:
      model: a torch module (or DeepSpeed engine's ``module``) holding x; changed in place
        (only BatchNorm running statistics and modes) until the block ends.
      batches: inputs, each handed to ``forward``; at least one.
      forward: ``forward(model, batch)``; default ``model(batch)``.

    Yields:
      The number of batches used.
    """
    layers = _norm_layers(model)
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
        for m in layers
    ]
    was_training = model.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # None: a cumulative (equal-weight) average over the batches
        model.train()
        count = 0
        with torch.no_grad():
            for batch in batches:
                model(batch) if forward is None else forward(model, batch)
                count += 1
        if layers and count == 0:
            raise ValueError("batches: need at least one batch to recompute BatchNorm statistics")
        model.eval()
        yield count
    finally:
        for m, (mean, var, tracked, momentum) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
            m.momentum = momentum
        model.train(was_training)


def batchnorm_stats_at_current_weights(
    model: torch.nn.Module,
    batches: Iterable[Any],
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
):
    """Deprecated name of :func:`recompute_batchnorm_stats` (the name sf_optax uses too)."""
    warnings.warn(
        "sf_torch.batchnorm_stats_at_current_weights is renamed "
        "sf_torch.recompute_batchnorm_stats (the name of sf_optax's function); the old name "
        "will be removed",
        DeprecationWarning,
        stacklevel=2,
    )
    return recompute_batchnorm_stats(model, batches, forward)
