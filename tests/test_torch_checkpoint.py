"""Checkpoints read back by a plain ``torch.load(path)``: torch's default, ``weights_only=True``.

Every optimizer, the wrapper and capturable groups: saved to a file at step N, read back by
``torch.load(path)``, loaded by ``load_state_dict`` into a fresh optimizer over fresh params,
then N more steps: params, state and counters equal those of an uninterrupted run bit for bit.
The capturable checks run on CPU under Triton's interpreter, in a child process started with
``TRITON_INTERPRET=1`` (as in test_torch_capturable.py). Whole-optimizer pickles that name the
state classes where they were before ``sf_torch/state.py`` (``sf_torch.fused_plan``) still load.
(DeepSpeed's checkpoint files: tests/test_deepspeed.py.)
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import interpreter_child
import pytest
import torch
from test_torch_problem import Problem, train

import sf_torch


def _save_and_load(obj, folder) -> dict:
    path = Path(folder) / "ckpt.pt"
    torch.save(obj, path)
    return torch.load(path)  # torch's default: weights_only=True


def _copy_params(params, saved) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def _state_of(opt, params) -> tuple:
    """Params, per-param state and param groups (counters as Python numbers), copied."""
    groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"}
        for g in opt.param_groups
    ]
    for g in groups:
        g.pop("differentiable", None)  # torch's load_state_dict adds it
    state = getattr(opt, "sf_state", None) or opt.state
    return (
        [p.detach().clone() for p in params],
        [{k: v.clone() for k, v in state[p].items()} if p in state else None for p in params],
        groups,
    )


def _assert_bitwise(got, want) -> None:
    (p_got, s_got, g_got), (p_want, s_want, g_want) = got, want
    for a, b in zip(p_got, p_want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(s_got, s_want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert g_got == g_want


def _resume_matches(make, params_of, folder, steps: int, save_in_eval: bool) -> dict:
    """Uninterrupted run vs. save -> torch.load(path) -> load_state_dict -> ``steps`` more
    steps; asserts that they agree bit for bit. Returns the checkpoint as read back."""
    problem = Problem(seed=31)

    params = params_of(problem)
    opt = make(params)
    train(opt, problem, params, steps)
    if save_in_eval:
        opt.eval()
        opt.train()
    train(opt, problem, params, steps)
    want = _state_of(opt, params)

    params = params_of(problem)
    opt = make(params)
    train(opt, problem, params, steps)
    if save_in_eval:
        opt.eval()
    ckpt = _save_and_load({"params": [p.detach() for p in params], "opt": opt.state_dict()}, folder)
    del params, opt
    params = params_of(problem)
    opt = make(params)
    _copy_params(params, ckpt["params"])
    opt.load_state_dict(ckpt["opt"])
    opt.train()
    train(opt, problem, params, steps)
    _assert_bitwise(_state_of(opt, params), want)
    return ckpt


def _two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.005, "weight_decay": 0.0}]


OPTIMIZERS = {
    "adamw": lambda params, **kw: sf_torch.AdamWScheduleFree(
        _two_groups(params), lr=0.02, warmup_steps=4, weight_decay=0.1, r=1.0, **kw
    ),
    "sgd": lambda params, **kw: sf_torch.SGDScheduleFree(
        _two_groups(params), lr=0.05, momentum=0.8, warmup_steps=4, weight_decay=0.1, **kw
    ),
    "radam": lambda params, **kw: sf_torch.RAdamScheduleFree(
        _two_groups(params), lr=0.02, weight_decay=0.1, silent_sgd_phase=False, **kw
    ),
}
SETUPS = {
    "float64": (torch.float64, {}),
    "float64_foreach": (torch.float64, {"foreach": True}),
    # state_dtype (a torch.dtype in every param group) and state of another dtype than the params
    "bf16_state_float32": (torch.bfloat16, {"state_dtype": torch.float32}),
}


@pytest.mark.parametrize("save_in_eval", [False, True], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_checkpoint_loads_with_weights_only_and_resumes_bitwise(
    tmp_path, kind, setup, save_in_eval
):
    dtype, kw = SETUPS[setup]
    ckpt = _resume_matches(
        lambda params: OPTIMIZERS[kind](params, **kw),
        lambda problem: problem.params(dtype),
        tmp_path,
        steps=12,
        save_in_eval=save_in_eval,
    )
    # The per-param state is saved as plain dicts (not the optimizer's tracked ones).
    assert all(type(entry) is dict for entry in ckpt["opt"]["state"].values())
    assert len(ckpt["opt"]["state"]) == 5


@pytest.mark.parametrize("base", ["adamw", "sgd", "rmsprop", "adagrad"])
def test_wrapper_checkpoint_loads_with_weights_only_and_resumes_bitwise(tmp_path, base):
    bases = {
        "adamw": lambda ps: torch.optim.AdamW(_two_groups(ps), lr=0.02, betas=(0.0, 0.99)),
        "sgd": lambda ps: torch.optim.SGD(_two_groups(ps), lr=0.05),
        "rmsprop": lambda ps: torch.optim.RMSprop(_two_groups(ps), lr=0.005, alpha=0.9),
        "adagrad": lambda ps: torch.optim.Adagrad(_two_groups(ps), lr=0.05),
    }

    def make(params):
        return sf_torch.ScheduleFreeWrapper(bases[base](params), momentum=0.9, r=0.5)

    for save_in_eval in (False, True):
        _resume_matches(make, lambda problem: problem.params(), tmp_path, 10, save_in_eval)


def test_whole_optimizer_pickle_naming_the_old_module_loads():
    """Whole-optimizer pickles made while ``TrackedState`` lived in sf_torch.fused_plan name it
    there; they load, with the state tracked, and train on as the original does."""
    problem = Problem(seed=32)
    params = problem.params()
    opt = OPTIMIZERS["adamw"](params)
    train(opt, problem, params, 5)
    new = pickle.dumps({"opt": opt, "params": params}, protocol=0)
    old = new.replace(b"csf_torch.state\nTrackedState\n", b"csf_torch.fused_plan\nTrackedState\n")
    assert old.count(b"csf_torch.fused_plan\nTrackedState\n") == 1
    assert b"sf_torch.state" not in old
    loaded = pickle.loads(old)
    opt2, params2 = loaded["opt"], loaded["params"]
    assert type(opt2.state) is sf_torch.state.TrackedState
    assert all(p in opt2.state for p in params2)
    train(opt, problem, params, 5)
    train(opt2, problem, params2, 5)
    _assert_bitwise(_state_of(opt2, params2), _state_of(opt, params))
    assert sf_torch.fused_plan.ParamState is sf_torch.state.ParamState


# -- capturable groups, under Triton's interpreter (child process) ------------------------------


def _capturable_checks() -> dict:
    from sf_torch import kernels

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    out = {}
    kinds = {
        "adamw": lambda ps: sf_torch.AdamWScheduleFree(
            ps, lr=0.02, warmup_steps=3, weight_decay=0.1, capturable=True
        ),
        "sgd": lambda ps: sf_torch.SGDScheduleFree(ps, lr=0.05, warmup_steps=3, capturable=True),
        "radam": lambda ps: sf_torch.RAdamScheduleFree(
            ps, lr=0.02, silent_sgd_phase=False, capturable=True
        ),
    }
    for name, make in kinds.items():
        with tempfile.TemporaryDirectory() as folder:
            try:
                ckpt = _resume_matches(
                    make,
                    lambda problem: problem.params(torch.float32),
                    folder,
                    steps=6,
                    save_in_eval=False,
                )
                counters = ckpt["opt"]["param_groups"][0]
                out[name] = "bitwise" if type(counters["k"]) is int else "k is no int"
            except Exception as e:  # noqa: BLE001  (the test reports what failed)
                out[name] = f"{type(e).__name__}: {str(e)[:500]}"
    return out


@pytest.fixture(scope="module")
def capturable_report() -> dict:
    return interpreter_child.run(__file__)


@pytest.mark.parametrize("kind", ["adamw", "sgd", "radam"])
def test_capturable_checkpoint_loads_with_weights_only_and_resumes_bitwise(capturable_report, kind):
    assert capturable_report[kind] == "bitwise"


if __name__ == "__main__":
    print(json.dumps(_capturable_checks()))
