"""The rows of ``python -m bench.local``, their sync lists and what they communicate; the data.

Nothing here imports jax: the test and the report use it without a device mesh.

The tasks (float32):

- ``charlm`` (the default): parity's flax LM twin (pre-norm Transformer, width 32, 2 layers, 4
  heads, context 32, MLP 128; ``bench.anytime.problems.lm_init`` weights) on the characters of
  CPython's help topics (``bench.anytime.problems.char_tokens``), first 90% for training: step
  ``t``'s global batch is ``workers * batch`` windows at offsets drawn from ``(seed, 21)``; the
  eval set is 256 evenly spaced windows of the held-out 10%.
- ``digits``: parity's digits MLP (64 pixels -> 64 ReLU -> 10, ``parity.models.canonical``) on
  scikit-learn's 8x8 digits split 75/25 by ``parity.data`` (1347 training images, 450 held
  out); step ``t``'s global batch is ``parity.data``'s batch of ``workers * batch`` images.

Worker ``k`` takes rows ``k * batch .. (k + 1) * batch`` of the global batch; data-parallel
sees the whole global batch every step, so every row consumes the same data in the same order.

What is counted (``volume``, in model-size units): one all-reduce (mean) of a vector the size
of the model is one unit, whatever its algorithm (a ring all-reduce sends ``2 (K - 1) / K``
model sizes per worker for every unit, the same factor in every row).

- data-parallel: the gradient is all-reduced every step, 1 unit per step (``T`` in all);
- local AdamW: a sync averages the params, 1 unit; Adam's moments stay per worker;
- local Schedule-Free: a sync averages ``y`` (the params) and ``z``, 2 units; ``v`` stays per
  worker. Averaging ``x`` needs both (``x = (y - (1 - b1) z) / b1``; ``y`` alone is not enough
  because the workers' ``z`` differ), so Schedule-Free's sync costs twice AdamW's.

A row's syncs are ``sf_schedules.sync.sync_steps(rule, lrs)`` for the learning rates of its
optimizer (for Schedule-Free: ``sf_schedules.constant(lr, warmup_steps)``, the rate its
warmup gives), so the last sync is step ``T``: every run ends averaged and is evaluated there
(Schedule-Free at ``x``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import sf_schedules
from parity import data as parity_data
from parity.models import canonical
from sf_schedules import sync

OPTIMIZERS = ("adamw", "sf")
UNITS_PER_SYNC = {"adamw": 1, "sf": 2}


TASKS = ("charlm", "digits")


@dataclass(frozen=True)
class Settings:
    """One benchmark: the task, the run length, the workers and the optimizers' constants.

    ``batch`` is each worker's; data-parallel steps on ``workers * batch``. ``lr`` is AdamW's
    peak (linear warmup, then cosine to 0), ``sf_lr`` Schedule-Free AdamW's (constant after
    the same linear warmup); ``b1`` is Schedule-Free's. Both use ``weight_decay``.
    ``h_base`` and the rules' constants: see :func:`rows`. :data:`DEFAULTS` holds each task's.
    """

    task: str = "digits"
    steps: int = 600
    workers: int = 4
    batch: int = 16
    warmup: int = 30
    lr: float = 1e-2
    sf_lr: float = 1e-2
    b1: float = 0.9
    weight_decay: float = 0.0
    h_base: int = 4

    def lrs(self, optimizer: str) -> np.ndarray:
        """The learning rate of every step (float64), as the optimizer applies it."""
        if optimizer == "adamw":
            sched = sf_schedules.cosine(self.lr, self.steps, warmup_steps=self.warmup)
        else:
            sched = sf_schedules.constant(self.sf_lr, warmup_steps=self.warmup)
        return sched.values(self.steps)

    def peak(self, optimizer: str) -> float:
        return self.lr if optimizer == "adamw" else self.sf_lr


DEFAULTS = {
    "digits": Settings("digits"),
    "charlm": Settings("charlm", batch=8, weight_decay=0.1),
}


@dataclass(frozen=True)
class Row:
    """One row: an optimizer and a way of communicating.

    ``rule`` is None for data-parallel (gradient all-reduce every step), else the
    ``sf_schedules.sync`` rule giving the sync steps of the local run.
    """

    name: str
    optimizer: str
    rule: object | None
    note: str = ""

    @property
    def data_parallel(self) -> bool:
        return self.rule is None


def rows(s: Settings) -> list[Row]:
    """The benchmark's rows for ``s``.

    Rule constants, with ``P`` the optimizer's peak lr and ``W`` the warmup (every rule keeps
    ``H = h_base`` during warmup):

    - constant ``H`` = 8 and 32;
    - QSR: ``H = max(h_base, floor((alpha / lr)^2))`` with ``alpha = P sqrt(h_base) / 2``:
      rounds start growing once the lr falls below ``P / 2`` (cosine's midpoint); on
      Schedule-Free's constant lr it is ``h_base`` throughout (a constant-``H`` row);
    - the 1/lr rule: ``H = max(h_base, floor(alpha / lr))`` with ``alpha = P h_base / 2``
      (growth from the same lr, linearly instead of quadratically);
    - ScheduleFreeQSR: QSR on ``y``'s effective lr ``lr ((1 - b1) + b1 c_t)`` with
      ``alpha = a P`` for ``a`` in (0.5, 1): late rounds ``(a / (1 - b1))^2`` = 25 and 100
      steps at ``b1 = 0.9``;
    - AveragingWindow: ``H = clip(floor(fraction / c_t), h_base, T)`` for fraction 0.1 and 0.25
      (rounds grow like ``fraction * t``).
    """
    out = [Row("data-parallel", "adamw", None, "gradient all-reduce every step")]
    for opt in OPTIMIZERS:
        peak, w, hb = s.peak(opt), s.warmup, s.h_base
        if opt == "sf":
            out.append(Row("data-parallel", opt, None, "gradient all-reduce every step"))
        for h in (8, 32):
            out.append(Row(f"constant H={h}", opt, sync.Constant(h)))
        qsr_alpha = peak * math.sqrt(hb) / 2
        out.append(
            Row(
                "QSR",
                opt,
                sync.QSR(hb, qsr_alpha, warmup_steps=w),
                f"alpha = {qsr_alpha:.3g}",
            )
        )
        inv_alpha = peak * hb / 2
        out.append(
            Row(
                "1/lr",
                opt,
                sync.inverse_lr(hb, inv_alpha, warmup_steps=w),
                f"alpha = {inv_alpha:.3g}",
            )
        )
        if opt == "sf":
            for a in (0.5, 1.0):
                out.append(
                    Row(
                        f"ScheduleFreeQSR a={a:g}",
                        opt,
                        sync.ScheduleFreeQSR(hb, a * peak, b1=s.b1, warmup_steps=w),
                        f"alpha = {a * peak:.3g}",
                    )
                )
            for f in (0.1, 0.25):
                out.append(
                    Row(
                        f"AveragingWindow f={f:g}",
                        opt,
                        sync.AveragingWindow(f, h_base=hb, h_max=s.steps, warmup_steps=w),
                    )
                )
    return out


def row_sync_steps(s: Settings, row: Row) -> tuple[int, ...]:
    """The 1-based steps after which the row's workers average (every step for data-parallel)."""
    if row.data_parallel:
        return tuple(range(1, s.steps + 1))
    return sync.sync_steps(row.rule, s.lrs(row.optimizer))


def volume(s: Settings, row: Row) -> int:
    """Model-size units the row communicates over the run (see the module docstring)."""
    if row.data_parallel:
        return s.steps
    return len(row_sync_steps(s, row)) * UNITS_PER_SYNC[row.optimizer]


# ---------------------------------------------------------------------------------------------
# The data


def lm_sizes(s: Settings) -> dict:
    """The char LM's sizes (``parity.models.canonical``'s LM keys)."""
    from bench.anytime import problems

    vocab = len(problems.char_tokens()[1])
    return dict(vocab=vocab, width=32, layers=2, heads=4, seq=32, mlp=128)


def init_params(s: Settings, seed: int) -> dict[str, np.ndarray]:
    """The model's initial weights for ``seed`` (float32, canonical names)."""
    if s.task == "digits":
        params = canonical.init_params("mlp", seed)
    else:
        from bench.anytime import problems

        params = problems.lm_init(lm_sizes(s), seed)
    return {k: v.astype(np.float32) for k, v in params.items()}


def worker_batches(s: Settings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every step's batches, shaped ``(steps, workers, batch, ...)``: worker ``k``'s slice
    ``k * batch .. (k + 1) * batch`` of step ``t``'s global batch of ``workers * batch``."""
    g = s.workers * s.batch
    if s.task == "digits":
        d = parity_data.load("mlp", seed, g, "float32")
        xs, ys = zip(*(d.train_batch(t) for t in range(s.steps)))
        x, y = np.stack(xs), np.stack(ys)
    else:
        train, _ = _char_split()
        seq = lm_sizes(s)["seq"]
        starts = np.random.default_rng([seed, 21]).integers(
            0, len(train) - seq - 1, size=(s.steps, g)
        )
        chunks = train[starts[..., None] + np.arange(seq + 1)]
        x, y = chunks[..., :-1], chunks[..., 1:]
    return (
        x.reshape(s.steps, s.workers, s.batch, *x.shape[2:]),
        y.reshape(s.steps, s.workers, s.batch, *y.shape[2:]),
    )


def _char_split() -> tuple[np.ndarray, np.ndarray]:
    from bench.anytime import problems

    tokens, _ = problems.char_tokens()
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:]


def eval_set(s: Settings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out inputs and labels: digits' held-out quarter (450 images); for the LM, 256
    windows at evenly spaced offsets of the held-out 10% of the text (the same for every
    seed)."""
    if s.task == "digits":
        d = parity_data.load("mlp", seed, 1, "float32")
        return d.eval_inputs, d.eval_labels
    _, held_out = _char_split()
    seq = lm_sizes(s)["seq"]
    starts = np.linspace(0, len(held_out) - seq - 1, 256).astype(np.int64)
    chunks = held_out[starts[:, None] + np.arange(seq + 1)]
    return chunks[:, :-1], chunks[:, 1:]
