"""Schedule-Free AdamW under DeepSpeed: a small BatchNorm MLP on scikit-learn's 8x8 digits.

    deepspeed schedulefree_deepspeed_demo.py --deepspeed_config ds_config.json       # all GPUs
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 schedulefree_deepspeed_demo.py \\
        --deepspeed_config ds_config.json --epochs 3                                 # CPU ranks
    deepspeed schedulefree_deepspeed_demo.py --local-steps                           # local steps

(see README.md beside this file for one GPU, several GPUs and several nodes).

Schedule-Free trains at one point and evaluates at another. The model's weights are ``y`` while
training; the point to evaluate and to save is ``x``, an average that DeepSpeed's engine knows
nothing about. Under ZeRO the optimizer only sees DeepSpeed's fp32 partitions, so the plain
``optimizer.eval()`` would not touch the weights the model computes with;
``sf_torch.deepspeed.eval(engine)`` does, on every rank, and ``train(engine)`` switches back.

BatchNorm's running statistics were collected at y; before each evaluation they are recomputed
at x from training batches (``sf_torch.recompute_batchnorm_stats``), and the training
statistics come back afterwards.

Local steps (``--local-steps``, config ``ds_config_local.json``; any config with a
``"local_steps"`` section): every rank steps on its own gradients, with no gradient all-reduce,
and the ranks average their models (params and ``z``) after the sync steps of the section's rule
(``sf_schedules.sync``). The demo sets the section's ``total_steps`` to the run's length, and its
``warmup_steps`` to the optimizer's when the section leaves it out. An epoch that ends on a sync
step is evaluated on the engine (every rank holds the same ``x``); one that ends mid-round on a
copy of the model holding the mean of the ranks' ``x`` (what a sync would give, to rounding),
so that training is not disturbed. BatchNorm statistics at ``x``: each rank re-estimates them
on its own batches and the ranks average them (``sf_torch.local.recompute_batchnorm_stats``).
The last step is always a sync step, so the run ends with one model on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import sf_torch
import sf_torch.deepspeed as sfds
import sf_torch.local

HERE = os.path.dirname(os.path.abspath(__file__))


def show_progress(quiet: bool) -> bool:
    """A progress bar only in a terminal: written to a log or a pipe, its redraws would be
    thousands of carriage-return frames (the per-epoch lines are printed either way)."""
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (micro-batch)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.0025)
    parser.add_argument("--beta", type=float, default=0.9, help="b1: interpolation x <-> z")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--bn-batches", type=int, default=8, help="batches for BN stats at x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", default=None, help="save a checkpoint (at x) each epoch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--local-steps",
        action="store_true",
        help="local steps: the config's local_steps section (default config ds_config_local.json)",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
    return parser.parse_args(argv)


class Float32BatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d that normalises in float32 whatever dtype its input and weights have.

    Under ``"bf16"`` or ``"fp16"`` DeepSpeed casts the parameters but not the buffers, and
    torch's CPU kernel refuses a bf16 input and weight with float32 running statistics. Float32
    statistics are what mixed precision wants anyway (a bf16 running variance keeps about three
    significant digits); the output comes back in the input's dtype. In float32 this is
    BatchNorm1d exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average (recompute_batchnorm_stats at x)
                factor = 1.0 / float(self.num_batches_tracked)
        out = torch.nn.functional.batch_norm(
            x.float(),
            self.running_mean,
            self.running_var,
            self.weight.float(),
            self.bias.float(),
            self.training,
            factor,
            self.eps,
        )
        return out.to(x.dtype)


class Net(torch.nn.Module):
    """64 pixels -> hidden -> BatchNorm -> ReLU -> hidden -> BatchNorm -> ReLU -> 10 logits."""

    def __init__(self, hidden: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, hidden),
            Float32BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            Float32BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def load_data(seed: int):
    digits = load_digits()  # shipped inside scikit-learn: nothing to download
    images = (digits.data / 16.0).astype(np.float32)
    return train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )


def config_for(args: argparse.Namespace, total_steps: int) -> dict:
    """The JSON config, with this script's flags for the batch size and the optimizer; a
    local_steps section gets ``total_steps`` (the run's optimizer steps) and, when it leaves it
    out and its rule has one, ``warmup_steps`` (the optimizer's)."""
    default = "ds_config_local.json" if args.local_steps else "ds_config.json"
    path = args.deepspeed_config or os.path.join(HERE, default)
    with open(path) as f:
        config = json.load(f)
    local = config.get("local_steps")
    if args.local_steps and local is None:
        raise SystemExit(
            f"error: --local-steps needs a config with a local_steps section, and {path} has "
            "none (see ds_config_local.json)"
        )
    if local is not None:
        local["total_steps"] = total_steps
        if local.get("rule") != "constant":
            local.setdefault("warmup_steps", args.warmup_steps)
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config["optimizer"] = {
        "type": "AdamWScheduleFree",
        "params": {
            "lr": args.lr,
            "betas": [args.beta, 0.999],
            "weight_decay": args.weight_decay,
            "warmup_steps": args.warmup_steps,
        },
    }
    return config


def check_precision(config: dict, accelerator) -> None:
    """A clear stop, before any rank builds an engine, for a precision the device lacks."""
    if config.get("fp16", {}).get("enabled") and not accelerator.is_fp16_supported():
        raise SystemExit(
            f"error: ds_config enables fp16, which {accelerator.device_name()} ranks here cannot "
            "run (DeepSpeed's CPU accelerator needs a CPU with oneDNN fp16, AVX512-FP16 or AMX): "
            'run on GPUs, or use "bf16": {"enabled": true} on CPU'
        )
    if config.get("bf16", {}).get("enabled") and not accelerator.is_bf16_supported():
        raise SystemExit(
            f"error: ds_config enables bf16, which {accelerator.device_name()} ranks here cannot "
            'run: set "bf16": {"enabled": false}, or use "fp16" on GPUs that lack bf16'
        )


def bn_rows(order: np.ndarray, n_batches: int, batch_size: int, rank: int, world: int):
    """Row indices of this rank's batches for the BatchNorm statistics at x, taken from the
    shuffled ``order``: rank ``r`` of ``world`` gets batches ``r * n_batches`` to
    ``(r + 1) * n_batches - 1`` (``world = 1``: every rank the same)."""
    rows = order[: n_batches * batch_size * world]
    batches = np.array_split(rows, n_batches * world)
    return batches[rank * n_batches : (rank + 1) * n_batches]


def evaluate(model, images, labels, bn_batches, dtype, group=None) -> tuple[float, float]:
    """Loss and accuracy of the weights ``model`` holds, BN statistics at them (with ``group``:
    each rank's statistics from its own batches, averaged over the group)."""
    device = next(model.parameters()).device
    inputs = torch.from_numpy(images).to(device, dtype)
    if group is None:
        stats = sf_torch.recompute_batchnorm_stats(model, bn_batches)
    else:
        stats = sf_torch.local.recompute_batchnorm_stats(model, bn_batches, group=group)
    with stats:
        with torch.no_grad():
            logits = model(inputs).float()
    target = torch.from_numpy(labels).to(device)
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    return loss, (logits.argmax(1) == target).float().mean().item()


def averaged_copy(engine, hidden: int):
    """A new model holding the mean over the ranks of the weights the engine's model holds
    (after ``sfds.eval``: each rank's own x, whose mean is the x a sync would give) and the
    engine's buffers; collective."""
    module = engine.module
    copy = Net(hidden).to(engine.device)
    copy.load_state_dict(module.state_dict())  # into float32 params: bf16 values are exact
    sf_torch.local.average_(list(copy.parameters()), engine.data_parallel_group)
    for mine, theirs in zip(copy.parameters(), module.parameters()):
        mine.data = mine.data.to(theirs.dtype)
    return copy


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # gloo for CPU ranks (DS_ACCELERATOR=cpu); the accelerator's own backend (NCCL) otherwise
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(args.seed)
    train_x, test_x, train_y, test_y = load_data(args.seed)

    global_batch = args.batch_size * world
    steps = len(train_x) // global_batch
    config = config_for(args, args.epochs * steps)
    check_precision(config, get_accelerator())
    local = config.get("local_steps") is not None
    engine, *_ = sfds.initialize(model=Net(args.hidden_dim), model_parameters=None, config=config)
    # The dtype the engine computes in (bf16/fp16 when the config enables them): inputs must
    # have it too.
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    if rank == 0:
        print(f"{world} {torch.device(device).type} ranks, computing in {dtype}", flush=True)
    if local and rank == 0:
        state = sfds.local_state(engine)
        print(
            f"local steps: rule {config['local_steps']['rule']}, "
            f"{len(state['sync_steps'])} syncs planned in {state['sync_steps'][-1]} steps "
            f"(after steps {', '.join(map(str, state['sync_steps']))})",
            flush=True,
        )
    rng = np.random.default_rng(args.seed)
    # Without local steps the same BN batches on every rank, so that every rank gets the same
    # statistics at x; with local steps each rank's own, averaged over the ranks.
    order = rng.permutation(len(train_x))
    rows = bn_rows(order, args.bn_batches, args.batch_size, *((rank, world) if local else (0, 1)))
    bn_batches = [torch.from_numpy(train_x[r]).to(device, dtype) for r in rows]
    group = engine.data_parallel_group if local else None
    bar = tqdm(
        total=args.epochs * steps,
        disable=rank != 0 or not show_progress(args.quiet),
        desc="train",
        mininterval=0.5,  # a few redraws a second, not ten
    )
    history = []
    for epoch in range(args.epochs):
        sfds.train(engine)  # weights at y, BatchNorm in training mode
        order = rng.permutation(len(train_x))
        losses = []
        for step in range(steps):
            # every rank draws the same global batch and takes its own slice of it
            rows = order[step * global_batch : (step + 1) * global_batch]
            rows = rows[rank * args.batch_size : (rank + 1) * args.batch_size]
            images = torch.from_numpy(train_x[rows]).to(device, dtype)
            labels = torch.from_numpy(train_y[rows]).to(device)
            loss = torch.nn.functional.cross_entropy(engine(images).float(), labels)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            bar.update()
        sfds.eval(engine)  # weights at x on every rank
        model = engine.module
        if local:
            state = sfds.local_state(engine)
            if state["steps_taken"] not in state["sync_steps"]:  # mid-round: the ranks differ
                model = averaged_copy(engine, args.hidden_dim)
        eval_loss, accuracy = evaluate(model, test_x, test_y, bn_batches, dtype, group)
        record = dict(
            epoch=epoch + 1,
            train_loss_y=float(np.mean(losses)),
            eval_loss_x=eval_loss,
            eval_accuracy_x=accuracy,
        )
        if local:
            record["syncs"] = state["syncs"]
        history.append(record)
        if rank == 0:
            bar.write(
                f"epoch {epoch + 1:3d}  train loss (y) {record['train_loss_y']:.4f}  "
                f"eval loss (x) {eval_loss:.4f}  eval accuracy (x) {accuracy:.2%}"
                + (f"  syncs {state['syncs']}" if local else "")
            )
        if args.save_dir:
            engine.save_checkpoint(args.save_dir, tag=f"epoch{epoch + 1}")  # the model holds x
    bar.close()
    if local and rank == 0:
        syncs, taken = state["syncs"], state["steps_taken"]
        # A sync all-reduces the params and z (and v if asked); data parallel all-reduces the
        # gradients at every step: one model size each.
        sizes = 1 + len(state["average"])
        print(
            f"local steps done: {syncs} syncs in {taken} steps; {syncs * sizes} model sizes "
            f"communicated, {syncs * sizes / taken:.0%} of data parallel's {taken}; final "
            f"eval at x: loss {history[-1]['eval_loss_x']:.6f} accuracy "
            f"{history[-1]['eval_accuracy_x']:.6f}",
            flush=True,
        )
    torch.distributed.barrier()
    return {"history": history, "rank": rank, "world": world}


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()
