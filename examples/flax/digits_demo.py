"""Schedule-Free AdamW trains a small flax.nnx MLP on scikit-learn's 8x8 digits.

    python -m examples.flax.digits_demo                  # about 5 s on a 2-core CPU
    python -m examples.flax.digits_demo --epochs 30 --lr 0.005 --quiet

(from the checkout's root: ``examples`` is not an installed package).

Schedule-Free keeps two points. The model's params are ``y``: gradients are taken there and the
optimizer moves them. The point to evaluate (and to ship) is ``x = (y - (1 - b1) z) / b1``, where
``z`` lives in the optimizer state. There is no learning-rate schedule to tune; the one thing to
remember is: train at y, evaluate at ``sf_optax.eval_params(optimizer, params)``.

Each epoch prints the training loss (at y, averaged over the epoch's steps) and the test loss and
accuracy at x, measured on a copy of the model so that training never sees x. The last line also
gives the test numbers at y, for contrast: x is a weighted average of the iterates z, and y sits
between x and the latest z.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import sf_optax


def show_progress(quiet: bool) -> bool:
    """A progress bar only in a terminal: written to a log or a pipe, its redraws would be
    thousands of carriage-return frames (the per-epoch lines are printed either way)."""
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the train split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="width of the hidden layer")
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    parser.add_argument("--b1", type=float, default=0.9, help="interpolation between x and z")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=40, help="linear warmup, ~1 epoch")
    parser.add_argument("--seed", type=int, default=0, help="init, train/test split, batches")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def load_data(seed: int, test_fraction: float = 0.25):
    """64 floats in [0, 1] per image and int labels, split into train and test (stratified)."""
    digits = load_digits()  # 1797 images, shipped inside scikit-learn: nothing to download
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )


class MLP(nnx.Module):
    """64 pixels -> hidden (ReLU) -> 10 logits."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(images)))


def loss_fn(model: MLP, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, images, labels) -> jax.Array:
    """The gradient at y; the optimizer then moves y in the model and z in its state."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model: MLP, images, labels) -> tuple[jax.Array, jax.Array]:
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (logits.argmax(axis=-1) == labels).mean()
    return loss, accuracy


def model_at_x(model: MLP, optimizer: nnx.Optimizer) -> MLP:
    """A new model holding x; ``model`` itself keeps y, so training goes on undisturbed."""
    graphdef, y, rest = nnx.split(model, nnx.Param, ...)
    x = sf_optax.eval_params(optimizer, y)
    return nnx.merge(graphdef, x, rest)


def batches(rng: np.random.Generator, n: int, batch_size: int):
    """Index arrays of one shuffled epoch; the ragged tail is dropped so jit compiles once."""
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    train_images, test_images, train_labels, test_labels = load_data(args.seed)
    model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
    tx = sf_optax.adamw(
        learning_rate=args.lr,
        b1=args.b1,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(train_images) // args.batch_size
    print(
        f"digits: {len(train_images)} train / {len(test_images)} test images, "
        f"MLP 64-{args.hidden}-10, sf_optax.adamw lr {args.lr} b1 {args.b1} "
        f"weight decay {args.weight_decay} warmup {args.warmup_steps} steps, "
        f"{args.epochs} epochs x {steps_per_epoch} steps"
    )

    start = time.perf_counter()
    bar = tqdm(
        total=args.epochs * steps_per_epoch,
        disable=not show_progress(args.quiet),
        unit="step",
        leave=False,
        mininterval=0.5,  # a few redraws a second, not ten
    )
    for epoch in range(1, args.epochs + 1):
        losses = []
        for idx in batches(rng, len(train_images), args.batch_size):
            losses.append(train_step(model, optimizer, train_images[idx], train_labels[idx]))
            bar.update()
        train_loss = float(np.mean(jax.device_get(losses)))  # one device sync per epoch
        loss_x, accuracy_x = evaluate(model_at_x(model, optimizer), test_images, test_labels)
        tqdm.write(
            f"epoch {epoch:3d}/{args.epochs}  train loss (y) {train_loss:.4f}  "
            f"eval loss (x) {float(loss_x):.4f}  eval accuracy (x) {float(accuracy_x):.2%}"
        )
    bar.close()
    seconds = time.perf_counter() - start

    eval_model = model_at_x(model, optimizer)
    loss_x, accuracy_x = evaluate(eval_model, test_images, test_labels)
    loss_y, accuracy_y = evaluate(model, test_images, test_labels)
    print(
        f"final after {int(optimizer.step[...])} steps ({seconds:.1f} s): "
        f"eval loss at x {float(loss_x):.4f}, eval accuracy at x {float(accuracy_x):.2%}; "
        f"at y for contrast: eval loss {float(loss_y):.4f}, accuracy {float(accuracy_y):.2%}"
    )
    return {
        "train_loss_y": train_loss,
        "eval_loss_x": float(loss_x),
        "eval_accuracy_x": float(accuracy_x),
        "eval_loss_y": float(loss_y),
        "eval_accuracy_y": float(accuracy_y),
        "steps": int(optimizer.step[...]),
        "seconds": seconds,
        # The trained objects, for a caller that wants to look further (the tests do).
        "model": model,  # holds y
        "optimizer": optimizer,  # holds z
        "params_x": nnx.state(eval_model, nnx.Param),
    }


if __name__ == "__main__":
    main()
