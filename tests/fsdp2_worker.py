"""sf_torch's optimizers on FSDP2 (``fully_shard``) params, on CPU ranks (gloo), for
tests/test_torch_fsdp2.py.

Run as ``python tests/fsdp2_worker.py OUT.pt '<json options>'`` with ``TRITON_INTERPRET=1`` (the
fused kernel then runs in Triton's interpreter): spawns ``opts["world"]`` ranks and runs the
scenarios of ``opts["mode"]``: "main" (2 ranks: every kind, implementation and dtype; mixed
precision; DCP checkpoints saved in train and eval mode and resumed; skip_nonfinite; refusals)
or "resize" (1 rank: the 2-rank checkpoint loaded onto one rank, sharded and unsharded). Rank 0
saves every rank's record to OUT.pt. The records hold full tensors (``full_tensor()``); the
tests compute what they must equal on their own (the ``schedulefree`` reference classes on one
process, float64).
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import torch
import torch.multiprocessing as mp

IN, HIDDEN, MID, ROWS = 6, 9, 2, 8
STEPS = 8  # steps of each trajectory
SAVE_AT = 4  # checkpoint after this many steps
KINDS = {
    "adamw": dict(lr=0.05, betas=(0.9, 0.99), warmup_steps=3, r=0.5),
    "sgd": dict(lr=0.1, momentum=0.8, warmup_steps=3),
    "radam": dict(lr=0.05, betas=(0.9, 0.99), silent_sgd_phase=False),
}
WEIGHT_DECAY = 0.01
IMPLS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(fused=True),
}


def make_model(dtype=torch.float32) -> torch.nn.Module:
    """Linear(6, 9), Tanh, Linear(9, 2), Linear(2, 1): on 2 ranks the shards are uneven (5/4
    rows, 1/1, 1/0: rank 1 holds an empty shard of the last layer), and the last layer stays
    in the root's group when the first two get a ``fully_shard`` of their own."""
    rng = np.random.default_rng(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, MID),
        torch.nn.Linear(MID, 1),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(scale=0.5, size=tuple(p.shape))))
    return model


def batch(step: int, rank: int = 0, world: int = 1):
    """Rank ``rank``'s rows of global batch ``step`` (float64)."""
    rng = np.random.default_rng([7, step])
    x, y = rng.normal(size=(ROWS, IN)), rng.normal(size=(ROWS, 1))
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    return torch.from_numpy(x[rows]), torch.from_numpy(y[rows])


def loss_of(model, step: int, rank: int = 0, world: int = 1, dtype=torch.float32):
    x, y = batch(step, rank, world)
    return torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))


def param_groups(model):
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def shard(model, mp_policy=None):
    """``fully_shard`` on the first two Linears, then on the root (the order FSDP2 asks)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    fully_shard(model[0], **kw)
    fully_shard(model[2], **kw)
    fully_shard(model, **kw)
    return model


def build(kind: str, impl: str, dtype=torch.float32, sharded: bool = True, **extra):
    import sf_torch

    classes = {
        "adamw": sf_torch.AdamWScheduleFree,
        "sgd": sf_torch.SGDScheduleFree,
        "radam": sf_torch.RAdamScheduleFree,
    }
    model = make_model(dtype)
    if sharded:
        shard(model, extra.pop("mp_policy", None))
    opt = classes[kind](param_groups(model), **KINDS[kind], **IMPLS[impl], **extra)
    return model, opt


def full(t):
    from sf_torch.dtensor import is_dtensor

    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


def record(model, opt) -> dict:
    """y (the params), z, v, x (eval_params) as full tensors, and the groups' counters."""
    from sf_torch.dtensor import is_dtensor

    params = list(model.parameters())
    # eval_params() follows the param groups (weights, then biases): back to the model's order
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    xs = dict(zip(in_groups, opt.eval_params()))
    out = {
        "y": [full(p) for p in params],
        "z": [full(opt.state[p]["z"]) for p in params],
        "x": [full(xs[id(p)]) for p in params],
        "counters": [
            {k: float(g[k]) for k in ("k", "weight_sum", "lr_max")} for g in opt.param_groups
        ],
        "train_mode": [g["train_mode"] for g in opt.param_groups],
    }
    if "exp_avg_sq" in opt.state[params[0]]:
        out["v"] = [full(opt.state[p]["exp_avg_sq"]) for p in params]
    # the state is sharded like its param: DTensors with the param's placements
    out["state_sharded"] = all(
        is_dtensor(t) == is_dtensor(p)
        and (not is_dtensor(p) or (t.placements == p.placements and t.device_mesh == p.device_mesh))
        for p in params
        for t in opt.state[p].values()
        if isinstance(t, torch.Tensor)
    )
    out["eval_params_dtensor"] = [is_dtensor(x) for x in xs.values()]
    return out


def train(model, opt, start: int, stop: int, rank: int, world: int, dtype=torch.float32):
    losses = []
    for step in range(start, stop):
        loss = loss_of(model, step, rank, world, dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


# -- scenarios ---------------------------------------------------------------------------------


def trajectories(rank: int, world: int) -> dict:
    """Every kind x implementation x dtype, STEPS steps; then eval()/train() round trip."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        for kind in KINDS:
            for impl in IMPLS:
                model, opt = build(kind, impl, dtype)
                train(model, opt, 0, STEPS, rank, world, dtype)
                rec = record(model, opt)
                opt.eval()  # right after a step's backward: every param is resharded
                rec["after_eval"] = [full(p) for p in model.parameters()]
                with torch.no_grad():  # a forward without backward leaves the root unsharded
                    rec["eval_loss"] = float(loss_of(model, 100, rank, world, dtype))
                model.reshard()
                opt.train()
                rec["after_train"] = [full(p) for p in model.parameters()]
                out[f"{kind}/{impl}/{str(dtype)[6:]}"] = rec
    return out


def stale_root(rank: int, world: int) -> dict:
    """What a forward sees after train() when the eval forward left the root's params
    unsharded and no reshard() followed (FSDP2 does not all-gather them again), and with it."""
    out = {}
    for with_reshard in (False, True):
        model, opt = build("adamw", "loop")
        train(model, opt, 0, 3, rank, world)
        opt.eval()
        with torch.no_grad():
            loss_of(model, 100, rank, world)
        if with_reshard:
            model.reshard()
        opt.train()
        with torch.no_grad():
            out[with_reshard] = float(loss_of(model, 101, rank, world))
    # the loss at y, from the params as they are (a plain model holding the full tensors)
    plain = make_model()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), model.parameters()):
            p.copy_(full(q))
        out["plain"] = float(loss_of(plain, 101, rank, world))
    return out


def mixed_precision(rank: int, world: int) -> dict:
    """bf16 compute, float32 reduce (MixedPrecisionPolicy): the optimizer steps the float32
    shards. Records each step's full gradients and the params before it, for a replay."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for impl in ("loop", "fused"):
        model, opt = build("adamw", impl, mp_policy=policy)
        y0 = [full(p) for p in model.parameters()]
        grads, dtypes = [], set()
        for step in range(STEPS):
            loss_of(model, step, rank, world, torch.bfloat16).backward()
            grads.append([full(p.grad) for p in model.parameters()])
            dtypes |= {str(p.dtype) for p in model.parameters()}
            dtypes |= {str(p.grad.dtype) for p in model.parameters()}
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[impl] = dict(y0=y0, grads=grads, final=record(model, opt), dtypes=sorted(dtypes))
    return out


def checkpoints(rank: int, world: int, folder: str) -> dict:
    """DCP checkpoints (get_state_dict / dcp.save, dcp.load / set_state_dict) saved after
    SAVE_AT steps in train mode and in eval mode (flattened optimizer state), resumed on fresh
    models and optimizers; the uninterrupted runs to compare with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    out = {}
    # get_state_dict on optimizers without state: torch's probe step must count nothing
    model, opt = build("adamw", "fused")
    get_state_dict(model, opt)
    model2, opt2 = build("adamw", "loop")
    opt2.eval()
    get_state_dict(model2, opt2)  # in eval mode too (a step there would raise)
    out["probe"] = {
        "k": [g["k"] for o in (opt, opt2) for g in o.param_groups],
        "z_is_y": all(
            torch.equal(full(o.state[p]["z"]), full(p))
            for m, o in ((model, opt), (model2, opt2))
            for p in m.parameters()
        ),
        "v_zero": all(
            not full(o.state[p]["exp_avg_sq"]).any()
            for m, o in ((model, opt), (model2, opt2))
            for p in m.parameters()
        ),
        "grads_none": all(p.grad is None for p in model.parameters()),
    }
    # uninterrupted runs, saving on the way (this model kept the probe's state: no change)
    for mode, flatten in (("train", False), ("eval", True)):
        if mode == "eval":
            model, opt = build("adamw", "fused")
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        train(model, opt, 0, SAVE_AT, rank, world)
        if mode == "eval":
            opt.eval()
            with torch.no_grad():
                loss_of(model, 100, rank, world)
            model.reshard()
        saved = record(model, opt)
        msd, osd = get_state_dict(model, opt, options=options)
        if flatten:
            saved["flat_keys"] = sorted(k for k in osd if k.startswith("param_groups.0.weight"))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, mode))
        if mode == "eval":
            opt.train()
        train(model, opt, SAVE_AT, STEPS, rank, world)
        out[mode] = {"saved": saved, "final": record(model, opt)}
        # resumed on a fresh model and optimizer
        model_r, opt_r = build("adamw", "fused")
        msd, osd = get_state_dict(model_r, opt_r, options=options)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(folder, mode))
        set_state_dict(
            model_r,
            opt_r,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=options,
        )
        loaded = record(model_r, opt_r)
        if mode == "eval":
            opt_r.train()
        train(model_r, opt_r, SAVE_AT, STEPS, rank, world)
        out[mode].update(loaded=loaded, resumed=record(model_r, opt_r))
    return out


def skip_nonfinite(rank: int, world: int) -> dict:
    """skip_nonfinite=True with an inf in rank 1's shard of one gradient only: both skip."""
    model, opt = build("adamw", "loop", skip_nonfinite=True)
    train(model, opt, 0, 2, rank, world)
    before = record(model, opt)
    loss_of(model, 2, rank, world).backward()
    if rank == world - 1:
        model[0].weight.grad.to_local()[0, 0] = float("inf")
    opt.step()
    opt.zero_grad(set_to_none=True)
    after = record(model, opt)
    train(model, opt, 3, 4, rank, world)
    return {"before": before, "after": after, "k_end": [g["k"] for g in opt.param_groups]}


def refusals(rank: int, world: int) -> dict:
    """Each implementation that cannot step DTensor params: its error message."""
    from torch.distributed.tensor import Replicate

    out = {}
    try:
        build("adamw", "fused", capturable=True)
    except RuntimeError as e:
        out["capturable"] = str(e)
    # z replicated by hand while its param is sharded: the fused kernel cannot step the
    # local shards; the loop takes DTensor ops (which redistribute)
    for impl in ("fused", "loop"):
        model, opt = build("adamw", impl)
        train(model, opt, 0, 1, rank, world)
        p = model[0].weight
        opt.state[p]["z"] = opt.state[p]["z"].redistribute(placements=[Replicate()])
        before = record(model, opt)
        loss_of(model, 1, rank, world).backward()
        try:
            opt.step()
            out[f"mismatch_{impl}"] = {"ok": True, "k": opt.param_groups[0]["k"]}
        except RuntimeError as e:
            out[f"mismatch_{impl}"] = {"ok": False, "error": str(e), "unchanged": before}
            out[f"mismatch_{impl}"]["after"] = record(model, opt)
        try:
            opt.eval()
            out[f"mismatch_{impl}_eval"] = "ok"
        except RuntimeError as e:
            out[f"mismatch_{impl}_eval"] = str(e)
    return out


def resize(rank: int, world: int, folder: str) -> dict:
    """The 2-rank train-mode checkpoint loaded onto this world (1 rank), into a fully_shard-ed
    model and into a plain one; then trained on to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}
    for sharded in (True, False):
        model, opt = build("adamw", "fused" if sharded else "loop", sharded=sharded)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(folder, "train"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loaded = record(model, opt)
        train(model, opt, SAVE_AT, STEPS, rank, world)
        out["sharded" if sharded else "plain"] = {"loaded": loaded, "final": record(model, opt)}
    return out


# -- the processes -----------------------------------------------------------------------------


def worker(rank: int, world: int, port: int, opts: dict, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import time

    timings = {}
    result = {"rank": rank}
    if opts["mode"] == "main":
        scenarios = {
            "trajectories": lambda: trajectories(rank, world),
            "stale_root": lambda: stale_root(rank, world),
            "mixed_precision": lambda: mixed_precision(rank, world),
            "checkpoints": lambda: checkpoints(rank, world, opts["folder"]),
            "skip_nonfinite": lambda: skip_nonfinite(rank, world),
            "refusals": lambda: refusals(rank, world),
        }
    else:
        scenarios = {"resize": lambda: resize(rank, world, opts["folder"])}
    for name, run in scenarios.items():
        start = time.perf_counter()
        result[name] = run()
        timings[name] = time.perf_counter() - start
    result["timings"] = timings
    results = [None] * world
    torch.distributed.all_gather_object(results, result)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: str, opts: dict) -> None:
    torch.set_num_threads(1)
    world = opts.get("world", 2)
    mp.spawn(worker, args=(world, free_port(), opts, out), nprocs=world, join=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], json.loads(sys.argv[2]))
