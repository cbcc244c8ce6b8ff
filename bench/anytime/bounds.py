"""What the convex theory says about the anytime study: bound curves, and the convex problem's
runs against their bounds.

Bounds (``sf_schedules``) on ``E f(x) - f*`` for a convex problem with ``||x_0 - x*|| = D`` and
stochastic gradients of norm at most ``G``:

- SGD with any schedule: ``last_iterate_bound`` (Theorem 1 of Schaipp et al. 2025); the iterate
  after n updates reads the lrs of updates 0 .. n. Cosine and WSD end at lr 0, so at their
  horizon that next lr is 0 and the theorem, which needs it > 0 but never applies it, is
  evaluated with the best positive value of ``FREE_LR_GRID`` in its place.
- Schedule-Free SGD at a constant lr (any b1): ``schedule_free_optimizer_bound``, the theorem of
  Defazio et al. for the run restarted at the first z after an update (the optimizer's ``x``
  leaves the initial point out of its average). With warmup the averaging weights lag the lrs
  by one step and that theorem does not apply: those runs get no bound.
- Bound-optimal lrs: ``optimal_base_lr`` for the schedules, a fine log grid for SF.

Every problem's figure shows :func:`optimal_curves`, the bound of each of its schedules at its
bound-optimal lr (as in the first figure of Schaipp et al.); for the non-convex problems with
``D = G = 1``, a picture of the schedules' shapes. The convex problem also gets
:func:`analyse`: its own D and G, the bound of every run, the orderings the bounds predict
beside the measured one, and how closely the two frameworks' float64 trajectories agree.

G on the convex problem: for one sample the cross-entropy gradient is ``a_i (p_i - e_{y_i})^T``,
of Frobenius norm ``||a_i|| ||p_i - e_{y_i}||``, and ``||p - e_y||^2 = (1-p_y)^2 + sum_{k!=y}
p_k^2 <= (1-p_y)^2 + (sum_{k!=y} p_k)^2 = 2 (1-p_y)^2 <= 2``. A minibatch mean plus ``lam W``
is therefore at most ``sqrt(2) max_i ||a_i|| + lam ||W||`` in norm. With R the largest ||W|| at
which any run took a gradient or ended (the theorems also read a gradient at the last point),
``G = sqrt(2) max_i ||a_i|| + lam R`` bounds every stochastic gradient that could be drawn at
any point a run visited. D = ||W_0 - W*|| = ||W*||. These bound the expected suboptimality; the
check that every run lies below its bound is of one sampled path.
"""

from __future__ import annotations

import functools
import math

import numpy as np

import sf_schedules
from bench.anytime import runs
from bench.anytime.runs import HORIZON_METHODS, HORIZON_NAMES, horizons

# A schedule that ends at lr 0 (cosine, WSD) leaves the theorem's last lr free (it never moves
# the bounded iterate but must be > 0): the best of these multiples of the peak lr is used.
FREE_LR_GRID = 2.0 ** -np.arange(0, 31)
SF_LR_GRID = np.geomspace(1e-3, 1e3, 1201)


def schedule_bound(schedule: sf_schedules.Schedule, steps: np.ndarray, D: float, G: float):
    """Theorem 1 for SGD's iterate after each of ``steps`` (>= 1) updates."""
    lrs = schedule.values(int(steps.max()) + 1)
    out = sf_schedules.last_iterate_bound(lrs, D, G)[steps]
    for i, n in enumerate(steps):
        if lrs[n] == 0:
            free = [np.append(lrs[:n], e * schedule.peak_lr) for e in FREE_LR_GRID]
            out[i] = min(sf_schedules.last_iterate_bound(x, D, G)[n] for x in free)
    return out


def run_bound(spec: dict, steps: np.ndarray, D: float, G: float) -> np.ndarray | None:
    """The bound of an SGD run (its JSON spec) after each of ``steps`` (>= 1) updates, or None
    where no theorem applies (SF with warmup)."""
    if spec["method"] == "sf":
        if spec["warmup"]:
            return None
        b = sf_schedules.schedule_free_optimizer_bound(spec["lr"], spec["horizon"], D, G)
        return b[steps - 1]
    schedule = runs.schedule(spec["method"], spec["lr"], spec["horizon"], spec["warmup"])
    return schedule_bound(schedule, steps, D, G)


@functools.cache  # the table and the curves ask for the same ones
def optimal_lr(method: str, horizon: int, warmup: int, D: float, G: float):
    """``(lr, bound)``: the lr that minimises ``method``'s bound after ``horizon`` updates."""
    if method == "sf":
        bound = sf_schedules.schedule_free_optimizer_bound
        b = [bound(float(g), horizon, D, G)[-1] for g in SF_LR_GRID]
        i = int(np.argmin(b))
        return float(SF_LR_GRID[i]), float(b[i])
    lrs = runs.schedule(method, 1.0, horizon, warmup).values(horizon + 1)
    shapes = [lrs] if lrs[-1] > 0 else [np.append(lrs[:-1], e) for e in FREE_LR_GRID]
    return min((sf_schedules.optimal_base_lr(x, D, G) for x in shapes), key=lambda t: t[1])


def optimal_curves(methods, steps: int, warmup: int, D: float = 1.0, G: float = 1.0) -> dict:
    """``{"D", "G", "curves": {name: {"method", "horizon", "lr", "bound"}}}``: each schedule of
    ``methods`` (cosine and WSD for each horizon, the others for T) at its bound-optimal lr,
    ``bound[t - 1]`` the bound after ``t`` updates. Schedule-Free without its warmup."""
    curves = {}
    for method in methods:
        for h, h_name in zip(horizons(steps), HORIZON_NAMES):
            if method in HORIZON_METHODS or h == steps:
                w = 0 if method == "sf" else warmup
                lr, _ = optimal_lr(method, h, w, D, G)
                spec = {"method": method, "lr": lr, "horizon": h, "warmup": w}
                bound = run_bound(spec, np.arange(1, h + 1), D, G).tolist()
                curves[f"{method} {h_name}"] = {**spec, "bound": bound}
    return {"D": D, "G": G, "curves": curves}


def _bound_at(run: dict, h: int) -> float:
    return runs.value_at(run, h, "bound") if run["bound"] else math.inf


def analyse(entry: dict, trajectories: dict[str, list[dict]]) -> None:
    """Add the convex theory to a convex problem's ``entry`` of the results: every run's
    ``bound`` (None at step 0), per framework the ``ordering`` of the methods' first rows at
    each horizon and the smallest bound / measured ratio, ``entry["bounds"]`` at the problem's
    D and G, and ``entry["convex"]``: D, G, the bound-optimal lrs and the JAX-torch parity."""
    info, steps, warmup = entry["info"], entry["steps"], entry["sweep"]["warmup"]
    every = [t for ts in trajectories.values() for t in ts]
    radius = max(float(t["w_norm"].max()) for t in every)
    D = info["D"]
    G = math.sqrt(2.0) * info["max_feature_norm"] + info["lam"] * radius
    rows = {}  # the row of each method's first variant -> the method
    for fw in entry["frameworks"].values():
        for run in fw["runs"]:
            b = run_bound(run["spec"], np.asarray(run["eval_steps"][1:]), D, G)
            run["bound"] = None if b is None else [None, *b.tolist()]
            rows.setdefault(run["spec"]["method"], run["spec"]["label"])
        fw["table"] = runs.table(fw["runs"], steps)
    rows = {label: method for method, label in rows.items()}
    theory = {}
    for label, m in rows.items():
        w = 0 if m == "sf" else warmup
        theory[label] = {
            n: dict(zip(("lr", "bound"), optimal_lr(m, h, w, D, G)))
            for h, n in zip(horizons(steps), HORIZON_NAMES)
        }
    for fw in entry["frameworks"].values():
        ratios = [
            b / s
            for r in fw["runs"]
            if r["bound"]
            for b, s in zip(r["bound"][1:], r["eval_loss"][1:])
        ]
        fw["min_bound_ratio"] = min(ratios)
        fw["ordering"] = {}
        for h, n in zip(horizons(steps), HORIZON_NAMES):
            best = {label: fw["table"][label][n] for label in rows}
            tuned = {
                label: min(
                    _bound_at(r, h)
                    for r in fw["runs"]
                    if r["spec"]["label"] == label and runs.counts_at(r["spec"], h)
                )
                for label in rows
            }
            fw["ordering"][n] = {
                "measured": sorted(rows, key=lambda k: best[k]["loss"]),
                "bound_at_best_lr": sorted(rows, key=lambda k: best[k].get("bound", math.inf)),
                "bound_tuned_over_sweep": sorted(rows, key=tuned.get),
                "bound_at_optimal_lr": sorted(rows, key=lambda k: theory[k][n]["bound"]),
            }
    entry["bounds"] = optimal_curves(tuple(rows.values()), steps, warmup, D, G)
    entry["convex"] = {
        "D": D,
        "G": G,
        "radius": radius,
        "max_grad_norm_observed": max(float(t["g_norm"].max()) for t in every),
        "theory_optimal_lr": theory,
    }
    if {"jax", "torch"} <= set(trajectories):
        diffs = [
            float(np.abs(t["snaps"] - j["snaps"]).max() / np.abs(t["snaps"]).max())
            for t, j in zip(trajectories["torch"], trajectories["jax"])
        ]
        specs = [r["spec"] for r in entry["frameworks"]["torch"]["runs"]]
        # Above 2/L* SGD does not settle into W*'s basin of contraction: round-off differences
        # between the frameworks grow instead of staying at 1e-15, so parity is summarised apart.
        limit = 2 / info["L_star"]
        stable = [d for d, s in zip(diffs, specs) if s["method"] == "sf" or s["lr"] < limit]
        entry["convex"]["parity"] = {
            "max_rel_param_diff": max(diffs),
            "max_rel_param_diff_stable": max(stable),
            "stable_lr_limit": limit,
            "runs_above_1e-10": [s["name"] for d, s in zip(diffs, specs) if d > 1e-10],
            "per_run": diffs,
        }


def report(entry: dict) -> list[str]:
    """The convex problem's lines of ``table.md`` below its tables."""
    info, c = entry["info"], entry["convex"]
    lines = [
        f"f* = {info['f_star']:.12f} (|grad f(W*)| = {info['grad_norm_at_optimum']:.1e}), "
        f"D = {c['D']:.3f}, G = {c['G']:.3f} (largest stochastic gradient seen "
        f"{c['max_grad_norm_observed']:.3f}), test accuracy at W* "
        f"{info['test_acc_at_optimum']:.4f}",
        "",
        "Bound-optimal lr (the lr that minimises the bound at the horizon) and that bound:",
        "",
        "| method | " + " | ".join(HORIZON_NAMES) + " |",
        "| --- |" + " ---: |" * len(HORIZON_NAMES),
    ]
    for method, per_h in c["theory_optimal_lr"].items():
        cells = " | ".join(f"{t['lr']:.3g} ({t['bound']:.3g})" for t in per_h.values())
        lines.append(f"| {method} | {cells} |")
    for framework, fw in entry["frameworks"].items():
        lines += [
            "",
            f"{framework}: orderings, best first: measured; by the bound at the lrs that won; by "
            "the bound at the best lr of the sweep for the bound; by the bound at its optimal lr. "
            f"Smallest bound / measured over every evaluated point: {fw['min_bound_ratio']:.3g}.",
            "",
            "| horizon | measured | bound, lrs that won | bound, best of sweep | bound, best lr |",
            "| --- | --- | --- | --- | --- |",
        ]
        for h_name, o in fw["ordering"].items():
            lines.append(f"| {h_name} | " + " | ".join(" < ".join(v) for v in o.values()) + " |")
    if "parity" in c:
        p = c["parity"]
        lines += [
            "",
            f"JAX vs torch, largest relative difference of the evaluated W: "
            f"{p['max_rel_param_diff_stable']:.2e} over Schedule-Free runs and SGD runs with "
            f"lr < 2/L* = {p['stable_lr_limit']:.3g}; {p['max_rel_param_diff']:.2e} over "
            f"all runs (above 1e-10: {', '.join(p['runs_above_1e-10']) or 'none'}).",
        ]
    return lines
