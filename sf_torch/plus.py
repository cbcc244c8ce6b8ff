r"""Schedule-Free AdamC with a Polyak step size ("ScheduleFree+"), as a torch optimizer.

:class:`AdamCScheduleFreePlus` computes what upstream schedulefree's research class
``AdamCScheduleFreePlusPaper`` (main branch, commit 43e5c2d, "Added ScheduleFree+") computes,
with the same arguments and per-group keys, in the same order of operations (float64: the same
bits, tests/test_torch_plus.py); the rule is the one of ``sf_optax.adamc_plus``
(sf_optax/plus.py, where it is written out). Step ``k`` (0-based), gradient ``g`` and loss
``f`` both taken at ``y``, the sums over every parameter element of every group::

    p      = min(k / sf_beta1_anneal_steps, 1)
    b_k    = 1 - (1 - sf_beta1)**(1 - p) * (1 - sf_beta1_max)**p   (sf_beta1 without annealing)
    e      = polyak_beta e + (1 - polyak_beta) sum|g| sqrt(pi/2);  e <- e / (1 - polyak_beta**(k+1))
    polyak = max(0, f + b_k sum g (z - x)) / e                     (0 where e = 0)
    eta    = max(lr, eps) * polyak                                 (per group)
    lr_max = max(lr_max, eta);  c = 1 while k < c_warmup, else c = w / W with
             w = (k+1)**r lr_max**weight_lr_power, W += w
    m      = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    z     <- z - eta^2 weight_decay y
               - eta (m / (1 - b1**(k+1))) / (sqrt(v / (1 - b2**(k+1))) + eps)
    x     <- (1 - c) x + c z;     y <- b_k x + (1 - b_k) z

Decisions, as in ``sf_optax.adamc_plus``: ``e`` is stored after its bias correction, so the
next step's EMA starts from the corrected value (upstream's code does this; with the default
``polyak_beta=0`` it makes no difference); where the gradient is zero everywhere (``e = 0``) the
Polyak factor is 0 (upstream raises ZeroDivisionError there), as it is where ``weight_sum`` is 0
(``c = 0``). The scalars shared by all groups (``b_k``, the Polyak factor, ``polyak_beta``,
``sf_beta1``, ``sf_beta1_max``, ``sf_beta1_anneal_steps``) are read from param group 0, as
upstream reads them. The Polyak factor takes the loss minimum as 0 (sf_optax/plus.py: measured
there on problems whose minimum is and is not 0).

The state per param: ``z``, ``x``, ``exp_avg`` (m) and ``exp_avg_sq`` (v), in ``state_dtype``
(the param's dtype when None); the params hold ``y`` while training. Upstream also stores
``y``; here the params hold it, and ``eval()`` keeps a copy of it (``state['y']``, only while in
eval mode) so that ``train()`` puts back the very ``y`` of the last step, whatever ``b_k`` was
(annealed: ``y`` cannot be recomputed from ``x`` and ``z`` with the next step's ``b_k``).

The step needs the loss: ``step(closure)`` (a closure that computes the loss and its
gradients, run with grad on) or ``step(loss)`` (the loss at the params, a number or a 0-d
tensor: one host sync). ``step_func(function_value)`` is upstream's name for the latter.

Distributed: with DTensor params (FSDP2's ``fully_shard``, tensor parallelism) the two sums are
all-reduced over the mesh dimensions on which the gradients are sharded, and the loss averaged
over the default process group (every rank's own loss, as upstream's ``all_reduce(AVG)``;
here a SUM divided by the world size, which gloo also runs). Plain tensors (one process, or
DDP, whose gradients are already averaged) are summed locally; pass the averaged loss there.
DeepSpeed's ``engine.step()`` passes no loss, so ``sf_torch.deepspeed`` refuses this optimizer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sf_schedules.validation import (
    check_b2,
    check_choice,
    check_count,
    check_nonnegative,
    check_pair,
    check_real,
)

from . import dtensor
from .reference import eval_stored_x, stored_x_params, train_stored_x

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# Keys the optimizer itself changes every step (not hyperparameters to check).
_COUNTERS = frozenset(
    (
        "k",
        "train_mode",
        "weight_sum",
        "lr_max",
        "scheduled_lr",
        "grad_l1_ema",
        "grad_l1_ema_corr",
        "polyak_denom_ema",
        "function_value_ema",
        "ip_term",
        "sf_beta1_k",
    )
)
_SQRT_HALF_PI = math.sqrt(math.pi / 2)


def annealed_sf_beta1(sf_beta1: float, sf_beta1_max: float, anneal_steps: int, k: int) -> float:
    """``b_k``: ``1 - sf_beta1`` moved geometrically to ``1 - sf_beta1_max`` over
    ``anneal_steps`` steps (``sf_beta1`` itself when ``anneal_steps`` is 0)."""
    if anneal_steps <= 0:
        return float(sf_beta1)
    progress = min(k / anneal_steps, 1.0)
    return 1 - math.exp(
        math.log(1 - sf_beta1) * (1 - progress) + math.log(1 - sf_beta1_max) * progress
    )


class AdamCScheduleFreePlus(torch.optim.Optimizer):
    """Schedule-Free AdamC with a Polyak step size: upstream's ``AdamCScheduleFreePlusPaper``
    (module docstring). Call ``train()`` before training and ``eval()`` before evaluating or
    saving a checkpoint (it starts in train mode: at step 0 ``x = y = z``).

    Args (upstream's names, order and defaults; every one can be set per group, but
    ``polyak_beta``, ``sf_beta1``, ``sf_beta1_max`` and ``sf_beta1_anneal_steps`` are read
    from group 0):
        params: params or param-group dicts.
        lr: base step size, >= 0, floored at ``eps``; the step size is this times the Polyak
            factor (default 1.0).
        betas: ``(b1, b2)``: Adam's moments, each in [0, 1) (default (0.9, 0.95)).
        sf_beta1: the Schedule-Free interpolation ``y = b x + (1 - b) z``, in [0, 1] ([0, 1)
            with annealing).
        eps: added to Adam's denominator; the floor of ``lr`` and the initial ``lr_max``, >= 0.
        weight_decay: AdamC decay, ``z -= eta^2 weight_decay y``, >= 0 (values like 20 or
            50, not AdamW's 0.1).
        r: power of the polynomial weighting ``(k+1)**r`` of the average, >= 0.
        polyak_beta: EMA decay of the gradient's L1 norm in the Polyak denominator, in [0, 1).
        c_warmup: steps during which ``x = z`` (``c = 1``), >= 0.
        sf_beta1_anneal_steps: steps over which ``1 - sf_beta1`` moves geometrically to
            ``1 - sf_beta1_max``; 0: no annealing.
        sf_beta1_max: the interpolation at the end of the annealing, in [0, 1).
        weight_lr_power: power of ``lr_max`` in the averaging weight, >= 0.
        foreach: True: torch's multi-tensor ops; False: one tensor at a time; None: the
            multi-tensor ops for CUDA params (keyword-only, as the next one).
        state_dtype: dtype of ``z``, ``x``, ``exp_avg``, ``exp_avg_sq`` (e.g. torch.float32
            for bf16 params); None: the params'.

    Per-group keys after each step, as upstream's: ``k``, ``weight_sum``, ``lr_max``,
    ``scheduled_lr`` (``eta``), ``grad_l1_ema`` and ``grad_l1_ema_corr`` (``e``),
    ``function_value_ema`` (``f + ip``), ``ip_term``; plus ``sf_beta1_k`` (``b_k``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.95),
        sf_beta1: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0,
        polyak_beta: float = 0,
        c_warmup: int = 0,
        sf_beta1_anneal_steps: int = 0,
        sf_beta1_max: float = 0.965,
        weight_lr_power: float = 2,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
    ):
        check_nonnegative("eps", eps, required=True)
        defaults = dict(
            lr=lr,
            betas=betas,
            sf_beta1=sf_beta1,
            eps=eps,
            r=r,
            k=0,
            train_mode=True,
            weight_sum=0.0,
            lr_max=float(eps),
            scheduled_lr=0.0,
            polyak_beta=polyak_beta,
            sf_beta1_anneal_steps=sf_beta1_anneal_steps,
            sf_beta1_max=sf_beta1_max,
            grad_l1_ema=0.0,
            polyak_denom_ema=0.0,
            c_warmup=c_warmup,
            weight_lr_power=weight_lr_power,
            weight_decay=weight_decay,
            foreach=foreach,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults)

    # -- checks --------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        group["train_mode"] = self.param_groups[0]["train_mode"]

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"], required=True)
        b1, b2 = check_pair("betas", group["betas"], ("beta1", "beta2"))
        check_real("betas[0]", b1, 0.0, 1.0, high_open=True, required=True)
        check_b2("betas[1]", b2, required=True)
        anneal = check_count("sf_beta1_anneal_steps", group["sf_beta1_anneal_steps"], required=True)
        check_real("sf_beta1", group["sf_beta1"], 0.0, 1.0, high_open=bool(anneal), required=True)
        check_real("sf_beta1_max", group["sf_beta1_max"], 0.0, 1.0, high_open=True, required=True)
        check_nonnegative("eps", group["eps"], required=True)
        check_nonnegative("weight_decay", group["weight_decay"], required=True)
        check_nonnegative("r", group["r"], required=True)
        check_real("polyak_beta", group["polyak_beta"], 0.0, 1.0, high_open=True, required=True)
        check_count("c_warmup", group["c_warmup"], required=True)
        check_nonnegative("weight_lr_power", group["weight_lr_power"], required=True)
        check_choice("foreach", group["foreach"], (None, True, False))
        state_dtype = group["state_dtype"]
        if state_dtype is not None and not (
            isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
        ):
            raise ValueError(
                f"state_dtype must be in floating torch dtypes or None, got {state_dtype!r}"
            )

    # -- views ---------------------------------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` into the params (a copy of ``y`` is kept for ``train()``). Idempotent."""
        eval_stored_x(self)

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` of the last step back into the params, bit for bit (a state without it,
        loaded from upstream's train-mode checkpoint say: ``y`` from ``x`` and ``z`` with the
        ``b`` of the last step). Idempotent."""
        train_stored_x(self, lambda group: float(group.get("sf_beta1_k", group["sf_beta1"])))

    @torch.no_grad()
    def eval_params(self) -> list[torch.Tensor]:
        """``x`` of every param as new tensors in the params' dtype (order of
        ``[p for g in param_groups for p in g['params']]``), without changing anything; a
        param without state gives a copy of itself."""
        return stored_x_params(self)

    # -- the step ------------------------------------------------------------------------------

    def step_func(self, function_value: Any = None) -> Any:
        """Upstream's interface: one step with the loss ``function_value`` at the current
        params (a number or a 0-d tensor). Returns ``function_value``."""
        if function_value is None:
            raise TypeError("step_func needs the loss at the current params (function_value)")
        return self.step(function_value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | Any = None) -> Any:
        """One step. ``closure``: a callable that computes the loss at the params and its
        gradients (run with grad on), or the loss itself (a number or a 0-d tensor) with the
        gradients already in ``.grad``. Returns the closure's loss (or the value given)."""
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(
                "step() was called in eval mode: call optimizer.train() before training steps "
                "(and optimizer.eval() before evaluating or saving a checkpoint)"
            )
        for group in self.param_groups:
            self._check_group(group)
        if closure is None:
            raise TypeError(
                "AdamCScheduleFreePlus.step needs the loss for its Polyak step size: "
                "step(closure) or step(loss)"
            )
        if callable(closure):
            with torch.enable_grad():
                loss = closure()
        else:
            loss = closure
        f = _loss_value(loss)
        work = self._gather()
        g0 = self.param_groups[0]
        k = int(g0["k"])
        b_k = annealed_sf_beta1(
            float(g0["sf_beta1"]), float(g0["sf_beta1_max"]), int(g0["sf_beta1_anneal_steps"]), k
        )
        for group, entries in work:
            for p, _, _ in entries:
                self._init_state(p, group)
        grad_l1, ip, distributed = self._sums(work, b_k)
        if distributed:
            f = _mean_over_ranks(f, work)
        pb = float(g0["polyak_beta"])
        ema = pb * float(g0["grad_l1_ema"]) + (1 - pb) * grad_l1 * _SQRT_HALF_PI
        ema_corr = ema / (1 - pb ** (k + 1))
        polyak = max(0, f + ip) / ema_corr if ema_corr > 0 else 0.0

        for group, entries in work:
            eps = float(group["eps"])
            group_lr = max(float(group["lr"]), eps) * polyak
            group["grad_l1_ema"] = group["grad_l1_ema_corr"] = ema_corr
            group["function_value_ema"] = f + ip
            group["ip_term"] = ip
            group["scheduled_lr"] = group_lr
            group["sf_beta1_k"] = b_k
            lr_max = group["lr_max"] = max(group_lr, float(group["lr_max"]))
            kg = int(group["k"])
            if kg < int(group["c_warmup"]):
                c = 1.0
            else:
                weight = ((kg + 1) ** float(group["r"])) * (
                    lr_max ** float(group["weight_lr_power"])
                )
                weight_sum = group["weight_sum"] = float(group["weight_sum"]) + weight
                c = weight / weight_sum if weight_sum != 0 else 0.0
            b1, b2 = map(float, group["betas"])
            coefs = _Coefs(
                decay=group_lr * group_lr * float(group["weight_decay"]),
                b1=b1,
                b2=b2,
                bc1=1 - b1 ** (kg + 1),
                bc2=1 - b2 ** (kg + 1),
                eps=eps,
                lr=group_lr,
                c=c,
                b=b_k,
            )
            if entries:
                ys, gs = [e[0] for e in entries], [e[1] for e in entries]
                states = [self.state[p] for p in ys]
                lists = [ys, gs] + [[st[key] for st in states] for key in _KEYS]
                if dtensor.any_dtensor(ys):
                    lists = [dtensor.local(lst) for lst in lists]
                foreach = group["foreach"]
                if foreach is None:
                    foreach = all(map(operator.attrgetter("is_cuda"), ys))
                (_update_foreach if foreach else _update_loop)(*lists, coefs)
            group["k"] = kg + 1
        return loss

    def _gather(self) -> list[tuple[dict, list]]:
        """Per group, ``(param, grad, state or None)`` of the params with a gradient; every
        check on them (dense gradients, DTensor layouts) before anything moves."""
        work = []
        for group in self.param_groups:
            entries = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise RuntimeError(
                        "AdamCScheduleFreePlus does not support sparse gradients (got a "
                        f"{g.layout} gradient for a param of shape {tuple(p.shape)})"
                    )
                state = self.state.get(p)
                named = [("gradient", g)]
                if state:
                    named += [(key, state.get(key)) for key in _KEYS]
                problem = dtensor.pair_problem(p, named)
                if problem is not None:
                    raise RuntimeError(
                        "AdamCScheduleFreePlus steps DTensor params on their local shards, which "
                        "needs the param, its gradient and its state on one mesh with the same "
                        f"placements, but for a param of shape {tuple(p.shape)} {problem}"
                    )
                entries.append((p, g, state))
            work.append((group, entries))
        return work

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "z" in state:
            return
        dtype = group["state_dtype"] or p.dtype
        fmt = torch.preserve_format
        state["z"] = p.detach().to(dtype=dtype, copy=True, memory_format=fmt)
        state["x"] = p.detach().to(dtype=dtype, copy=True, memory_format=fmt)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=fmt)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=fmt)

    def _sums(self, work, b_k: float) -> tuple[float, float, bool]:
        """``sum |g|`` and ``b_k sum g (z - x)`` (``b_k`` times each param's sum, as upstream
        computes it) over every param with a gradient, as Python
        floats: global sums for DTensors (all-reduced over the mesh dimensions their
        gradients are sharded on), local ones otherwise; and whether any was a DTensor."""
        l1_parts: dict = {}  # reduction key -> list of 0-d float64 tensors
        ip_parts: dict = {}
        distributed = False
        for _, entries in work:
            for p, g, _ in entries:
                state = self.state[p]
                z, x = state["z"], state["x"]
                key = None
                if dtensor.is_dtensor(g):
                    distributed = True
                    key = _reduction_key(g)
                    g, z, x = dtensor.local([g, z, x])
                acc = torch.float64 if g.dtype == torch.float64 else torch.float32
                l1 = torch.linalg.vector_norm(g, 1, dtype=acc).to(torch.float64)
                gz = g if g.dtype == z.dtype else g.to(z.dtype)
                ip = (b_k * gz.mul(z - x).sum()).to(torch.float64)
                l1_parts.setdefault(key, []).append(l1)
                ip_parts.setdefault(key, []).append(ip)
        grad_l1 = ip_sum = 0.0
        for key, l1s in l1_parts.items():
            device = l1s[0].device
            both = torch.stack(
                [
                    torch.stack([t.to(device) for t in l1s]).sum(),
                    torch.stack([t.to(device) for t in ip_parts[key]]).sum(),
                ]
            )
            if key is not None:
                _all_reduce_sharded(both, key)
            l1_value, ip_value = both.tolist()
            grad_l1 += l1_value
            ip_sum += ip_value
        return grad_l1, ip_sum, distributed

    # -- checkpoints ---------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (this class's or upstream's state dicts); the state
        tensors are then copies in the group's ``state_dtype``."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            dtype = group["state_dtype"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in (*_KEYS, "y"):
                    if key in state:
                        want = p.dtype if key == "y" else (dtype or p.dtype)
                        state[key] = state[key].to(device=p.device, dtype=want, copy=True)
                if group["train_mode"]:
                    state.pop("y", None)  # upstream keeps y always; here the params hold it

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


_KEYS = ("z", "x", "exp_avg", "exp_avg_sq")


class _Coefs:
    """One group's coefficients of one step."""

    __slots__ = ("decay", "b1", "b2", "bc1", "bc2", "eps", "lr", "c", "b")

    def __init__(self, **values):
        for key, value in values.items():
            setattr(self, key, value)


def _update_loop(ys, gs, zs, xs, ms, vs, s: _Coefs) -> None:
    """One tensor at a time, in the state's dtype, in upstream's order of operations."""
    for y, g, z, x, m, v in zip(ys, gs, zs, xs, ms, vs):
        yw = y if y.dtype == z.dtype else y.to(z.dtype)
        gw = g if g.dtype == z.dtype else g.to(z.dtype)
        if s.decay != 0:
            z.sub_(yw, alpha=s.decay)
        m.mul_(s.b1).add_(gw, alpha=1 - s.b1)
        v.mul_(s.b2).addcmul_(gw, gw, value=1 - s.b2)
        denom = v.div(s.bc2).sqrt_().add_(s.eps)
        z.addcdiv_(m.div(s.bc1), denom, value=-s.lr)
        x.mul_(1 - s.c).add_(z, alpha=s.c)
        y.copy_(x.mul(s.b).add_(z, alpha=1 - s.b))


def _update_foreach(ys, gs, zs, xs, ms, vs, s: _Coefs) -> None:
    """torch's multi-tensor ops: the loop's numbers (tensors of one device and dtype per
    call: torch groups them itself)."""
    work = zs[0].dtype
    yw = [y if y.dtype == work else y.to(work) for y in ys]
    gw = [g if g.dtype == work else g.to(work) for g in gs]
    if s.decay != 0:
        torch._foreach_sub_(zs, yw, alpha=s.decay)
    torch._foreach_mul_(ms, s.b1)
    torch._foreach_add_(ms, gw, alpha=1 - s.b1)
    torch._foreach_mul_(vs, s.b2)
    torch._foreach_addcmul_(vs, gw, gw, value=1 - s.b2)
    denom = torch._foreach_div(vs, s.bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, s.eps)
    num = torch._foreach_div(ms, s.bc1)
    torch._foreach_addcdiv_(zs, num, denom, value=-s.lr)
    del num, denom
    torch._foreach_mul_(xs, 1 - s.c)
    torch._foreach_add_(xs, zs, alpha=s.c)
    new_y = torch._foreach_mul(xs, s.b)
    torch._foreach_add_(new_y, zs, alpha=1 - s.b)
    torch._foreach_copy_(ys, new_y)


def _loss_value(loss: Any) -> float:
    """The loss as a Python float (a number, or a tensor of one element)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the loss must be a scalar (the Polyak step size needs it), got a tensor of "
                f"shape {tuple(loss.shape)}"
            )
        if dtensor.is_dtensor(loss):
            loss = loss.full_tensor()
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        raise TypeError(
            "the loss must be a number or a 0-d tensor (the Polyak step size needs it), got "
            f"{type(loss).__name__}; a closure must return the loss"
        )
    return float(loss)


def _reduction_key(g) -> tuple:
    """The mesh of DTensor ``g`` and the dimensions on which it is sharded (where its local
    sums are partial)."""
    from torch.distributed.tensor import Replicate

    dims = tuple(i for i, pl in enumerate(g.placements) if not isinstance(pl, Replicate))
    return (g.device_mesh, dims)


def _all_reduce_sharded(values: torch.Tensor, key: tuple) -> None:
    import torch.distributed as dist

    mesh, dims = key
    for dim in dims:
        group = mesh.get_group(dim)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)


def _mean_over_ranks(f: float, work) -> float:
    """The loss averaged over the default process group (every rank's own batch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return f
    device = next(dtensor.local([g])[0].device for _, entries in work for _, g, _ in entries)
    value = torch.tensor([f], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    return float(value.item()) / dist.get_world_size()
