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
"""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

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
    """
    import deepspeed

    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    cfg = _read_config(config)
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
                group.update(rule.advance(group, self.kind))
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
        try:
            return inner_step(*args, **kwargs)
        finally:
            setattr(client, _SCOPE, None)

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
        result = load(load_dir, tag, **kwargs)
        if engine.load_universal_checkpoint() and hasattr(wrapper, "fp32_partitioned_groups_flat"):
            _after_universal_load(engine, load_dir, tag)
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
