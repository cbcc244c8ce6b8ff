"""ScheduleFreeWrapper against independent float64 computations.

SGD base: the wrapper is Schedule-Free SGD, so it must equal sf_torch.SGDScheduleFree and the
reference package's wrapper. AdamW (betas[0] = 0) and RMSprop (momentum 0) bases, which the
reference wrapper cannot step: against a numpy float64 implementation written here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import schedulefree
import torch
from test_torch_problem import Problem, backward, max_rel_diff, train

import sf_torch

STEPS = 200
TOL = 1e-12


def _run_wrapper(make, problem, steps, reference=False, scheduler=None):
    params = problem.params()
    opt = make(params)
    if reference:
        opt.train()
    sched = scheduler(opt) if scheduler else None
    for _ in range(steps):
        backward(problem, params)
        opt.step()
        if sched is not None:
            sched.step()
    y = [p.detach().clone() for p in params]
    x_view = None if reference else opt.eval_params()
    opt.eval()
    x = [p.detach().clone() for p in params]
    return y, x, x_view


@pytest.mark.parametrize(
    "m,wd,r,power",
    [(0.9, 0.0, 0.0, 2.0), (0.8, 0.1, 1.0, 2.0), (0.95, 0.05, 0.0, 0.0), (1.0, 0.1, 1.0, 1.0)],
)
def test_sgd_base_equals_sgd_schedulefree_and_reference_wrapper(m, wd, r, power):
    problem = Problem(seed=21)
    lr = 0.02

    def wrapped(ps):
        base = torch.optim.SGD(ps, lr=lr, momentum=0.0)
        return sf_torch.ScheduleFreeWrapper(
            base, momentum=m, weight_decay_at_y=wd, r=r, weight_lr_power=power
        )

    y, x, x_view = _run_wrapper(wrapped, problem, STEPS)
    y_sf, x_sf, _ = _run_wrapper(
        lambda ps: sf_torch.SGDScheduleFree(
            ps, lr=lr, momentum=m, weight_decay=wd, r=r, weight_lr_power=power
        ),
        problem,
        STEPS,
    )
    assert max_rel_diff(y, y_sf) <= TOL
    assert max_rel_diff(x, x_sf) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(x_view, x))

    if m < 1.0:  # the reference SGD refuses momentum 1, and so does its wrapper's test
        y_ref, x_ref, _ = _run_wrapper(
            lambda ps: schedulefree.ScheduleFreeWrapper(
                torch.optim.SGD(ps, lr=lr, momentum=0.0),
                momentum=m,
                weight_decay_at_y=wd,
                r=r,
                weight_lr_power=power,
            ),
            problem,
            STEPS,
            reference=True,
        )
        assert max_rel_diff(y, y_ref) <= TOL
        assert max_rel_diff(x, x_ref) <= TOL


def _wrapper_np(problem, steps, base_step, lrs, m, wd_y, r, power):
    """The wrapper's rule in float64 numpy; ``base_step(z, g, lr, t, state)`` moves z."""
    y = [np.array(p, dtype=np.float64) for p in problem.init]
    z = [t.copy() for t in y]
    x = [t.copy() for t in y]
    state: dict = {}
    lr_max, weight_sum = 0.0, 0.0
    for k in range(steps):
        lr = lrs[k]
        g = problem.grad_np(y)
        z = [zi - lr * wd_y * yi for zi, yi in zip(z, y)]
        z = base_step(z, g, lr, k + 1, state)
        lr_max = max(lr_max, lr)
        weight = (k + 1) ** r * lr_max**power
        weight_sum += weight
        c = weight / weight_sum
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z)]
        y = [m * xi + (1 - m) * zi for xi, zi in zip(x, z)]
    return y, x


def _adamw_np(b2, eps, wd):
    def step(z, g, lr, t, state):
        v = state.setdefault("v", [np.zeros_like(gi) for gi in g])
        out = []
        for i, (zi, gi) in enumerate(zip(z, g)):
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            denom = np.sqrt(v[i]) / np.sqrt(1 - b2**t) + eps
            out.append(zi * (1 - lr * wd) - lr * gi / denom)
        return out

    return step


def _rmsprop_np(alpha, eps, wd):
    def step(z, g, lr, t, state):
        v = state.setdefault("v", [np.zeros_like(gi) for gi in g])
        out = []
        for i, (zi, gi) in enumerate(zip(z, g)):
            gi = gi + wd * zi
            v[i] = alpha * v[i] + (1 - alpha) * gi * gi
            out.append(zi - lr * gi / (np.sqrt(v[i]) + eps))
        return out

    return step


WARMUP = 10


def _warmup(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt.base, lambda k: min(1.0, (k + 1) / WARMUP))


@pytest.mark.parametrize("wd_y,wd_z,r,power", [(0.0, 0.0, 0.0, 2.0), (0.1, 0.01, 1.0, 2.0)])
def test_adamw_base_matches_numpy(wd_y, wd_z, r, power):
    problem = Problem(seed=22)
    lr, b2, eps, m = 0.02, 0.99, 1e-8, 0.9
    y, x, x_view = _run_wrapper(
        lambda ps: sf_torch.ScheduleFreeWrapper(
            torch.optim.AdamW(ps, lr=lr, betas=(0.0, b2), eps=eps, weight_decay=wd_z),
            momentum=m,
            weight_decay_at_y=wd_y,
            r=r,
            weight_lr_power=power,
        ),
        problem,
        STEPS,
        scheduler=_warmup,
    )
    lrs = [lr * min(1.0, (k + 1) / WARMUP) for k in range(STEPS)]
    y_np, x_np = _wrapper_np(problem, STEPS, _adamw_np(b2, eps, wd_z), lrs, m, wd_y, r, power)
    assert max_rel_diff(y, y_np) <= TOL
    assert max_rel_diff(x, x_np) <= TOL
    assert max_rel_diff(x_view, x_np) <= TOL


def test_rmsprop_base_matches_numpy():
    problem = Problem(seed=23)
    # eps well above round-off: with eps 1e-6, g / (sqrt(v) + eps) acts as sign(g) on a gradient
    # that settles near 0, and 1e-16 differences flip a step (measured: 1e-3 apart at step 200)
    lr, alpha, eps, wd_z, m = 0.005, 0.95, 1e-3, 0.01, 0.85
    y, x, _ = _run_wrapper(
        lambda ps: sf_torch.ScheduleFreeWrapper(
            torch.optim.RMSprop(ps, lr=lr, alpha=alpha, eps=eps, weight_decay=wd_z),
            momentum=m,
            weight_decay_at_y=0.05,
            r=0.5,
        ),
        problem,
        STEPS,
    )
    y_np, x_np = _wrapper_np(
        problem, STEPS, _rmsprop_np(alpha, eps, wd_z), [lr] * STEPS, m, 0.05, 0.5, 2.0
    )
    assert max_rel_diff(y, y_np) <= TOL
    assert max_rel_diff(x, x_np) <= TOL


def _make_adamw_wrapper(params):
    return sf_torch.ScheduleFreeWrapper(
        torch.optim.AdamW(
            [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}],
            lr=0.02,
            betas=(0.0, 0.99),
        ),
        weight_decay_at_y=0.05,
    )


@pytest.mark.parametrize("save_in_eval", [False, True])
def test_wrapper_resume_is_bit_exact(save_in_eval):
    problem = Problem(seed=24)
    params = problem.params(torch.float32)
    opt = _make_adamw_wrapper(params)
    train(opt, problem, params, 25)
    if save_in_eval:
        opt.eval()
        opt.train()
    train(opt, problem, params, 25)
    want = [p.detach().clone() for p in params]
    want_counters = [(g["k"], g["weight_sum"], g["lr_max"]) for g in opt.param_groups]

    params = problem.params(torch.float32)
    opt = _make_adamw_wrapper(params)
    train(opt, problem, params, 25)
    if save_in_eval:
        opt.eval()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # torch's default: weights_only=True
    params = problem.params(torch.float32)
    opt = _make_adamw_wrapper(params)
    with torch.no_grad():
        for p, saved in zip(params, ckpt["params"]):
            p.copy_(saved)
    opt.load_state_dict(ckpt["opt"])
    opt.train()
    train(opt, problem, params, 25)
    assert all(torch.equal(a, b) for a, b in zip(params, want))
    assert [(g["k"], g["weight_sum"], g["lr_max"]) for g in opt.param_groups] == want_counters


def test_wrapper_modes_views_and_counters():
    problem = Problem(seed=25)
    params = problem.params()
    opt = _make_adamw_wrapper(params)
    assert opt.train_mode  # starts in train mode; eval() before any step moves nothing
    opt.eval()
    opt.eval()
    assert all(torch.equal(p, torch.from_numpy(i)) for p, i in zip(params, problem.init))
    assert not opt.sf_state and not opt.state
    opt.train()
    for _ in range(10):
        backward(problem, params)
        for p in params[2:]:
            p.grad = None  # the second group gets no gradient
        opt.step()
    assert [g["k"] for g in opt.param_groups] == [10, 10]
    assert all(p not in opt.sf_state for p in params[2:])

    # x by hand from y and z: x = (y - (1 - b1) z) / b1
    x_np = [(p.detach().numpy() - 0.1 * opt.sf_state[p]["z"].numpy()) / 0.9 for p in params[:2]] + [
        p.detach().numpy().copy() for p in params[2:]
    ]
    before = [p.detach().clone() for p in params]
    x_view = opt.eval_params()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert max_rel_diff(x_view, x_np) <= 1e-14
    opt.eval()
    opt.eval()
    assert max_rel_diff(params, x_np) <= 1e-14
    backward(problem, params)
    with pytest.raises(RuntimeError, match=r"eval mode: call optimizer\.train\(\)"):
        opt.step()
    assert max_rel_diff(params, x_np) <= 1e-14
    opt.train()
    opt.train()
    assert max_rel_diff(params, before) <= 1e-14


def test_wrapper_bad_input():
    params = Problem().params()
    base = torch.optim.SGD(params, lr=0.1)
    for kwargs, msg in [
        (dict(momentum=0.0), "momentum must be in (0, 1], got 0.0"),
        (dict(momentum=1.5), "momentum must be in (0, 1], got 1.5"),
        (dict(weight_decay_at_y=-1.0), "weight_decay_at_y must be in [0, inf), got -1.0"),
        (dict(r=-0.5), "r must be in [0, inf), got -0.5"),
        (dict(weight_lr_power=float("nan")), "weight_lr_power must be in [0, inf), got nan"),
    ]:
        with pytest.raises(ValueError) as info:
            sf_torch.ScheduleFreeWrapper(base, **kwargs)
        assert str(info.value) == msg
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        sf_torch.ScheduleFreeWrapper(params)


@pytest.mark.parametrize(
    "name,value,accepted",
    [
        ("momentum", None, "(0, 1]"),
        ("momentum", "0.9", "(0, 1]"),
        ("weight_decay_at_y", None, "[0, inf)"),
        ("r", True, "[0, inf)"),
        ("weight_lr_power", [2.0], "[0, inf)"),
    ],
)
def test_wrapper_value_that_is_no_number_is_a_type_error(name, value, accepted):
    base = torch.optim.SGD(Problem().params(), lr=0.1)
    want = f"{name} must be a real number in {accepted}, got {value!r}"
    with pytest.raises(TypeError) as info:
        sf_torch.ScheduleFreeWrapper(base, **{name: value})
    assert str(info.value) == want


_SUFFIX = "the wrapper's momentum takes its place; with both, the result is not Schedule-Free"
# name: (the base refused, the end of the message, the base it says to pass: accepted)
REFUSED_BASES = {
    "sgd_momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "param group 0 has momentum=0.9: pass SGD(momentum=0)",
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0),
    ),
    "sgd_nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, nesterov=True),
        "param group 0 has nesterov=True: pass SGD(momentum=0, nesterov=False)",
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0, nesterov=False),
    ),
    "rmsprop_momentum": (
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
        "param group 0 has momentum=0.5: pass RMSprop(momentum=0)",
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0, centered=True),
    ),
    "adam_default": (
        lambda ps: torch.optim.Adam(ps),
        "param group 0 has betas=(0.9, 0.999): pass Adam(betas=(0.0, 0.999))",
        lambda ps: torch.optim.Adam(ps, betas=(0.0, 0.999)),
    ),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, betas=(0.5, 0.99)),
        "param group 0 has betas=(0.5, 0.99): pass AdamW(betas=(0.0, 0.99))",
        lambda ps: torch.optim.AdamW(ps, betas=(0.0, 0.99)),
    ),
    "nadam": (
        lambda ps: torch.optim.NAdam(ps),
        "param group 0 has betas=(0.9, 0.999): pass NAdam(betas=(0.0, 0.999))",
        lambda ps: torch.optim.NAdam(ps, betas=(0.0, 0.999)),
    ),
    "radam": (
        lambda ps: torch.optim.RAdam(ps),
        "param group 0 has betas=(0.9, 0.999): pass RAdam(betas=(0.0, 0.999))",
        lambda ps: torch.optim.RAdam(ps, betas=(0.0, 0.999)),
    ),
    "adamax": (
        lambda ps: torch.optim.Adamax(ps),
        "param group 0 has betas=(0.9, 0.999): pass Adamax(betas=(0.0, 0.999))",
        lambda ps: torch.optim.Adamax(ps, betas=(0.0, 0.999)),
    ),
    # one group of two with momentum
    "second_group": (
        lambda ps: torch.optim.SGD(
            [{"params": ps[:2]}, {"params": ps[2:], "momentum": 0.9}], lr=0.1
        ),
        "param group 1 has momentum=0.9: pass SGD(momentum=0)",
        lambda ps: torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "momentum": 0}], lr=0.1),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BASES))
def test_a_base_with_momentum_of_its_own_is_refused_and_the_fix_accepted(case):
    refused, what, fixed = REFUSED_BASES[case]
    with pytest.raises(ValueError) as info:
        sf_torch.ScheduleFreeWrapper(refused(Problem().params()))
    assert str(info.value) == f"base_optimizer must have its own momentum off ({_SUFFIX}): {what}"
    # what the message says to pass instead is accepted, and steps
    problem = Problem(seed=26)
    params = problem.params()
    opt = sf_torch.ScheduleFreeWrapper(fixed(params))
    train(opt, problem, params, 3)
    assert all(g["k"] == 3 for g in opt.param_groups)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
        lambda ps: torch.optim.Adadelta(ps),
        lambda ps: torch.optim.Rprop(ps, lr=0.01),
    ],
    ids=["Adagrad", "Adadelta", "Rprop"],
)
def test_a_base_without_momentum_keys_is_accepted(make):
    """(A control: bases that have no momentum to turn off are left alone.)"""
    problem = Problem(seed=27)
    params = problem.params()
    opt = sf_torch.ScheduleFreeWrapper(make(params))
    train(opt, problem, params, 3)
    assert [g["k"] for g in opt.param_groups] == [3]


def test_add_param_group_refuses_momentum_before_adding():
    params = Problem().params()
    opt = sf_torch.ScheduleFreeWrapper(torch.optim.SGD(params[:2], lr=0.1))
    for group, what in [
        ({"params": params[2:3], "momentum": 0.9}, "momentum=0.9: pass SGD(momentum=0)"),
        (
            {"params": params[2:3], "momentum": 0.9, "nesterov": True},
            "nesterov=True: pass SGD(momentum=0, nesterov=False)",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            opt.add_param_group(group)
        assert str(info.value).endswith(f"param group 1 has {what}")
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:3], "lr": 0.05})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["k"] == 0

    adam = sf_torch.ScheduleFreeWrapper(torch.optim.Adam(params[:2], betas=(0.0, 0.99)))
    with pytest.raises(
        ValueError, match=r"betas=\(0\.9, 0\.99\): pass Adam\(betas=\(0\.0, 0\.99\)\)"
    ):
        adam.add_param_group({"params": params[2:3], "betas": (0.9, 0.99)})
    assert len(adam.param_groups) == 1
    adam.add_param_group({"params": params[2:3], "betas": (0.0, 0.9)})
    assert len(adam.param_groups) == 2
