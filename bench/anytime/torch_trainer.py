"""The anytime study's torch side: the models and the training loop.

Models: parity's torch twins (``parity.models.torch_models``) for digits and charlm, loading the
same canonical weights as the JAX side (parity's layout mapping: a ``Linear`` weight is the
transposed kernel), and :class:`Linear` for convex, in the problem's dtype.

Schedule-Free runs use ``sf_torch.AdamWScheduleFree`` / ``sf_torch.SGDScheduleFree`` and are
evaluated at ``x`` from ``optimizer.eval_params()`` loaded into a second copy of the model, so
evaluating never touches the trajectory (an ``eval()``/``train()`` round trip would round ``y``
by an ulp). SF+ uses ``sf_torch.AdamCScheduleFreePlus`` stepped with the batch loss, its base
lr set by the scheduler as a baseline's. Baselines use ``torch.optim.AdamW`` /
``torch.optim.SGD`` with ``sf_torch.schedules.scheduler``; the learning rate of each step is
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
from bench.anytime.problems import Problem
from bench.anytime.runs import PLUS, RunSpec, run_record
from parity.models import torch_models


class Linear(nn.Module):
    """Logits ``inputs @ W`` (convex: the bias is a constant input feature)."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(w.copy()))

    def forward(self, x):
        return x @ self.w


def build_model(problem: Problem) -> nn.Module:
    """The torch model of ``problem`` holding its canonical initial weights."""
    if problem.name == "convex":
        return Linear(problem.params0["w"])
    if problem.name == "digits":
        return torch_models.build("cnn", problem.params0, problem.buffers0, torch.float32)
    return torch_models.build("lm", problem.params0, dtype=torch.float32, lm=problem.lm)


def make_optimizer(spec: RunSpec, params) -> tuple[torch.optim.Optimizer, object]:
    """``(optimizer, scheduler)`` of ``spec``; the scheduler is None for Schedule-Free (``sf``)."""
    common = dict(lr=spec.lr, weight_decay=spec.weight_decay)
    adam = dict(betas=(spec.b1, spec.b2), eps=spec.eps)
    if spec.method == PLUS:
        plus = sf_torch.AdamCScheduleFreePlus(params, c_warmup=spec.warmup, **adam, **common)
        return plus, sf_torch.schedules.scheduler(plus, spec.schedule)
    if spec.method == "sf":
        if spec.optimizer == "sgd":
            sf = sf_torch.SGDScheduleFree(
                params, momentum=spec.b1, warmup_steps=spec.warmup, **common
            )
        else:
            sf = sf_torch.AdamWScheduleFree(
                params,
                warmup_steps=spec.warmup,
                inner_momentum=spec.inner_momentum,
                **adam,
                **common,
            )
        return sf, None
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, **common)
    else:
        optimizer = torch.optim.AdamW(params, **adam, **common)
    return optimizer, sf_torch.schedules.scheduler(optimizer, spec.schedule)


@torch.no_grad()
def _norm(tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]))


class Trainer:
    """Trains ``problem``'s model with one :class:`RunSpec` at a time, from the same start."""

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
        self.dtype = torch.float64 if problem.dtype == np.float64 else torch.float32
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
        return torch_models.inputs_to_torch(array, self.device, self.dtype)

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

    def _loss(self, model: nn.Module, step: int) -> torch.Tensor:
        loss = torch_models.loss(model(self._train_inputs[step]), self._train_labels[step])
        if self.problem.l2:
            loss = loss + 0.5 * self.problem.l2 * sum((p * p).sum() for p in model.parameters())
        return loss

    def run(self, spec: RunSpec) -> dict:
        """Train ``spec.horizon`` steps; losses (and accuracies) at ``spec.eval_steps``, for the
        baselines the learning rate each step used, and for a scored problem its
        ``trajectory``."""
        model = copy.deepcopy(self.model0)
        model.train()
        params = list(model.parameters())
        optimizer, scheduler = make_optimizer(spec, params)
        scored = self.problem.score is not None
        evals = set(spec.eval_steps)
        losses, accs, lrs, snaps, w_norm, g_norm = [], [], [], [], [], []

        def observe():
            if spec.method in ("sf", PLUS):
                weights = optimizer.eval_params()
            else:
                weights = [p.detach() for p in params]
            if scored:
                snaps.append(torch.cat([w.reshape(-1) for w in weights]).cpu().numpy())
                return
            loss, acc = self._evaluate(weights, model)
            losses.append(loss)
            accs.append(acc)

        start = time.perf_counter()
        if 0 in evals:
            observe()
        for step in range(spec.horizon):
            optimizer.zero_grad(set_to_none=True)
            loss = self._loss(model, step)
            loss.backward()
            if scored:
                w_norm.append(_norm(params))
                g_norm.append(_norm([p.grad for p in params]))
            if scheduler is not None:
                lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step(loss.detach()) if spec.method == PLUS else optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step + 1 in evals:
                observe()
        seconds = time.perf_counter() - start
        trajectory = None
        if scored:
            trajectory = {
                "snaps": np.stack(snaps),
                "w_norm": torch.stack([*w_norm, _norm(params)]).cpu().numpy(),
                "g_norm": torch.stack(g_norm).cpu().numpy(),
            }
            losses, accs = self.problem.score(trajectory["snaps"])
        accs = accs if self.problem.has_accuracy else None
        return {**run_record(spec, losses, accs, lrs or None, seconds), "trajectory": trajectory}


def backend(device: str) -> str:
    """Where torch computes, for the report."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu, 1 thread"
    return f"torch {torch.__version__} on {name}"
