"""The sweep of the anytime study and the table it reduces to; framework-neutral.

One :class:`RunSpec` is one training run from the problem's initial weights. Schedule-Free
(``sf``) and the schedules that are not told a length (``constant``, ``sqrt``) run the whole
``T`` steps once and count at every horizon; ``cosine`` and ``wsd`` are told their length, so
they run once per horizon ``T/4``, ``T/2``, ``T`` and count at their own. Two more Schedule-Free
rows run the whole ``T`` on AdamW problems when asked: AdamW with ``inner_momentum`` (``sf``,
one row per value) and Schedule-Free AdamC with a Polyak step size (``sf_plus``: upstream's
``AdamCScheduleFreePlusPaper``, whose ``lr`` multiplies the Polyak step and so has its own
sweep, ``plus_lrs``). :func:`plan` lists
every run of a problem; :func:`table` picks, per row and horizon, the run of the learning-rate
sweep with the lowest loss there. Nothing here imports jax or torch.
"""

from __future__ import annotations

import dataclasses
import math

import sf_schedules

METHODS = ("sf", "cosine", "wsd", "constant", "sqrt")
PLUS = "sf_plus"  # AdamC + Schedule-Free + Polyak; run when plan() gets plus_lrs
PLUS_LABEL = "SF+ AdamC (Polyak)"
HORIZON_METHODS = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "sgd")
WSD_COOLDOWN = 0.2
HORIZON_NAMES = ("T/4", "T/2", "T")
ROW_NAMES = {"wsd": f"WSD (cooldown {WSD_COOLDOWN:.0%})"}  # the others by their method


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """``horizon`` updates of ``optimizer``: its Schedule-Free form when ``method`` is ``sf``
    (constant ``lr`` after its own ``warmup``; ``schedule`` then says what lr its z steps
    take; ``inner_momentum`` as in ``sf_optax.adamw``), ``sf_optax.adamc_plus`` /
    ``sf_torch.AdamCScheduleFreePlus`` when it is ``sf_plus`` (base lr ``schedule``: constant
    after a linear ``warmup``, which is also its ``c_warmup``; ``b1``, ``b2`` are Adam's moments,
    the Schedule-Free interpolation is upstream's default 0.9), else the plain optimizer driven
    by ``schedule``."""

    label: str
    optimizer: str
    method: str
    lr: float
    horizon: int
    eval_steps: tuple[int, ...]
    warmup: int
    schedule: sf_schedules.Schedule
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    inner_momentum: float = 0.0

    @property
    def name(self) -> str:
        told = f" h {self.horizon}" if self.method in HORIZON_METHODS else ""
        return f"{self.label} lr {self.lr:g}{told}"

    def describe(self) -> dict:
        """The JSON form: every field but the schedule and the eval steps, and the name."""
        skip = ("eval_steps", "schedule")
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        return {**out, "name": self.name}


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


def schedule(method: str, lr: float, total: int, warmup: int) -> sf_schedules.Schedule:
    """The learning rates of a ``method`` run of ``total`` updates (``sf``: of its z steps)."""
    if method == "cosine":
        return sf_schedules.cosine(lr, total, warmup_steps=warmup)
    if method == "wsd":
        return sf_schedules.wsd(lr, total, warmup_steps=warmup, cooldown_fraction=WSD_COOLDOWN)
    if method == "sqrt":
        return sf_schedules.sqrt(lr, warmup_steps=warmup)
    return sf_schedules.constant(lr, warmup_steps=warmup)


def counts_at(spec: dict, horizon: int) -> bool:
    """Whether a run (its JSON spec) competes at ``horizon``."""
    return spec["method"] not in HORIZON_METHODS or spec["horizon"] == horizon


def plan(
    steps: int,
    evals: int,
    *,
    optimizer: str,
    methods: tuple[str, ...],
    lrs: tuple[float, ...],
    sf_b1: tuple[float, ...],
    sf_warmups: tuple[int, ...],
    warmup: int,
    weight_decay: float,
    sf_inner: tuple[float, ...] = (),
    plus_lrs: tuple[float, ...] = (),
    plus_weight_decay: float = 0.0,
) -> list[RunSpec]:
    """Every run of one problem. Per learning rate and method: one Schedule-Free run of
    ``steps`` per variant (each ``sf_b1`` at ``warmup``, then the first b1 at each of
    ``sf_warmups``, then the first b1 with each ``inner_momentum`` of ``sf_inner``), one run
    of ``steps`` of a constant or sqrt schedule, or one cosine or WSD run per horizon; all with
    ``warmup`` and ``weight_decay``. Then one ``sf_plus`` run of ``steps`` per ``plus_lrs``
    (AdamW problems only), with ``warmup`` and the AdamC decay ``plus_weight_decay``."""
    hs = horizons(steps)
    if not 0 <= warmup < hs[0]:
        raise ValueError(f"warmup must be in [0, T/4) = [0, {hs[0]}), got {warmup}")
    if any(not 0 <= w < steps for w in sf_warmups):
        raise ValueError(f"sf-warmup values must be in [0, T) = [0, {steps}), got {sf_warmups}")
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"lrs must be positive finite learning rates, got {lrs}")
    if not sf_b1 or any(not 0 < b1 < 1 for b1 in sf_b1):
        raise ValueError(f"sf-b1 values must be in (0, 1), got {sf_b1}")
    if not methods or set(methods) - set(METHODS):
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    if optimizer == "sgd" and weight_decay:
        # optax.sgd has none; the convex problem's L2 term is part of its loss instead.
        raise ValueError(f"weight decay is for AdamW problems, got {weight_decay} with SGD")
    if any(not 0 < m < 1 for m in sf_inner):
        raise ValueError(f"sf-inner values (inner_momentum) must be in (0, 1), got {sf_inner}")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in plus_lrs):
        raise ValueError(f"plus-lrs must be positive finite learning rates, got {plus_lrs}")
    if not (plus_weight_decay >= 0 and math.isfinite(plus_weight_decay)):
        raise ValueError(f"plus weight decay must be finite and >= 0, got {plus_weight_decay}")
    if optimizer == "sgd" and (sf_inner or plus_lrs):
        raise ValueError(
            f"sf-inner and plus-lrs are AdamW rows, got {sf_inner} and {plus_lrs} with SGD"
        )
    variants = [(b1, warmup, 0.0) for b1 in sf_b1] + [(sf_b1[0], w, 0.0) for w in sf_warmups]
    variants += [(sf_b1[0], warmup, m) for m in sf_inner]
    specs, wd = [], weight_decay
    for lr in lrs:
        for method in methods:
            if method == "sf":
                runs = [(_sf_label(b1, w, m, warmup), steps, w, b1, m) for b1, w, m in variants]
            else:
                lengths = hs if method in HORIZON_METHODS else (steps,)
                runs = [(ROW_NAMES.get(method, method), h, warmup, 0.9, 0.0) for h in lengths]
            for label, h, w, b1, m in runs:
                grid, sched = eval_grid(steps, evals, h), schedule(method, lr, h, w)
                specs.append(
                    RunSpec(
                        label, optimizer, method, lr, h, grid, w, sched, wd, b1, inner_momentum=m
                    )
                )
    for lr in plus_lrs:
        grid, sched = eval_grid(steps, evals, steps), schedule("constant", lr, steps, warmup)
        specs.append(
            RunSpec(PLUS_LABEL, optimizer, PLUS, lr, steps, grid, warmup, sched, plus_weight_decay,
                    b1=0.9, b2=0.95)
        )  # fmt: skip
    return specs


def _sf_label(b1: float, w: int, inner: float, warmup: int) -> str:
    extra = f", warmup {w}" if w != warmup else ""
    extra += f", inner {inner:g}" if inner else ""
    return f"SF b1={b1:g}{extra}"


def run_record(spec: RunSpec, losses, accs, lrs_used, seconds: float) -> dict:
    """What one run reports, the same from both frameworks' trainers: losses (and accuracies,
    or None) at ``spec.eval_steps``, the learning rates the baseline steps really used (None
    for Schedule-Free), and the wall time."""
    return {
        "eval_steps": list(spec.eval_steps),
        "eval_loss": losses,
        "eval_acc": accs,
        "lrs_used": lrs_used,
        "seconds": seconds,
    }


def value_at(run: dict, step: int, key: str = "eval_loss") -> float:
    """A recorded run's ``key`` (``eval_loss``, ``eval_acc``, ``bound``) at ``step``."""
    return run[key][run["eval_steps"].index(step)]


def table(runs: list[dict], steps: int) -> dict:
    """``{row label: {horizon name: best}}``: per row and horizon, the lowest loss at that
    horizon over the learning-rate sweep, its ``lr``, the index of its ``run`` (and its ``acc``
    and ``bound`` where the runs have them). A diverged run (NaN loss) never wins."""
    out: dict[str, dict] = {}
    for h, h_name in zip(horizons(steps), HORIZON_NAMES):
        for i, run in enumerate(runs):
            spec = run["spec"]
            if not counts_at(spec, h):
                continue
            loss = value_at(run, h)
            row = out.setdefault(spec["label"], {})
            best = row.get(h_name)
            if best is None or (math.isfinite(loss) and not loss >= best["loss"]):
                row[h_name] = {"loss": loss, "lr": spec["lr"], "step": h, "run": i}
                for key, name in (("eval_acc", "acc"), ("bound", "bound")):
                    if run.get(key) is not None:
                        row[h_name][name] = value_at(run, h, key)
    return out
