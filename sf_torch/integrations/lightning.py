"""Schedule-Free in Lightning: ``ScheduleFreeCallback``.

Add the callback to the ``Trainer`` and return a schedule-free optimizer from
``configure_optimizers`` (``sf_torch``'s ``AdamWScheduleFree``, ``SGDScheduleFree``,
``RAdamScheduleFree``, or the ``schedulefree`` package's classes; Lightning itself refuses
``ScheduleFreeWrapper``, which is not a ``torch.optim.Optimizer``)::

    trainer = lightning.pytorch.Trainer(callbacks=[ScheduleFreeCallback()], ...)

What it guarantees:

- Training steps run at ``y``: the optimizer is switched to train mode before every training
  batch (so a run resumed from a checkpoint saved in eval mode never meets "Not in train mode!").
- Validation, test and predict (inside ``fit`` and on their own) run at ``x``; after ``fit``
  the model holds ``x``.
- Evaluating does not perturb training: ``y`` is kept (one copy of the weights while in eval
  mode) and put back bitwise when training resumes, instead of being recomputed from ``x`` and
  ``z`` (``y = b1 x + (1-b1) z`` is not exact in floating point).
- Every checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``) holds the weights at ``x``
  in ``state_dict``, what users load for inference, and the optimizer state in eval mode (``z``,
  ``v``, counters), i.e. the snapshot ``optimizer.eval()`` would give; the exact ``y`` goes
  under the extra key ``"schedule_free"``. ``trainer.fit(ckpt_path=...)`` puts that ``y`` back,
  so a resumed run continues bitwise on the uninterrupted run's trajectory.

Under Lightning's ``DeepSpeedStrategy`` (``strategy="deepspeed_stage_2"``, ...) the callback
builds the engine with :func:`sf_torch.deepspeed.initialize` (the optimizer from
``configure_optimizers`` must be an ``sf_torch`` one, or named in the DeepSpeed config's
``"optimizer"`` section) and switches with :func:`sf_torch.deepspeed.eval` / ``train``, which
reach the weights the model computes with. DeepSpeed writes its own checkpoint folder: the
callback switches to ``x`` before it is written, so under ZeRO 0-2 the module file
(``mp_rank_00_model_states.pt``, ``"module"``) holds ``x`` and the optimizer shards hold ``y``
(the fp32 masters), ``z`` and ``v``; ``engine.load_checkpoint`` restores that mode. ZeRO-3
writes no module weights, so the callback gathers ``x`` onto rank 0, one layer at a time
(DeepSpeed's ``_zero3_consolidated_16bit_state_dict``, collective), and stores it in rank 0's
``zero_pp_rank_0_mp_rank_00_model_states.pt`` under ``"schedule_free"`` -> ``"x"`` (the other
ranks store ``None``): one more copy of the model, in its dtype, in rank 0's CPU memory at the
save and in that file. Resuming never reads it (the weights come from the masters). With
separate fp32 masters (ZeRO 1-2, bf16/fp16, offload) the switches never move ``y``; under fp32
ZeRO-3 without offload, whose masters are the weights, ``x -> y`` rounds as
``optimizer.train()`` does. Lightning's DeepSpeed strategy itself requires CUDA.

Reading ``x`` back: :func:`load_x_state_dict` (any checkpoint the callback saved: a ``.ckpt``
file, a DeepSpeed folder of any stage, or a converted file) and
:func:`convert_zero_checkpoint_to_x` (one file with ``x`` as ``"state_dict"``, for
``LightningModule.load_from_checkpoint`` or ``DeepSpeedStrategy(load_full_weights=True)``).
DeepSpeed's ``zero_to_fp32`` and Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``
rebuild the fp32 masters, i.e. ``y``, under every stage (all measured in
tests/test_trainer_lightning.py).

Lightning 2.x (tested with 2.6.6). Import cost: Lightning, not DeepSpeed (imported only when the
strategy is a DeepSpeed one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy

CHECKPOINT_KEY = "schedule_free"


def _is_schedule_free(optimizer: Any) -> bool:
    """Has eval()/train() and a mode flag: the optimizer itself (wrappers) or its groups."""
    if not (
        callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    ):
        return False
    if isinstance(getattr(optimizer, "train_mode", None), bool):
        return True
    groups = getattr(optimizer, "param_groups", None) or []
    return bool(groups) and all("train_mode" in group for group in groups)


def _in_train_mode(optimizer: Any) -> bool:
    flag = getattr(optimizer, "train_mode", None)
    if isinstance(flag, bool):
        return flag
    return all(group["train_mode"] for group in optimizer.param_groups)


def _params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def _module_modes_kept(module: torch.nn.Module) -> Iterator[None]:
    """sf_torch.deepspeed.eval/train set the engine's train/eval flags; Lightning owns them."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Plain:
    """One schedule-free optimizer whose params are the model's weights (plain, DDP)."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.saved_y: list[torch.Tensor] | None = None  # y while in eval mode
        self.versions: list[int] | None = None  # the params' versions right after eval()

    def in_train(self) -> bool:
        return _in_train_mode(self.optimizer)

    @torch.no_grad()
    def to_x(self) -> None:
        if not self.in_train():
            return
        params = _params(self.optimizer)
        self.saved_y = [p.detach().clone() for p in params]
        self.optimizer.eval()
        self.versions = [p._version for p in params]

    def y_kept(self) -> list[torch.Tensor] | None:
        """The y kept at eval(), if no param was written since (else None)."""
        if self.saved_y is None or self.in_train():
            return None
        if [p._version for p in _params(self.optimizer)] != self.versions:
            return None  # the weights were changed since (loaded, edited): y is stale
        return self.saved_y

    @torch.no_grad()
    def to_y(self) -> None:
        if self.in_train():
            self.saved_y = None
            return
        kept = self.y_kept()
        self.optimizer.train()
        if kept is not None:
            for p, y in zip(_params(self.optimizer), kept):
                p.copy_(y)
        self.saved_y = self.versions = None

    @torch.no_grad()
    def set_y(self, ys: list[torch.Tensor | None]) -> None:
        """Train mode with the params at exactly ``ys`` (None: train()'s own y)."""
        self.optimizer.train()
        for p, y in zip(_params(self.optimizer), ys):
            if y is not None:
                p.copy_(y)
        self.saved_y = self.versions = None


class _DeepSpeed:
    """The client optimizer of an engine built by sf_torch.deepspeed.initialize."""

    def __init__(self, engine: Any):
        from sf_torch import deepspeed as sfds

        self.sfds = sfds
        self.engine = engine
        self.client = sfds.client_optimizer(engine)
        # Without separate masters (fp32, ZeRO 0) the client's params are the model's weights:
        # keep y as for the plain strategy; ZeRO's masters keep y by themselves.
        self.plain = _Plain(self.client) if engine.optimizer is self.client else None

    def in_train(self) -> bool:
        return _in_train_mode(self.client)

    @torch.no_grad()
    def to_x(self) -> None:
        if not self.in_train():
            return
        kept = [p.detach().clone() for p in _params(self.client)] if self.plain else None
        with _module_modes_kept(self.engine.module):
            self.sfds.eval(self.engine)
        if self.plain is not None:
            self.plain.saved_y = kept
            self.plain.versions = [p._version for p in _params(self.client)]

    @torch.no_grad()
    def to_y(self) -> None:
        if self.in_train():
            return
        kept = self.plain.y_kept() if self.plain else None
        with _module_modes_kept(self.engine.module):
            self.sfds.train(self.engine)
        if kept is not None:
            for p, y in zip(_params(self.client), kept):
                p.copy_(y)
        if self.plain is not None:
            self.plain.saved_y = self.plain.versions = None


def _deepspeed_setup(strategy: DeepSpeedStrategy) -> None:
    """Makes the strategy build its training engine with sf_torch.deepspeed.initialize."""
    if getattr(strategy, "_sf_setup", False):
        return
    strategy._sf_setup = True

    def setup_model_and_optimizer(model, optimizer, lr_scheduler=None):
        from sf_torch import deepspeed as sfds
        from sf_torch.optimizers import ScheduleFreeOptimizer

        named = (strategy.config or {}).get("optimizer", {}) or {}
        if not isinstance(optimizer, ScheduleFreeOptimizer) and (
            optimizer is not None or named.get("type") not in sfds.OPTIMIZERS
        ):
            kind = type(optimizer).__name__ if optimizer is not None else named.get("type")
            raise ValueError(
                "ScheduleFreeCallback under DeepSpeedStrategy: configure_optimizers must return "
                f"an sf_torch optimizer ({', '.join(sorted(sfds.OPTIMIZERS))}), or the DeepSpeed "
                f"config name one as its optimizer type; got {kind} (DeepSpeed steps copies of "
                "the weights, and only sf_torch.deepspeed makes eval() reach the model's own)"
            )
        index = strategy.root_device.index  # None on CPU (DS_ACCELERATOR=cpu): the local rank
        engine, ds_optimizer, _, _ = sfds.initialize(
            args=argparse.Namespace(device_rank=strategy.local_rank if index is None else index),
            config=strategy.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    strategy._setup_model_and_optimizer = setup_model_and_optimizer


class ScheduleFreeCallback(Callback):
    """Evaluation at ``x``, training at ``y``, checkpoints with ``x`` as their weights and the
    exact ``y`` to resume. See the module docstring for what is guaranteed and how.

    Args:
      strict: raise a ValueError when ``fit`` starts and no optimizer of the trainer is
        schedule-free (default True); False leaves such a run alone.
    """

    def __init__(self, strict: bool = True):
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be True or False, got {strict!r}")
        self.strict = strict
        self._views: list[_Plain | _DeepSpeed] = []
        self._pending_y: dict[str, torch.Tensor] | None = None

    # -- which optimizers ----------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            _deepspeed_setup(trainer.strategy)

    def _find(self, trainer: Trainer) -> list[_Plain | _DeepSpeed]:
        """The views of this fit's optimizers (kept after fit for validate/test/predict)."""
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            engine = strategy.model
            if getattr(engine, "_sf_client", None) is None:
                return self._views  # an inference engine (validate/test/predict): no optimizer
            if not (self._views and getattr(self._views[0], "engine", None) is engine):
                self._views = [_DeepSpeed(engine)]
            return self._views
        optimizers = [opt for opt in trainer.optimizers if _is_schedule_free(opt)]
        if [v.optimizer for v in self._views] != optimizers and optimizers:
            self._views = [_Plain(opt) for opt in optimizers]
        return self._views

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        views = self._find(trainer)
        if self.strict and not views and not isinstance(trainer.strategy, DeepSpeedStrategy):
            kinds = [type(opt).__name__ for opt in trainer.optimizers]
            raise ValueError(
                "ScheduleFreeCallback: none of the trainer's optimizers is schedule-free "
                f"(got {kinds}); return one (e.g. sf_torch.AdamWScheduleFree) from "
                "configure_optimizers, or ScheduleFreeCallback(strict=False)"
            )

    # -- modes ---------------------------------------------------------------------------------

    def _to_x(self, trainer: Trainer) -> None:
        for view in self._find(trainer):
            view.to_x()

    def _to_y(self, trainer: Trainer) -> None:
        for view in self._find(trainer):
            view.to_y()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending_y = self._pending_y, None
        views = self._find(trainer)
        if pending is not None and views and isinstance(views[0], _Plain):
            names = {id(p): name for name, p in pl_module.named_parameters()}
            for view in views:
                ys = [pending.get(names.get(id(p), "")) for p in _params(view.optimizer)]
                view.set_y(ys)
        self._to_y(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._to_y(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._to_x(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._to_x(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._to_x(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._to_x(trainer)

    # -- checkpoints ---------------------------------------------------------------------------

    @torch.no_grad()
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        views = self._find(trainer)
        if not views:
            return
        if isinstance(views[0], _DeepSpeed):
            # DeepSpeed writes the module's weights and its masters itself, after this hook.
            self._to_x(trainer)
            entry: dict[str, Any] = {"weights": "x", "y": None, "deepspeed": True}
            engine = views[0].engine
            if engine.zero_optimization_partition_weights():
                # ZeRO-3 writes no module weights: x, gathered one layer at a time onto rank 0
                # (collective; None on the other ranks), goes into rank 0's model-states file.
                exclude = bool(getattr(trainer.strategy, "exclude_frozen_parameters", False))
                entry["x"] = engine._zero3_consolidated_16bit_state_dict(
                    exclude_frozen_parameters=exclude
                )
            checkpoint[CHECKPOINT_KEY] = entry
            return
        keys: dict[int, list[str]] = {}
        for name, tensor in pl_module.state_dict(keep_vars=True).items():
            keys.setdefault(id(tensor), []).append(name)
        state_dict = checkpoint.get("state_dict")
        ys: dict[str, torch.Tensor] = {}
        for view in views:
            was_training = view.in_train()
            view.to_x()
            kept = view.y_kept()
            for index, p in enumerate(_params(view.optimizer)):
                names = keys.get(id(p), [])
                if state_dict is not None:
                    for name in names:
                        if name in state_dict:
                            state_dict[name] = p.detach().clone()
                if kept is not None and names:
                    ys[names[0]] = kept[index].clone()
            if was_training:
                view.to_y()
        for opt_state in checkpoint.get("optimizer_states", []):
            _mark_eval(opt_state)
        checkpoint[CHECKPOINT_KEY] = {"weights": "x", "y": ys or None}

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for view in self._views:
            if isinstance(view, _Plain):
                view.saved_y = view.versions = None
        entry = checkpoint.get(CHECKPOINT_KEY) or {}
        fitting = trainer.state.fn is not None and trainer.state.fn.value == "fit"
        self._pending_y = entry.get("y") if fitting else None


def _mark_eval(opt_state: Any) -> None:
    """The saved optimizer state as eval() leaves it (the weights saved beside it are x): the
    groups' ``train_mode`` (sf_torch and schedulefree classes), or ScheduleFreeWrapper's flag."""
    if not isinstance(opt_state, dict):
        return
    for group in opt_state.get("param_groups", []):
        if "train_mode" in group:
            group["train_mode"] = False
    inner = opt_state.get("schedule_free")
    if isinstance(inner, dict) and "train_mode" in inner:
        inner["train_mode"] = False


# -- reading x back ------------------------------------------------------------------------------

# DeepSpeed's own entries in a model-states file (what Lightning's converter drops, too)
_DEEPSPEED_KEYS = (
    "module",
    "optimizer",
    "lr_scheduler",
    "csr_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "dp_world_size",
    "mp_world_size",
)


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    """Lightning < 2.1 saved its wrapper's prefix; the LightningModule's names have none."""
    prefix = "_forward_module."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def _model_states_file(checkpoint: str, tag: str | None) -> str:
    """Rank 0's model-states file of a DeepSpeed checkpoint folder: in ``tag``'s folder, else
    the ``latest`` file's tag, else the folder itself or Lightning's tag ``"checkpoint"``."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    latest = os.path.join(checkpoint, "latest")
    if tag is None and os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
    folders = [os.path.join(checkpoint, tag)] if tag is not None else []
    folders += [checkpoint, os.path.join(checkpoint, "checkpoint")] if tag is None else []
    for folder in folders:
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise ValueError(
        f"checkpoint: no DeepSpeed model-states file ({' or '.join(names)}) in "
        f"{' or '.join(map(repr, folders))}; expected a Lightning checkpoint file or a "
        "DeepSpeed checkpoint folder"
    )


def _read_x(checkpoint: str | os.PathLike, tag: str | None) -> tuple[dict[str, Any], dict]:
    """(x, the saved dict x was read from)."""
    path = os.fspath(checkpoint)
    if tag is not None and not isinstance(tag, str):
        raise ValueError(f"tag must be a str or None, got {tag!r}")
    if not os.path.exists(path):
        raise ValueError(f"checkpoint: {path!r} does not exist")
    deepspeed_folder = os.path.isdir(path)
    if deepspeed_folder:
        path = _model_states_file(path, tag)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    entry = saved.get(CHECKPOINT_KEY) if isinstance(saved, dict) else None
    if not isinstance(entry, dict) or entry.get("weights") != "x":
        raise ValueError(
            f"checkpoint: {path!r} was not saved with ScheduleFreeCallback (no "
            f"{CHECKPOINT_KEY!r} entry), so nothing marks its weights as x"
        )
    if isinstance(entry.get("x"), dict):  # ZeRO-3, rank 0's file (or a file converted from it)
        return _strip(entry["x"]), saved
    zero3 = os.path.basename(path).startswith("zero_pp_rank_")  # its "module" holds no weights
    if deepspeed_folder and not zero3 and isinstance(saved.get("module"), dict):  # ZeRO 0-2
        return _strip(saved["module"]), saved
    if not deepspeed_folder and (not entry.get("deepspeed") or entry.get("state_dict") == "x"):
        # a plain-strategy checkpoint, or one written by convert_zero_checkpoint_to_x
        return dict(saved["state_dict"]), saved
    raise ValueError(
        f"checkpoint: {path!r} comes from a DeepSpeed checkpoint but holds no x: a file from "
        "Lightning's convert_zero_checkpoint_to_fp32_state_dict (or zero_to_fp32) holds the "
        "fp32 masters, i.e. y; pass the DeepSpeed checkpoint folder instead"
    )


def load_x_state_dict(
    checkpoint: str | os.PathLike, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The model's weights at ``x`` (the ones to evaluate and publish) from a checkpoint saved
    with :class:`ScheduleFreeCallback`, as a ``state_dict`` of the LightningModule (CPU).

    ``checkpoint`` is a Lightning ``.ckpt`` file (plain strategy: its ``state_dict``), a
    DeepSpeed checkpoint folder as Lightning's ``DeepSpeedStrategy`` writes it (ZeRO 0-2: the
    module file ``mp_rank_00_model_states.pt``; ZeRO-3: the gathered ``x`` the callback stores
    in rank 0's ``zero_pp_rank_0_mp_rank_00_model_states.pt`` under ``"schedule_free"``), or
    a file written by :func:`convert_zero_checkpoint_to_x`. ``tag``: the DeepSpeed tag folder
    (default: the ``latest`` file's, else Lightning's ``"checkpoint"``). Reads one file and
    needs no DeepSpeed. The tensors have the dtype the model computes in (bf16 for a bf16 run,
    where the fp32 ``x`` exists nowhere: the masters are ``y``). The file is read with
    ``torch.load(weights_only=False)``, as Lightning reads its checkpoints: trusted files only.

    DeepSpeed's ``zero_to_fp32`` and Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``
    give the fp32 masters instead, i.e. ``y``, under every ZeRO stage. ValueError for a
    checkpoint that holds no ``x`` (not saved with the callback, or such a converted file).
    """
    return _read_x(checkpoint, tag)[0]


def convert_zero_checkpoint_to_x(
    checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike, tag: str | None = None
) -> dict[str, Any]:
    """Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` with ``x`` as the weights: one
    file for ``torch.load`` / ``LightningModule.load_from_checkpoint`` /
    ``Trainer(strategy=DeepSpeedStrategy(load_full_weights=True))`` whose ``"state_dict"`` is
    :func:`load_x_state_dict`'s and whose other entries are Lightning's (``global_step``,
    callbacks, hyper-parameters, ...; DeepSpeed's own entries dropped, as Lightning's converter
    does). Reads rank 0's model-states file only (no optimizer shards, no DeepSpeed import).
    Returns the dict it wrote.

    Lightning's own converter writes the fp32 masters, ``y``, as ``"state_dict"`` under every
    ZeRO stage: use it only for the ``y`` to train on from.
    """
    state, saved = _read_x(checkpoint_dir, tag)
    out = {k: v for k, v in saved.items() if k not in _DEEPSPEED_KEYS}
    entry = dict(out[CHECKPOINT_KEY])
    entry.pop("x", None)  # now the state_dict itself
    entry["state_dict"] = "x"
    out[CHECKPOINT_KEY] = entry
    out["state_dict"] = state
    torch.save(out, output_file)
    return out
