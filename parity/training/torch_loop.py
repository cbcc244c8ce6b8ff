"""The training loop of every torch runner: one model, one optimizer, the same record.

A step zeroes the gradients, takes the loss and its gradient at ``y`` on step ``t``'s batch and
calls ``optimizer.step()``. An evaluation asks the runner's ``eval_params(optimizer)`` for
``x`` (new tensors, in parameter order), loads them into a second copy of the model, copies the
training BatchNorm statistics there and recomputes them at ``x``, and takes the eval-set loss:
the training model, its statistics and the optimizer are never touched, so evaluating cannot
perturb the trajectory (an ``eval()``/``train()`` round trip would round ``y`` by an ulp).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from parity import data as data_lib
from parity import handoff
from parity.config import RunConfig
from parity.models import canonical, torch_models
from parity.training.record import Record


def run(
    config: RunConfig,
    make_optimizer: Callable[[RunConfig, list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    eval_params: Callable[[torch.optim.Optimizer], list[torch.Tensor]],
    progress: Callable[[int], None] | None = None,
) -> Record:
    """Train ``config``'s model with ``make_optimizer(config, params)`` and record every step.

    On ``config.device``; ``config.dtype`` bfloat16 is bf16 params and compute (the optimizer
    state's dtype is ``make_optimizer``'s choice).
    """
    progress = progress or (lambda step: None)
    dtype = getattr(torch, config.dtype)
    device = device_for(config)
    if device == "cpu":
        # These models are tiny: one thread is faster (with two, the LM's step is ~15x slower
        # here) and runs side by side with other backends without oversubscribing cores.
        torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    data = data_lib.for_run(config)
    params0 = canonical.init_params(config.model, config.seed)
    buffers0 = canonical.init_buffers(config.model)
    model = torch_models.build(config.model, params0, buffers0, dtype).to(device)
    eval_model = torch_models.build(config.model, params0, buffers0, dtype).to(device)
    optimizer = make_optimizer(config, list(model.parameters()))
    if config.resume_from:
        snapshot = handoff.Snapshot.load(config.resume_from)
        if snapshot.k != config.first_step:
            raise ValueError(
                f"the snapshot is at step {snapshot.k}, the run starts at {config.first_step}"
            )
        handoff.load_into_torch(snapshot, model, optimizer)
    uses_batch_norm = torch_models.has_batch_norm(model)
    model.train()

    def tensor(array):
        return torch_models.inputs_to_torch(array, device, dtype)

    recal = [tensor(b) for b in data.recal_inputs]
    eval_inputs, eval_labels = tensor(data.eval_inputs), tensor(data.eval_labels)
    shapes = canonical.param_shapes(config.model)
    record = Record.empty(config.first_step, config.steps, shapes, np.dtype(config.host_dtype))

    @torch.no_grad()
    def evaluate() -> float:
        for target, x in zip(eval_model.parameters(), eval_params(optimizer)):
            target.copy_(x)
        for target, buffer in zip(eval_model.buffers(), model.buffers()):
            target.copy_(buffer)
        if uses_batch_norm:
            torch_models.recalibrate(eval_model, recal)
        eval_model.eval()
        return float(torch_models.loss(eval_model(eval_inputs), eval_labels))

    def observe(step):
        record.set_params(step, torch_models.to_canonical(config.model, model))
        if config.evaluates_at(step):
            record.eval_loss[step - config.first_step] = evaluate()

    start = time.perf_counter()
    observe(config.first_step)
    for step in range(config.first_step, config.steps):
        inputs, labels = data.train_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = torch_models.loss(model(tensor(inputs)), tensor(labels))
        loss.backward()
        if config.optimizer == "adamc_plus":  # its Polyak step size needs the loss at y
            optimizer.step(loss.detach())
        else:
            optimizer.step()
        record.train_loss[step - config.first_step] = loss.item()
        observe(step + 1)
        progress(step + 1)
    seconds = time.perf_counter() - start

    if config.save_to:
        handoff.snapshot_from_torch(config.model, config.optimizer, model, optimizer).save(
            config.save_to
        )
    record.meta = {
        "framework": f"torch {torch.__version__}",
        "devices": [str(next(model.parameters()).device)],
        "threads": torch.get_num_threads(),
        "loop_seconds": seconds,
    }
    return record


def device_for(config: RunConfig) -> str:
    """``config.device`` as torch names it, with a clear error where torch has no CUDA."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda: {torch.version.cuda}); run with --device cpu"
        )
    return config.device
