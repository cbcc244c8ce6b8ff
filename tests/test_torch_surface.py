"""schedulefree's whole surface in sf_torch, and AdamW's ``inner_momentum``, in float64.

- Every public class of schedulefree 1.4.1 has its name in sf_torch, with 1.4.1's constructor
  arguments in 1.4.1's order.
- The closure classes (params at x between steps): the same bits as 1.4.1's (loop, foreach)
  and <= 1e-12 (fused, in Triton's interpreter) after 200 steps; the ``*Reference`` /
  ``*Paper`` classes against 1.4.1's of the same names: <= 1e-12 after 200 steps.
- ``AdamWScheduleFree(inner_momentum=...)`` against upstream main's ``AdamWScheduleFree`` and
  ``AdamWScheduleFreeReference`` (``../shared/reference/schedulefree_main/``, loaded by path,
  skipped when absent) over a hyperparameter grid, loop and foreach, and against a float64
  numpy simulation written here with explicit x, y and z (runs always); the fused and
  capturable kernels through Triton's interpreter (a child process, as in
  test_torch_fused_interpreter.py).
- Checkpoints: a state dict without ``exp_avg`` (earlier versions, ``inner_momentum=0``) and one
  with it load and continue bitwise; errors for values out of range and for state without
  the buffer.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import pathlib
import sys

import interpreter_child
import numpy as np
import pytest
import schedulefree
import torch
from test_torch_problem import Problem, backward, max_rel_diff, run

import sf_torch

STEPS = 200
TOL = 1e-12
UPSTREAM = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/schedulefree_main"
_MODULES: dict = {}


def upstream(name: str):
    """Upstream main's module ``name`` (a file in UPSTREAM), imported by path; skip if absent."""
    path = UPSTREAM / f"{name}.py"
    if not path.exists():
        pytest.skip(f"upstream reference not present: {path}")
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_upstream_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


# ------------------------------------------------------------------------------- the names


def test_every_schedulefree_class_is_in_sf_torch():
    names = [n for n in dir(schedulefree) if n[0].isupper()]
    assert len(names) >= 11, names  # 1.4.1: 3 main, 3 closure, 3 reference/paper, 2 wrappers
    missing = [n for n in names if not hasattr(sf_torch, n)]
    assert not missing, missing
    for name in names:
        theirs = list(inspect.signature(getattr(schedulefree, name).__init__).parameters)
        ours = list(inspect.signature(getattr(sf_torch, name).__init__).parameters)
        if name == "ScheduleFreeWrapper":
            theirs, ours = theirs[2:], ours[2:]  # base_optimizer is positional in both
        if name == "AdamWScheduleFreeReference" or name == "AdamWScheduleFree":
            # upstream main puts inner_momentum before foreach; 1.4.1 has none
            ours = [n for n in ours if n != "inner_momentum"]
        assert ours[: len(theirs)] == theirs, (name, theirs, ours)


# --------------------------------------------------------------- closure classes vs 1.4.1


def _run_closure(make_opt, problem: Problem, steps: int, skip_grad_of=None):
    """``steps`` closure steps; returns the params (x) and the losses the steps returned."""
    params = problem.params()
    opt = make_opt(params)
    losses = []

    def closure():
        for p in params:
            p.grad = None
        loss = problem.loss(params)
        loss.backward()
        if skip_grad_of is not None:
            params[skip_grad_of].grad = None
        return loss

    for _ in range(steps):
        losses.append(float(opt.step(closure)))
    return [p.detach().clone() for p in params], losses, opt


CLOSURE_CASES = {
    "adamw": ("AdamWScheduleFreeClosure", dict(lr=0.02, warmup_steps=10, weight_decay=0.1, r=1)),
    "adamw_b": ("AdamWScheduleFreeClosure", dict(lr=0.01, betas=(0.7, 0.95), weight_lr_power=0)),
    "sgd": ("SGDScheduleFreeClosure", dict(lr=0.05, momentum=0.8, warmup_steps=5)),
    "sgd_wd": ("SGDScheduleFreeClosure", dict(lr=0.02, weight_decay=0.2, r=2.0)),
    "radam": ("RAdamScheduleFreeClosure", dict(lr=0.02, silent_sgd_phase=False, r=1.0)),
    "radam_silent": ("RAdamScheduleFreeClosure", dict(lr=0.01, weight_decay=0.05)),
}


@pytest.mark.parametrize("case", sorted(CLOSURE_CASES))
def test_closure_classes_match_schedulefree(case):
    name, kw = CLOSURE_CASES[case]
    problem = Problem(seed=7)
    x_ref, loss_ref, _ = _run_closure(
        lambda ps: getattr(schedulefree, name)(ps, **kw), problem, STEPS
    )
    for flags in (dict(foreach=False), dict(foreach=True)):
        x, losses, opt = _run_closure(
            lambda ps, flags=flags: getattr(sf_torch, name)(ps, **kw, **flags), problem, STEPS
        )
        # The loop and foreach take 1.4.1's order of operations: the same bits (also where the
        # problem amplifies round-off: adamw_b, radam_silent).
        assert max_rel_diff(x, x_ref) == 0.0, (case, flags)
        assert losses == loss_ref
        # The params hold x: eval_params() is a copy of them, and eval()/train() change nothing.
        assert all(torch.equal(a, b) for a, b in zip(opt.eval_params(), x))
        opt.train()
        opt.eval()
        assert all(torch.equal(a, p) for a, p in zip(x, opt.param_groups[0]["params"]))


def test_closure_class_positional_order_and_param_without_gradient():
    problem = Problem(seed=3)
    # 1.4.1's SGDScheduleFreeClosure takes lr, weight_decay, momentum positionally.
    x_ref, _, _ = _run_closure(
        lambda ps: schedulefree.SGDScheduleFreeClosure(ps, 0.03, 0.1, 0.7), problem, 30
    )
    x, _, _ = _run_closure(
        lambda ps: sf_torch.SGDScheduleFreeClosure(ps, 0.03, 0.1, 0.7), problem, 30
    )
    assert max_rel_diff(x, x_ref) <= TOL
    # A param without a gradient stays where it is (1.4.1 leaves it at y, extrapolating it
    # again each step: a difference on purpose, see sf_torch.closure).
    start = problem.params()
    x, _, opt = _run_closure(
        lambda ps: sf_torch.AdamWScheduleFreeClosure(ps, lr=0.02), problem, 20, 1
    )
    assert torch.equal(x[1], start[1].detach())
    assert "z" not in opt.state[opt.param_groups[0]["params"][1]]


def test_closure_class_errors_and_checkpoint():
    problem = Problem(seed=1)
    params = problem.params()
    opt = sf_torch.AdamWScheduleFreeClosure(params, lr=0.02)
    backward(problem, params)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="not available"):
        opt.advance_scalars()
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(lambda: problem.loss(params))
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # nothing moved
    opt.param_groups[0]["lr"] = 0.02

    def closure():
        for p in params:
            p.grad = None
        loss = problem.loss(params)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    saved = opt.state_dict()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = sf_torch.AdamWScheduleFreeClosure(params2, lr=0.02)
    opt2.load_state_dict(saved)
    for _ in range(5):
        opt.step(closure)

    def closure2():
        for p in params2:
            p.grad = None
        loss = problem.loss(params2)
        loss.backward()
        return loss

    for _ in range(5):
        opt2.step(closure2)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert all(not g["train_mode"] for g in opt2.param_groups)


# ---------------------------------------------------------- Reference and Paper vs 1.4.1


REFERENCE_CASES = {
    "adamw_reference": (dict(lr=0.02, warmup_steps=10, weight_decay=0.1, r=1.0), {}),
    "adamw_reference_decay_at_z": (dict(lr=0.02, weight_decay=0.3, decay_at_z=True), {}),
    # b2 = 0.9 and a small lr: round-off grows by ~1e8 over the run here (1.4.1's Reference
    # against 1.4.1's AdamWScheduleFree differ by 1e-4), so only the same operations agree.
    "adamw_reference_amplifying": (
        dict(lr=0.003, betas=(0.9, 0.9), weight_decay=0.01, warmup_steps=7, r=2.0),
        {},
    ),
    "adamw_paper": (dict(lr=0.02, warmup_steps=10, weight_decay=0.1, r=1.0), {}),
    "adamw_paper_b": (dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_lr_power=1.0), {}),
    "sgd_reference": (dict(lr=0.05, momentum=0.8, warmup_steps=5, weight_decay=0.1), {}),
}
_REF_CLASS = {
    "adamw_reference": "AdamWScheduleFreeReference",
    "adamw_reference_decay_at_z": "AdamWScheduleFreeReference",
    "adamw_reference_amplifying": "AdamWScheduleFreeReference",
    "adamw_paper": "AdamWScheduleFreePaper",
    "adamw_paper_b": "AdamWScheduleFreePaper",
    "sgd_reference": "SGDScheduleFreeReference",
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_reference_and_paper_classes_match_schedulefree(case):
    kw, _ = REFERENCE_CASES[case]
    name = _REF_CLASS[case]
    problem = Problem(seed=5)
    y_ref, x_ref = run(
        lambda ps: getattr(schedulefree, name)(ps, **kw), problem, STEPS, reference=True
    )
    for flags in (dict(foreach=False), dict(foreach=True)):
        y, x = run(
            lambda ps, flags=flags: getattr(sf_torch, name)(ps, **kw, **flags), problem, STEPS
        )
        # The same operations in the same order as 1.4.1 (module docstring of
        # sf_torch.reference): the same bits.
        assert max_rel_diff(y, y_ref) == 0.0, (case, flags, "y")
        assert max_rel_diff(x, x_ref) == 0.0, (case, flags, "x")


def test_reference_checkpoint_of_schedulefree_loads():
    problem = Problem(seed=2)
    params = problem.params()
    ref = schedulefree.AdamWScheduleFreeReference(params, lr=0.02, weight_decay=0.1)
    ref.train()
    for _ in range(10):
        backward(problem, params)
        ref.step()
    ref.eval()
    mine_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    mine = sf_torch.AdamWScheduleFreeReference(mine_params, lr=0.02, weight_decay=0.1)
    mine.load_state_dict(ref.state_dict())
    assert sorted(mine.state[mine_params[0]]) == ["exp_avg_sq", "x", "y", "z"]  # eval mode
    for opt, ps in ((ref, params), (mine, mine_params)):
        opt.train()
        for _ in range(10):
            backward(problem, ps)
            opt.step()
        opt.eval()
    assert max_rel_diff(mine_params, params) == 0.0
    assert "y" not in mine.state[mine_params[0]] or not mine.param_groups[0]["train_mode"]


@pytest.mark.parametrize("base", ["sgd_momentum", "adagrad"])
def test_wrapper_reference_matches_schedulefree(base):
    def make(wrapper_cls, ps):
        if base == "sgd_momentum":  # a base with momentum: allowed by the Reference wrapper
            inner = torch.optim.SGD(ps, lr=0.01, momentum=0.5)
        else:  # (1.4.1's Reference wrapper breaks Adam: its x, y, z sit in Adam's state)
            inner = torch.optim.Adagrad(ps, lr=0.05)
        return wrapper_cls(inner, momentum=0.85, weight_decay_at_y=0.1, r=1.0)

    problem = Problem(seed=9)
    y_ref, x_ref = run(
        lambda ps: make(schedulefree.ScheduleFreeWrapperReference, ps),
        problem,
        STEPS,
        reference=True,
    )
    y, x = run(lambda ps: make(sf_torch.ScheduleFreeWrapperReference, ps), problem, STEPS)
    assert max_rel_diff(y, y_ref) == 0.0  # x stored, 1.4.1's order: the same bits
    assert max_rel_diff(x, x_ref) == 0.0
    # A checkpoint saved in eval mode resumes bitwise.
    params = problem.params()
    opt = make(sf_torch.ScheduleFreeWrapperReference, params)
    for _ in range(5):
        backward(problem, params)
        opt.step()
    opt.eval()
    saved = copy.deepcopy(opt.state_dict())  # (torch's SGD would share its momentum buffers)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(sf_torch.ScheduleFreeWrapperReference, params2)
    opt2.load_state_dict(saved)
    for o, ps in ((opt, params), (opt2, params2)):
        o.train()
        _train(o, problem, ps, 5)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    with pytest.raises(ValueError, match="momentum"):
        sf_torch.ScheduleFreeWrapper(torch.optim.SGD(problem.params(), lr=0.1, momentum=0.5))


# ------------------------------------------------------- inner_momentum: a numpy oracle


def numpy_adamw(problem: Problem, steps: int, lr, betas, eps, wd, warmup, r, wlp, im):
    """Upstream main's AdamW rule with inner momentum, written out in float64 numpy with x, y
    and z all stored (the Reference form); returns (y, x)."""
    b1, b2 = betas
    z = [np.array(p, dtype=np.float64) for p in problem.init]
    x = [a.copy() for a in z]
    y = [a.copy() for a in z]
    v = [np.zeros_like(a) for a in z]
    m = [np.zeros_like(a) for a in z]
    lr_max, weight_sum = 0.0, 0.0
    for k in range(steps):
        g = problem.grad_np(y)
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr_k = lr * sched
        lr_max = max(lr_max, lr_k)
        weight = (k + 1) ** r * lr_max**wlp
        weight_sum += weight
        c = weight / weight_sum
        for i in range(len(z)):
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            num = g[i]
            if im:
                m[i] = im * m[i] + (1 - im) * g[i]
                num = m[i] / (1 - im ** (k + 1))
            d = num / (np.sqrt(v[i] / (1 - b2 ** (k + 1))) + eps) + wd * y[i]
            z[i] = z[i] - lr_k * d
            x[i] = (1 - c) * x[i] + c * z[i]
            y[i] = b1 * x[i] + (1 - b1) * z[i]
    return y, x


GRID = [
    dict(lr=0.02, betas=(0.9, 0.999), eps=1e-8, wd=0.0, warmup=0, r=0.0, wlp=2.0, im=0.9),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, wd=0.1, warmup=10, r=1.0, wlp=2.0, im=0.5),
    dict(lr=0.05, betas=(0.95, 0.9), eps=1e-8, wd=0.05, warmup=5, r=2.0, wlp=0.0, im=0.99),
    dict(lr=0.02, betas=(1.0, 0.999), eps=1e-8, wd=0.0, warmup=3, r=0.0, wlp=1.0, im=0.3),
]


def _ours_kw(h: dict) -> dict:
    return dict(
        lr=h["lr"],
        betas=h["betas"],
        eps=h["eps"],
        weight_decay=h["wd"],
        warmup_steps=h["warmup"],
        r=h["r"],
        weight_lr_power=h["wlp"],
        inner_momentum=h["im"],
    )


@pytest.mark.parametrize("index", range(len(GRID)))
def test_inner_momentum_matches_numpy_oracle(index):
    h = GRID[index]
    problem = Problem(seed=20 + index)
    y_np, x_np = numpy_adamw(problem, STEPS, **h)
    for flags in (dict(foreach=False), dict(foreach=True)):
        y, x = run(
            lambda ps, flags=flags: sf_torch.AdamWScheduleFree(ps, **_ours_kw(h), **flags),
            problem,
            STEPS,
        )
        assert max_rel_diff(y, y_np) <= TOL, (index, flags, "y")
        assert max_rel_diff(x, x_np) <= TOL, (index, flags, "x")


@pytest.mark.parametrize("index", range(len(GRID)))
def test_inner_momentum_matches_upstream_main(index):
    main = upstream("adamw_schedulefree")
    h = GRID[index]
    problem = Problem(seed=20 + index)
    for up_foreach in (False, True):
        y_ref, x_ref = run(
            lambda ps, f=up_foreach: main.AdamWScheduleFree(ps, **_ours_kw(h), foreach=f),
            problem,
            STEPS,
            reference=True,
        )
        y, x = run(
            lambda ps, f=up_foreach: sf_torch.AdamWScheduleFree(ps, **_ours_kw(h), foreach=f),
            problem,
            STEPS,
        )
        assert max_rel_diff(y, y_ref) <= TOL, (index, up_foreach, "y")
        assert max_rel_diff(x, x_ref) <= TOL, (index, up_foreach, "x")


@pytest.mark.parametrize("decay_at_z", [False, True])
def test_reference_inner_momentum_matches_upstream_main(decay_at_z):
    main = upstream("adamw_schedulefree_reference")
    kw = dict(
        lr=0.02, weight_decay=0.2, warmup_steps=4, r=1.0, inner_momentum=0.8, decay_at_z=decay_at_z
    )
    problem = Problem(seed=31)
    y_ref, x_ref = run(
        lambda ps: main.AdamWScheduleFreeReference(ps, **kw), problem, STEPS, reference=True
    )
    y, x = run(lambda ps: sf_torch.AdamWScheduleFreeReference(ps, **kw), problem, STEPS)
    assert max_rel_diff(y, y_ref) == 0.0
    assert max_rel_diff(x, x_ref) == 0.0


# -------------------------------------------------- inner_momentum: state and checkpoints


def _train(opt, problem, params, steps):
    for _ in range(steps):
        backward(problem, params)
        opt.step()


def test_exp_avg_only_when_inner_momentum_is_not_zero():
    problem = Problem(seed=4)
    for im, keys in ((0.0, ["exp_avg_sq", "z"]), (0.9, ["exp_avg", "exp_avg_sq", "z"])):
        params = problem.params()
        opt = sf_torch.AdamWScheduleFree(params, lr=0.01, inner_momentum=im)
        _train(opt, problem, params, 2)
        assert sorted(opt.state[params[0]]) == keys


@pytest.mark.parametrize("im", [0.0, 0.9])
def test_checkpoints_load_and_continue_bitwise(im):
    """A state dict saved mid-run (train and eval mode) loads into a new optimizer and both
    continue to the same numbers bit for bit."""
    problem = Problem(seed=6)
    for mode in ("train", "eval"):
        params = problem.params()
        opt = sf_torch.AdamWScheduleFree(params, lr=0.02, weight_decay=0.1, inner_momentum=im)
        _train(opt, problem, params, 7)
        if mode == "eval":
            opt.eval()
        saved = opt.state_dict()
        params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
        # Constructed with the other value: the checkpoint's groups bring theirs.
        opt2 = sf_torch.AdamWScheduleFree(params2, lr=0.5, inner_momentum=0.0 if im else 0.5)
        opt2.load_state_dict(saved)
        assert opt2.param_groups[0]["inner_momentum"] == im
        for o, ps in ((opt, params), (opt2, params2)):
            o.train()
            _train(o, problem, ps, 7)
        assert all(torch.equal(a, b) for a, b in zip(params, params2))
        for p, p2 in zip(params, params2):
            for key in opt.state[p]:
                assert torch.equal(opt.state[p][key], opt2.state[p2][key])


def test_state_dict_of_earlier_versions_loads_into_inner_momentum_zero():
    """A state dict without the inner_momentum key and without exp_avg (sf_torch before it,
    or schedulefree 1.4.1) loads into inner_momentum=0 and continues bitwise; with
    inner_momentum != 0 the step refuses it."""
    problem = Problem(seed=8)
    params = problem.params()
    ref = schedulefree.AdamWScheduleFree(params, lr=0.02, weight_decay=0.1, foreach=False)
    ref.train()
    _train(ref, problem, params, 6)
    ref.eval()
    saved = ref.state_dict()
    assert "inner_momentum" not in saved["param_groups"][0]
    assert "exp_avg" not in saved["state"][0]
    mine_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    mine = sf_torch.AdamWScheduleFree(mine_params, lr=0.02, weight_decay=0.1)
    mine.load_state_dict(saved)
    assert mine.param_groups[0]["inner_momentum"] == 0.0
    for o, ps in ((ref, params), (mine, mine_params)):
        o.train()
        _train(o, problem, ps, 6)
    assert all(torch.equal(a, b) for a, b in zip(params, mine_params))

    other_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = sf_torch.AdamWScheduleFree(other_params, lr=0.02, inner_momentum=0.9)
    other.load_state_dict(saved)  # the group gets this optimizer's default: 0.9
    other.train()
    backward(problem, other_params)
    before = [p.detach().clone() for p in other_params]
    with pytest.raises(RuntimeError, match="exp_avg"):
        other.step()
    assert all(torch.equal(a, b) for a, b in zip(before, other_params))
    assert other.param_groups[0]["k"] == 6


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.9", None])
def test_inner_momentum_out_of_range(bad):
    params = Problem(seed=0).params()
    with pytest.raises((ValueError, TypeError), match="inner_momentum"):
        sf_torch.AdamWScheduleFree(params, inner_momentum=bad)
    opt = sf_torch.AdamWScheduleFree(params)
    opt.param_groups[0]["inner_momentum"] = bad
    backward(Problem(seed=0), params)
    with pytest.raises((ValueError, TypeError), match="inner_momentum"):
        opt.step()


def test_paper_refuses_inner_momentum_and_reference_fused():
    params = Problem(seed=0).params()
    opt = sf_torch.AdamWScheduleFreePaper(params)
    opt.param_groups[0]["inner_momentum"] = 0.9
    backward(Problem(seed=0), params)
    with pytest.raises(ValueError, match="inner_momentum"):
        opt.step()
    ref = sf_torch.AdamWScheduleFreeReference(params, decay_at_z=True)
    ref.param_groups[0]["fused"] = True
    with pytest.raises(ValueError, match="fused"):
        ref.step()


# ------------------------------------------------------------ inner_momentum under DeepSpeed


@pytest.mark.parametrize("stage", [3])
def test_inner_momentum_under_deepspeed(tmp_path, stage):
    """ZeRO-3 on 2 CPU ranks (tests/ds_worker.py): the trajectory of a single-process run,
    exp_avg in the client's state, and resume from a checkpoint bitwise."""
    pytest.importorskip("deepspeed")
    import test_deepspeed as tds

    opt = dict(tds.OPT, inner_momentum=0.9)
    results = tds.run_deepspeed(tmp_path, stage=stage, dtype="fp32", optimizer=opt)
    n1, n2 = tds.STEPS
    model = tds.make_model()
    kwargs = {k: v for k, v in opt.items() if k != "weight_decay"}
    kwargs["betas"] = tuple(kwargs["betas"])
    ref = sf_torch.AdamWScheduleFree(tds.param_groups(model, opt["weight_decay"]), **kwargs)
    for step in range(n1 + n2):
        ref.zero_grad()
        xb, yb = tds.batch(step, 0, 1)
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        ref.step()
    final = [p.detach().clone() for p in model.parameters()]
    # The same run without inner momentum ends elsewhere: the option reaches the engine.
    assert tds.max_diff(tds.reference(n1 + n2)[0][-1], final) > 1e-3
    for r in results:
        assert set(r["state_keys"]) == {3}  # z, exp_avg_sq, exp_avg
        assert tds.max_diff(r["final_uninterrupted"], final) <= 2e-5  # float32, reduction order
        assert tds.max_diff(r["final_resumed"], r["final_uninterrupted"]) == 0.0
        assert tds.max_diff(r["final_resumed_from_train_mode"], r["final_uninterrupted"]) == 0.0


# ------------------------------------------------ fused and capturable, Triton's interpreter


def _checks() -> dict:
    from sf_torch import kernels

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    out: dict = {}
    # Against the numpy oracle, float64: fused (its first step general, then planned) and
    # capturable (the advance kernel computes the bias correction on the device).
    h = GRID[1]
    problem = Problem(seed=40, shapes=[(6, 5), (7,), (2, 3, 2)])
    y_np, x_np = numpy_adamw(problem, STEPS, **h)
    for name, flags in (("fused", dict(fused=True)), ("capturable", dict(capturable=True))):
        y, x = run(
            lambda ps, f=flags: sf_torch.AdamWScheduleFree(ps, **_ours_kw(h), **f), problem, STEPS
        )
        out[f"oracle/{name}/y"] = max_rel_diff(y, y_np)
        out[f"oracle/{name}/x"] = max_rel_diff(x, x_np)
    # The closure class with the fused kernel (y stepped, then switched to x) against 1.4.1.
    import schedulefree

    kw = dict(lr=0.02, warmup_steps=10, weight_decay=0.1, r=1)
    x_ref, _, _ = _run_closure(
        lambda ps: schedulefree.AdamWScheduleFreeClosure(ps, **kw), problem, STEPS
    )
    x, _, _ = _run_closure(
        lambda ps: sf_torch.AdamWScheduleFreeClosure(ps, **kw, fused=True), problem, STEPS
    )
    out["closure/fused"] = max_rel_diff(x, x_ref)
    # loop == fused in float32 and with float32 state for bf16 params, tensors over blocks.
    big = Problem(seed=5, shapes=[(50, 61), (1100,), (7,)], rows=30)
    for setup, dtype, state_dtype in (
        ("float32", torch.float32, None),
        ("bf16_f32state", torch.bfloat16, torch.float32),
    ):
        res = {}
        for impl, flags in (
            ("loop", dict(foreach=False, fused=False)),
            ("fused", dict(fused=True)),
        ):
            params = big.params(dtype)
            opt = sf_torch.AdamWScheduleFree(
                params,
                lr=0.01,
                warmup_steps=3,
                weight_decay=0.1,
                inner_momentum=0.9,
                state_dtype=state_dtype,
                **flags,
            )
            _train(opt, big, params, 12)
            res[impl] = (
                [p.detach().clone() for p in params],
                [opt.state[p]["exp_avg"].clone() for p in params],
            )
            if impl == "fused":
                out[f"plan/{setup}"] = 0 in opt._plans
        out[f"impl/{setup}/y"] = max_rel_diff(res["fused"][0], res["loop"][0])
        out[f"impl/{setup}/m"] = max_rel_diff(res["fused"][1], res["loop"][1])
    # inner_momentum changed from 0.9 to 0 mid-run: the plan goes stale and the step
    # follows the loop's (which ignores the buffer from then on).
    res = []
    for flags in (dict(foreach=False, fused=False), dict(fused=True)):
        params = problem.params()
        opt = sf_torch.AdamWScheduleFree(params, lr=0.02, inner_momentum=0.9, **flags)
        _train(opt, problem, params, 5)
        opt.param_groups[0]["inner_momentum"] = 0.0
        _train(opt, problem, params, 5)
        res.append([p.detach().clone() for p in params])
    out["switch_off/fused_vs_loop"] = max_rel_diff(res[1], res[0])
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    return interpreter_child.run(__file__)


def test_fused_and_capturable_inner_momentum(report):
    oracle = {k: v for k, v in report.items() if k.startswith("oracle/")}
    assert len(oracle) == 4 and max(oracle.values()) <= TOL, oracle
    assert report["closure/fused"] <= TOL
    assert report["plan/float32"] and report["plan/bf16_f32state"]
    # float32: a few ulps per step over 12 steps; bf16 params: one bf16 ulp moves y (as in
    # test_torch_fused_interpreter.py's IMPL_TOL).
    assert report["impl/float32/y"] <= 1e-5 and report["impl/float32/m"] <= 1e-5, report
    assert report["impl/bf16_f32state/y"] <= 1e-2, report
    assert report["switch_off/fused_vs_loop"] <= 1e-13


if __name__ == "__main__":
    print(json.dumps(_checks()))
