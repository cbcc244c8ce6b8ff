"""sf_torch against the ``schedulefree`` reference classes, float64, 200 steps.

Passes when the max relative difference (inf-norm per tensor) is <= 1e-12 at y (params in
train mode) and at x (after ``eval()``), for every hyperparameter combination below, with the
loop and the foreach step. The fused kernel's share of this is in
test_torch_fused_interpreter.py.
"""

from __future__ import annotations

import itertools

import pytest
import schedulefree
import torch
from test_torch_problem import Problem, backward, max_rel_diff, run

import sf_torch

TOL = 1e-12
STEPS = 200

# Full product of the averaging knobs; betas/momentum and lr cycle through it.
_KNOBS = list(itertools.product((0, 10), (0.0, 1.0), (0.0, 2.0), (0.0, 0.1)))
_BETAS = [(0.9, 0.999), (0.5, 0.9), (0.95, 0.0), (1.0, 0.99)]
_MOMENTA = [0.9, 0.5, 0.99, 0.75]
_LRS = [0.01, 0.05]

ADAMW_CASES = [
    dict(
        lr=_LRS[i % 2],
        betas=_BETAS[i % 4],
        warmup_steps=w,
        r=r,
        weight_lr_power=p,
        weight_decay=wd,
    )
    for i, (w, r, p, wd) in enumerate(_KNOBS)
]
SGD_CASES = [
    dict(
        lr=_LRS[i % 2],
        momentum=_MOMENTA[i % 4],
        warmup_steps=w,
        r=r,
        weight_lr_power=p,
        weight_decay=wd,
    )
    for i, (w, r, p, wd) in enumerate(_KNOBS)
]
RADAM_CASES = [
    dict(
        lr=_LRS[i % 2],
        betas=_BETAS[i % 3],
        silent_sgd_phase=silent,
        r=r,
        weight_lr_power=p,
        weight_decay=wd,
    )
    for i, (silent, r, p, wd) in enumerate(
        itertools.product((True, False), (0.0, 1.0), (0.0, 2.0), (0.0, 0.1))
    )
]
CASES = (
    [("adamw", kw) for kw in ADAMW_CASES]
    + [("sgd", kw) for kw in SGD_CASES]
    + [("radam", kw) for kw in RADAM_CASES]
)
CLASSES = {
    "adamw": (sf_torch.AdamWScheduleFree, schedulefree.AdamWScheduleFree),
    "sgd": (sf_torch.SGDScheduleFree, schedulefree.SGDScheduleFree),
    "radam": (sf_torch.RAdamScheduleFree, schedulefree.RAdamScheduleFree),
}


def _id(case):
    kind, kw = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_reference_loop_and_foreach(case):
    kind, kw = case
    ours, ref = CLASSES[kind]
    problem = Problem(seed=len(_id(case)))
    y_ref, x_ref = run(lambda ps: ref(ps, **kw), problem, STEPS, reference=True)
    for foreach in (False, True):
        y, x = run(lambda ps, f=foreach: ours(ps, foreach=f, fused=False, **kw), problem, STEPS)
        assert max_rel_diff(y, y_ref) <= TOL, (foreach, "y")
        assert max_rel_diff(x, x_ref) <= TOL, (foreach, "x")


def _groups(params, kind):
    """Three groups with their own lr and decay, one param left without grads, one group empty."""
    extra = {"betas": (0.8, 0.99)} if kind != "sgd" else {"momentum": 0.8}
    return [
        {"params": params[:2], "lr": 0.02, "weight_decay": 0.0},
        {"params": params[2:4], "lr": 0.005, "weight_decay": 0.2, **extra},
        {"params": [params[4]]},
        {"params": []},
    ]


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups_no_grad_and_empty_group_match_reference(kind, foreach):
    ours, ref = CLASSES[kind]
    defaults = dict(lr=0.01, weight_decay=0.05, r=1.0)
    if kind != "radam":
        defaults["warmup_steps"] = 5
    problem = Problem(seed=7)
    results = []
    for cls, extra in ((ref, {}), (ours, dict(foreach=foreach))):
        params = problem.params()
        opt = cls(_groups(params, kind), **defaults, **extra)
        opt.train()
        for step in range(60):
            backward(problem, params)
            params[3].grad = None  # never gets a gradient: no state, never moves
            if step % 3 == 0:
                params[4].grad = None  # sometimes skipped
            opt.step()
        y = [p.detach().clone() for p in params]
        counters = [(g["k"], g["weight_sum"], g["lr_max"]) for g in opt.param_groups]
        opt.eval()
        results.append((y, [p.detach().clone() for p in params], counters, opt))
    (y_ref, x_ref, c_ref, opt_ref), (y, x, c, opt) = results
    assert max_rel_diff(y, y_ref) <= TOL
    assert max_rel_diff(x, x_ref) <= TOL
    assert torch.equal(y[3], torch.tensor(problem.init[3]))
    assert opt.state.get(opt.param_groups[1]["params"][1]) is None
    # Every group, even the empty one, counted 60 steps (the reference's lr_max starts at -1).
    assert [k for k, _, _ in c] == [k for k, _, _ in c_ref] == [60] * 4
    for (_, ws, lm), (_, ws_ref, lm_ref) in zip(c, c_ref):
        assert ws == pytest.approx(ws_ref, rel=1e-15) and lm == lm_ref


def test_cpu_default_is_the_loop_and_chunked_foreach_matches_it(monkeypatch):
    # foreach=None picks the loop for CPU params (as torch's optimizers do); the multi-tensor
    # path cut into chunks (here of 40 elements, so most tensors are a chunk of their own and
    # the small ones share) steps exactly like the reference's foreach, chunk by chunk.
    from sf_torch import dispatch, rule

    problem = Problem(seed=8, shapes=[(6, 5), (7,), (2, 3, 2), (3,), (40,), (50,)])
    params = problem.params()
    grads = [torch.ones_like(p) for p in params]
    assert dispatch.choose_impl(params, grads, [None] * 6, None, None) == "loop"
    assert dispatch.choose_impl(params, grads, [None] * 6, True, None) == "foreach"

    calls = []
    chunk = rule.update_foreach_chunk
    monkeypatch.setattr(rule, "FOREACH_CHUNK", 40)
    monkeypatch.setattr(
        rule, "update_foreach_chunk", lambda *a: (calls.append(len(a[0])), chunk(*a))
    )
    kw = dict(lr=0.02, warmup_steps=3, weight_decay=0.1)
    y_ref, x_ref = run(
        lambda ps: schedulefree.AdamWScheduleFree(ps, foreach=True, **kw),
        problem,
        30,
        reference=True,
    )
    y, x = run(lambda ps: sf_torch.AdamWScheduleFree(ps, foreach=True, **kw), problem, 30)
    assert calls[:4] == [2, 2, 1, 1]  # (30+7) | (12+3) | 40 | 50 elements
    assert max_rel_diff(y, y_ref) == 0.0 and max_rel_diff(x, x_ref) == 0.0
