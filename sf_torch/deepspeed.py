"""Schedule-Free under DeepSpeed: ZeRO stages 0-3, fp32/bf16/fp16, with and without CPU offload.

DeepSpeed hands a client optimizer copies of the weights: the fp32 masters it steps (flat,
padded partitions under ZeRO; per-param copies under bf16/fp16 without ZeRO), while the model
computes with low-precision (or, under ZeRO, separately stored) weights that DeepSpeed refreshes
from the masters inside its own ``step()``. So a plain ``optimizer.eval()`` changes nothing the
model sees. Here:

- :func:`initialize` is ``deepspeed.initialize`` that also accepts the schedule-free optimizers
  by name in the config (``"optimizer": {"type": "AdamWScheduleFree", "params": {...}}``) and
  sets what ZeRO needs for a client optimizer.
- :func:`eval` / :func:`train` (collective: every rank calls them) leave the weights the model
  computes with equal to ``x`` (resp. ``y``) on every rank. With separate masters they write
  ``x`` computed from the masters (which always hold ``y``) into the model's weights through
  DeepSpeed's own refresh path (copy + all-gather), so masters, ``z`` and ``v`` never move and
  switching back is exact. Without separate masters (fp32, no ZeRO) the params themselves
  switch, as with the plain optimizer.
- The counters ``k``, ``weight_sum`` and ``lr_max`` advance once per ``engine.step()`` that
  steps: DeepSpeed calls the client's ``step()`` once per param group (ZeRO-1/2) or per
  sub-group (ZeRO-3); each group is counted on its first call within one engine step, and a
  step that DeepSpeed skips (fp16 overflow) counts nothing. Calls DeepSpeed makes outside an
  engine step (to create optimizer state) create ``z``/``v`` and move nothing.
- ``engine.load_checkpoint`` re-writes the model's weights for the mode the checkpoint was saved
  in, so a run resumes on its exact trajectory whichever mode it was saved in.
- :func:`client_optimizer` gives the sf_torch optimizer behind an engine (its param groups hold
  the counters and the mode).
- Local steps (ZeRO stage 0, fp32 and bf16): a ``"local_steps"`` section in the config makes
  every rank step on its own gradients and the ranks average (params or fp32 masters, and
  ``z``) after the sync steps of an ``sf_schedules.sync`` rule; each rank's state goes into its
  own checkpoint file. See the section "local steps" at the end of this file;
  :func:`sync_now` and :func:`local_state`.
"""

from __future__ import annotations

import copy
import json
import os
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from sf_schedules import sync as sync_rules
from sf_schedules import validation

from . import local as local_steps
from . import rule
from .optimizers import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    ScheduleFreeOptimizer,
    SGDScheduleFree,
)

OPTIMIZERS = {
    "AdamWScheduleFree": AdamWScheduleFree,
    "SGDScheduleFree": SGDScheduleFree,
    "RAdamScheduleFree": RAdamScheduleFree,
}

_SCOPE = "_sf_engine_step"  # attribute on the client: the id of the engine step under way


def _read_config(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def _build_optimizer(opt_config: dict, params: Iterable) -> ScheduleFreeOptimizer:
    kind = opt_config["type"]
    kwargs = dict(opt_config.get("params", {}))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return OPTIMIZERS[kind](params, **kwargs)
    except TypeError as err:
        raise ValueError(f'optimizer.params of "{kind}" in the DeepSpeed config: {err}') from err


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    config: Any = None,
    *,
    local_steps_lrs: Sequence[float] | Callable[[int], float] | None = None,
    **kwargs: Any,
):
    """``deepspeed.initialize`` for schedule-free optimizers; returns what it returns.

    The optimizer is either passed (an ``sf_torch`` schedule-free optimizer) or named in the
    config's ``"optimizer"`` section (types ``AdamWScheduleFree``, ``SGDScheduleFree``,
    ``RAdamScheduleFree`` with their constructor arguments as ``"params"``). The config may be
    a dict or a JSON path, as for DeepSpeed (``args.deepspeed_config`` too). Sets
    ``zero_allow_untested_optimizer`` under ZeRO and ``zero_force_ds_cpu_optimizer: false``
    with optimizer offload, unless the config sets them. Note DeepSpeed's default
    ``gradient_clipping`` is 1.0.

    Local steps: a ``"local_steps"`` section in the config (see the section "local steps"
    below: rule, constants, ``total_steps``) makes every rank step on its own gradients and
    average at the rule's sync steps; ZeRO stage 0 only. ``local_steps_lrs``: the learning
    rate of every step (a list, or ``lr(t)``) for the rules that read them, needed where a
    scheduler sets the learning rates; by default they are the optimizer's (first param
    group's ``lr`` with its warmup, or RAdam's rectification).
    """
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    cfg = _read_config(config)
    local_section = cfg.pop("local_steps", None)
    if local_section is not None:
        _check_local_stage(cfg)
    opt_config = cfg.get("optimizer")
    if opt_config and opt_config.get("type") in OPTIMIZERS:
        if optimizer is not None:
            raise ValueError(
                "optimizer: pass an optimizer or name one in the config's optimizer section, "
                f'not both (the config names "{opt_config["type"]}")'
            )
        if model is None and model_parameters is None:
            raise ValueError("model or model_parameters is needed to build the optimizer")
        params = model_parameters if model_parameters is not None else model.parameters()
        optimizer = _build_optimizer(opt_config, params)
        del cfg["optimizer"]
    named = opt_config.get("type") if opt_config else None
    if "AdamCScheduleFreePlus" in (type(optimizer).__name__, named):
        raise ValueError(
            "optimizer: AdamCScheduleFreePlus is not supported under sf_torch.deepspeed: its "
            "Polyak step size needs the loss at every step, and DeepSpeed's engine.step() "
            "passes none (use it with FSDP2 or DDP, which step the optimizer directly)"
        )
    if hasattr(optimizer, "_hold_x"):  # sf_torch.closure's classes
        raise ValueError(
            f"optimizer: {type(optimizer).__name__} (params at x between steps, the step runs "
            "the closure) is not supported under sf_torch.deepspeed, whose engine.step() "
            "takes no closure: use the class without Closure, with sf_torch.deepspeed.eval / "
            "train"
        )
    if not isinstance(optimizer, ScheduleFreeOptimizer):
        raise ValueError(
            "optimizer must be an sf_torch schedule-free optimizer, or the config's optimizer "
            f"type one of {sorted(OPTIMIZERS)}; got {type(optimizer).__name__}"
        )
    zero = cfg.get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    offload = zero.get("offload_optimizer", {}) or {}
    if offload.get("device", "none") not in (None, "none"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)

    local = None
    if local_section is not None:
        scheduled = "scheduler" in cfg or kwargs.get("lr_scheduler") is not None
        local = _LocalSteps.from_config(local_section, optimizer, local_steps_lrs, scheduled)
    elif local_steps_lrs is not None:
        raise ValueError("local_steps_lrs: the config has no local_steps section")

    import deepspeed

    _own_steps(optimizer)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        config=cfg,
        **kwargs,
    )
    _attach(engine, optimizer)
    if local is not None:
        _attach_local(engine, optimizer, local)
    return engine, ds_optimizer, loader, scheduler


# -- steps -------------------------------------------------------------------------------------


def _own_steps(client: ScheduleFreeOptimizer) -> None:
    """Makes the client's ``step()`` count each group once per engine step (see module doc)."""
    if getattr(client, "_sf_deepspeed", False):
        raise ValueError("this optimizer is already attached to a DeepSpeed engine")
    client._sf_deepspeed = True
    setattr(client, _SCOPE, None)
    client._sf_counted = set()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            raise ValueError("closure: DeepSpeed's engine.step() takes no closure")
        if getattr(self, _SCOPE) is None:  # DeepSpeed materializing optimizer state
            _create_state(self, _group_params(self, with_grad=True))
            return None
        plan = self.plan_update()  # every check before anything is counted or moved
        for group in self.param_groups:
            if id(group) not in self._sf_counted:
                group.update(rule.advance(group, self._rule_kind))
                self._sf_counted.add(id(group))
        self.apply_planned(plan)
        return None

    client.step = types.MethodType(step, client)
    message = (
        "under DeepSpeed the model's weights are not this optimizer's params: use "
        "sf_torch.deepspeed.{}(engine) on every rank"
    )

    def refuse(name):
        def method(self):
            raise RuntimeError(message.format(name))

        return method

    client._sf_plain_eval, client._sf_plain_train = client.eval, client.train
    client.eval = types.MethodType(refuse("eval"), client)
    client.train = types.MethodType(refuse("train"), client)


def _create_state(client: ScheduleFreeOptimizer, tensors: Iterable[tuple[torch.Tensor, dict]]):
    """Creates z (and v) as the first step would, moving nothing."""
    for p, group in tensors:
        client.init_state(p, group)


def _group_params(client: ScheduleFreeOptimizer, with_grad: bool = False):
    return [
        (p, group)
        for group in client.param_groups
        for p in group["params"]
        if p.grad is not None or not with_grad
    ]


def _attach(engine: Any, client: ScheduleFreeOptimizer) -> None:
    wrapper = engine.optimizer
    inner_step = wrapper.step
    counter = [0]

    def engine_step(*args: Any, **kwargs: Any) -> Any:
        if not all(group["train_mode"] for group in client.param_groups):
            raise RuntimeError(
                "engine.step() in eval mode: call sf_torch.deepspeed.train(engine) on every "
                "rank before training steps"
            )
        counter[0] += 1
        setattr(client, _SCOPE, counter[0])
        client._sf_counted = set()
        k = float(client.param_groups[0]["k"]) if client.param_groups else None
        try:
            result = inner_step(*args, **kwargs)
        finally:
            setattr(client, _SCOPE, None)
        local = getattr(engine, "_sf_local", None)
        if local is not None and k is not None and float(client.param_groups[0]["k"]) != k:
            local.after_step(engine)  # a step taken (not one DeepSpeed skipped)
        return result

    wrapper.step = engine_step
    engine._sf_client = client
    # State for every master now, not at its group's first step: DeepSpeed links each param to
    # its optimizer state once, after the first group's first step (ZeRO-1/2), so a later
    # group's state would be missing from its accessors and its universal checkpoints.
    if wrapper is client:
        _create_state(client, _group_params(client))
    else:
        _create_state(client, _masters(engine)[0])

    load = engine.load_checkpoint

    def load_checkpoint(load_dir: str, tag: str | None = None, **kwargs: Any):
        local = getattr(engine, "_sf_local", None)
        if local is not None:
            tag = local.tag_to_load(load_dir, tag)
            saved = local.read(engine, load_dir, tag)  # checked before anything is loaded
        result = load(load_dir, tag, **kwargs)
        if engine.load_universal_checkpoint() and hasattr(wrapper, "fp32_partitioned_groups_flat"):
            _after_universal_load(engine, load_dir, tag)
        if local is not None:
            local.restore(engine, saved)
        # The checkpoint restored the masters (y, or x where they are the weights) and the
        # mode; the model's own weights must show that mode's view.
        if not _in_place(engine):
            _switch(engine, "y" if _mode(client) else "x")
        return result

    engine.load_checkpoint = load_checkpoint


# -- views -------------------------------------------------------------------------------------


def client_optimizer(engine: Any) -> ScheduleFreeOptimizer:
    """The sf_torch optimizer that :func:`initialize` handed to DeepSpeed (``engine.optimizer``
    is DeepSpeed's wrapper around it under ZeRO and bf16/fp16): its ``param_groups`` hold the
    counters and the mode, its ``state`` the masters' ``z`` and ``v``. ValueError for an engine
    that :func:`initialize` did not set up."""
    client = getattr(engine, "_sf_client", None)
    if client is None:
        raise ValueError(
            "engine: not set up by sf_torch.deepspeed.initialize (its optimizer has no "
            "schedule-free view switching)"
        )
    return client


def _mode(client: ScheduleFreeOptimizer) -> bool:
    return all(group["train_mode"] for group in client.param_groups)


def _in_place(engine: Any) -> bool:
    """True when the model computes with the client's params themselves: fp32 without ZeRO,
    and fp32 ZeRO-3 without offload (whose masters alias the model's partitions)."""
    if engine.optimizer is client_optimizer(engine):
        return True
    return _masters(engine)[2]


def _masters(engine: Any) -> tuple[list[tuple[torch.Tensor, dict]], Callable[[], None], bool]:
    """The fp32 masters with their client param group, DeepSpeed's routine that refreshes the
    model's weights from them, and whether the masters are the model's weights themselves."""
    wrapper, client = engine.optimizer, client_optimizer(engine)
    groups = client.param_groups
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3
        flats = wrapper.fp32_partitioned_groups_flat
        masters = [(flat, groups[wrapper.sub_group_to_group_id[i]]) for i, flat in enumerate(flats)]
        lp = wrapper.fp16_partitioned_groups_flat
        aliased = any(a is not None and a.data_ptr() == b.data_ptr() for a, b in zip(lp, flats))

        def refresh():
            # Release every gathered copy first: small ("persistent") parameters stay gathered
            # between steps, and all_gather skips a parameter that is still available.
            wrapper._partition_all_parameters()
            for i in range(len(flats)):
                wrapper._reassign_or_swap_out_partitioned_parameters(i)
            if wrapper.persistent_parameters:
                wrapper.persistent_parameters[0].all_gather(wrapper.persistent_parameters)
            wrapper.invalidate_secondary_tensor()

        return masters, refresh, aliased
    if hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flats = wrapper.single_partition_of_fp32_groups
        return [(f, groups[i]) for i, f in enumerate(flats)], wrapper.update_lp_params, False
    if hasattr(wrapper, "fp32_groups_flat_partition"):  # BF16_Optimizer
        flats = wrapper.fp32_groups_flat_partition
        return [(f, groups[i]) for i, f in enumerate(flats)], wrapper.update_lp_params, False
    if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):  # fp16/bf16, no ZeRO
        pairs = [
            (master, lp, groups[i])
            for i, (fp32, lp16) in enumerate(zip(wrapper.fp32_groups, wrapper.fp16_groups))
            for master, lp in zip(fp32, lp16)
        ]

        def refresh():
            for master, lp, _ in pairs:
                lp.data.copy_(master.data)

        return [(master, group) for master, _, group in pairs], refresh, False
    raise TypeError(
        f"sf_torch.deepspeed does not know DeepSpeed's {type(wrapper).__name__} optimizer "
        "wrapper: supported are ZeRO-1/2/3, BF16_Optimizer and the fp16/bf16 wrappers without ZeRO"
    )


@torch.no_grad()
def _switch(engine: Any, view: str) -> None:
    """Makes the model compute with ``view`` ("x" or "y"); the callers keep the mode flags."""
    client = client_optimizer(engine)
    if engine.optimizer is client:
        (client._sf_plain_eval if view == "x" else client._sf_plain_train)()
        return
    masters, refresh, aliased = _masters(engine)
    swapped = []
    for master, group in masters:
        state = client.state.get(master)
        if not (state and "z" in state):
            continue
        z, b1 = state["z"].to(master.device), rule.b1_of(group, client.kind)
        if aliased:  # the masters are the weights: switch them, as the plain optimizer does
            (rule.to_x_ if view == "x" else rule.to_y_)(master, z, b1)
        elif view == "x":  # masters keep y; the weights get x through DeepSpeed's own path
            swapped.append((master, master.data))
            master.data = rule.x_of(master, z, b1)
    try:
        refresh()
    finally:
        for master, data in swapped:
            master.data = data


def eval(engine: Any) -> None:  # noqa: A001  (the name users know from optimizer.eval())
    """Module in eval mode and its weights at ``x`` on every rank. Collective; idempotent."""
    client = client_optimizer(engine)
    engine.eval()
    if _mode(client):
        _switch(engine, "x")
        for group in client.param_groups:
            group["train_mode"] = False


def train(engine: Any) -> None:
    """Module in train mode and its weights at ``y`` on every rank. Collective; idempotent."""
    client = client_optimizer(engine)
    engine.train()
    if not _mode(client):
        _switch(engine, "y")
        for group in client.param_groups:
            group["train_mode"] = True


# -- universal checkpoints ---------------------------------------------------------------------


def _stage_for_converter(optim_file: str) -> tuple[bool, bool]:
    """Rewrites one ZeRO optimizer shard in the Adam layout DeepSpeed's converter reads: ``z``
    as ``exp_avg``, a zero ``exp_avg_sq`` for SGD, and (ZeRO-3) a per-tensor ``step``.
    Returns (is ZeRO-3, held SGD state)."""
    sd = torch.load(optim_file, map_location="cpu", weights_only=False)
    outer = sd["optimizer_state_dict"]
    zero3 = "base_optimizer_state" not in outer
    inner = outer["optimizer_state_dict"] if zero3 else outer["base_optimizer_state"]
    sgd = False
    for state in inner["state"].values():
        if "z" in state and "exp_avg" in state:
            raise ValueError(
                "to_universal: this checkpoint holds AdamWScheduleFree's inner-momentum buffer "
                "(exp_avg, inner_momentum != 0) besides z and v, and DeepSpeed's converter "
                "carries two state tensors per param (exp_avg, exp_avg_sq); convert runs "
                "with inner_momentum=0 only, or resume this one from its ZeRO checkpoint"
            )
        if "z" in state:
            state["exp_avg"] = state.pop("z")
        if "exp_avg_sq" not in state and "exp_avg" in state:
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            sgd = True
        if zero3:
            state.setdefault("step", torch.tensor(float(inner["param_groups"][0]["k"])))
    torch.save(sd, optim_file)
    return zero3, sgd


def to_universal(input_folder: str, output_folder: str, *, workers: int = 1) -> None:
    """Converts a checkpoint of an sf_torch.deepspeed engine to DeepSpeed's universal format.

    DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) only carries the Adam
    state keys ``exp_avg``/``exp_avg_sq`` and would drop ``z``; this runs it on a copy whose
    ``z`` is named ``exp_avg`` (and, for SGD, a placeholder ``exp_avg_sq``), then renames the
    per-parameter files back. Load the result with ``"checkpoint": {"load_universal": true}``
    on any number of ranks: the counters and the mode come back with the param groups.

    Args:
      input_folder: the tag folder written by ``engine.save_checkpoint`` (e.g. ``ckpt/step10``).
      output_folder: the universal checkpoint's tag folder to create.
      workers: processes for the converter's extract and merge phases.
    """
    import argparse
    import glob
    import os
    import shutil
    import tempfile

    from deepspeed.checkpoint import ds_to_universal

    if not os.path.isdir(input_folder):
        raise ValueError(f"input_folder must be a checkpoint tag folder, got {input_folder!r}")
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, os.path.basename(os.path.normpath(input_folder)))
        shutil.copytree(input_folder, staged)
        optim_files = glob.glob(os.path.join(staged, "*optim_states.pt"))
        if not optim_files:
            raise ValueError(f"input_folder has no ZeRO optimizer shards: {input_folder!r}")
        staged_as = [_stage_for_converter(f) for f in optim_files]
        zero3, sgd = staged_as[0][0], any(held_sgd for _, held_sgd in staged_as)
        args = argparse.Namespace(
            input_folder=staged,
            output_folder=output_folder,
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        ds_to_universal.main(args)
    if zero3:
        return  # DeepSpeed's ZeRO-3 loader reads exactly exp_avg/exp_avg_sq: see _after_load
    for path in glob.glob(os.path.join(output_folder, "zero", "*", "exp_avg.pt")):
        os.replace(path, os.path.join(os.path.dirname(path), "z.pt"))
        v_path = os.path.join(os.path.dirname(path), "exp_avg_sq.pt")
        if sgd and os.path.exists(v_path):
            os.remove(v_path)


def _after_universal_load(engine: Any, load_dir: str, tag: str | None) -> None:
    """Undoes what DeepSpeed's ZeRO-3 universal loader imposes: Adam's state names (z arrives
    as ``exp_avg``, plus a ``step``) and the first param group's values in every group."""
    import os

    client = client_optimizer(engine)
    if tag is None:
        with open(os.path.join(load_dir, "latest_universal")) as f:
            tag = f.read().strip()
    for master, _ in _masters(engine)[0]:
        state = client.state[master]
        if "exp_avg" in state:
            state["z"] = state.pop("exp_avg")
        state.pop("step", None)
        if client.kind == "sgd":
            state.pop("exp_avg_sq", None)
    saved = torch.load(
        os.path.join(load_dir, tag, "zero", "optimizer_state.pt"), weights_only=False
    )["param_groups"]
    for group, saved_group in zip(client.param_groups, saved):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


# -- local steps -------------------------------------------------------------------------------
#
# A "local_steps" section in the DeepSpeed config: every rank steps on its own gradients and the
# ranks average after the sync steps of a rule of sf_schedules.sync, as sf_torch.local.LocalSteps
# does around a plain optimizer (its module docstring says what is averaged, why that averages
# x exactly, and how the mean rounds):
#
#     "local_steps": {"rule": "qsr", "h_base": 4, "alpha": 0.01, "power": 2, "h_warm": 1,
#                     "warmup_steps": 0, "total_steps": 10000}
#     "local_steps": {"total_steps": 10000}      # the default rule, below
#
# - Without "rule": the default measured by bench.local (sf_schedules.sync.schedule_free_default),
#   "schedule_free_qsr" with h_base 4, alpha = lr / 2 (the optimizer's lr) and warmup_steps the
#   optimizer's; any of that rule's keys given in the section override these. A named rule needs
#   its constants.
# - Rules and their keys: "constant" (period), "qsr" (h_base, alpha, power, h_warm,
#   warmup_steps, h_max), "inverse_lr" (qsr's without power), "schedule_free_qsr" (qsr's; b1, r
#   and weight_lr_power are the optimizer's), "averaging_window" (fraction, h_base, h_max,
#   warmup_steps, h_warm; r and weight_lr_power the optimizer's). Every section also has
#   "total_steps" (the run's optimizer steps; required) and "average_second_moment" (false: v
#   stays per rank).
# - ZeRO stage 0 only (stages 1-3 partition the optimizer state across the ranks, which then
#   hold no model of their own to step): a ValueError names the stage.
# - Between syncs nothing is all-reduced: the engine's gradient all-reduce is switched off for
#   good (engine.enable_backward_allreduce = False, DeepSpeed's own switch for optimizers that
#   communicate themselves; with it off, DeepSpeed's bf16/fp16 wrapper all-reduces its overflow
#   flag over the world, so every rank skips the same steps). A step counts when the client
#   optimizer took it (its k advanced).
# - At a sync step the client's params (fp32: the model's weights; bf16: DeepSpeed's fp32
#   masters) and z (and v if asked) are averaged, one flat all-reduce per (device, dtype), and
#   under bf16 the model's bf16 weights are written again from the averaged masters, so every
#   rank ends with the same masters and the same bf16 weights. eval(engine) after a sync gives
#   the averaged x; mid-round each rank's own (sync_now(engine) first).
# - Checkpoints: DeepSpeed's ZeRO-0 files hold rank 0's model and optimizer only; with local
#   steps every rank also writes "sf_local_rank{r}.pt" into the tag folder (its module weights,
#   the client's state dict, bf16 masters, and the local-steps state), and load_checkpoint reads
#   it back on every rank after DeepSpeed's own load (whatever load_checkpoint's options): every
#   rank resumes bitwise. The section, the world size and the averaged names must match.
# - The learning rates a rule reads are the optimizer's own (first param group: lr with its
#   warmup, or RAdam's rectification) unless initialize(..., local_steps_lrs=) gives them; with a
#   scheduler (config or lr_scheduler=) they must be given, as the schedule is computed up front.
# - BatchNorm at the averaged x: sf_torch.local.recompute_batchnorm_stats(engine.module,
#   batches, group=engine.data_parallel_group) after eval(engine).

_LOCAL_RULES: dict[str, tuple[type, tuple[str, ...]]] = {
    "constant": (sync_rules.Constant, ("period",)),
    "qsr": (sync_rules.QSR, ("h_base", "alpha", "power", "h_warm", "warmup_steps", "h_max")),
    "inverse_lr": (sync_rules.QSR, ("h_base", "alpha", "h_warm", "warmup_steps", "h_max")),
    "schedule_free_qsr": (
        sync_rules.ScheduleFreeQSR,
        ("h_base", "alpha", "power", "h_warm", "warmup_steps", "h_max"),
    ),
    "averaging_window": (
        sync_rules.AveragingWindow,
        ("fraction", "h_base", "h_max", "warmup_steps", "h_warm"),
    ),
}
_LOCAL_COMMON = ("rule", "total_steps", "average_second_moment")
_RANK_FILE = "sf_local_rank{}.pt"


def _check_local_stage(cfg: dict) -> None:
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (0, False, None):
        raise ValueError(
            f"local_steps: zero_optimization.stage must be 0 with local steps, got stage {stage} "
            "(ZeRO stages 1-3 partition the optimizer state across the ranks, so no rank holds "
            "a model of its own to step between syncs)"
        )


class _LocalSteps:
    """The local-steps state of an engine: the sync steps, the steps taken, what is averaged."""

    def __init__(self, sync_steps: tuple[int, ...], record: dict, average: tuple[str, ...]):
        self.sync_steps = sync_steps
        self.sync_set = frozenset(sync_steps)
        self.rule = record
        self.average = average
        self.steps_taken = 0
        self.syncs = 0
        self.group = None
        self.world_size = 1

    @classmethod
    def from_config(
        cls, section: Any, client: ScheduleFreeOptimizer, lrs: Any, scheduled: bool
    ) -> _LocalSteps:
        if not isinstance(section, dict):
            raise ValueError(
                f"local_steps must be a JSON object (rule, its constants, total_steps), got "
                f"{type(section).__name__}"
            )
        name = section.get("rule", "schedule_free_qsr")
        if name not in _LOCAL_RULES:
            raise ValueError(f"local_steps.rule must be in {tuple(_LOCAL_RULES)}, got {name!r}")
        kind, keys = _LOCAL_RULES[name]
        for key in section:
            if key not in keys and key not in _LOCAL_COMMON:
                raise ValueError(
                    f"local_steps.{key}: not a key of rule {name!r} (its keys: "
                    f"{', '.join(keys + _LOCAL_COMMON[1:])})"
                )
        if "total_steps" not in section:
            raise ValueError(
                "local_steps.total_steps is required (the run's optimizer steps, in "
                "{1, 2, 3, ...}): the sync schedule is computed for the whole run up front"
            )
        total = validation.check_count("local_steps.total_steps", section["total_steps"], 1)
        average_v = section.get("average_second_moment", False)
        validation.check_choice("local_steps.average_second_moment", average_v, (True, False))
        if average_v and client.kind == "sgd":
            raise ValueError(
                "local_steps.average_second_moment: SGDScheduleFree has no second moment, "
                "must be in (false,), got true"
            )
        kwargs = {key: section[key] for key in keys if key in section}
        group = client.param_groups[0]
        if "rule" not in section:
            # the measured default (sf_schedules.sync.schedule_free_default): ScheduleFreeQSR
            # with alpha = lr / 2, h_base 4 and the optimizer's warmup; given keys override it
            kwargs.setdefault("h_base", 4)
            kwargs.setdefault("alpha", 0.5 * group["lr"])
            kwargs.setdefault("warmup_steps", group.get("warmup_steps", 0))
        if name == "inverse_lr":
            kwargs["power"] = 1.0
        if name == "schedule_free_qsr":
            kwargs["b1"] = rule.b1_of(group, client.kind)
        if name in ("schedule_free_qsr", "averaging_window"):
            kwargs.update(r=group["r"], weight_lr_power=group["weight_lr_power"])
        try:
            sync_rule = kind(**kwargs)
        except TypeError as err:  # a required constant missing
            raise ValueError(f"local_steps (rule {name!r}): {err}") from None
        except ValueError as err:
            raise ValueError(f"local_steps.{err}") from None
        if lrs is None:
            if scheduled and name != "constant":
                raise ValueError(
                    f"local_steps: rule {name!r} reads the learning rate of every step, and a "
                    "scheduler sets them: pass initialize(..., local_steps_lrs=) the list of "
                    "learning rates or a function lr(step)"
                )
            lrs = [rule._lr_of_step(group, client.kind, t) for t in range(total)]
        steps = sync_rules.sync_steps(sync_rule, lrs, total)
        record = {"type": type(sync_rule).__name__, "config": dict(section)}
        average = ("z", "exp_avg_sq") if average_v else ("z",)
        return cls(steps, record, average)

    # -- steps --------------------------------------------------------------------------------

    def check_next(self) -> None:
        if self.steps_taken + 1 > self.sync_steps[-1]:
            raise RuntimeError(
                f"engine.step(): step {self.steps_taken + 1} is past the end of the local-steps "
                f"schedule ({self.sync_steps[-1]} steps, local_steps.total_steps): set a longer "
                "total_steps"
            )

    def after_step(self, engine: Any) -> None:
        self.steps_taken += 1
        if self.steps_taken in self.sync_set:
            self.average_now(engine)

    @torch.no_grad()
    def average_now(self, engine: Any) -> None:
        client = client_optimizer(engine)
        local_steps.average_(local_steps._state_tensors(client, self.average), self.group)
        self.syncs += 1
        if not _in_place(engine):  # bf16: the model's weights again from the averaged masters
            _switch(engine, "y" if _mode(client) else "x")

    # -- checkpoints --------------------------------------------------------------------------

    def record(self) -> dict:
        return {
            "steps_taken": self.steps_taken,
            "syncs": self.syncs,
            "sync_steps": list(self.sync_steps),
            "rule": copy.deepcopy(self.rule),
            "world_size": self.world_size,
            "rank": torch.distributed.get_rank(),
            "average": list(self.average),
        }

    def write(self, engine: Any, save_dir: str, tag: str) -> None:
        client = client_optimizer(engine)
        masters = None
        if engine.optimizer is not client:
            masters = [master.detach().cpu().clone() for master, _ in _masters(engine)[0]]
        folder = os.path.join(save_dir, str(tag))
        os.makedirs(folder, exist_ok=True)
        state = {
            "module": engine.module.state_dict(),
            "optimizer": client.state_dict(),
            "masters": masters,
            "local_steps": self.record(),
        }
        torch.save(state, os.path.join(folder, _RANK_FILE.format(torch.distributed.get_rank())))

    @staticmethod
    def tag_to_load(load_dir: str, tag: str | None) -> str:
        if tag is not None:
            return str(tag)
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"load_dir has no 'latest' file to name the tag: {load_dir!r}")
        with open(latest) as f:
            return f.read().strip()

    def read(self, engine: Any, load_dir: str, tag: str) -> dict:
        rank = torch.distributed.get_rank()
        path = os.path.join(load_dir, tag, _RANK_FILE.format(rank))
        if not os.path.isfile(path):
            raise ValueError(
                f"load_checkpoint: {path!r} is missing: the checkpoint was not saved with local "
                "steps on this rank (each rank's state is in its own file)"
            )
        saved = torch.load(path, map_location="cpu")  # weights_only: plain tensors and numbers
        entry = saved["local_steps"]
        if entry["world_size"] != self.world_size:
            raise ValueError(
                f"load_checkpoint: saved on a world size of {entry['world_size']}, and this run "
                f"has {self.world_size} ranks (local-step state is per rank)"
            )
        if tuple(entry["sync_steps"]) != self.sync_steps or tuple(entry["average"]) != (
            self.average
        ):
            raise ValueError(
                "load_checkpoint: the checkpoint's local_steps schedule or averaged state "
                f"({entry['rule']}, average {entry['average']}) is not this engine's "
                f"({self.rule}, average {list(self.average)})"
            )
        return saved

    @torch.no_grad()
    def restore(self, engine: Any, saved: dict) -> None:
        client = client_optimizer(engine)
        engine.module.load_state_dict(saved["module"])
        client.load_state_dict(saved["optimizer"])
        if saved["masters"] is not None:
            for (master, _), value in zip(_masters(engine)[0], saved["masters"]):
                master.copy_(value)
        entry = saved["local_steps"]
        self.steps_taken, self.syncs = int(entry["steps_taken"]), int(entry["syncs"])


def _attach_local(engine: Any, client: ScheduleFreeOptimizer, local: _LocalSteps) -> None:
    if engine.optimizer is not client and not hasattr(engine.optimizer, "fp32_groups"):
        raise ValueError(
            "local_steps: DeepSpeed chose its "
            f"{type(engine.optimizer).__name__} wrapper, whose fp32 masters are partitioned "
            "across the ranks; local steps need whole per-rank masters (fp32, or bf16 without "
            "ZeRO and without pipeline parallelism)"
        )
    engine.enable_backward_allreduce = False  # no gradient all-reduce: each rank its own
    local.group = engine.data_parallel_group
    local.world_size = torch.distributed.get_world_size(local.group)
    engine._sf_local = local

    plain_step = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if engine.is_gradient_accumulation_boundary():
            local.check_next()  # before DeepSpeed does anything
        return plain_step(*args, **kwargs)

    engine.step = step

    save = engine.save_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any):
        if tag is None:
            tag = f"global_step{engine.global_steps}"  # DeepSpeed's own default
        result = save(save_dir, tag, *args, **kwargs)
        local.write(engine, save_dir, str(tag))
        torch.distributed.barrier()
        return result

    engine.save_checkpoint = save_checkpoint


def local_state(engine: Any) -> dict:
    """The engine's local-steps state (steps taken, syncs done, the sync steps, the rule, the
    world size, this rank, what is averaged). ValueError where the config has no local_steps."""
    local = getattr(engine, "_sf_local", None)
    if local is None:
        raise ValueError("engine: its DeepSpeed config has no local_steps section")
    return local.record()


def sync_now(engine: Any) -> None:
    """Average the ranks' models now (params or masters, z, and v if configured), whatever the
    step count, e.g. before evaluating mid-round or saving a final model. Collective."""
    local = getattr(engine, "_sf_local", None)
    if local is None:
        raise ValueError("engine: its DeepSpeed config has no local_steps section")
    local.average_now(engine)
