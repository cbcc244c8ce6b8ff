"""transformers' ``Trainer`` with the sf_torch schedule-free optimizers, plain or under DeepSpeed.

What goes wrong without this (transformers 4.57.6, accelerate 1.15.0, measured in
tests/test_trainer_hf.py with ``schedulefree`` and ``optim="schedule_free_adamw"``): the Trainer
calls ``optimizer.eval()`` before evaluating and ``optimizer.train()`` in every training step,
but nothing before ``_save_checkpoint``, so a checkpoint's model file holds y, not x, unless an
evaluation ran at the same step; and under DeepSpeed the switch never reaches the weights the
model computes with (DeepSpeed steps separate fp32 masters), so evaluation runs at y too.

Here:

- :class:`ScheduleFreeTrainer` (``Trainer`` with :class:`ScheduleFreeTrainerMixin`) maps the
  ``optim`` names ``schedule_free_adamw``, ``schedule_free_sgd`` and ``schedule_free_radam`` to
  ``sf_torch.AdamWScheduleFree``, ``SGDScheduleFree`` and ``RAdamScheduleFree`` with the
  arguments transformers gives the ``schedulefree`` classes (``learning_rate``, ``adam_beta1/2``,
  ``adam_epsilon``, ``weight_decay``, ``warmup_steps`` except for RAdam, ``optim_args``
  ``r`` and ``weight_lr_power``). ``optimizer_cls_and_kwargs=(sf_torch.AdamWScheduleFree, {...})``
  works too. It adds :class:`ScheduleFreeCallback` and, during ``train()``, builds the DeepSpeed
  engine through ``sf_torch.deepspeed.initialize`` (see :func:`deepspeed_routed`), so that the
  Trainer's own ``optimizer.eval()``/``train()`` calls go through ``sf_torch.deepspeed.eval``/
  ``train`` on every rank. A DeepSpeed config may also name the optimizer
  (``"optimizer": {"type": "AdamWScheduleFree", "params": {...}}``).
- :class:`ScheduleFreeCallback` switches to x right before every checkpoint (the step or epoch
  end at which the Trainer will save) and at the end of training, so the checkpoint's model file
  (``model.safetensors``; under ZeRO-3 the gathered 16-bit weights) holds x, and so does the
  model after ``train()`` for ``save_model``/``evaluate``. The next training step's
  ``optimizer.train()`` goes back to y. Alone (a plain ``Trainer``) it serves runs without
  DeepSpeed; under DeepSpeed it refuses an engine not built by ``sf_torch.deepspeed``.

Checkpoints are saved in eval mode: model file x, optimizer state z (and v) with the mode
flags saying eval. On resume the Trainer loads the model file (x) and the optimizer state
(eval mode), and its first training step's ``optimizer.train()`` computes y from that x and z
with the very operation the uninterrupted run applied to the same x and z after saving, so the
resumed run is bitwise the uninterrupted one (float32 files hold the tensors exactly). Under
DeepSpeed with separate masters the masters keep y through eval and save, and
``engine.load_checkpoint`` (wrapped by ``sf_torch.deepspeed``) restores them and the mode.
What the save does cost: where the params themselves switch (no DeepSpeed, or fp32 ZeRO-0/3),
each checkpoint is a y -> x -> y round trip, the same rounding an evaluation causes, so a run's
trajectory depends on its save steps at the level of float32 rounding.

Use ``lr_scheduler_type="constant"``: the Trainer's default linear decay also applies to the
schedule-free learning rate (its warmup is the optimizer's ``warmup_steps``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

from transformers import Trainer, TrainerCallback

from ..optimizers import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    ScheduleFreeOptimizer,
    SGDScheduleFree,
)

# transformers' optim names (OptimizerNames values) and the sf_torch class each gets.
OPTIM_NAMES = {
    "schedule_free_adamw": AdamWScheduleFree,
    "schedule_free_sgd": SGDScheduleFree,
    "schedule_free_radam": RAdamScheduleFree,
}

__all__ = [
    "OPTIM_NAMES",
    "ScheduleFreeCallback",
    "ScheduleFreeTrainer",
    "ScheduleFreeTrainerMixin",
    "deepspeed_routed",
    "optimizer_cls_and_kwargs",
    "schedule_free_optimizer",
]


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim))


def _optim_args(args: Any) -> dict[str, str]:
    text = getattr(args, "optim_args", None)
    if not text:
        return {}
    out = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(
                f'optim_args: "{item}" is not key=value (e.g. "r=0.0,weight_lr_power=2")'
            )
        out[key] = value
    return out


def optimizer_cls_and_kwargs(args: Any) -> tuple[type[ScheduleFreeOptimizer], dict[str, Any]]:
    """The sf_torch class and constructor arguments for ``args.optim`` (one of
    :data:`OPTIM_NAMES`), from the ``TrainingArguments`` as transformers 4.57.6 reads them for
    the ``schedulefree`` classes. The Trainer sets each param group's ``weight_decay`` itself
    (0 for biases and LayerNorm weights). ValueError for another ``optim``."""
    name = _optim_name(args)
    if name not in OPTIM_NAMES:
        raise ValueError(f"args.optim: expected one of {sorted(OPTIM_NAMES)}, got {name!r}")
    cls = OPTIM_NAMES[name]
    extra = _optim_args(args)
    unknown = set(extra) - {"r", "weight_lr_power"}
    if unknown:
        raise ValueError(
            f"optim_args: {sorted(unknown)} not accepted; accepted: r, weight_lr_power"
        )
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "r": float(extra.get("r", 0.0)),
        "weight_lr_power": float(extra.get("weight_lr_power", 2.0)),
    }
    if cls is not SGDScheduleFree:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if cls is not RAdamScheduleFree:
        kwargs["warmup_steps"] = args.warmup_steps
    return cls, kwargs


def schedule_free_optimizer(optimizer: Any) -> ScheduleFreeOptimizer | None:
    """The sf_torch optimizer behind what the Trainer holds as ``trainer.optimizer`` (itself, or
    inside Accelerate's and DeepSpeed's wrappers), or None when there is none."""
    seen = 0
    while optimizer is not None and seen < 4:
        if isinstance(optimizer, ScheduleFreeOptimizer):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


# -- DeepSpeed -----------------------------------------------------------------------------------


def _routes(kwargs: dict[str, Any]) -> bool:
    from .. import deepspeed as sfds

    if isinstance(kwargs.get("optimizer"), ScheduleFreeOptimizer):
        return True
    config = kwargs.get("config", kwargs.get("config_params"))
    opt = sfds._read_config(config).get("optimizer") if isinstance(config, dict | str) else None
    return bool(opt) and opt.get("type") in sfds.OPTIMIZERS


def _bind_views(engine: Any) -> None:
    """The client's eval()/train() (which Accelerate's optimizer wrapper and so the Trainer call)
    become sf_torch.deepspeed.eval/train of its engine."""
    from .. import deepspeed as sfds

    client = sfds.client_optimizer(engine)
    client._sf_engine = engine
    client.eval = types.MethodType(lambda self: sfds.eval(engine), client)
    client.train = types.MethodType(lambda self: sfds.train(engine), client)


@contextlib.contextmanager
def deepspeed_routed() -> Iterator[None]:
    """Within it, ``deepspeed.initialize`` called with an sf_torch optimizer, or with a config
    whose optimizer type is one of ``sf_torch.deepspeed.OPTIMIZERS``, is
    ``sf_torch.deepspeed.initialize``; every other call is DeepSpeed's own. The engine's client
    optimizer's ``eval()``/``train()`` then switch the engine (``sf_torch.deepspeed.eval``/
    ``train``: collective, every rank calls them, as the Trainer does).

    Accelerate (1.15.0) builds the engine with ``deepspeed.initialize`` looked up when
    ``accelerator.prepare`` runs, which is why a scoped replacement reaches it;
    :class:`ScheduleFreeTrainerMixin` wraps ``train()`` in it. A loop written with Accelerate
    can wrap its own ``accelerator.prepare(...)`` call. Without DeepSpeed installed it does
    nothing."""
    try:
        import deepspeed
    except ImportError:
        yield
        return

    from .. import deepspeed as sfds

    original = deepspeed.initialize
    inside = [False]

    def initialize(*args: Any, **kwargs: Any):
        if inside[0] or args or not _routes(kwargs):
            return original(*args, **kwargs)
        if "config_params" in kwargs:
            kwargs["config"] = kwargs.pop("config_params")
        inside[0] = True
        try:
            result = sfds.initialize(**kwargs)
        finally:
            inside[0] = False
        _bind_views(result[0])
        return result

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original


# -- callback and trainer -------------------------------------------------------------------------


def _switch_to_x(optimizer: Any) -> None:
    if schedule_free_optimizer(optimizer) is not None:
        optimizer.eval()


class ScheduleFreeCallback(TrainerCallback):
    """Puts x into the model's weights right before every checkpoint and at the end of
    training (see the module docstring); the Trainer's own ``optimizer.train()`` in the next
    training step puts y back. At the start of training it checks that the Trainer's optimizer
    is an sf_torch schedule-free one and, under DeepSpeed, that the engine was built by
    ``sf_torch.deepspeed`` (use :class:`ScheduleFreeTrainer`): ValueError otherwise."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        client = schedule_free_optimizer(optimizer)
        if client is None:
            inner = optimizer
            while hasattr(inner, "optimizer"):  # Accelerate's and DeepSpeed's wrappers
                inner = inner.optimizer
            raise ValueError(
                "ScheduleFreeCallback: the Trainer's optimizer is "
                f"{type(inner).__module__}.{type(inner).__name__}, not an sf_torch schedule-free "
                "optimizer (use "
                "ScheduleFreeTrainer with optim='schedule_free_adamw' or pass "
                "optimizer_cls_and_kwargs=(sf_torch.AdamWScheduleFree, {...}))"
            )
        if getattr(client, "_sf_deepspeed", False) and getattr(client, "_sf_engine", None) is None:
            raise ValueError(
                "ScheduleFreeCallback: the DeepSpeed engine was not built by "
                "sf_torch.deepspeed.initialize, so eval would not reach the model's weights; "
                "use ScheduleFreeTrainer (or build it within deepspeed_routed())"
            )
        deepspeed = getattr(args, "deepspeed", None) or getattr(
            getattr(args, "hf_deepspeed_config", None), "config", None
        )
        if deepspeed and not getattr(client, "_sf_deepspeed", False):
            raise ValueError(
                "ScheduleFreeCallback: training under DeepSpeed, but the engine's optimizer was "
                "not set up by sf_torch.deepspeed (use ScheduleFreeTrainer)"
            )

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_save:
            _switch_to_x(optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_save:
            _switch_to_x(optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        _switch_to_x(optimizer)


def _keep_optimizer_under_offload(config: dict) -> None:
    """With optimizer offload, Accelerate replaces a torch optimizer by DeepSpeed's CPU Adam
    unless the config says ``zero_force_ds_cpu_optimizer: false``; say it (ValueError if the
    config itself says true)."""
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") in (None, "none"):
        return
    if config.get("zero_force_ds_cpu_optimizer") is True:
        raise ValueError(
            "DeepSpeed config: zero_force_ds_cpu_optimizer is true with optimizer offload, which "
            "replaces the schedule-free optimizer by DeepSpeed's CPU Adam; set it to false"
        )
    config["zero_force_ds_cpu_optimizer"] = False


class ScheduleFreeTrainerMixin:
    """Mix in before ``transformers.Trainer`` (or a subclass of it): the ``schedule_free_*``
    ``optim`` names give sf_torch optimizers, :class:`ScheduleFreeCallback` is added, and
    ``train()`` builds a DeepSpeed engine through ``sf_torch.deepspeed`` (see the module
    docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, ScheduleFreeCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(ScheduleFreeCallback())

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None):
        if _optim_name(args) in OPTIM_NAMES:
            return optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def train(self, *args: Any, **kwargs: Any):
        if getattr(self, "is_deepspeed_enabled", False):
            _keep_optimizer_under_offload(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        with deepspeed_routed():
            return super().train(*args, **kwargs)

    def _load_best_model(self) -> None:
        # The best checkpoint holds x: the optimizer must say so before its weights come in.
        if schedule_free_optimizer(self.optimizer) is not None:
            self.optimizer.eval()
        super()._load_best_model()


class ScheduleFreeTrainer(ScheduleFreeTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`ScheduleFreeTrainerMixin`."""
