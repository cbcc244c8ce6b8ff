"""The training loop of the ``local_torch`` runner: K torch ranks on gloo, local steps.

One process per worker (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` from
``torch.distributed.run``). Every rank builds the twin model from the canonical init, draws step
``t``'s batch and trains on its rows (``local_plan.share``) with the run's optimizer wrapped in
``sf_torch.local.LocalSteps``, which averages the params and Schedule-Free's ``z`` after the
steps of ``local_plan.sync_steps``. Nothing else is communicated while training.

Recording (``local_plan``'s module docstring says what the record holds): after every step the
ranks' params are all-gathered and rank 0 takes their mean and spread in numpy. An evaluation is
collective: every rank copies its ``y`` and ``z``, averages them over the group in place with
``sf_torch.local.average_`` (the sync's own all-reduce), reads ``x`` with the optimizer's
``eval_params()`` and puts its own ``y`` and ``z`` back (bitwise); the CNN's BatchNorm
statistics are recomputed at that ``x`` on each rank from its rows of the recalibration batches
(``torch_models.recalibrate``: the twins' BatchNorm, not torch's, so
``sf_torch.local.recompute_batchnorm_stats`` does not apply) and averaged with ``average_``. Rank
0 keeps the record, the others return None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from parity import data as data_lib
from parity.config import RunConfig
from parity.models import canonical, torch_models
from parity.training import local_plan
from parity.training.record import Record
from sf_torch.local import LocalSteps, average_


def run(
    config: RunConfig,
    make_optimizer: Callable[[RunConfig, list[torch.nn.Parameter]], torch.optim.Optimizer],
    progress: Callable[[int], None] | None = None,
) -> Record | None:
    """Train ``config``'s model on this rank's worker; the record on rank 0."""
    progress = progress or (lambda step: None)
    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if ranks != local_plan.workers(config):
        raise RuntimeError(
            f"{ranks} ranks were started for {local_plan.workers(config)} workers "
            "(local_torch.command starts one rank per worker)"
        )
    torch.set_num_threads(1)  # tiny models, one core per rank
    dist.init_process_group("gloo")
    try:
        return _run(config, make_optimizer, rank, ranks, progress)
    finally:
        dist.destroy_process_group()


def _run(config, make_optimizer, rank, ranks, progress):
    dtype = getattr(torch, config.dtype)
    data = data_lib.for_run(config)
    params0 = canonical.init_params(config.model, config.seed)
    buffers0 = canonical.init_buffers(config.model)
    model = torch_models.build(config.model, params0, buffers0, dtype)
    eval_model = torch_models.build(config.model, params0, buffers0, dtype)
    params = list(model.parameters())
    plain = local_plan.plain_sgd(config)
    if plain:
        inner = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        inner = make_optimizer(config, params)
    steps = local_plan.sync_steps(config)
    optimizer = LocalSteps(inner, steps)
    norms = [m for m in eval_model.modules() if isinstance(m, torch_models.BatchNorm)]
    model.train()

    def tensor(array):
        return torch_models.inputs_to_torch(array, None, dtype)

    mine = local_plan.share(config, rank)
    recal = [tensor(b[mine]) for b in data.recal_inputs]
    eval_inputs, eval_labels = tensor(data.eval_inputs), tensor(data.eval_labels)
    shapes = canonical.param_shapes(config.model)
    record = Record.empty(0, config.steps, shapes, np.dtype(config.host_dtype))
    spread = [0.0] * (config.steps + 1)

    def z_tensors() -> list[torch.Tensor]:
        if plain:
            return []
        return [inner.state[p]["z"] for p in params if "z" in inner.state.get(p, {})]

    @torch.no_grad()
    def averaged_x() -> list[torch.Tensor]:
        """x of the ranks' averaged y and z (collective); this rank's y and z unchanged."""
        live = params + z_tensors()
        saved = [t.clone() for t in live]
        average_(live)
        x = [p.detach().clone() for p in params] if plain else inner.eval_params()
        for t, s in zip(live, saved):
            t.copy_(s)
        return x

    @torch.no_grad()
    def evaluate() -> float:
        for target, x in zip(eval_model.parameters(), averaged_x()):
            target.copy_(x)
        if norms:
            torch_models.recalibrate(eval_model, recal)  # this rank's rows
            average_([t for m in norms for t in (m.mean, m.var)])
        eval_model.eval()
        return float(torch_models.loss(eval_model(eval_inputs), eval_labels))

    flat_size = sum(p.numel() for p in params)

    @torch.no_grad()
    def observe(step: int) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        gathered = [torch.empty(flat_size, dtype=flat.dtype) for _ in range(ranks)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            per_worker = []
            for g in gathered:
                tensors = list(torch.split(g, [p.numel() for p in params]))
                tensors = [t.view_as(p) for t, p in zip(tensors, params)]
                per_worker.append(torch_models.to_canonical(config.model, model, tensors))
            stacked = {n: np.stack([w[n] for w in per_worker]) for n in shapes}
            means, spread[step] = local_plan.summarize(stacked, config.host_dtype)
            record.set_params(step, means)
        if config.evaluates_at(step):
            loss = evaluate()  # collective
            if rank == 0:
                record.eval_loss[step] = loss

    losses = torch.zeros(config.steps, dtype=torch.float64)
    start = time.perf_counter()
    observe(0)
    for step in range(config.steps):
        inputs, labels = data.train_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = torch_models.loss(model(tensor(inputs[mine])), tensor(labels[mine]))
        loss.backward()
        optimizer.step()  # at a sync step: the average (collective)
        losses[step] = loss.item()
        observe(step + 1)
        if rank == 0:
            progress(step + 1)
    seconds = time.perf_counter() - start
    gathered = [torch.empty_like(losses) for _ in range(ranks)]
    dist.all_gather(gathered, losses)
    if optimizer.syncs != len(steps):
        raise RuntimeError(
            f"LocalSteps averaged {optimizer.syncs} times, the plan says {len(steps)}"
        )
    if rank != 0:
        return None
    worker_losses = torch.stack(gathered, dim=1).numpy()  # (steps, workers)
    record.train_loss[:] = worker_losses.mean(axis=1)
    record.meta = {
        "framework": f"torch {torch.__version__}",
        "devices": [f"{ranks} CPU ranks (gloo)"],
        "backend": dist.get_backend(),
        "optimizer": type(inner).__name__,
        "loop_seconds": seconds,
        **local_plan.meta(config, worker_losses, spread),
    }
    return record
