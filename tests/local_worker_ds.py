"""The DeepSpeed half of tests/local_worker.py: sf_torch.deepspeed with a local_steps section,
ZeRO stage 0, fp32 and bf16, on the ranks that local_worker.py spawned (gloo).

Per dtype: an engine trains STEPS steps (each rank its own share of every batch), saving a
checkpoint mid-round; a fresh engine loads it and trains the same steps; and, in fp32,
sf_torch.local.LocalSteps around a plain AdamWScheduleFree on the same group, for the test to
compare the trajectories.
"""

from __future__ import annotations

import os

import torch
from ds_worker import ROWS, batch, gathered, make_model
from local_worker import SF, sf_sync

STEPS = 30
SAVE_AT = 16  # mid-round: syncs after 15 and 18


def local_section(steps: int) -> dict:
    """The config of local_worker.sf_sync(steps) (b1, r, weight_lr_power: the optimizer's)."""
    return {
        "rule": "schedule_free_qsr",
        "h_base": 2,
        "alpha": 0.015,
        "h_warm": 1,
        "warmup_steps": 5,
        "total_steps": steps,
    }


def ds_config(dtype: str, world: int, steps: int = STEPS, ga: int = 1) -> dict:
    return {
        "train_micro_batch_size_per_gpu": ROWS // world,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": 0.0,
        "optimizer": {
            "type": "AdamWScheduleFree",
            "params": dict(SF, betas=list(SF["betas"])),
        },
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
        "local_steps": local_section(steps),
    }


def build(dtype: str, world: int, ga: int = 1):
    import sf_torch.deepspeed as sfds

    model = make_model()
    engine, *_ = sfds.initialize(model=model, config=ds_config(dtype, world, ga=ga))
    return engine


def masters_z_v(engine) -> dict:
    """The client's params (fp32: the model's weights; bf16: DeepSpeed's fp32 masters), z, v."""
    import sf_torch.deepspeed as sfds

    client = sfds.client_optimizer(engine)
    params = [p for g in client.param_groups for p in g["params"]]
    return {
        "masters": [p.detach().clone() for p in params],
        "z": [client.state[p]["z"].clone() for p in params],
        "v": [client.state[p]["exp_avg_sq"].clone() for p in params],
    }


def step_once(engine, step: int, rank: int, world: int) -> None:
    """One optimizer step: its gradient_accumulation_steps micro-batches."""
    dtype = next(engine.module.parameters()).dtype
    ga = engine.gradient_accumulation_steps()
    for micro in range(step * ga, (step + 1) * ga):
        x, y = batch(micro, rank, world)
        loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()


def engine_run(dtype: str, rank: int, world: int, folder: str) -> dict:
    import sf_torch.deepspeed as sfds

    engine = build(dtype, world)
    out = {"weights": [], "masters": []}
    for step in range(STEPS):
        step_once(engine, step, rank, world)
        out["weights"].append(gathered(engine))
        out["masters"].append(masters_z_v(engine)["masters"])
        if step + 1 == SAVE_AT:
            engine.save_checkpoint(folder, tag="mid")
    out["final"] = masters_z_v(engine)
    out["local_state"] = sfds.local_state(engine)
    try:
        step_once(engine, STEPS, rank, world)
    except RuntimeError as err:
        out["past_end"] = str(err)
    out["past_end_weights"] = gathered(engine)
    sfds.eval(engine)
    out["x_weights"] = gathered(engine)
    sfds.train(engine)
    out["y_weights_back"] = gathered(engine)

    resumed = build(dtype, world)
    resumed.load_checkpoint(folder, tag="mid")
    out["resumed_state"] = sfds.local_state(resumed)
    for step in range(SAVE_AT, STEPS):
        step_once(resumed, step, rank, world)
    out["resumed_final"] = masters_z_v(resumed)
    out["resumed_weights"] = gathered(resumed)
    out["files"] = sorted(os.listdir(os.path.join(folder, "mid")))
    return out


def local_steps_run(rank: int, world: int, ga: int = 1) -> dict:
    """The same run with sf_torch.local.LocalSteps on a plain model (no DeepSpeed), fp32."""
    import sf_torch
    from sf_torch.local import LocalSteps

    model = make_model()
    opt = LocalSteps(sf_torch.AdamWScheduleFree(model.parameters(), **SF), sf_sync(STEPS))
    weights = []
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(step * ga, (step + 1) * ga):
            x, y = batch(micro, rank, world)
            (torch.nn.functional.mse_loss(model(x), y) / ga).backward()
        opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    return {"weights": weights, "x": opt.eval_params()}


def deepspeed_mode(rank: int, world: int, opts: dict) -> dict:
    result = {"rank": rank, "local_steps": local_steps_run(rank, world)}
    for dtype in opts.get("dtypes", ("fp32", "bf16")):
        folder = os.path.join(opts["folder"], dtype)
        result[dtype] = engine_run(dtype, rank, world, folder)
    # gradient accumulation: 2 micro-batches per step, accumulated locally
    result["local_steps_ga"] = local_steps_run(rank, world, ga=2)
    engine = build("fp32", world, ga=2)
    result["ga_weights"] = []
    for step in range(STEPS):
        step_once(engine, step, rank, world)
        result["ga_weights"].append(gathered(engine))
    return result
