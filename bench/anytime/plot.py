"""The anytime figure: per problem, the measured curves of each framework beside the bounds.

One row per problem. Per framework a panel with the loss against the step of each table row's
run that won at ``T`` (cosine and WSD: the winner at each horizon, lighter for shorter ones);
then a panel with the convex theory's bound curves of the same schedules at their
bound-optimal lrs (``bounds.optimal_curves``), and, where the runs have bounds (convex), the
bound of each row's winner at ``T``, dotted. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import numpy as np

from bench.anytime.runs import HORIZON_METHODS, HORIZON_NAMES, horizons

_COLORS = {
    "sf": "tab:green",
    "sf_plus": "tab:olive",
    "cosine": "tab:blue",
    "wsd": "tab:orange",
    "constant": "tab:red",
    "sqrt": "tab:purple",
}
_SF_STYLES = ("-", "-.", ":", (0, (5, 1)))  # one per Schedule-Free variant
_ALPHAS = (0.4, 0.7, 1.0)  # T/4, T/2, T


def _focus(ax, curves: list[tuple], start: int) -> None:
    """Log y, limited to the range the ``(x, y)`` curves span from ``start`` on (the first
    steps of a warmup would otherwise take most of the height)."""
    ax.set_yscale("log")
    tail = [np.asarray(y, float)[np.asarray(x) >= start] for x, y in curves]
    tail = np.concatenate(tail) if tail else np.array([])
    tail = tail[np.isfinite(tail) & (tail > 0)]
    if tail.size:
        ax.set_ylim(tail.min() / 1.1, tail.max() * 1.3)


def _rows(fw: dict):
    """Per table row: its label, method, line style and the winning runs it shows, as
    ``(horizon name, run)``."""
    sf_rows = 0
    for label, cells in fw["table"].items():
        method = fw["runs"][cells["T"]["run"]]["spec"]["method"]
        ls = "--" if method == "wsd" else "-"
        if method == "sf":
            ls, sf_rows = _SF_STYLES[sf_rows % len(_SF_STYLES)], sf_rows + 1
        names = HORIZON_NAMES if method in HORIZON_METHODS else ("T",)
        yield label, method, ls, [(n, fw["runs"][cells[n]["run"]]) for n in names]


def figure(results: dict, path) -> None:
    """Write the PNG of ``results`` (``python -m bench.anytime``'s JSON structure) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(results["problems"].items())
    ncols = 1 + max(len(p["frameworks"]) for _, p in problems)
    fig, axes = plt.subplots(
        len(problems), ncols, figsize=(5.2 * ncols, 4.0 * len(problems)), squeeze=False
    )
    for row, (name, entry) in enumerate(problems):
        steps, start = entry["steps"], entry["steps"] // 8
        bound_ax, bound_curves = axes[row, ncols - 1], []
        for col, (framework, fw) in enumerate(entry["frameworks"].items()):
            ax, shown = axes[row, col], []
            for label, method, ls, picks in _rows(fw):
                for h_name, run in picks:
                    alpha = _ALPHAS[HORIZON_NAMES.index(h_name)]
                    x, y = run["eval_steps"], run["eval_loss"]
                    shown.append((x, y))
                    suffix = f" {h_name}" if len(picks) > 1 else ""
                    lr = run["spec"]["lr"]
                    style = dict(color=_COLORS[method], alpha=alpha, linestyle=ls)
                    ax.plot(x, y, label=f"{label}{suffix}, lr {lr:g}", **style)
                    if col == 0 and h_name == "T" and run.get("bound"):
                        bound_curves.append((x[1:], run["bound"][1:]))
                        bound_ax.plot(x[1:], run["bound"][1:], color=style["color"], ls=":")
            for h in horizons(steps):
                ax.axvline(h, color="0.85", linewidth=0.8, zorder=0)
            _focus(ax, shown, start)
            ax.set_title(f"{name} ({framework}): {entry['metric']}")
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        bounds = entry["bounds"]
        for key, curve in bounds["curves"].items():
            method, h_name = key.split()
            t = np.arange(1, len(curve["bound"]) + 1)
            bound_curves.append((t, curve["bound"]))
            bound_ax.plot(
                t,
                curve["bound"],
                color=_COLORS[method],
                alpha=_ALPHAS[HORIZON_NAMES.index(h_name)],
                linestyle="--" if method == "wsd" else "-",
                label=f"{key}, lr {curve['lr']:.3g}",
            )
        _focus(bound_ax, bound_curves, start)
        dotted = ", dotted: the runs best at T" if len(bound_curves) > len(bounds["curves"]) else ""
        bound_ax.set_title(
            f"{name}: bound at the bound-optimal lr{dotted}\n"
            f"(convex, Lipschitz; D = {bounds['D']:.3g}, G = {bounds['G']:.3g})",
            fontsize=9,
        )
        bound_ax.set_xlabel("step t")
        bound_ax.legend(fontsize=6)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
