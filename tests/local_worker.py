"""Local-step runs on N CPU ranks (gloo), for tests/test_torch_local.py and
tests/test_deepspeed_local.py.

Run as ``python tests/local_worker.py OUT.pt '<json options>'``: spawns the ranks, runs the
scenarios that ``opts["mode"]`` names ("torch": sf_torch.local.LocalSteps around torch.optim.SGD
and sf_torch's AdamW, float64; "deepspeed": the same through sf_torch.deepspeed) and rank 0 saves
every rank's record to OUT.pt. The tests compute what the records must hold on their own
(single-process loops, a plain K-worker simulation).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.multiprocessing as mp
from ds_worker import batch, free_port, make_model

# The Schedule-Free AdamW of the tests (one param group).
SF = {"lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "warmup_steps": 5}
SGD_LR = 0.1


def sf_sync(steps: int) -> tuple[int, ...]:
    """The sync schedule of the Schedule-Free runs: QSR on Schedule-Free's effective lr, whose
    rounds grow from 1 step (warmup) to several as the averaging weight c_t falls."""
    from sf_schedules.sync import ScheduleFreeQSR, sync_steps

    lrs = [SF["lr"] * min(1.0, (t + 1) / SF["warmup_steps"]) for t in range(steps)]
    rule = ScheduleFreeQSR(h_base=2, alpha=0.015, b1=SF["betas"][0], h_warm=1, warmup_steps=5)
    return sync_steps(rule, lrs)


def loss_of(model, step: int, rank: int, world: int, dtype=torch.float64):
    x, y = batch(step, rank, world)
    return torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))


def snapshot(opt) -> dict:
    """y (the params), z, v and x of a LocalSteps around sf_torch's AdamW, as copies."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "y": [p.detach().clone() for p in params],
        "z": [opt.state[p]["z"].clone() for p in params],
        "v": [opt.state[p]["exp_avg_sq"].clone() for p in params],
        "x": opt.eval_params(),
    }


# -- torch scenarios -------------------------------------------------------------------------


def sgd_run(rank: int, world: int, period: int, steps: int) -> list[list[torch.Tensor]]:
    from sf_schedules.sync import Constant, sync_steps
    from sf_torch.local import LocalSteps

    model = make_model().double()
    opt = LocalSteps(
        torch.optim.SGD(model.parameters(), lr=SGD_LR),
        sync_steps(Constant(period), [SGD_LR] * steps),
    )
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step, rank, world).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def sf_build(average_v: bool = False, steps: int = 60):
    import sf_torch
    from sf_torch.local import LocalSteps

    model = make_model().double()
    inner = sf_torch.AdamWScheduleFree(model.parameters(), **SF)
    return model, LocalSteps(inner, sf_sync(steps), average_second_moment=average_v)


def sf_train(model, opt, start: int, stop: int, rank: int, world: int) -> list[dict]:
    out = []
    for step in range(start, stop):
        opt.zero_grad()
        loss_of(model, step, rank, world).backward()
        opt.step()
        out.append(snapshot(opt))
    return out


def resume_run(rank: int, world: int, steps: int, save_at: int, folder: str) -> dict:
    """Saves mid-run (mid-round), trains on; a fresh model and wrapper load the files (with
    torch.load's default weights_only=True) and train the same steps."""
    model, opt = sf_build(steps=steps)
    sf_train(model, opt, 0, save_at, rank, world)
    path = os.path.join(folder, f"rank{rank}.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    sf_train(model, opt, save_at, steps, rank, world)
    fresh, fresh_opt = sf_build(steps=steps)
    saved = torch.load(path)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    steps_taken = fresh_opt.steps_taken
    sf_train(fresh, fresh_opt, save_at, steps, rank, world)
    return {
        "uninterrupted": snapshot(opt),
        "resumed": snapshot(fresh_opt),
        "steps_taken_after_load": steps_taken,
        "saved_entry": saved["optimizer"]["local_steps"],
        "syncs": (opt.syncs, fresh_opt.syncs),
    }


def errors(rank: int, world: int) -> dict:
    """Messages of the refused calls, and whether a refused step changed anything."""
    import sf_torch
    from sf_torch.local import LocalSteps

    out = {}
    model = make_model().double()
    opt = LocalSteps(torch.optim.SGD(model.parameters(), lr=SGD_LR), (1,))
    loss_of(model, 0, rank, world).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
    except RuntimeError as err:
        out["past_end"] = str(err)
    out["past_end_moved"] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out["past_end_count"] = opt.steps_taken
    sd = opt.state_dict()
    for key, value in (("world_size", world + 1), ("sync_steps", [2])):
        bad = {**sd, "local_steps": {**sd["local_steps"], key: value}}
        try:
            opt.load_state_dict(bad)
        except ValueError as err:
            out[f"load_{key}"] = str(err)
    try:
        opt.load_state_dict({k: v for k, v in sd.items() if k != "local_steps"})
    except ValueError as err:
        out["load_plain"] = str(err)
    # a name the optimizer's state lacks: a Schedule-Free optimizer's is refused at once; a
    # plain optimizer's, once its state exists, before the step that would sync moves anything
    model = make_model().double()
    try:
        LocalSteps(sf_torch.SGDScheduleFree(model.parameters()), (1,), average_second_moment=True)
    except ValueError as err:
        out["sf_bad_name"] = str(err)
    adam = LocalSteps(torch.optim.AdamW(model.parameters(), lr=0.01), (2, 3), average=("nope",))
    loss_of(model, 0, rank, world).backward()
    adam.step()  # not a sync step
    before = [p.detach().clone() for p in model.parameters()]
    try:
        adam.step()
    except ValueError as err:
        out["bad_name"] = str(err)
    out["bad_name_moved"] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out["bad_name_adam_step"] = float(adam.state[next(iter(model.parameters()))]["step"])
    out["bad_name_count"] = adam.steps_taken
    # skip_nonfinite: a skipped step is no step (both ranks skip it)
    model = make_model().double()
    skip = LocalSteps(
        sf_torch.AdamWScheduleFree(model.parameters(), lr=0.01, skip_nonfinite=True), (1, 2)
    )
    loss_of(model, 0, rank, world).backward()
    next(iter(model.parameters())).grad.fill_(float("nan"))
    skip.step()
    out["skipped_count"] = skip.steps_taken
    out["skipped_syncs"] = skip.syncs
    # eval/train are the inner Schedule-Free optimizer's; a plain optimizer has none
    try:
        opt.eval()
    except AttributeError as err:
        out["plain_eval"] = str(err)
    return out


def extras(rank: int, world: int) -> dict:
    """ScheduleFreeWrapper's z (kept apart from its base's state), a step GradScaler skips, and
    a torch lr scheduler driving LocalSteps."""
    import warnings

    import sf_torch
    from sf_torch.local import LocalSteps

    out: dict = {"wrapper": []}
    model = make_model().double()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=SGD_LR)
    opt = LocalSteps(sf_torch.ScheduleFreeWrapper(base, momentum=0.9), (2, 4))
    for step in range(4):
        opt.zero_grad()
        loss_of(model, step, rank, world).backward()
        opt.step()
        zs = [opt.optimizer.sf_state[p]["z"].clone() for p in params]
        out["wrapper"].append({"y": [p.detach().clone() for p in params], "z": zs})

    model = make_model().double()
    opt = LocalSteps(torch.optim.SGD(model.parameters(), lr=SGD_LR), (1, 2))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, 0, rank, world) * float("inf")).backward()
    scaler.step(opt)  # inf gradients on every rank: skipped, not counted
    scaler.update()
    out["scaler_skipped"] = (opt.steps_taken, opt.syncs)
    opt.zero_grad()
    scaler.scale(loss_of(model, 0, rank, world)).backward()
    scaler.step(opt)
    scaler.update()
    out["scaler_taken"] = (opt.steps_taken, opt.syncs)

    model = make_model().double()
    opt = LocalSteps(torch.optim.SGD(model.parameters(), lr=SGD_LR), (1, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
        lrs = []
        for step in range(3):
            opt.zero_grad()
            loss_of(model, step, rank, world).backward()
            opt.step()
            scheduler.step()
            lrs.append(opt.optimizer.param_groups[0]["lr"])
    out["scheduler_lrs"] = lrs
    out["scheduler_warnings"] = [str(w.message) for w in caught]

    # bf16 params: summed in float32, rounded once; sync_now averages whatever the count
    model = make_model().bfloat16()
    opt = LocalSteps(torch.optim.SGD(model.parameters(), lr=SGD_LR), (5,))
    loss_of(model, 0, rank, world, torch.bfloat16).backward()
    opt.step()
    out["bf16_before"] = [p.detach().clone() for p in model.parameters()]
    opt.sync_now()
    out["bf16_after"] = [p.detach().clone() for p in model.parameters()]
    out["bf16_count"] = (opt.steps_taken, opt.syncs)

    # a 1-rank group: averaging is a no-op, no collective
    from sf_torch.local import average_

    groups = [torch.distributed.new_group([r]) for r in range(world)]
    t = torch.arange(3.0) + rank
    out["one_rank"] = (average_([t], groups[rank]), t.clone())
    return out


def batchnorm_run(rank: int, world: int) -> dict:
    """A BatchNorm model trained with local steps, synced, at x, statistics recomputed from each
    rank's own batches and averaged."""
    import sf_torch
    from sf_torch.local import LocalSteps, recompute_batchnorm_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 4)
    ).double()
    opt = LocalSteps(sf_torch.AdamWScheduleFree(model.parameters(), lr=0.05), (3, 6))
    for step in range(6):
        opt.zero_grad()
        loss_of(model, step, rank, world).backward()
        opt.step()
    opt.eval()
    batches = [batch(100 + i, rank, world)[0].double() for i in range(3)]
    before = (model[1].running_mean.clone(), model[1].running_var.clone())
    with recompute_batchnorm_stats(model, batches) as used:
        stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    after = (model[1].running_mean.clone(), model[1].running_var.clone())
    return {
        "used": used,
        "weight": model[0].weight.detach().clone(),
        "bias": model[0].bias.detach().clone(),
        "batches": batches,
        "stats": stats,
        "restored": all(torch.equal(a, b) for a, b in zip(before, after)),
    }


def torch_mode(rank: int, world: int, opts: dict) -> dict:
    steps = opts.get("steps", 60)
    result = {"rank": rank}
    result["sgd_h1"] = sgd_run(rank, world, 1, 20)
    result["sgd_h2"] = sgd_run(rank, world, 2, 20)
    model, opt = sf_build(steps=steps)
    result["sf"] = sf_train(model, opt, 0, steps, rank, world)
    result["sf_syncs"] = opt.syncs
    model, opt = sf_build(average_v=True, steps=steps)
    result["sf_avg_v"] = sf_train(model, opt, 0, steps, rank, world)
    result["resume"] = resume_run(rank, world, steps, opts.get("save_at", 25), opts["folder"])
    result["errors"] = errors(rank, world)
    result["batchnorm"] = batchnorm_run(rank, world)
    result["extras"] = extras(rank, world)
    return result


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
    if opts["mode"] == "deepspeed":
        import deepspeed
        from local_worker_ds import deepspeed_mode

        deepspeed.init_distributed(dist_backend="gloo")
        result = deepspeed_mode(rank, world, opts)
    else:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        result = torch_mode(rank, world, opts)
    results = [None] * world
    torch.distributed.all_gather_object(results, result)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # results saved; skip teardown (DeepSpeed's comm threads, see ds_worker.py)


def main(out: str, opts: dict) -> None:
    if opts["mode"] == "deepspeed":
        os.environ["DS_ACCELERATOR"] = "cpu"  # the ranks inherit it
    torch.set_num_threads(1)
    world = opts.get("world", 2)
    mp.spawn(worker, args=(world, free_port(), opts, out), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
