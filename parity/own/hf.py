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

:func:`regnet` is a pair that does NOT agree: transformers' Flax RegNet runs the BatchNorms
of each layer's main branch on their running averages in training (see its docstring and the
figures there); ``parity.own.divergence`` names that BatchNorm and says so.

``bug`` injects a porting mistake into the torch side so the divergence finder has something
to find: ``"layernorm_eps"`` (one LayerNorm's epsilon 1e-3 instead of the config's) or
``"gelu"`` (one MLP's GELU is the tanh approximation).

Needs ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import numpy as np

from parity.own.spec import Pair

SMALL = dict(vocab=64, seq=8, batch=2)  # the sequence models added for other architectures

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
    # no "gelu" site: GPT-2 already uses the tanh GELU, BART's and ResNet's activations are
    # functions or modules of other names
    "gpt2": {"layernorm_eps": "transformer.h.1.ln_2"},
    "bart": {"layernorm_eps": "model.decoder.layers.0.encoder_attn_layer_norm"},
    "resnet": {},
    "regnet": {},
    "wav2vec2": {},
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
    if bug not in BUG_SITES[arch]:
        raise ValueError(f"bug must be one of {(None, *BUG_SITES[arch])} for {arch}, got {bug!r}")
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


def _tokens(seed: int, n: int, decoder: bool):
    """Token ids with right padding (the first row full), labels per position; with ``decoder``
    also decoder ids (every label counts)."""
    rng = np.random.default_rng(seed)
    vocab, seq, batch = SMALL["vocab"], SMALL["seq"], SMALL["batch"]
    out = []
    for _ in range(n):
        lengths = rng.integers(seq // 2, seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, rng.integers(4, vocab, size=(batch, seq)), 1)
        labels = rng.integers(4, vocab, size=(batch, seq))
        item = {"input_ids": ids, "attention_mask": mask}
        if decoder:
            item["decoder_input_ids"] = rng.integers(4, vocab, size=(batch, seq))
        else:
            labels = np.where(mask == 1, labels, -100)
        item["labels"] = labels
        out.append(item)
    return out


def _sequence_pair(arch, torch_model, flax_model, dtype, bug, seed, decoder):
    def torch_loss(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return _torch_token_loss(model(**inputs).logits, batch["labels"])

    def flax_loss(variables, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = flax_model(**inputs, params=variables["params"], train=False).logits
        return _jax_token_loss(logits, batch["labels"])

    return Pair(
        torch_model=torch_model,
        flax_model=flax_model.module,
        variables={"params": flax_model.params},
        torch_loss=torch_loss,
        flax_loss=flax_loss,
        batches=_tokens(seed, 4, decoder),
        eval_batches=_tokens(seed + 1, 1, decoder),
        name=f"{arch} ({dtype}{', bug ' + bug if bug else ''})",
        notes={"bug_site": BUG_SITES[arch].get(bug)} if bug else {},
    )


def gpt2(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """GPT2LMHeadModel and FlaxGPT2LMHeadModel: 2 layers, width 32, tied head. torch's Conv1D
    keeps its weight (in, out) and transformers' Flax Conv1D its kernel (out, in): the mapping
    transposes them, a square one (``attn.c_proj``) by the layout of the non-square ones."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel

    torch, jnp, jdtype = _frameworks(dtype)
    config = GPT2Config(
        vocab_size=SMALL["vocab"],
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    torch_model = GPT2LMHeadModel(config).to(getattr(torch, dtype))
    _inject(torch_model, "gpt2", bug)
    flax_model = FlaxGPT2LMHeadModel(config, seed=seed, dtype=jdtype)
    return _sequence_pair("gpt2", torch_model, flax_model, dtype, bug, seed, decoder=False)


def bart(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """BartForConditionalGeneration and its Flax twin: an encoder and a decoder of 2 layers
    each, width 32, embeddings shared by both and the head. ``final_logits_bias`` is a torch
    buffer and a Flax param: mapped by its name, held fixed in both (``parity.own.check``)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        FlaxBartForConditionalGeneration,
    )

    torch, jnp, jdtype = _frameworks(dtype)
    config = BartConfig(
        vocab_size=SMALL["vocab"],
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    torch_model = BartForConditionalGeneration(config).to(getattr(torch, dtype))
    _inject(torch_model, "bart", bug)
    flax_model = FlaxBartForConditionalGeneration(config, seed=seed, dtype=jdtype)
    return _sequence_pair("bart", torch_model, flax_model, dtype, bug, seed, decoder=True)


def resnet(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """ResNetForImageClassification and its Flax twin: bottleneck blocks in 2 stages of width
    8 and 16, BatchNorm throughout (linen ``batch_stats``; the training loss returns their
    update, the eval loss uses the running statistics), 16x16 images."""
    from transformers import (
        FlaxResNetForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch, jnp, jdtype = _frameworks(dtype)
    size, classes, batch = 16, 5, 4
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="bottleneck",
        num_labels=classes,
    )
    torch.manual_seed(seed)
    torch_model = ResNetForImageClassification(config).to(getattr(torch, dtype))
    _inject(torch_model, "resnet", bug)
    flax_model = FlaxResNetForImageClassification(config, seed=seed, dtype=jdtype)
    return _image_pair("resnet", torch_model, flax_model, dtype, bug, seed, size, classes, batch)


def regnet(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """RegNetForImageClassification (Y layers: grouped convolutions and squeeze-and-excitation)
    and its Flax twin, 2 stages of width 8 and 16, 16x16 images; BatchNorm as in
    :func:`resnet`.

    transformers' own Flax RegNet (4.57.6) does not pass ``deterministic`` from a layer to its
    main branch (``FlaxRegNetXLayer`` / ``FlaxRegNetYLayer`` call ``self.layer(hidden_state)``,
    and the layer collections take no flag), so the BatchNorms of that branch normalize with
    their running averages in training too, where torch uses the batch statistics. Measured on
    this pair in float64, train mode: the first such BatchNorm
    (``regnet.encoder.stages.0.layers.0.layer.0.normalization``) differs by 0.36 relative to
    torch, and ``parity.own.divergence`` says that it is torch's output with the running
    averages to 3e-16; in eval mode (both on running averages) every output agrees (7e-16).
    ``check`` (sf_torch against sf_optax, 30 steps, lr 2e-3) parts at step 0: params 2.5,
    train loss 0.30, eval loss 0.26 relative. With the flag passed down (transformers patched
    for the measurement) the train-mode outputs agree to 2.3e-15 and the same check to 4.6e-15
    (params). A difference of the port, not of ``parity.own``: ``check`` on this pair fails."""
    from transformers import (
        FlaxRegNetForImageClassification,
        RegNetConfig,
        RegNetForImageClassification,
    )

    torch, jnp, jdtype = _frameworks(dtype)
    size, classes, batch = 16, 5, 4
    config = RegNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        groups_width=4,
        layer_type="y",
        num_labels=classes,
    )
    torch.manual_seed(seed)
    torch_model = RegNetForImageClassification(config).to(getattr(torch, dtype))
    _inject(torch_model, "regnet", bug)
    flax_model = FlaxRegNetForImageClassification(config, seed=seed, dtype=jdtype)
    return _image_pair("regnet", torch_model, flax_model, dtype, bug, seed, size, classes, batch)


def _image_pair(arch, torch_model, flax_model, dtype, bug, seed, size, classes, batch) -> Pair:
    """An image classifier with linen BatchNorm: the training loss returns the batch_stats
    update, the eval loss uses the running statistics."""
    torch, jnp, jdtype = _frameworks(dtype)
    module = flax_model.module

    def torch_loss(model, batch):
        return _torch_token_loss(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    def apply(variables, batch, train):
        images = jnp.transpose(batch["pixel_values"], (0, 2, 3, 1))  # NCHW -> NHWC
        if train:
            out, updates = module.apply(
                variables, images, deterministic=False, mutable=["batch_stats"]
            )
            return _jax_token_loss(out.logits, batch["labels"]), updates
        out = module.apply(variables, images, deterministic=True)
        return _jax_token_loss(out.logits, batch["labels"])

    def images(seed, n):
        rng = np.random.default_rng(seed)
        return [
            {
                "pixel_values": rng.normal(size=(batch, 3, size, size)),
                "labels": rng.integers(0, classes, size=batch),
            }
            for _ in range(n)
        ]

    return Pair(
        torch_model=torch_model,
        flax_model=module,
        variables=dict(flax_model.params),
        torch_loss=torch_loss,
        flax_loss=lambda variables, batch: apply(variables, batch, True),
        flax_eval_loss=lambda variables, batch: apply(variables, batch, False),
        batches=images(seed, 4),
        eval_batches=images(seed + 1, 1),
        name=f"{arch} ({dtype}{', bug ' + bug if bug else ''})",
    )


def wav2vec2(dtype: str = "float64", bug: str | None = None, seed: int = 0) -> Pair:
    """Wav2Vec2ForCTC and its Flax twin: 2 feature convolutions (LayerNorm, stable layer norm:
    the only variant transformers' Flax port has), a weight-normed positional convolution
    (torch ``parametrizations.weight.original0/1`` against Flax ``weight_g``/``weight_v``),
    2 encoder layers of width 32; 64 samples per row give 8 frames, and the loss is a cross
    entropy of the CTC head's logits against one label per frame (not a CTC loss).

    The Flax port always has ``masked_spec_embed``; torch creates it only when masking is on
    (``mask_time_prob`` > 0), off here: the pair passes ``ignore`` for it."""
    from transformers import FlaxWav2Vec2ForCTC, Wav2Vec2Config, Wav2Vec2ForCTC

    torch, jnp, jdtype = _frameworks(dtype)
    vocab, samples, frames, batch = 16, 64, 8, 2
    config = Wav2Vec2Config(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(8, 8),
        conv_stride=(4, 2),
        conv_kernel=(4, 2),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )
    torch.manual_seed(seed)
    torch_model = Wav2Vec2ForCTC(config).to(getattr(torch, dtype))
    _inject(torch_model, "wav2vec2", bug)
    flax_model = FlaxWav2Vec2ForCTC(config, seed=seed, dtype=jdtype)
    module = flax_model.module

    def torch_loss(model, batch):
        return _torch_token_loss(model(batch["input_values"]).logits, batch["labels"])

    def flax_loss(variables, batch):
        out = module.apply(variables, batch["input_values"], deterministic=True, return_dict=True)
        return _jax_token_loss(out.logits, batch["labels"])

    def audio(seed, n):
        rng = np.random.default_rng(seed)
        return [
            {
                "input_values": rng.normal(size=(batch, samples)),
                "labels": rng.integers(0, vocab, size=(batch, frames)),
            }
            for _ in range(n)
        ]

    return Pair(
        torch_model=torch_model,
        flax_model=module,
        variables={"params": flax_model.params},
        torch_loss=torch_loss,
        flax_loss=flax_loss,
        batches=audio(seed, 4),
        eval_batches=audio(seed + 1, 1),
        ignore=("params/wav2vec2/masked_spec_embed",),
        name=f"wav2vec2 ({dtype}{', bug ' + bug if bug else ''})",
    )
