"""``capturable=True`` (the step a CUDA graph can replay), run on CPU by Triton's interpreter.

The capturable step computes each group's scalars on the device (one program of the advance
kernel) from device counters, so these checks compare it with what the host computes: the
``schedulefree`` reference classes in float64 (params, x, and the counters k, lr_max,
weight_sum, scheduled_lr), sf_torch's host-scalar fused step in float32 and bf16, checkpoints
in both directions, and the errors. As in test_torch_fused_interpreter.py the checks run in a
child process started with ``TRITON_INTERPRET=1``; the tests assert on what it reports. The
graph capture itself needs a GPU: test_torch_fused_gpu.py.
"""

from __future__ import annotations

import json

import interpreter_child
import pytest

COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the message is what the test checks)
        return f"{type(e).__name__}: {e}"
    return "no error"


def _checks() -> dict:
    import schedulefree
    import torch
    from test_torch_problem import Problem, backward, max_rel_diff, run, train

    import sf_torch
    from sf_torch import kernels

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    out: dict = {}

    def counters(opt):
        return [[float(g[key]) for key in COUNTERS] for g in opt.param_groups]

    def counter_diff(got, want):
        worst = 0.0
        for g_row, w_row in zip(got, want):
            for g, w in zip(g_row, w_row):
                worst = max(worst, abs(g - w) / (abs(w) or 1.0))
        return worst

    # 1. Against the reference in float64, 120 steps, non-default r and weight_lr_power too.
    cases = {
        "adamw": (
            sf_torch.AdamWScheduleFree,
            schedulefree.AdamWScheduleFree,
            dict(lr=0.02, betas=(0.9, 0.99), warmup_steps=10, r=1.0, weight_decay=0.1),
        ),
        "adamw_powers": (
            sf_torch.AdamWScheduleFree,
            schedulefree.AdamWScheduleFree,
            dict(lr=0.01, warmup_steps=0, r=0.5, weight_lr_power=1.5),
        ),
        "sgd": (
            sf_torch.SGDScheduleFree,
            schedulefree.SGDScheduleFree,
            dict(lr=0.02, momentum=0.8, warmup_steps=10, weight_decay=0.1),
        ),
        "radam": (
            sf_torch.RAdamScheduleFree,
            schedulefree.RAdamScheduleFree,
            dict(lr=0.02, silent_sgd_phase=False, r=1.0, weight_lr_power=0.0),
        ),
        "radam_silent": (
            sf_torch.RAdamScheduleFree,
            schedulefree.RAdamScheduleFree,
            dict(lr=0.02, weight_decay=0.05),
        ),
    }
    for name, (ours, ref, kw) in cases.items():
        problem = Problem(seed=11, shapes=[(6, 5), (7,), (2, 3, 2)])
        made = {}

        def make(ps, cls, flags, key, kw=kw, made=made):
            made[key] = cls(ps, **kw, **flags)
            return made[key]

        y_ref, x_ref = run(
            lambda ps, ref=ref: make(ps, ref, {}, "ref"), problem, 120, reference=True
        )
        y, x = run(
            lambda ps, ours=ours: make(ps, ours, dict(capturable=True), "ours"), problem, 120
        )
        out[f"ref/{name}/y"] = max_rel_diff(y, y_ref)
        out[f"ref/{name}/x"] = max_rel_diff(x, x_ref)
        out[f"ref/{name}/counters"] = counter_diff(counters(made["ours"]), counters(made["ref"]))
        out[f"ref/{name}/k_is_tensor"] = isinstance(made["ours"].param_groups[0]["k"], torch.Tensor)

    # 2. Capturable against the host-scalar fused step: float32, and bf16 params with float32
    # state, several groups, a param without a gradient.
    problem = Problem(seed=5, shapes=[(50, 61), (1100,), (7,), (2, 3)], rows=30)
    for setup, dtype, state_dtype in (
        ("float32", torch.float32, None),
        ("bf16_f32state", torch.bfloat16, torch.float32),
    ):
        results = []
        for capturable in (False, True):
            params = problem.params(dtype)
            opt = sf_torch.AdamWScheduleFree(
                [
                    {"params": params[:2], "lr": 0.01, "warmup_steps": 3},
                    {"params": params[2:], "weight_decay": 0.2, "betas": (0.8, 0.95)},
                ],
                lr=0.02,
                fused=True,
                state_dtype=state_dtype,
                capturable=capturable,
            )
            for i in range(12):
                backward(problem, params)
                if i % 3 == 1:
                    params[3].grad = None  # the plan is stale on these steps, then rebuilt
                opt.step()
            results.append(([p.detach().clone() for p in params], opt.eval_params(), opt))
        out[f"host/{setup}/y"] = max_rel_diff(results[1][0], results[0][0])
        out[f"host/{setup}/x"] = max_rel_diff(results[1][1], results[0][1])
        out[f"host/{setup}/counters"] = counter_diff(
            counters(results[1][2]), counters(results[0][2])
        )

    # 3. Checkpoints: 30 capturable steps, state_dict, then 20 more steps after loading into
    # a capturable and into a host-scalar optimizer, against 50 uninterrupted reference steps.
    problem = Problem(seed=7)
    kw = dict(lr=0.01, warmup_steps=5, weight_decay=0.1)
    ref_params = problem.params()
    ref = schedulefree.AdamWScheduleFree(ref_params, **kw)
    ref.train()
    train(ref, problem, ref_params, 50)
    params = problem.params()
    opt = sf_torch.AdamWScheduleFree(params, capturable=True, **kw)
    train(opt, problem, params, 30)
    saved = opt.state_dict()
    out["ckpt/saved_types"] = sorted(
        {type(saved["param_groups"][0][key]).__name__ for key in COUNTERS}
    )
    out["ckpt/saved_k"] = saved["param_groups"][0]["k"]
    for target in ("capturable", "host"):
        params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt2 = sf_torch.AdamWScheduleFree(params2, capturable=target == "capturable", **kw)
        opt2.load_state_dict(saved)
        # The checkpoint's group flags win, as in torch (fused, foreach, capturable alike):
        # the host continuation turns capturable off by hand, mid-run.
        out[f"ckpt/{target}/loaded_capturable"] = opt2.param_groups[0]["capturable"]
        opt2.param_groups[0]["capturable"] = target == "capturable"
        train(opt2, problem, params2, 20)
        out[f"ckpt/{target}/k_type"] = type(opt2.param_groups[0]["k"]).__name__
        out[f"ckpt/{target}/y"] = max_rel_diff(params2, ref_params)
        out[f"ckpt/{target}/counters"] = counter_diff(counters(opt2), counters(ref))
    # ... and a reference checkpoint into a capturable optimizer, back to the same continuation.
    params3 = problem.params()
    ref3 = schedulefree.AdamWScheduleFree(params3, **kw)
    ref3.train()
    train(ref3, problem, params3, 30)
    params4 = [torch.nn.Parameter(p.detach().clone()) for p in params3]
    opt4 = sf_torch.AdamWScheduleFree(params4, capturable=True, **kw)
    opt4.load_state_dict(ref3.state_dict())
    train(opt4, problem, params4, 20)
    out["ckpt/from_reference/y"] = max_rel_diff(params4, ref_params)

    # 4. Counters set by hand between steps reach the device (here: a restart of the average).
    params = problem.params()
    opt = sf_torch.SGDScheduleFree(params, lr=0.05, warmup_steps=4, capturable=True)
    ref_params = problem.params()
    ref = schedulefree.SGDScheduleFree(ref_params, lr=0.05, warmup_steps=4)
    ref.train()
    for o, ps in ((opt, params), (ref, ref_params)):
        train(o, problem, ps, 10)
        o.param_groups[0]["weight_sum"] = 0.0
        o.param_groups[0]["k"] = 2
        train(o, problem, ps, 10)
    out["by_hand/y"] = max_rel_diff(params, ref_params)
    out["by_hand/counters"] = counter_diff(counters(opt), counters(ref))

    # 5. eval()/train() on a capturable optimizer: x and y as the reference's.
    params = problem.params()
    opt = sf_torch.AdamWScheduleFree(params, lr=0.02, capturable=True)
    ref_params = problem.params()
    ref = schedulefree.AdamWScheduleFree(ref_params, lr=0.02)
    ref.train()
    train(opt, problem, params, 15)
    train(ref, problem, ref_params, 15)
    opt.eval()
    ref.eval()
    out["switch/x"] = max_rel_diff(params, ref_params)
    opt.train()
    ref.train()
    train(opt, problem, params, 5)
    train(ref, problem, ref_params, 5)
    out["switch/y_after"] = max_rel_diff(params, ref_params)

    # 6. A group whose params have no gradient on some steps still counts them (its counters
    # advance alone on the device), as the reference's groups do.
    problem = Problem(seed=9)
    runs = {}
    for name, cls, flags in (
        ("ours", sf_torch.SGDScheduleFree, dict(capturable=True)),
        ("ref", schedulefree.SGDScheduleFree, {}),
    ):
        params = problem.params()
        opt = cls(
            [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}],
            lr=0.05,
            warmup_steps=3,
            **flags,
        )
        if name == "ref":
            opt.train()
        for i in range(15):
            backward(problem, params)
            if 5 <= i < 10:
                for p in params[2:]:
                    p.grad = None
            opt.step()
        runs[name] = (params, opt)
    out["no_grads/y"] = max_rel_diff(runs["ours"][0], runs["ref"][0])
    out["no_grads/counters"] = counter_diff(counters(runs["ours"][1]), counters(runs["ref"][1]))
    out["no_grads/k"] = [float(g["k"]) for g in runs["ours"][1].param_groups]

    # 7. Errors, each naming what to change; a failed step changes nothing.
    p32 = torch.nn.Parameter(torch.ones(3))
    out["err/value"] = _error(lambda: sf_torch.AdamWScheduleFree([p32], capturable="yes"))
    out["err/fused_false"] = _error(
        lambda: sf_torch.SGDScheduleFree([p32], capturable=True, fused=False)
    )
    out["err/empty_group"] = _error(
        lambda: sf_torch.AdamWScheduleFree([{"params": []}], capturable=True)
    )
    opt = sf_torch.AdamWScheduleFree([p32], capturable=True)
    out["err/advance_scalars"] = _error(opt.advance_scalars)
    mixed = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3).double())]
    for p in mixed:
        p.grad = torch.ones_like(p)
    opt = sf_torch.AdamWScheduleFree(mixed, capturable=True)
    out["err/mixed_dtypes"] = _error(opt.step)
    out["err/mixed_dtypes_unchanged"] = (
        float(opt.param_groups[0]["k"]) == 0.0
        and not opt.state
        and all(bool((p == 1).all()) for p in mixed)
    )
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    return interpreter_child.run(__file__)


# The device computes the scalars with numpy's float64 exp/log here (libdevice's pow on the
# GPU) where the reference uses Python's **: a few ulps per step, which the trajectory carries.
TOL_F64 = 1e-12


@pytest.mark.parametrize("case", ["adamw", "adamw_powers", "sgd", "radam", "radam_silent"])
def test_capturable_matches_reference_float64(report, case):
    for part in ("y", "x", "counters"):
        assert report[f"ref/{case}/{part}"] <= TOL_F64, (part, report[f"ref/{case}/{part}"])
    assert report[f"ref/{case}/k_is_tensor"] is True  # the counters live on the device


# Host and device scalars agree to float64 round-off, which float32 compute almost never sees;
# bf16 y rounds to 8 bits, so one differently rounded element moves by an ulp (as in
# test_torch_fused_interpreter's IMPL_TOL).
HOST_TOL = {"float32": 1e-6, "bf16_f32state": 1e-2}


@pytest.mark.parametrize("setup", sorted(HOST_TOL))
def test_capturable_matches_host_scalar_fused_step(report, setup):
    assert report[f"host/{setup}/y"] <= HOST_TOL[setup]
    assert report[f"host/{setup}/x"] <= HOST_TOL[setup]
    assert report[f"host/{setup}/counters"] <= 1e-14


def test_checkpoints_save_numbers_and_continue_the_trajectory(report):
    assert report["ckpt/saved_types"] == ["float", "int"]
    assert report["ckpt/saved_k"] == 30
    for target in ("capturable", "host", "from_reference"):
        assert report[f"ckpt/{target}/y"] <= TOL_F64, target
    assert report["ckpt/capturable/counters"] <= TOL_F64
    assert report["ckpt/host/counters"] <= TOL_F64
    assert report["ckpt/host/loaded_capturable"] is True
    assert report["ckpt/capturable/k_type"] == "Tensor"  # counted on the device
    assert report["ckpt/host/k_type"] == "int"  # counted on the host again


def test_counters_set_by_hand_reach_the_device(report):
    assert report["by_hand/y"] <= TOL_F64
    assert report["by_hand/counters"] <= TOL_F64


def test_eval_train_switch(report):
    assert report["switch/x"] <= TOL_F64
    assert report["switch/y_after"] <= TOL_F64


def test_group_without_gradients_counts_its_steps(report):
    assert report["no_grads/k"] == [15.0, 15.0]
    assert report["no_grads/y"] <= TOL_F64
    assert report["no_grads/counters"] <= TOL_F64


def test_errors(report):
    assert report["err/value"].startswith("ValueError: capturable must be in (True, False)")
    assert report["err/fused_false"].startswith("ValueError: capturable=True steps with the fused")
    assert "fused must be in (None, True)" in report["err/fused_false"]
    assert report["err/empty_group"].startswith("ValueError: capturable=True needs params")
    assert report["err/advance_scalars"].startswith(
        "RuntimeError: advance_scalars() is not available with capturable=True"
    )
    assert "one device and one dtype per param group" in report["err/mixed_dtypes"]
    assert "torch.float32" in report["err/mixed_dtypes"]
    assert "torch.float64" in report["err/mixed_dtypes"]
    assert report["err/mixed_dtypes_unchanged"] is True


if __name__ == "__main__":
    print(json.dumps(_checks()))
