"""The random problem the torch tests train on, and the helpers that run and compare optimizers.

A least-squares fit over several tensors of different shapes, coupled through one residual:
``loss(p) = 0.5 / m * || sum_i A_i vec(p_i) - b ||^2``, whose gradient ``A_i^T r / m`` is also
given in numpy so that float64 re-implementations need no torch. The test at the bottom checks
that the two gradients agree.
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = [(8, 5), (5,), (3, 4, 2), (1,), (6, 1, 3)]


class Problem:
    def __init__(self, seed: int = 0, shapes=SHAPES, rows: int = 40):
        rng = np.random.default_rng(seed)
        self.shapes = [tuple(s) for s in shapes]
        self.rows = rows
        self.A = [rng.standard_normal((rows, int(np.prod(s)))) for s in self.shapes]
        self.b = rng.standard_normal(rows)
        self.init = [rng.standard_normal(s) for s in self.shapes]
        self._torch: dict = {}

    def _tensors(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._torch:
            # float64 -> dtype in one rounding, as torch.tensor would do
            self._torch[key] = (
                [torch.from_numpy(A).to(device=device, dtype=dtype) for A in self.A],
                torch.from_numpy(self.b).to(device=device, dtype=dtype),
            )
        return self._torch[key]

    def params(self, dtype=torch.float64, device="cpu") -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.tensor(p, dtype=dtype, device=device)) for p in self.init]

    def loss(self, params) -> torch.Tensor:
        """The loss in the params' dtype; float32 for 16-bit params (grads still 16-bit)."""
        dtype = params[0].dtype
        if dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        As, b = self._tensors(dtype, params[0].device)
        r = -b
        for A, p in zip(As, params):
            r = r + A @ p.reshape(-1).to(dtype)
        return 0.5 * (r * r).sum() / self.rows

    def loss_np(self, params_np) -> float:
        r = sum(A @ p.reshape(-1) for A, p in zip(self.A, params_np)) - self.b
        return float(0.5 * r @ r / self.rows)

    def grad_np(self, params_np) -> list[np.ndarray]:
        r = sum(A @ p.reshape(-1) for A, p in zip(self.A, params_np)) - self.b
        return [(A.T @ r / self.rows).reshape(s) for A, s in zip(self.A, self.shapes)]


def backward(problem: Problem, params) -> None:
    for p in params:
        p.grad = None
    problem.loss(params).backward()


def train(opt, problem: Problem, params, steps: int) -> None:
    """``steps`` optimizer steps on the problem's loss."""
    for _ in range(steps):
        backward(problem, params)
        opt.step()


def run(make_opt, problem: Problem, steps: int, dtype=torch.float64, reference=False):
    """Train fresh params; return (y, x): the params after training and after ``eval()``."""
    params = problem.params(dtype)
    opt = make_opt(params)
    if reference:
        opt.train()  # the schedulefree classes start in eval mode
    train(opt, problem, params, steps)
    y = [p.detach().clone() for p in params]
    opt.eval()
    x = [p.detach().clone() for p in params]
    return y, x


def max_rel_diff(got, want) -> float:
    """max over tensors of max|got - want| / max|want| (computed in float64)."""
    worst = 0.0
    for g, w in zip(got, want):
        g = torch.as_tensor(g).double().cpu()
        w = torch.as_tensor(w).double().cpu()
        scale = w.abs().max().item() or 1.0
        worst = max(worst, (g - w).abs().max().item() / scale)
    return worst


def test_problem_gradient_matches_numpy():
    problem = Problem(seed=3)
    params = problem.params()
    backward(problem, params)
    want = problem.grad_np([np.array(p) for p in problem.init])
    assert max_rel_diff([p.grad for p in params], want) < 1e-14
