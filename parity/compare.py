"""Per-step relative differences between a run and the baseline run, and the verdict.

At step ``t`` (both runs recorded it):

- ``params[t]``: the largest, over parameter tensors, of ``max|a - b| / max|b|`` (each tensor
  measured against its own scale, so a small bias is not hidden by a large kernel);
- ``train_loss[t]`` and ``eval_loss[t]``: ``|a - b| / |b|``; ``eval_loss[t]`` is NaN unless
  both runs evaluated at step ``t``.

A run that produced NaN where the other has a number differs by ``inf``.

``absolute``: names of parameters left out of ``params`` and measured apart, by absolute
difference divided by the largest magnitude of any parameter at that step (``absolute[t]``:
``max|a - b| / max over all params of |b|``): parameters whose gradient is exactly zero, which
move only by rounding noise and whose own scale means nothing (``parity.own.check``).
``python -m parity run`` passes none (``absolute`` is then None).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from parity.training.record import Record

_TINY = np.finfo(np.float64).tiny


@dataclass
class Comparison:
    steps: np.ndarray  # the steps of params and eval_loss; train_loss has steps[:-1]
    params: np.ndarray
    train_loss: np.ndarray
    eval_loss: np.ndarray
    absolute: np.ndarray | None = None  # the parameters compared by absolute difference

    def series(self, metric: str) -> np.ndarray:
        return getattr(self, metric)

    def worst(self, metric: str) -> float:
        values = self.series(metric)
        return float(np.nanmax(values)) if np.any(~np.isnan(values)) else float("nan")

    def first_step_over(self, limits: dict[str, float]) -> int | None:
        """The first step at which some metric exceeds its limit (NaN: not measured there)."""
        first = None
        for metric, limit in limits.items():
            values = self.series(metric)
            over = np.flatnonzero(~np.isnan(values) & (values > limit))
            if len(over):
                step = int(self.steps[over[0]])
                first = step if first is None else min(first, step)
        return first


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a - b| / |b|``, inf where one of them is NaN (a run that diverged)."""
    with np.errstate(invalid="ignore"):
        out = np.abs(a - b) / np.maximum(np.abs(b), _TINY)
    out[np.isnan(out)] = np.inf
    return out


def compare(run: Record, baseline: Record, absolute: Collection[str] = ()) -> Comparison:
    first = max(run.first_step, baseline.first_step)
    last = min(run.last_step, baseline.last_step)
    if last < first:
        raise ValueError("the two records share no step")
    if set(run.params) != set(baseline.params):
        raise ValueError("the two records hold different parameters")

    def window(rec: Record, values: np.ndarray, n: int) -> np.ndarray:
        start = first - rec.first_step
        return values[start : start + n]

    n = last - first + 1
    unknown = set(absolute) - set(baseline.params)
    if unknown:
        raise ValueError(f"absolute names parameters the records do not hold: {sorted(unknown)}")
    overall = np.full(n, _TINY)
    if absolute:
        for name in baseline.params:
            b = window(baseline, baseline.params[name], n).reshape(n, -1)
            if b.shape[1]:
                overall = np.fmax(overall, np.abs(b.astype(np.float64)).max(axis=1))
    params = np.zeros(n)
    absolute_diff = np.zeros(n) if absolute else None
    for name in baseline.params:
        a = window(run, run.params[name], n).reshape(n, -1).astype(np.float64)
        b = window(baseline, baseline.params[name], n).reshape(n, -1).astype(np.float64)
        if a.shape[1] == 0:
            continue
        scale = overall if name in absolute else np.maximum(np.abs(b).max(axis=1), _TINY)
        diff = np.abs(a - b).max(axis=1) / scale
        diff[np.isnan(a).any(axis=1) | np.isnan(b).any(axis=1)] = np.inf
        if name in absolute:
            absolute_diff = np.maximum(absolute_diff, diff)
        else:
            params = np.maximum(params, diff)
    train = _relative(
        window(run, run.train_loss, n - 1), window(baseline, baseline.train_loss, n - 1)
    )
    run_eval = window(run, run.eval_loss, n)
    base_eval = window(baseline, baseline.eval_loss, n)
    evals = _relative(run_eval, base_eval)
    # NaN marks steps not evaluated; compare where both runs evaluated (a diverged run shows
    # in its params and training loss).
    evals[np.isnan(run_eval) | np.isnan(base_eval)] = np.nan
    return Comparison(np.arange(first, last + 1), params, train, evals, absolute_diff)
