"""The two problems of the anytime benchmark, framework-neutral: sizes, data, initial weights.

- ``digits``: parity's twin CNN (conv-BN-SiLU twice, average pool, dense) on scikit-learn's 8x8
  digits, with parity's data (``parity.data``): a stratified 75/25 split, step ``t`` training on
  the batch drawn from epoch ``t // steps_per_epoch``'s seeded permutation, BatchNorm statistics
  recomputed from 4 fixed training batches before every evaluation.
- ``charlm``: a pre-norm causal Transformer over the characters of CPython's own help topics
  (``pydoc_data.topics``: every topic's text, joined in sorted-key order, about 465k characters,
  103 distinct). The first 90% trains, the last 10% is held out. Step ``t``'s batch is
  ``batch`` windows of ``seq + 1`` characters at offsets drawn by a generator seeded with
  ``(seed, t)``; the eval set is ``eval_windows`` windows at evenly spaced offsets of the
  held-out text.

Every number is made by numpy from the seed, so JAX and torch, and every run of the sweep, see
the same initial weights and the same batches in the same order. Parameters are in parity's
canonical layout (``parity.models.canonical``: dense kernels ``(in, out)``, names are the flax
state paths). Nothing here imports jax or torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from parity import data as parity_data
from parity.models import canonical

PROBLEMS = ("digits", "charlm")
SIZES = ("tiny", "small", "full")

# Steps T, batch size and (charlm) model sizes. tiny runs in CI, small on a CPU in minutes,
# full is digits' real size (still CPU) and the LM's GPU size.
DIGITS_SIZES = {
    "tiny": dict(steps=16, batch=16, evals=4),
    "small": dict(steps=400, batch=32, evals=20),
    "full": dict(steps=1200, batch=32, evals=24),
}
CHARLM_SIZES = {
    "tiny": dict(
        steps=16, batch=4, evals=4, width=16, layers=1, heads=2, seq=16, mlp=32, eval_windows=8
    ),
    "small": dict(
        steps=600, batch=16, evals=20, width=64, layers=2, heads=4, seq=64, mlp=256, eval_windows=64
    ),
    # ~4.1M training characters in all, about 10 passes over the text: more would measure
    # overfitting (there is no dropout) rather than optimization.
    "full": dict(
        steps=2000,
        batch=16,
        evals=20,
        width=192,
        layers=4,
        heads=4,
        seq=128,
        mlp=768,
        eval_windows=256,
    ),
}
DEFAULT_LRS = {"digits": (3e-3, 1e-2, 3e-2, 1e-1), "charlm": (1e-3, 3e-3, 1e-2, 3e-2)}
DEFAULT_WEIGHT_DECAY = {"digits": 0.0, "charlm": 0.1}


@dataclass(frozen=True)
class Problem:
    """One problem at one size: what every framework's trainer needs.

    ``params0`` and ``buffers0`` are canonical float32 arrays; ``train_batch(step)`` gives the
    inputs and integer labels of update ``step`` (0-based); the eval set and (digits) the
    BatchNorm recalibration batches are fixed arrays.
    """

    name: str
    size: str
    seed: int
    steps: int
    batch: int
    evals: int
    params0: dict[str, np.ndarray]
    buffers0: dict[str, np.ndarray]
    eval_inputs: np.ndarray
    eval_labels: np.ndarray
    recal_inputs: tuple[np.ndarray, ...] = ()
    lm: dict = field(default_factory=dict)  # charlm: vocab, width, layers, heads, seq, mlp
    _train: object = None  # digits: parity's Data; charlm: the training tokens

    @property
    def has_accuracy(self) -> bool:
        return self.name == "digits"

    def all_train_batches(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of updates ``0 .. steps - 1``, stacked on a leading step axis.

        Every run sees the same batches, so trainers move them to the device once: a copy
        from host memory per step would make the host wait for the device every step.
        """
        batches = [self.train_batch(step) for step in range(self.steps)]
        return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if self.name == "digits":
            return self._train.train_batch(step)
        return _windows(
            self._train, np.random.default_rng([self.seed, 11, step]), self.batch, self.lm["seq"]
        )


def _windows(tokens: np.ndarray, rng: np.random.Generator, n: int, seq: int):
    starts = rng.integers(0, len(tokens) - seq - 1, size=n)
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


def load(name: str, size: str, seed: int = 0) -> Problem:
    """The problem ``name`` (``digits`` | ``charlm``) at ``size`` (``tiny`` | ``small`` |
    ``full``), with data and initial weights drawn from ``seed``."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if name == "digits":
        s = DIGITS_SIZES[size]
        data = parity_data.load("cnn", seed, s["batch"], "float32", recal_batches=4)
        return Problem(
            name,
            size,
            seed,
            s["steps"],
            s["batch"],
            s["evals"],
            canonical.cast(canonical.init_params("cnn", seed), np.float32),
            canonical.cast(canonical.init_buffers("cnn"), np.float32),
            data.eval_inputs,
            data.eval_labels,
            data.recal_inputs,
            {},
            data,
        )
    s = dict(CHARLM_SIZES[size])
    tokens, vocab = char_tokens()
    split = int(0.9 * len(tokens))
    train, held_out = tokens[:split], tokens[split:]
    lm = dict(vocab=len(vocab), **{k: s[k] for k in ("width", "layers", "heads", "seq", "mlp")})
    if lm["width"] % lm["heads"]:
        raise ValueError(f"width {lm['width']} must be a multiple of heads {lm['heads']}")
    starts = np.linspace(0, len(held_out) - lm["seq"] - 1, s["eval_windows"]).astype(np.int64)
    chunks = held_out[starts[:, None] + np.arange(lm["seq"] + 1)]
    return Problem(
        name,
        size,
        seed,
        s["steps"],
        s["batch"],
        s["evals"],
        canonical.cast(lm_init(lm, seed), np.float32),
        {},
        chunks[:, :-1],
        chunks[:, 1:],
        (),
        lm,
        train,
    )
