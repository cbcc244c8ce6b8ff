"""Lightning runs for tests/test_trainer_lightning.py: one process (plain strategy) or one rank of
a 2-rank DeepSpeed strategy on CPU (gloo, DS_ACCELERATOR=cpu).

Run as ``python tests/trainer_lightning_worker.py OUT '<json options>'``; a DeepSpeed rank reads
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from its environment (the test starts both
ranks) and writes ``OUT.rank{r}``. Every run trains examples/trainers/lightning_module.py's
DigitsModule for STEPS steps, validates every VAL_EVERY steps and saves checkpoints, then runs
resume from a checkpoint to STEPS again. What it writes is what Lightning logged and saved; the
test computes the expected numbers itself with a plain torch loop.

Setups: "ours" (ScheduleFreeCallback), and the peers as users write them (a user callback):
"train_only" (train() at on_train_start, never eval(): schedulefree's classes start in eval
mode, so no switching at all fails at the first step), "naive" (train() at on_train_start,
eval() at on_validation_start, train() at on_validation_end) and "eval_only" (train() at
on_train_start, eval() at on_validation_start only).

Resumes start at epoch boundaries (8 steps an epoch): Lightning restarts a plain DataLoader's
epoch when resumed mid-epoch, which would change the data, not the optimizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from examples.trainers import lightning_module as ex  # noqa: E402
from sf_torch.integrations.lightning import (  # noqa: E402
    ScheduleFreeCallback,
    convert_zero_checkpoint_to_x,
    load_x_state_dict,
)

STEPS, VAL_EVERY, SAVE_EVERY, BATCH = 16, 4, 8, 32
LR = {"sgd": 1.0}  # else 2e-2: x and y far apart within 16 steps


def lr_of(optimizer: str) -> float:
    return LR.get(optimizer, 2e-2)


RESUME_FROM = ("step=8.ckpt", "val-step=8.ckpt")  # saved in train mode / at validation end


class Recorder(Callback):
    """The val_loss Lightning logged at each validation, with the step."""

    def __init__(self):
        self.val = []
        self.times = []  # (hook, seconds since the recorder was made)
        self.start = time.perf_counter()

    def _t(self, name):
        self.times.append((name, round(time.perf_counter() - self.start, 3)))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._t("batch_end")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._t("save")

    def on_train_start(self, trainer, pl_module):
        self._t("train_start")

    def on_fit_end(self, trainer, pl_module):
        self._t("fit_end")

    def on_validation_end(self, trainer, pl_module):
        self._t("val_end")
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


class Naive(Callback):
    """The user callback seen in Lightning's issues and discussions."""

    def __init__(self, setup: str):
        self.setup = setup

    def on_train_start(self, trainer, pl_module):
        pl_module.sf_optimizer.train()

    def on_validation_start(self, trainer, pl_module):
        if self.setup != "train_only":
            pl_module.sf_optimizer.eval()

    def on_validation_end(self, trainer, pl_module):
        if self.setup == "naive":
            pl_module.sf_optimizer.train()


def optimizer_tensors(optimizer) -> dict:
    """Every tensor of the optimizer's state dict (z, v, ...), by path, cloned."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value.detach().clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    try:
        walk("", optimizer.state_dict())
    except KeyError:  # ZeRO-3 keeps state for flat partitions its param_groups no longer list
        walk("state", [dict(v) for v in optimizer.state.values()])
    return out


def run(setup: str, optimizer: str, folder: str, resume: str | None, opts: dict) -> dict:
    world = opts.get("world", 1)
    pl.seed_everything(0, verbose=False)
    module = ex.DigitsModule(optimizer, lr_of(optimizer), 0, 0)
    # each rank its rows rank::world in order: the ranks' batches make the one-process batch
    rank = int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None
    train, val = ex.loaders(BATCH, world, rank)
    recorder = Recorder()
    callbacks = [recorder]
    if setup == "ours":
        callbacks.append(ScheduleFreeCallback())
    elif setup in ("train_only", "naive", "eval_only"):
        callbacks.append(Naive(setup))
    # Lightning moves the checkpoint callbacks last, as it always does.
    callbacks.append(
        ModelCheckpoint(
            dirpath=folder, filename="{step}", every_n_train_steps=SAVE_EVERY, save_top_k=-1
        )
    )
    callbacks.append(
        ModelCheckpoint(dirpath=folder, filename="val-{step}", monitor="val_loss", save_top_k=-1)
    )
    if "stage" in opts:
        # Lightning's default buckets hold 2e8 elements (zeroed on CPU every step): small ones
        strategy = ex.CPUDeepSpeedStrategy(
            stage=opts["stage"],
            process_group_backend="gloo",
            allgather_bucket_size=100_000,
            reduce_bucket_size=100_000,
        )
        kwargs = {"accelerator": "cpu", "devices": world, "strategy": strategy}
    else:
        kwargs = {"accelerator": "cpu", "devices": 1}
    trainer = pl.Trainer(
        max_steps=STEPS,
        val_check_interval=VAL_EVERY,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        use_distributed_sampler=False,
        **kwargs,
    )
    result = {"val": recorder.val, "error": None, "times": recorder.times}
    try:
        trainer.fit(module, train, val, ckpt_path=os.path.join(folder, resume) if resume else None)
    except Exception as err:  # a peer's failure is a result
        result["error"] = f"{type(err).__name__}: {err}"
        return result
    gathered = contextlib.nullcontext()
    if opts.get("stage") == 3:  # the partitioned weights, gathered (collective)
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gathered:
        result["final"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result["optimizer"] = optimizer_tensors(module.sf_optimizer)
    result["train_mode"] = [g.get("train_mode") for g in module.sf_optimizer.param_groups]
    return result


def read_checkpoints(folder: str, deepspeed: bool, converted: str | None = None) -> dict:
    """Each checkpoint's weights as users load them; under DeepSpeed through load_x_state_dict
    (the callback's x; a peer's: the module file), and for the ``converted`` checkpoint also
    through the x converter (with load_from_checkpoint) and DeepSpeed's and Lightning's fp32
    converters."""
    out = {}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if deepspeed:
            if not os.path.isdir(path):
                continue
            tag_dir = os.path.join(path, "checkpoint")
            model_file = [f for f in sorted(os.listdir(tag_dir)) if f.endswith("model_states.pt")]
            saved = torch.load(os.path.join(tag_dir, model_file[0]), weights_only=False)
            # a peer's checkpoint has no x to read: its module file (ZeRO-2) as saved
            weights = load_x_state_dict(path) if converted else saved["module"]
            out[name] = {
                "state_dict": weights,
                "schedule_free": saved.get("schedule_free"),
                "global_step": saved["global_step"],
            }
            if name == converted:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                from lightning.pytorch.utilities.deepspeed import (
                    convert_zero_checkpoint_to_fp32_state_dict,
                )

                entry = out[name]
                entry["zero_to_fp32"] = get_fp32_state_dict_from_zero_checkpoint(path)
                x_file = os.path.join(folder, f"x-rank{rank}.pt")
                convert_zero_checkpoint_to_x(path, x_file)
                with contextlib.redirect_stdout(None):
                    lightning = convert_zero_checkpoint_to_fp32_state_dict(
                        path, os.path.join(folder, f"fp32-rank{rank}.pt")
                    )
                entry["lightning_fp32"] = lightning["state_dict"]
                try:  # ZeRO-3: the callback's x travels in it; ZeRO-2: nothing holds x
                    entry["lightning_fp32_x"] = load_x_state_dict(
                        os.path.join(folder, f"fp32-rank{rank}.pt")
                    )
                except ValueError as err:
                    entry["lightning_fp32_x"] = str(err)
                module = ex.DigitsModule.load_from_checkpoint(x_file)
                entry["converted_x"] = {
                    k: v.detach().clone() for k, v in module.state_dict().items()
                }
                entry["converted_x_loaded"] = load_x_state_dict(x_file)
        elif name.endswith(".ckpt"):
            saved = torch.load(path, map_location="cpu", weights_only=False)
            groups = [
                g.get("train_mode") for g in saved["optimizer_states"][0].get("param_groups", [])
            ]
            out[name] = {
                "state_dict": saved["state_dict"],
                "schedule_free": saved.get("schedule_free"),
                "global_step": saved["global_step"],
                "optimizer_train_mode": groups,
            }
            if converted is not None:  # ours: what load_x_state_dict reads from the file
                out[name]["x"] = load_x_state_dict(path)
    return out


def validate(optimizer: str, folder: str, ckpt: str, opts: dict) -> list:
    """trainer.validate(ckpt_path=...) on a fresh module: the val_loss of the loaded weights.
    ZeRO-2 loads the checkpoint folder; ZeRO-3 the x converter's file with load_full_weights
    (DeepSpeed 0.19.8's ZeRO-3 inference engine fails to load a checkpoint folder:
    'DeepSpeedZeRoOffload' object has no attribute '_restore_from_bit16_weights')."""
    world = opts["world"]
    module = ex.DigitsModule(optimizer, lr_of(optimizer), 0, 0)
    _, val = ex.loaders(BATCH, world, int(os.environ.get("LOCAL_RANK", 0)))
    strategy = ex.CPUDeepSpeedStrategy(
        stage=opts["stage"],
        process_group_backend="gloo",
        allgather_bucket_size=100_000,
        reduce_bucket_size=100_000,
        load_full_weights=opts["stage"] == 3,
    )
    if opts["stage"] == 3:
        ckpt = "x-rank0.pt"  # rank 0's path is the one Lightning loads on every rank
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        callbacks=[ScheduleFreeCallback()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    metrics = trainer.validate(module, val, ckpt_path=os.path.join(folder, ckpt), verbose=False)
    return [float(m["val_loss"]) for m in metrics]


def main() -> None:
    out_path, opts = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    deepspeed = "stage" in opts
    results = {}
    for setup, optimizer in opts["runs"]:
        name = f"{setup}-{optimizer}"
        folder = os.path.join(opts["folder"], name)
        start = time.perf_counter()
        entry = {"full": run(setup, optimizer, folder, None, opts)}
        first = opts.get("resume", RESUME_FROM)[0]
        converted = first if setup == "ours" else None
        mark = time.perf_counter()
        entry["checkpoints"] = (
            read_checkpoints(folder, deepspeed, converted) if os.path.isdir(folder) else {}
        )
        entry["read_seconds"] = time.perf_counter() - mark
        if deepspeed and setup == "ours" and first in entry["checkpoints"]:
            mark = time.perf_counter()
            entry["validate:" + first] = validate(optimizer, folder, first, opts)
            entry["validate_seconds"] = time.perf_counter() - mark
        for ckpt in opts.get("resume", RESUME_FROM):
            if entry["full"]["error"] is None and ckpt in entry["checkpoints"]:
                resumed = os.path.join(opts["folder"], name + "-from-" + ckpt)
                os.makedirs(resumed, exist_ok=True)
                for src in (ckpt,):  # resume from the full run's own file or folder
                    target = os.path.join(resumed, src)
                    with contextlib.suppress(FileExistsError):  # the other rank made it
                        os.symlink(os.path.join(folder, src), target)
                entry["resumed:" + ckpt] = run(setup, optimizer, resumed, ckpt, opts)
        entry["seconds"] = time.perf_counter() - start
        results[name] = entry
    torch.save(results, out_path + (f".rank{rank}" if deepspeed else ""))


if __name__ == "__main__":
    main()
