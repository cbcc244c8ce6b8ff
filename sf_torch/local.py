"""Local steps: each data-parallel worker steps on its own data; the workers average now and then.

:class:`LocalSteps` wraps any torch optimizer. Every rank takes optimizer steps on its own
gradients (nothing is all-reduced per step), and after the steps named by a sync schedule the
ranks average their models: one flat all-reduce per (device, dtype) of the params and, for a
Schedule-Free optimizer, of its base sequence ``z``.

The schedule is a tuple of 1-based step counts after which to average, the last being the run's
length: ``sf_schedules.sync.sync_steps(rule, lrs)`` computes it on the host in float64 from the
learning rates of the run, so sf_torch and sf_optax sync on the same steps.

Why averaging ``y`` (the params while training) and ``z`` averages ``x`` exactly: every rank
maps its pair to its average by the same linear map, ``x = (y - (1 - b1) z) / b1`` with the same
``b1`` everywhere, so the mean of the ranks' ``x`` is ``(mean(y) - (1 - b1) mean(z)) / b1``,
the ``x`` of the averaged pair (up to the rounding of the map itself). Averaging ``x`` and ``z``
(in eval mode) is exact for the same reason. The counters ``k``, ``weight_sum`` and ``lr_max``
advance identically on every rank (they depend on the step count and the learning rates only)
and are never communicated. The second moment ``v`` (``exp_avg_sq``) stays per rank unless
asked for (``average_second_moment=True``).

Rounding: a backend all-reduce has no exact mean (gloo has no AVG), so the average is the sum
over the K ranks, then divided by K. In float32/float64 with K = 2 that is the correctly rounded
mean (the sum is rounded once; halving is exact); with other K it is rounded twice (sum, then
division), and the sum's order is the backend's. bf16/fp16 tensors are summed in float32 and
rounded to their dtype once, after the division. Every rank receives the same sum, so the
averaged tensors are bitwise identical across ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sf_schedules import sync as sync_rules
from sf_schedules.validation import check_choice

from . import batchnorm
from .optimizers import ScheduleFreeOptimizer
from .wrapper import ScheduleFreeWrapper

_KEY = "local_steps"


# -- the sync schedule ---------------------------------------------------------------------------


def _rule_record(rule: Any) -> dict[str, Any]:
    """The rule as plain numbers (for a checkpoint that loads with ``weights_only=True``)."""
    return {"type": type(rule).__name__, **dataclasses.asdict(rule)}


def resolve_sync(sync: Any) -> tuple[tuple[int, ...], int, dict[str, Any] | None]:
    """The sync steps of ``sync``, the run's length, and the rule as a record (None without).

    ``sync`` takes the forms ``sf_optax.local`` takes, with the same messages:

    - the sync steps: 1-based step counts, strictly increasing, the last the run's length
      (``sf_schedules.sync.sync_steps(rule, lrs)``);
    - bool flags, one per step of the run (``sf_schedules.sync.sync_mask(rule, lrs)``);
    - ``(rule, lrs)`` or ``(rule, schedule, total_steps)`` with a rule of
      ``sf_schedules.sync.RULES``, handed to ``sf_schedules.sync.sync_steps``.
    """
    if (
        isinstance(sync, tuple | list)
        and 2 <= len(sync) <= 3
        and isinstance(sync[0], sync_rules.RULES)
    ):
        steps = sync_rules.sync_steps(*sync)
        return steps, steps[-1], _rule_record(sync[0])
    if isinstance(sync, sync_rules.RULES):
        raise TypeError(
            "sync: a rule needs the run's learning rates: pass (rule, lrs) or "
            "(rule, schedule, total_steps), or the steps from sf_schedules.sync.sync_steps"
        )
    try:
        arr = np.asarray(sync)
    except (TypeError, ValueError):
        arr = np.asarray(None)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            "sync must be a non-empty 1-d sequence (1-based sync steps, or bool flags per "
            f"step), got {sync!r:.80}"
        )
    if arr.dtype == np.bool_:
        return tuple(int(i) + 1 for i in np.flatnonzero(arr)), len(arr), None
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            "sync must hold ints (1-based sync steps) or bools (one flag per step, True: "
            f"average after that step), got dtype {arr.dtype}; e.g. "
            "sf_schedules.sync.sync_steps(rule, lrs)"
        )
    low = np.r_[1, arr[:-1] + 1]
    bad = np.flatnonzero(arr < low)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sync[{i}] must be in [{int(low[i])}, inf) (1-based step counts, strictly "
            f"increasing), got {int(arr[i])}"
        )
    steps = tuple(int(step) for step in arr)
    return steps, steps[-1], None


# -- averaging -----------------------------------------------------------------------------------

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _world(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "local steps average across a process group, and torch.distributed is not "
            "initialized: call torch.distributed.init_process_group first (a 1-rank group "
            "makes every average a no-op)"
        )
    return dist.get_world_size(group)


@torch.no_grad()
def average_(tensors: Iterable[torch.Tensor], group: Any = None) -> int:
    """Replaces every tensor by its mean over the ranks of ``group``; collective.

    One flat all-reduce (SUM, then division by the world size) per (device, dtype), in the
    order the tensors come; bf16/fp16 ones are summed in float32. Every rank must pass tensors
    of the same shapes, dtypes and order. Returns the number of all-reduces issued (0 on one
    rank).
    """
    world = _world(group)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"only floating tensors are averaged, got one of dtype {t.dtype}")
        buckets.setdefault((t.device, t.dtype), []).append(t)
    if world == 1:
        return 0
    for (_, dtype), bucket in buckets.items():
        reduce_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
        flat = torch.cat([t.detach().reshape(-1).to(reduce_dtype) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return len(buckets)


def _state_tensors(optimizer: Any, names: Sequence[str]) -> list[torch.Tensor]:
    """The params of every group, then the named state tensors of each param that has state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = list(params)
    if not names:
        return out
    sf_state = getattr(optimizer, "sf_state", None)  # ScheduleFreeWrapper keeps z apart
    for p in params:
        state = dict(optimizer.state.get(p, {}))
        if sf_state is not None:
            state.update(sf_state.get(p, {}))
        if not state:
            continue
        for name in names:
            value = state.get(name)
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                found = "nothing" if value is None else type(value).__name__
                if isinstance(value, torch.Tensor):
                    found = f"a tensor of shape {tuple(value.shape)}"
                raise ValueError(
                    f"average names {name!r}: every param with state needs a tensor of its "
                    f"shape there, and a param of shape {tuple(p.shape)} has {found}"
                )
            out.append(value)
    return out


def _is_schedule_free(optimizer: Any) -> bool:
    return isinstance(optimizer, ScheduleFreeOptimizer | ScheduleFreeWrapper)


# -- the wrapper ---------------------------------------------------------------------------------


class LocalSteps(torch.optim.Optimizer):
    """Local steps around ``optimizer``: average across ``group`` after each sync step.

    It is a torch optimizer (``param_groups``, ``state``, ``zero_grad``, ``step(closure)``,
    ``state_dict``; torch's lr schedulers accept it) whose ``step()`` is the inner optimizer's
    step, counted, and, when the count is one of the sync steps, followed by the average (see
    the module docstring for what is averaged and how it rounds). Use it on every rank, with
    the same schedule, in a plain loop without DistributedDataParallel (whose per-step gradient
    all-reduce is what local steps leave out).

    A step counts when the inner optimizer took it: a Schedule-Free optimizer's step skipped by
    ``skip_nonfinite`` (its ``k`` did not advance) is not counted, and ``torch.amp.GradScaler``
    never calls ``step()`` for a step it skips. The ranks must skip the same steps (they sync by
    their counts: a rank that skipped alone would wait for the others at a different step).

    Args:
      optimizer: any torch optimizer, an sf_torch Schedule-Free optimizer or
        ``ScheduleFreeWrapper``.
      sync: the sync steps (``sf_schedules.sync.sync_steps(rule, lrs)``; 1-based counts, the
        last the run's length), bool flags per step (``sync_mask``), or ``(rule, lrs)`` /
        ``(rule, schedule, total_steps)`` (see :func:`resolve_sync`). A step past the run's
        length raises (the schedule has no rounds left).
      group: the process group (None: the default group). torch.distributed must be
        initialized (RuntimeError otherwise); on a 1-rank group averaging is a no-op.
      average: the state names averaged with the params: default ``("z",)`` for Schedule-Free
        optimizers (``z``: see the module docstring), ``()`` for others (e.g.
        ``("exp_avg", "exp_avg_sq")`` averages Adam's moments).
      average_second_moment: True adds ``"exp_avg_sq"`` (Schedule-Free AdamW's and RAdam's
        ``v``) to ``average``; by default ``v`` stays per rank.

    Every param of every group is averaged, with or without a gradient (the list is then the
    same on every rank); a named state tensor is averaged for each param that has state.

    On every rank, after ``torch.distributed.init_process_group``::

        lrs = [opt_lr(t) for t in range(total_steps)]          # the run's learning rates
        opt = LocalSteps(AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=100),
                         sync_steps(ScheduleFreeQSR(h_base=4, alpha=0.01), lrs))
        for batch in my_shard_of_the_data:                      # no DDP around the model
            opt.zero_grad(); loss_fn(model, batch).backward(); opt.step()
        opt.sync_now(); opt.eval()                              # (the last step synced already)

    A torch lr scheduler may drive ``opt`` (or the inner optimizer); the rule's ``lrs`` must be
    the learning rates it will set, computed up front.
    """

    _step_supports_amp_scaling = False  # GradScaler unscales, and skips step() itself

    def __init__(
        self,
        optimizer: Any,
        sync: Any,
        *,
        group: Any = None,
        average: Sequence[str] | None = None,
        average_second_moment: bool = False,
    ):
        if not hasattr(optimizer, "param_groups") or not callable(getattr(optimizer, "step", 0)):
            raise TypeError(
                "optimizer must be a torch optimizer (param_groups and step()), got "
                f"{type(optimizer).__name__}"
            )
        if isinstance(optimizer, LocalSteps):
            raise TypeError("optimizer is already a LocalSteps: wrap the inner optimizer once")
        if average is None:
            average = ("z",) if _is_schedule_free(optimizer) else ()
        if isinstance(average, str) or not all(isinstance(n, str) for n in average):
            raise TypeError(f"average must be a sequence of state names (str), got {average!r}")
        check_choice("average_second_moment", average_second_moment, (True, False))
        names = tuple(dict.fromkeys([*average, *(["exp_avg_sq"] * average_second_moment)]))
        if isinstance(optimizer, ScheduleFreeOptimizer):
            # Its state is known before the first step creates it: refuse a name now.
            held = ("z",) if optimizer.kind == "sgd" else ("z", "exp_avg_sq")
            for name in names:
                if name not in held:
                    raise ValueError(
                        f"average: {type(optimizer).__name__} keeps {held} per param, got {name!r}"
                    )
        self.optimizer = optimizer
        self.sync_steps, self.total_steps, self.rule = resolve_sync(sync)
        self._sync_set = frozenset(self.sync_steps)
        self.group = group
        self.world_size = _world(group)
        self.average = names
        self.steps_taken = 0
        self.syncs = 0  # averages done (sync steps and sync_now), this process's count
        # What torch.optim.Optimizer.__init__ sets that its other methods read (the groups and
        # the state are the inner optimizer's, read through the properties below).
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, {})
        self._patch_step_function()

    # -- what a torch optimizer exposes ---------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return getattr(self.optimizer, "defaults", {})

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return (
            f"LocalSteps({self.optimizer!r}, {len(self.sync_steps)} syncs over "
            f"{self.total_steps} steps, average={self.average})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The inner optimizer's ``add_param_group`` (every rank must add the same group)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _inner(self, name: str) -> Callable:
        method = getattr(self.optimizer, name, None)
        if method is None:
            raise AttributeError(
                f"{name}(): the inner optimizer ({type(self.optimizer).__name__}) has none "
                "(only Schedule-Free optimizers have train/eval views)"
            )
        return method

    def train(self) -> None:
        """The inner Schedule-Free optimizer's ``train()`` (params to ``y``)."""
        self._inner("train")()

    def eval(self) -> None:
        """The inner Schedule-Free optimizer's ``eval()`` (params to ``x``; after a sync, the
        averaged ``x``)."""
        self._inner("eval")()

    def eval_params(self) -> list[torch.Tensor]:
        """The inner Schedule-Free optimizer's ``eval_params()``."""
        return self._inner("eval_params")()

    # -- the step -------------------------------------------------------------------------------

    def _counter(self) -> float | None:
        """A Schedule-Free optimizer's step count ``k`` (None for other optimizers)."""
        if not _is_schedule_free(self.optimizer) or not self.param_groups:
            return None
        return float(self.param_groups[0]["k"])

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The inner optimizer's step; then, at a sync step, the average (collective)."""
        count = self.steps_taken + 1
        if count > self.total_steps:
            raise RuntimeError(
                f"step {count}: the sync schedule ends after step {self.total_steps} (the "
                "run's length it was computed for); build LocalSteps with a longer schedule"
            )
        if count in self._sync_set:
            _state_tensors(self.optimizer, self.average)  # a bad name raises before the step
        before = self._counter()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if before is not None and self._counter() == before:
            return loss  # skipped by the optimizer: not a step
        self.steps_taken = count
        if count in self._sync_set:
            self._average()
        return loss

    def will_sync(self) -> bool:
        """Whether the next step taken ends with an average."""
        return self.steps_taken + 1 in self._sync_set

    def sync_now(self) -> None:
        """Average now, whatever the step count (e.g. before saving a final model); collective.
        The step count and the schedule are unchanged."""
        self._average()

    def _average(self) -> None:
        average_(_state_tensors(self.optimizer, self.average), self.group)
        self.syncs += 1

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus ``"local_steps"``: the steps taken, the sync
        steps (and the rule they came from), the world size, this rank and the averaged names.
        Per rank: each rank saves its own (``v`` differs across ranks); it loads with
        ``torch.load(weights_only=True)``."""
        out = dict(self.optimizer.state_dict())
        if _KEY in out:
            raise ValueError(f"the inner optimizer's state dict already has a {_KEY!r} entry")
        out[_KEY] = {
            "steps_taken": self.steps_taken,
            "sync_steps": list(self.sync_steps),
            "total_steps": self.total_steps,
            "rule": None if self.rule is None else dict(self.rule),
            "world_size": self.world_size,
            "rank": dist.get_rank(self.group),
            "average": list(self.average),
            "syncs": self.syncs,
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the inner optimizer's state and the step count exactly. ValueError (before
        anything changes) when the state dict has no ``"local_steps"`` entry, or was saved on
        another world size, with other averaged names, or with another sync schedule (set its
        ``"sync_steps"`` to this wrapper's to continue on a new schedule)."""
        saved = state_dict.get(_KEY) if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict):
            raise ValueError(
                f"load_state_dict: the state dict has no {_KEY!r} entry (it is not a "
                "LocalSteps state dict; load the inner optimizer's own into .optimizer)"
            )
        if saved["world_size"] != self.world_size:
            raise ValueError(
                f"load_state_dict: saved on a world size of {saved['world_size']}, and this "
                f"group has {self.world_size} ranks (local-step state is per rank)"
            )
        if tuple(saved["average"]) != self.average:
            raise ValueError(
                f"load_state_dict: saved averaging {tuple(saved['average'])}, and this wrapper "
                f"averages {self.average}"
            )
        steps = tuple(int(s) for s in saved["sync_steps"])
        if int(saved.get("total_steps", steps[-1] if steps else 0)) != self.total_steps:
            raise ValueError(
                f"load_state_dict: the saved sync schedule is for {saved.get('total_steps')} "
                f"steps, this wrapper's for {self.total_steps}"
            )
        if steps != self.sync_steps:
            where = next(
                (i for i, (a, b) in enumerate(zip(steps, self.sync_steps)) if a != b),
                min(len(steps), len(self.sync_steps)),
            )
            raise ValueError(
                "load_state_dict: the saved sync schedule differs from this wrapper's at entry "
                f"{where} (saved {steps[where : where + 3]}..., here "
                f"{self.sync_steps[where : where + 3]}...)"
            )
        taken = int(saved["steps_taken"])
        inner = {k: v for k, v in state_dict.items() if k != _KEY}
        self.optimizer.load_state_dict(inner)
        self.steps_taken = taken
        self.syncs = int(saved.get("syncs", 0))


# -- BatchNorm ---------------------------------------------------------------------------------


@contextlib.contextmanager
def recompute_batchnorm_stats(
    model: torch.nn.Module,
    batches: Iterable[Any],
    group: Any = None,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
) -> Iterator[int]:
    """``sf_torch.recompute_batchnorm_stats`` on every rank, then the running statistics
    averaged across ``group``; collective. Within the block every BatchNorm layer holds the
    mean over ranks of each rank's cumulative mean over its ``batches`` (at the weights the
    model holds: the averaged ``x`` after a sync and ``eval()``); on exit the training
    statistics return.

    With the same number of equal batches per rank, the averaged running mean is the mean over
    all ranks' batches; the averaged running variance is the mean of the ranks' variances
    (each rank's own unbiased batch variances), which leaves out the spread between the ranks'
    means: the statistics each rank would see on its own share of the data.

    Yields:
      The number of batches this rank used.
    """
    with batchnorm.recompute_batchnorm_stats(model, batches, forward) as count:
        layers = batchnorm._norm_layers(model)
        average_([t for m in layers for t in (m.running_mean, m.running_var)], group)
        yield count
