"""One DeepSpeed run on N CPU ranks (gloo), for tests/test_deepspeed.py.

Run as ``python tests/ds_worker.py OUT.pt '<json options>'``: spawns the ranks, trains the twin
MLP below with sf_torch.deepspeed, and rank 0 saves what the test compares (the weights the model
computes with after eval/train, the masters and z, counters, the trajectory after a checkpoint
resume) to OUT.pt. Every number in it comes from DeepSpeed's engine; the test computes the
expected values independently (a single-process sf_torch run, float64 formulas).
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import torch
import torch.multiprocessing as mp

IN, HIDDEN, OUT, ROWS = 8, 16, 4, 8  # ROWS: rows of one global micro-batch, split over ranks


def make_model(seed: int = 0) -> torch.nn.Module:
    rng = np.random.default_rng(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(scale=0.5, size=tuple(p.shape))))
    return model


def batch(micro_step: int, rank: int, world: int):
    """Rank r's share of global micro-batch `micro_step` (the same rows whatever the world)."""
    rng = np.random.default_rng([11, micro_step])
    x, y = rng.normal(size=(ROWS, IN)), rng.normal(size=(ROWS, OUT))
    per_rank = ROWS // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return torch.from_numpy(x[rows]).float(), torch.from_numpy(y[rows]).float()


def param_groups(model: torch.nn.Module, weight_decay: float):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "weight_decay": weight_decay},
        {"params": biases, "weight_decay": 0.0},
    ]


def ds_config(opts: dict, world: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": ROWS // world,
        "gradient_accumulation_steps": opts.get("ga", 1),
        "gradient_clipping": opts.get("clip", 0.0),
        "optimizer": {
            "type": opts.get("optimizer_type", "AdamWScheduleFree"),
            "params": opts["optimizer"],
        },
        "zero_optimization": {"stage": opts["stage"]},
        "bf16": {"enabled": opts["dtype"] == "bf16"},
        "fp16": {"enabled": opts["dtype"] == "fp16", "initial_scale_power": 8},
        "steps_per_print": 10**9,
    }
    if opts.get("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if opts.get("sub_group_size"):
        cfg["zero_optimization"]["sub_group_size"] = opts["sub_group_size"]
    if opts.get("resume_from"):
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def gathered(engine) -> list[torch.Tensor]:
    """The full weights the model computes with, as float32 copies (ZeRO-3: all-gathered)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().cpu().clone() for p in params]


def masters_and_z(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 master, z) of every model param, read through DeepSpeed's own accessors (ZeRO) or
    its wrapper's master lists (no ZeRO): the test computes x from these independently."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    import sf_torch.deepspeed as sfds

    client = sfds.client_optimizer(engine)
    wrapper = engine.optimizer
    pairs = {}
    if wrapper is client:
        pairs = {id(p): (p, client.state[p]["z"]) for p in engine.module.parameters()}
    elif hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
        for lp_group, fp32_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            for lp, master in zip(lp_group, fp32_group):
                pairs[id(lp)] = (master, client.state[master]["z"])
    out = []
    for p in engine.module.parameters():
        if pairs:
            master, z = pairs[id(p)]
        else:
            master, z = safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "z")
        out.append((master.detach().float().cpu().clone(), z.detach().float().cpu().clone()))
    return out


def train_steps(engine, start: int, stop: int, rank: int, world: int) -> list[float]:
    """Optimizer steps start..stop-1, each of `gradient_accumulation_steps` micro-steps."""
    losses = []
    dtype = next(engine.module.parameters()).dtype
    ga = engine.gradient_accumulation_steps()
    for micro_step in range(start * ga, stop * ga):
        x, y = (t.to(engine.device) for t in batch(micro_step, rank, world))
        loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def build(opts: dict, world: int):
    import sf_torch.deepspeed as sfds

    model = make_model()
    engine, *_ = sfds.initialize(
        model=model,
        model_parameters=param_groups(model, opts["optimizer"].get("weight_decay", 0.0)),
        config=ds_config(opts, world),
    )
    return engine


def resume_universal(engine, opts: dict, rank: int, world: int) -> dict:
    """Loads a universal checkpoint (saved in eval mode) and trains on: what the test compares."""
    import sf_torch.deepspeed as sfds

    n1, n2 = opts["steps"]
    folder, tag = os.path.split(os.path.normpath(opts["resume_from"]))
    engine.load_checkpoint(folder, tag=tag)
    client = sfds.client_optimizer(engine)
    result = {"rank": rank, "resumed_x_weights": gathered(engine)}
    result["resumed_train_mode"] = [g["train_mode"] for g in client.param_groups]
    result["resumed_k"] = [g["k"] for g in client.param_groups]
    sfds.train(engine)
    result["losses_resumed"] = train_steps(engine, n1, n1 + n2, rank, world)
    result["final_resumed"] = gathered(engine)
    result["k_resumed"] = [g["k"] for g in client.param_groups]
    return result


def worker(rank: int, world: int, port: int, opts: dict, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import deepspeed

    import sf_torch.deepspeed as sfds

    cpu = opts.get("device", "cpu") == "cpu"
    if not cpu:
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    n1, n2 = opts["steps"]
    result: dict = {}
    engine = build(opts, world)
    if opts.get("resume_from"):
        finish(resume_universal(engine, opts, rank, world), world, rank, out)
        return
    client = sfds.client_optimizer(engine)
    result["before"] = gathered(engine)
    train_steps(engine, 0, n1, rank, world)
    result["y_weights"] = gathered(engine)
    result["masters_z"] = masters_and_z(engine)
    result["rank"] = rank

    sfds.eval(engine)
    result["x_weights"] = gathered(engine)
    sfds.eval(engine)  # idempotent
    result["x_weights_again"] = gathered(engine)
    result["state_keys"] = sorted(len(s) for s in client.state.values())
    result["module_training"] = engine.module.training
    if engine.gradient_accumulation_steps() == 1:  # else engine.step() only counts a micro-step
        try:
            engine.step()
            result["step_in_eval"] = "no error"
        except RuntimeError as err:
            result["step_in_eval"] = str(err)
    ckpt = opts.get("checkpoint_dir") or os.path.join(os.path.dirname(out), "ckpt")
    engine.save_checkpoint(ckpt, tag="mid")  # saved in eval mode
    sfds.train(engine)
    result["y_weights_back"] = gathered(engine)
    engine.save_checkpoint(ckpt, tag="mid_train")  # the same point, saved in train mode
    result["losses_uninterrupted"] = train_steps(engine, n1, n1 + n2, rank, world)
    result["final_uninterrupted"] = gathered(engine)
    result["k"] = [g["k"] for g in client.param_groups]
    result["weight_sum"] = [g["weight_sum"] for g in client.param_groups]
    sfds.eval(engine)
    result["final_x"] = gathered(engine)

    resumed = build(opts, world)
    resumed.load_checkpoint(ckpt, tag="mid")
    result["resumed_x_weights"] = gathered(resumed)
    sfds.train(resumed)
    result["losses_resumed"] = train_steps(resumed, n1, n1 + n2, rank, world)
    result["final_resumed"] = gathered(resumed)
    result["k_resumed"] = [g["k"] for g in sfds.client_optimizer(resumed).param_groups]
    from_train = build(opts, world)
    from_train.load_checkpoint(ckpt, tag="mid_train")
    sfds.train(from_train)  # already in train mode: changes nothing
    train_steps(from_train, n1, n1 + n2, rank, world)
    result["final_resumed_from_train_mode"] = gathered(from_train)
    if opts.get("weights_only"):
        if rank == 0:
            result["refused_globals"] = refused_globals(os.path.join(ckpt, "mid_train"))
        if opts["stage"] == 0:  # the optimizer's state is in the model-states file
            plain = build(opts, world)
            path = os.path.join(ckpt, "mid_train", "mp_rank_00_model_states.pt")
            saved = torch.load(path)  # torch's default: weights_only=True
            plain.module.load_state_dict(saved["module"])
            plain.optimizer.load_state_dict(saved["optimizer"])
            train_steps(plain, n1, n1 + n2, rank, world)
            result["final_plain_load"] = gathered(plain)
    if opts["dtype"] == "fp16":  # an overflowing step is skipped: nothing moves, nothing counts
        before = gathered(resumed), [g["k"] for g in sfds.client_optimizer(resumed).param_groups]
        x, y = (t.to(resumed.device) for t in batch(10**6, rank, world))
        loss = torch.nn.functional.mse_loss(resumed(x.half()).float(), y) * float("inf")
        resumed.backward(loss)
        resumed.step()
        result["overflow"] = dict(
            weights_moved=max_abs(gathered(resumed), before[0]),
            k_before=before[1],
            k_after=[g["k"] for g in sfds.client_optimizer(resumed).param_groups],
            skipped=resumed.skipped_steps,
        )
    finish(result, world, rank, out)


def refused_globals(folder: str) -> dict[str, list[str]]:
    """Each file of a checkpoint tag folder, with the globals that ``torch.load``'s default
    (``weights_only=True``) refuses in it: allowed one at a time until it loads ([]: it loads as
    it is)."""
    import glob
    import importlib
    import re

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.pt"))):
        allowed: list = []
        while True:
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path)
                break
            except Exception as err:  # noqa: BLE001  (the refused global is in the message)
                found = re.search(r"Unsupported global: GLOBAL (\S+) was not", str(err))
                if found is None or len(allowed) > 20:
                    raise
                module, _, name = found.group(1).rpartition(".")
                allowed.append(getattr(importlib.import_module(module or "builtins"), name))
        out[os.path.basename(path)] = [f"{g.__module__}.{g.__qualname__}" for g in allowed]
    return out


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def finish(result: dict, world: int, rank: int, out: str) -> None:
    results = [None] * world
    torch.distributed.all_gather_object(results, result)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # The results are saved: leave now. Interpreter teardown with DeepSpeed's CPU comm threads
    # still alive occasionally aborts ("terminate called without an active exception").
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: str, opts: dict) -> None:
    world = opts.get("world", 2)
    if opts.get("device", "cpu") == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # the ranks inherit it
    torch.set_num_threads(1)
    mp.spawn(worker, args=(world, free_port(), opts, out), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
