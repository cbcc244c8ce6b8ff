"""The three twin models in one framework-neutral place: sizes, parameter names and layout, init.

Parameters live in a *canonical layout*, a flat ``{name: numpy array}`` dict that both framework
definitions convert to and from. The canonical layout is the one of the math ``x @ W + b``:

- dense kernels are ``(in, out)`` (a ``torch.nn.Linear`` weight is the transpose, ``(out, in)``);
- conv kernels are ``(kh, kw, in, out)`` (HWIO; torch's ``Conv2d`` weight is OIHW);
- images are NHWC (torch computes in NCHW);
- norms hold ``scale`` and ``bias`` (torch calls the scale ``weight``), embeddings
  ``(vocab, width)`` in both.

Names are the flax.nnx state paths joined by dots (``blocks.0.attn.query.kernel``); the torch
name of each parameter comes from :func:`torch_name`. Nothing here imports jax or torch.
"""

from __future__ import annotations

import numpy as np

MODELS = ("mlp", "cnn", "lm")

# Sizes, fixed so that a run is one seed away from being reproduced. No parameter may have a
# gradient that is zero in exact arithmetic (a conv bias before BatchNorm, an attention key
# bias): Adam would blow its round-off up to full-size steps that differ between frameworks.
MLP = dict(inputs=64, hidden=64, classes=10)
CNN = dict(image=8, channels=(8, 16), classes=10)  # conv-BN-SiLU twice, 2x2 avg pool, dense
LM = dict(vocab=32, width=32, layers=2, heads=2, seq=16, mlp=128)
# What bench.lm_step's GPT-2-like LMs need and the parity twin leaves off: the output head is the
# embedding (no head params), and attention runs as the frameworks' fused causal kernels
# (flash-style, no (T, T) scores kept) instead of the written-out formula.
LM_OPTIONS = dict(tied=False, fused_attention=False)


def lm_sizes(lm: dict | None = None) -> dict:
    """The LM's sizes and options: ``lm`` checked, or the parity twin's :data:`LM` when None.

    Args:
      lm: ``{vocab, width, layers, heads, seq, mlp}``, positive integers with ``width`` a
        multiple of ``heads`` (each head has ``width / heads`` dimensions), and optionally the
        booleans of :data:`LM_OPTIONS`.

    Returns:
      The sizes and every option (absent ones at their defaults) as a new dict.
    """
    if lm is None:
        return LM | LM_OPTIONS
    if not isinstance(lm, dict) or not set(LM) <= set(lm) <= set(LM) | set(LM_OPTIONS):
        got = sorted(lm) if isinstance(lm, dict) else type(lm).__name__
        raise ValueError(
            f"lm must be a dict with exactly the keys {sorted(LM)} (and optionally "
            f"{sorted(LM_OPTIONS)}), got {got}"
        )
    bad = {
        k: v
        for k, v in lm.items()
        if k in LM and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1)
    }
    if bad:
        raise ValueError(f"lm sizes must be integers >= 1, got {bad}")
    bad = {k: v for k, v in lm.items() if k in LM_OPTIONS and not isinstance(v, bool)}
    if bad:
        raise ValueError(f"lm options must be booleans, got {bad}")
    if lm["width"] % lm["heads"]:
        raise ValueError(
            f"lm width must be a multiple of heads, got width {lm['width']}, heads {lm['heads']}"
        )
    return LM_OPTIONS | {k: v if k in LM_OPTIONS else int(v) for k, v in lm.items()}


def param_shapes(model: str, lm: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``model`` and its canonical shape, in a fixed order.

    ``lm`` gives the LM's sizes (see :func:`lm_sizes`; default :data:`LM`); the other models
    have fixed sizes and take none.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if lm is not None and model != "lm":
        raise ValueError(f"lm sizes apply to model 'lm' only, got model {model!r}")
    if model == "mlp":
        i, h, c = MLP["inputs"], MLP["hidden"], MLP["classes"]
        return {
            "hidden.kernel": (i, h),
            "hidden.bias": (h,),
            "out.kernel": (h, c),
            "out.bias": (c,),
        }
    if model == "cnn":
        c1, c2 = CNN["channels"]
        pooled = (CNN["image"] // 2) ** 2 * c2
        return {
            "conv1.kernel": (3, 3, 1, c1),
            "bn1.scale": (c1,),
            "bn1.bias": (c1,),
            "conv2.kernel": (3, 3, c1, c2),
            "bn2.scale": (c2,),
            "bn2.bias": (c2,),
            "out.kernel": (pooled, CNN["classes"]),
            "out.bias": (CNN["classes"],),
        }
    s = lm_sizes(lm)
    v, d, m = s["vocab"], s["width"], s["mlp"]
    shapes = {"embed.embedding": (v, d), "pos": (s["seq"], d)}
    for layer in range(s["layers"]):
        b = f"blocks.{layer}."
        shapes |= {b + "ln1.scale": (d,), b + "ln1.bias": (d,)}
        for proj in ("query", "key", "value", "out"):
            shapes |= {b + f"attn.{proj}.kernel": (d, d)}
            if proj != "key":  # softmax is blind to a key bias: its gradient is zero
                shapes |= {b + f"attn.{proj}.bias": (d,)}
        shapes |= {b + "ln2.scale": (d,), b + "ln2.bias": (d,)}
        shapes |= {b + "mlp_in.kernel": (d, m), b + "mlp_in.bias": (m,)}
        shapes |= {b + "mlp_out.kernel": (m, d), b + "mlp_out.bias": (d,)}
    shapes |= {"ln_f.scale": (d,), "ln_f.bias": (d,)}
    if not s["tied"]:
        shapes |= {"head.kernel": (d, v), "head.bias": (v,)}
    return shapes


def buffer_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Non-trained state (BatchNorm's running statistics), canonical names and shapes."""
    if model != "cnn":
        return {}
    out = {}
    for i, c in enumerate(CNN["channels"], start=1):
        out |= {f"bn{i}.mean": (c,), f"bn{i}.var": (c,)}
    return out


def init_params(model: str, seed: int, lm: dict | None = None) -> dict[str, np.ndarray]:
    """Initial parameters in float64, drawn by numpy from ``seed`` (LeCun-normal kernels).

    ``lm``: the LM's sizes and options as in :func:`param_shapes`. A tied embedding is the
    output head's kernel too and is drawn as one (fan-in ``width``), so the logits start near 0.
    """
    rng = np.random.default_rng([seed, 0])
    tied = model == "lm" and lm_sizes(lm)["tied"]
    params = {}
    for name, shape in param_shapes(model, lm).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "kernel" or (leaf == "embedding" and tied):
            fan_in = int(np.prod(shape[:-1])) if leaf == "kernel" else shape[1]
            params[name] = rng.normal(size=shape) / np.sqrt(fan_in)
        elif leaf in ("embedding", "pos"):
            params[name] = rng.normal(size=shape) * 0.5
        elif leaf == "scale":
            params[name] = np.ones(shape)
        else:  # biases start at small random values so that their gradients are not special
            params[name] = rng.normal(size=shape) * 0.01
    return params


def init_buffers(model: str) -> dict[str, np.ndarray]:
    """BatchNorm running statistics at their usual start: mean 0, variance 1."""
    return {
        name: (np.zeros(shape) if name.endswith(".mean") else np.ones(shape))
        for name, shape in buffer_shapes(model).items()
    }


def cast(tree: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=dtype) for name, value in tree.items()}


# -- torch layout -------------------------------------------------------------------------------

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(name: str) -> str:
    """The torch ``named_parameters()`` / ``named_buffers()`` name of a canonical name."""
    head, _, leaf = name.rpartition(".")
    leaf = _TORCH_LEAF.get(leaf, leaf)
    return f"{head}.{leaf}" if head else leaf


def to_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    """Canonical -> torch: dense kernels transposed, conv kernels HWIO -> OIHW."""
    if name.endswith(".kernel"):
        if array.ndim == 2:
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:
            return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
        raise ValueError(f"{name}: a kernel must have 2 or 4 dimensions, got {array.shape}")
    return array


def from_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    """Torch -> canonical, the inverse of :func:`to_torch_layout`."""
    if name.endswith(".kernel"):
        if array.ndim == 2:
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:
            return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
        raise ValueError(f"{name}: a kernel must have 2 or 4 dimensions, got {array.shape}")
    return array


def images_to_torch(images: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW for the CNN's inputs; other inputs pass unchanged."""
    if images.ndim == 4:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return images
