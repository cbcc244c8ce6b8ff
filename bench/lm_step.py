"""One full LM training step with Schedule-Free AdamW against plain AdamW, torch and JAX.

The cost Schedule-Free adds to training is measured where users pay it: one full step of a
GPT-style causal Transformer LM (forward, backward, optimizer step, zero_grad), not the optimizer
alone. The model is defined once per framework below (pre-norm blocks, causal attention through
``F.scaled_dot_product_attention`` / ``jax.nn.dot_product_attention``, tanh-GELU MLP, tied
embeddings) and both twins start from the same numpy-drawn parameters and see the same batch, so
their losses agree step by step (a check that each timed step really trains).

Rows, per framework, same lr, betas, eps and weight decay:

- torch: ``torch.optim.AdamW`` (fused on CUDA, foreach otherwise) and
  ``sf_torch.AdamWScheduleFree`` (its fused Triton step is picked on CUDA, foreach otherwise).
- JAX: ``optax.adamw`` and ``sf_optax.adamw``, one jitted step with params and state donated,
  the model in Flax (``nnx``) with float32 params.

Per row: median step time and its interquartile range over ``--steps`` timed steps (each step
synchronised: ``torch.cuda.synchronize`` / ``jax.block_until_ready``) after ``--warmup`` steps;
then the pipelined step: ``--steps`` more steps dispatched back to back in blocks of
``PIPELINE_BLOCK``, one synchronisation per block (median over the blocks, per step), as a
training loop that does not wait for each loss runs. The synchronised step adds the host's
dispatch of every step to its device time (on a slow host, milliseconds per call for JAX's
~450 arrays, and they vary from call to call); the pipelined step hides it behind the device's
work, so it is the device cost of a step that the two optimizers are compared on first;
the optimizer-only time (the same optimizer stepping on one fixed set of gradients) and its share
of the full step; for Schedule-Free rows the time of one switch to the evaluation weights and
back (torch: ``optimizer.eval(); optimizer.train()``; JAX: ``sf_optax.eval_params``, which builds
``x`` without touching ``y``). The ratio Schedule-Free / AdamW is given per framework.

Memory: ``extra`` is what a step needs above params + grads + optimizer state + the batch:
torch: ``max_memory_allocated`` during one step after a reset (CUDA only), minus those bytes;
JAX: the compiled step's memory analysis (arguments + temporaries + outputs that do not reuse a
donated input), minus the same bytes (grads live inside the jitted step). Activations dominate
both; the difference between the two rows of a framework is what Schedule-Free adds.
``opt extra`` is the same for the optimizer step alone (above params + grads + state): 0 means no
parameter-sized temporaries.

``--dtype bfloat16`` is mixed precision with float32 params, grads and state: torch autocast to
bfloat16, Flax modules with ``dtype=bfloat16``; the loss is taken in float32. On CUDA, float32
matmuls use TF32 in both frameworks unless ``--matmul fp32``.

Run: python -m bench.lm_step --device cpu|cuda --size tiny|small|gpt2-small|gpt2-medium
[--dtype float32|bfloat16] [--framework torch|jax|both] [--steps N] [--warmup N] [--json out.json]
"""

from __future__ import annotations

import os

# Must happen before jax is imported: JAX would otherwise take most of the GPU up front, and the
# torch rows run first in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import sf_torch  # noqa: E402
from bench.step import format_mb, jax_extra_bytes, skipped_lines  # noqa: E402
from bench.timing import time_blocks  # noqa: E402

LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.1
LN_EPS = 1e-5

# ---------------------------------------------------------------------------------------------
# Model sizes and the shared initial parameters


@dataclass(frozen=True)
class LMConfig:
    """A GPT-style LM and its batch: ``batch`` sequences of ``seq_len`` tokens."""

    name: str
    vocab: int
    d_model: int
    layers: int
    heads: int
    seq_len: int
    batch: int

    @property
    def mlp(self) -> int:
        return 4 * self.d_model


SIZES = {
    "tiny": LMConfig("tiny", vocab=256, d_model=64, layers=2, heads=4, seq_len=32, batch=4),
    "small": LMConfig("small", vocab=8192, d_model=512, layers=8, heads=8, seq_len=512, batch=8),
    "gpt2-small": LMConfig(
        "gpt2-small", vocab=50304, d_model=768, layers=12, heads=12, seq_len=1024, batch=8
    ),
    "gpt2-medium": LMConfig(
        "gpt2-medium", vocab=50304, d_model=1024, layers=24, heads=16, seq_len=1024, batch=8
    ),
}


def lm_config(size: str, batch: int | None = None, seq_len: int | None = None) -> LMConfig:
    """The named size, with the batch size and context length optionally replaced."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return replace(cfg, batch=batch or cfg.batch, seq_len=seq_len or cfg.seq_len)


def param_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """Canonical names (the Flax paths, dot-joined) and shapes; a kernel is (in, out)."""
    d, m = cfg.d_model, cfg.mlp
    shapes = {"embed.embedding": (cfg.vocab, d), "pos": (cfg.seq_len, d)}
    for i in range(cfg.layers):
        b = f"blocks.{i}."
        shapes |= {
            b + "ln1.scale": (d,),
            b + "ln1.bias": (d,),
            b + "attn.qkv.kernel": (d, 3 * d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.kernel": (d, d),
            b + "attn.proj.bias": (d,),
            b + "ln2.scale": (d,),
            b + "ln2.bias": (d,),
            b + "mlp_in.kernel": (d, m),
            b + "mlp_in.bias": (m,),
            b + "mlp_out.kernel": (m, d),
            b + "mlp_out.bias": (d,),
        }
    return shapes | {"ln_f.scale": (d,), "ln_f.bias": (d,)}


def init_params(cfg: LMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's initialisation, drawn once by numpy and handed to both frameworks.

    Weights ~ N(0, 0.02^2), the residual projections (attn.proj, mlp_out) with std
    0.02 / sqrt(2 layers), positions with std 0.01; biases 0, LayerNorm scales 1.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias"):
            params[name] = np.zeros(shape, np.float32)
        elif name.endswith(".scale"):
            params[name] = np.ones(shape, np.float32)
        else:
            std = 0.01 if name == "pos" else 0.02
            if name.endswith(("attn.proj.kernel", "mlp_out.kernel")):
                std /= math.sqrt(2 * cfg.layers)
            params[name] = std * rng.standard_normal(shape, dtype=np.float32)
    return params


def make_batch(cfg: LMConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens: inputs (B, T) and next-token labels (B, T), int32."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, cfg.vocab, size=(cfg.batch, cfg.seq_len + 1), dtype=np.int32)
    return tokens[:, :-1].copy(), tokens[:, 1:].copy()


# ---------------------------------------------------------------------------------------------
# torch model


class TorchAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = (
            a.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            for a in self.qkv(h).split(d, dim=-1)
        )
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(mixed.transpose(1, 2).reshape(b, t, d))


class TorchBlock(nn.Module):
    """Pre-norm: h + attn(ln1(h)), then h + mlp_out(gelu(mlp_in(ln2(h))))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.attn = TorchAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.mlp_in = nn.Linear(cfg.d_model, cfg.mlp)
        self.mlp_out = nn.Linear(cfg.mlp, cfg.d_model)

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp_out(F.gelu(self.mlp_in(self.ln2(h)), approximate="tanh"))


class TorchLM(nn.Module):
    """Tokens (B, T) -> logits (B, T, vocab); the output head is the embedding (tied)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList([TorchBlock(cfg) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=LN_EPS)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.embed.weight)


def _torch_slots(model: TorchLM) -> dict[str, tuple[torch.Tensor, bool]]:
    """Canonical name -> (torch param, transposed?) for every param of ``model``."""
    slots = {"pos": (model.pos, False)}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear):
            slots[f"{prefix}.kernel"] = (module.weight, True)
            slots[f"{prefix}.bias"] = (module.bias, False)
        elif isinstance(module, nn.LayerNorm):
            slots[f"{prefix}.scale"] = (module.weight, False)
            slots[f"{prefix}.bias"] = (module.bias, False)
        elif isinstance(module, nn.Embedding):
            slots[f"{prefix}.embedding"] = (module.weight, False)
    return slots


def build_torch_lm(cfg: LMConfig, params: dict[str, np.ndarray], device: str) -> TorchLM:
    """The torch LM on ``device`` holding the canonical ``params`` (float32)."""
    with torch.device(device):
        model = TorchLM(cfg)
    slots = _torch_slots(model)
    if set(slots) != set(params) or len(slots) != len(list(model.parameters())):
        differ = sorted(set(slots) ^ set(params))
        raise KeyError(f"canonical names do not match the torch LM: {differ}")
    with torch.no_grad():
        for name, (target, transposed) in slots.items():
            value = torch.from_numpy(params[name])
            target.copy_(value.T if transposed else value)
    return model


def torch_canonical(model: TorchLM, tensors=None) -> dict[str, np.ndarray]:
    """``{canonical name: float32 numpy}`` of the params, or of ``tensors`` (param order)."""
    slots = _torch_slots(model)
    if tensors is not None:
        by_param = {id(p): t for p, t in zip(model.parameters(), tensors)}
        slots = {n: (by_param[id(p)], tr) for n, (p, tr) in slots.items()}
    return {
        n: (t.detach().T if tr else t.detach()).float().cpu().numpy().copy()
        for n, (t, tr) in slots.items()
    }


# ---------------------------------------------------------------------------------------------
# Flax model (the same layers, canonical names = the nnx paths)


def _flax_classes():
    """The Flax LM classes; defined on first use so that torch-only runs never import jax."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Attention(nnx.Module):
        def __init__(self, cfg: LMConfig, dtype, rngs):
            self.heads = cfg.heads
            kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, **kw)
            self.proj = nnx.Linear(cfg.d_model, cfg.d_model, **kw)

        def __call__(self, h):
            b, t, d = h.shape
            q, k, v = (
                a.reshape(b, t, self.heads, d // self.heads) for a in jnp.split(self.qkv(h), 3, -1)
            )
            mixed = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, heads, dh)
            return self.proj(mixed.reshape(b, t, d))

    class Block(nnx.Module):
        def __init__(self, cfg: LMConfig, dtype, rngs):
            ln = dict(
                epsilon=LN_EPS,
                use_fast_variance=False,
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
            kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            self.ln1 = nnx.LayerNorm(cfg.d_model, **ln)
            self.attn = Attention(cfg, dtype, rngs)
            self.ln2 = nnx.LayerNorm(cfg.d_model, **ln)
            self.mlp_in = nnx.Linear(cfg.d_model, cfg.mlp, **kw)
            self.mlp_out = nnx.Linear(cfg.mlp, cfg.d_model, **kw)

        def __call__(self, h):
            h = h + self.attn(self.ln1(h))
            return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(h)), approximate=True))

    class LM(nnx.Module):
        def __init__(self, cfg: LMConfig, dtype, rngs):
            self.embed = nnx.Embed(
                cfg.vocab, cfg.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
            )
            self.pos = nnx.Param(jnp.zeros((cfg.seq_len, cfg.d_model), jnp.float32))
            self.blocks = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.layers)])
            self.ln_f = nnx.LayerNorm(
                cfg.d_model,
                epsilon=LN_EPS,
                use_fast_variance=False,
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
            self.dtype = dtype

        def __call__(self, tokens):
            h = self.embed(tokens) + self.pos[...][: tokens.shape[1]].astype(self.dtype)
            for block in self.blocks:
                h = block(h)
            return self.embed.attend(self.ln_f(h))

    return LM


def build_flax_lm(cfg: LMConfig, params: dict[str, np.ndarray], dtype: str, device=None):
    """``(graphdef, state)`` of the Flax LM (compute ``dtype``) holding the canonical ``params``.

    The model is built abstractly (no random init), then its float32 params are filled in.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    lm_class = _flax_classes()
    abstract = nnx.eval_shape(lambda: lm_class(cfg, jnp.dtype(dtype), nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    names = set(_flatten(nnx.to_pure_dict(state)))
    if names != set(params):
        raise KeyError(f"canonical names do not match the Flax LM: {sorted(names ^ set(params))}")
    nested: dict = {}
    for name, value in params.items():
        node = nested
        *parents, leaf = [int(k) if k.isdigit() else k for k in name.split(".")]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.device_put(value, device)
    nnx.replace_by_pure_dict(state, nested)
    return graphdef, state


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flatten(value, name + ".")
        else:
            out[name] = value
    return out


def flax_canonical(state) -> dict[str, np.ndarray]:
    """``{canonical name: float32 numpy}`` of an nnx param state."""
    from flax import nnx

    return {n: np.asarray(v, np.float32) for n, v in _flatten(nnx.to_pure_dict(state)).items()}


# ---------------------------------------------------------------------------------------------
# Rows


TORCH_ROWS = ("torch.optim adamw", "sf_torch adamw")
JAX_ROWS = ("optax adamw", "sf_optax adamw")


@dataclass
class Row:
    """One optimizer's full-step timing, optimizer-only timing, switch timing and bytes."""

    name: str
    framework: str
    schedule_free: bool
    impl: str
    median_s: float
    q25_s: float
    q75_s: float
    times_s: list[float]
    opt_median_s: float
    opt_share: float  # optimizer-only time / full step time
    switch_s: float | None  # one eval()+train() pair (torch) or one eval_params (JAX)
    losses: list[float]  # every full step's loss, warmup included; losses[0] is at the init
    full_steps: int
    n_params: int
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    batch_bytes: int
    peak_bytes: int | None = None
    extra_bytes: int | None = None  # peak - (params + grads + state + batch)
    opt_extra_bytes: int | None = None  # optimizer step alone, above params + grads + state
    pipelined_s: float | None = None  # median per step of the back-to-back blocks
    pipelined_times_s: list[float] | None = None  # per step, one per block


PIPELINE_BLOCK = 4  # steps per synchronisation in the pipelined timing


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q25, _, q75 = statistics.quantiles(times, n=4, method="inclusive")
    return q25, statistics.median(times), q75


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, which must wait for its own work."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _timed_row(
    times: list[float], piped: list[float], opt_times: list[float], losses: list, **fields
) -> Row:
    """A :class:`Row` from the full steps' ``times`` (quartiles), the pipelined ``piped``
    (median), the optimizer-alone ``opt_times`` (median, and its share of the full step's
    median) and the ``losses``; ``fields`` are the rest of the row."""
    q25, median, q75 = _quartiles(times)
    opt_median = statistics.median(opt_times)
    return Row(
        pipelined_s=statistics.median(piped),
        pipelined_times_s=piped,
        median_s=median,
        q25_s=q25,
        q75_s=q75,
        times_s=times,
        opt_median_s=opt_median,
        opt_share=opt_median / median,
        losses=[float(v) for v in losses],
        **fields,
    )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_optimizer(name: str, params, device: str) -> torch.optim.Optimizer:
    """The optimizer of a torch row; every row shares lr, betas, eps and weight decay."""
    params = list(params)
    if name == "torch.optim adamw":
        impl = dict(fused=True) if device == "cuda" else dict(foreach=True)
        return torch.optim.AdamW(
            params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **impl
        )
    if name == "sf_torch adamw":
        # fused=None: sf_torch picks its fused kernel when every param is on CUDA; on the CPU
        # both rows run torch's multi-tensor ops, so that the two steps are built alike.
        impl = {} if device == "cuda" else dict(foreach=True)
        return sf_torch.AdamWScheduleFree(
            params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **impl
        )
    raise ValueError(f"torch row must be one of {TORCH_ROWS}, got {name!r}")


def _torch_impl(opt: torch.optim.Optimizer) -> str:
    """The step implementation the optimizer runs (call while grads are set)."""
    group = opt.param_groups[0]
    if isinstance(opt, sf_torch.ScheduleFreeOptimizer):
        from sf_torch import rule

        params = [p for p in group["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        grads = [p.grad for p in params]
        return rule.choose_impl(params, grads, states, group["foreach"], group["fused"])
    return "fused" if group.get("fused") else "foreach"


def torch_row(
    name: str,
    cfg: LMConfig,
    init: dict[str, np.ndarray],
    batch: tuple[np.ndarray, np.ndarray],
    device: str,
    dtype: str,
    warmup: int,
    steps: int,
    capture: dict | None = None,
) -> Row:
    """Time one torch row; ``capture`` (optional) receives the params after the full steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = build_torch_lm(cfg, init, device)
    opt = torch_optimizer(name, model.parameters(), device)
    schedule_free = isinstance(opt, sf_torch.ScheduleFreeOptimizer)
    inputs, labels = (torch.from_numpy(a).long().to(device) for a in batch)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def loss_and_backward():
        with amp:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach()

    def full_step():
        loss = loss_and_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = [full_step() for _ in range(warmup)]
    sync()
    params = list(model.parameters())
    param_bytes = _nbytes(params)
    batch_bytes = _nbytes([inputs, labels])

    def state_bytes():
        return _nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    peak = extra = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        losses.append(full_step())
        sync()
        peak = torch.cuda.max_memory_allocated()
        extra = peak - (2 * param_bytes + state_bytes() + batch_bytes)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(full_step())
        sync()
        times.append(time.perf_counter() - t0)
    piped = time_blocks(lambda: losses.append(full_step()), sync, steps, PIPELINE_BLOCK)
    full_steps = len(losses)
    if capture is not None:
        capture["params"] = torch_canonical(model)
        if schedule_free:
            capture["x"] = torch_canonical(model, opt.eval_params())

    # The optimizer alone, stepping again and again on one set of gradients.
    loss_and_backward()
    impl = _torch_impl(opt)
    sync()
    opt_extra = None
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        sync()
        opt_extra = torch.cuda.max_memory_allocated() - base
    opt_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        sync()
        opt_times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)

    switch = None
    if schedule_free:

        def round_trip():
            opt.eval()
            opt.train()
            sync()

        switch = _median_seconds(round_trip, max(3, steps))

    return _timed_row(
        times,
        piped,
        opt_times,
        losses,
        name=name,
        framework="torch",
        schedule_free=schedule_free,
        impl=impl,
        switch_s=switch,
        full_steps=full_steps,
        n_params=sum(p.numel() for p in params),
        param_bytes=param_bytes,
        grad_bytes=param_bytes,  # grads have the params' dtype and shapes
        state_bytes=state_bytes(),
        batch_bytes=batch_bytes,
        peak_bytes=peak,
        extra_bytes=extra,
        opt_extra_bytes=opt_extra,
    )


def jax_optimizer(name: str):
    """The optax transformation of a JAX row (the torch rows' hyperparameters)."""
    import optax

    import sf_optax

    b1, b2 = BETAS
    if name == "optax adamw":
        return optax.adamw(LR, b1=b1, b2=b2, eps=EPS, weight_decay=WEIGHT_DECAY)
    if name == "sf_optax adamw":
        return sf_optax.adamw(LR, b1=b1, b2=b2, eps=EPS, weight_decay=WEIGHT_DECAY)
    raise ValueError(f"JAX row must be one of {JAX_ROWS}, got {name!r}")


def jax_row(
    name: str,
    cfg: LMConfig,
    init: dict[str, np.ndarray],
    batch: tuple[np.ndarray, np.ndarray],
    device: str,
    dtype: str,
    warmup: int,
    steps: int,
    capture: dict | None = None,
) -> Row:
    """Time one JAX row; ``capture`` (optional) receives the params after the full steps."""
    import jax
    import optax
    from flax import nnx

    import sf_optax

    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    graphdef, params = build_flax_lm(cfg, init, dtype, dev)
    opt = jax_optimizer(name)
    schedule_free = name.startswith("sf_optax")
    state = opt.init(params)
    inputs, labels = (jax.device_put(a, dev) for a in batch)

    def loss_fn(params, inputs, labels):
        logits = nnx.merge(graphdef, params)(inputs).astype(jax.numpy.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(params, state, inputs, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    def opt_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, inputs, labels)
    step = step.compile()

    def nbytes(tree):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

    param_bytes, state_bytes, batch_bytes = nbytes(params), nbytes(state), inputs.nbytes * 2
    footprint = jax_extra_bytes(step, with_arguments=True)
    peak = footprint
    extra = None if peak is None else peak - (2 * param_bytes + state_bytes + batch_bytes)

    losses = []
    for _ in range(warmup):
        params, state, loss = step(params, state, inputs, labels)
        losses.append(loss)
    jax.block_until_ready((params, state))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state, loss = step(params, state, inputs, labels)
        jax.block_until_ready((params, state, loss))
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    carry = [params, state]

    def piped_step():
        carry[0], carry[1], loss = step(carry[0], carry[1], inputs, labels)
        losses.append(loss)

    piped = time_blocks(piped_step, lambda: jax.block_until_ready(carry), steps, PIPELINE_BLOCK)
    params, state = carry
    full_steps = len(losses)
    if capture is not None:
        capture["params"] = flax_canonical(params)
        if schedule_free:
            capture["x"] = flax_canonical(sf_optax.eval_params(state, params))

    # The optimizer alone, stepping again and again on one set of gradients. Its cost does not
    # depend on their values (elementwise, no data-dependent branch), so gradient-sized arrays
    # made from the params do, and spare compiling the backward pass a second time.
    grads = jax.jit(lambda p: jax.tree.map(lambda a: 1e-3 * a, p))(params)
    update = jax.jit(opt_step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    opt_footprint = jax_extra_bytes(update, with_arguments=True)
    opt_extra = None
    if opt_footprint is not None:
        opt_extra = opt_footprint - (2 * param_bytes + state_bytes)
    params, state = update(params, state, grads)  # the first call is not timed
    jax.block_until_ready((params, state))
    opt_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state = update(params, state, grads)
        jax.block_until_ready((params, state))
        opt_times.append(time.perf_counter() - t0)

    switch = None
    if schedule_free:
        to_x = jax.jit(sf_optax.eval_params).lower(state, params).compile()
        jax.block_until_ready(to_x(state, params))
        switch = _median_seconds(lambda: jax.block_until_ready(to_x(state, params)), max(3, steps))

    return _timed_row(
        times,
        piped,
        opt_times,
        losses,
        name=name,
        framework="jax",
        schedule_free=schedule_free,
        impl="jit, donated",
        switch_s=switch,
        full_steps=full_steps,
        n_params=sum(leaf.size for leaf in jax.tree.leaves(params)),
        param_bytes=param_bytes,
        grad_bytes=param_bytes,
        state_bytes=state_bytes,
        batch_bytes=batch_bytes,
        peak_bytes=peak,
        extra_bytes=extra,
        opt_extra_bytes=opt_extra,
    )


# ---------------------------------------------------------------------------------------------
# Runs


@contextlib.contextmanager
def _matmul_precision(device: str, dtype: str, matmul: str, with_jax: bool):
    """TF32 float32 matmuls on CUDA (``matmul='tf32'``) in both frameworks, restored after."""
    if device != "cuda" or dtype != "float32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if matmul == "tf32" else "highest")
    try:
        with contextlib.ExitStack() as stack:
            if with_jax:
                import jax

                precision = "tensorfloat32" if matmul == "tf32" else "highest"
                stack.enter_context(jax.default_matmul_precision(precision))
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _ratios(rows: list[Row]) -> dict:
    """Schedule-Free / AdamW per framework: full step, optimizer alone, extra memory."""
    out = {}
    for fw in ("torch", "jax"):
        by_kind = {r.schedule_free: r for r in rows if r.framework == fw}
        if set(by_kind) != {False, True}:
            continue
        plain, sf = by_kind[False], by_kind[True]
        out[fw] = {
            "step": sf.median_s / plain.median_s,
            "step_added_s": sf.median_s - plain.median_s,
            "step_pipelined": sf.pipelined_s / plain.pipelined_s,
            "step_pipelined_added_s": sf.pipelined_s - plain.pipelined_s,
            "optimizer": sf.opt_median_s / plain.opt_median_s,
            "extra_bytes_added": (
                None
                if sf.extra_bytes is None or plain.extra_bytes is None
                else sf.extra_bytes - plain.extra_bytes
            ),
        }
    return out


def run(args: argparse.Namespace, capture: dict | None = None) -> dict:
    """Every requested row; ``capture`` (optional) gets ``{row name: {"params", "x"}}``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a CUDA build of torch and a visible GPU; use 'cpu'")
    for name in ("steps", "warmup"):
        value, low = getattr(args, name), 1 if name == "steps" else 0
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    cfg = lm_config(args.size, args.batch, args.seq_len)
    init = init_params(cfg, args.seed)
    batch = make_batch(cfg, args.seed)
    names = []
    if args.framework in ("torch", "both"):
        names += [("torch", n) for n in TORCH_ROWS]
    if args.framework in ("jax", "both"):
        names += [("jax", n) for n in JAX_ROWS]
    rows, skipped = [], []
    with _matmul_precision(args.device, args.dtype, args.matmul, args.framework != "torch"):
        for fw, name in names:
            row_fn = torch_row if fw == "torch" else jax_row
            slot = None if capture is None else capture.setdefault(name, {})
            try:
                rows.append(
                    row_fn(
                        name,
                        cfg,
                        init,
                        batch,
                        args.device,
                        args.dtype,
                        args.warmup,
                        args.steps,
                        slot,
                    )
                )
            except Exception as e:  # noqa: BLE001  (one row that cannot run must not sink the rest)
                skipped.append({"name": name, "reason": f"{type(e).__name__}: {e}"})
                print(f"skipped {name}: {type(e).__name__}: {e}")
            # Torch's cached blocks go back before JAX allocates (it does not preallocate here).
            _release(args.device)
    versions = {"torch": torch.__version__}
    if args.framework != "torch":
        import flax
        import jax
        import optax

        versions |= {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__}
    return {
        "config": asdict(cfg),
        "n_params": sum(math.prod(s) for s in param_shapes(cfg).values()),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "matmul": args.matmul if args.device == "cuda" and args.dtype == "float32" else "default",
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": args.seed,
        "hyperparameters": {
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WEIGHT_DECAY,
        },
        "versions": versions,
        "rows": [asdict(r) for r in rows],
        "ratios": _ratios(rows),
        "skipped": skipped,
    }


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"LM {cfg['name']}: {result['n_params']:,} params, d={cfg['d_model']} "
        f"layers={cfg['layers']} heads={cfg['heads']} vocab={cfg['vocab']}, batch "
        f"{cfg['batch']}x{cfg['seq_len']} tokens, {result['dtype']} "
        f"(matmul {result['matmul']}), device={result['device']} ({result['device_name']}), "
        f"{result['steps']} timed steps after {result['warmup']}",
        f"{'row':<18} {'impl':<13} {'piped ms':>9} {'step ms':>9} {'IQR ms':>8} {'opt ms':>8} "
        f"{'opt %':>6} "
        f"{'switch ms':>9} {'extra MB':>9} {'opt+MB':>7} {'loss first->last':>17}",
    ]
    for r in result["rows"]:
        switch = "-" if r["switch_s"] is None else f"{r['switch_s'] * 1e3:.3f}"
        lines.append(
            f"{r['name']:<18} {r['impl']:<13} {r['pipelined_s'] * 1e3:>9.3f} "
            f"{r['median_s'] * 1e3:>9.3f} "
            f"{(r['q75_s'] - r['q25_s']) * 1e3:>8.3f} {r['opt_median_s'] * 1e3:>8.3f} "
            f"{100 * r['opt_share']:>5.1f}% {switch:>9} {format_mb(r['extra_bytes']):>9} "
            f"{format_mb(r['opt_extra_bytes']):>7} "
            f"{r['losses'][0]:>8.4f}->{r['losses'][-1]:.4f}"
        )
    for fw, q in result["ratios"].items():
        added = q["extra_bytes_added"]
        added = "n/a" if added is None else f"{added / 1e6:+.1f} MB"
        lines.append(
            f"{fw}: Schedule-Free / AdamW full step, pipelined {q['step_pipelined']:.4f} "
            f"({100 * (q['step_pipelined'] - 1):+.2f}%, "
            f"{q['step_pipelined_added_s'] * 1e3:+.3f} ms), synchronised {q['step']:.4f} "
            f"({100 * (q['step'] - 1):+.2f}%, {q['step_added_s'] * 1e3:+.3f} ms), "
            f"optimizer alone {q['optimizer']:.3f}x, extra memory {added}"
        )
    lines += skipped_lines(result["skipped"], 18)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lm_step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--framework", choices=("torch", "jax", "both"), default="both")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per row (20 on cuda, 5 on cpu)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (5 on cuda, 2 on cpu)"
    )
    parser.add_argument("--batch", type=int, default=None, help="override the size's batch")
    parser.add_argument("--seq-len", type=int, default=None, help="override the context length")
    parser.add_argument(
        "--matmul",
        choices=("tf32", "fp32"),
        default="tf32",
        help="float32 matmuls on CUDA: TF32 (both frameworks) or full fp32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.device == "cuda" else 5
    if args.warmup is None:
        args.warmup = 5 if args.device == "cuda" else 2
    for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("seq_len", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    return args


def main(argv: list[str] | None = None, capture: dict | None = None) -> dict:
    args = parse_args(argv)
    result = run(args, capture)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
