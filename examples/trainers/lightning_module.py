"""A LightningModule trained with a Schedule-Free optimizer and ``ScheduleFreeCallback``.

Digits classification (scikit-learn's 8x8 digits, shipped with the package: no download) with a
small MLP. Validation runs at ``x``, training at ``y``; checkpoints hold ``x`` as their weights
and resume exactly::

    python examples/trainers/lightning_module.py --max-steps 200 --ckpt-dir /tmp/ckpt
    python examples/trainers/lightning_module.py --max-steps 400 --ckpt-dir /tmp/ckpt \\
        --resume /tmp/ckpt/step=200.ckpt
    # DeepSpeed ZeRO-2 on 2 GPUs (on CPU: DS_ACCELERATOR=cpu ... --accelerator cpu)
    python examples/trainers/lightning_module.py --strategy deepspeed_stage_2 --devices 2
    # the last checkpoint's weights at x as one state_dict file (any strategy, ZeRO-3 too)
    python examples/trainers/lightning_module.py --strategy deepspeed_stage_3 --devices 2 \
        --ckpt-dir /tmp/ckpt3 --export-x /tmp/x.pt

``--accelerator cpu`` with a DeepSpeed strategy uses ``CPUDeepSpeedStrategy`` below (Lightning's
DeepSpeed strategy refuses anything but CUDA; DeepSpeed itself runs on CPU with
``DS_ACCELERATOR=cpu`` and gloo): the tests run it that way.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

import sf_torch
from sf_torch.integrations.lightning import ScheduleFreeCallback, load_x_state_dict

HIDDEN = 32
OPTIMIZERS = ("adamw", "sgd", "radam", "wrapper", "schedulefree_adamw")


def digits(train_rows: int = 256, val_rows: int = 128, seed: int = 0):
    """Standardised digits, rows permuted once by ``seed``: (x_train, y_train, x_val, y_val)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = data.data[order].astype(np.float32)
    x = (x - x[:train_rows].mean(0)) / (x[:train_rows].std(0) + 1.0)
    y = data.target[order].astype(np.int64)
    tr, va = slice(0, train_rows), slice(train_rows, train_rows + val_rows)
    return (torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[va]),
            torch.from_numpy(y[va]))  # fmt: skip


def make_net(seed: int = 0) -> torch.nn.Module:
    """The MLP with weights drawn by numpy from ``seed`` (the same whatever torch's RNG)."""
    rng = np.random.default_rng(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.from_numpy(rng.normal(scale=0.3, size=tuple(p.shape))))
    return net


def make_optimizer(name: str, params, lr: float, warmup_steps: int = 0):
    """One of OPTIMIZERS: sf_torch's classes, sf_torch.ScheduleFreeWrapper around SGD, or the
    ``schedulefree`` package's AdamW."""
    if name == "adamw":
        return sf_torch.AdamWScheduleFree(
            params, lr=lr, warmup_steps=warmup_steps, weight_decay=1e-3
        )
    if name == "sgd":
        return sf_torch.SGDScheduleFree(params, lr=lr, warmup_steps=warmup_steps)
    if name == "radam":
        return sf_torch.RAdamScheduleFree(params, lr=lr)
    if name == "wrapper":
        return sf_torch.ScheduleFreeWrapper(torch.optim.SGD(params, lr=lr), momentum=0.9)
    if name == "schedulefree_adamw":
        import schedulefree

        return schedulefree.AdamWScheduleFree(
            params, lr=lr, warmup_steps=warmup_steps, weight_decay=1e-3
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class DigitsModule(pl.LightningModule):
    """The MLP, cross-entropy, ``val_loss`` logged per validation (mean over the ranks)."""

    def __init__(
        self, optimizer: str = "adamw", lr: float = 1e-2, warmup_steps: int = 0, seed: int = 0
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("test_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))

    def configure_optimizers(self):
        h = self.hparams
        # kept on the module: a user callback (or a test) reaches the optimizer it built
        self.sf_optimizer = make_optimizer(h.optimizer, self.parameters(), h.lr, h.warmup_steps)
        return self.sf_optimizer


def loaders(batch_size: int, world: int = 1, rank: int | None = None, seed: int = 0):
    """Train and validation loaders, in a fixed order (no shuffling: resumes see the same
    batches); ``batch_size`` is the global batch, split over ``world`` ranks. With ``rank``
    the loaders hold that rank's rows (``rank::world``: the ranks' batches together are the
    single-process batch) for ``Trainer(use_distributed_sampler=False)``; without it Lightning's
    sampler splits (and shuffles) the training rows itself."""
    xt, yt, xv, yv = digits(seed=seed)
    if rank is not None:
        xt, yt, xv, yv = (t[rank::world] for t in (xt, yt, xv, yv))
    per_rank = batch_size // world
    train = torch.utils.data.TensorDataset(xt, yt)
    val = torch.utils.data.TensorDataset(xv, yv)
    return (torch.utils.data.DataLoader(train, batch_size=per_rank, shuffle=False),
            torch.utils.data.DataLoader(val, batch_size=per_rank, shuffle=False))  # fmt: skip


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy without its CUDA-only check (DeepSpeed on CPU needs
    ``DS_ACCELERATOR=cpu``; the process group is gloo) and its check of GPU indices."""

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads the rank from the device index (Lightning's CPU devices have none)
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def make_strategy(name: str, accelerator: str):
    if not name.startswith("deepspeed"):
        return name
    stage = {"deepspeed": 2, "deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}
    if name not in stage:
        raise ValueError(f"strategy must be auto, ddp or one of {sorted(stage)}, got {name!r}")
    if accelerator != "cpu":
        return name
    # Lightning's default buckets hold 2e8 elements, zeroed every step: slow on CPU
    return CPUDeepSpeedStrategy(
        stage=stage[name],
        process_group_backend="gloo",
        allgather_bucket_size=1_000_000,
        reduce_bucket_size=1_000_000,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=50, help="training steps")
    parser.add_argument("--strategy", default="auto", help="auto, ddp, deepspeed_stage_{1,2,3}")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument(
        "--ckpt-dir", default=None, help="save a checkpoint every --val-every steps"
    )
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument(
        "--export-x",
        default=None,
        help="after fit, write the last checkpoint's weights at x (load_x_state_dict) here",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.export_x and not args.ckpt_dir:
        parser.error("--export-x reads the last checkpoint: give --ckpt-dir too")

    pl.seed_everything(args.seed, verbose=False)
    module = DigitsModule(args.optimizer, args.lr, args.warmup_steps, args.seed)
    train, val = loaders(args.batch_size, args.devices, seed=args.seed)
    callbacks = [ScheduleFreeCallback()]
    if args.ckpt_dir:
        callbacks.append(
            ModelCheckpoint(
                dirpath=args.ckpt_dir,
                filename="{step}",
                every_n_train_steps=args.val_every,
                save_top_k=-1,
            )  # fmt: skip
        )
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        strategy=make_strategy(args.strategy, args.accelerator),
        accelerator=args.accelerator,
        devices=args.devices,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(args.ckpt_dir),
    )
    trainer.fit(module, train, val, ckpt_path=args.resume)
    if trainer.is_global_zero:
        val_loss = float(trainer.callback_metrics["val_loss"])
        print(f"step {trainer.global_step}: val_loss at x {val_loss:.6f}")
        if args.export_x:
            # a file (plain strategy) or a DeepSpeed folder; ZeRO-3's x is in rank 0's file
            last = trainer.checkpoint_callback.best_model_path
            torch.save(load_x_state_dict(last), args.export_x)
            print(f"weights at x of {last} written to {args.export_x}")


if __name__ == "__main__":
    main()
