"""What a local-steps parity run is, framework-neutral: workers, data split, sync list, record.

The local backends (``local_torch``: K torch ranks on gloo; ``local_optax``: K JAX CPU devices)
read their options from ``RunConfig.extra["local"]``::

    {"workers": 2, "sync": "qsr:h_base=2,alpha=0.01,h_warm=1", "plain_sgd": false}

- ``workers``: K, the number of workers. Step ``t``'s batch is the run's usual batch
  (``parity.data``), and worker ``w`` trains on its contiguous rows
  ``[w B/K, (w+1) B/K)`` (:func:`share`), the same rows in both frameworks.
- ``sync``: ``RULE:key=value,...``, a rule of ``sf_schedules.sync`` and its constants, with the
  key names of ``sf_torch.deepspeed``'s ``"local_steps"`` section (:data:`RULE_KEYS`). The rule's
  ``warmup_steps`` defaults to the run's, and ``schedule_free_qsr``/``averaging_window`` take
  ``b1``, ``r`` and ``weight_lr_power`` from the run. The sync list is
  ``sf_schedules.sync.sync_steps(rule, lrs)`` with ``lrs`` the learning rate of every step
  (:func:`run_lrs`, float64): computed by :func:`sync_steps`, the one function both runners
  call.
- ``plain_sgd``: the workers step ``torch.optim.SGD`` / ``optax.sgd`` (no momentum, not
  Schedule-Free) at the constant ``lr`` (with ``weight_decay`` added to the gradient, as
  torch's SGD does), instead of the run's Schedule-Free optimizer; needs ``optimizer == "sgd"``.

What a local run's :class:`parity.training.record.Record` holds (both local backends alike):

- ``params[t]``: the mean over the workers of the params (``y``) they hold after ``t`` steps,
  taken in numpy float64 and stored in the run's dtype (:func:`summarize`); right after a sync
  every worker holds it (to the rounding of the framework's mean).
- ``train_loss[t]``: the mean over the workers of their losses on step ``t``'s share at their
  own ``y``; with equal shares at equal params (``H = 1``) it is the whole batch's loss.
- ``eval_loss[t]``: the eval-set loss at the averaged ``x``: ``y`` and ``z`` averaged over the
  workers as a sync averages them (the framework's own collective, on copies: training is not
  touched), ``x`` from those. For the CNN each worker then recomputes the BatchNorm statistics
  at that ``x`` over its rows of the ``recal_batches`` recalibration batches (the mean over
  its batches), and the statistics are averaged over the workers (the QSR code's approach).
- ``meta``: ``workers``, ``sync_steps``, ``sync`` (the spec) and ``rule`` (the resolved rule),
  ``plain_sgd``, ``worker_train_loss`` (per step, each worker's loss), ``spread`` (per step,
  the largest over params of ``max|y_w - mean| / max|mean|``: 0 right after a sync, > 0
  inside a round with ``K > 1``).

The two local backends are compared with each other. They equal the single-process
(data-parallel) trajectory only where the algorithms are the same (:func:`data_parallel_gap`):
one worker; or a sync after every step with SGD (Schedule-Free or plain: the update is linear in
the gradient and the scalars are the same on every worker, so averaging after each step is
averaging the gradients) on a model without BatchNorm (the CNN's batch statistics are each
worker's share's, not the whole batch's).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sf_schedules import sync as sync_rules
from sf_schedules.radam import radam_rho

DEFAULT_WORKERS = 2
DEFAULT_SYNC = "qsr:h_base=2,alpha=0.01,h_warm=1"

_INT, _FLOAT = int, float
_QSR_KEYS = {
    "h_base": _INT,
    "alpha": _FLOAT,
    "power": _FLOAT,
    "h_warm": _INT,
    "warmup_steps": _INT,
    "h_max": _INT,
}
# Each rule's constants (the keys of sf_torch.deepspeed's "local_steps" section) and their types.
RULE_KEYS: dict[str, dict[str, type]] = {
    "constant": {"period": _INT},
    "qsr": dict(_QSR_KEYS),
    "inverse_lr": {k: v for k, v in _QSR_KEYS.items() if k != "power"},
    "schedule_free_qsr": dict(_QSR_KEYS),
    "averaging_window": {
        "fraction": _FLOAT,
        "h_base": _INT,
        "h_max": _INT,
        "warmup_steps": _INT,
        "h_warm": _INT,
    },
}
_REQUIRED = {
    "constant": ("period",),
    "qsr": ("h_base", "alpha"),
    "inverse_lr": ("h_base", "alpha"),
    "schedule_free_qsr": ("h_base", "alpha"),
    "averaging_window": ("fraction",),
}
RULES = tuple(RULE_KEYS)
_EXAMPLE = {
    "constant": "constant:period=4",
    "qsr": "qsr:h_base=2,alpha=0.01,h_warm=1",
    "inverse_lr": "inverse_lr:h_base=2,alpha=0.02",
    "schedule_free_qsr": "schedule_free_qsr:h_base=2,alpha=0.002,h_max=32",
    "averaging_window": "averaging_window:fraction=0.25,h_max=32",
}


def parse_sync(spec: str) -> tuple[str, dict[str, int | float]]:
    """``"RULE:key=value,..."`` as ``(rule, constants)``; ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"needs RULE[:key=value,...] with RULE in {RULES}, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in RULE_KEYS:
        raise ValueError(f"the rule must be one of {RULES}, got {name!r} (in {spec!r})")
    keys = RULE_KEYS[name]
    constants: dict[str, int | float] = {}
    for item in (s.strip() for s in rest.split(",")):
        if not item:
            continue
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"constants are key=value, got {item!r} (in {spec!r})")
        if key not in keys:
            raise ValueError(
                f"{key!r} is not a constant of rule {name!r} (its constants: {', '.join(keys)})"
            )
        if key in constants:
            raise ValueError(f"{key!r} is given twice (in {spec!r})")
        try:
            constants[key] = keys[key](text.strip())
        except ValueError:
            kind = "an integer" if keys[key] is int else "a number"
            raise ValueError(f"{key} must be {kind}, got {text.strip()!r}") from None
    missing = [k for k in _REQUIRED[name] if k not in constants]
    if missing:
        raise ValueError(
            f"rule {name!r} needs {', '.join(f'{k}=...' for k in missing)}, e.g. {_EXAMPLE[name]}"
        )
    return name, constants


def check_sync(spec: str) -> str:
    """``spec`` parsed and its rule built (each constant in its range), else ValueError; the
    spec back."""
    name, constants = parse_sync(spec)
    try:
        _build(name, constants, warmup_steps=0, b1=0.9, r=0.0, weight_lr_power=2.0)
    except (TypeError, ValueError) as error:
        raise ValueError(f"rule {name!r}: {error}") from None
    return spec


def _build(name, constants, *, warmup_steps, b1, r, weight_lr_power):
    kwargs = dict(constants)
    if name != "constant":
        kwargs.setdefault("warmup_steps", warmup_steps)
    if name in ("schedule_free_qsr", "averaging_window"):
        kwargs.update(r=r, weight_lr_power=weight_lr_power)
    if name == "schedule_free_qsr":
        kwargs["b1"] = b1
    if name == "inverse_lr":
        return sync_rules.inverse_lr(**kwargs)
    kind = {
        "constant": sync_rules.Constant,
        "qsr": sync_rules.QSR,
        "schedule_free_qsr": sync_rules.ScheduleFreeQSR,
        "averaging_window": sync_rules.AveragingWindow,
    }[name]
    return kind(**kwargs)


def options(config) -> dict[str, Any]:
    """``config.extra["local"]`` with its defaults filled in, checked."""
    given = dict(config.extra.get("local") or {})
    unknown = sorted(set(given) - {"workers", "sync", "plain_sgd"})
    if unknown:
        raise ValueError(
            f"extra['local'] has unknown keys {unknown} (known: workers, sync, plain_sgd)"
        )
    out = {
        "workers": given.get("workers", DEFAULT_WORKERS),
        "sync": given.get("sync", DEFAULT_SYNC),
        "plain_sgd": given.get("plain_sgd", False),
    }
    workers = out["workers"]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int in {{1, 2, 3, ...}}, got {workers!r}")
    if out["plain_sgd"] not in (True, False):
        raise ValueError(f"plain_sgd must be true or false, got {out['plain_sgd']!r}")
    return out


def workers(config) -> int:
    return options(config)["workers"]


def plain_sgd(config) -> bool:
    return bool(options(config)["plain_sgd"])


def run_lrs(config) -> np.ndarray:
    """The learning rate of every step of the run (float64): the Schedule-Free optimizer's
    ``lr`` times its warmup (AdamW, SGD) or RAdam's rectification, as its step computes it
    (DESIGN.md section 1); plain SGD's constant ``lr``."""
    steps = np.arange(config.steps, dtype=np.float64)
    if plain_sgd(config):
        return np.full(config.steps, float(config.lr))
    if config.optimizer == "radam":
        out = np.empty(config.steps)
        for t in range(config.steps):
            rho_t, rho_inf = radam_rho(t + 1, float(config.b2))
            if rho_t > 4.0:
                num = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                out[t] = math.sqrt(num / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            else:
                out[t] = 0.0 if config.silent_sgd_phase else 1.0
        return float(config.lr) * out
    if config.warmup_steps:
        sched = np.minimum((steps + 1) / config.warmup_steps, 1.0)
    else:
        sched = np.ones(config.steps)
    return float(config.lr) * sched


def rule(config):
    """The ``sf_schedules.sync`` rule of the run's ``sync`` spec (``warmup_steps``, ``b1``, ``r``
    and ``weight_lr_power`` from the run where the rule reads them)."""
    name, constants = parse_sync(options(config)["sync"])
    return _build(
        name,
        constants,
        warmup_steps=config.warmup_steps,
        b1=config.b1,
        r=config.r,
        weight_lr_power=config.weight_lr_power,
    )


def sync_steps(config) -> tuple[int, ...]:
    """The run's sync steps (1-based step counts, the last ``config.steps``)."""
    return sync_rules.sync_steps(rule(config), run_lrs(config))


def unsupported(config) -> str | None:
    """Why a local backend cannot run ``config`` (shared by both), else None."""
    try:
        opts = options(config)
    except ValueError as error:
        return str(error)
    k = opts["workers"]
    if config.optimizer == "adamc_plus" or config.inner_momentum:
        return "local steps are wired for schedulefree 1.4.1's rules: no adamc_plus, inner_momentum"
    if config.dtype not in ("float64", "float32"):
        return "local steps are compared in float64 and float32 only"
    if config.batch_size % k:
        return f"--batch-size {config.batch_size} does not split evenly over --workers {k}"
    if config.first_step or config.resume_from or config.save_to:
        return "no handoff: a local run starts at step 0 and saves no snapshot"
    if opts["plain_sgd"]:
        if config.optimizer != "sgd":
            return f"--plain-sgd needs --optimizer sgd, got {config.optimizer}"
        if config.warmup_steps:
            return "--plain-sgd runs at a constant lr: --warmup-steps must be 0"
        if parse_sync(opts["sync"])[0] in ("schedule_free_qsr", "averaging_window"):
            return (
                "--plain-sgd: the rules schedule_free_qsr and averaging_window are for "
                "Schedule-Free"
            )
    try:
        sync_steps(config)
    except (TypeError, ValueError) as error:
        return f"--sync {opts['sync']}: {error}"
    return None


def data_parallel_gap(config) -> str | None:
    """Why the local run of ``config`` follows another trajectory than the single-process
    (data-parallel) backends, or None where it is the same algorithm (see the module
    docstring)."""
    k = workers(config)
    if k == 1:
        return None
    steps = sync_steps(config)
    if len(steps) != config.steps:
        return (
            f"local steps: {k} workers average {len(steps)} times in {config.steps} steps "
            "(another algorithm than data-parallel)"
        )
    if config.optimizer != "sgd":
        return (
            f"{k} workers with a sync every step: {config.optimizer}'s second moment is each "
            "worker's own, not the whole batch's"
        )
    if config.model == "cnn":
        return f"{k} workers: BatchNorm's batch statistics are each worker's share's"
    return None


def share(config, worker: int) -> slice:
    """Worker ``worker``'s rows of a batch of ``config.batch_size``."""
    n = config.batch_size // workers(config)
    return slice(worker * n, (worker + 1) * n)


def summarize(stacked: dict[str, np.ndarray], dtype) -> tuple[dict[str, np.ndarray], float]:
    """The workers' mean of each parameter (numpy float64, cast to ``dtype``) and their spread:
    the largest over parameters of ``max|p_w - mean| / max|mean|``. ``stacked[name]`` has the
    workers along axis 0."""
    means, spread = {}, 0.0
    for name, values in stacked.items():
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=0)
        scale = max(float(np.abs(mean).max(initial=0.0)), np.finfo(np.float64).tiny)
        spread = max(spread, float(np.abs(values - mean).max(initial=0.0)) / scale)
        means[name] = mean.astype(dtype)
    return means, spread


def meta(config, worker_losses: np.ndarray, spread: list[float]) -> dict[str, Any]:
    """The local entries of a record's meta (see the module docstring)."""
    opts = options(config)
    r = rule(config)
    return {
        "workers": opts["workers"],
        "sync": opts["sync"],
        "rule": {"type": type(r).__name__, **{k: v for k, v in vars(r).items()}},
        "plain_sgd": opts["plain_sgd"],
        "sync_steps": list(sync_steps(config)),
        "worker_train_loss": np.asarray(worker_losses, np.float64).tolist(),
        "spread": [float(s) for s in spread],
    }
