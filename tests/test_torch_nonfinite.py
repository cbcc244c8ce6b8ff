"""Non-finite gradients: ``skip_nonfinite=True`` and ``torch.amp.GradScaler``.

A skipped step must be as if it had never been taken: every param, state tensor and counter,
in every group, bitwise as before it, and the later steps bitwise those of a run that never saw
it. Valid steps must not change with the option on, and without it the reference's behaviour
(the NaN reaches z) is kept. The loop and foreach steps are checked here; the fused and
capturable steps (Triton kernels) in a child process under ``TRITON_INTERPRET=1``, as in
test_torch_fused_interpreter.py, which also checks GradScaler's contract for capturable
groups (it unscales and skips on the device) against a manual unscale. The CUDA graph cases
are in test_torch_capturable_gpu.py, the CUDA fused step in test_torch_fused_gpu.py.
"""

from __future__ import annotations

import json

import interpreter_child
import pytest
import schedulefree
import torch

import sf_torch
from sf_torch import dispatch

COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")
# Two groups with their own hyperparameters; the last param never has a gradient.
SHAPES = [(6, 5), (7,), (2, 3, 2), (3,)]
CLASSES = {
    "adamw": (
        sf_torch.AdamWScheduleFree,
        schedulefree.AdamWScheduleFree,
        dict(lr=0.02, betas=(0.9, 0.99), warmup_steps=3, weight_decay=0.1),
    ),
    "sgd": (
        sf_torch.SGDScheduleFree,
        schedulefree.SGDScheduleFree,
        dict(lr=0.02, momentum=0.8, warmup_steps=3, weight_decay=0.1),
    ),
    "radam": (
        sf_torch.RAdamScheduleFree,
        schedulefree.RAdamScheduleFree,
        dict(lr=0.02, silent_sgd_phase=False, r=1.0),
    ),
}
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


# ---------------------------------------------------------------------------------------------
# Helpers, shared with the interpreter child


def grads_schedule(steps: int, dtype=torch.float64, seed: int = 3) -> list[list]:
    """One list of gradients per step (None for the param that never has one)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES[:-1]] + [None]
        for _ in range(steps)
    ]


def with_bad_step(schedule, at: int, value: float, where: int = 2) -> list[list]:
    """``schedule`` with one more step before step ``at``: step ``at``'s gradients with
    ``value`` in one element of gradient ``where`` (by default the second group's)."""
    bad = [None if g is None else g.clone() for g in schedule[at]]
    bad[where].view(-1)[3] = value
    return schedule[:at] + [bad] + schedule[at:]


def make_params(dtype=torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
    ]


def make_opt(cls, kw, params, second=None, **flags):
    """Two groups: the first two params, and the others with their own lr and weight decay
    (and ``second``'s entries)."""
    groups = [
        {"params": params[:2]},
        {"params": params[2:], "lr": 0.01, "weight_decay": 0.0, **(second or {})},
    ]
    return cls(groups, **kw, **flags)


def bits(t) -> tuple | None:
    """A tensor as comparable bytes (NaN equal to itself), with its dtype and shape."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    return (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes())


def snapshot(opt, params) -> dict:
    """Everything a step may change, bitwise: params, state tensors, counters; and grads."""
    return {
        "params": [bits(p) for p in params],
        "grads": [bits(p.grad) for p in params],
        "state": [
            {key: bits(value) for key, value in sorted(opt.state.get(p, {}).items())}
            for p in params
        ],
        "counters": [[float(g[key]) for key in COUNTERS] for g in opt.param_groups],
    }


def trajectory(make, schedule, dtype=torch.float64):
    """Runs ``schedule`` with the optimizer ``make(params)``; returns the snapshots before and
    after each step (the last one is the end state)."""
    params = make_params(dtype)
    opt = make(params)
    if not getattr(opt, "param_groups", [{}])[0].get("train_mode", True):
        opt.train()  # the schedulefree classes start in eval mode
    snaps = []
    for grads in schedule:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        before = snapshot(opt, params)
        opt.step()
        snaps.append((before, snapshot(opt, params)))
    return snaps


def skip_checks(make, kind_dtype=torch.float64, at: int = 2, steps: int = 5) -> dict:
    """The checks of one optimizer setup (``make(params, skip_nonfinite=...)``):

    - ``bad/<value>/unchanged``: the bad step leaves everything (grads too) as it was;
    - ``bad/<value>/continues``: the run then ends bitwise where a run without it ends;
    - ``valid_unchanged``: with the option on, valid steps are those with it off, bitwise;
    - ``first/unchanged_ex_state``, ``first/continues``: a bad first step (no state yet).
    """
    out = {}
    good = grads_schedule(steps, kind_dtype)
    on = trajectory(lambda ps: make(ps, skip_nonfinite=True), good, kind_dtype)
    off = trajectory(lambda ps: make(ps, skip_nonfinite=False), good, kind_dtype)
    out["valid_unchanged"] = on == off
    for name, value in BAD.items():
        snaps = trajectory(
            lambda ps: make(ps, skip_nonfinite=True), with_bad_step(good, at, value), kind_dtype
        )
        before, after = snaps[at]
        out[f"bad/{name}/unchanged"] = before == after
        out[f"bad/{name}/continues"] = snaps[-1][1] == on[-1][1]
    snaps = trajectory(
        lambda ps: make(ps, skip_nonfinite=True),
        with_bad_step(good, 0, float("nan"), where=0),
        kind_dtype,
    )
    before, after = snaps[0]
    # A capturable group creates its state (z = y, v = 0, as the first step does) to plan
    # the step whose skip its device decides; everything else stays.
    out["first/unchanged_ex_state"] = {k: v for k, v in before.items() if k != "state"} == {
        k: v for k, v in after.items() if k != "state"
    }
    out["first/state_created"] = any(after["state"])
    out["first/continues"] = snaps[-1][1] == on[-1][1]
    return out


def poisoned_like_reference(make, ref_make, steps: int = 4) -> dict:
    """With ``make(params, skip_nonfinite=False)``: the run with a NaN gradient against the
    reference's (``ref_make(params)``), in float64: the same elements NaN (params and z), the
    others and the counters equal to round-off (a capturable group computes its counters on
    the device)."""
    schedule = with_bad_step(grads_schedule(steps), 1, float("nan"))
    ours = trajectory(lambda ps: make(ps, skip_nonfinite=False), schedule)[-1][1]
    ref = trajectory(ref_make, schedule)[-1][1]

    def tensors(snap):
        out = []
        for p, st in zip(snap["params"], snap["state"]):
            out.append(p)
            if "z" in st:
                out.append(st["z"])
        return [
            None if b is None else torch.frombuffer(bytearray(b[2]), dtype=torch.float64)
            for b in out
        ]

    worst, same_nan, any_nan = 0.0, True, False
    for a, b in zip(tensors(ours), tensors(ref)):
        same_nan &= torch.equal(a.isnan(), b.isnan())
        any_nan |= bool(a.isnan().any())
        ok = ~b.isnan()
        if ok.any():
            scale = b[ok].abs().max().item() or 1.0
            worst = max(worst, (a[ok] - b[ok]).abs().max().item() / scale)
    return {
        "same_nan": same_nan,
        "any_nan": any_nan,
        "finite_diff": worst,
        "counters": max(
            abs(a - b) / (abs(b) or 1.0)
            for row_a, row_b in zip(ours["counters"], ref["counters"])
            for a, b in zip(row_a, row_b)
        ),
    }


# ---------------------------------------------------------------------------------------------
# The loop and foreach steps


IMPLS = {"loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_skip_nonfinite_host_steps(name, impl, dtype):
    cls, _, kw = CLASSES[name]
    got = skip_checks(lambda ps, **o: make_opt(cls, kw, ps, **IMPLS[impl], **o), dtype)
    assert all(got[k] for k in got if k != "first/state_created"), got
    assert not got["first/state_created"]  # the host knew before anything was created


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_without_the_option_nan_poisons_z_as_the_reference(name, impl):
    cls, ref_cls, kw = CLASSES[name]
    got = poisoned_like_reference(
        lambda ps, **o: make_opt(cls, kw, ps, **IMPLS[impl], **o),
        lambda ps: make_opt(ref_cls, kw, ps),
    )
    assert got["any_nan"] and got["same_nan"] and got["counters"] == 0.0, got
    assert got["finite_diff"] <= 1e-12, got


def _scaled_run(cls, kw, flags, schedule, scaler):
    """Gradients from ``scaler.scale(loss).backward()`` (loss = sum <g, p>, so that the
    unscaled gradient is g); ``scaler.step``, ``scaler.update`` each step."""
    params = make_params()
    opt = make_opt(cls, kw, params, **flags)
    snaps, scales = [], []
    for grads in schedule:
        for p in params:
            p.grad = None
        loss = sum((p * g).sum() for p, g in zip(params, grads) if g is not None)
        scaler.scale(loss).backward()
        before = snapshot(opt, params)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        snaps.append((before, snapshot(opt, params)))
    return opt, snaps, scales


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_grad_scaler_default_path_skips(name, impl):
    # Host counters: GradScaler takes its own path (unscale_, one sync, step() skipped).
    cls, _, kw = CLASSES[name]
    good = grads_schedule(5)
    # The scale is a power of two: scaled and unscaled gradients are the plain ones exactly,
    # so the run must end bitwise where a plain run without the bad step ends.
    plain = trajectory(lambda ps: make_opt(cls, kw, ps, **IMPLS[impl]), good)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    opt, snaps, scales = _scaled_run(
        cls, kw, IMPLS[impl], with_bad_step(good, 2, BAD["inf"]), scaler
    )
    assert opt._step_supports_amp_scaling is False
    before, after = snaps[2]
    assert before["params"] == after["params"] and before["state"] == after["state"]
    assert before["counters"] == after["counters"]
    assert scales[1] == 2.0**16 and scales[2] == 2.0**15  # backed off at the bad step
    assert snaps[-1][1]["params"] == plain[-1][1]["params"]
    assert snaps[-1][1]["state"] == plain[-1][1]["state"]
    assert snaps[-1][1]["counters"] == plain[-1][1]["counters"]


@pytest.mark.parametrize("fallback", [False, True], ids=["amp_check", "inf_norm"])
def test_nonfinite_found(monkeypatch, fallback):
    # torch's GradScaler check, or (where torch has no kernel of it for a dtype on a device,
    # as for bf16 on CUDA in torch 2.11, and for complex) the inf-norm: nonzero exactly where
    # an element is not finite; the gradients keep their bits; the largest finite values pass.
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if fallback:
        monkeypatch.setattr(dispatch, "_NO_AMP_CHECK", {("cpu", d) for d in dtypes})
    for dtype in (*dtypes, torch.complex64):
        big = torch.finfo(dtype).max if dtype.is_floating_point else 3e38
        grads = [torch.randn(5, dtype=dtype), torch.full((70,), big, dtype=dtype)]
        kept = [bits(g) for g in grads]
        (flag,) = dispatch.nonfinite_found(grads).values()
        assert flag.item() == 0.0 and [bits(g) for g in grads] == kept, dtype
        for value in BAD.values():
            grads[1][40] = value
            (flag,) = dispatch.nonfinite_found(grads).values()
            assert flag.item() != 0.0, (dtype, value)
            grads[1][40] = big
    # The optimizer on the inf-norm path: the same skips.
    cls, _, kw = CLASSES["adamw"]
    got = skip_checks(lambda ps, **o: make_opt(cls, kw, ps, foreach=False, fused=False, **o))
    assert all(got[k] for k in got if k != "first/state_created"), got


def test_options_and_errors():
    params = make_params()
    with pytest.raises(ValueError, match="skip_nonfinite must be in"):
        sf_torch.AdamWScheduleFree(params, skip_nonfinite=1)
    with pytest.raises(ValueError, match="one setting for the whole optimizer"):
        sf_torch.SGDScheduleFree(
            [{"params": params[:2]}, {"params": params[2:], "skip_nonfinite": False}],
            skip_nonfinite=True,
        )
    opt = sf_torch.RAdamScheduleFree(params, skip_nonfinite=True)
    assert opt.param_groups[0]["skip_nonfinite"] is True
    for name in ("advance_scalars", "apply_update", "plan_update"):
        with pytest.raises(RuntimeError, match=f"{name}\\(\\) is not available with skip_non"):
            getattr(opt, name)()
    # The setting changed in one group by hand: refused at the step, before anything moves.
    opt = make_opt(sf_torch.AdamWScheduleFree, {}, params, skip_nonfinite=True)
    opt.param_groups[1]["skip_nonfinite"] = False
    for p in params[:3]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="param group 1 has False"):
        opt.step()
    assert opt.param_groups[0]["k"] == 0 and not opt.state
    # grad_scale is GradScaler's, for capturable groups only (host groups: GradScaler's path).
    opt = sf_torch.AdamWScheduleFree(params)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.zeros(())
    with pytest.raises(RuntimeError, match="read by capturable groups only"):
        opt.step()
    assert opt.param_groups[0]["k"] == 0 and not opt.state


def test_found_inf_set_by_hand_skips_host_groups():
    # The flag GradScaler would hand over, set by hand: a host group reads it on the host.
    params = make_params()
    opt = sf_torch.AdamWScheduleFree(params)
    for p in params[:3]:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.ones(())
    opt.step()
    assert opt.param_groups[0]["k"] == 0 and not opt.state
    opt.found_inf = torch.zeros(())
    opt.step()
    assert opt.param_groups[0]["k"] == 1 and len(opt.state) == 3


def test_checkpoint_keeps_the_setting():
    params = make_params()
    opt = sf_torch.AdamWScheduleFree(params, skip_nonfinite=True)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["skip_nonfinite"] is True
    other = sf_torch.AdamWScheduleFree(make_params())
    other.load_state_dict(saved)
    assert other.param_groups[0]["skip_nonfinite"] is True
    # A reference checkpoint has no such key: the optimizer's own default.
    ref = schedulefree.AdamWScheduleFree(make_params())
    mine = sf_torch.AdamWScheduleFree(make_params(), skip_nonfinite=True)
    mine.load_state_dict(ref.state_dict())
    assert mine.param_groups[0]["skip_nonfinite"] is True


# ---------------------------------------------------------------------------------------------
# The fused and capturable steps, in Triton's interpreter


def _checks() -> dict:
    from sf_torch import kernels

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    out: dict = {}
    setups = {
        "fused": dict(fused=True),
        "capturable": dict(capturable=True),
        # One group capturable, one not: the host decides (one sync), both skip.
        "mixed": dict(fused=True, second=dict(capturable=True)),
    }
    for name, (cls, ref_cls, kw) in CLASSES.items():
        for setup, flags in setups.items():

            def make(ps, cls=cls, kw=kw, flags=flags, **o):
                return make_opt(cls, kw, ps, **flags, **o)

            for key, value in skip_checks(make).items():
                out[f"skip/{name}/{setup}/{key}"] = value
            for key, value in poisoned_like_reference(
                make, lambda ps, ref_cls=ref_cls, kw=kw: make_opt(ref_cls, kw, ps)
            ).items():
                out[f"ref/{name}/{setup}/{key}"] = value
        # float32 and bf16 params with float32 state through the kernels.
        for setup, dtype, extra in (
            ("float32", torch.float32, {}),
            ("bf16", torch.bfloat16, dict(state_dtype=torch.float32)),
        ):
            for path, flags in (("fused", dict(fused=True)), ("capturable", dict(capturable=True))):

                def make(ps, cls=cls, kw=kw, flags=flags, extra=extra, **o):
                    return make_opt(cls, kw, ps, **flags, **extra, **o)

                for key, value in skip_checks(make, dtype).items():
                    out[f"dtype/{name}/{setup}/{path}/{key}"] = value

    # GradScaler's contract (every group capturable): the optimizer unscales as the kernel
    # reads and skips on the device. Against scaler.unscale_ (GradScaler's own unscale) then
    # scaler.step (the flag only), with a scale that is no power of two, so that the rounding
    # of g * inv_scale to g's dtype shows; and a bad step among them.
    for name, (cls, _, kw) in CLASSES.items():
        for setup, dtype, extra in (
            ("float64", torch.float64, {}),
            ("float32", torch.float32, {}),
            ("bf16", torch.bfloat16, dict(state_dtype=torch.float32)),
        ):
            schedule = with_bad_step(grads_schedule(5, dtype), 2, BAD["nan"])
            runs = {}
            for mode in ("contract", "unscale_first"):
                params = make_params(dtype)
                opt = make_opt(cls, kw, params, capturable=True, **extra)
                scaler = torch.amp.GradScaler(
                    "cpu", init_scale=1000.0, growth_factor=3.0, growth_interval=2
                )
                snaps, scales = [], []
                for grads in schedule:
                    for p in params:
                        p.grad = None
                    loss = sum((p * g).sum() for p, g in zip(params, grads) if g is not None)
                    scaler.scale(loss).backward()
                    before = snapshot(opt, params)
                    if mode == "unscale_first":
                        scaler.unscale_(opt)
                    scaler.step(opt)
                    scaler.update()
                    scales.append(scaler.get_scale())
                    after = snapshot(opt, params)
                    # Compare what the step moved, not the gradients (unscale_ wrote them).
                    snaps.append(
                        [{k: v for k, v in s.items() if k != "grads"} for s in (before, after)]
                    )
                runs[mode] = (snaps, scales, opt._step_supports_amp_scaling)
            key = f"amp/{name}/{setup}"
            out[f"{key}/supports"] = runs["contract"][2]
            out[f"{key}/same_as_unscale_first"] = runs["contract"][:2] == runs["unscale_first"][:2]
            before, after = runs["contract"][0][2]
            out[f"{key}/bad_unchanged"] = before == after
            out[f"{key}/steps_taken"] = runs["contract"][0][-1][1]["counters"][0][0]
    # ... and with a power-of-two scale the run ends where a plain run without the bad step
    # does (scaled gradients unscale exactly).
    cls, _, kw = CLASSES["adamw"]
    good = grads_schedule(5)
    plain = trajectory(lambda ps: make_opt(cls, kw, ps, capturable=True), good)[-1][1]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    _, snaps, scales = _scaled_run(
        cls, kw, dict(capturable=True), with_bad_step(good, 2, BAD["inf"]), scaler
    )
    out["amp/pow2/continues"] = {k: v for k, v in snaps[-1][1].items() if k != "grads"} == {
        k: v for k, v in plain.items() if k != "grads"
    }
    out["amp/pow2/scales"] = scales
    # With host counters GradScaler keeps its own path, the fused step included.
    opt = make_opt(cls, kw, make_params(), fused=True)
    out["amp/fused_host/supports"] = opt._step_supports_amp_scaling
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    return interpreter_child.run(__file__)


@pytest.mark.parametrize("setup", ["fused", "capturable", "mixed"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_skip_nonfinite_kernel_steps(report, name, setup):
    got = {k: v for k, v in report.items() if k.startswith(f"skip/{name}/{setup}/")}
    assert len(got) == 10, got
    assert all(v for k, v in got.items() if not k.endswith("first/state_created")), got
    # Only where the device decides does a skipped first step create the state (skip_checks).
    assert got[f"skip/{name}/{setup}/first/state_created"] == (setup == "capturable"), got


@pytest.mark.parametrize("setup", ["float32", "bf16"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_skip_nonfinite_kernel_dtypes(report, name, setup):
    got = {
        k: v
        for k, v in report.items()
        if k.startswith(f"dtype/{name}/{setup}/") and not k.endswith("first/state_created")
    }
    assert len(got) == 2 * 9 and all(got.values()), got


@pytest.mark.parametrize("setup", ["fused", "capturable", "mixed"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_kernels_without_the_option_nan_poisons_z_as_the_reference(report, name, setup):
    got = {
        k.rsplit("/", 1)[1]: v for k, v in report.items() if k.startswith(f"ref/{name}/{setup}/")
    }
    assert got["any_nan"] and got["same_nan"], got
    assert got["finite_diff"] <= 1e-12 and got["counters"] <= 1e-14, got


@pytest.mark.parametrize("setup", ["float64", "float32", "bf16"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_grad_scaler_contract_on_the_device(report, name, setup):
    key = f"amp/{name}/{setup}"
    assert report[f"{key}/supports"] is True
    assert report[f"{key}/same_as_unscale_first"], key
    assert report[f"{key}/bad_unchanged"], key
    assert report[f"{key}/steps_taken"] == 5.0  # 6 steps, the bad one skipped


def test_grad_scaler_contract_continues_exactly(report):
    assert report["amp/pow2/continues"]
    assert report["amp/pow2/scales"][1:3] == [2.0**16, 2.0**15]
    assert report["amp/fused_host/supports"] is False


if __name__ == "__main__":
    print(json.dumps(_checks()))
