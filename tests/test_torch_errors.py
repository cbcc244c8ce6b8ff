"""Bad input: the error, its message, and an optimizer left exactly as it was."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_torch_problem import Problem, backward, max_rel_diff, train
from test_torch_state import _assert_same, _snapshot

import sf_torch
from sf_torch import kernels

ADAMW_LIKE = [sf_torch.AdamWScheduleFree, sf_torch.RAdamScheduleFree]
ALL = [sf_torch.AdamWScheduleFree, sf_torch.SGDScheduleFree, sf_torch.RAdamScheduleFree]

INF = "[0, inf)"
COMMON = [
    ("lr", -1.0, INF),
    ("lr", math.nan, INF),
    ("lr", math.inf, INF),
    ("weight_decay", -0.1, INF),
    ("r", -1.0, INF),
    ("weight_lr_power", -2.0, INF),
]
ADAMW_ONLY = [
    ("eps", -1e-8, INF),
    ("betas", (0.0, 0.9), "(0, 1]", "betas[0]"),
    ("betas", (1.5, 0.9), "(0, 1]", "betas[0]"),
    ("betas", (0.9, 1.0), "[0, 1)", "betas[1]"),
    ("betas", (0.9, -0.5), "[0, 1)", "betas[1]"),
]
WARMUP = [
    ("warmup_steps", -1, "{0, 1, 2, ...}"),
    ("warmup_steps", 2.5, "{0, 1, 2, ...}"),
]
SGD_ONLY = [
    ("momentum", 0.0, "(0, 1]"),
    ("momentum", 1.01, "(0, 1]"),
]


def _cases():
    for cls in ALL:
        cases = list(COMMON)
        if cls is not sf_torch.SGDScheduleFree:
            cases += ADAMW_ONLY
        else:
            cases += SGD_ONLY
        if cls is not sf_torch.RAdamScheduleFree:
            cases += WARMUP
        for case in cases:
            yield cls, case


def _message(case):
    name, value, accepted = case[:3]
    shown = case[3] if len(case) > 3 else name
    if shown.startswith("betas["):
        value = value[int(shown[6])]
    return f"{shown} must be in {accepted}, got {value!r}"


CASES = list(_cases())


@pytest.mark.parametrize("cls,case", CASES, ids=[f"{c.__name__}-{k[0]}={k[1]}" for c, k in CASES])
def test_bad_hyperparameter_in_constructor_and_group(cls, case):
    name, value = case[:2]
    want = "^" + re.escape(_message(case)) + "$"
    params = Problem().params()
    with pytest.raises(ValueError, match=want):
        cls(params, **{name: value})
    with pytest.raises(ValueError, match=want):
        cls([{"params": params[:2]}, {"params": params[2:], name: value}])

    # add_param_group refuses the group and keeps the optimizer as it was.
    opt = cls(params[:2])
    with pytest.raises(ValueError, match=want):
        opt.add_param_group({"params": params[2:], name: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "cls,case", CASES[::3], ids=[f"{c.__name__}-{k[0]}" for c, k in CASES[::3]]
)
def test_bad_hyperparameter_set_mid_run_fails_the_step_cleanly(cls, case):
    name, value = case[:2]
    problem = Problem(seed=1)
    params = problem.params()
    opt = cls([{"params": params[:2]}, {"params": params[2:]}])
    train(opt, problem, params, 3)
    backward(problem, params)
    opt.param_groups[1][name] = value
    before = _snapshot(opt, params)
    called = []
    with pytest.raises(ValueError, match=re.escape(_message(case))):
        opt.step(lambda: called.append(1))
    assert called == []
    _assert_same(_snapshot(opt, params), before)


def test_betas_must_be_a_pair():
    with pytest.raises(ValueError, match=r"^betas must be a pair \(beta1, beta2\), got \(0\.9,\)$"):
        sf_torch.AdamWScheduleFree(Problem().params(), betas=(0.9,))


def test_bad_state_dtype_and_flags():
    params = Problem().params()
    with pytest.raises(ValueError, match=r"^state_dtype must be in floating torch dtypes"):
        sf_torch.AdamWScheduleFree(params, state_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^fused must be in \(None, True, False\), got 'yes'$"):
        sf_torch.SGDScheduleFree(params, fused="yes")
    with pytest.raises(ValueError, match=r"^foreach must be in \(None, True, False\), got 2$"):
        sf_torch.RAdamScheduleFree(params, foreach=2)


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradient_fails_before_anything_moves(cls):
    problem = Problem(seed=2)
    params = problem.params()
    opt = cls([{"params": params[:3]}, {"params": params[3:]}])
    train(opt, problem, params, 2)
    backward(problem, params)
    params[4].grad = params[4].grad.to_sparse()  # the last group: the first one must not move
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    _assert_same(_snapshot(opt, params), before)


@pytest.mark.parametrize("cls", ALL)
def test_fused_without_cuda_or_interpreter_is_a_clear_error(cls, monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    problem = Problem(seed=3)
    params = problem.params()
    with pytest.raises(RuntimeError, match=r"fused=True needs CUDA tensors.*TRITON_INTERPRET=1"):
        cls(params, fused=True)

    # Switched on later, in one group: the step fails before anything moves.
    opt = cls([{"params": params[:3]}, {"params": params[3:]}])
    train(opt, problem, params, 2)
    backward(problem, params)
    opt.param_groups[1]["fused"] = True
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="fused=True needs CUDA tensors"):
        opt.step()
    _assert_same(_snapshot(opt, params), before)

    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(RuntimeError, match="fused=True needs Triton"):
        cls(params, fused=True)


@pytest.mark.parametrize("cls", ALL)
def test_capturable_without_cuda_or_interpreter_is_a_clear_error(cls, monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    params = Problem(seed=3).params()
    with pytest.raises(
        RuntimeError,
        match=r"^capturable=True steps with the fused kernel.*capturable=False.*needs CUDA",
    ):
        cls(params, capturable=True)
    with pytest.raises(ValueError, match=r"^capturable must be in \(True, False\), got 1$"):
        cls(params, capturable=1)


def test_apply_update_needs_a_counted_step():
    problem = Problem()
    params = problem.params()
    opt = sf_torch.AdamWScheduleFree(params)
    backward(problem, params)
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"call advance_scalars\(\) first"):
        opt.apply_update()
    _assert_same(_snapshot(opt, params), before)


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned():
    problem = Problem(seed=5)
    params = problem.params()
    opt = sf_torch.SGDScheduleFree(params, lr=0.01)

    def closure():
        assert torch.is_grad_enabled()
        backward(problem, params)
        return problem.loss(params).detach()

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == pytest.approx(problem.loss_np(problem.init), rel=1e-14)
    # The first step has c = 1, so y = z = init - lr * g, with g the closure's gradient.
    want = [p - 0.01 * g for p, g in zip(problem.init, problem.grad_np(problem.init))]
    assert max_rel_diff(params, want) <= 1e-15


def test_fused_refuses_a_param_with_gaps_before_anything_moves(monkeypatch):
    """The kernel walks flat memory; a param with gaps (a column slice) is refused."""
    monkeypatch.setattr(kernels, "INTERPRET", True)  # CPU tensors count as the kernel's device
    base = torch.randn(8, 6, dtype=torch.float64)
    params = [torch.nn.Parameter(base[:, :3]), torch.nn.Parameter(torch.randn(5))]
    assert params[0].stride() == (6, 1)
    opt = sf_torch.AdamWScheduleFree(params, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="share one dense layout"):
        opt.step()
    _assert_same(_snapshot(opt, params), before)


@pytest.mark.parametrize("mutable", ["tensor lr", "list betas"])
def test_hyperparameters_changed_in_place_are_still_checked(mutable):
    # The step skips its hyperparameter checks while every value is the same immutable object
    # it last checked; values that can change in place are checked at every step.
    problem = Problem(seed=2)
    params = problem.params()
    lr, betas = torch.tensor(0.01, dtype=torch.float64), [0.9, 0.999]
    opt = sf_torch.AdamWScheduleFree(params, lr=lr, betas=betas)
    train(opt, problem, params, 2)
    backward(problem, params)
    if mutable == "tensor lr":
        lr.fill_(-1.0)
        match = "lr must be in"
    else:
        betas[0] = 2.0
        match = re.escape("betas[0] must be in (0, 1]")
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_same(_snapshot(opt, params), before)


# -- values that are no numbers at all: a TypeError naming the argument ---------------------

STEPS = "{0, 1, 2, ...}"
NOT_NUMBERS = [
    ("lr", "0.1", INF),
    ("lr", None, INF),
    ("lr", True, INF),
    ("eps", "1e-8", INF),
    ("weight_decay", [0.1], INF),
    ("warmup_steps", True, STEPS),
    ("warmup_steps", None, STEPS),
    ("momentum", True, "(0, 1]"),
    ("momentum", "0.9", "(0, 1]"),
    ("r", "1", INF),
    ("weight_lr_power", None, INF),
    ("betas", ("0.9", 0.999), "(0, 1]", "betas[0]"),
    ("betas", (0.9, None), "[0, 1)", "betas[1]"),
]


def _applies(cls, name: str) -> bool:
    if name in ("eps", "betas"):
        return cls is not sf_torch.SGDScheduleFree
    if name == "momentum":
        return cls is sf_torch.SGDScheduleFree
    if name == "warmup_steps":
        return cls is not sf_torch.RAdamScheduleFree
    return True


NOT_NUMBER_CASES = [(cls, case) for cls in ALL for case in NOT_NUMBERS if _applies(cls, case[0])]


@pytest.mark.parametrize(
    "cls,case",
    NOT_NUMBER_CASES,
    ids=[f"{c.__name__}-{k[0]}={k[1]!r}" for c, k in NOT_NUMBER_CASES],
)
def test_a_value_that_is_no_number_is_a_type_error_naming_it(cls, case):
    """In the constructor, in a param group, and set by hand mid-run (the step refuses it before
    anything moves). None too: a torch step needs the number."""
    name, value, accepted = case[:3]
    shown = case[3] if len(case) > 3 else name
    got = value[int(shown[6])] if shown.startswith("betas[") else value
    want = "^" + re.escape(f"{shown} must be a real number in {accepted}, got {got!r}") + "$"
    problem = Problem(seed=1)
    params = problem.params()
    with pytest.raises(TypeError, match=want):
        cls(params, **{name: value})
    with pytest.raises(TypeError, match=want):
        cls([{"params": params[:2]}, {"params": params[2:], name: value}])

    opt = cls([{"params": params[:2]}, {"params": params[2:]}])
    train(opt, problem, params, 2)
    backward(problem, params)
    opt.param_groups[1][name] = value
    before = _snapshot(opt, params)
    with pytest.raises(TypeError, match=want):
        opt.step()
    _assert_same(_snapshot(opt, params), before)


@pytest.mark.parametrize("cls", ADAMW_LIKE)
@pytest.mark.parametrize("betas", ["ab", "0.9", 0.9, None])
def test_betas_that_are_no_pair_are_refused(cls, betas):
    with pytest.raises(ValueError, match=r"^betas must be a pair \(beta1, beta2\), got "):
        cls(Problem().params(), betas=betas)


# -- a state dict of another kind of optimizer: refused before anything changes ---------------

KIND_OF = {
    sf_torch.AdamWScheduleFree: "AdamWScheduleFree",
    sf_torch.SGDScheduleFree: "SGDScheduleFree",
    sf_torch.RAdamScheduleFree: "RAdamScheduleFree",
}


def _saved_state_dict(source: str, kind: str) -> dict:
    """The state dict of ``kind`` (a class name) after 3 steps, from sf_torch ("ours") or from
    the ``schedulefree`` reference class of that name ("reference")."""
    import schedulefree

    problem = Problem(seed=6)
    params = problem.params()
    module = sf_torch if source == "ours" else schedulefree
    opt = getattr(module, kind)([{"params": params[:2]}, {"params": params[2:]}])
    if source == "reference":
        opt.train()
    train(opt, problem, params, 3)
    return opt.state_dict()


def _trained(cls):
    problem = Problem(seed=7)
    params = problem.params()
    opt = cls([{"params": params[:2]}, {"params": params[2:]}])
    train(opt, problem, params, 2)
    return opt, params


# (A state dict of the matching kind, sf_torch's or the reference's, loads: test_torch_state.py.)
MISMATCHED = [
    (cls, saved) for cls in ALL for saved in sorted(KIND_OF.values()) if KIND_OF[cls] != saved
]


@pytest.mark.parametrize("source", ["ours", "reference"])
@pytest.mark.parametrize(
    "cls,saved", MISMATCHED, ids=[f"{saved}-into-{c.__name__}" for c, saved in MISMATCHED]
)
def test_a_state_dict_of_another_kind_is_refused(cls, saved, source):
    state_dict = _saved_state_dict(source, saved)
    opt, params = _trained(cls)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(state_dict)
    message = str(info.value)
    assert message.startswith("load_state_dict: the state dict is an ")
    assert f"is an {saved}'s" in message and f"this optimizer is an {KIND_OF[cls]}" in message
    assert f"load it into an {saved}" in message
    _assert_same(_snapshot(opt, params), before)


@pytest.mark.parametrize(
    "saved,cls,edit,match",
    [
        # groups that say SGD, state that is AdamW's: v (exp_avg_sq) is no SGD state
        (
            "SGDScheduleFree",
            sf_torch.SGDScheduleFree,
            "add_v",
            r"is an AdamWScheduleFree's or an RAdamScheduleFree's \(its per-param state has "
            r"exp_avg_sq\), and this optimizer is an SGDScheduleFree",
        ),
        # AdamW's groups without v in the state: the state is SGD's
        (
            "AdamWScheduleFree",
            sf_torch.AdamWScheduleFree,
            "drop_v",
            r"is an SGDScheduleFree's \(its per-param state has z and no exp_avg_sq\), and this "
            r"optimizer is an AdamWScheduleFree",
        ),
        # RAdam told by the missing warmup_steps alone
        (
            "RAdamScheduleFree",
            sf_torch.AdamWScheduleFree,
            "drop_silent_sgd_phase",
            r"is an RAdamScheduleFree's \(param group 0 has betas and no warmup_steps\)",
        ),
    ],
)
def test_a_state_dict_told_by_its_state_keys(saved, cls, edit, match):
    state_dict = _saved_state_dict("ours", saved)
    for entry in state_dict["state"].values():
        if edit == "add_v":
            entry["exp_avg_sq"] = torch.zeros_like(entry["z"])
        elif edit == "drop_v":
            del entry["exp_avg_sq"]
    for group in state_dict["param_groups"]:
        if edit == "drop_silent_sgd_phase":
            del group["silent_sgd_phase"]
    opt, params = _trained(cls)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    _assert_same(_snapshot(opt, params), before)


@pytest.mark.parametrize(
    "other", [torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_state_dict_of_no_schedule_free_optimizer_is_refused(cls, other):
    problem = Problem(seed=6)
    params = problem.params()
    theirs = other([{"params": params[:2]}, {"params": params[2:]}], lr=0.01)
    train(theirs, problem, params, 2)
    opt, params = _trained(cls)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(theirs.state_dict())
    assert str(info.value) == (
        "load_state_dict: param group 0 of the state dict has no 'k': it is no Schedule-Free "
        f"optimizer's state dict, and this optimizer is an {KIND_OF[cls]}"
    )
    _assert_same(_snapshot(opt, params), before)
