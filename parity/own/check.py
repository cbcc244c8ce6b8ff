"""Trajectories on the user's own pair: every Schedule-Free backend from the same start.

:func:`check` (or :func:`check_pair` for a :class:`parity.own.Pair`) does for a torch model and
its Flax twin what ``python -m parity run`` does for the shipped twins:

1. infers the mapping between the two (``parity.own.mapping.infer``), casts the torch model and
   the Flax variables to ``dtype`` and copies the torch initial weights into the Flax ones;
2. trains each backend for ``steps`` steps from those weights, step ``t`` on
   ``batches[t % len(batches)]``: ``sf_torch`` and ``sf_optax`` (primary rows), the reference
   ``schedulefree`` classes and optax.contrib's ``schedule_free_*`` (reference rows);
3. records after every step the parameters (``y``, by torch name in torch layout: Flax values
   are mapped back), the training loss at ``y`` (before the step) and the eval loss at ``x`` on
   ``eval_batches`` (the mean over them; taken on a copy, so evaluating never perturbs
   training);
4. compares every row with the baseline (``parity.compare``) and judges it by the limits of
   ``parity.tolerances``: the report of ``parity run`` (table, ``report.json``,
   ``report.png``, exit code 0/1/2).

Both frameworks run in this process, so the Python objects a user has (a model, a closure of
a loss) need no pickling. On CPU that needs one torch thread: with JAX's thread pool in the same
process, torch's intra-op pool fights it for the cores. Measured on a 2-core machine (load
average ~4 from other jobs), 30 steps of the tiny RoBERTa in float64 with an eval at x after
each, JAX's row run first in the same process: sf_torch 0.21 s with 1 torch thread against
6.85 s with 2 (33x), the ``schedulefree`` row 0.16 s against 2.15 s (13x); the sf_optax row
(3.6 s, mostly compiling) is not helped by the change. :func:`check` sets
``torch.set_num_threads(1)`` for its duration and restores the previous count afterwards.

Parameters whose gradient is exactly zero. Some parameters do not change the loss at all: the
bias of an attention key (softmax does not see a constant added to every score of a row), the
bias of a conv or linear layer right before a BatchNorm (the mean is subtracted). Their
computed gradient is rounding noise, different in each framework, and they move only by that
noise: compared with their own scale (0 at the start) the two frameworks differ by 100%,
meaning nothing. Such a leaf is detected before training: its float64 gradient on the first
two batches, computed in torch on a float64 copy of the model, is at most
``ZERO_GRADIENT_RATIO`` (1e-12) times the largest gradient of any parameter, on each batch; in
a float64 run the Flax gradient of sf_optax's first step must say the same (a leaf that is zero
in one framework only is a porting difference and stays compared relatively). A true gradient
that small relative to the largest is not resolvable in float64 anyway. These leaves are left
out of the ``params`` difference and measured apart by absolute difference divided by the
largest magnitude of any parameter (``parity.compare.compare(absolute=...)``); the noise they
move by is amplified by Adam (a noise gradient ``g`` far below ``eps`` moves a leaf by
``lr * g / eps`` per step: measured 8e-10 of the largest parameter after 200 steps on the
BatchNorm test pair's conv bias), so in float64 this figure is held to the sanity bound
``ZERO_GRADIENT_BOUND`` (1e-6: a missing weight decay or a leaf that takes real steps exceeds
it), not to the 1e-10 of the other parameters. In float32 the noise is near ``eps`` and such a
leaf takes steps of up to ``lr`` in random directions (ViT float32, 200 steps: 1.6e-3):
reported only, as float32 parameters are. They are listed, with that figure, in the table's
notes and in ``report.json`` (``zero_gradient``; per row ``max_diff["zero_gradient_abs"]``).

BatchNorm. Before each evaluation the statistics are recomputed at ``x`` on
the first ``recal_batches`` training batches, with ``sf_torch.recompute_batchnorm_stats`` and
``sf_optax.flax.recompute_batchnorm_stats``. torch keeps the unbiased batch variance in
``running_var`` (``n / (n - 1)`` times the one it normalizes with), nnx the biased one: the
torch statistics are rescaled by ``(n - 1) / n`` so that both evaluate with the variance both
normalize with in training (the eval loss then compares the ports, not the two libraries'
conventions). Linen models with ``batch_stats`` (a training loss that returns ``(loss,
updates)``): the statistics are recomputed at ``x`` from the training loss's updates, two runs
per batch giving each batch's statistics whatever the module's momentum
(:func:`_linen_batch_stats`), the variance the biased one there too.

DeepSpeed rows (opt-in: ``backends`` naming ``deepspeed_z0`` ... ``deepspeed_z3``, float32,
a pair from a SPEC: ``check_pair(..., spec=SPEC)`` or ``python -m parity check``): sf_torch
under ``sf_torch.deepspeed`` on 2 CPU ranks, each rebuilding the pair from the SPEC and loading
the saved initial weights, every rank on the whole batch (see :func:`_deepspeed_row`). Measured
on RoBERTa float32, 10 steps: ZeRO-2 bitwise equal to sf_torch, ZeRO-0 and ZeRO-3 within 5e-7
(params) and 6e-8 (eval loss); each row costs 10-30 s of process start-up here.

State handoff: :func:`snapshot_from_torch`, :func:`load_torch_snapshot`,
:func:`snapshot_from_optax` and :func:`optax_from_snapshot` move a run's state (``y``, ``z``,
``v``, the counters ``k``, ``weight_sum``, ``lr_max``, ``b1``, BatchNorm statistics) between
sf_torch and sf_optax through the mapping; :func:`handoff` runs one trajectory that changes
framework at given steps and compares it with the unmoved runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import numpy as np

from parity import report, tolerances
from parity.compare import compare
from parity.handoff import Snapshot
from parity.training.record import Record

BACKENDS = ("sf_torch", "sf_optax", "schedulefree", "optax_contrib")
# Opt-in rows (a pair from a SPEC only: each rank rebuilds it): sf_torch under DeepSpeed ZeRO.
DEEPSPEED = tuple(f"deepspeed_z{stage}" for stage in range(4))
DEEPSPEED_RANKS = 2
ROLES = {
    "sf_torch": "primary",
    "sf_optax": "primary",
    "schedulefree": "reference",
    "optax_contrib": "reference",
    **dict.fromkeys(DEEPSPEED, "distributed"),
}
FRAMEWORK = {
    "sf_torch": "torch",
    "sf_optax": "jax",
    "schedulefree": "torch",
    "optax_contrib": "jax",
    **dict.fromkeys(DEEPSPEED, "deepspeed"),
}
OPTIMIZERS = ("adamw", "sgd", "radam")
DTYPES = ("float64", "float32")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.1, "radam": 1e-3}
ZERO_GRADIENT_RATIO = 1e-12
ZERO_GRADIENT_BOUND = 1e-6  # float64 rows whose params are checked; float32: reported

EXIT_OK, EXIT_TOLERANCE, EXIT_ERROR = 0, 1, 2


@dataclass
class CheckConfig:
    """The hyperparameters of a check (the names and ranges of ``parity.config.RunConfig``)."""

    name: str = "pair"
    optimizer: str = "adamw"
    steps: int = 200
    dtype: str = "float64"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    r: float = 0.0
    weight_lr_power: float = 2.0
    silent_sgd_phase: bool = True
    inner_momentum: float = 0.0  # AdamW only (upstream main's): sf_torch and sf_optax rows
    eval_every: int = 1
    recal_batches: int = 4
    device: str = "cpu"

    def __post_init__(self):
        from parity.config import FIELD_CHECKS

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name, check_field in FIELD_CHECKS.items():
            if hasattr(self, name):
                check_field(name, getattr(self, name))

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_every == 0 or step in (0, self.steps)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


@dataclass
class CheckResult:
    """What :func:`check` found: the report's rows, its exit code and the zero-gradient leaves."""

    rows: list
    exit_code: int
    config: CheckConfig
    baseline: str
    mapping: Any
    zero_gradient: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    seconds: float = math.nan
    divergence: dict | None = None  # parity.own.divergence's first-batch comparison, if run

    def row(self, name: str):
        return next(r for r in self.rows if r.name == name)

    def extra(self) -> dict:
        out = {"zero_gradient": self.zero_gradient, "notes": self.notes, "pair": self.config.name}
        if self.divergence is not None:
            out["divergence"] = self.divergence
        return out

    def table(self) -> str:
        text = report.table(self.rows, self.baseline, self.config.dtype)
        leaves = self.zero_gradient.get("leaves", [])
        if leaves:
            worst = [
                f"{r.name} {r.max_diff['zero_gradient_abs']:.3e}"
                for r in self.rows
                if "zero_gradient_abs" in r.max_diff
            ]
            bound = (
                f"sanity bound {ZERO_GRADIENT_BOUND:g}"
                if self.config.dtype == "float64"
                else "reported"
            )
            text += (
                f"\nzero-gradient leaves, out of 'params diff' (they move by rounding noise): "
                f"{', '.join(leaves)}; their |diff| / largest |param|: "
                f"{', '.join(worst) or '-'} ({bound})"
            )
        for note in self.notes:
            text += f"\n{note}"
        return text

    def write(self, out) -> FsPath:
        """``report.json`` and ``report.png`` into ``out``; returns the JSON's path."""
        out = FsPath(out)
        out.mkdir(parents=True, exist_ok=True)
        payload = report.to_json(
            self.rows, self.config, self.baseline, self.exit_code, self.extra()
        )
        payload["wall_seconds"] = self.seconds
        (out / "report.json").write_text(json.dumps(payload, indent=1))
        report.plot(self.rows, out / "report.png", self.title(), self.config.dtype)
        return out / "report.json"

    def title(self) -> str:
        c = self.config
        return (
            f"{c.name} / {c.optimizer} / {c.dtype}, {c.steps} steps, lr {c.lr:g}, "
            f"baseline {self.baseline}"
        )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- flat parameter dicts -------------------------------------------------------------------------


def _key_str(key) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


class _Flat:
    """A pytree as ``{Path: leaf}`` (``Path``: the mapping's tuple of strings) and back."""

    def __init__(self, tree, prefix: tuple[str, ...], strip_value: bool):
        import jax

        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = []
        for keypath, _ in leaves:
            if strip_value and keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
                keypath = keypath[:-1]  # nnx: the Variable's value
            self.paths.append(prefix + tuple(_key_str(k) for k in keypath))
        self.values = dict(zip(self.paths, (leaf for _, leaf in leaves)))

    def tree(self, flat: dict):
        import jax

        return jax.tree.unflatten(self.treedef, [flat[p] for p in self.paths])


def _cast_tree(tree, dtype):
    import jax
    import jax.numpy as jnp

    def cast(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(a, dtype)
        return a

    return jax.tree.map(cast, tree)


# -- the shared start ------------------------------------------------------------------------------


class _Setup:
    """Everything every row starts from: the mapping, the initial weights, the batches."""

    def __init__(self, pair, config: CheckConfig, overrides):
        import torch

        from parity.own import mapping as mapping_lib

        self.pair, self.config = pair, config
        self.torch_dtype = getattr(torch, config.dtype)
        self.model = pair.torch_model.to(self.torch_dtype)
        self.mapping = mapping_lib.infer(
            self.model, pair.flax_model, pair.variables, overrides=overrides, ignore=pair.ignore
        )
        self.param_entries = self.mapping.params()
        # torch buffers the port keeps among its parameters (transformers' Flax BART family:
        # final_logits_bias): constants of the torch model, held fixed on the Flax side too
        self.fixed_entries = tuple(e for e in self.mapping.buffers() if e.flax_path[0] == "params")
        self.buffer_entries = tuple(e for e in self.mapping.buffers() if e.flax_path[0] != "params")
        # The initial torch state (a numpy copy), restored before each torch row.
        self.initial_state = {
            k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=False).items()
        }
        self.eval_model = copy.deepcopy(self.model)
        self.batch_norms = [
            m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        self.shapes = {e.torch_name: e.torch_shape for e in self.param_entries}
        self.torch_batches = [self._torch_batch(b) for b in pair.batches]
        self.torch_evals = [self._torch_batch(b) for b in pair.eval_batches]
        self.torch_recal = self.torch_batches[: config.recal_batches]

    def _torch_batch(self, batch):
        import torch

        out = {}
        for k, v in batch.items():
            if np.issubdtype(v.dtype, np.floating):
                out[k] = torch.tensor(np.asarray(v), dtype=self.torch_dtype)
            else:
                out[k] = torch.from_numpy(np.array(v))
        return out

    def restore_torch(self):
        self.model.load_state_dict(self.initial_state)
        self.model.train()
        return self.model

    def torch_params(self, model) -> dict[str, np.ndarray]:
        named = dict(model.named_parameters(remove_duplicate=False))
        return {
            e.torch_name: named[e.torch_name].detach().cpu().numpy() for e in self.param_entries
        }


class _JaxSetup:
    """The Flax side of the start: flat params (torch's initial weights), the rest, batches.

    Built (and used) inside ``jax.enable_x64`` for float64 runs."""

    def __init__(self, setup: _Setup):
        import jax
        import jax.numpy as jnp

        pair, config = setup.pair, setup.config
        self.setup = setup
        self.dtype = jnp.dtype(config.dtype)
        self.loss = pair.flax_loss
        self.eval_loss_fn = pair.flax_eval_loss or pair.flax_loss
        # The initial torch weights (not the live model: a torch row may have trained it).
        start = {k: v.cpu().numpy() for k, v in setup.initial_state.items()}
        self.is_nnx = pair.variables is None
        if self.is_nnx:
            from flax import nnx

            self.graphdef, params, rest = nnx.split(pair.flax_model, nnx.Param, ...)
            self.flat = _Flat(params, ("params",), strip_value=True)
            self.rest0 = _cast_tree(rest, self.dtype)
            self.batch_norm = any(
                isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(pair.flax_model)
            )
        else:
            variables = dict(pair.variables)
            self.flat = _Flat(variables["params"], ("params",), strip_value=False)
            self.rest0 = _cast_tree(
                {k: v for k, v in variables.items() if k != "params"}, self.dtype
            )
            # linen keeps running statistics in "batch_stats" (BatchNorm): recomputed at x
            # by _JaxRow when the training loss returns its updates.
            self.batch_norm = bool(jax.tree.leaves(self.rest0.get("batch_stats", {})))
        values = setup.mapping.to_flax(start)
        missing = [e.flax_path for e in setup.param_entries if e.flax_path not in self.flat.values]
        if missing:
            raise ValueError(f"the Flax params have no leaves {missing} (mapping paths)")
        mapped = {e.flax_path for e in setup.param_entries}
        self.fixed0 = {
            e.flax_path: jnp.asarray(values[e.flax_path], self.dtype) for e in setup.fixed_entries
        }
        self.params0 = {}
        for path, leaf in self.flat.values.items():
            if path in self.fixed0:
                continue
            if path in mapped:
                self.params0[path] = jnp.asarray(values[path], self.dtype)
            else:
                self.params0[path] = _cast_tree(leaf, self.dtype)
        self.rest0 = self.with_buffers(
            self.rest0,
            {e.flax_path: values[e.flax_path] for e in setup.buffer_entries},
        )
        self.batches = [self._batch(b) for b in pair.batches]
        self.evals = tuple(self._batch(b) for b in pair.eval_batches)
        self.recal = tuple(self.batches[: config.recal_batches])

    def _batch(self, batch):
        import jax.numpy as jnp

        return {
            k: jnp.asarray(v, self.dtype) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v)
            for k, v in batch.items()
        }

    def with_buffers(self, rest, values: dict):
        """``rest`` with the BatchNorm statistics of ``values`` (by Flax path) put in."""
        import jax
        import jax.numpy as jnp

        if not values:
            return rest
        if self.is_nnx:
            from flax import nnx

            rest = jax.tree.map(lambda a: a, rest)  # new Variables: rest0 stays as it is
            for path, var in nnx.to_flat_state(rest):
                key = ("batch_stats",) + tuple(str(p) for p in path)
                if isinstance(var, nnx.BatchStat) and key in values:
                    var.set_value(jnp.asarray(values[key], self.dtype))
            return rest
        flat = _Flat(rest, (), strip_value=False)
        new = {
            p: jnp.asarray(values[p], self.dtype) if p in values else v
            for p, v in flat.values.items()
        }
        return flat.tree(new)

    def buffers(self, rest) -> dict:
        """BatchNorm statistics of ``rest`` by Flax path (numpy)."""
        if not self.setup.buffer_entries:
            return {}
        if self.is_nnx:
            from flax import nnx

            return {
                ("batch_stats",) + tuple(str(p) for p in path): np.asarray(var.get_value())
                for path, var in nnx.to_flat_state(rest)
                if isinstance(var, nnx.BatchStat)
            }
        return {p: np.asarray(v) for p, v in _Flat(rest, (), strip_value=False).values.items()}

    def tree(self, params: dict):
        """The params tree of the Flax model: the trained leaves and the fixed ones."""
        return self.flat.tree({**params, **self.fixed0})

    # The model as the loss sees it (inside jit).
    def apply_loss(self, fn, params: dict, rest, batch, train: bool):
        import jax.numpy as jnp

        tree = self.tree(params)
        if self.is_nnx:
            from flax import nnx

            model = nnx.merge(self.graphdef, tree, rest, copy=True)
            if not train:
                model.eval()
            loss = fn(model, batch)
            new_rest = nnx.split(model, nnx.Param, ...)[2] if train else rest
            return jnp.asarray(loss), new_rest
        out = fn({"params": tree, **rest}, batch)
        if isinstance(out, tuple):
            loss, updates = out
            return jnp.asarray(loss), ({**rest, **updates} if train else rest)
        return jnp.asarray(out), rest

    def to_torch(self, params: dict) -> dict[str, np.ndarray]:
        import jax

        host = jax.device_get({e.flax_path: params[e.flax_path] for e in self.setup.param_entries})
        return {
            e.torch_name: e.to_torch(np.asarray(host[e.flax_path]))
            for e in self.setup.param_entries
        }


# -- torch rows -------------------------------------------------------------------------------


def _torch_optimizer(name: str, config: CheckConfig, params):
    from parity.runners.sf_torch import build

    if name == "sf_torch":
        import sf_torch

        return build(sf_torch, config, params)
    import schedulefree

    opt = build(schedulefree, config, params)
    opt.train()
    return opt


def _torch_x(name: str, optimizer):
    if name == "sf_torch":
        return optimizer.eval_params()
    from parity.runners.schedulefree import eval_params

    return eval_params(optimizer)


@contextlib.contextmanager
def _biased_batchnorm_stats(setup: _Setup, model):
    """Recompute torch's BatchNorm statistics at the model's weights (sf_torch's function) and
    rescale ``running_var`` by ``(n - 1) / n``: the biased variance nnx keeps."""
    import torch

    import sf_torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    counts: dict[int, set] = {id(m): set() for m in layers}

    def hook(module, inputs):
        x = inputs[0]
        counts[id(module)].add(x.numel() // x.shape[1])

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:

        def forward(m, batch):
            return setup.pair.torch_loss(m, batch)

        with sf_torch.recompute_batchnorm_stats(model, setup.torch_recal, forward=forward):
            for h in handles:
                h.remove()
            handles = []
            with torch.no_grad():
                for m in layers:
                    # One count per layer where the recalibration batches are of one size
                    # (the largest otherwise: exact only for equal sizes).
                    n = max(counts[id(m)])
                    m.running_var.mul_((n - 1) / n)
            yield
    finally:
        for h in handles:
            h.remove()


class _TorchRow:
    def __init__(self, name: str, setup: _Setup):
        self.name, self.setup = name, setup
        self.model = setup.restore_torch()
        self.optimizer = _torch_optimizer(name, setup.config, list(self.model.parameters()))

    def step(self, t: int) -> float:
        setup = self.setup
        batch = setup.torch_batches[t % len(setup.torch_batches)]
        self.optimizer.zero_grad(set_to_none=True)
        loss = setup.pair.torch_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach().double())

    def evaluate(self) -> float:
        import torch

        setup = self.setup
        if not setup.torch_evals:
            return math.nan
        eval_model = setup.eval_model
        with torch.no_grad():
            for target, x in zip(eval_model.parameters(), _torch_x(self.name, self.optimizer)):
                target.copy_(x)
            for target, buffer in zip(eval_model.buffers(), self.model.buffers()):
                target.copy_(buffer)
        stats = (
            _biased_batchnorm_stats(setup, eval_model)
            if setup.batch_norms
            else contextlib.nullcontext()
        )
        with stats, torch.no_grad():
            eval_model.eval()
            losses = [
                float(setup.pair.torch_loss(eval_model, b).double()) for b in setup.torch_evals
            ]
        return float(np.mean(losses))

    def params(self) -> dict[str, np.ndarray]:
        return self.setup.torch_params(self.model)


# -- JAX rows ---------------------------------------------------------------------------------


def _jax_tx(name: str, config: CheckConfig):
    if name == "sf_optax":
        import sf_optax
        from parity.runners.sf_optax import make_tx

        return make_tx(config), sf_optax.eval_params
    from optax import contrib

    from parity.runners.optax_contrib import make_tx

    return make_tx(config), contrib.schedule_free_eval_params


class _JaxRow:
    def __init__(self, name: str, js: _JaxSetup, start=None):
        import jax
        import optax

        self.name, self.js = name, js
        self.tx, eval_params = _jax_tx(name, js.setup.config)
        if start is None:
            self.params = dict(js.params0)
            self.opt_state = self.tx.init(self.params)
            self.rest = js.rest0
        else:
            self.params, self.opt_state, self.rest = start
        self.first_grad_max: dict | None = None
        tx = self.tx

        def train_step(params, opt_state, rest, batch):
            def f(p):
                return js.apply_loss(js.loss, p, rest, batch, train=True)

            (loss, new_rest), grads = jax.value_and_grad(f, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            grad_max = {p: jax.numpy.max(jax.numpy.abs(g)) for p, g in grads.items()}
            return optax.apply_updates(params, updates), opt_state, new_rest, loss, grad_max

        def x_of(params, opt_state):
            return eval_params(opt_state, params)

        def eval_loss(x, rest, batches):
            losses = [js.apply_loss(js.eval_loss_fn, x, rest, b, train=False)[0] for b in batches]
            return jax.numpy.stack(losses)

        self._train = jax.jit(train_step)
        self._x = jax.jit(x_of)
        self._eval = jax.jit(eval_loss)
        self._linen_stats = jax.jit(lambda x, rest: _linen_batch_stats(js, x, rest))

    def step(self, t: int) -> float:
        js = self.js
        batch = js.batches[t % len(js.batches)]
        self.params, self.opt_state, self.rest, loss, grad_max = self._train(
            self.params, self.opt_state, self.rest, batch
        )
        if self.first_grad_max is None:
            self.first_grad_max = {p: float(v) for p, v in grad_max.items()}
        return float(loss)

    def evaluate(self) -> float:
        js = self.js
        if not js.evals:
            return math.nan
        x = self._x(self.params, self.opt_state)
        rest = self.rest
        if js.batch_norm and not js.is_nnx:
            rest = self._linen_stats(x, rest)
        elif js.batch_norm:
            from flax import nnx

            import sf_optax.flax as sf_flax

            model = nnx.merge(js.graphdef, js.tree(x), rest, copy=True)
            sf_flax.recompute_batchnorm_stats(model, js.recal, forward=_nnx_forward(js.loss))
            rest = nnx.split(model, nnx.Param, ...)[2]
        losses = np.asarray(self._eval(x, rest, js.evals), dtype=np.float64)
        return float(np.mean(losses))

    def params_torch(self) -> dict[str, np.ndarray]:
        return self.js.to_torch(self.params)


def _linen_batch_stats(js: _JaxSetup, x: dict, rest: dict) -> dict:
    """linen: ``rest`` with every ``batch_stats`` leaf the equal-weight average over the
    recalibration batches of its per-batch value at ``x``.

    A linen BatchNorm's training update is ``new = m * old + (1 - m) * batch`` with a momentum
    ``m`` the module keeps to itself. Running the training loss twice per batch, from
    statistics all 0 and all 1, gives ``a = (1 - m) * batch`` and ``c = m + (1 - m) * batch``:
    ``m = c - a`` and ``batch = a / (1 - m)`` (about 100x the rounding of ``a`` for ``m`` 0.99:
    1e-14 relative in float64). The batch variance is the biased one, as torch's rescaled one.
    A leaf the loss does not update (``m`` 1) keeps its value.
    """
    import jax
    import jax.numpy as jnp

    stats = rest["batch_stats"]
    zeros = {**rest, "batch_stats": jax.tree.map(jnp.zeros_like, stats)}
    ones = {**rest, "batch_stats": jax.tree.map(jnp.ones_like, stats)}
    total = None
    for batch in js.recal:
        a = js.apply_loss(js.loss, x, zeros, batch, train=True)[1]["batch_stats"]
        c = js.apply_loss(js.loss, x, ones, batch, train=True)[1]["batch_stats"]

        def per_batch(a, c, old):
            m = c - a
            tracked = m != 1
            return jnp.where(tracked, a / jnp.where(tracked, 1 - m, 1), old)

        value = jax.tree.map(per_batch, a, c, stats)
        total = value if total is None else jax.tree.map(jnp.add, total, value)
    count = len(js.recal)
    return {**rest, "batch_stats": jax.tree.map(lambda t: t / count, total)}


_FORWARDS: dict = {}


def _nnx_forward(loss):
    """One forward function per loss (sf_optax compiles it once per function object)."""
    if id(loss) not in _FORWARDS:
        _FORWARDS[id(loss)] = (loss, lambda model, batch: loss(model, batch))
    return _FORWARDS[id(loss)][1]


# -- one trajectory ---------------------------------------------------------------------------


def _record(config: CheckConfig, setup: _Setup, first: int = 0) -> Record:
    return Record.empty(first, config.steps, setup.shapes, np.dtype(config.dtype))


def _train(row, record: Record, config: CheckConfig, last: int, torch_side: bool) -> None:
    def observe(step):
        record.set_params(step, row.params() if torch_side else row.params_torch())
        if config.evaluates_at(step):
            record.eval_loss[step - record.first_step] = row.evaluate()

    first = record.first_step
    observe(first)
    for t in range(first, last):
        record.train_loss[t - record.first_step] = row.step(t)
        observe(t + 1)


def _jax_context(dtype: str):
    import jax

    stack = contextlib.ExitStack()
    stack.enter_context(jax.enable_x64(dtype == "float64"))
    stack.enter_context(jax.default_matmul_precision("highest"))
    return stack


@contextlib.contextmanager
def one_torch_thread():
    """``torch.set_num_threads(1)`` inside the block, the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- zero-gradient leaves -----------------------------------------------------------------------


def _torch_grad_max(setup: _Setup, batches: int = 2) -> dict[str, np.ndarray]:
    """Per parameter, ``max |gradient|`` on each of the first batches, in float64 (a float64
    copy of the model at the initial weights), or in the run's dtype when the loss refuses
    float64 (the second element says which)."""
    import torch

    model = copy.deepcopy(setup.model)
    model.load_state_dict(setup.initial_state)
    model.train()
    for dtype in (torch.float64, setup.torch_dtype):
        try:
            model = model.to(dtype)
            out = {e.torch_name: [] for e in setup.param_entries}
            named = dict(model.named_parameters(remove_duplicate=False))
            for batch in setup.pair.batches[:batches]:
                converted = {
                    k: torch.tensor(v, dtype=dtype)
                    if np.issubdtype(v.dtype, np.floating)
                    else torch.from_numpy(np.array(v))
                    for k, v in batch.items()
                }
                model.zero_grad(set_to_none=True)
                setup.pair.torch_loss(model, converted).backward()
                for e in setup.param_entries:
                    g = named[e.torch_name].grad
                    out[e.torch_name].append(0.0 if g is None else float(g.abs().max()))
            return {n: np.asarray(v) for n, v in out.items()}, str(dtype).removeprefix("torch.")
        except (RuntimeError, TypeError):
            if dtype == setup.torch_dtype:
                raise
    raise AssertionError("unreachable")


def _zero_leaves(grad_max: dict[str, np.ndarray], ratio: float) -> set[str]:
    largest = max(float(np.max(v)) for v in grad_max.values())
    if largest == 0:
        return set()
    return {n for n, v in grad_max.items() if np.all(v <= ratio * largest)}


def zero_gradient_leaves(setup: _Setup, jax_grad_max: dict | None) -> dict:
    torch_max, dtype = _torch_grad_max(setup)
    ratio = ZERO_GRADIENT_RATIO if dtype == "float64" else 1e-5
    by_torch = _zero_leaves(torch_max, ratio)
    out = {"ratio": ratio, "detected_in": f"torch {dtype}", "torch": sorted(by_torch)}
    leaves = by_torch
    if jax_grad_max is not None and setup.config.dtype == "float64":
        flax_max = {
            e.torch_name: np.asarray([jax_grad_max[e.flax_path]]) for e in setup.param_entries
        }
        by_flax = _zero_leaves(flax_max, ZERO_GRADIENT_RATIO)
        out["flax"] = sorted(by_flax)
        out["detected_in"] += " and flax float64"
        leaves = by_torch & by_flax
        if by_torch ^ by_flax:
            out["disagree"] = sorted(by_torch ^ by_flax)
    out["leaves"] = sorted(leaves)
    return out


# -- the check ---------------------------------------------------------------------------------


def check(
    torch_model,
    flax_model,
    torch_loss: Callable,
    flax_loss: Callable,
    batches: Sequence,
    *,
    eval_batches: Sequence = (),
    variables=None,
    overrides=None,
    flax_eval_loss: Callable | None = None,
    name: str = "pair",
    ignore: Sequence = (),
    **options,
) -> CheckResult:
    """Train every backend on the pair and compare the trajectories (see the module doc).

    ``torch_model`` / ``flax_model`` / losses / batches / ``variables`` / ``overrides`` /
    ``ignore`` are those of :class:`parity.own.Pair`; ``options`` are :func:`check_pair`'s.
    """
    from parity.own.spec import Pair

    pair = Pair(
        torch_model=torch_model,
        flax_model=flax_model,
        torch_loss=torch_loss,
        flax_loss=flax_loss,
        batches=batches,
        eval_batches=eval_batches,
        variables=variables,
        overrides=overrides,
        flax_eval_loss=flax_eval_loss,
        name=name,
        ignore=ignore,
    )
    return check_pair(pair, **options)


def check_pair(
    pair,
    *,
    optimizer: str = "adamw",
    steps: int = 200,
    dtype: str = "float64",
    lr: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    silent_sgd_phase: bool = True,
    inner_momentum: float = 0.0,
    eval_every: int = 1,
    recal_batches: int = 4,
    backends: Sequence[str] = BACKENDS,
    baseline: str | None = "sf_torch",
    out=None,
    log: bool = True,
    spec: str | None = None,
) -> CheckResult:
    """:func:`check` on a :class:`parity.own.Pair`.

    Args:
      optimizer: ``"adamw"``, ``"sgd"`` or ``"radam"``; ``lr`` None: 1e-3 (adamw, radam), 0.1
        (sgd). The hyperparameters have the names and ranges of ``python -m parity run``;
        ``inner_momentum`` (AdamW) runs the sf_torch and sf_optax rows only (schedulefree 1.4.1
        and optax.contrib have none: skipped rows).
      steps: training steps, >= 1; ``dtype``: ``"float64"`` or ``"float32"``.
      backends: rows, among ``BACKENDS``; a backend whose package is missing or that cannot
        run the configuration (optax.contrib: no RAdam, no ``r``) is a skipped row.
      baseline: the row every other is compared with (default sf_torch; a lone backend is its
        own baseline).
      out: a folder for ``report.json`` and ``report.png`` (None: nothing written).
      log: one plain line per finished row on stderr.
      spec: the SPEC the pair came from (``load_spec``); needed by the DeepSpeed rows
        ``deepspeed_z0`` ... ``deepspeed_z3`` (opt-in, float32 only), whose
        ``DEEPSPEED_RANKS`` rank processes rebuild the pair from it (see
        :func:`_deepspeed_row`).

    Returns:
      A :class:`CheckResult`; its ``exit_code`` is 0 (every checked row within its
      tolerance), 1 (a tolerance exceeded) or 2 (a backend failed).
    """
    from parity.own.spec import Pair

    if not isinstance(pair, Pair):
        raise TypeError(f"pair must be a parity.own.Pair, got {type(pair).__name__}")
    started = time.perf_counter()
    config = CheckConfig(
        name=pair.name,
        optimizer=optimizer,
        steps=steps,
        dtype=dtype,
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        silent_sgd_phase=silent_sgd_phase,
        inner_momentum=inner_momentum,
        eval_every=eval_every,
        recal_batches=recal_batches,
    )
    if inner_momentum and optimizer != "adamw":
        raise ValueError(f"inner_momentum is AdamW's (optimizer 'adamw'), got {optimizer!r}")
    names = list(dict.fromkeys(backends))
    unknown = [n for n in names if n not in BACKENDS + DEEPSPEED]
    if not names or unknown:
        raise ValueError(f"backends must be among {BACKENDS + DEEPSPEED}, got {list(backends)}")
    if len(names) == 1:
        baseline = names[0]
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the backends {names}")

    with one_torch_thread():
        setup = _Setup(pair, config, pair.overrides)
        records, seconds, errors, skipped, jax_grad = {}, {}, {}, {}, None
        from parity import runners

        for n in names:
            why = _unsupported(n, config, spec)
            if why is None:
                module = _runner(n)
                why = runners.unavailable(module)
            if why:
                skipped[n] = why
                continue
            start = time.perf_counter()
            try:
                if FRAMEWORK[n] == "deepspeed":
                    record, grad = _deepspeed_row(n, setup, spec), None
                else:
                    record, grad = _run_row(n, setup)
            except Exception as error:  # a row that fails is reported, the others still run
                errors[n] = f"{type(error).__name__}: {error}"
                if log:
                    _log(f"{n}: failed: {errors[n]}")
                continue
            if grad is not None and jax_grad is None:
                jax_grad = grad
            records[n] = record
            seconds[n] = time.perf_counter() - start
            if log:
                _log(f"{n}: {config.steps} steps in {seconds[n]:.1f} s")
        zero = zero_gradient_leaves(setup, jax_grad)
    absolute = set(zero["leaves"])

    nominal = tolerances.nominal(config.dtype)
    base_record = records.get(baseline)
    rows = []
    notes = []
    if setup.fixed_entries:
        notes.append(
            "held fixed in Flax as torch does (a torch buffer, a Flax param): "
            + ", ".join(e.torch_name for e in setup.fixed_entries)
        )
    for n in names:
        role = ROLES[n]
        if n in skipped:
            status = report.ERROR if n == baseline else report.SKIPPED
            rows.append(report.Row(n, role, status, note=f"skipped: {skipped[n]}"))
            continue
        if n in errors:
            rows.append(report.Row(n, role, report.ERROR, note=errors[n]))
            continue
        expected = _expected_difference(n, config)
        comparison = None
        if n != baseline and base_record is not None:
            comparison = compare(records[n], base_record, absolute=absolute)
        limits = tolerances.limits(role, config.dtype, expected)
        note = f"expected to differ: {expected}" if expected else ""
        row = report.make_row(n, role, records[n], comparison, limits, nominal, seconds[n], note)
        if comparison is not None and comparison.absolute is not None:
            worst = float(np.nanmax(comparison.absolute))
            row.max_diff["zero_gradient_abs"] = worst
            if "params" in limits and not worst <= ZERO_GRADIENT_BOUND:
                row.status = report.FAIL
                row.note = "; ".join(
                    x for x in (row.note, "zero-gradient leaves over their sanity bound") if x
                )
        if n != baseline and base_record is None:
            row.status, row.note = report.ERROR, f"no baseline to compare with ({baseline} failed)"
        rows.append(row)
    if any(r.status == report.ERROR for r in rows):
        code = EXIT_ERROR
    elif any(r.status == report.FAIL for r in rows):
        code = EXIT_TOLERANCE
    else:
        code = EXIT_OK
    result = CheckResult(
        rows=rows,
        exit_code=code,
        config=config,
        baseline=baseline,
        mapping=setup.mapping,
        zero_gradient=zero,
        notes=notes,
        seconds=time.perf_counter() - started,
    )
    if out is not None:
        result.write(out)
    return result


def _runner(name: str):
    import importlib

    if name in DEEPSPEED:
        name = "deepspeed"
    return importlib.import_module(f"parity.runners.{name}")


def _unsupported(name: str, config: CheckConfig, spec: str | None = None) -> str | None:
    if name in DEEPSPEED:
        if config.dtype == "float64":
            return "DeepSpeed reduces float32/bf16/fp16 gradients only (no float64)"
        if spec is None:
            return "needs the pair's SPEC (each rank rebuilds the pair): python -m parity check"
        return None
    return _runner(name).unsupported(config)


def _expected_difference(name: str, config: CheckConfig) -> str | None:
    if name in DEEPSPEED:
        return None
    return _runner(name).expected_difference(config)


def _run_row(name: str, setup: _Setup):
    config = setup.config
    record = _record(config, setup)
    if FRAMEWORK[name] == "torch":
        row = _TorchRow(name, setup)
        _train(row, record, config, config.steps, torch_side=True)
        meta_framework = "torch"
        grad = None
    else:
        with _jax_context(config.dtype):
            js = _jax_setup(setup)
            row = _JaxRow(name, js)
            _train(row, record, config, config.steps, torch_side=False)
        meta_framework = "jax"
        grad = row.first_grad_max if name == "sf_optax" else None
    record.meta = {"framework": meta_framework}
    return record, grad


def _jax_setup(setup: _Setup) -> _JaxSetup:
    """One per dtype and setup (the converted params and batches are shared by the rows)."""
    cache = setup.__dict__.setdefault("_jax", {})
    if setup.config.dtype not in cache:
        cache[setup.config.dtype] = _JaxSetup(setup)
    return cache[setup.config.dtype]


# -- DeepSpeed rows ---------------------------------------------------------------------------


def _deepspeed_row(name: str, setup: _Setup, spec: str) -> Record:
    """sf_torch under ``sf_torch.deepspeed`` (ZeRO stage of ``name``) on ``DEEPSPEED_RANKS``
    CPU ranks (gloo), in child processes started by ``torch.distributed.run``.

    Each rank rebuilds the pair from ``spec`` and loads the initial weights this process
    saved. Every rank trains on the whole batch of each step (the data are replicated, not
    split): the gradient DeepSpeed averages over the ranks is then exactly the single-process
    one whatever the loss (a split batch equals it only for a loss that is an equal-weight mean
    over examples, which a masked token loss is not). What the row checks is sf_torch with
    DeepSpeed's partitioned optimizer state and parameters (ZeRO 1-3), its eval at x and its
    train/eval switch, against the single-process trajectory.
    """
    import os
    import subprocess
    import tempfile

    from parity.runners import deepspeed as ds_runner

    stage = int(name.removeprefix("deepspeed_z"))
    with tempfile.TemporaryDirectory(prefix="parity_own_ds_") as work:
        work = FsPath(work)
        np.savez(work / "init.npz", **{k: v.cpu().numpy() for k, v in setup.initial_state.items()})
        job = dict(
            spec=spec,
            stage=stage,
            config=dataclasses.asdict(setup.config),
            params=[e.torch_name for e in setup.param_entries],
        )
        (work / "job.json").write_text(json.dumps(job))
        env = {**os.environ, **ds_runner.environment(setup.config)}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={DEEPSPEED_RANKS}",
            "-m",
            "parity.own.check",
            str(work / "job.json"),
            str(work / "init.npz"),
            str(work / "record.npz"),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not (work / "record.npz").exists():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise RuntimeError(f"the DeepSpeed ranks failed (exit {done.returncode}): {tail}")
        return Record.load(work / "record.npz")


def _deepspeed_child(job_path: str, init_path: str, result_path: str) -> None:
    """One rank of :func:`_deepspeed_row` (run under ``torch.distributed.run``)."""
    import os

    import deepspeed
    import torch

    import sf_torch
    import sf_torch.deepspeed as sfds
    from parity.own.spec import load_spec
    from parity.runners.sf_torch import build

    job = json.loads(FsPath(job_path).read_text())
    config = CheckConfig(**job["config"])
    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        pair = load_spec(job["spec"], dtype=config.dtype)
        dtype = getattr(torch, config.dtype)
        model = pair.torch_model.to(dtype)
        with np.load(init_path) as f:
            model.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files})
        model.train()
        optimizer = build(sf_torch, config, list(model.parameters()))
        zero = {"stage": job["stage"]}
        if job["stage"] == 3:
            zero["stage3_param_persistence_threshold"] = 0  # partition even small tensors
        ds_config = {
            # Every rank takes the whole batch as its one micro-batch (replicated data).
            "train_batch_size": ranks,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": zero,
            "steps_per_print": 10**9,
        }
        engine, *_ = sfds.initialize(model=model, optimizer=optimizer, config=ds_config)
        module = engine.module
        named = dict(module.named_parameters(remove_duplicate=False))
        params = list(module.parameters())
        zero3 = hasattr(params[0], "ds_id")
        batch_norms = [
            m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]

        def tensors(batch):
            return {
                k: torch.tensor(v, dtype=dtype)
                if np.issubdtype(v.dtype, np.floating)
                else torch.from_numpy(np.array(v))
                for k, v in batch.items()
            }

        batches = [tensors(b) for b in pair.batches]
        evals = [tensors(b) for b in pair.eval_batches]
        shim = _Shim(pair, batches[: config.recal_batches])
        shapes = {n: tuple(named[n].ds_shape if zero3 else named[n].shape) for n in job["params"]}
        record = Record.empty(0, config.steps, shapes, np.dtype(config.dtype))

        @torch.no_grad()
        def evaluate() -> float:
            if not evals:
                return math.nan
            sfds.eval(engine)  # collective: x in the weights on every rank
            stats = (
                _biased_batchnorm_stats(shim, module) if batch_norms else contextlib.nullcontext()
            )
            with stats:
                module.eval()
                losses = [float(pair.torch_loss(module, b).double()) for b in evals]
            module.train()
            sfds.train(engine)
            return float(np.mean(losses))

        def observe(step):
            with deepspeed.zero.GatheredParameters(params, enabled=zero3):
                if rank == 0:
                    record.set_params(
                        step, {n: named[n].detach().cpu().numpy() for n in job["params"]}
                    )
            if config.evaluates_at(step):
                record.eval_loss[step] = evaluate()

        observe(0)
        for step in range(config.steps):
            loss = pair.torch_loss(module, batches[step % len(batches)])
            engine.backward(loss)
            engine.step()
            record.train_loss[step] = float(loss.detach().double())
            observe(step + 1)
        if rank == 0:
            record.meta = {
                "framework": f"torch {torch.__version__}, deepspeed {deepspeed.__version__}",
                "zero_stage": job["stage"],
                "ranks": ranks,
                "data": "replicated: every rank trains on the whole batch",
            }
            record.save(result_path)
    finally:
        torch.distributed.destroy_process_group()


class _Shim:
    """What :func:`_biased_batchnorm_stats` reads of a setup, in a DeepSpeed rank."""

    def __init__(self, pair, recal):
        self.pair, self.torch_recal = pair, recal


# -- state handoff ------------------------------------------------------------------------------


def snapshot_from_torch(setup: _Setup, model, optimizer) -> Snapshot:
    """An sf_torch run's state by torch name (torch layout): y, z, v, BatchNorm statistics and
    the counters. The optimizer must be in train mode and hold the model's parameters."""
    groups = optimizer.param_groups
    if not all(g.get("train_mode", True) for g in groups):
        raise ValueError("the optimizer is in eval mode (params hold x): call optimizer.train()")
    scalars = {(g["k"], g["weight_sum"], g["lr_max"]) for g in groups}
    if len(scalars) != 1:
        raise ValueError(f"param groups disagree on (k, weight_sum, lr_max): {scalars}")
    k, weight_sum, lr_max = scalars.pop()
    group = groups[0]
    b1 = group["momentum"] if "betas" not in group else group["betas"][0]
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    params, z, v = {}, {}, {}
    for g in groups:
        for p in g["params"]:
            entry = setup.mapping.entry(names[id(p)])
            state = optimizer.state.get(p, {})
            params[entry.torch_name] = p.detach().cpu().numpy().copy()
            z[entry.torch_name] = state.get("z", p).detach().cpu().numpy().copy()
            if setup.config.optimizer != "sgd":
                moment = state.get("exp_avg_sq")
                v[entry.torch_name] = (
                    np.zeros_like(params[entry.torch_name])
                    if moment is None
                    else moment.detach().cpu().numpy().copy()
                )
    state_dict = model.state_dict()
    buffers = {
        e.torch_name: state_dict[e.torch_name].detach().cpu().numpy().copy()
        for e in setup.buffer_entries
    }
    return Snapshot(
        model=setup.config.name,
        optimizer=setup.config.optimizer,
        params=params,
        z=z,
        v=None if setup.config.optimizer == "sgd" else v,
        buffers=buffers,
        k=int(k),
        weight_sum=float(weight_sum),
        lr_max=max(float(lr_max), 0.0),
        b1=float(b1),
    )


def load_torch_snapshot(setup: _Setup, snapshot: Snapshot, model, optimizer) -> None:
    """Put a snapshot (torch names) into an sf_torch model and optimizer (train mode)."""
    import torch

    state_dict = model.state_dict()
    for name, value in {**snapshot.params, **snapshot.buffers}.items():
        for alias in setup.mapping.entry(name).torch_names:
            state_dict[alias] = torch.tensor(np.array(value), dtype=state_dict[alias].dtype)
    model.load_state_dict(state_dict)
    opt_sd = optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    state, index = {}, 0
    for group in opt_sd["param_groups"]:
        for pid in group["params"]:
            p = tensors[index]
            name = setup.mapping.entry(names[id(p)]).torch_name
            dtype = group.get("state_dtype") or p.dtype
            entry = {"z": torch.tensor(np.array(snapshot.z[name]))}
            if snapshot.v is not None:
                entry["exp_avg_sq"] = torch.tensor(np.array(snapshot.v[name]))
            state[pid] = {k: t.to(dtype=dtype) for k, t in entry.items()}
            index += 1
        group.update(k=snapshot.k, weight_sum=snapshot.weight_sum, lr_max=snapshot.lr_max)
        group["train_mode"] = True
        if "betas" in group:
            group["betas"] = (snapshot.b1, group["betas"][1])
        else:
            group["momentum"] = snapshot.b1
    opt_sd["state"] = state
    optimizer.load_state_dict(opt_sd)


def snapshot_from_optax(js: _JaxSetup, params: dict, opt_state, rest) -> Snapshot:
    """An sf_optax run's state (flat params by Flax path) as a snapshot by torch name."""
    from parity import handoff as twin_handoff

    config = js.setup.config
    flax_snapshot = twin_handoff.snapshot_from_optax(
        config.name, config.optimizer, params, opt_state, js.buffers(rest)
    )
    entries = js.setup.param_entries

    def by_name(tree):
        return {e.torch_name: e.to_torch(np.asarray(tree[e.flax_path])) for e in entries}

    buffers = {
        e.torch_name: e.to_torch(flax_snapshot.buffers[e.flax_path])
        for e in js.setup.buffer_entries
    }
    return dataclasses.replace(
        flax_snapshot,
        params=by_name(flax_snapshot.params),
        z=by_name(flax_snapshot.z),
        v=None if flax_snapshot.v is None else by_name(flax_snapshot.v),
        buffers=buffers,
    )


def optax_from_snapshot(js: _JaxSetup, snapshot: Snapshot, tx):
    """``(params, opt_state, rest)`` of sf_optax ``tx`` holding a snapshot (torch names)."""
    from parity import handoff as twin_handoff

    entries = js.setup.param_entries

    def by_path(tree):
        out = {e.flax_path: e.to_flax(np.asarray(tree[e.torch_name])) for e in entries}
        for path, leaf in js.params0.items():  # unmapped Flax params: as they start
            out.setdefault(path, np.asarray(leaf))
        return out

    flax_snapshot = dataclasses.replace(
        snapshot,
        params=by_path(snapshot.params),
        z=by_path(snapshot.z),
        v=None if snapshot.v is None else by_path(snapshot.v),
    )
    params, opt_state = twin_handoff.optax_from_snapshot(flax_snapshot, tx, js.dtype)
    buffers = {
        e.flax_path: e.to_flax(snapshot.buffers[e.torch_name])
        for e in js.setup.buffer_entries
        if e.torch_name in snapshot.buffers
    }
    return params, opt_state, js.with_buffers(js.rest0, buffers)


def handoff(
    pair,
    *,
    switch_at: Sequence[int],
    start: str = "torch",
    optimizer: str = "adamw",
    steps: int = 50,
    dtype: str = "float64",
    **hyper,
) -> dict:
    """One run that changes framework (sf_torch <-> sf_optax) at ``switch_at``, and the two
    unmoved runs: ``{"records": {name: Record}, "comparisons": {...}, "rows": [...]}``.

    ``start``: ``"torch"`` or ``"jax"``, the framework of the first segment. The moved run is
    compared with the unmoved run of each framework by ``parity.compare``.
    """
    if start not in ("torch", "jax"):
        raise ValueError(f"start must be 'torch' or 'jax', got {start!r}")
    config = CheckConfig(name=pair.name, optimizer=optimizer, steps=steps, dtype=dtype, **hyper)
    if config.inner_momentum:
        raise ValueError(
            "inner_momentum must be 0 for the handoff (parity.handoff moves z and v, not the "
            f"inner momentum's buffer), got {config.inner_momentum}"
        )
    switches = sorted({int(s) for s in switch_at})
    if not switches or switches[0] <= 0 or switches[-1] >= steps:
        raise ValueError(f"switch_at must hold steps in (0, {steps}), got {list(switch_at)}")
    bounds = [0, *switches, steps]
    with one_torch_thread():
        setup = _Setup(pair, config, pair.overrides)
        zero = zero_gradient_leaves(setup, None)
        records = {}
        for n in ("sf_torch", "sf_optax"):
            records[n], _ = _run_row(n, setup)
        parts, snapshot = [], None
        order = ["torch", "jax"] if start == "torch" else ["jax", "torch"]
        for i, (first, last) in enumerate(zip(bounds, bounds[1:])):
            framework = order[i % 2]
            record = Record.empty(first, last, setup.shapes, np.dtype(config.dtype))
            if framework == "torch":
                row = _TorchRow("sf_torch", setup)
                if snapshot is not None:
                    load_torch_snapshot(setup, snapshot, row.model, row.optimizer)
                _train(row, record, config, last, torch_side=True)
                snapshot = snapshot_from_torch(setup, row.model, row.optimizer)
            else:
                with _jax_context(config.dtype):
                    js = _jax_setup(setup)
                    begin = None
                    if snapshot is not None:
                        tx, _ = _jax_tx("sf_optax", config)
                        begin = optax_from_snapshot(js, snapshot, tx)
                    row = _JaxRow("sf_optax", js, start=begin)
                    _train(row, record, config, last, torch_side=False)
                    snapshot = snapshot_from_optax(js, row.params, row.opt_state, row.rest)
            parts.append(record)
    moved = Record.concatenate(parts)
    route = " -> ".join(order[i % 2] for i in range(len(bounds) - 1))
    records[f"handoff {route}"] = moved
    absolute = set(zero["leaves"])
    comparisons = {n: compare(moved, records[n], absolute) for n in ("sf_torch", "sf_optax")}
    comparisons["sf_optax vs sf_torch"] = compare(
        records["sf_optax"], records["sf_torch"], absolute
    )
    return {
        "records": records,
        "comparisons": comparisons,
        "route": route,
        "config": config,
        "zero_gradient": zero,
    }


if __name__ == "__main__":
    _deepspeed_child(*sys.argv[1:4])
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(0)  # as parity.runners.deepspeed: skip a teardown where gloo threads may abort


class _CallableModule(type(sys)):
    """This module, callable: ``parity.own.check(...)`` is :func:`check`."""

    def __call__(self, *args, **kwargs) -> CheckResult:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
