"""The anytime figure: measured eval-loss curves beside the convex theory's bound curves.

Per problem, one panel per framework with the eval loss against the step of the Schedule-Free
run (the learning rate that won at ``T``) and of the AdamW + cosine and AdamW + WSD runs at
each horizon (each with the learning rate that won at that horizon); then one panel with the
bounds for the same schedule shapes, as in the first figure of Schaipp et al. (2025):

- ``sf_schedules.last_iterate_bound`` (Theorem 1: SGD's last iterate on a convex G-Lipschitz
  problem, ``D = G = 1``) for the cosine and WSD shapes of each horizon, each scaled by the base
  learning rate ``sf_schedules.optimal_base_lr`` gives at that horizon's last step;
- ``sf_schedules.schedule_free_bound`` of a constant learning rate ``gamma``, tuned for the
  last horizon: ``(D^2 + G^2 gamma^2 t) / (2 gamma t)`` is smallest at ``t = T`` for
  ``gamma = D / (G sqrt(T))``.

The bound curve of a run with ``n`` learning rates ``eta_1..eta_n`` is plotted at ``t = 1..n``
(``b[t-1]`` uses ``eta_1..eta_t``). matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import math

import numpy as np

import sf_schedules
from bench.anytime_runs import HORIZON_NAMES, WSD_COOLDOWN, horizons

D = G = 1.0


def shape(method: str, horizon: int, warmup: int) -> np.ndarray:
    """The learning rates of ``method``'s schedule with peak 1 over ``horizon`` updates."""
    if method == "cosine":
        return sf_schedules.cosine(1.0, horizon, warmup_steps=warmup).values(horizon)
    if method == "wsd":
        schedule = sf_schedules.wsd(
            1.0, horizon, warmup_steps=warmup, cooldown_fraction=WSD_COOLDOWN
        )
        return schedule.values(horizon)
    raise ValueError(f"method must be 'cosine' or 'wsd', got {method!r}")


def bound_curves(steps: int, warmup: int) -> dict:
    """``{name: {"horizon", "base_lr", "bound"}}`` for cosine and WSD at each horizon, and the
    Schedule-Free bound of the constant learning rate tuned for ``T`` (key ``"sf"``)."""
    out = {}
    for method in ("cosine", "wsd"):
        for h, h_name in zip(horizons(steps), HORIZON_NAMES):
            lrs = shape(method, h, warmup)
            # The theorem's last term divides by the last learning rate; a schedule that ends
            # exactly at 0 is bounded through its last positive rate.
            lrs = lrs[: np.flatnonzero(lrs > 0)[-1] + 1]
            base, _ = sf_schedules.optimal_base_lr(lrs, D, G)
            out[f"{method} {h_name}"] = {
                "horizon": h,
                "base_lr": float(base),
                "bound": sf_schedules.last_iterate_bound(base * lrs, D, G).tolist(),
            }
    gamma = D / (G * math.sqrt(steps))
    out["sf"] = {
        "horizon": steps,
        "base_lr": gamma,
        "bound": sf_schedules.schedule_free_bound(np.full(steps, gamma), D, G).tolist(),
    }
    return out


_COLORS = {"sf": "tab:green", "cosine": "tab:blue", "wsd": "tab:orange"}


def _best_run(runs: list[dict], method: str, horizon: int, lr: float, b1: float | None = None):
    for run in runs:
        s = run["spec"]
        if s["method"] == method and s["lr"] == lr and (method == "sf" or s["horizon"] == horizon):
            if b1 is None or s["b1"] == b1:
                return run
    return None


def _focus(ax, curves: list[tuple], start: int) -> None:
    """Log y, limited to the range the ``(x, y)`` curves span from ``start`` on (the first
    steps of a warmup would otherwise take most of the height)."""
    ax.set_yscale("log")
    tail = [np.asarray(y, float)[np.asarray(x) >= start] for x, y in curves]
    tail = np.concatenate(tail) if tail else np.array([])
    tail = tail[np.isfinite(tail) & (tail > 0)]
    if tail.size:
        ax.set_ylim(tail.min() / 1.1, tail.max() * 1.3)


def figure(results: dict, path) -> None:
    """Write the PNG of ``results`` (bench.anytime's JSON structure) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(results["problems"].items())
    ncols = 1 + max(len(p["frameworks"]) for _, p in problems)
    fig, axes = plt.subplots(
        len(problems), ncols, figsize=(5.2 * ncols, 4.0 * len(problems)), squeeze=False
    )
    for row, (name, problem) in enumerate(problems):
        steps = problem["steps"]
        hs = horizons(steps)
        for col, (framework, fw) in enumerate(problem["frameworks"].items()):
            ax = axes[row, col]
            shown = []
            sf_rows = [label for label in fw["table"] if label.startswith("SF")]
            for label in sf_rows:
                best = fw["table"][label]["T"]
                b1 = float(label.split("=")[1])
                run = _best_run(fw["runs"], "sf", steps, best["lr"], b1)
                shown.append((run["eval_steps"], run["eval_loss"]))
                ax.plot(
                    run["eval_steps"],
                    run["eval_loss"],
                    color=_COLORS["sf"],
                    alpha=1.0 if label == sf_rows[0] else 0.5,
                    label=f"{label}, lr {best['lr']:g}",
                )
            for method in ("cosine", "wsd"):
                label = next((k for k in fw["table"] if k.lower().startswith(method)), None)
                if label is None:
                    continue
                for i, (h, h_name) in enumerate(zip(hs, HORIZON_NAMES)):
                    best = fw["table"][label][h_name]
                    run = _best_run(fw["runs"], method, h, best["lr"])
                    shown.append((run["eval_steps"], run["eval_loss"]))
                    ax.plot(
                        run["eval_steps"],
                        run["eval_loss"],
                        color=_COLORS[method],
                        alpha=0.4 + 0.3 * i,
                        linestyle="--" if method == "wsd" else "-",
                        label=f"{label} {h_name}, lr {best['lr']:g}",
                    )
            for h in hs:
                ax.axvline(h, color="0.85", linewidth=0.8, zorder=0)
            _focus(ax, shown, steps // 8)
            ax.set_title(f"{name} ({framework}): eval loss")
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        ax = axes[row, ncols - 1]
        shown = []
        for key, curve in problem["bounds"].items():
            method = key.split()[0]
            t = np.arange(1, len(curve["bound"]) + 1)
            shown.append((t, curve["bound"]))
            h_index = hs.index(curve["horizon"])
            label = (
                "Schedule-Free, constant lr"
                if method == "sf"
                else f"{method} {HORIZON_NAMES[h_index]}"
            )
            ax.plot(
                t,
                curve["bound"],
                color=_COLORS[method],
                alpha=1.0 if method == "sf" else 0.4 + 0.3 * h_index,
                linestyle="--" if method == "wsd" else "-",
                label=label,
            )
        _focus(ax, shown, steps // 8)
        ax.set_title(f"{name}: bound (convex, Lipschitz; D = G = 1)")
        ax.set_xlabel("step t")
        ax.legend(fontsize=6)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
