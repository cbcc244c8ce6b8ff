"""Hugging Face transformers models as ready-made pairs: tiny configs built from a seed.

transformers (4.x, up to 4.57.6) ships many architectures in both PyTorch and Flax, written by
other people: a test bed for ``parity.own`` that this project did not write. Each function is a
SPEC for ``python -m parity check``::

    python -m parity check parity.own.hf:roberta
    python -m parity check parity.own.hf:vit --dtype float32

The Flax side is the linen module of the transformers model (``FlaxXxx.module``) with its
params as ``variables``; the weights both start from are the torch model's (``parity.own``
copies them over through the mapping). Dropout is off (a trajectory needs the same function
in both frameworks), and every loss is a cross entropy written out in the run's dtype.

``bug`` injects a porting mistake into the torch side so the divergence finder has something
to find: ``"layernorm_eps"`` (one LayerNorm's epsilon 1e-3 instead of the config's) or
``"gelu"`` (one MLP's GELU is the tanh approximation).

Needs ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import numpy as np

from parity.own.spec import Pair

BUGS = (None, "layernorm_eps", "gelu")
# Where each architecture gets the injected bug (torch module names).
BUG_SITES = {
    "roberta": {
        "layernorm_eps": "roberta.encoder.layer.1.attention.output.LayerNorm",
        "gelu": "roberta.encoder.layer.0.intermediate",
    },
    "vit": {
        "layernorm_eps": "vit.encoder.layer.1.layernorm_before",
        "gelu": "vit.encoder.layer.0.intermediate",
    },
    "electra": {
        "layernorm_eps": "electra.encoder.layer.0.output.LayerNorm",
        "gelu": "electra.encoder.layer.1.intermediate",
    },
}
TEXT = dict(vocab=64, seq=12, batch=4)
IMAGE = dict(size=8, patch=4, channels=3, classes=5, batch=4)


def _frameworks(dtype: str):
    import jax.numpy as jnp
    import torch

    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    torch.set_num_threads(1)
    return torch, jnp, getattr(jnp, dtype)


def _inject(torch_model, arch: str, bug: str | None) -> None:
    if bug not in BUGS:
        raise ValueError(f"bug must be one of {BUGS}, got {bug!r}")
    if bug is None:
        return
    module = torch_model.get_submodule(BUG_SITES[arch][bug])
    if bug == "layernorm_eps":
        module.eps = 1e-3
    else:
        import torch

        # a module, not a function: the attribute is a registered child of the MLP
        module.intermediate_act_fn = torch.nn.GELU(approximate="tanh")


def _text_batches(seed: int, n: int, vocab: int, seq: int, batch: int, segments: bool):
    """Token ids, a padding mask (some rows end in padding) and a label per position (-100:
    ignored, as transformers' torch losses do)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, size=(batch, seq))
        lengths = rng.integers(seq // 2, seq + 1, size=batch)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, ids, 1)  # 1: the padding token of these configs
        labels = np.where(mask == 1, rng.integers(3, vocab, size=(batch, seq)), -100)
        item = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if segments:
            item["token_type_ids"] = np.zeros_like(ids)
        out.append(item)
    return out


def _torch_token_loss(logits, labels):
    import torch

    keep = labels != -100
    logp = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def _jax_token_loss(logits, labels):
    import jax
    import jax.numpy as jnp

    keep = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return -(picked * keep).sum() / keep.sum()


def _masked_lm(arch, config_cls, torch_cls, flax_cls, dtype, bug, seed, **sizes):
    torch, jnp, jdtype = _frameworks(dtype)
    config = config_cls(
        vocab_size=TEXT["vocab"],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TEXT["seq"] + 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
        **sizes,
    )
    torch.manual_seed(seed)
    torch_model = torch_cls(config).to(getattr(torch, dtype))
    _inject(torch_model, arch, bug)
    flax_model = flax_cls(config, seed=seed, dtype=jdtype)
    segments = arch == "electra"

    def torch_loss(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return _torch_token_loss(model(**inputs).logits, batch["labels"])

    def flax_loss(variables, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = flax_model(**inputs, params=variables["params"], train=False).logits
        return _jax_token_loss(logits, batch["labels"])

    batches = _text_batches(seed, 8, TEXT["vocab"], TEXT["seq"], TEXT["batch"], segments)
    evals = _text_batches(seed + 1, 2, TEXT["vocab"], TEXT["seq"], TEXT["batch"], segments)
    return Pair(
        torch_model=torch_model,
        flax_model=flax_model.module,
        variables={"params": flax_model.params},
        torch_loss=torch_loss,
        flax_loss=flax_loss,
        batches=batches,
        eval_batches=evals,
        name=f"{arch} ({dtype}{', bug ' + bug if bug else ''})",
        notes={"bug_site": BUG_SITES[arch].get(bug)} if bug else {},
    )


def roberta(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """RobertaForMaskedLM and FlaxRobertaForMaskedLM: 2 layers, width 32, tied decoder."""
    from transformers import FlaxRobertaForMaskedLM, RobertaConfig, RobertaForMaskedLM

    return _masked_lm(
        "roberta", RobertaConfig, RobertaForMaskedLM, FlaxRobertaForMaskedLM, dtype, bug, seed
    )


def electra(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """ElectraForMaskedLM (the generator) and its Flax twin: embeddings of width 16 projected
    to 32, tied output embedding."""
    from transformers import ElectraConfig, ElectraForMaskedLM, FlaxElectraForMaskedLM

    return _masked_lm(
        "electra",
        ElectraConfig,
        ElectraForMaskedLM,
        FlaxElectraForMaskedLM,
        dtype,
        bug,
        seed,
        embedding_size=16,
    )


def vit(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """ViTForImageClassification and its Flax twin: 8x8 images, 4x4 patches (a conv), 2 layers."""
    from transformers import FlaxViTForImageClassification, ViTConfig, ViTForImageClassification

    torch, jnp, jdtype = _frameworks(dtype)
    config = ViTConfig(
        image_size=IMAGE["size"],
        patch_size=IMAGE["patch"],
        num_channels=IMAGE["channels"],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=IMAGE["classes"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    torch_model = ViTForImageClassification(config).to(getattr(torch, dtype))
    _inject(torch_model, "vit", bug)
    flax_model = FlaxViTForImageClassification(config, seed=seed, dtype=jdtype)

    def torch_loss(model, batch):
        logits = model(pixel_values=batch["pixel_values"]).logits
        return _torch_token_loss(logits, batch["labels"])

    def flax_loss(variables, batch):
        logits = flax_model(batch["pixel_values"], params=variables["params"], train=False).logits
        return _jax_token_loss(logits, batch["labels"])

    def images(seed, n):
        rng = np.random.default_rng(seed)
        shape = (IMAGE["batch"], IMAGE["channels"], IMAGE["size"], IMAGE["size"])
        return [
            {
                # NCHW in both (the Flax model transposes); values float32 holds exactly, as
                # transformers' Flax ViT casts pixel_values to float32 before its first layer
                "pixel_values": rng.normal(size=shape).astype(np.float32).astype(np.float64),
                "labels": rng.integers(0, IMAGE["classes"], size=IMAGE["batch"]),
            }
            for _ in range(n)
        ]

    return Pair(
        torch_model=torch_model,
        flax_model=flax_model.module,
        variables={"params": flax_model.params},
        torch_loss=torch_loss,
        flax_loss=flax_loss,
        batches=images(seed, 8),
        eval_batches=images(seed + 1, 2),
        name=f"vit ({dtype}{', bug ' + bug if bug else ''})",
        notes={"bug_site": BUG_SITES["vit"].get(bug)} if bug else {},
    )
