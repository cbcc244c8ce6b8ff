"""``capturable=True`` in a real CUDA graph: captured steps replayed against the reference.

Runs only where CUDA is available (CI covers the capturable step's math under Triton's CPU
interpreter in test_torch_capturable.py). Each test warms up on a side stream, captures with
``torch.cuda.graph`` and replays, as torch's documentation does it; new gradients are copied
into the captured gradient buffers before each replay.
"""

from __future__ import annotations

import pytest
import schedulefree
import torch
from test_torch_problem import max_rel_diff

import sf_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(2048, 1024), (1024,), (4096, 512), (3, 1000, 333), (17,), (1,)]
STEPS = 30
WARMUP = 3
CLASSES = {
    "adamw": (
        sf_torch.AdamWScheduleFree,
        schedulefree.AdamWScheduleFree,
        dict(lr=1e-3, warmup_steps=10, weight_decay=0.1, r=0.5, weight_lr_power=1.5),
    ),
    "sgd": (
        sf_torch.SGDScheduleFree,
        schedulefree.SGDScheduleFree,
        dict(lr=0.1, warmup_steps=10, weight_decay=0.1),
    ),
    "radam": (
        sf_torch.RAdamScheduleFree,
        schedulefree.RAdamScheduleFree,
        dict(lr=1e-3, weight_decay=0.1, silent_sgd_phase=False),
    ),
}


def _params(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, device="cuda").to(dtype)) for s in SHAPES
    ]


def _grads(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [
        [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in SHAPES]
        for _ in range(STEPS)
    ]


def _reference(ref_cls, kw, grads):
    params = _params(torch.float64)
    opt = ref_cls(params, **kw)
    opt.train()
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.double()
        opt.step()
    y = [p.detach().clone() for p in params]
    opt.eval()
    return y, [p.detach().clone() for p in params], opt.param_groups[0]


def _captured_run(cls, kw, dtype, grads, **flags):
    """WARMUP eager steps on a side stream, one captured step, then replays for the rest."""
    params = _params(dtype)
    opt = cls(params, capturable=True, **kw, **flags)
    for p in params:
        p.grad = torch.empty_like(p)

    def load(step):
        for p, g in zip(params, grads[step]):
            p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            load(step)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(WARMUP)
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(WARMUP, STEPS):  # the capture ran no kernel: every step is a replay
        load(step)
        graph.replay()
    torch.cuda.synchronize()
    y = [p.detach().clone() for p in params]
    x = opt.eval_params()
    return y, x, opt


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_replayed_steps_match_reference_float64(kind):
    cls, ref_cls, kw = CLASSES[kind]
    grads = _grads(torch.float32)
    y, x, opt = _captured_run(cls, kw, torch.float32, grads)
    y_r, x_r, ref_group = _reference(ref_cls, kw, grads)
    # float32 against float64, as test_torch_fused_gpu.py: a float32 ulp or so per step.
    assert max_rel_diff(y, y_r) <= 1e-5
    assert max_rel_diff(x, x_r) <= 1e-5
    group = opt.param_groups[0]
    assert int(group["k"]) == STEPS == ref_group["k"]
    for key in ("lr_max", "weight_sum", "scheduled_lr"):
        # libdevice's pow against Python's: float64 round-off
        assert float(group[key]) == pytest.approx(ref_group[key], rel=1e-12), key


def test_replay_equals_eager_capturable_and_host_scalar_steps():
    cls, _, kw = CLASSES["adamw"]
    grads = _grads(torch.float32)
    y_graph, _, _ = _captured_run(cls, kw, torch.float32, grads)
    runs = {}
    for name, flags in (("capturable", dict(capturable=True)), ("host", dict(fused=True))):
        params = _params(torch.float32)
        opt = cls(params, **kw, **flags)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
        runs[name] = [p.detach() for p in params]
    # The replay runs the very kernels of the eager capturable step: bitwise equal.
    assert all(torch.equal(a, b) for a, b in zip(y_graph, runs["capturable"]))
    # Device and host scalars agree to float64 round-off; float32 y almost never sees it.
    assert max_rel_diff(y_graph, runs["host"]) <= 1e-6


def test_bf16_params_float32_state_replayed():
    cls, ref_cls, kw = CLASSES["adamw"]
    grads = _grads(torch.bfloat16)
    y, x, opt = _captured_run(cls, kw, torch.bfloat16, grads, state_dtype=torch.float32)
    assert opt.state[opt.param_groups[0]["params"][0]]["z"].dtype == torch.float32
    y_r, x_r, _ = _reference(ref_cls, kw, grads)
    # y is rounded to bf16 at every step (2**-8 relative), not accumulated there.
    assert max_rel_diff(y, y_r) <= 1e-2
    assert max_rel_diff(x, x_r) <= 1e-2


def test_whole_training_step_captured():
    """Forward, backward and step in one graph (the grads come from the captured backward)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    ).cuda()
    twin = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    ).cuda()
    twin.load_state_dict(model.state_dict())
    opt = sf_torch.AdamWScheduleFree(model.parameters(), lr=3e-3, warmup_steps=5, capturable=True)
    twin_opt = sf_torch.AdamWScheduleFree(twin.parameters(), lr=3e-3, warmup_steps=5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    batches = [
        (
            torch.randn(32, 64, generator=gen, device="cuda"),
            torch.randint(0, 10, (32,), generator=gen, device="cuda"),
        )
        for _ in range(20)
    ]
    static_x, static_t = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])

    def train_step(m, o, x, t):
        o.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(m(x), t)
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, t in batches[:WARMUP]:
            static_x.copy_(x)
            static_t.copy_(t)
            train_step(model, opt, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(model, opt, static_x, static_t)
    losses, twin_losses = [], []
    for x, t in batches[WARMUP:]:
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        losses.append(static_loss.item())
    for x, t in batches:
        twin_losses.append(train_step(twin, twin_opt, x, t).item())
    # The captured backward writes gradients into the graph's own buffers: the step must
    # follow them there (the eager twin takes the same math with host scalars).
    assert max_rel_diff(list(model.parameters()), list(twin.parameters())) <= 1e-5
    assert losses == pytest.approx(twin_losses[WARMUP:], rel=1e-5)
    assert int(opt.param_groups[0]["k"]) == len(batches)


def test_capture_errors():
    params = _params(torch.float32)
    for p in params:
        p.grad = torch.ones_like(p)
    host = sf_torch.AdamWScheduleFree(params, fused=True)
    host.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(graph):
            host.step()
    fresh = sf_torch.AdamWScheduleFree(_params(torch.float32), capturable=True)
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="take at least one step outside the capture"):
        with torch.cuda.graph(graph):
            fresh.step()
    assert fresh.param_groups[0]["k"] == 0 and not fresh.state  # the failed step moved nothing
    fresh.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eval\\(\\)/train\\(\\) cannot be captured"):
        with torch.cuda.graph(graph):
            fresh.eval()
    assert fresh.param_groups[0]["train_mode"] is True


# -- non-finite gradients: skip_nonfinite and GradScaler's contract, on the device ------------

COUNTERS = ("k", "lr_max", "weight_sum", "scheduled_lr")


def _with_bad(grads, at, value, where=2):
    """``grads`` with one more step before step ``at``: its gradients with ``value`` in one
    element of gradient ``where``."""
    bad = [g.clone() for g in grads[at]]
    bad[where].view(-1)[12345] = value
    return grads[:at] + [bad] + grads[at:]


def _state_bits(opt, params) -> dict:
    """Params, state tensors and counters, as integer views (NaN equal to itself)."""

    def ints(t):
        return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])

    group = opt.param_groups[0]
    return {
        "params": [ints(p).clone() for p in params],
        "state": [ints(t).clone() for p in params for t in opt.state.get(p, {}).values()],
        "counters": [
            torch.as_tensor(group[key], dtype=torch.float64).view(torch.int64).cpu()
            for key in COUNTERS
        ],
    }


def _same(a, b, keys=("params", "state", "counters")):
    return all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in keys
    )


def _captured_snapshots(cls, kw, dtype, schedule, **flags):
    """As _captured_run over the whole ``schedule``, with the state before and after every
    step."""
    params = _params(dtype)
    opt = cls(params, capturable=True, **kw, **flags)
    for p in params:
        p.grad = torch.empty_like(p)
    snaps = []

    def load(step):
        for p, g in zip(params, schedule[step]):
            p.grad.copy_(g)

    def take(step_fn):
        torch.cuda.synchronize()
        before = _state_bits(opt, params)
        step_fn()
        torch.cuda.synchronize()
        snaps.append((before, _state_bits(opt, params)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            load(step)
            take(opt.step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(WARMUP)
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(WARMUP, len(schedule)):
        load(step)
        take(graph.replay)
    return snaps, opt


@pytest.mark.parametrize(
    "kind, dtype, extra",
    [(kind, torch.float32, {}) for kind in sorted(CLASSES)]
    # bf16 gradients: torch 2.11 has no CUDA kernel of its check for them (the inf-norm's).
    + [("adamw", torch.bfloat16, dict(state_dtype=torch.float32))],
)
def test_replayed_steps_skip_nonfinite(kind, dtype, extra):
    # A NaN in the eager warm-up and a NaN and an inf among the replays: each such step leaves
    # params, z, v and counters bitwise as they were, and the run ends bitwise where the run
    # that never saw them ends; valid steps are those without the option, bitwise.
    cls, _, kw = CLASSES[kind]
    grads = _grads(dtype)
    bad = _with_bad(
        _with_bad(_with_bad(grads, 20, float("inf")), 12, float("nan")), 1, float("nan")
    )
    snaps, opt = _captured_snapshots(cls, kw, dtype, bad, skip_nonfinite=True, **extra)
    good, _ = _captured_snapshots(cls, kw, dtype, grads, skip_nonfinite=True, **extra)
    plain, _ = _captured_snapshots(cls, kw, dtype, grads, **extra)
    for at in (1, 13, 22):  # where the bad steps landed in `bad`
        before, after = snaps[at]
        assert _same(before, after), at
    assert _same(snaps[-1][1], good[-1][1])
    assert _same(good[-1][1], plain[-1][1])
    assert int(opt.param_groups[0]["k"]) == STEPS


def _scaled_grads(params, grads, scale_t):
    """The gradients of ``scale * sum <g, p>``: ``g * scale`` in the params' dtype."""
    for p in params:
        p.grad = None
    loss = sum((p.float() * g.float()).sum() for p, g in zip(params, grads))
    (loss * scale_t).backward()


def test_grad_scaler_contract_equals_unscale_first():
    # GradScaler hands its scale and flag to an optimizer whose groups are all capturable; the
    # kernel unscales as it reads: bitwise what scaler.unscale_ then the step give. A scale
    # that is no power of two, so that the rounding shows; overflowing steps skipped. (float32:
    # GradScaler's unscale_ refuses fp16 gradients, and torch 2.11 has no CUDA kernel for bf16
    # ones; fp16 below, bf16 under the interpreter in test_torch_nonfinite.py.)
    cls, _, kw = CLASSES["adamw"]
    dtype, extra = torch.float32, {}
    grads = _with_bad(_grads(dtype)[:12], 5, float("nan"))
    runs = []
    for unscale_first in (False, True):
        params = _params(dtype)
        opt = cls(params, capturable=True, **kw, **extra)
        assert opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler(
            "cuda", init_scale=1000.0, growth_factor=3.0, growth_interval=3
        )
        snaps = []
        for step in grads:
            for p in params:
                p.grad = None
            loss = sum((p.float() * g.float()).sum() for p, g in zip(params, step))
            scaler.scale(loss).backward()
            before = _state_bits(opt, params)
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            snaps.append((before, _state_bits(opt, params), scaler.get_scale()))
        runs.append(snaps)
    assert all(_same(a[1], b[1]) and a[2] == b[2] for a, b in zip(*runs))
    assert _same(runs[0][5][0], runs[0][5][1])  # the NaN step moved nothing
    assert int(opt.param_groups[0]["k"]) == 12


def test_fp16_params_unscaled_on_the_device_as_torch_unscales():
    # fp16 params (float32 state), which GradScaler's own unscale_ refuses: the contract as
    # GradScaler.step drives it (grad_scale, found_inf on the optimizer) against torch's
    # unscaling op then a plain step, with a scale that overflows fp16 on the first steps.
    cls, _, kw = CLASSES["adamw"]
    grads = _grads(torch.float16)[:10]
    runs = []
    for manual in (False, True):
        params = _params(torch.float16)
        opt = cls(params, capturable=True, state_dtype=torch.float32, **kw)
        scale, snaps, skipped = 3.0 * 2**15, [], 0
        for step in grads:
            scale_t = torch.tensor(scale, device="cuda")
            _scaled_grads(params, step, scale_t)
            found = torch.zeros((), device="cuda")
            inv = scale_t.double().reciprocal().float() if manual else torch.ones((), device="cuda")
            torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found, inv)
            if manual:
                if not found.item():
                    opt.step()
            else:
                opt.grad_scale, opt.found_inf = scale_t, found
                opt.step()
                del opt.grad_scale, opt.found_inf
            if found.item():
                scale, skipped = scale / 2, skipped + 1
            snaps.append(_state_bits(opt, params))
        runs.append((snaps, skipped, int(opt.param_groups[0]["k"])))
    assert runs[0][1] == runs[1][1] >= 1  # the first steps overflowed
    assert runs[0][2] == runs[1][2] == len(grads) - runs[0][1]
    for a, b in zip(runs[0][0], runs[1][0]):
        # A capturable group creates its state (z = y, v = 0) on a skipped first step too.
        assert _same(
            a, b, ("params", "counters") if not b["state"] else ("params", "state", "counters")
        )
