"""The fused Triton kernel on a real GPU: fused against foreach and against the reference.

About 5 million params in tensors of several shapes (one of a single element, several of many
kernel blocks), 20 steps of seeded random gradients (the same for every run). Runs only where
CUDA is available; CI (CPU) covers the same kernel under Triton's interpreter in
test_torch_fused_interpreter.py.
"""

from __future__ import annotations

import pytest
import schedulefree
import torch
from test_torch_problem import max_rel_diff

import sf_torch
from sf_torch import dispatch, fused_plan, rule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(2048, 1024), (1024,), (4096, 512), (3, 1000, 333), (17,), (1,)]
STEPS = 20
CLASSES = {
    "adamw": (sf_torch.AdamWScheduleFree, dict(lr=1e-3, warmup_steps=5, weight_decay=0.1)),
    "sgd": (sf_torch.SGDScheduleFree, dict(lr=0.1, warmup_steps=5, weight_decay=0.1)),
    "radam": (sf_torch.RAdamScheduleFree, dict(lr=1e-3, weight_decay=0.1, silent_sgd_phase=False)),
}


def _params(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, device="cuda").to(dtype)) for s in SHAPES
    ]


def _run(cls, kw, dtype, steps=STEPS, reference=False, **flags):
    params = _params(dtype)
    opt = cls(params, **kw, **flags)
    if reference:
        opt.train()
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda").to(dtype)
        opt.step()
    torch.cuda.synchronize()
    state = {
        name: [opt.state[p][name] for p in params]
        for name in ("z", "exp_avg_sq")
        if name in opt.state[params[0]]
    }
    x = [p.detach().clone() for p in params]
    if not reference:
        x = opt.eval_params()
    return [p.detach().clone() for p in params], state, x, opt


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_fused_equals_foreach_float32(kind):
    cls, kw = CLASSES[kind]
    y_f, s_f, x_f, opt = _run(cls, kw, torch.float32, fused=True)
    assert all(g["fused"] for g in opt.param_groups)
    y_e, s_e, x_e, _ = _run(cls, kw, torch.float32, fused=False, foreach=True)
    # Measured on an H100: <= 2e-7 (fma contraction and op order differ by an ulp or so).
    assert max_rel_diff(y_f, y_e) <= 2e-6
    assert max_rel_diff(x_f, x_e) <= 2e-6
    for name in s_e:
        assert max_rel_diff(s_f[name], s_e[name]) <= 2e-6, name


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_fused_equals_foreach_bf16_params_float32_state(kind):
    cls, kw = CLASSES[kind]
    flags = dict(state_dtype=torch.float32)
    y_f, s_f, x_f, _ = _run(cls, kw, torch.bfloat16, fused=True, **flags)
    y_e, s_e, x_e, _ = _run(cls, kw, torch.bfloat16, fused=False, **flags)
    assert all(t.dtype == torch.float32 for t in s_f["z"])
    # y is rounded to bf16 each step: an intermediate an ulp apart in float32 can round y to the
    # neighbouring bf16 value (2**-8 relative), which then stays in the trajectory.
    assert max_rel_diff(y_f, y_e) <= 1e-2
    assert max_rel_diff(x_f, x_e) <= 1e-2
    for name in s_e:
        assert max_rel_diff(s_f[name], s_e[name]) <= 1e-2, name


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_fused_float32_against_reference_float64(kind):
    cls, kw = CLASSES[kind]
    ref_cls = {
        "adamw": schedulefree.AdamWScheduleFree,
        "sgd": schedulefree.SGDScheduleFree,
        "radam": schedulefree.RAdamScheduleFree,
    }[kind]
    y_f, _, x_f, _ = _run(cls, kw, torch.float32, fused=True)
    y_r, _, _, ref = _run(ref_cls, kw, torch.float64, reference=True)
    ref.eval()
    x_r = [p.detach() for p in ref.param_groups[0]["params"]]
    # float32 against float64: a float32 ulp per step, over 20 steps.
    assert max_rel_diff(y_f, y_r) <= 1e-5
    assert max_rel_diff(x_f, x_r) <= 1e-5


def test_fused_is_the_default_on_cuda():
    """fused=None (the default) takes the kernel for CUDA params: the same numbers as
    fused=True, not those of foreach (which differ by round-off, see above)."""
    cls, kw = CLASSES["adamw"]
    y_default, _, _, opt = _run(cls, kw, torch.float32)
    assert opt.param_groups[0]["fused"] is None
    y_fused, _, _, _ = _run(cls, kw, torch.float32, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(y_default, y_fused))


def test_fused_float64_against_reference_float64():
    cls, kw = CLASSES["adamw"]
    y_f, _, x_f, _ = _run(cls, kw, torch.float64, fused=True)
    y_r, _, _, ref = _run(schedulefree.AdamWScheduleFree, kw, torch.float64, reference=True)
    ref.eval()
    x_r = [p.detach() for p in ref.param_groups[0]["params"]]
    assert max_rel_diff(y_f, y_r) <= 1e-12
    assert max_rel_diff(x_f, x_r) <= 1e-12


SETUPS = ((torch.float32, {}), (torch.bfloat16, dict(state_dtype=torch.float32)))


def _report() -> None:
    """Print the measured differences and step times (``python tests/test_torch_fused_gpu.py``)."""
    for kind, (cls, kw) in sorted(CLASSES.items()):
        for dtype, flags in SETUPS:
            y_f, s_f, x_f, _ = _run(cls, kw, dtype, fused=True, **flags)
            y_e, s_e, x_e, _ = _run(cls, kw, dtype, fused=False, **flags)
            diffs = {"y": max_rel_diff(y_f, y_e), "x": max_rel_diff(x_f, x_e)}
            diffs.update({n: max_rel_diff(s_f[n], s_e[n]) for n in s_e})
            print(kind, dtype, "fused vs foreach", {k: f"{v:.2e}" for k, v in diffs.items()})
        ref_cls = getattr(schedulefree, cls.__name__)
        y_f, _, x_f, _ = _run(cls, kw, torch.float32, fused=True)
        y_r, _, _, ref = _run(ref_cls, kw, torch.float64, reference=True)
        ref.eval()
        x_r = [p.detach() for p in ref.param_groups[0]["params"]]
        print(
            kind,
            "fused f32 vs reference f64",
            f"y {max_rel_diff(y_f, y_r):.2e}",
            f"x {max_rel_diff(x_f, x_r):.2e}",
        )

    big = [(8192, 1024)] * 16  # 134M params: the GPU, not the host, sets the pace
    for shapes in (SHAPES, big):
        n = sum(torch.Size(s).numel() for s in shapes)
        for dtype, flags in SETUPS:
            for name, make in (
                ("fused", lambda ps, f=flags: sf_torch.AdamWScheduleFree(ps, fused=True, **f)),
                ("foreach", lambda ps, f=flags: sf_torch.AdamWScheduleFree(ps, fused=False, **f)),
                ("reference", schedulefree.AdamWScheduleFree),
            ):
                if name == "reference" and dtype != torch.float32:
                    continue
                params = [
                    torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes
                ]
                opt = make(params)
                opt.train()
                grads = [torch.randn_like(p) for p in params]
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                times = []
                for rep in range(25):
                    for p, g in zip(params, grads):
                        p.grad = g.clone() if name == "reference" else g  # it writes grads
                    torch.cuda.synchronize()
                    start.record()
                    opt.step()
                    end.record()
                    torch.cuda.synchronize()
                    if rep >= 5:
                        times.append(start.elapsed_time(end))
                ms = sorted(times)[len(times) // 2]
                # fewest bytes: read y, g, z, v and write y, z, v once
                per_param = 4 * 7 if dtype == torch.float32 else 2 * 2 + 4 * 4 + 2
                print(
                    f"AdamW step {name:9s} {str(dtype):14s} {n / 1e6:6.1f}M params: "
                    f"{ms:7.3f} ms median of 20, {n * per_param / ms / 1e6:6.0f} GB/s "
                    "counting each buffer once"
                )
                del params, opt, grads
                torch.cuda.empty_cache()


if __name__ == "__main__":
    _report()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_kernel_against_float64(dtype):
    # eval() and train() through the switch kernel (the default on CUDA): x is the float64 x of
    # the run's own y and z rounded once to the params' dtype; the loop switch agrees.
    state_dtype = torch.float32
    ys, state, _, opt = _run(*CLASSES["adamw"], dtype, state_dtype=state_dtype)
    zs = state["z"]
    b1 = opt.param_groups[0]["betas"][0]
    assert dispatch.switch_impl(ys, zs, None) == "fused"
    x_f64 = [(y.double() - (1 - b1) * z.double()) / b1 for y, z in zip(ys, zs)]
    opt.eval()
    x = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    loop = [y.clone() for y in ys]
    dispatch.switch_("loop", loop, zs, rule.view_weight("x", b1))
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-23
    assert max_rel_diff(x, x_f64) <= 2 * ulp
    assert max_rel_diff(x, loop) <= 2 * ulp
    opt.train()
    back = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    assert max_rel_diff(back, ys) <= 4 * ulp


def test_planned_step_on_cuda_through_in_place_grads_and_a_side_stream(monkeypatch):
    # The planned fast path (sf_torch.fused_plan) against the loop, float64: grads kept in place
    # (addresses unchanged: only the coefficients are sent), new grads, and steps taken on
    # another stream (the plan is rebuilt there rather than racing the first stream).
    planned = []
    plan_step = fused_plan.FusedPlan.step

    def counted_step(self, *args):
        planned.append(self)
        return plan_step(self, *args)

    monkeypatch.setattr(fused_plan.FusedPlan, "step", counted_step)
    results = []
    for flags in (dict(fused=True), dict(fused=False, foreach=False)):
        params = _params(torch.float64)
        opt = sf_torch.AdamWScheduleFree(params, lr=1e-3, warmup_steps=3, weight_decay=0.1, **flags)
        gen = torch.Generator(device="cuda").manual_seed(2)
        side = torch.cuda.Stream()
        for step in range(12):
            for p in params:
                g = torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float64)
                if step % 3 and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g
            planned_before = len(planned)
            if step in (6, 7):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    opt.step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                opt.step()
            if step == 9:
                opt.eval()
                opt.train()
        torch.cuda.synchronize()
        # The fused run ends on planned steps (the plan survived the switch); the loop plans none.
        assert (len(planned) > planned_before) == bool(flags.get("fused"))
        results.append(([p.detach().clone() for p in params], opt.eval_params()))
    assert max_rel_diff(results[0][0], results[1][0]) <= 1e-12
    assert max_rel_diff(results[0][1], results[1][1]) <= 1e-12


@pytest.mark.parametrize(
    "kind, dtype",
    [(kind, torch.float32) for kind in sorted(CLASSES)] + [("adamw", torch.bfloat16)],
)
def test_skip_nonfinite_fused_and_foreach_on_cuda(kind, dtype):
    # skip_nonfinite with host counters on CUDA (one sync per step): the fused step (general,
    # then planned) and foreach. A step with a NaN, one with an inf: everything bitwise as it
    # was; the run ends bitwise where the run without them ends, which is the run without
    # the option.
    cls, kw = CLASSES[kind]
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = [
        [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in SHAPES] for _ in range(8)
    ]
    bad = [list(step) for step in grads]
    for at, value in ((6, float("inf")), (3, float("nan")), (0, float("nan"))):
        step = [g.clone() for g in grads[at]]
        step[2].view(-1)[777] = value
        bad.insert(at, step)

    def run(schedule, **flags):
        params = _params(dtype)
        opt = cls(params, **kw, **flags)
        snaps = []

        def taken():
            tensors = [p.detach().clone() for p in params]
            tensors += [t.clone() for p in params for t in opt.state.get(p, {}).values()]
            return tensors, [float(opt.param_groups[0][k]) for k in ("k", "weight_sum", "lr_max")]

        for step in schedule:
            for p, g in zip(params, step):
                p.grad = g.clone()
            before = taken()
            opt.step()
            snaps.append((before, taken()))
        return snaps

    def same(a, b):
        return a[1] == b[1] and len(a[0]) == len(b[0]) and all(map(torch.equal, a[0], b[0]))

    for flags in (dict(fused=True), dict(fused=False, foreach=True)):
        snaps = run(bad, skip_nonfinite=True, **flags)
        for at in (0, 4, 8):  # where the bad steps landed
            assert same(*snaps[at]), (flags, at)
        good = run(grads, skip_nonfinite=True, **flags)
        assert same(snaps[-1][1], good[-1][1]), flags
        assert same(good[-1][1], run(grads, **flags)[-1][1]), flags
