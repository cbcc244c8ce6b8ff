"""A seeded float64 test problem and a torch-reference runner, shared by the sf_optax tests.

Gradients come from numpy (not from either framework's autodiff), so a comparison between
sf_optax and the `schedulefree` reference measures the optimizers and nothing else.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"w": (6, 4), "b": (4,), "s": ()}


class Problem:
    """f(t) = sum over tensors of 0.5 (t-c)' M (t-c) + 0.1 sum log cosh(t), plus seeded noise."""

    def __init__(self, seed: int = 0, noise: float = 0.1):
        rng = np.random.default_rng(seed)
        self.init = {k: rng.normal(size=s) for k, s in SHAPES.items()}
        self.centers = {k: rng.normal(size=s) for k, s in SHAPES.items()}
        self.mats = {}
        for k, s in SHAPES.items():
            n = int(np.prod(s))
            q, _ = np.linalg.qr(rng.normal(size=(n, n)))
            self.mats[k] = q @ np.diag(rng.uniform(0.1, 1.0, size=n)) @ q.T
        self.noise = noise
        self.seed = seed

    def grads(self, params: dict, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        out = {}
        for k, s in SHAPES.items():
            t = np.asarray(params[k], dtype=np.float64)
            g = self.mats[k] @ (t - self.centers[k]).reshape(-1)
            g = g.reshape(s) + 0.1 * np.tanh(t) + self.noise * rng.normal(size=s)
            out[k] = g
        return out


def max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b| (b is the reference)."""
    worst = 0.0
    for k in b:
        ref = np.asarray(b[k], dtype=np.float64)
        diff = np.abs(np.asarray(a[k], dtype=np.float64) - ref).max()
        worst = max(worst, float(diff / max(np.abs(ref).max(), 1e-300)))
    return worst


def run_optax(tx, problem: Problem, steps: int):
    """Runs an optax transformation with a jitted step from the problem's init; returns the
    params (y) and the optimizer state after ``steps``."""
    import jax
    import jax.numpy as jnp
    import optax

    params = {k: jnp.asarray(v) for k, v in problem.init.items()}
    state = tx.init(params)

    @jax.jit
    def apply(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(steps):
        params, state = apply(problem.grads(params, step), state, params)
    return params, state


def run_reference(cls, problem: Problem, steps: int, groups=None, **kwargs):
    """Runs a `schedulefree` reference class; returns (y, x) as numpy dicts after `steps`.
    ``groups``: optional list of (param names, group options) for the reference's param
    groups (default: one group of every param)."""
    import torch

    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in problem.init.items()}
    if groups is None:
        opt = cls(list(params.values()), **kwargs)
    else:
        param_groups = [{"params": [params[n] for n in names], **opts} for names, opts in groups]
        opt = cls(param_groups, **kwargs)
    opt.train()
    for step in range(steps):
        grads = problem.grads({k: p.numpy() for k, p in params.items()}, step)
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
    y = {k: p.numpy().copy() for k, p in params.items()}
    opt.eval()
    x = {k: p.numpy().copy() for k, p in params.items()}
    return y, x
