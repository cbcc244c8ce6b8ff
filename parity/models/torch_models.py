"""The twin models in torch (NCHW), built from canonical parameters.

Each module mirrors its flax twin in ``flax_models.py`` line for line; BatchNorm and attention
are written out in both so that the formula is the same. Parameter names follow
``canonical.torch_name`` and layouts ``canonical.to_torch_layout``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parity.models import canonical


class BatchNorm(nn.Module):
    """Batch normalization over N, H, W of NCHW inputs, as ``flax_models.BatchNorm``.

    ``self.training`` selects batch statistics (and moves the running ones by
    ``running = (1 - momentum) running + momentum batch``, biased variance) or running ones.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        self.momentum = momentum
        self.eps = eps
        # Data parallel: each rank holds an equal share of the batch; with this set, batch
        # statistics are averaged over the ranks (differentiably), so they are the whole batch's.
        self.sync_ranks = False

    def _batch_mean(self, a: torch.Tensor) -> torch.Tensor:
        mean = a.mean(dim=(0, 2, 3))
        if self.sync_ranks:
            from torch.distributed.nn.functional import all_reduce

            mean = all_reduce(mean) / torch.distributed.get_world_size()
        return mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        if self.training:
            mean = self._batch_mean(x)
            centered = x - mean.view(shape)
            var = self._batch_mean(centered * centered)
            m = self.momentum
            with torch.no_grad():
                self.mean.copy_((1 - m) * self.mean + m * mean)
                self.var.copy_((1 - m) * self.var + m * var)
        else:
            mean, var = self.mean, self.var
        normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return normed * self.weight.view(shape) + self.bias.view(shape)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        s = canonical.MLP
        self.hidden = nn.Linear(s["inputs"], s["hidden"])
        self.out = nn.Linear(s["hidden"], s["classes"])

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


class CNN(nn.Module):
    """(N, 1, 8, 8) -> [3x3 conv, BatchNorm, SiLU] x 2 -> 2x2 average pool -> dense -> 10.

    SiLU, not ReLU: after BatchNorm many pre-activations sit near 0, and a ReLU kink turns a
    1e-7 float32 difference into a flipped mask and a visibly different trajectory (seen with
    every backend, DeepSpeed or not); a smooth activation keeps float32 parity meaningful.
    """

    def __init__(self):
        super().__init__()
        c1, c2 = canonical.CNN["channels"]
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(c2)
        pooled = (canonical.CNN["image"] // 2) ** 2 * c2
        self.out = nn.Linear(pooled, canonical.CNN["classes"])

    def forward(self, x):
        h = F.silu(self.bn1(self.conv1(x)))
        h = F.silu(self.bn2(self.conv2(h)))
        h = F.avg_pool2d(h, 2)
        # Flatten in (H, W, C) order, as the NHWC twin does, so that the dense kernels match.
        return self.out(h.permute(0, 2, 3, 1).flatten(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: dict | None = None):
        super().__init__()
        s = canonical.lm_sizes(config)
        d = s["width"]
        self.heads = s["heads"]
        self.fused = s["fused_attention"]
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)  # softmax ignores a key bias
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, h):
        b, t, d = h.shape
        dh = d // self.heads

        def split_heads(a):  # (B, T, D) -> (B, heads, T, dh)
            return a.reshape(b, t, self.heads, dh).permute(0, 2, 1, 3)

        q, k, v = split_heads(self.query(h)), split_heads(self.key(h)), split_heads(self.value(h))
        if self.fused:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(mixed.permute(0, 2, 1, 3).reshape(b, t, d))
        scores = q @ k.permute(0, 1, 3, 2) / math.sqrt(dh)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=h.device))
        scores = scores.masked_fill(~causal, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        mixed = (weights @ v).permute(0, 2, 1, 3).reshape(b, t, d)
        return self.out(mixed)


class Block(nn.Module):
    """Pre-norm: ``h + attn(ln1(h))``, then ``h + mlp_out(gelu(mlp_in(ln2(h))))``."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        s = canonical.lm_sizes(config)
        d, m = s["width"], s["mlp"]
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = CausalSelfAttention(s)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp_in = nn.Linear(d, m)
        self.mlp_out = nn.Linear(m, d)

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp_out(F.gelu(self.mlp_in(self.ln2(h))))


class LM(nn.Module):
    """Tokens (B, T) -> next-token logits (B, T, vocab).

    ``config`` holds the sizes and options (``canonical.lm_sizes``); the default is the parity
    twin's ``canonical.LM``.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        s = canonical.lm_sizes(config)
        self.embed = nn.Embedding(s["vocab"], s["width"])
        self.pos = nn.Parameter(torch.zeros(s["seq"], s["width"]))
        self.blocks = nn.ModuleList([Block(s) for _ in range(s["layers"])])
        self.ln_f = nn.LayerNorm(s["width"], eps=1e-5)
        self.head = None if s["tied"] else nn.Linear(s["width"], s["vocab"])

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)


_CLASSES = {"mlp": MLP, "cnn": CNN, "lm": LM}


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every label (every token for the LM); bfloat16 logits are
    taken to float32 first (mixed precision: a bf16 loss has 3 significant digits)."""
    if logits.dtype == torch.bfloat16:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# -- canonical <-> torch --------------------------------------------------------------------------


def _check_names(model: str, module: nn.Module, lm: dict | None = None) -> None:
    expected = {canonical.torch_name(n) for n in canonical.param_shapes(model, lm)}
    expected |= {canonical.torch_name(n) for n in canonical.buffer_shapes(model)}
    found = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    if expected != found:
        raise KeyError(
            f"canonical names do not match the torch {model}: missing {sorted(expected - found)},"
            f" extra {sorted(found - expected)}"
        )


def build(
    model: str,
    params: dict,
    buffers: dict | None = None,
    dtype=torch.float32,
    lm: dict | None = None,
) -> nn.Module:
    """The torch twin of ``model`` holding the canonical ``params`` (and BatchNorm ``buffers``).

    ``lm``: the LM's sizes and options (``canonical.lm_sizes``), for ``model == "lm"`` only;
    default ``canonical.LM``.
    """
    canonical.param_shapes(model, lm)  # a bad model or bad sizes: ValueError before building
    extra = (lm,) if lm is not None else ()
    module = _CLASSES[model](*extra).to(dtype)
    _check_names(model, module, lm)
    load(module, params, buffers)
    return module


@torch.no_grad()
def load(module: nn.Module, params: dict, buffers: dict | None = None) -> None:
    """Copy canonical ``params`` (and ``buffers``) into ``module``, converting the layout."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, value in {**params, **(buffers or {})}.items():
        target = tensors[canonical.torch_name(name)]
        value = canonical.to_torch_layout(name, np.asarray(value))
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{name}: canonical shape {value.shape} is not torch's {target.shape}")
        target.copy_(torch.from_numpy(value))


def param_names(model: str, module: nn.Module, lm: dict | None = None) -> list[str]:
    """Canonical names in the order of ``module.parameters()`` (the optimizer's order); ``lm``
    as in :func:`build`."""
    by_torch = {canonical.torch_name(n): n for n in canonical.param_shapes(model, lm)}
    return [by_torch[n] for n, _ in module.named_parameters()]


def to_canonical(
    model: str, module: nn.Module, tensors=None, lm: dict | None = None
) -> dict[str, np.ndarray]:
    """``{canonical name: numpy}`` of the params (or of ``tensors``, in parameter order);
    ``lm`` as in :func:`build`."""
    names = param_names(model, module, lm)
    if tensors is None:
        tensors = [p for p in module.parameters()]
    return {n: canonical.from_torch_layout(n, _numpy(t)) for n, t in zip(names, tensors)}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy; bfloat16 (which numpy lacks) as the float32 of the same value."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().copy()


def buffers_to_canonical(model: str, module: nn.Module) -> dict[str, np.ndarray]:
    tensors = dict(module.named_buffers())
    return {n: _numpy(tensors[canonical.torch_name(n)]) for n in canonical.buffer_shapes(model)}


def inputs_to_torch(inputs: np.ndarray, device=None, dtype=None) -> torch.Tensor:
    """Canonical inputs (NHWC images, flat pixels or tokens) as a torch tensor (NCHW images)."""
    array = canonical.images_to_torch(inputs)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_floating_point() and dtype is not None:
        tensor = tensor.to(dtype)
    if not tensor.is_floating_point():
        tensor = tensor.long()
    return tensor.to(device) if device is not None else tensor


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, BatchNorm) for m in module.modules())


@torch.no_grad()
def recalibrate(module: nn.Module, batches) -> None:
    """Running statistics := the average over ``batches`` of each batch's statistics.

    Runs the batches with momentum ``1 / (i + 1)`` (a cumulative average whose first batch
    overwrites what was there); the module is left in eval mode, using those statistics.
    """
    norms = [m for m in module.modules() if isinstance(m, BatchNorm)]
    module.train()
    for i, inputs in enumerate(batches):
        for m in norms:
            m.momentum = 1.0 / (i + 1)
        module(inputs)
    for m in norms:
        m.momentum = 0.1
    module.eval()
