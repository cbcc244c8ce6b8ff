"""The training loop of the FSDP2 runner: sf_torch on torch's ``fully_shard`` over N ranks.

One process per rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` set by
the launcher). Every rank builds the twin model from the canonical init and shards it
(``shard``: ``fully_shard`` on its submodules, then on the root), then builds the optimizer
over the sharded params (DTensors): ``z`` and ``v`` are created sharded like them and every
step moves the local shards only. Rank ``r`` trains on its contiguous ``1/N`` share of step
``t``'s global batch; each rank's loss is the mean over its share and FSDP2's reduce-scatter
averages the gradients over the ranks, so with equal shares the gradient is the single-process
one (the CNN's BatchNorm averages its batch statistics over the ranks, as in
``deepspeed_loop``).

An evaluation never touches the training model: ``eval_params()`` gives ``x`` as DTensors,
gathered (``full_tensor()``, collective) into a plain copy of the model on every rank, whose
BatchNorm statistics are recomputed at ``x`` as in ``torch_loop``. The params are gathered and
recorded after every step; rank 0 keeps the record, the others return None.

``config.dtype`` bfloat16 is FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)``: float32 sharded params (``y``), ``z`` and ``v``, bf16 compute; the
record holds the float32 ``y`` (the single-process bf16 rows keep ``y`` in bf16).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parity import data as data_lib
from parity.config import RunConfig
from parity.models import canonical, torch_models
from parity.training.record import Record


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules that get a ``fully_shard`` of their own before the root: the LM's
    blocks (the root keeps the embedding, tied to the output, and the rest), otherwise every
    direct child holding params."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [m for m in model.children() if any(True for _ in m.parameters())]


def shard(model: torch.nn.Module, policy: MixedPrecisionPolicy) -> torch.nn.Module:
    """``fully_shard`` each of ``units(model)``, then the root (FSDP2's order: inner first)."""
    for unit in units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(
    config: RunConfig,
    make_optimizer: Callable[[RunConfig, list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    progress: Callable[[int], None] | None = None,
) -> Record | None:
    """Train ``config``'s model sharded by FSDP2 over the launched ranks; the record on rank 0."""
    progress = progress or (lambda step: None)
    on_cuda = config.device == "cuda"
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(1)  # as torch_loop: tiny models, one core per rank
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.distributed.init_process_group("nccl" if on_cuda else "gloo")
    try:
        return _run(config, make_optimizer, progress)
    finally:
        torch.distributed.destroy_process_group()


def _run(config, make_optimizer, progress):
    rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else None
    device = device or torch.device("cpu")
    mixed = config.dtype == "bfloat16"
    dtype = torch.float32 if mixed else getattr(torch, config.dtype)
    compute = getattr(torch, config.dtype)
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed else None,
        reduce_dtype=torch.float32 if mixed else None,
    )
    data = data_lib.for_run(config)
    params0 = canonical.init_params(config.model, config.seed)
    buffers0 = canonical.init_buffers(config.model)
    model = torch_models.build(config.model, params0, buffers0, dtype).to(device)
    eval_model = torch_models.build(config.model, params0, buffers0, compute).to(device)
    shard(model, policy)
    params = list(model.parameters())
    # make_optimizer gives bf16 runs float32 state; here y itself is float32 already
    optimizer = make_optimizer(config.replace(dtype="float32") if mixed else config, params)
    norms = [m for m in model.modules() if isinstance(m, torch_models.BatchNorm)]
    uses_batch_norm = bool(norms)
    model.train()

    def tensor(array, dt=compute):
        return torch_models.inputs_to_torch(array, device, dt)

    share = config.batch_size // ranks
    mine = slice(rank * share, (rank + 1) * share)
    recal = [tensor(b) for b in data.recal_inputs]
    eval_inputs, eval_labels = tensor(data.eval_inputs), tensor(data.eval_labels)
    shapes = canonical.param_shapes(config.model)
    record = Record.empty(config.first_step, config.steps, shapes, np.dtype(config.host_dtype))
    losses = torch.zeros(config.steps - config.first_step, dtype=torch.float64, device=device)
    for m in norms:
        m.sync_ranks = ranks > 1

    @torch.no_grad()
    def evaluate() -> float:
        xs = [full(x) for x in optimizer.eval_params()]  # collective
        for target, x in zip(eval_model.parameters(), xs):
            target.copy_(x)
        for target, buffer in zip(eval_model.buffers(), model.buffers()):
            target.copy_(buffer)
        if uses_batch_norm:
            torch_models.recalibrate(eval_model, recal)  # every rank, the same whole batches
        eval_model.eval()
        return float(torch_models.loss(eval_model(eval_inputs), eval_labels))

    def observe(step):
        ys = [full(p) for p in params]  # collective
        if rank == 0:
            record.set_params(step, torch_models.to_canonical(config.model, model, ys))
        if config.evaluates_at(step):
            record.eval_loss[step - config.first_step] = evaluate()

    # the same inputs as the single-process run: float32 data cast to the compute dtype there
    in_dtype = torch.float32 if mixed else compute
    start = time.perf_counter()
    observe(config.first_step)
    for step in range(config.first_step, config.steps):
        inputs, labels = data.train_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = torch_models.loss(model(tensor(inputs[mine], in_dtype)), tensor(labels[mine]))
        loss.backward()
        if config.optimizer == "adamc_plus":  # this rank's loss; the optimizer averages them
            optimizer.step(loss.detach())
        else:
            optimizer.step()
        losses[step - config.first_step] = loss.detach().double()
        observe(step + 1)
        if rank == 0:
            progress(step + 1)
    seconds = time.perf_counter() - start
    # The whole batch's loss: the mean of the equal shares' means.
    torch.distributed.all_reduce(losses)
    record.train_loss[:] = (losses / ranks).cpu().numpy()
    if rank != 0:
        return None
    record.meta = {
        "framework": f"torch {torch.__version__} (FSDP2 fully_shard)",
        "devices": [f"{ranks} ranks on {device.type}"],
        "ranks": ranks,
        "backend": torch.distributed.get_backend(),
        "mixed_precision": "bf16 compute, float32 reduce and params" if mixed else None,
        "loop_seconds": seconds,
    }
    return record
