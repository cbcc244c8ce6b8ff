"""The training loop of the DeepSpeed runner: sf_torch under ``sf_torch.deepspeed`` on N ranks.

One process per rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` set by
the launcher). Every rank builds the twin model from the canonical init and draws step ``t``'s
global batch; rank ``r`` trains on its contiguous ``1/N`` share. Each rank's loss is the mean
over its share and DeepSpeed averages the gradients over the ranks, so with equal shares the
gradient is the single-process one; the CNN's BatchNorm averages its batch statistics over the
ranks (``torch_models.BatchNorm.sync_ranks``), so they are the whole batch's too.

An evaluation is collective: ``sf_torch.deepspeed.eval(engine)`` puts ``x`` into the weights
the model computes with, BatchNorm statistics are recomputed at ``x`` from the same
recalibration batches as ``torch_loop`` (the training statistics come back afterwards), the
eval-set loss is taken, and ``sf_torch.deepspeed.train(engine)`` puts ``y`` back. The weights
are recorded after every step (ZeRO-3: gathered with ``deepspeed.zero.GatheredParameters``);
rank 0 keeps the record, the others return None.

``config.dtype`` bfloat16 is DeepSpeed's ``"bf16"`` mode: bf16 weights and compute, float32
masters (``y``) and optimizer state; the record holds the bf16 weights the model computes with
(the single-process bf16 runs keep ``y`` itself in bf16: a different scheme, see the runner).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import deepspeed
import numpy as np
import torch

import sf_torch.deepspeed as sfds
from parity import data as data_lib
from parity.config import RunConfig
from parity.models import canonical, torch_models
from parity.training.record import Record


def ds_config(config: RunConfig, stage: int, ranks: int) -> dict:
    """The DeepSpeed config: one micro-batch per rank and step, no clipping, ZeRO ``stage``."""
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter (the default keeps small ones whole on every rank, and
        # these models have only small ones).
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size // ranks,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the single-process run has none
        "zero_optimization": zero,
        "bf16": {"enabled": config.dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }


def run(
    config: RunConfig,
    make_optimizer: Callable[[RunConfig, list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    stage: int,
    progress: Callable[[int], None] | None = None,
) -> Record | None:
    """Train ``config``'s model under DeepSpeed ZeRO ``stage``; the record on rank 0."""
    progress = progress or (lambda step: None)
    on_cuda = config.device == "cuda"
    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(1)  # as torch_loop: tiny models, one core per rank
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    try:
        return _run(config, make_optimizer, stage, rank, ranks, progress)
    finally:
        torch.distributed.destroy_process_group()


def _run(config, make_optimizer, stage, rank, ranks, progress):
    # Built in the run's dtype, as torch_loop builds it: under bf16 the float32 masters start
    # from the same bf16 init as the single-process run, and the BatchNorm statistics are bf16
    # as there (DeepSpeed casts parameters only).
    dtype = getattr(torch, config.dtype)
    data = data_lib.for_run(config)
    params0 = canonical.init_params(config.model, config.seed)
    model = torch_models.build(config.model, params0, canonical.init_buffers(config.model), dtype)
    norms = [m for m in model.modules() if isinstance(m, torch_models.BatchNorm)]
    optimizer = make_optimizer(config, list(model.parameters()))
    engine, *_ = sfds.initialize(
        model=model, optimizer=optimizer, config=ds_config(config, stage, ranks)
    )
    module, device = engine.module, engine.device
    params = list(module.parameters())
    zero3 = hasattr(params[0], "ds_id")

    def tensor(array):
        return torch_models.inputs_to_torch(array, device, dtype)

    share = config.batch_size // ranks
    mine = slice(rank * share, (rank + 1) * share)
    recal = [tensor(b) for b in data.recal_inputs]
    eval_inputs, eval_labels = tensor(data.eval_inputs), tensor(data.eval_labels)
    shapes = canonical.param_shapes(config.model)
    record = Record.empty(config.first_step, config.steps, shapes, np.dtype(config.host_dtype))
    losses = torch.zeros(config.steps - config.first_step, dtype=torch.float64, device=device)

    def sync_batch_norm(on: bool) -> None:
        for m in norms:
            m.sync_ranks = on and ranks > 1

    @torch.no_grad()
    def evaluate() -> float:
        sfds.eval(engine)  # collective: x in the weights on every rank
        saved = [b.clone() for b in module.buffers()]
        if norms:
            sync_batch_norm(False)  # every rank recalibrates on the same whole batches
            torch_models.recalibrate(module, recal)
            sync_batch_norm(True)
        module.eval()
        loss = float(torch_models.loss(engine(eval_inputs), eval_labels))
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)
        sfds.train(engine)
        return loss

    def observe(step):
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):  # collective
            if rank == 0:
                record.set_params(step, torch_models.to_canonical(config.model, module))
        if config.evaluates_at(step):
            record.eval_loss[step - config.first_step] = evaluate()

    sync_batch_norm(True)
    start = time.perf_counter()
    observe(config.first_step)
    for step in range(config.first_step, config.steps):
        inputs, labels = data.train_batch(step)
        loss = torch_models.loss(engine(tensor(inputs[mine])), tensor(labels[mine]))
        engine.backward(loss)
        engine.step()
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
        "framework": f"torch {torch.__version__}, deepspeed {deepspeed.__version__}",
        "devices": [f"{ranks} ranks on {device.type}"],
        "zero_stage": stage,
        "ranks": ranks,
        "backend": torch.distributed.get_backend(),
        "optimizer_wrapper": type(engine.optimizer).__name__,
        "loop_seconds": seconds,
    }
    return record
