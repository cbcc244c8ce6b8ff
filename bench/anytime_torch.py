"""The anytime benchmark's torch side: the models and the training loop.

Both models are parity's torch twins (``parity.models.torch_models``): the digits CNN, and the
LM with its sizes taken from the problem, loading the same canonical weights as the JAX side
(parity's layout mapping: a ``Linear`` weight is the transposed kernel).

Schedule-Free runs use ``sf_torch.AdamWScheduleFree`` and are evaluated at ``x`` from
``optimizer.eval_params()`` loaded into a second copy of the model, so evaluating never touches
the trajectory (an ``eval()``/``train()`` round trip would round ``y`` by an ulp). Baselines use
``torch.optim.AdamW`` with ``sf_torch.schedules.scheduler``; the learning rate of each step is
read back from the param group just before ``optimizer.step()``. CNN evaluations recompute the
BatchNorm statistics at the evaluated weights (parity's ``recalibrate``), for every method.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

import sf_torch
import sf_torch.schedules
from bench.anytime_problems import Problem
from bench.anytime_runs import RunSpec, run_record
from parity.models import torch_models


def build_model(problem: Problem) -> nn.Module:
    """The torch model of ``problem`` holding its canonical initial weights."""
    if problem.name == "digits":
        return torch_models.build("cnn", problem.params0, problem.buffers0, torch.float32)
    return torch_models.build("lm", problem.params0, dtype=torch.float32, lm=problem.lm)


def make_optimizer(spec: RunSpec, params) -> tuple[torch.optim.Optimizer, object]:
    """``(optimizer, scheduler)`` of ``spec``; the scheduler is None for Schedule-Free."""
    betas = (spec.b1, spec.b2)
    if spec.method == "sf":
        optimizer = sf_torch.AdamWScheduleFree(
            params,
            lr=spec.lr,
            betas=betas,
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            warmup_steps=spec.warmup,
        )
        return optimizer, None
    optimizer = torch.optim.AdamW(
        params, lr=spec.lr, betas=betas, eps=spec.eps, weight_decay=spec.weight_decay
    )
    return optimizer, sf_torch.schedules.scheduler(optimizer, spec.schedule)


class Trainer:
    """Trains ``problem``'s model with one :class:`RunSpec` at a time, from the same start."""

    framework = "torch"

    def __init__(self, problem: Problem, device: str = "cpu"):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"--device cuda, but torch {torch.__version__} sees no CUDA "
                "device; run with --device cpu"
            )
        if device == "cpu":
            # Small models: one thread is faster than two here, and leaves the other core free.
            torch.set_num_threads(1)
        # Full float32 matmuls, as the JAX side computes them.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.problem = problem
        self.device = device
        self.model0 = build_model(problem).to(device)
        self.eval_model = copy.deepcopy(self.model0)
        self._recal = [self._tensor(b) for b in problem.recal_inputs]
        self._eval_inputs = self._tensor(problem.eval_inputs)
        self._eval_labels = self._tensor(problem.eval_labels)
        inputs, labels = problem.all_train_batches()
        # One (N, C, H, W) or (N, T) tensor per step, on the device once for every run.
        per_step = inputs.shape[1:]
        inputs = self._tensor(inputs.reshape(-1, *per_step[1:]))
        self._train_inputs = inputs.reshape(len(labels), per_step[0], *inputs.shape[1:])
        self._train_labels = self._tensor(labels)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch_models.inputs_to_torch(array, self.device, torch.float32)

    @torch.no_grad()
    def _evaluate(self, weights, model) -> tuple[float, float]:
        for target, w in zip(self.eval_model.parameters(), weights):
            target.copy_(w)
        for target, buffer in zip(self.eval_model.buffers(), model.buffers()):
            target.copy_(buffer)
        if self._recal:
            torch_models.recalibrate(self.eval_model, self._recal)
        self.eval_model.eval()
        logits = self.eval_model(self._eval_inputs)
        loss = torch_models.loss(logits, self._eval_labels)
        accuracy = (logits.argmax(-1) == self._eval_labels).float().mean()
        return float(loss), float(accuracy)

    def run(self, spec: RunSpec) -> dict:
        """Train ``spec.horizon`` steps; eval loss (and accuracy) at ``spec.eval_steps``, and
        for the baselines the learning rate each step used."""
        model = copy.deepcopy(self.model0)
        model.train()
        optimizer, scheduler = make_optimizer(spec, list(model.parameters()))
        evals = set(spec.eval_steps)
        losses, accs, lrs = [], [], []

        def observe():
            if spec.method == "sf":
                weights = optimizer.eval_params()
            else:
                weights = [p.detach() for p in model.parameters()]
            loss, acc = self._evaluate(weights, model)
            losses.append(loss)
            accs.append(acc)

        start = time.perf_counter()
        if 0 in evals:
            observe()
        for step in range(spec.horizon):
            optimizer.zero_grad(set_to_none=True)
            logits = model(self._train_inputs[step])
            loss = torch_models.loss(logits, self._train_labels[step])
            loss.backward()
            if scheduler is not None:
                lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step + 1 in evals:
                observe()
        seconds = time.perf_counter() - start
        accs = accs if self.problem.has_accuracy else None
        return run_record(spec, losses, accs, lrs or None, seconds)


def backend(device: str) -> str:
    """Where torch computes, for the report."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu, 1 thread"
    return f"torch {torch.__version__} on {name}"
