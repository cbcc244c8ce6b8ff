"""The sweep of the anytime benchmark and what it reduces to, framework-neutral.

One :class:`RunSpec` is one training run: Schedule-Free AdamW at a constant learning rate (plus
warmup) for the whole ``T`` steps, evaluated at ``x`` along the way, or AdamW with a cosine or
WSD schedule whose ``total_steps`` is one horizon (``T/4``, ``T/2`` or ``T``). :func:`plan`
lists every run of one problem; :func:`table` picks, per method and horizon, the run with the
lowest eval loss at that horizon. Nothing here imports jax or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sf_schedules

METHODS = ("sf", "cosine", "wsd")
WSD_COOLDOWN = 0.2
HORIZON_NAMES = ("T/4", "T/2", "T")


@dataclass(frozen=True)
class RunSpec:
    """One run. ``schedule`` is the sf_schedules learning rate of AdamW runs (None for SF,
    whose constant ``lr`` and ``warmup`` are its own hyperparameters)."""

    method: str
    lr: float
    horizon: int
    eval_steps: tuple[int, ...]
    warmup: int
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: sf_schedules.Schedule | None = None

    @property
    def label(self) -> str:
        """The table row this run belongs to."""
        if self.method == "sf":
            return f"SF b1={self.b1:g}"
        return "cosine" if self.method == "cosine" else f"WSD (cooldown {WSD_COOLDOWN:.0%})"

    def describe(self) -> dict:
        return {
            "method": self.method,
            "label": self.label,
            "lr": self.lr,
            "horizon": self.horizon,
            "warmup": self.warmup,
            "b1": self.b1,
            "b2": self.b2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }


def horizons(steps: int) -> tuple[int, int, int]:
    """``(T/4, T/2, T)``; ``T`` must be a positive multiple of 4."""
    if steps < 4 or steps % 4:
        raise ValueError(
            f"steps must be a positive multiple of 4 (horizons T/4, T/2, T), got {steps}"
        )
    return steps // 4, steps // 2, steps


def eval_grid(steps: int, evals: int, upto: int) -> tuple[int, ...]:
    """Evaluation steps of a run of ``upto`` updates: 0, every ``ceil(steps / evals)`` and the
    three horizons (every run is evaluated exactly at each horizon it reaches)."""
    every = max(1, math.ceil(steps / evals))
    points = set(range(0, upto + 1, every)) | {h for h in horizons(steps) if h <= upto}
    return tuple(sorted(points))


def plan(
    steps: int,
    evals: int,
    lrs: tuple[float, ...],
    sf_b1s: tuple[float, ...],
    warmup: int,
    weight_decay: float,
    methods: tuple[str, ...] = METHODS,
) -> list[RunSpec]:
    """Every run of one problem: per learning rate, one SF run of ``steps`` per ``b1`` and one
    AdamW + cosine and one AdamW + WSD run per horizon (b1 0.9, the same warmup and decay)."""
    hs = horizons(steps)
    if not 0 <= warmup < hs[0]:
        raise ValueError(f"warmup must be in [0, T/4) = [0, {hs[0]}), got {warmup}")
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"lrs must be positive finite learning rates, got {lrs}")
    if any(not 0 < b1 < 1 for b1 in sf_b1s):
        raise ValueError(f"sf-b1 values must be in (0, 1), got {sf_b1s}")
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    runs = []
    for lr in lrs:
        if "sf" in methods:
            for b1 in sf_b1s:
                runs.append(
                    RunSpec(
                        "sf",
                        lr,
                        steps,
                        eval_grid(steps, evals, steps),
                        warmup,
                        b1=b1,
                        weight_decay=weight_decay,
                    )
                )
        for h in hs:
            grid = eval_grid(steps, evals, h)
            if "cosine" in methods:
                schedule = sf_schedules.cosine(lr, h, warmup_steps=warmup)
                runs.append(
                    RunSpec(
                        "cosine", lr, h, grid, warmup, weight_decay=weight_decay, schedule=schedule
                    )
                )
            if "wsd" in methods:
                schedule = sf_schedules.wsd(
                    lr, h, warmup_steps=warmup, cooldown_fraction=WSD_COOLDOWN
                )
                runs.append(
                    RunSpec(
                        "wsd", lr, h, grid, warmup, weight_decay=weight_decay, schedule=schedule
                    )
                )
    return runs


def run_record(spec: RunSpec, losses, accs, lrs_used, seconds: float) -> dict:
    """What one run reports, the same from both frameworks' trainers: eval losses (and
    accuracies, or None) at ``spec.eval_steps``, the learning rates the baseline steps really
    used (None for Schedule-Free), and the wall time."""
    return {
        "eval_steps": list(spec.eval_steps),
        "eval_loss": losses,
        "eval_acc": accs,
        "lrs_used": lrs_used,
        "seconds": seconds,
    }


def value_at(run: dict, step: int, key: str = "eval_loss") -> float:
    """A recorded run's ``key`` (``eval_loss`` / ``eval_acc``) at ``step``."""
    return run[key][run["eval_steps"].index(step)]


def table(runs: list[dict], steps: int) -> dict:
    """``{row label: {horizon name: best}}``: per method row and horizon, the lowest eval loss
    at that horizon over the learning-rate sweep, with its ``lr`` (and ``acc``, digits).

    A SF run counts at every horizon; an AdamW run only at its own. A diverged run (NaN loss)
    never wins.
    """
    out: dict[str, dict] = {}
    for h, h_name in zip(horizons(steps), HORIZON_NAMES):
        for run in runs:
            if run["spec"]["method"] != "sf" and run["spec"]["horizon"] != h:
                continue
            loss = value_at(run, h)
            row = out.setdefault(run["spec"]["label"], {})
            best = row.get(h_name)
            if best is None or (math.isfinite(loss) and not loss >= best["loss"]):
                row[h_name] = {"loss": loss, "lr": run["spec"]["lr"], "step": h}
                if run.get("eval_acc") is not None:
                    row[h_name]["acc"] = value_at(run, h, "eval_acc")
    return out
