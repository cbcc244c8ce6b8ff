"""Local Schedule-Free AdamW on a device mesh: K workers step on their own data and average.

    python -m examples.flax.local_steps                        # 4 CPU workers, ~5 s on 2 cores
    python -m examples.flax.local_steps --rule constant --period 8 --epochs 5 --quiet
    python -m examples.flax.local_steps --workers 8 --cpu-devices 0   # 8 GPUs: one worker each

(from the checkout's root: ``examples`` is not an installed package).

The workers lie along a mesh axis ``"workers"``, one per device. Each holds its own params
(``y``) and optimizer state (``z``, ``v``) and takes its step on its own share of every global
batch: there is no gradient all-reduce. After the sync steps of a rule (``sf_schedules.sync``:
QSR on Schedule-Free's effective learning rate by default, or a constant period, plain QSR, or
the averaging-window rule) the workers average their params and ``z`` (a ``pmean``); ``v``
stays per worker. The sync flags of the whole run are computed on the host up front and handed
to the step as an argument, so the step compiles once (``sf_optax.local``).

Each epoch prints the workers' mean train loss (at their ``y``) and the test loss and accuracy
at the averaged ``x`` (``sf_optax.local.local_eval_params``: the mean of the workers' params and
``z``, viewed at ``x``, which is what a sync there would give; training is not disturbed). The
model has a BatchNorm layer: trained on batch statistics, evaluated with statistics recomputed
at ``x``, each worker from its own batches and then averaged over the workers
(``sf_optax.local.make_local_batch_stats``). The run's last step is always a sync step.

On CPU the script asks XLA for ``--cpu-devices`` host devices (default: one per worker) before
importing jax; on GPUs pass ``--cpu-devices 0`` and the mesh takes the first ``--workers``
devices. Several processes (hosts): ``--coordinator`` makes each call
``jax.distributed.initialize`` first; ``jax.devices()`` then lists every process's devices, the
mesh spans them, each process supplies the batches of its own workers (``build_batch``, through
``jax.make_array_from_callback``) and only the syncs cross the network. On CPU, 2 processes of
2 devices each (gloo between them) print the same numbers as one process of 4:

    python -m examples.flax.local_steps --cpu-devices 2 --coordinator localhost:12355 \
        --num-processes 2 --process-id 0     # and --process-id 1 in a second shell
"""

from __future__ import annotations

import argparse
import os
import sys
import time

RULES = ("schedule_free_qsr", "qsr", "constant", "averaging_window")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="K: workers on the mesh axis")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="host devices XLA makes (sets XLA_FLAGS; default: --workers, 0: leave XLA_FLAGS)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="passes over the train split")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01, help="sf_optax.adamw learning rate")
    parser.add_argument("--b1", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--rule", choices=RULES, default="schedule_free_qsr")
    parser.add_argument("--period", type=int, default=8, help="constant: H")
    parser.add_argument("--h-base", type=int, default=4, help="qsr rules: least H")
    parser.add_argument("--alpha", type=float, default=0.004, help="qsr rules: alpha")
    parser.add_argument("--h-warm", type=int, default=2, help="H of rounds during warmup")
    parser.add_argument("--h-max", type=int, default=64, help="largest H")
    parser.add_argument("--fraction", type=float, default=0.5, help="averaging_window: share")
    parser.add_argument("--bn-batches", type=int, default=4, help="per worker, for BN stats at x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default="", help="write the final trees to this .npz")
    parser.add_argument(
        "--coordinator",
        default="",
        help="several processes: HOST:PORT of process 0 (with --num-processes, --process-id), "
        "or 'auto' (jax.distributed.initialize detects SLURM, Open MPI, ...)",
    )
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("workers", "epochs", "batch_size", "bn_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def request_cpu_devices(count: int) -> None:
    """XLA reads the host device count when jax starts, so this must run before ``import jax``."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":
    _args = parse_args(sys.argv[1:])
    request_cpu_devices(_args.workers if _args.cpu_devices is None else _args.cpu_devices)

import jax  # noqa: E402  (imported after XLA_FLAGS is set)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import sf_optax  # noqa: E402
import sf_optax.local  # noqa: E402
import sf_schedules  # noqa: E402
from sf_schedules import sync  # noqa: E402


def load_data(seed: int):
    """64 floats in [0, 1] per image and int labels, train/test split 75/25 (stratified)."""
    digits = load_digits()  # shipped inside scikit-learn: nothing to download
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)


class Net(nnx.Module):
    """64 pixels -> hidden -> BatchNorm -> ReLU -> 10 logits."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.norm(self.hidden(images))))


def make_rule(args: argparse.Namespace):
    """The sync rule of the flags; the Schedule-Free ones get the optimizer's b1 (r = 0 and
    weight_lr_power = 2 are sf_optax.adamw's defaults)."""
    warm = dict(h_warm=args.h_warm, warmup_steps=args.warmup_steps)
    if args.rule == "constant":
        return sync.Constant(args.period)
    if args.rule == "qsr":
        return sync.QSR(args.h_base, args.alpha, h_max=args.h_max, **warm)
    if args.rule == "schedule_free_qsr":
        return sync.ScheduleFreeQSR(args.h_base, args.alpha, b1=args.b1, h_max=args.h_max, **warm)
    return sync.AveragingWindow(args.fraction, h_base=args.h_base, h_max=args.h_max, **warm)


def learning_rates(args: argparse.Namespace, total_steps: int) -> np.ndarray:
    """The learning rate of every step of sf_optax.adamw: linear warmup, then constant."""
    return sf_schedules.constant(args.lr, warmup_steps=args.warmup_steps).values(total_steps)


def bn_rows(order: np.ndarray, n_batches: int, batch_size: int, n_workers: int) -> np.ndarray:
    """Row indices of each worker's batches for the BatchNorm statistics at x, shape
    ``(n_workers, n_batches, batch_size)``: worker ``i`` gets the ``i``-th block of ``order``."""
    rows = order[: n_workers * n_batches * batch_size]
    return rows.reshape(n_workers, n_batches, batch_size)


def build_batch(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host copy on every process; each process fills only the
    shards of its own devices (one process: ``jax.device_put``)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.coordinator:  # before any other JAX call
        address = None if args.coordinator == "auto" else args.coordinator
        jax.distributed.initialize(address, args.num_processes, args.process_id)
    if args.save and jax.process_count() > 1:
        raise SystemExit("error: --save writes one process's arrays: run on one process")
    k = args.workers
    if jax.device_count() < k:
        raise SystemExit(
            f"error: --workers {k} needs {k} devices, jax has {jax.device_count()}: on CPU run "
            "this file as a script (it sets XLA_FLAGS before importing jax), or lower --workers"
        )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:k]), ("workers",))
    per_worker = NamedSharding(mesh, PartitionSpec("workers"))
    replicated = NamedSharding(mesh, PartitionSpec())

    train_x, test_x, train_y, test_y = load_data(args.seed)
    global_batch = k * args.batch_size
    steps_per_epoch = len(train_x) // global_batch
    total = args.epochs * steps_per_epoch
    if total < 1:
        raise SystemExit(f"error: {len(train_x)} images make no global batch of {global_batch}")
    rule = make_rule(args)
    lrs = learning_rates(args, total)
    mask = sync.sync_mask(rule, lrs)  # host, float64: one flag per step
    sync_steps = [int(s) for s in np.flatnonzero(mask) + 1]

    model = Net(args.hidden, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        images, labels = batch
        # Training mode: BatchNorm normalises with the batch's statistics; the running
        # statistics it would update are dropped (they are recomputed at x for evaluation).
        net = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
        logits = net(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = sf_optax.adamw(args.lr, b1=args.b1, weight_decay=args.weight_decay,
                        warmup_steps=args.warmup_steps)  # fmt: skip
    step = sf_optax.local.make_local_train_step(loss_fn, tx, mesh)
    ys, states = sf_optax.local.local_init(tx, params, mesh)
    batch_stats = sf_optax.local.make_local_batch_stats(
        sf_optax.local.nnx_batchnorm_stats_fn(model), mesh
    )

    @jax.jit
    def averaged_x(ys, states):
        """x of the workers' average, replicated, and one copy of it per worker."""
        x = sf_optax.local.local_eval_params(ys, states)
        copies = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (k, *a.shape)), x)
        return jax.lax.with_sharding_constraint((x, copies), (replicated, per_worker))

    @jax.jit
    def mean_loss(losses):
        """The mean over the epoch's steps and the workers, replicated (readable by every
        process, also where the workers span several)."""
        return jax.lax.with_sharding_constraint(jnp.mean(jnp.stack(losses)), replicated)

    @nnx.jit
    def evaluate(net: Net, images, labels):
        logits = net(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    rng = np.random.default_rng(args.seed)
    rows = bn_rows(rng.permutation(len(train_x)), args.bn_batches, args.batch_size, k)
    bn_images = build_batch(train_x[rows], per_worker)
    test_images, test_labels = jnp.asarray(test_x), jnp.asarray(test_y)

    def eval_at_x(ys, states):
        x, copies = averaged_x(ys, states)
        stats = batch_stats(copies, bn_images)  # each worker's own batches, then the mean
        net = nnx.merge(graphdef, x, rest)
        sf_optax.local.set_nnx_batchnorm_stats(net, stats)
        net.eval()  # running statistics: the ones just set
        loss, accuracy = evaluate(net, test_images, test_labels)
        return float(loss), float(accuracy), x, stats

    every = (100 * total) // len(sync_steps) / 100
    print(
        f"digits: {len(train_x)} train / {len(test_x)} test images, {k} workers on "
        f"{jax.devices()[0].platform} x {args.batch_size} images, sf_optax.adamw lr {args.lr} "
        f"b1 {args.b1} warmup {args.warmup_steps}, {total} steps; rule {args.rule}: "
        f"{len(sync_steps)} syncs (one every {every:g} steps on average), after steps "
        f"{', '.join(map(str, sync_steps))}",
        flush=True,
    )
    bar = None
    if not args.quiet and sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="step", leave=False, mininterval=0.5)
    start, t, syncs, history = time.perf_counter(), 0, 0, []
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(train_x))
        losses = []
        for i in range(steps_per_epoch):
            # every worker its own share of the global batch
            idx = order[i * global_batch : (i + 1) * global_batch].reshape(k, args.batch_size)
            batch = (build_batch(train_x[idx], per_worker), build_batch(train_y[idx], per_worker))
            ys, states, loss = step(ys, states, batch, mask[t])
            losses.append(loss)
            syncs += int(mask[t])
            t += 1
            if bar is not None:
                bar.update()
        train_loss = float(mean_loss(losses))  # one host sync per epoch
        loss_x, accuracy_x, x, stats = eval_at_x(ys, states)
        history.append(dict(epoch=epoch, train_loss_y=train_loss, eval_loss_x=loss_x,
                            eval_accuracy_x=accuracy_x, syncs=syncs))  # fmt: skip
        line = (
            f"epoch {epoch:3d}/{args.epochs}  train loss (y) {train_loss:.4f}  eval loss (x) "
            f"{loss_x:.4f}  eval accuracy (x) {accuracy_x:.2%}  syncs {syncs}"
        )
        if bar is None:
            print(line, flush=True)
        else:
            bar.write(line)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    # A sync averages two model sizes (params and z); data parallel all-reduces one (the
    # gradients) at every step.
    print(
        f"done in {seconds:.1f} s: {syncs} syncs in {total} steps, {2 * syncs} model sizes "
        f"communicated ({2 * syncs / total:.0%} of data parallel's {total}); final eval at x: "
        f"loss {loss_x:.6f} accuracy {accuracy_x:.6f}",
        flush=True,
    )
    result = dict(history=history, syncs=syncs, sync_steps=sync_steps, steps=total,
                  ys=ys, states=states, x=x, stats=stats, seconds=seconds)  # fmt: skip
    if args.save:
        save(args.save, result)
    return result


def save(path: str, result: dict) -> None:
    """The final per-worker ``y`` and ``z`` (leading axis: the workers), the averaged ``x`` and
    the BatchNorm statistics at it, in one .npz: keys such as ``y/hidden/kernel``,
    ``x/norm/scale``, ``stats/0/mean``."""
    z = sf_optax.find_state(result["states"]).z
    arrays = {}
    for name, tree in (("y", result["ys"]), ("z", z), ("x", result["x"])):
        for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
            parts = [str(getattr(key, "key", getattr(key, "name", key))) for key in keys]
            parts = parts[:-1] if parts[-1] == "value" else parts  # nnx.Variable's value
            arrays["/".join([name, *parts])] = np.asarray(leaf)
    for i, (mean, var) in enumerate(result["stats"]):
        arrays[f"stats/{i}/mean"], arrays[f"stats/{i}/var"] = np.asarray(mean), np.asarray(var)
    np.savez(path, **arrays)


if __name__ == "__main__":
    main()
