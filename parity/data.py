"""Every number a model sees, made by numpy from the seed, so that all backends see the same.

- ``mlp`` / ``cnn``: scikit-learn's 8x8 digits (``load_digits``: shipped with the package,
  nothing to download; without scikit-learn, the same arrays from ``parity/digits.npz``, which
  ``python -m parity export-digits`` writes), scaled to [0, 1], split 75/25 (stratified: a
  seeded quarter of each class is the eval set). Step ``t`` trains on the batch drawn from
  epoch ``t // steps_per_epoch``'s seeded permutation, so any step's batch is known without
  replaying the ones before (the handoff resumes mid-run). The eval set is the whole test
  split. Images are flat (64,) for the MLP and NHWC (8, 8, 1) for the CNN.
- ``lm``: a random Markov chain over the vocabulary (each row of the transition matrix a sparse
  Dirichlet draw, so there is something to learn); step ``t``'s batch is ``batch_size`` fresh
  chains of ``seq + 1`` tokens drawn from a generator seeded by ``(seed, t)``.

The CNN's BatchNorm statistics are recomputed at ``x`` before each evaluation from
``recal_batches`` fixed training batches (``Data.recal_inputs``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.models import canonical


@dataclass(frozen=True)
class Data:
    model: str
    seed: int
    batch_size: int
    dtype: str
    train_inputs: np.ndarray  # digits: every training image; lm: unused (empty)
    train_labels: np.ndarray
    eval_inputs: np.ndarray
    eval_labels: np.ndarray
    recal_inputs: tuple[np.ndarray, ...]
    transitions: np.ndarray | None = None  # lm: cumulative transition probabilities

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of training step ``step`` (0-based)."""
        if self.model == "lm":
            tokens = _markov_tokens(
                self.transitions, self.batch_size, np.random.default_rng([self.seed, 3, step])
            )
            return tokens[:, :-1], tokens[:, 1:]
        per_epoch = len(self.train_inputs) // self.batch_size
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.train_inputs))
        idx = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.train_inputs[idx], self.train_labels[idx]


def _markov_tokens(cumulative: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` chains of ``seq + 1`` tokens: a uniform first token, then the transition matrix."""
    length = canonical.LM["seq"] + 1
    vocab = cumulative.shape[0]
    tokens = np.empty((n, length), dtype=np.int32)
    tokens[:, 0] = rng.integers(0, vocab, size=n)
    uniforms = rng.random((n, length - 1))
    for i in range(1, length):
        rows = cumulative[tokens[:, i - 1]]
        tokens[:, i] = np.minimum((rows < uniforms[:, i - 1 : i]).sum(axis=1), vocab - 1)
    return tokens


# Where ``python -m parity export-digits`` writes the digits, for machines without scikit-learn.
DIGITS_FILE = Path(__file__).resolve().parent / "digits.npz"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``load_digits()``: from scikit-learn, else from DIGITS_FILE."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        if not DIGITS_FILE.exists():
            raise FileNotFoundError(
                f"the digits need scikit-learn or {DIGITS_FILE}: run `python -m parity "
                "export-digits` on a machine with scikit-learn and bring the file along"
            ) from None
        with np.load(DIGITS_FILE) as f:
            return f["data"].astype(np.float64), f["target"].astype(np.int64)
    digits = load_digits()
    return digits.data, digits.target


def save_digits(path) -> None:
    """Write ``load_digits()``'s arrays to ``path`` (.npz), so that child processes can read
    them without importing scikit-learn (a second per process). Pixels are the integers 0-16
    and labels 0-9: stored as uint8, the file is exact and small."""
    images, labels = _load_digits()
    np.savez_compressed(path, data=images.astype(np.uint8), target=labels.astype(np.uint8))


@functools.lru_cache(maxsize=4)
def _digits(seed: int, digits_file: str | None):
    if digits_file:
        with np.load(digits_file) as f:
            images, labels = f["data"].astype(np.float64), f["target"]
    else:
        images, labels = _load_digits()
    images = images / 16.0
    labels = labels.astype(np.int32)
    rng = np.random.default_rng([seed, 6])
    is_eval = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        is_eval[members[: round(0.25 * len(members))]] = True
    return images[~is_eval], images[is_eval], labels[~is_eval], labels[is_eval]


def load(
    model: str,
    seed: int,
    batch_size: int,
    dtype: str,
    recal_batches: int = 4,
    digits_file: str | None = None,
) -> Data:
    """The data of one run; arrays are numpy, floats in ``dtype``, labels int32.

    ``digits_file``: a :func:`save_digits` file to read instead of calling scikit-learn.
    """
    if model not in canonical.MODELS:
        raise ValueError(f"model must be one of {canonical.MODELS}, got {model!r}")
    if model == "lm":
        rng = np.random.default_rng([seed, 2])
        vocab = canonical.LM["vocab"]
        probs = rng.dirichlet(np.full(vocab, 0.1), size=vocab)
        cumulative = np.cumsum(probs, axis=1)
        eval_tokens = _markov_tokens(cumulative, 128, np.random.default_rng([seed, 4]))
        empty = np.zeros((0,), np.int32)
        return Data(
            model,
            seed,
            batch_size,
            dtype,
            empty,
            empty,
            eval_tokens[:, :-1],
            eval_tokens[:, 1:],
            (),
            cumulative,
        )
    train_x, eval_x, train_y, eval_y = _digits(seed, digits_file)
    if len(train_x) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_x)} training images")
    if model == "cnn":
        side = canonical.CNN["image"]
        train_x = train_x.reshape(-1, side, side, 1)
        eval_x = eval_x.reshape(-1, side, side, 1)
    train_x, eval_x = train_x.astype(dtype), eval_x.astype(dtype)
    recal = ()
    if model == "cnn":
        rng = np.random.default_rng([seed, 5])
        recal = tuple(
            train_x[rng.choice(len(train_x), batch_size, replace=False)]
            for _ in range(recal_batches)
        )
    return Data(model, seed, batch_size, dtype, train_x, train_y, eval_x, eval_y, recal)


def for_run(config) -> Data:
    """:func:`load` with a ``parity.config.RunConfig``'s fields (model, seed, batch size, its
    host dtype, BatchNorm recalibration batches, digits file): every backend's loop reads the
    same data this way."""
    return load(
        config.model,
        config.seed,
        config.batch_size,
        config.host_dtype,
        config.recal_batches,
        config.digits_file,
    )
