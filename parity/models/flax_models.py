"""The twin models in flax.nnx (NHWC), built from canonical parameters.

Linear, Conv, Embed and LayerNorm are flax's own layers; BatchNorm and attention are written
out here, line for line as in ``torch_models.py``, so that both frameworks compute the same
formula (torch's BatchNorm keeps an unbiased running variance, flax's a biased one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from parity.models import canonical


class BatchNorm(nnx.Module):
    """Batch normalization over N, H, W of NHWC inputs.

    Training: normalizes with the batch's mean and biased variance and moves the running
    statistics by ``running = (1 - momentum) running + momentum batch``. With
    ``use_running_average`` it normalizes with the running statistics instead.
    """

    def __init__(self, features: int, dtype, momentum: float = 0.1, epsilon: float = 1e-5):
        self.scale = nnx.Param(jnp.ones(features, dtype))
        self.bias = nnx.Param(jnp.zeros(features, dtype))
        self.mean = nnx.BatchStat(jnp.zeros(features, dtype))
        self.var = nnx.BatchStat(jnp.ones(features, dtype))
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = x.mean(axis=(0, 1, 2))
            centered = x - mean
            var = (centered * centered).mean(axis=(0, 1, 2))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var)
        return (x - mean) / jnp.sqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


class MLP(nnx.Module):
    """64 pixels -> hidden (ReLU) -> 10 logits."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        s = canonical.MLP
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.hidden = nnx.Linear(s["inputs"], s["hidden"], **kw)
        self.out = nnx.Linear(s["hidden"], s["classes"], **kw)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


class CNN(nnx.Module):
    """(N, 8, 8, 1) -> [3x3 conv, BatchNorm, SiLU] x 2 -> 2x2 average pool -> dense -> 10.

    The convolutions have no bias: BatchNorm subtracts it again.
    """

    def __init__(self, dtype, rngs: nnx.Rngs):
        c1, c2 = canonical.CNN["channels"]
        kw = dict(padding="SAME", use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(1, c1, (3, 3), **kw)
        self.bn1 = BatchNorm(c1, dtype)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), **kw)
        self.bn2 = BatchNorm(c2, dtype)
        pooled = (canonical.CNN["image"] // 2) ** 2 * c2
        self.out = nnx.Linear(
            pooled, canonical.CNN["classes"], dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        h = jax.nn.silu(self.bn1(self.conv1(x)))
        h = jax.nn.silu(self.bn2(self.conv2(h)))
        n, height, width, c = h.shape
        h = h.reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))
        return self.out(h.reshape(n, -1))  # flattened in (H, W, C) order


class CausalSelfAttention(nnx.Module):
    def __init__(self, dtype, rngs: nnx.Rngs, config: dict | None = None, compute_dtype=None):
        s = canonical.lm_sizes(config)
        d = s["width"]
        self.heads = s["heads"]
        self.fused = s["fused_attention"]
        kw = dict(dtype=compute_dtype or dtype, param_dtype=dtype, rngs=rngs)
        self.query = nnx.Linear(d, d, **kw)
        self.key = nnx.Linear(d, d, use_bias=False, **kw)  # softmax ignores a key bias
        self.value = nnx.Linear(d, d, **kw)
        self.out = nnx.Linear(d, d, **kw)

    def __call__(self, h):
        b, t, d = h.shape
        dh = d // self.heads
        if self.fused:  # heads on axis 2, as dot_product_attention takes them
            q, k, v = (
                a.reshape(b, t, self.heads, dh) for a in (self.query(h), self.key(h), self.value(h))
            )
            return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d))

        def split_heads(a):  # (B, T, D) -> (B, heads, T, dh)
            return a.reshape(b, t, self.heads, dh).transpose(0, 2, 1, 3)

        q, k, v = split_heads(self.query(h)), split_heads(self.key(h)), split_heads(self.value(h))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1)
        mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.out(mixed)


class Block(nnx.Module):
    """Pre-norm: h + attn(ln1(h)), then h + mlp_out(gelu(mlp_in(ln2(h))))."""

    def __init__(self, dtype, rngs: nnx.Rngs, config: dict | None = None, compute_dtype=None):
        s = canonical.lm_sizes(config)
        d, m = s["width"], s["mlp"]
        kw = dict(dtype=compute_dtype or dtype, param_dtype=dtype, rngs=rngs)
        ln = dict(epsilon=1e-5, use_fast_variance=False, **kw)
        self.ln1 = nnx.LayerNorm(d, **ln)
        self.attn = CausalSelfAttention(dtype, rngs, s, compute_dtype)
        self.ln2 = nnx.LayerNorm(d, **ln)
        self.mlp_in = nnx.Linear(d, m, **kw)
        self.mlp_out = nnx.Linear(m, d, **kw)

    def __call__(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(h)), approximate=False))


class LM(nnx.Module):
    """Tokens (B, T) -> next-token logits (B, T, vocab): embeddings, blocks, LayerNorm, head.

    ``config`` holds the sizes and options (``canonical.lm_sizes``); the default is the parity
    twin's ``canonical.LM``. ``compute_dtype`` (default ``dtype``) is mixed precision: params
    in ``dtype``, layers computing in ``compute_dtype``; the residual stream keeps the params'
    dtype, as under torch's autocast.
    """

    def __init__(self, dtype, rngs: nnx.Rngs, config: dict | None = None, compute_dtype=None):
        s = canonical.lm_sizes(config)
        kw = dict(dtype=compute_dtype or dtype, param_dtype=dtype, rngs=rngs)
        self.embed = nnx.Embed(s["vocab"], s["width"], **kw)
        self.pos = nnx.Param(jnp.zeros((s["seq"], s["width"]), dtype))
        self.blocks = nnx.List([Block(dtype, rngs, s, compute_dtype) for _ in range(s["layers"])])
        self.ln_f = nnx.LayerNorm(s["width"], epsilon=1e-5, use_fast_variance=False, **kw)
        self.head = None if s["tied"] else nnx.Linear(s["width"], s["vocab"], **kw)

    def __call__(self, tokens):
        h = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return self.embed.attend(h) if self.head is None else self.head(h)


_CLASSES = {"mlp": MLP, "cnn": CNN, "lm": LM}


def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over every label (every token for the LM); bfloat16 logits are
    taken to float32 first (mixed precision: a bf16 loss has 3 significant digits)."""
    if logits.dtype == jnp.bfloat16:
        logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# -- canonical <-> flax ---------------------------------------------------------------------------


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _names_and_treedef(state: nnx.State):
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    # Each leaf's path ends in the variable's `.value`; the canonical name is the part before.
    names = [_name(path[:-1]) for path, _ in leaves_with_path]
    return names, treedef


def build(
    model: str,
    params: dict,
    buffers: dict | None = None,
    dtype=jnp.float32,
    lm: dict | None = None,
    compute_dtype=None,
) -> nnx.Module:
    """The flax twin of ``model`` holding the canonical ``params`` (and BatchNorm ``buffers``).

    ``lm``: the LM's sizes and options (``canonical.lm_sizes``), for ``model == "lm"`` only;
    default ``canonical.LM``. ``compute_dtype``: the LM's, as in :class:`LM`.
    """
    canonical.param_shapes(model, lm)  # a bad model or bad sizes: ValueError before building
    if compute_dtype is not None and model != "lm":
        raise ValueError(f"compute_dtype applies to model 'lm' only, got model {model!r}")
    args = (lm, compute_dtype) if model == "lm" else ()
    # Shapes only: every value is filled in below, and a random init of a GPT-2-sized LM would
    # cost seconds (one compiled initializer per shape).
    abstract = nnx.eval_shape(lambda: _CLASSES[model](dtype, nnx.Rngs(0), *args))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    state = to_state(state, params, dtype)
    rest = to_state(rest, buffers or canonical.init_buffers(model), dtype)
    return nnx.merge(graphdef, state, rest)


def to_state(template: nnx.State, values: dict, dtype=None) -> nnx.State:
    """A state shaped like ``template`` whose leaves are the canonical ``values``."""
    names, treedef = _names_and_treedef(template)
    missing = sorted(set(names) - set(values))
    extra = sorted(set(values) - set(names))
    if missing or extra:
        raise KeyError(
            f"canonical names do not match the flax model: missing {missing}, extra {extra}"
        )
    leaves = [jnp.asarray(values[n], dtype=dtype) for n in names]
    return jax.tree.unflatten(treedef, leaves)


def from_state(state: nnx.State) -> dict:
    """``{canonical name: array}`` of a flax state (arrays stay on their devices)."""
    names, _ = _names_and_treedef(state)
    return dict(zip(names, jax.tree.leaves(state)))


def split(module: nnx.Module):
    """``(graphdef, params, rest)`` with ``params`` a plain ``{canonical name: array}`` dict.

    The dict is what the optimizer sees; :func:`apply` puts it back into the module.
    """
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    names, treedef = _names_and_treedef(state)
    return (graphdef, names, treedef), from_state(state), rest


def merge(graph, params: dict, rest: nnx.State) -> nnx.Module:
    graphdef, names, treedef = graph
    state = jax.tree.unflatten(treedef, [params[n] for n in names])
    # Fresh variables: those inside `rest` belong to the caller's trace, and BatchNorm writes.
    return nnx.merge(graphdef, state, rest, copy=True)


def set_batch_stats_mode(module: nnx.Module, *, use_running_average: bool, momentum=None):
    """Switch every BatchNorm between batch and running statistics (and set its momentum)."""
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, BatchNorm):
            sub.use_running_average = use_running_average
            if momentum is not None:
                sub.momentum = momentum


def has_batch_norm(module: nnx.Module) -> bool:
    return any(isinstance(sub, BatchNorm) for _, sub in nnx.iter_modules(module))


def recalibrate(module: nnx.Module, batches) -> None:
    """Running statistics := the average over ``batches`` of each batch's statistics.

    Runs the batches with momentum ``1 / (i + 1)``, a cumulative average whose first batch
    overwrites what was there; the model is left using its running statistics.
    """
    for i, inputs in enumerate(batches):
        set_batch_stats_mode(module, use_running_average=False, momentum=1.0 / (i + 1))
        module(inputs)
    set_batch_stats_mode(module, use_running_average=True, momentum=0.1)
