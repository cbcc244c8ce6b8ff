"""What a user hands to ``parity.own``: a torch model, its Flax twin, their losses and the data.

A :class:`Pair` is the whole description of one port. ``python -m parity check SPEC`` imports
``SPEC`` (``package.module:function``) and calls the function (with ``dtype=`` when it takes
one) to get the Pair; ``parity.own.check`` takes the same fields as arguments.

Batches are dicts of numpy arrays, the same batch for both frameworks: floating arrays are
converted to the run's dtype, integer and boolean arrays are passed as they are (torch tensors
on the torch side, jax arrays on the Flax side). Training step ``t`` uses
``batches[t % len(batches)]``.

Nothing here imports torch or jax.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Batch = Mapping[str, np.ndarray]


@dataclass
class Pair:
    """A torch model and its Flax twin, with a loss for each and the data they train on.

    Attributes:
      torch_model: a ``torch.nn.Module``.
      flax_model: a ``flax.nnx.Module``, or a ``flax.linen.Module`` whose variables are
        ``variables``.
      torch_loss: ``torch_loss(torch_model, batch) -> scalar tensor``; ``batch`` holds torch
        tensors. Called in train mode for training and after ``torch_model.eval()`` for the
        eval loss.
      flax_loss: nnx: ``flax_loss(model, batch) -> scalar``; linen: ``flax_loss(variables,
        batch)`` returning the scalar, or ``(scalar, updates)`` where ``updates`` replaces
        non-parameter collections (``{"batch_stats": ...}``) after the step. ``batch`` holds jax
        arrays. Both losses must be written in the run's dtype (a float64 run is float64 end to
        end: no float32 upcast inside the loss).
      batches: training batches (step ``t`` uses ``batches[t % len(batches)]``).
      eval_batches: batches of the eval loss (taken at x); none: the eval loss is not computed.
      variables: linen's variables dict (``{"params": ..., "batch_stats": ...}``); None for nnx.
      overrides: ``parity.own.mapping.infer``'s overrides, for tensors the automatic mapping
        cannot pair.
      flax_eval_loss: the Flax loss used at evaluation when it differs from ``flax_loss`` (e.g.
        linen BatchNorm with ``use_running_average=True``); default ``flax_loss``.
      name: a label for reports.
      ignore: ``parity.own.mapping.infer``'s ignore: Flax leaves without a torch counterpart on
        purpose (e.g. transformers' Flax Wav2Vec2 ``masked_spec_embed``, which torch creates
        only when masking is configured); they start from their Flax values and are compared
        nowhere.
    """

    torch_model: Any
    flax_model: Any
    torch_loss: Callable
    flax_loss: Callable
    batches: Sequence[Batch]
    eval_batches: Sequence[Batch] = ()
    variables: dict | None = None
    overrides: dict | None = None
    flax_eval_loss: Callable | None = None
    name: str = "pair"
    notes: dict = field(default_factory=dict)
    ignore: Sequence = ()

    def __post_init__(self):
        if not callable(self.torch_loss):
            raise TypeError(f"torch_loss must be callable, got {type(self.torch_loss).__name__}")
        if not callable(self.flax_loss):
            raise TypeError(f"flax_loss must be callable, got {type(self.flax_loss).__name__}")
        if self.flax_eval_loss is not None and not callable(self.flax_eval_loss):
            raise TypeError(
                f"flax_eval_loss must be callable or None, got {type(self.flax_eval_loss).__name__}"
            )
        self.batches = list(self.batches)
        self.eval_batches = list(self.eval_batches)
        if not self.batches:
            raise ValueError("batches must hold at least one batch, got none")
        for where, batches in (("batches", self.batches), ("eval_batches", self.eval_batches)):
            for i, batch in enumerate(batches):
                check_batch(batch, f"{where}[{i}]")


def check_batch(batch, where: str = "batch") -> None:
    """A batch is a non-empty mapping of names to numpy arrays."""
    if not isinstance(batch, Mapping) or not batch:
        raise TypeError(f"{where} must be a non-empty dict of numpy arrays, got {batch!r:.80}")
    for key, value in batch.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"{where}[{key!r}] must be a numpy array, got {type(value).__name__} "
                "(batches are numpy so that both frameworks get the same numbers)"
            )


def load_spec(spec: str, *, dtype: str = "float64") -> Pair:
    """The Pair that ``spec`` (``package.module:function``) returns.

    The function is called with ``dtype=dtype`` when its signature takes ``dtype``, else with
    no argument.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"SPEC must be 'package.module:function', got {spec!r}")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"SPEC {spec!r}: cannot import {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"SPEC {spec!r}: {module_name} has no function {function_name!r}")
    takes_dtype = "dtype" in inspect.signature(function).parameters
    pair = function(dtype=dtype) if takes_dtype else function()
    if not isinstance(pair, Pair):
        raise TypeError(f"SPEC {spec!r} returned {type(pair).__name__}, expected parity.own.Pair")
    return pair
