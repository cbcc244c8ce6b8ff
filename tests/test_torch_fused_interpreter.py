"""The fused Triton kernel, run on CPU by Triton's interpreter.

Triton decides at ``triton.jit`` time whether to interpret, from ``TRITON_INTERPRET``, so this
module runs its checks in a child process started with ``TRITON_INTERPRET=1`` (this same file,
as a script); the tests below assert on the numbers the child reports. The interpreter is slow,
so the grid is small: each optimizer against the reference in float64 (200 steps), and
loop == foreach == fused in float32/float64, with float32 state for bf16 params, with several
param groups, and over tensors of several kernel blocks.
"""

from __future__ import annotations

import json

import interpreter_child
import pytest

TOL_F64_REF = 1e-12


def _checks() -> dict:
    import schedulefree
    import torch
    from test_torch_problem import Problem, backward, max_rel_diff, run

    import sf_torch
    from sf_torch import dispatch, kernels, rule

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    out: dict = {}

    # 1. Against the reference, float64, 200 steps (three tensors: the interpreter is slow).
    ref_cases = {
        "adamw": (
            sf_torch.AdamWScheduleFree,
            schedulefree.AdamWScheduleFree,
            dict(lr=0.02, betas=(0.9, 0.99), warmup_steps=10, r=1.0, weight_decay=0.1),
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
    }
    for name, (ours, ref, kw) in ref_cases.items():
        problem = Problem(seed=11, shapes=[(6, 5), (7,), (2, 3, 2)])
        y_ref, x_ref = run(lambda ps, ref=ref, kw=kw: ref(ps, **kw), problem, 200, reference=True)
        y, x = run(lambda ps, ours=ours, kw=kw: ours(ps, fused=True, **kw), problem, 200)
        out[f"ref/{name}/y"] = max_rel_diff(y, y_ref)
        out[f"ref/{name}/x"] = max_rel_diff(x, x_ref)

    # 2. loop == foreach == fused on the same data, with tensors of several blocks (> 1024).
    big = Problem(seed=5, shapes=[(50, 61), (1100,), (7,), (2, 3)], rows=30)
    classes = {
        "adamw": (sf_torch.AdamWScheduleFree, dict(lr=0.01, warmup_steps=3, weight_decay=0.1)),
        "sgd": (sf_torch.SGDScheduleFree, dict(lr=0.002, weight_decay=0.1)),
        "radam": (sf_torch.RAdamScheduleFree, dict(lr=0.01, silent_sgd_phase=False)),
    }
    setups = {
        "float64": dict(dtype=torch.float64),
        "float32": dict(dtype=torch.float32),
        "bf16_f32state": dict(dtype=torch.bfloat16, state_dtype=torch.float32),
    }
    for name, (cls, kw) in classes.items():
        for setup, opts in setups.items():
            dtype = opts["dtype"]
            extra = {"state_dtype": opts["state_dtype"]} if "state_dtype" in opts else {}
            results = {}
            for impl, flags in {
                "loop": dict(foreach=False, fused=False),
                "foreach": dict(foreach=True, fused=False),
                "fused": dict(fused=True),
            }.items():
                params = big.params(dtype)
                opt = cls(params, **kw, **extra, **flags)
                for _ in range(12):
                    backward(big, params)
                    opt.step()
                zs = [opt.state[p]["z"].clone() for p in params]
                results[impl] = ([p.detach().clone() for p in params], zs, opt.eval_params())
            for impl in ("foreach", "fused"):
                for i, part in enumerate(("y", "z", "x")):
                    out[f"impl/{name}/{setup}/{impl}/{part}"] = max_rel_diff(
                        results[impl][i], results["loop"][i]
                    )

    # 3. Several groups with their own hyperparameters, fused against the loop, float64.
    problem = Problem(seed=2)
    res = []
    for flags in (dict(foreach=False, fused=False), dict(fused=True)):
        params = problem.params()
        opt = sf_torch.AdamWScheduleFree(
            [
                {"params": params[:2], "lr": 0.03, "betas": (0.7, 0.9)},
                {"params": params[2:], "weight_decay": 0.3},
                {"params": []},
            ],
            lr=0.01,
            **flags,
        )
        for _ in range(40):
            backward(problem, params)
            params[1].grad = None
            opt.step()
        res.append([p.detach().clone() for p in params])
    out["groups/fused_vs_loop"] = max_rel_diff(res[1], res[0])

    # 4. Params in channels_last and transposed layouts (dense, not contiguous).
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, 5, 6, generator=gen), torch.randn(5, 7, generator=gen)]
    res = []
    for flags in (dict(foreach=False, fused=False), dict(fused=True)):
        params = [
            torch.nn.Parameter(weights[0].clone().to(memory_format=torch.channels_last)),
            torch.nn.Parameter(weights[1].clone().t().contiguous().t()),
        ]
        opt = sf_torch.AdamWScheduleFree(params, lr=0.05, weight_decay=0.1, **flags)
        for _ in range(10):
            for p in params:
                p.grad = None
            sum(((p - w).square() * w).sum() for p, w in zip(params, weights)).backward()
            opt.step()
        assert params[0].grad.stride() == params[0].stride()
        assert params[1].grad.stride() == params[1].stride() != (7, 1)
        assert opt.state[params[0]]["z"].stride() == params[0].stride()
        res.append([p.detach().clone() for p in params])
    out["layouts/fused_vs_loop"] = max_rel_diff(res[1], res[0])

    # 5. The train()/eval() switch kernel against the per-tensor lerp and float64 numpy.
    gen = torch.Generator().manual_seed(3)
    dtypes = {
        "float64": (torch.float64, torch.float64),
        "float32": (torch.float32, torch.float32),
        "bf16_f32state": (torch.bfloat16, torch.float32),
    }
    for setup, (p_dtype, z_dtype) in dtypes.items():
        shapes = [(50, 61), (1100,), (7,)]
        ys = [torch.randn(s, generator=gen, dtype=torch.float64).to(p_dtype) for s in shapes]
        zs = [
            (y.double() + 0.1 * torch.randn(y.shape, generator=gen, dtype=torch.float64)).to(
                z_dtype
            )
            for y in ys
        ]
        for view, b1 in (("x", 0.9), ("y", 0.95)):
            fused, loop = [y.clone() for y in ys], [y.clone() for y in ys]
            impl = dispatch.switch_impl(fused, zs, True)
            dispatch.switch_(impl, fused, zs, rule.view_weight(view, b1))
            dispatch.switch_("loop", loop, zs, rule.view_weight(view, b1))
            weight = 1.0 - 1.0 / b1 if view == "x" else 1.0 - b1
            exact = [
                (y.double().numpy() + weight * (z.double().numpy() - y.double().numpy()))
                for y, z in zip(ys, zs)
            ]
            out[f"switch/{setup}/{view}/impl"] = impl
            out[f"switch/{setup}/{view}/fused_vs_loop"] = max_rel_diff(fused, loop)
            out[f"switch/{setup}/{view}/fused_vs_f64"] = max_rel_diff(fused, exact)

    # 6. The optimizers' eval()/train() go through the kernel with fused=True: x equals
    # eval_params() of the same run with fused=False, and train() restores y.
    problem = Problem(seed=4, shapes=[(30, 40), (9,)])
    res = []
    for flags in (dict(foreach=False, fused=False), dict(fused=True)):
        params = problem.params(torch.bfloat16)
        opt = sf_torch.AdamWScheduleFree(
            params, lr=0.02, warmup_steps=2, state_dtype=torch.float32, **flags
        )
        for _ in range(6):
            backward(problem, params)
            opt.step()
        y = [p.detach().clone() for p in params]
        zs = [opt.state[p]["z"].double() for p in params]
        x_f64 = [(yy.double() - 0.1 * z) / 0.9 for yy, z in zip(y, zs)]
        x_view = opt.eval_params()
        opt.eval()
        x = [p.detach().clone() for p in params]
        opt.train()
        res.append((y, x_view, x, [p.detach().clone() for p in params]))
        out[f"opt_switch/x_vs_f64/{'fused' if flags.get('fused') else 'loop'}"] = max_rel_diff(
            x, x_f64
        )
    out["opt_switch/x_vs_eval_params_loop"] = max_rel_diff(res[1][2], res[0][1])
    out["opt_switch/x_fused_vs_loop"] = max_rel_diff(res[1][2], res[0][2])
    out["opt_switch/y_fused_vs_loop"] = max_rel_diff(res[1][0], res[0][0])
    out["opt_switch/y_back_fused"] = max_rel_diff(res[1][3], res[0][3])
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    return interpreter_child.run(__file__)


def test_fused_matches_reference_float64(report):
    ref = {k: v for k, v in report.items() if k.startswith("ref/")}
    assert len(ref) == 6
    assert max(ref.values()) <= TOL_F64_REF, ref


# Tolerances: float64 paths differ by round-off only; float32 by a few ulps per step over 12
# steps; bf16 params round y to 8 bits each step, so a differently rounded intermediate moves
# an element by one bf16 ulp (2**-8 relative) and the trajectories drift apart by a few ulps.
IMPL_TOL = {"float64": 1e-13, "float32": 1e-5, "bf16_f32state": 1e-2}


@pytest.mark.parametrize("setup", sorted(IMPL_TOL))
def test_loop_foreach_fused_agree(report, setup):
    got = {k: v for k, v in report.items() if k.startswith("impl/") and f"/{setup}/" in k}
    assert len(got) == 3 * 2 * 3
    assert max(got.values()) <= IMPL_TOL[setup], got
    # On CPU foreach runs the same per-tensor kernels as the loop: identical, not just close.
    assert max(v for k, v in got.items() if "/foreach/" in k) == 0.0


def test_fused_param_groups(report):
    assert report["groups/fused_vs_loop"] <= 1e-13


def test_fused_channels_last_and_transposed_params(report):
    assert report["layouts/fused_vs_loop"] <= 1e-5  # float32, 10 steps


# One switch computes lerp(p, z, w) once: float64 and float32 agree with the per-tensor lerp to
# round-off (the interpreter does not fuse multiply-adds; torch's CPU lerp may), bf16 params
# to the rounding of one result to 8 bits.
SWITCH_TOL = {"float64": 1e-15, "float32": 2e-7, "bf16_f32state": 2**-8}


@pytest.mark.parametrize("setup", sorted(SWITCH_TOL))
def test_switch_kernel(report, setup):
    got = {k: v for k, v in report.items() if k.startswith(f"switch/{setup}/")}
    assert {v for k, v in got.items() if k.endswith("/impl")} == {"fused"}
    for key in ("fused_vs_loop", "fused_vs_f64"):
        values = [v for k, v in got.items() if k.endswith(key)]
        assert len(values) == 2 and max(values) <= SWITCH_TOL[setup], got


def test_optimizer_switch_uses_kernel(report):
    # bf16 params with float32 z: x from the kernel vs eval_params() and eval() of the loop run.
    assert report["opt_switch/y_fused_vs_loop"] <= 1e-2  # the 6 steps themselves (see above)
    assert report["opt_switch/x_fused_vs_loop"] <= 1e-2
    assert report["opt_switch/x_vs_eval_params_loop"] <= 1e-2
    assert report["opt_switch/y_back_fused"] <= 1e-2
    # x written by the kernel is the float64 x of the run's own y and z, rounded to bf16.
    assert report["opt_switch/x_vs_f64/fused"] <= 2**-8
    assert report["opt_switch/x_vs_f64/loop"] <= 2**-8


if __name__ == "__main__":
    print(json.dumps(_checks()))
