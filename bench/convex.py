"""Schedule-Free SGD against SGD with schedules on a convex problem, beside the convex bounds.

    python -m bench.convex [--size tiny|full] [--out reports/convex] [--trajectories]

Problem: multinomial (10-class) logistic regression on scikit-learn's 8x8 digits, the training
three quarters of ``parity.data``'s split (pixels / 16, plus a constant 1 for the bias):

    f(W) = mean_i CE(a_i^T W, y_i) + (lam / 2) ||W||_F^2,    W in R^{65 x 10},  lam = 1e-3.

The 1347 training images are linearly separable (unregularised, the logistic loss decreases
forever along a separating direction, so there is no minimiser and no finite D); with ``lam`` f
is lam-strongly convex and ``x* = W*`` is unique. ``f*`` is computed once per process by damped
Newton in float64 (the Hessian is only 650 x 650) to a gradient norm near round-off.

Runs (every run starts at W = 0 and sees the same seeded minibatches, in both frameworks, all
in float64): for each learning rate of one log-spaced sweep,

- SF-SGD: ``sf_optax.sgd`` / ``sf_torch.SGDScheduleFree`` (b1 0.9, constant lr), one run of T
  steps evaluated at ``x`` (``sf_optax.eval_params`` / ``optimizer.eval_params()``);
- SGD+constant and SGD+sqrt (``sf_schedules.constant`` / ``sqrt``): one run of T steps;
- SGD+cosine and SGD+WSD (``sf_schedules.cosine`` / ``wsd``, 20% linear cooldown): one run per
  horizon h in (T/4, T/2, T) with ``total_steps = h``;

with ``optax.sgd`` + ``sf_optax.schedules.to_optax`` and ``torch.optim.SGD`` +
``sf_torch.schedules.scheduler``. The JAX runs go in a child process (``jax_enable_x64`` must be
set before jax computes anything, and must not leak into the caller's process), vmapped over
the sweep (:func:`train_jax`); it runs beside the torch runs. At each horizon
every method reports the lr of its sweep with the lowest train objective there. The full size
also tries Schedule-Free variants (b1 0.95 and 0.98; 5% warmup) with the same sweep. Sizes:
``full`` T = 2000, batch 32, lrs 0.25 .. 8 (x2); ``tiny`` (the test) T = 160, batch 16, lrs
0.5, 1, 2.

Bounds (``sf_schedules``). They bound the expected suboptimality; the check that every run
lies below its bound is of one sampled path, and it holds with a wide margin.

- G. For one sample, the cross-entropy gradient is ``a_i (p_i - e_{y_i})^T``, of Frobenius norm
  ``||a_i|| ||p_i - e_{y_i}||``, and ``||p - e_y||^2 = (1-p_y)^2 + sum_{k!=y} p_k^2
  <= (1-p_y)^2 + (sum_{k!=y} p_k)^2 = 2 (1-p_y)^2 <= 2``. A minibatch mean plus ``lam W`` is
  therefore at most ``sqrt(2) max_i ||a_i|| + lam ||W||`` in norm. With R the largest ||W|| at
  which any run took a gradient or ended (the theorems also read a gradient at the last
  point), ``G = sqrt(2) max_i ||a_i|| + lam R`` bounds every stochastic gradient that could
  be drawn at any point a run visited. D = ||W_0 - W*|| = ||W*||.
- SGD (any schedule): ``last_iterate_bound``; the iterate after n updates reads the lrs of
  updates 0 .. n. Cosine and WSD end at lr 0, so at their horizon that next lr is 0 and the
  theorem, which needs it > 0 but never applies it, is evaluated with the best positive value
  of a geometric grid (``FREE_LR_GRID``) in its place.
- SF-SGD (constant lr, any b1): ``schedule_free_optimizer_bound``, the theorem of Defazio et
  al. for the run restarted at the first z after an update (the optimizer's ``x`` leaves the
  initial point out of its average). With warmup the averaging weights lag the lrs by one step
  and that theorem does not apply: those runs get no bound.
- Bound-optimal lrs: ``optimal_base_lr`` for the schedules, a fine log grid for SF.

Outputs under ``--out``: ``results.json`` (every run's suboptimality curve in both frameworks,
test accuracy, bound; the best per method and horizon; the bound-predicted and measured
orderings), ``table.md`` and ``convex.png`` (left: the measured curves of the runs that are
best at T; right: the bounds of the same runs, and dashed, of the same schedules at their
bound-optimal lr); ``trajectories.npz`` (every evaluated W, both
frameworks, and the norms at every gradient) with ``--trajectories``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import sf_schedules
from parity import data as parity_data

ROOT = Path(__file__).resolve().parents[1]
LAM = 1e-3
CLASSES = 10
COOLDOWN_FRACTION = 0.2
KINDS = ("sf", "cosine", "wsd", "constant", "sqrt")
HORIZON_KINDS = ("cosine", "wsd")  # the schedule is told its length: one run per horizon


@dataclass(frozen=True)
class Method:
    """A row of the table: an optimizer kind and, for Schedule-Free, its b1 and warmup."""

    label: str
    kind: str
    b1: float = 0.9
    warmup_fraction: float = 0.0


@dataclass(frozen=True)
class Size:
    """Steps T (horizons T/4, T/2, T), batch size, evaluation spacing and the lr sweep."""

    steps: int
    batch: int
    eval_every: int
    lrs: tuple[float, ...]
    variants: tuple[Method, ...]


METHODS = (
    Method("SF-SGD", "sf"),
    Method("SGD+cosine", "cosine"),
    Method("SGD+WSD", "wsd"),
    Method("SGD+constant", "constant"),
    Method("SGD+sqrt", "sqrt"),
)
SF_VARIANTS = (
    Method("SF-SGD b1=0.95", "sf", b1=0.95),
    Method("SF-SGD b1=0.98", "sf", b1=0.98),
    Method("SF-SGD warmup 5%", "sf", warmup_fraction=0.05),
)

SIZES = {
    "tiny": Size(160, 16, 10, (0.5, 1.0, 2.0), (SF_VARIANTS[2],)),
    "full": Size(2000, 32, 20, (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), SF_VARIANTS),
}


def horizons(size: Size) -> tuple[int, int, int]:
    return size.steps // 4, size.steps // 2, size.steps


# ---------------------------------------------------------------------------------------------
# The problem and its optimum (numpy, float64)


@dataclass(frozen=True)
class Problem:
    """Features with a trailing 1 (bias), labels, and the L2 weight ``lam``."""

    train_a: np.ndarray
    train_y: np.ndarray
    test_a: np.ndarray
    test_y: np.ndarray
    lam: float


@functools.lru_cache(maxsize=2)
def load_problem(seed: int = 0) -> Problem:
    """The digits split of ``parity.data`` (seeded, stratified 75/25), float64."""
    d = parity_data.load("mlp", seed, 1, "float64")

    def with_bias(x):
        return np.hstack([x, np.ones((len(x), 1))])

    return Problem(
        with_bias(d.train_inputs),
        d.train_labels.astype(np.int64),
        with_bias(d.eval_inputs),
        d.eval_labels.astype(np.int64),
        LAM,
    )


def _probabilities(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = a @ w
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def objective(problem: Problem, w: np.ndarray) -> np.ndarray:
    """f(W) for one W of shape (65, 10) or a stack (..., 65, 10) of them."""
    z = problem.train_a @ w
    top = z.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(axis=-1))
    labels = np.broadcast_to(problem.train_y[:, None], z.shape[:-1] + (1,))
    picked = np.take_along_axis(z, labels, axis=-1)[..., 0]
    return (lse - picked).mean(axis=-1) + 0.5 * problem.lam * (w * w).sum(axis=(-2, -1))


def batch_gradient(problem: Problem, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Gradient of the mean cross-entropy over ``rows`` (all when None) plus ``lam W``."""
    a = problem.train_a if rows is None else problem.train_a[rows]
    y = problem.train_y if rows is None else problem.train_y[rows]
    p = _probabilities(a, w)
    p[np.arange(len(y)), y] -= 1.0
    return a.T @ p / len(y) + problem.lam * w


def _hessian(problem: Problem, w: np.ndarray) -> np.ndarray:
    """``mean_i (a_i a_i^T) kron (diag p_i - p_i p_i^T) + lam I``, as a (650, 650) matrix."""
    a = problem.train_a
    n, d = a.shape
    p = _probabilities(a, w)
    s = p[:, :, None] * np.eye(CLASSES) - p[:, :, None] * p[:, None, :]
    h = (a.T @ (a[:, :, None, None] * s[:, None]).reshape(n, -1)) / n  # (d, d*C*C)
    h = h.reshape(d, d, CLASSES, CLASSES).transpose(0, 2, 1, 3).reshape(d * CLASSES, -1)
    return h + problem.lam * np.eye(d * CLASSES)


@dataclass(frozen=True)
class Optimum:
    """W*, f*, the gradient norm at W*, and the largest Hessian eigenvalue there (L*)."""

    w: np.ndarray
    f: float
    grad_norm: float
    newton_steps: int
    curvature: float


@functools.lru_cache(maxsize=2)
def optimum(seed: int = 0) -> Optimum:
    """W* and f* by damped Newton from W = 0 (Armijo backtracking; f is lam-strongly convex,
    so the full step is taken near W* and the convergence is quadratic)."""
    problem = load_problem(seed)
    shape = (problem.train_a.shape[1], CLASSES)
    w = np.zeros(shape)
    f = float(objective(problem, w))
    newton_steps = 0
    while newton_steps < 100:
        g = batch_gradient(problem, w)
        step = np.linalg.solve(_hessian(problem, w), g.ravel()).reshape(shape)
        decrement = float((g * step).sum())  # f - f* ~ decrement / 2 near W*
        if decrement < 1e-28:
            break
        t = 1.0
        f_new = float(objective(problem, w - step))
        while f_new > f - 0.25 * t * decrement and t > 1e-10:
            t *= 0.5
            f_new = float(objective(problem, w - t * step))
        if f_new > f:  # round-off floor: no step decreases f any more
            break
        w, f = w - t * step, f_new
        newton_steps += 1
    curvature = float(np.linalg.eigvalsh(_hessian(problem, w))[-1])
    return Optimum(w, f, float(np.linalg.norm(batch_gradient(problem, w))), newton_steps, curvature)


def gradient_bound(problem: Problem, radius: float) -> float:
    """``sqrt(2) max_i ||a_i|| + lam * radius``: bounds the norm of every minibatch gradient
    at any W with ``||W|| <= radius`` (derivation in the module docstring)."""
    return math.sqrt(2.0) * float(np.linalg.norm(problem.train_a, axis=1).max()) + (
        problem.lam * radius
    )


def batch_indices(n: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """(steps, batch) row indices: each epoch a seeded permutation, cut into full batches."""
    per_epoch = n // batch
    rng = np.random.default_rng([seed, 7])
    epochs = -(-steps // per_epoch)
    chunks = [
        rng.permutation(n)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)
    ]
    return np.concatenate(chunks)[:steps]


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``steps`` updates; ``horizon`` is the schedule's total_steps (cosine,
    WSD) or None (the run serves every horizon up to ``steps``)."""

    label: str
    kind: str
    lr: float
    steps: int
    horizon: int | None
    b1: float = 0.9
    warmup_steps: int = 0

    @property
    def name(self) -> str:
        return f"{self.label} lr={self.lr:g}" + (f" T={self.horizon}" if self.horizon else "")


def run_specs(size: Size) -> list[RunSpec]:
    specs = []
    for method in METHODS + size.variants:
        warmup = round(method.warmup_fraction * size.steps)
        for lr in size.lrs:
            if method.kind in HORIZON_KINDS:
                specs += [RunSpec(method.label, method.kind, lr, h, h) for h in horizons(size)]
            else:
                specs.append(
                    RunSpec(method.label, method.kind, lr, size.steps, None, method.b1, warmup)
                )
    return specs


def schedule_of(spec: RunSpec) -> sf_schedules.Schedule:
    """The learning rate of every step: for SF the lr its z-steps take (warmup included)."""
    if spec.kind == "sf":
        return sf_schedules.constant(spec.lr, warmup_steps=spec.warmup_steps)
    if spec.kind == "cosine":
        return sf_schedules.cosine(spec.lr, spec.horizon)
    if spec.kind == "wsd":
        return sf_schedules.wsd(spec.lr, spec.horizon, cooldown_fraction=COOLDOWN_FRACTION)
    if spec.kind == "constant":
        return sf_schedules.constant(spec.lr)
    if spec.kind == "sqrt":
        return sf_schedules.sqrt(spec.lr)
    raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")


def train_torch(problem: Problem, spec: RunSpec, idx: np.ndarray, eval_every: int) -> dict:
    """One run in torch: the evaluated W after every ``eval_every`` updates ("snaps"), the
    norm of the stochastic gradient at every update ("g_norm"), and the norm of W where each
    was taken and at the end ("w_norm", one longer: the bounds also read a gradient there)."""
    import torch
    import torch.nn.functional as F

    import sf_torch
    from sf_torch.schedules import scheduler

    a = torch.as_tensor(problem.train_a)
    y = torch.as_tensor(problem.train_y)
    batches = torch.as_tensor(idx[: spec.steps])
    w = torch.zeros(a.shape[1], CLASSES, dtype=torch.float64, requires_grad=True)
    if spec.kind == "sf":
        opt = sf_torch.SGDScheduleFree(
            [w], lr=spec.lr, momentum=spec.b1, warmup_steps=spec.warmup_steps
        )
        sched = None
    else:
        opt = torch.optim.SGD([w], lr=spec.lr)
        sched = scheduler(opt, schedule_of(spec))
    w_norm = torch.empty(spec.steps + 1, dtype=torch.float64)
    g_norm = torch.empty(spec.steps, dtype=torch.float64)
    snaps = []
    for step in range(spec.steps):
        rows = batches[step]
        loss = F.cross_entropy(a[rows] @ w, y[rows]) + 0.5 * problem.lam * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            w_norm[step] = torch.linalg.vector_norm(w)
            g_norm[step] = torch.linalg.vector_norm(w.grad)
        opt.step()
        if sched is not None:
            sched.step()
        if (step + 1) % eval_every == 0:
            x = opt.eval_params()[0] if spec.kind == "sf" else w.detach().clone()
            snaps.append(x.numpy())
    w_norm[spec.steps] = torch.linalg.vector_norm(w.detach())
    return {"snaps": np.stack(snaps), "w_norm": w_norm.numpy(), "g_norm": g_norm.numpy()}


def train_jax(problem: Problem, specs: list[RunSpec], idx: np.ndarray, eval_every: int):
    """Every run in JAX, float64 (call it in a process of its own: see ``_jax_worker``).

    Two compiled programs, each vmapped over its runs, instead of one per run (a compile costs
    more than a run here): Schedule-Free with the lr, b1 and warmup traced, and SGD whose
    learning rate is ``lr * to_optax(schedule at peak 1)(count)``, the unit schedule picked by a
    traced index among those of the baselines (torch uses ``schedule(count)`` at the peak
    itself: the two lrs differ by rounding only). Every program runs T steps; a cosine or WSD
    run of horizon h < T holds lr 0 after h, so its W stays put and only its first h steps are
    kept.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    import sf_optax
    from sf_optax.schedules import to_optax

    a = jnp.asarray(problem.train_a)
    y = jnp.asarray(problem.train_y)
    lam = problem.lam
    steps = max(s.steps for s in specs)
    batches = jnp.asarray(idx[:steps].reshape(steps // eval_every, eval_every, -1))

    def loss(w, rows):
        logp = jax.nn.log_softmax(a[rows] @ w)
        ce = -jnp.mean(jnp.take_along_axis(logp, y[rows][:, None], axis=1))
        return ce + 0.5 * lam * jnp.sum(w * w)

    def trajectories(make, hparams):
        """``make(*hparams)`` gives ``(tx, view)``; every run of the batch of ``hparams``."""

        def one(*h):
            tx, view = make(*h)

            def step(carry, rows):
                w, state = carry
                g = jax.grad(loss)(w, rows)
                updates, state = tx.update(g, state, w)
                norms = (jnp.linalg.norm(w), jnp.linalg.norm(g))
                return (optax.apply_updates(w, updates), state), norms

            def chunk(carry, rows):
                carry, norms = jax.lax.scan(step, carry, rows)
                return carry, (view(carry[1], carry[0]), norms)

            w = jnp.zeros((a.shape[1], CLASSES), jnp.float64)
            (w, _), (snaps, (w_norm, g_norm)) = jax.lax.scan(chunk, (w, tx.init(w)), batches)
            return snaps, jnp.append(w_norm.ravel(), jnp.linalg.norm(w)), g_norm.ravel()

        arrays = [jnp.asarray(v) for v in zip(*hparams)]
        return [np.asarray(x) for x in jax.jit(jax.vmap(one))(*arrays)]

    def make_sf(lr, b1, warmup):
        return sf_optax.sgd(lr, b1=b1, warmup_steps=warmup), sf_optax.eval_params

    units = {}
    for s in specs:
        if s.kind != "sf" and (s.kind, s.horizon) not in units:
            unit = RunSpec(s.label, s.kind, 1.0, s.steps, s.horizon)
            units[(s.kind, s.horizon)] = (len(units), to_optax(schedule_of(unit)))
    unit_fns = [fn for _, fn in units.values()]

    def make_sgd(lr, which):
        def learning_rate(count):
            return lr * jnp.stack([fn(count) for fn in unit_fns])[which]

        return optax.sgd(learning_rate), lambda state, w: w

    sf_specs = [s for s in specs if s.kind == "sf"]
    sgd_specs = [s for s in specs if s.kind != "sf"]
    results = {}
    if sf_specs:
        hp = [(s.lr, s.b1, s.warmup_steps) for s in sf_specs]
        for i, out in enumerate(zip(*trajectories(make_sf, hp))):
            results[sf_specs[i]] = out
    if sgd_specs:
        hp = [(s.lr, units[(s.kind, s.horizon)][0]) for s in sgd_specs]
        for i, out in enumerate(zip(*trajectories(make_sgd, hp))):
            results[sgd_specs[i]] = out
    runs = []
    for s in specs:
        snaps, w_norm, g_norm = results[s]
        runs.append(
            {
                "snaps": snaps[: s.steps // eval_every],
                "w_norm": w_norm[: s.steps + 1],
                "g_norm": g_norm[: s.steps],
            }
        )
    return runs


def _jax_worker(in_path: str, out_path: str) -> None:
    with np.load(in_path) as f:
        problem = Problem(f["train_a"], f["train_y"], f["test_a"], f["test_y"], float(f["lam"]))
        idx, eval_every = f["idx"], int(f["eval_every"])
        specs = [RunSpec(**s) for s in json.loads(str(f["specs"]))]
    runs = train_jax(problem, specs, idx, eval_every)
    arrays = {f"{i}/{key}": value for i, run in enumerate(runs) for key, value in run.items()}
    np.savez(out_path, **arrays)


def _start_jax(
    problem: Problem, specs: list[RunSpec], idx: np.ndarray, eval_every: int, workdir: str
) -> tuple[subprocess.Popen, str]:
    in_path, out_path = f"{workdir}/jax_in.npz", f"{workdir}/jax_out.npz"
    np.savez(
        in_path,
        train_a=problem.train_a,
        train_y=problem.train_y,
        test_a=problem.test_a,
        test_y=problem.test_y,
        lam=problem.lam,
        idx=idx,
        eval_every=eval_every,
        specs=json.dumps([asdict(s) for s in specs]),
    )
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "bench.convex", "--jax-worker", in_path, out_path]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, out_path


def _finish_jax(proc: subprocess.Popen, out_path: str, n: int) -> list[dict]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the JAX worker failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    with np.load(out_path) as f:
        return [{key: f[f"{i}/{key}"] for key in ("snaps", "w_norm", "g_norm")} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Analysis


def eval_steps(spec: RunSpec, eval_every: int) -> np.ndarray:
    """Update counts at which a run was evaluated."""
    return np.arange(eval_every, spec.steps + 1, eval_every)


# A schedule that ends at lr 0 (cosine, WSD) leaves the theorem's last lr free (it never moves
# the bounded iterate but must be > 0): the best of these multiples of the peak lr is used.
FREE_LR_GRID = 2.0 ** -np.arange(0, 31)


def last_iterate_bounds(
    schedule: sf_schedules.Schedule, steps: np.ndarray, D: float, G: float
) -> np.ndarray:
    """Theorem 1 (``sf_schedules.last_iterate_bound``) for SGD's iterate after each of
    ``steps`` updates: it reads the lrs of those updates and the next one."""
    lrs = schedule.values(int(steps.max()) + 1)
    out = sf_schedules.last_iterate_bound(lrs, D, G)[steps]
    for i, n in enumerate(steps):
        if lrs[n] == 0:
            free = [np.append(lrs[:n], e * schedule.peak_lr) for e in FREE_LR_GRID]
            out[i] = min(sf_schedules.last_iterate_bound(x, D, G)[n] for x in free)
    return out


def run_bound(spec: RunSpec, steps: np.ndarray, D: float, G: float) -> np.ndarray | None:
    """The bound at each of ``steps`` (update counts), or None where no theorem applies (SF
    with warmup: its averaging weights lag its lrs by one step)."""
    if spec.kind == "sf":
        if spec.warmup_steps:
            return None
        b = sf_schedules.schedule_free_optimizer_bound(spec.lr, spec.steps, D, G)
        return b[steps - 1]
    return last_iterate_bounds(schedule_of(spec), steps, D, G)


def theory_lr(method: Method, horizon: int, D: float, G: float) -> tuple[float, float]:
    """The lr that minimises the method's bound at ``horizon`` updates, and that bound.

    Schedules: ``sf_schedules.optimal_base_lr`` of the unit schedule (its free last lr, where
    the schedule ends at 0, taken from FREE_LR_GRID); SF: the best of a fine log grid.
    """
    if method.kind == "sf":
        grid = np.geomspace(1e-3, 1e3, 1201)
        b = [sf_schedules.schedule_free_optimizer_bound(float(g), horizon, D, G)[-1] for g in grid]
        i = int(np.argmin(b))
        return float(grid[i]), float(b[i])
    unit = schedule_of(RunSpec(method.label, method.kind, 1.0, horizon, horizon))
    lrs = unit.values(horizon + 1)
    shapes = [lrs] if lrs[-1] > 0 else [np.append(lrs[:-1], e) for e in FREE_LR_GRID]
    return min((sf_schedules.optimal_base_lr(x, D, G) for x in shapes), key=lambda t: t[1])


def accuracy(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (np.argmax(a @ w, axis=-1) == y).mean(axis=-1)


def analyse(
    problem: Problem,
    opt: Optimum,
    size: Size,
    specs: list[RunSpec],
    torch_runs: list[dict],
    jax_runs: list[dict],
) -> dict:
    """Suboptimality, accuracy and bounds of every run; the best per method and horizon."""
    radius = max(float(r["w_norm"].max()) for r in torch_runs + jax_runs)
    G = gradient_bound(problem, radius)
    w0 = np.zeros_like(opt.w)
    D = float(np.linalg.norm(w0 - opt.w))
    runs = []
    for spec, tr, jr in zip(specs, torch_runs, jax_runs):
        steps = eval_steps(spec, size.eval_every)
        bound = run_bound(spec, steps, D, G)
        sub_t = objective(problem, tr["snaps"]) - opt.f
        sub_j = objective(problem, jr["snaps"]) - opt.f
        scale = np.abs(tr["snaps"]).max()
        runs.append(
            {
                **asdict(spec),
                "name": spec.name,
                "eval_steps": steps.tolist(),
                "subopt": sub_t.tolist(),
                "subopt_jax": sub_j.tolist(),
                "test_acc": accuracy(problem.test_a, problem.test_y, tr["snaps"]).tolist(),
                "bound": None if bound is None else bound.tolist(),
                "max_rel_param_diff": float(np.abs(tr["snaps"] - jr["snaps"]).max() / scale),
                "max_grad_norm": float(max(tr["g_norm"].max(), jr["g_norm"].max())),
            }
        )
    labels = [m.label for m in METHODS + size.variants]
    best = {label: {} for label in labels}
    for label in labels:
        for h in horizons(size):
            cands = []
            for r in runs:
                if r["label"] == label and (r["horizon"] == h or r["horizon"] is None):
                    i = r["eval_steps"].index(h)
                    bnd = None if r["bound"] is None else r["bound"][i]
                    cands.append((r["subopt"][i], r["lr"], r["test_acc"][i], bnd, r["name"]))
            sub, lr, acc, bnd, name = min(cands)
            best[label][str(h)] = {
                "subopt": sub,
                "lr": lr,
                "test_acc": acc,
                "bound": bnd,
                "run": name,
                "bound_ratio": None if bnd is None else bnd / sub,
                "sweep": {str(c[1]): c[0] for c in cands},
                "bound_sweep": {str(c[1]): c[3] for c in cands},
            }
    theory = {
        m.label: {str(h): dict(zip(("lr", "bound"), theory_lr(m, h, D, G))) for h in horizons(size)}
        for m in METHODS
    }
    T = size.steps
    curve_steps = eval_steps(RunSpec("", "constant", 1.0, T, None), size.eval_every)
    theory_curves = {}
    for m in METHODS:
        spec = RunSpec(
            m.label,
            m.kind,
            theory[m.label][str(T)]["lr"],
            T,
            T if m.kind in HORIZON_KINDS else None,
        )
        theory_curves[m.label] = run_bound(spec, curve_steps, D, G).tolist()
    # Above 2/L* SGD does not settle into W*'s basin of contraction: round-off differences
    # between the frameworks grow instead of staying at 1e-15, so parity is summarised apart.
    stable = [r for r in runs if r["kind"] == "sf" or r["lr"] < 2 / opt.curvature]
    ordering = {}
    for h in horizons(size):
        main = [m.label for m in METHODS]
        entries = [best[m][str(h)] for m in main]
        tuned = [min(e["bound_sweep"].values()) for e in entries]
        ordering[str(h)] = {
            "measured": [m for _, m in sorted(zip([e["subopt"] for e in entries], main))],
            "bound_at_best_lr": [m for _, m in sorted(zip([e["bound"] for e in entries], main))],
            "bound_tuned_over_sweep": [m for _, m in sorted(zip(tuned, main))],
            "bound_at_optimal_lr": sorted(main, key=lambda m: theory[m][str(h)]["bound"]),
        }
    measured_ratios = [
        b / s for r in runs if r["bound"] is not None for b, s in zip(r["bound"], r["subopt"])
    ]
    return {
        "problem": {
            "n_train": int(len(problem.train_y)),
            "n_test": int(len(problem.test_y)),
            "features": int(problem.train_a.shape[1]),
            "classes": CLASSES,
            "lam": problem.lam,
            "f_star": opt.f,
            "grad_norm_at_optimum": opt.grad_norm,
            "newton_steps": opt.newton_steps,
            "L_star": opt.curvature,
            "test_acc_at_optimum": float(accuracy(problem.test_a, problem.test_y, opt.w)),
            "D": D,
            "G": G,
            "radius": radius,
            "max_feature_norm": float(np.linalg.norm(problem.train_a, axis=1).max()),
            "max_grad_norm_observed": max(r["max_grad_norm"] for r in runs),
        },
        "config": {
            **asdict(size),
            "variants": [asdict(v) for v in size.variants],
            "horizons": list(horizons(size)),
            "cooldown_fraction": COOLDOWN_FRACTION,
        },
        "runs": runs,
        "best": best,
        "ordering": ordering,
        "theory_optimal_lr": theory,
        "min_bound_ratio": min(measured_ratios),
        "theory_curves": {"eval_steps": curve_steps.tolist(), **theory_curves},
        "parity": {
            "max_rel_param_diff": max(r["max_rel_param_diff"] for r in runs),
            "max_rel_param_diff_stable": max(r["max_rel_param_diff"] for r in stable),
            "stable_lr_limit": 2 / opt.curvature,
            "runs_above_1e-10": [r["name"] for r in runs if r["max_rel_param_diff"] > 1e-10],
        },
    }


def table(results: dict) -> str:
    p = results["problem"]
    lines = [
        f"f* = {p['f_star']:.12f} (|grad f(W*)| = {p['grad_norm_at_optimum']:.1e}), "
        f"D = {p['D']:.3f}, G = {p['G']:.3f} (largest stochastic gradient seen "
        f"{p['max_grad_norm_observed']:.3f}), test accuracy at W* {p['test_acc_at_optimum']:.4f}",
        "",
        "| method | horizon | best lr | f - f* | test acc | bound | bound / measured |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, per_h in results["best"].items():
        for h, b in per_h.items():
            bound = "n/a" if b["bound"] is None else f"{b['bound']:.3g}"
            ratio = "n/a" if b["bound"] is None else f"{b['bound_ratio']:.3g}"
            lines.append(
                f"| {label} | {h} | {b['lr']:g} | {b['subopt']:.3e} | "
                f"{b['test_acc']:.4f} | {bound} | {ratio} |"
            )
    lines += [
        "",
        "Orderings, best first: measured; by the bound at the lrs that won; by the bound "
        "at the best lr of the sweep for the bound; by the bound at its optimal lr.",
        "",
        "| horizon | measured | bound, lrs that won | bound, best of sweep | bound, optimal lr |",
        "| ---: | --- | --- | --- | --- |",
    ]
    for h, o in results["ordering"].items():
        cols = ("measured", "bound_at_best_lr", "bound_tuned_over_sweep", "bound_at_optimal_lr")
        lines.append(f"| {h} | " + " | ".join(" < ".join(o[c]) for c in cols) + " |")
    lines += [
        "",
        "Bound-optimal lr (the lr that minimises the bound at the horizon) and that bound:",
        "",
        "| method | " + " | ".join(results["ordering"]) + " |",
        "| --- |" + " ---: |" * len(results["ordering"]),
    ]
    for label, per_h in results["theory_optimal_lr"].items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{t['lr']:.3g} ({t['bound']:.3g})" for t in per_h.values())
            + " |"
        )
    par = results["parity"]
    lines += [
        "",
        f"Smallest bound / measured over every evaluated point of every run: "
        f"{results['min_bound_ratio']:.3g}.",
        "",
        f"JAX vs torch, largest relative difference of the evaluated W: "
        f"{par['max_rel_param_diff_stable']:.2e} over Schedule-Free runs and SGD runs with "
        f"lr < 2/L* = {par['stable_lr_limit']:.3g}; {par['max_rel_param_diff']:.2e} over "
        f"all runs (above 1e-10: {', '.join(par['runs_above_1e-10']) or 'none'}).",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Left: measured f - f* of the runs best at T (dots: the best at each horizon). Right: the
    bounds of those runs (solid), and of the same schedules at their bound-optimal lr
    (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = results["config"]["steps"]
    runs = {r["name"]: r for r in results["runs"]}
    main = {m.label for m in METHODS}
    theory = results["theory_curves"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    for i, (label, per_h) in enumerate(results["best"].items()):
        style = {
            "color": f"C{i}",
            "lw": 1.6 if label in main else 0.9,
            "ls": "-" if label in main else ":",
        }
        r = runs[per_h[str(T)]["run"]]
        left.plot(r["eval_steps"], r["subopt"], label=f"{label} (lr {r['lr']:g})", **style)
        for h, b in per_h.items():
            left.plot(int(h), b["subopt"], "o", color=style["color"], ms=4)
        if r["bound"] is not None:
            right.plot(r["eval_steps"], r["bound"], label=f"{label} (lr {r['lr']:g})", **style)
        if label in theory:
            lr = results["theory_optimal_lr"][label][str(T)]["lr"]
            right.plot(
                theory["eval_steps"],
                theory[label],
                color=style["color"],
                ls="--",
                lw=1.2,
                label=f"{label}, bound-optimal lr {lr:.2g}",
            )
    left.set(
        yscale="log",
        xlabel="updates",
        ylabel="f(x) - f*  (train objective)",
        title="measured: the runs best at T (dots: best at each horizon)",
    )
    right.set(
        yscale="log",
        xlabel="updates",
        ylabel="bound on E f(x) - f*",
        title="convex bounds: those runs' lrs (solid), bound-optimal lr (dashed)",
    )
    left.legend(fontsize=7)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def run(size_name: str, out: Path, seed: int = 0, trajectories: bool = False) -> dict:
    """Every run in both frameworks, the analysis, and the files under ``out``."""
    if size_name not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size_name!r}")
    import torch

    size = SIZES[size_name]
    start = time.perf_counter()
    problem = load_problem(seed)
    opt = optimum(seed)
    specs = run_specs(size)
    idx = batch_indices(len(problem.train_y), size.batch, size.steps, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the JAX worker runs beside this process
    try:
        with tempfile.TemporaryDirectory() as workdir:
            proc, out_path = _start_jax(problem, specs, idx, size.eval_every, workdir)
            try:
                torch_runs = [train_torch(problem, s, idx, size.eval_every) for s in specs]
            except BaseException:
                proc.kill()
                proc.communicate()
                raise
            jax_runs = _finish_jax(proc, out_path, len(specs))
    finally:
        torch.set_num_threads(threads)
    results = analyse(problem, opt, size, specs, torch_runs, jax_runs)
    results["config"]["size"] = size_name
    results["config"]["seed"] = seed
    results["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    plot(results, out / "convex.png")
    if trajectories:
        arrays = {}
        for i, (tr, jr) in enumerate(zip(torch_runs, jax_runs)):
            for key in ("snaps", "w_norm", "g_norm"):
                arrays[f"torch/{i}/{key}"] = tr[key]
                arrays[f"jax/{i}/{key}"] = jr[key]
        np.savez_compressed(out / "trajectories.npz", idx=idx, **arrays)
    return results


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.convex", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", default="full", help="tiny (CI) or full")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "convex")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trajectories",
        action="store_true",
        help="also write every evaluated W (trajectories.npz)",
    )
    parser.add_argument("--jax-worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax_worker:
        _jax_worker(*args.jax_worker)
        return None
    results = run(args.size, args.out, args.seed, args.trajectories)
    print(table(results))
    print(f"\n{args.out}/: results.json, table.md, convex.png ({results['seconds']:.1f} s)")
    return results


if __name__ == "__main__":
    main()
