"""The three problems of the anytime study: sizes, sweep defaults, data, initial weights.

- ``digits``: parity's twin CNN (conv-BN-SiLU twice, average pool, dense) on scikit-learn's 8x8
  digits, with parity's data (``parity.data``): a stratified 75/25 split, step ``t`` training on
  the batch drawn from epoch ``t // steps_per_epoch``'s seeded permutation, BatchNorm statistics
  recomputed from 4 fixed training batches before every evaluation. AdamW, float32.
- ``charlm``: a pre-norm causal Transformer over the characters of CPython's own help topics
  (``pydoc_data.topics``: every topic's text, joined in sorted-key order, about 465k characters,
  103 distinct). The first 90% trains, the last 10% is held out. Step ``t``'s batch is
  ``batch`` windows of ``seq + 1`` characters at offsets drawn by a generator seeded with
  ``(seed, t)``; the eval set is ``eval_windows`` windows at evenly spaced offsets of the
  held-out text. AdamW, float32.
- ``convex``: multinomial logistic regression on the digits' training three quarters (pixels /
  16, plus a constant 1 for the bias), SGD in float64 from ``W = 0``::

      f(W) = mean_i CE(a_i^T W, y_i) + (lam / 2) ||W||_F^2,    W in R^{65 x 10},  lam = 1e-3.

  The 1347 training images are linearly separable (unregularised, the loss decreases forever
  along a separating direction: no minimiser, no finite D); with ``lam`` f is lam-strongly
  convex and ``W*`` is unique. ``f*`` comes from damped Newton in float64 (the Hessian is only
  650 x 650) to a gradient norm near round-off. Each epoch's batches cut a seeded permutation
  of the rows. Its loss is ``f(x) - f*``, computed in numpy from the evaluated weights, and its
  accuracy is on the held-out quarter.

Every number is made by numpy from the seed, so JAX and torch, and every run of the sweep, see
the same initial weights and the same batches in the same order. Parameters are in parity's
canonical layout (``parity.models.canonical``). Nothing here imports jax or torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from parity import data as parity_data
from parity.models import canonical

PROBLEMS = ("digits", "charlm", "convex")
SIZES = ("tiny", "small", "full")
LAM = 1e-3
CLASSES = 10

# The sweep each problem runs unless told otherwise (warmup None: T/20).
SWEEP_KEYS = ("optimizer", "methods", "lrs", "weight_decay", "warmup", "sf_b1", "sf_warmups",
              "sf_inner", "plus_lrs", "plus_weight_decay")  # fmt: skip
# AdamW problems also run SF AdamW with inner_momentum 0.9 and 0.5, and SF+ (AdamC + Polyak,
# sf_optax.adamc_plus) at base lrs around upstream's default 1 without decay (upstream's
# default; its AdamC decay is on another scale than AdamW's). SGD (convex) has neither.
_ADAMW = dict(optimizer="adamw", methods=("sf", "cosine", "wsd"), warmup=None, sf_b1=(0.9,),
              sf_inner=(0.9, 0.5), plus_lrs=(0.5, 1.0, 2.0), plus_weight_decay=0.0)  # fmt: skip
SWEEPS = {
    "digits": dict(_ADAMW, lrs=(3e-3, 1e-2, 3e-2, 1e-1), weight_decay=0.0, sf_warmups=()),
    "charlm": dict(_ADAMW, lrs=(1e-3, 3e-3, 1e-2, 3e-2), weight_decay=0.1, sf_warmups=()),
    "convex": dict(optimizer="sgd", methods=("sf", "cosine", "wsd", "constant", "sqrt"), warmup=0,
                   weight_decay=0.0, sf_inner=(), plus_lrs=(), plus_weight_decay=0.0),
}  # fmt: skip
# Per size: T, the batch, the evaluations and what else changes. tiny runs in CI, small on a CPU
# in minutes, full is digits' and convex's real size (CPU) and the LM's GPU size: ~4.1M training
# characters, about 10 passes over the text (more would measure overfitting: no dropout).
_LM = ("width", "layers", "heads", "seq", "mlp", "eval_windows")
_CONVEX_FULL = dict(steps=2000, batch=32, evals=100, lrs=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
                    sf_b1=(0.9, 0.95, 0.98), sf_warmups=(100,))  # fmt: skip
SIZE_SETTINGS = {
    "digits": {
        "tiny": dict(steps=16, batch=16, evals=4),
        "small": dict(steps=400, batch=32, evals=20),
        "full": dict(steps=1200, batch=32, evals=24),
    },
    "charlm": {
        "tiny": dict(zip(_LM, (16, 1, 2, 16, 32, 8)), steps=16, batch=4, evals=4),
        "small": dict(zip(_LM, (64, 2, 4, 64, 256, 64)), steps=600, batch=16, evals=20),
        "full": dict(zip(_LM, (192, 4, 4, 128, 768, 256)), steps=2000, batch=16, evals=20),
    },
    "convex": {
        "tiny": dict(steps=160, batch=16, evals=16, lrs=(0.5, 1.0, 2.0), sf_b1=(0.9,),
                     sf_warmups=(8,)),
        "small": _CONVEX_FULL,
        "full": _CONVEX_FULL,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One problem at one size: what every framework's trainer needs.

    ``params0`` and ``buffers0`` are canonical arrays of ``dtype``; ``train_batch(step)`` gives
    the inputs and integer labels of update ``step`` (0-based). ``sweep`` holds the defaults of
    :func:`bench.anytime.runs.plan`; ``info`` what the report says about the problem. ``l2``
    adds ``(l2 / 2) ||params||^2`` to the training loss. Where ``score`` is set (convex), the
    trainers record the trajectory (the evaluated weights, flattened, and the norms of the
    weights and gradients at every step) and ``score(weights)`` gives the losses and accuracies;
    otherwise they evaluate the model on the eval set themselves.
    """

    name: str
    steps: int
    batch: int
    evals: int
    sweep: dict
    params0: dict[str, np.ndarray]
    buffers0: dict[str, np.ndarray]
    eval_inputs: np.ndarray
    eval_labels: np.ndarray
    train_batch: Callable[[int], tuple[np.ndarray, np.ndarray]]
    info: dict
    recal_inputs: tuple[np.ndarray, ...] = ()
    lm: dict = field(default_factory=dict)  # charlm: vocab, width, layers, heads, seq, mlp
    dtype: type = np.float32
    l2: float = 0.0
    score: Callable[[np.ndarray], tuple[list, list]] | None = None
    metric: str = "eval loss"

    @property
    def has_accuracy(self) -> bool:
        return self.name != "charlm"

    def all_train_batches(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of updates ``0 .. steps - 1``, stacked on a leading step axis.

        Every run sees the same batches, so trainers move them to the device once: a copy
        from host memory per step would make the host wait for the device every step.
        """
        batches = [self.train_batch(step) for step in range(self.steps)]
        return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


def _windows(tokens: np.ndarray, seed: int, n: int, seq: int, step: int):
    starts = np.random.default_rng([seed, 11, step]).integers(0, len(tokens) - seq - 1, size=n)
    chunks = tokens[starts[:, None] + np.arange(seq + 1)]
    return chunks[:, :-1], chunks[:, 1:]


@functools.lru_cache(maxsize=1)
def topics_text() -> str:
    """The help topics' text: every ``pydoc_data.topics.topics`` value, in sorted-key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def char_tokens() -> tuple[np.ndarray, list[str]]:
    """``(tokens, vocabulary)``: the text as int32 indices into its sorted distinct characters."""
    text = topics_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text)), vocab


def lm_init(lm: dict, seed: int) -> dict[str, np.ndarray]:
    """Initial LM parameters in float64: LeCun-normal kernels, the residual branches' output
    projections further scaled by ``1 / sqrt(2 layers)`` (GPT-2's rule, so the residual stream
    does not grow with depth), N(0, 0.02^2) embeddings, unit LayerNorm scales, zero biases."""
    rng = np.random.default_rng([seed, 10])
    depth_scale = 1 / np.sqrt(2 * lm["layers"])
    params = {}
    for name, shape in canonical.param_shapes("lm", lm).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "kernel":
            value = rng.normal(size=shape) / np.sqrt(shape[0])
            if name.endswith(("attn.out.kernel", "mlp_out.kernel")):
                value *= depth_scale
        elif leaf in ("embedding", "pos"):
            value = rng.normal(size=shape) * 0.02
        elif leaf == "scale":
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        params[name] = value
    return params


# -- convex: the objective and its optimum (numpy, float64) ----------------------------------


@functools.lru_cache(maxsize=2)
def convex_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training features (with a trailing 1), labels, and the same of the held-out quarter."""
    d = parity_data.load("mlp", seed, 1, "float64")

    def with_bias(x):
        return np.hstack([x, np.ones((len(x), 1))])

    return (
        with_bias(d.train_inputs),
        d.train_labels.astype(np.int64),
        with_bias(d.eval_inputs),
        d.eval_labels.astype(np.int64),
    )


def _probabilities(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = a @ w
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def objective(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """f(W) for one W of shape (65, 10) or a stack (..., 65, 10) of them."""
    z = a @ w
    top = z.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(axis=-1))
    labels = np.broadcast_to(y[:, None], z.shape[:-1] + (1,))
    picked = np.take_along_axis(z, labels, axis=-1)[..., 0]
    return (lse - picked).mean(axis=-1) + 0.5 * LAM * (w * w).sum(axis=(-2, -1))


def gradient(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of f (the mean cross-entropy over the rows of ``a``, plus ``lam W``)."""
    p = _probabilities(a, w)
    p[np.arange(len(y)), y] -= 1.0
    return a.T @ p / len(y) + LAM * w


def _hessian(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``mean_i (a_i a_i^T) kron (diag p_i - p_i p_i^T) + lam I``, as a (650, 650) matrix."""
    n, d = a.shape
    p = _probabilities(a, w)
    s = p[:, :, None] * np.eye(CLASSES) - p[:, :, None] * p[:, None, :]
    h = (a.T @ (a[:, :, None, None] * s[:, None]).reshape(n, -1)) / n  # (d, d*C*C)
    h = h.reshape(d, d, CLASSES, CLASSES).transpose(0, 2, 1, 3).reshape(d * CLASSES, -1)
    return h + LAM * np.eye(d * CLASSES)


def accuracy(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (np.argmax(a @ w, axis=-1) == y).mean(axis=-1)


@functools.lru_cache(maxsize=2)
def convex_optimum(seed: int = 0) -> tuple[np.ndarray, dict]:
    """``(W*, facts)`` by damped Newton from W = 0 (Armijo backtracking; f is lam-strongly
    convex, so the full step is taken near W* and the convergence is quadratic). The facts: f*,
    the gradient norm and the largest Hessian eigenvalue (L*) at W*, D = ||W*||, ..."""
    a, y, test_a, test_y = convex_data(seed)
    shape = (a.shape[1], CLASSES)
    w = np.zeros(shape)
    f = float(objective(a, y, w))
    newton_steps = 0
    while newton_steps < 100:
        g = gradient(a, y, w)
        step = np.linalg.solve(_hessian(a, w), g.ravel()).reshape(shape)
        decrement = float((g * step).sum())  # f - f* ~ decrement / 2 near W*
        if decrement < 1e-28:
            break
        t = 1.0
        f_new = float(objective(a, y, w - step))
        while f_new > f - 0.25 * t * decrement and t > 1e-10:
            t *= 0.5
            f_new = float(objective(a, y, w - t * step))
        if f_new > f:  # round-off floor: no step decreases f any more
            break
        w, f = w - t * step, f_new
        newton_steps += 1
    return w, {
        "n_train": len(y),
        "n_test": len(test_y),
        "features": a.shape[1],
        "classes": CLASSES,
        "lam": LAM,
        "f_star": f,
        "grad_norm_at_optimum": float(np.linalg.norm(gradient(a, y, w))),
        "newton_steps": newton_steps,
        "L_star": float(np.linalg.eigvalsh(_hessian(a, w))[-1]),
        "test_acc_at_optimum": float(accuracy(test_a, test_y, w)),
        "D": float(np.linalg.norm(w)),  # W_0 = 0
        "max_feature_norm": float(np.linalg.norm(a, axis=1).max()),
    }


def batch_rows(n: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """(steps, batch) row indices: each epoch a seeded permutation, cut into full batches."""
    per_epoch = n // batch
    rng = np.random.default_rng([seed, 7])
    epochs = -(-steps // per_epoch)
    chunks = [
        rng.permutation(n)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)
    ]
    return np.concatenate(chunks)[:steps]


# -- loading ----------------------------------------------------------------------------------


def load(name: str, size: str, seed: int = 0, steps: int | None = None) -> Problem:
    """The problem ``name`` at ``size``, with data and initial weights drawn from ``seed``
    (and ``steps`` instead of the size's T, when given)."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    s = {**SWEEPS[name], **SIZE_SETTINGS[name][size]}
    if steps is not None:
        s["steps"] = steps
    sweep = {k: s[k] for k in SWEEP_KEYS}
    common = dict(name=name, steps=s["steps"], batch=s["batch"], evals=s["evals"], sweep=sweep)
    if name == "digits":
        data = parity_data.load("cnn", seed, s["batch"], "float32", recal_batches=4)
        return Problem(
            **common,
            params0=canonical.cast(canonical.init_params("cnn", seed), np.float32),
            buffers0=canonical.cast(canonical.init_buffers("cnn"), np.float32),
            eval_inputs=data.eval_inputs,
            eval_labels=data.eval_labels,
            train_batch=data.train_batch,
            info={"model": "parity cnn", "eval_examples": len(data.eval_labels)},
            recal_inputs=data.recal_inputs,
        )
    if name == "charlm":
        tokens, vocab = char_tokens()
        split = int(0.9 * len(tokens))
        train, held_out = tokens[:split], tokens[split:]
        lm = dict(vocab=len(vocab), **{k: s[k] for k in _LM if k != "eval_windows"})
        if lm["width"] % lm["heads"]:
            raise ValueError(f"width {lm['width']} must be a multiple of heads {lm['heads']}")
        starts = np.linspace(0, len(held_out) - lm["seq"] - 1, s["eval_windows"]).astype(np.int64)
        chunks = held_out[starts[:, None] + np.arange(lm["seq"] + 1)]
        return Problem(
            **common,
            params0=canonical.cast(lm_init(lm, seed), np.float32),
            buffers0={},
            eval_inputs=chunks[:, :-1],
            eval_labels=chunks[:, 1:],
            train_batch=functools.partial(_windows, train, seed, s["batch"], lm["seq"]),
            info={"model": lm, "eval_examples": len(chunks)},
            lm=lm,
        )
    a, y, test_a, test_y = convex_data(seed)
    w_star, facts = convex_optimum(seed)
    rows = batch_rows(len(y), s["batch"], s["steps"], seed)

    def score(weights: np.ndarray) -> tuple[list, list]:
        w = weights.reshape(len(weights), *w_star.shape)
        return (objective(a, y, w) - facts["f_star"]).tolist(), accuracy(test_a, test_y, w).tolist()

    return Problem(
        **common,
        params0={"w": np.zeros_like(w_star)},
        buffers0={},
        eval_inputs=test_a,
        eval_labels=test_y,
        train_batch=lambda step: (a[rows[step]], y[rows[step]]),
        info={"model": "linear (65 x 10)", "eval_examples": len(test_y), **facts},
        dtype=np.float64,
        l2=LAM,
        score=score,
        metric="f - f* (train objective)",
    )
