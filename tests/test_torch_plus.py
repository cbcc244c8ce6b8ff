"""sf_torch.AdamCScheduleFreePlus (upstream main's ``AdamCScheduleFreePlusPaper``), in float64.

- Against upstream's class (``../shared/reference/schedulefree_main/``, loaded by path, skipped
  when absent) over a hyperparameter grid, loop and foreach, ``step(loss)``, ``step(closure)``
  and ``step_func(loss)``: the same bits after 200 steps, at ``y`` and at ``x``, and the
  per-group scalars (``scheduled_lr``, ``lr_max``, ``weight_sum``, ...).
- Against a float64 numpy simulation written here from the formulas with explicit x, y and z
  (runs always), on the same grid and with two param groups.
- ``eval()``/``train()`` exact with an annealed ``sf_beta1``; checkpoints saved in either mode
  continue bitwise; a zero gradient; the errors.
- DTensor params on 2 CPU ranks (gloo; a child process spawns them): the L1 norm and the inner
  product all-reduced over the sharded dimension (a replicated param counted once), the loss
  averaged over the ranks: the same numbers as one process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_torch_problem import Problem, max_rel_diff

import sf_torch

STEPS = 200
TOL = 1e-12
UPSTREAM = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/schedulefree_main"
HERE = pathlib.Path(__file__).resolve().parent

GRID = [
    dict(lr=0.5),
    dict(
        lr=0.3,
        betas=(0.8, 0.99),
        sf_beta1_anneal_steps=50,
        sf_beta1_max=0.97,
        weight_decay=5.0,
        r=1.0,
        c_warmup=5,
        polyak_beta=0.9,
    ),
    dict(lr=1.0, sf_beta1=0.8, weight_decay=20.0, weight_lr_power=1.0, polyak_beta=0.5, eps=1e-6),
    dict(lr=0.2, sf_beta1=0.95, sf_beta1_anneal_steps=300, r=2.0, c_warmup=20),
]


def upstream_class():
    path = UPSTREAM / "adamc_schedulefree_plus_paper.py"
    if not path.exists():
        pytest.skip(f"upstream reference not present: {path}")
    name = "_upstream_adamc_schedulefree_plus_paper"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].AdamCScheduleFreePlusPaper


def _grads(problem: Problem, params) -> torch.Tensor:
    for p in params:
        p.grad = None
    loss = problem.loss(params)
    loss.backward()
    return loss


def run_plus(make_opt, problem: Problem, steps: int, how: str = "value", groups=None):
    """Train fresh params; returns (y, x, the optimizer)."""
    params = problem.params()
    opt = make_opt(params if groups is None else groups(params))
    opt.train()
    for _ in range(steps):
        if how == "closure":
            opt.step(lambda: _grads(problem, params))
        else:
            loss = _grads(problem, params)
            if how == "step_func":
                opt.step_func(loss.item())
            else:
                opt.step(loss.item() if how == "value" else loss)
    y = [p.detach().clone() for p in params]
    opt.eval()
    x = [p.detach().clone() for p in params]
    return y, x, opt


# ----------------------------------------------------------------------- the numpy oracle


def numpy_plus(problem: Problem, steps: int, groups: list[tuple[list[int], dict]]):
    """The rule with x, y and z all stored, float64 numpy; ``groups``: (param indices, the
    group's hyperparameters, upstream's names). The scalars shared by the groups (b_k, the
    Polyak factor) come from group 0. Returns (y, x)."""
    z = [np.array(p, dtype=np.float64) for p in problem.init]
    x = [a.copy() for a in z]
    y = [a.copy() for a in z]
    m = [np.zeros_like(a) for a in z]
    v = [np.zeros_like(a) for a in z]
    hp = []
    for _, h in groups:
        full = dict(
            lr=1.0, betas=(0.9, 0.95), sf_beta1=0.9, eps=1e-8, weight_decay=0.0, r=0.0
        ) | dict(polyak_beta=0.0, c_warmup=0, sf_beta1_anneal_steps=0, sf_beta1_max=0.965)
        full |= dict(weight_lr_power=2.0) | h
        hp.append(full)
    lr_max = [h["eps"] for h in hp]
    weight_sum = [0.0] * len(hp)
    e = 0.0
    h0 = hp[0]
    for k in range(steps):
        g = problem.grad_np(y)
        f = problem.loss_np(y)
        if h0["sf_beta1_anneal_steps"] > 0:
            t = min(k / h0["sf_beta1_anneal_steps"], 1.0)
            b = 1 - (1 - h0["sf_beta1"]) ** (1 - t) * (1 - h0["sf_beta1_max"]) ** t
        else:
            b = h0["sf_beta1"]
        l1 = sum(np.abs(gi).sum() for gi in g)
        ip = b * sum((gi * (zi - xi)).sum() for gi, zi, xi in zip(g, z, x))
        pb = h0["polyak_beta"]
        e = (pb * e + (1 - pb) * l1 * math.sqrt(math.pi / 2)) / (1 - pb ** (k + 1))
        polyak = max(0.0, f + ip) / e
        for gi_, ((indices, _), h) in enumerate(zip(groups, hp)):
            eta = max(h["lr"], h["eps"]) * polyak
            lr_max[gi_] = max(lr_max[gi_], eta)
            if k < h["c_warmup"]:
                c = 1.0
            else:
                w = (k + 1) ** h["r"] * lr_max[gi_] ** h["weight_lr_power"]
                weight_sum[gi_] += w
                c = w / weight_sum[gi_]
            b1, b2 = h["betas"]
            for i in indices:
                z[i] = z[i] - eta * eta * h["weight_decay"] * y[i]
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
                denom = np.sqrt(v[i] / (1 - b2 ** (k + 1))) + h["eps"]
                z[i] = z[i] - eta * (m[i] / (1 - b1 ** (k + 1))) / denom
                x[i] = (1 - c) * x[i] + c * z[i]
                y[i] = b * x[i] + (1 - b) * z[i]
    return y, x


@pytest.mark.parametrize("index", range(len(GRID)))
def test_matches_numpy_oracle(index):
    problem = Problem(seed=10 + index)
    y_np, x_np = numpy_plus(problem, STEPS, [(list(range(len(problem.init))), GRID[index])])
    for foreach in (False, True):
        y, x, _ = run_plus(
            lambda ps, f=foreach: sf_torch.AdamCScheduleFreePlus(ps, **GRID[index], foreach=f),
            problem,
            STEPS,
        )
        assert max_rel_diff(y, y_np) <= TOL, (index, foreach, "y")
        assert max_rel_diff(x, x_np) <= TOL, (index, foreach, "x")


def test_two_groups_match_numpy_oracle():
    problem = Problem(seed=21)
    spec = [([0, 1], dict(lr=0.4, weight_decay=3.0, sf_beta1_anneal_steps=40)), ([2, 3, 4], {})]
    spec[1][1].update(lr=0.2, betas=(0.7, 0.9), r=1.0, c_warmup=3)
    y_np, x_np = numpy_plus(problem, STEPS, spec)

    def groups(ps):
        return [{"params": [ps[i] for i in idx], **h} for idx, h in spec]

    y, x, _ = run_plus(sf_torch.AdamCScheduleFreePlus, problem, STEPS, groups=groups)
    assert max_rel_diff(y, y_np) <= TOL
    assert max_rel_diff(x, x_np) <= TOL


# ---------------------------------------------------------------------------- upstream main


@pytest.mark.parametrize("index", range(len(GRID)))
def test_matches_upstream(index):
    ref_cls = upstream_class()
    problem = Problem(seed=10 + index)
    y_ref, x_ref, ref = run_plus(lambda ps: ref_cls(ps, **GRID[index]), problem, STEPS, "step_func")
    for how, foreach in (
        ("value", False),
        ("closure", True),
        ("tensor", True),
        ("step_func", False),
    ):
        y, x, opt = run_plus(
            lambda ps, f=foreach: sf_torch.AdamCScheduleFreePlus(ps, **GRID[index], foreach=f),
            problem,
            STEPS,
            how,
        )
        # The same operations in upstream's order: the same bits (the float64 claim is
        # <= 1e-12; equality also holds where a problem amplifies round-off).
        assert max_rel_diff(y, y_ref) == 0.0, (index, how, "y")
        assert max_rel_diff(x, x_ref) == 0.0, (index, how, "x")
        for key in ("k", "scheduled_lr", "lr_max", "weight_sum", "grad_l1_ema", "ip_term"):
            assert opt.param_groups[0][key] == ref.param_groups[0][key], (index, how, key)


def test_two_groups_match_upstream():
    ref_cls = upstream_class()
    problem = Problem(seed=22)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.4, "weight_decay": 3.0},
            {"params": ps[2:], "lr": 0.2, "betas": (0.7, 0.9), "r": 1.0, "c_warmup": 3},
        ]

    kw = dict(sf_beta1_anneal_steps=40, polyak_beta=0.3)
    y_ref, x_ref, _ = run_plus(lambda g: ref_cls(g, **kw), problem, STEPS, "step_func", groups)
    y, x, _ = run_plus(
        lambda g: sf_torch.AdamCScheduleFreePlus(g, **kw), problem, STEPS, groups=groups
    )
    assert max_rel_diff(y, y_ref) == 0.0
    assert max_rel_diff(x, x_ref) == 0.0


# --------------------------------------------------------------- modes, checkpoints, errors


def test_eval_train_exact_with_annealing_and_eval_params():
    problem = Problem(seed=5)
    params = problem.params()
    opt = sf_torch.AdamCScheduleFreePlus(params, lr=0.3, sf_beta1_anneal_steps=10)
    for _ in range(15):
        opt.step(lambda: _grads(problem, params))
    y = [p.detach().clone() for p in params]
    x_view = opt.eval_params()
    assert opt.param_groups[0]["sf_beta1_k"] != 0.9
    opt.eval()
    assert all(torch.equal(a, p) for a, p in zip(x_view, params))
    assert all(torch.equal(opt.state[p]["x"], p) for p in params)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step(1.0)
    opt.train()
    assert all(torch.equal(a, p) for a, p in zip(y, params))
    assert "y" not in opt.state[params[0]]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_continues_bitwise(mode):
    problem = Problem(seed=6)
    kw = dict(lr=0.3, sf_beta1_anneal_steps=20, weight_decay=2.0, polyak_beta=0.5)
    params = problem.params()
    opt = sf_torch.AdamCScheduleFreePlus(params, **kw)
    for _ in range(8):
        opt.step(lambda: _grads(problem, params))
    if mode == "eval":
        opt.eval()
    saved = opt.state_dict()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = sf_torch.AdamCScheduleFreePlus(params2, lr=1.0)
    opt2.load_state_dict(saved)
    for o, ps in ((opt, params), (opt2, params2)):
        o.train()
        for _ in range(8):
            o.step(lambda ps=ps: _grads(problem, ps))
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_zero_gradient_gives_no_step():
    params = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]
    opt = sf_torch.AdamCScheduleFreePlus(params, lr=0.5)
    params[0].grad = torch.zeros_like(params[0])
    opt.step(2.0)  # upstream: ZeroDivisionError
    assert opt.param_groups[0]["scheduled_lr"] == 0.0
    assert torch.equal(params[0].detach(), torch.ones(3, dtype=torch.float64))


def test_bf16_params_with_float32_state_train():
    problem = Problem(seed=7)
    params = problem.params(torch.bfloat16)
    opt = sf_torch.AdamCScheduleFreePlus(params, lr=0.5, state_dtype=torch.float32)
    first = None
    for _ in range(60):
        loss = opt.step(lambda: _grads(problem, params))
        first = float(loss) if first is None else first
    assert opt.state[params[0]]["z"].dtype == torch.float32
    opt.eval()
    assert problem.loss([p.float() for p in params]).item() < 0.5 * first


@pytest.mark.parametrize(
    "name, value",
    [
        ("lr", -1.0),
        ("betas", (1.0, 0.9)),
        ("betas", (0.9, 1.0)),
        ("sf_beta1", 1.5),
        ("sf_beta1_max", 1.0),
        ("eps", -1e-8),
        ("weight_decay", -1.0),
        ("r", -1.0),
        ("polyak_beta", 1.0),
        ("c_warmup", 1.5),
        ("sf_beta1_anneal_steps", -1),
        ("weight_lr_power", float("nan")),
    ],
)
def test_out_of_range_hyperparameters(name, value):
    params = Problem(seed=0).params()
    with pytest.raises((ValueError, TypeError), match=name.split("[")[0]):
        sf_torch.AdamCScheduleFreePlus(params, **{name: value})


def test_step_errors_move_nothing():
    problem = Problem(seed=0)
    params = problem.params()
    opt = sf_torch.AdamCScheduleFreePlus(params, sf_beta1=1.0)
    with pytest.raises(ValueError, match="sf_beta1"):
        opt.param_groups[0]["sf_beta1_anneal_steps"] = 5  # annealing needs sf_beta1 < 1
        _grads(problem, params)
        opt.step(1.0)
    opt.param_groups[0]["sf_beta1_anneal_steps"] = 0
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(torch.ones(2))
    with pytest.raises(TypeError, match="loss"):
        opt.step("1.0")
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not opt.state


def test_deepspeed_refuses_it():
    deepspeed = pytest.importorskip("sf_torch.deepspeed")
    params = Problem(seed=0).params()
    with pytest.raises(ValueError, match="AdamCScheduleFreePlus is not supported"):
        deepspeed.initialize(
            model=torch.nn.Linear(2, 2),
            optimizer=sf_torch.AdamCScheduleFreePlus(params),
            config={"train_batch_size": 1},
        )


# --------------------------------------------------------------- DTensor params, 2 ranks

DIST_STEPS = 30
DIST_KW = dict(lr=0.3, sf_beta1_anneal_steps=20, weight_decay=2.0, polyak_beta=0.5)
DIST_SHAPES = [(5, 4), (4, 3), (7,)]  # Shard(0) (rows 3/2: uneven), Shard(0) (2/2), Replicate


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    problem = Problem(seed=12, shapes=DIST_SHAPES)
    placements = [[Shard(0)], [Shard(0)], [Replicate()]][: len(DIST_SHAPES)]
    params = [
        torch.nn.Parameter(distribute_tensor(p, mesh, pl))
        for p, pl in zip(problem.params(), placements)
    ]
    opt = sf_torch.AdamCScheduleFreePlus(params, **DIST_KW)
    for _ in range(DIST_STEPS):
        full = [torch.nn.Parameter(p.full_tensor()) for p in params]
        loss = _grads(problem, full)
        for p, q, pl in zip(params, full, placements):
            p.grad = distribute_tensor(q.grad, mesh, pl)
        # Each rank passes its own loss; their mean is the loss at y.
        opt.step(loss.item() * (1.0 + (0.25 if rank == 0 else -0.25)))
    # (full_tensor() of a replicated DTensor is its local tensor itself: clone before eval())
    y = [p.full_tensor().clone() for p in params]
    opt.eval()
    x = [p.full_tensor().clone() for p in params]
    if rank == 0:
        torch.save({"y": y, "x": x, "lr": opt.param_groups[0]["scheduled_lr"]}, out)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dtensor_sums_over_ranks(tmp_path):
    out = tmp_path / "dist.pt"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    problem = Problem(seed=12, shapes=DIST_SHAPES)
    y, x, opt = run_plus(
        lambda ps: sf_torch.AdamCScheduleFreePlus(ps, **DIST_KW), problem, DIST_STEPS
    )
    assert max_rel_diff(got["y"], y) <= TOL
    assert max_rel_diff(got["x"], x) <= TOL
    assert (
        abs(got["lr"] - opt.param_groups[0]["scheduled_lr"])
        <= TOL * opt.param_groups[0]["scheduled_lr"]
    )


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, _free_port(), sys.argv[1]), nprocs=2, join=True)
    print(json.dumps({"ok": True}))
