"""A small causal Transformer LM trained with Schedule-Free AdamW, sharded over a device mesh.

    python -m examples.flax.lm_sharded --cpu-devices 8           # 8 CPU devices, mesh 2x4, ~45 s
    python -m examples.flax.lm_sharded --cpu-devices 8 --steps 400 --resume   # continue to 400
    python -m examples.flax.lm_sharded --steps 1000 --d-model 256 --layers 4  # one GPU: mesh 1x1

(from the checkout's root: ``examples`` is not an installed package).

Sharding. The devices form a mesh with two axes, ``data`` and ``fsdp``. Every batch is split
over all devices (data parallelism over both axes); every large parameter is split over the
``fsdp`` axis along its largest dimension (FSDP-style: no device holds a whole weight, XLA
gathers them where they are used). The optimizer state follows its parameters:
``sf_optax.state_shardings`` gives ``z`` and ``v`` the sharding of their parameter and
replicates the scalars. Everything is ordinary ``jax.jit`` with ``NamedSharding``s.

Schedule-Free. The state's params are ``y``, where gradients are taken (the train loss printed
is measured there); the point to evaluate is ``x = (y - (1 - b1) z) / b1``
(``state.eval_params``), computed inside the jitted evaluation, sharded like the params. There
is no learning-rate schedule and no run length to fix in advance: ``--resume`` continues a run
for as many more steps as asked, on the same trajectory.

Checkpoints (Orbax, through ``sf_optax.save_checkpoint``) hold params, optimizer state and
step; they can be restored onto another mesh (``--resume --mesh 4,2`` after a run on 2,4). A
run stopped while saving resumes from its last complete checkpoint (the unfinished save is
removed).
Batches are a function of (seed, step), so a resumed run sees what an uninterrupted run sees.

Data: the text of Python's own help topics (``pydoc_data.topics``, shipped with CPython),
character-level; or ``--data synthetic``, a seeded random Markov chain. Needs jax, flax, optax
and numpy; orbax-checkpoint for checkpoints (``--ckpt-dir ''`` runs without them); tqdm is used
when it is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import shutil
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-devices", type=int, default=0, help="run on N CPU devices (sets XLA_FLAGS)"
    )
    parser.add_argument("--mesh", default="", help="DATA,FSDP mesh shape; default: 2,N/2 or 1,N")
    parser.add_argument("--steps", type=int, default=300, help="train until this step")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3, help="sf_optax.adamw learning rate")
    parser.add_argument("--b1", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--data", choices=["topics", "synthetic"], default="topics")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--ckpt-dir", default="checkpoints/lm_sharded", help="'' for none")
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument(
        "--ckpt-view",
        choices=["train", "eval"],
        default="train",
        help="params saved at y (exact resume) or at x (ready to evaluate)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from --ckpt-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def request_cpu_devices(count: int) -> None:
    """XLA reads the device count when jax starts, so this must run before ``import jax``."""
    if count:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"
        os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    request_cpu_devices(parse_args(sys.argv[1:]).cpu_devices)

import jax  # noqa: E402  (imported after XLA_FLAGS is set)
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sf_optax  # noqa: E402

try:  # optional: a progress bar
    from tqdm import tqdm
except ImportError:
    tqdm = None


def show_progress(quiet: bool) -> bool:
    """A progress bar only in a terminal: written to a log or a pipe, its redraws would be
    thousands of carriage-return frames (the per-epoch lines are printed either way)."""
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


# --- data --------------------------------------------------------------------------------------


def load_tokens(kind: str, seed: int) -> tuple[np.ndarray, int]:
    """A token stream and the vocabulary size."""
    if kind == "topics":
        try:
            from pydoc_data.topics import topics  # CPython's help() texts, ~0.5 M characters
        except ImportError:
            print("pydoc_data is not installed with this Python: using --data synthetic")
        else:
            text = "\n\n".join(topics[key] for key in sorted(topics))
            chars = sorted(set(text))
            lookup = {c: i for i, c in enumerate(chars)}
            return np.array([lookup[c] for c in text], np.int32), len(chars)
    # A Markov chain where each token has a few likely successors: learnable, far from uniform.
    rng = np.random.default_rng(seed)
    vocab, length = 64, 400_000
    successors = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.choice(4, size=length, p=[0.6, 0.2, 0.1, 0.1])
    tokens = np.empty(length, np.int32)
    tokens[0] = 0
    for i in range(1, length):
        tokens[i] = successors[tokens[i - 1], choice[i]]
    return tokens, vocab


def sample_batch(tokens: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int):
    """``batch`` windows of ``seq_len + 1`` tokens: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def train_batch(tokens, step: int, args) -> np.ndarray:
    # A function of (seed, step) only: a resumed run draws exactly what the uninterrupted would.
    return sample_batch(
        tokens, np.random.default_rng([args.seed, step]), args.batch_size, args.seq_len
    )


# --- model -------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm Transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
        # No biases in attention: a key bias cannot change a softmax, its gradient is round-off.
        self.attention = nnx.MultiHeadAttention(
            heads, d_model, use_bias=False, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attention(self.norm1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


class TransformerLM(nnx.Module):
    """Token + position embeddings, pre-norm blocks, a final norm and a linear head.

    ``activation_sharding``: where the (batch, time, feature) activations live. Pinning them to
    the batch sharding is what makes the sharded weights FSDP-style: XLA gathers each weight
    where it is used rather than re-laying activations out along the features.
    """

    def __init__(
        self,
        vocab: int,
        d_model: int,
        heads: int,
        layers: int,
        seq_len: int,
        *,
        activation_sharding: NamedSharding | None = None,
        rngs: nnx.Rngs,
    ):
        self.activation_sharding = activation_sharding
        self.vocab = vocab
        rows = -(-vocab // 64) * 64  # padded, so that the tables split evenly over devices
        self.embed = nnx.Embed(rows, d_model, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
        self.blocks = nnx.List([Block(d_model, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, rows, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.pin(self.embed(tokens) + self.position[: tokens.shape[1]])
        mask = nnx.make_causal_mask(tokens)  # (batch, 1, T, T): position t sees 0..t
        for block in self.blocks:
            h = self.pin(block(h, mask))
        return self.head(self.norm(h))[..., : self.vocab]  # the padding rows are never used

    def pin(self, h: jax.Array) -> jax.Array:
        if self.activation_sharding is None:
            return h
        return jax.lax.with_sharding_constraint(h, self.activation_sharding)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --- sharding ----------------------------------------------------------------------------------


def make_mesh(spec: str) -> Mesh:
    devices = jax.devices()
    n = len(devices)
    if spec:
        shape = tuple(int(s) for s in spec.split(","))
    else:
        shape = (2, n // 2) if n >= 4 and n % 2 == 0 else (1, n)
    if len(shape) != 2 or shape[0] * shape[1] != n:
        raise SystemExit(f"--mesh {spec or shape}: need DATA,FSDP with DATA*FSDP = {n} devices")
    return Mesh(np.array(devices).reshape(shape), ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest dimension that the ``fsdp`` axis divides; replicate small arrays."""
    if fsdp == 1 or math.prod(shape) < 1024:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % fsdp == 0:
            return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])
    return P()


# --- training ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cpu_devices and jax.device_count() < args.cpu_devices:
        raise SystemExit(
            f"--cpu-devices {args.cpu_devices}: jax started with {jax.device_count()} devices; "
            "run this file as a script (or set XLA_FLAGS before importing jax)"
        )
    if args.ckpt_dir and importlib.util.find_spec("orbax") is None:
        if args.resume:
            usage_error("--resume needs orbax-checkpoint: pip install orbax-checkpoint")
        print("orbax-checkpoint is not installed: training without checkpoints")
        args.ckpt_dir = ""
    if args.resume:  # before anything is built: a wrong directory is a quick, clear error
        if not args.ckpt_dir:
            usage_error("--resume needs --ckpt-dir")
        check_resumable(args.ckpt_dir)
    mesh = make_mesh(args.mesh)
    if args.batch_size % mesh.size:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {mesh.size}")
    tokens, vocab = load_tokens(args.data, args.seed)
    split = int(0.9 * len(tokens))
    train_tokens, eval_tokens = tokens[:split], tokens[split:]
    eval_rng = np.random.default_rng([args.seed, 2**31])
    eval_batches = [
        sample_batch(eval_tokens, eval_rng, args.batch_size, args.seq_len)
        for _ in range(args.eval_batches)
    ]

    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))  # sequences split over all devices

    def create_model() -> TransformerLM:
        return TransformerLM(
            vocab,
            args.d_model,
            args.heads,
            args.layers,
            args.seq_len,
            activation_sharding=batch_sh,
            rngs=nnx.Rngs(args.seed),
        )

    # Shapes first (nothing allocated), then each parameter's sharding, then the parameters
    # created directly in their shards by a jitted init.
    graphdef, abstract_params = nnx.split(nnx.eval_shape(create_model), nnx.Param)
    abstract_params = nnx.to_pure_dict(abstract_params)
    fsdp = mesh.shape["fsdp"]
    param_sh = jax.tree.map(
        lambda a: NamedSharding(mesh, fsdp_spec(a.shape, fsdp)), abstract_params
    )
    replicated = NamedSharding(mesh, P())

    def apply_fn(params, inputs):
        return nnx.merge(graphdef, params)(inputs)

    tx = sf_optax.adamw(
        learning_rate=args.lr,
        b1=args.b1,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
    )

    def create_state(params):
        return sf_optax.ScheduleFreeTrainState.create(apply_fn=apply_fn, params=params, tx=tx)

    abstract_state = jax.eval_shape(create_state, abstract_params)
    state_sh = sf_optax.train_state_shardings(abstract_state, param_sh)

    def train_step(state, batch):
        def loss_fn(params):
            return cross_entropy(state.apply_fn(params, batch[:, :-1]), batch[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)  # at y
        return state.apply_gradients(grads=grads), loss

    def eval_losses(state, batch):
        """Loss at x (the point to evaluate) and, for contrast, at y."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        at_x = cross_entropy(state.apply_fn(state.eval_params, inputs), targets)
        return at_x, cross_entropy(state.apply_fn(state.params, inputs), targets)

    train_step = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    eval_losses = jax.jit(
        eval_losses, in_shardings=(state_sh, batch_sh), out_shardings=(replicated, replicated)
    )

    if args.resume:
        # Read straight into this mesh's shardings, whatever mesh saved the checkpoint.
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            state_sh,
        )
        state = sf_optax.restore_checkpoint(args.ckpt_dir, target)
        print(f"resumed from {args.ckpt_dir} at step {int(state.step)}")
    else:
        if args.ckpt_dir:
            clear_old_checkpoints(args.ckpt_dir)
        init = jax.jit(
            lambda: nnx.to_pure_dict(nnx.state(create_model(), nnx.Param)), out_shardings=param_sh
        )
        state = jax.jit(create_state, out_shardings=state_sh)(init())

    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params))
    print(
        f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh "
        f"data={mesh.shape['data']} x fsdp={fsdp}; {n_params / 1e6:.2f} M params; vocab {vocab} "
        f"(log vocab {math.log(vocab):.3f}); {args.data} data, {len(train_tokens)} train tokens"
    )

    def evaluate():
        losses = [eval_losses(state, jax.device_put(b, batch_sh)) for b in eval_batches]
        return tuple(float(np.mean([loss[i] for loss in losses])) for i in range(2))

    start_step = int(state.step)
    pending, train_losses = [], []
    last_saved = start_step if args.resume else None
    bar = None
    if tqdm is not None and show_progress(args.quiet):
        bar = tqdm(total=args.steps, initial=start_step, unit="step", leave=False, mininterval=0.5)
    log = bar.write if bar is not None else print
    start = time.perf_counter()
    eval_x = eval_y = float("nan")
    for step in range(start_step, args.steps):
        state, loss = train_step(
            state, jax.device_put(train_batch(train_tokens, step, args), batch_sh)
        )
        pending.append(loss)
        if bar is not None:
            bar.update()
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            train_losses += [float(v) for v in jax.device_get(pending)]  # one sync per interval
            eval_x, eval_y = evaluate()
            log(
                f"step {done:5d}  train loss (y) {np.mean(train_losses[-len(pending) :]):.4f}  "
                f"eval loss (x) {eval_x:.4f}  eval loss (y) {eval_y:.4f}"
            )
            pending = []
        if args.ckpt_dir and (done % args.ckpt_every == 0 or done == args.steps):
            sf_optax.save_checkpoint(args.ckpt_dir, state, view=args.ckpt_view, max_to_keep=2)
            last_saved = done
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if start_step >= args.steps:
        eval_x, eval_y = evaluate()
    print(
        f"final step {int(state.step)} ({seconds:.1f} s): eval loss at x {eval_x:.4f}, at y "
        f"{eval_y:.4f}; log(vocab) {math.log(vocab):.4f}"
        + (f"; checkpoint {args.ckpt_dir} step {last_saved}" if last_saved is not None else "")
    )
    return {
        "train_losses": train_losses,  # per step, at y, for the steps this call ran
        "start_step": start_step,
        "eval_loss_x": eval_x,
        "eval_loss_y": eval_y,
        "vocab_size": vocab,
        "mesh_shape": (mesh.shape["data"], fsdp),
        "seconds": seconds,
        # For a caller that wants to look further (the tests do).
        "state": state,
        "eval_batches": eval_batches,
        "b1": args.b1,
    }


# What a save killed midway leaves: Orbax writes each step into STEP.orbax-checkpoint-tmp-TIME
# and renames it to STEP only once it is complete.
UNFINISHED = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def usage_error(message: str):
    """Stops with argparse's exit code 2: the command line asks for something impossible."""
    print(f"lm_sharded: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def clear_unfinished_saves(directory: str) -> None:
    """Removes what killed saves left: it is never read (restoring takes the newest complete
    step), but a fresh run would take it for foreign files and it would stay forever."""
    for name in sorted(os.listdir(directory)):
        if UNFINISHED.match(name):
            print(f"removing an unfinished save (the run was stopped while saving): {name}")
            shutil.rmtree(os.path.join(directory, name))


def check_resumable(directory: str) -> None:
    """--resume on a directory that holds a complete checkpoint; a clear error otherwise."""
    if not os.path.isdir(directory):
        usage_error(
            f"--resume: there is no checkpoint directory {directory}; run once without --resume "
            "to start one (or give the --ckpt-dir of the run to continue)"
        )
    clear_unfinished_saves(directory)
    if not any(name.isdigit() for name in os.listdir(directory)):
        usage_error(
            f"--resume: {directory} holds no complete checkpoint; run without --resume to start "
            "afresh"
        )


def clear_old_checkpoints(directory: str) -> None:
    """A fresh run replaces the checkpoints of an earlier one (Orbax step folders, finished or
    not) and refuses to delete anything else."""
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    foreign = [n for n in os.listdir(directory) if not (n.isdigit() or UNFINISHED.match(n))]
    if foreign:
        raise SystemExit(
            f"--ckpt-dir {directory} holds files that are not checkpoints ({', '.join(foreign)}):"
            " give another --ckpt-dir, or remove them"
        )
    print(f"starting afresh: removing the checkpoints in {directory} (--resume continues them)")
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
