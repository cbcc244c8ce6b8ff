"""parity.own.divergence: the finder names the module where a port parts from its original.

Every check here rests on something the finder did not produce: the site where a porting
mistake was injected (``parity.own.hf.BUG_SITES`` for the transformers twins, the module a
hand-written nnx twin gets wrong), transformers' own loss with weights loaded by transformers'
own converter (independent of ``parity.own.mapping``), and gradients computed here directly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

import jax.numpy as jnp  # noqa: E402

from parity.own import divergence  # noqa: E402
from parity.tolerances import divergence_tolerance  # noqa: E402

torch.set_num_threads(1)

F64 = divergence_tolerance("float64")


# -- transformers twins -------------------------------------------------------------------------


def _hf_pair(arch: str, bug: str | None, dtype: str = "float64"):
    hf = pytest.importorskip("parity.own.hf")
    pytest.importorskip("transformers")
    with jax.enable_x64(dtype == "float64"):
        return getattr(hf, arch)(dtype, bug=bug)


def _batch(pair):
    # transformers' Flax ViT casts pixel_values to float32 before its first layer, so a float64
    # comparison needs pixels that float32 holds exactly
    return {
        k: v.astype(np.float32).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in pair.batches[0].items()
    }


_FOUND: dict = {}


def _found(arch, bug, dtype="float64"):
    key = (arch, bug, dtype)
    if key not in _FOUND:
        pair = _hf_pair(arch, bug, dtype)
        _FOUND[key] = (pair, divergence.find_pair(pair) if arch != "vit" else _find_vit(pair))
    return _FOUND[key]


def _find_vit(pair):
    return divergence.find(
        pair.torch_model,
        pair.flax_model,
        pair.torch_loss,
        pair.flax_loss,
        _batch(pair),
        variables=pair.variables,
    )


@pytest.mark.parametrize(
    "arch,bug",
    [
        ("roberta", "layernorm_eps"),
        ("roberta", "gelu"),
        ("vit", "layernorm_eps"),
        ("vit", "gelu"),
        ("electra", "layernorm_eps"),
    ],
)
def test_names_the_injected_layer(arch, bug):
    pair, found = _found(arch, bug)
    site = pair.notes["bug_site"]
    assert found.kind == "output", str(found)
    assert found.first == site, str(found)
    assert found.figure == found.row(site).output > 1e3 * F64
    # every module the batch reached before the site agrees to round-off
    before = [r for r in found.rows if r.output is not None][
        : [r.torch_name for r in found.rows].index(site)
    ]
    assert before and max(r.output for r in before) < 1e-12
    if bug == "gelu":
        # the wrong activation is a torch-only child (transformers' Flax MLP calls a function):
        # not compared, so its parent, the bug site, is the first module that differs
        assert f"{site}.intermediate_act_fn" in found.unmatched["torch"]
    parsed = json.loads(found.to_json())
    assert parsed["first"] == site and parsed["kind"] == "output"
    assert site in str(found) and "first divergence" in str(found)


def _transformers_losses(pair, batch):
    """transformers' own torch loss (the model's ``labels=`` path), and the Flax loss with the
    weights loaded by transformers' converter."""
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    model = pair.torch_model
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        own = float(model(**tb).loss)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapper = SimpleNamespace(
        params=pair.variables["params"], base_model_prefix=model.base_model_prefix
    )
    params = convert_pytorch_state_dict_to_flax(state, wrapper)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    converted = float(jax.jit(pair.flax_loss)({"params": params}, jb))
    return own, converted


@pytest.mark.parametrize("arch", ["roberta", "vit"])
def test_clean_port_agrees_with_transformers(arch):
    pair, found = _found(arch, None)
    assert found.kind is None and found.first is None, str(found)
    assert "no divergence" in str(found)
    with jax.enable_x64(True):
        own, converted = _transformers_losses(pair, _batch(pair))
    for loss in (found.losses["torch"], found.losses["flax"], converted):
        assert abs(loss - own) <= 1e-10 * abs(own)
    # outputs were compared (the conv's NCHW against NHWC too), not skipped
    compared = [r for r in found.rows if r.output is not None]
    assert len(compared) >= 30 and max(r.output for r in compared) < 1e-12
    if arch == "vit":
        assert found.row("vit.embeddings.patch_embeddings.projection").output < 1e-12


def test_zero_gradient_is_compared_against_the_gradient_scale():
    pair, found = _found("roberta", None)
    # the key bias: softmax ignores a constant added to every score, so its exact gradient is
    # zero and what both frameworks hold is rounding noise (computed here, outside the finder)
    model = pair.torch_model
    tb = {k: torch.from_numpy(v) for k, v in pair.batches[0].items()}
    model.zero_grad()
    pair.torch_loss(model, tb).backward()
    name = "roberta.encoder.layer.0.attention.self.key"
    bias = model.get_submodule(name).bias.grad.abs().max().item()
    scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    assert bias < 1e-14 * scale
    assert found.gradient_scale == pytest.approx(scale, rel=1e-12)
    row = found.row(name)
    assert "bias" in row.absolute and row.parameters["bias"] < 1e-12
    assert "weight" not in row.absolute


def test_float32_clean_port_agrees():
    pair = _hf_pair("roberta", None, "float32")
    found = divergence.find_pair(pair)
    assert found.dtype == "float32" and found.tolerance == divergence_tolerance("float32")
    assert found.kind is None, str(found)
    assert max(r.output for r in found.rows if r.output is not None) < 1e-5


# -- a hand-written nnx twin --------------------------------------------------------------------

VOCAB, WIDTH, HIDDEN, CLASSES = 11, 8, 16, 3


class TorchMaskedMean(torch.nn.Module):
    def forward(self, h, mask):
        m = mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


class TorchTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.hidden = torch.nn.Linear(WIDTH, HIDDEN)
        self.act = torch.nn.GELU()
        self.pool = TorchMaskedMean()
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids, mask):
        return self.head(self.pool(self.act(self.hidden(self.embed(ids))), mask))


@jax.custom_vjp
def _gelu_tanh_backward(x):
    """The exact GELU whose backward is the tanh GELU's: a mistake only gradients show."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return _gelu_tanh_backward(x), x


def _gelu_bwd(x, g):
    return jax.vjp(lambda y: jax.nn.gelu(y, approximate=True), x)[1](g)


_gelu_tanh_backward.defvjp(_gelu_fwd, _gelu_bwd)


class FlaxGelu(nnx.Module):
    def __init__(self, bug):
        self.bug = bug

    def __call__(self, x):
        if self.bug == "backward":
            return _gelu_tanh_backward(x)
        return jax.nn.gelu(x, approximate=self.bug == "gelu")


class FlaxMaskedMean(nnx.Module):
    def __init__(self, ignore_mask: bool):
        self.ignore_mask = ignore_mask

    def __call__(self, h, mask):
        if self.ignore_mask:  # the porting mistake: padding averaged in
            return h.mean(1)
        m = mask[..., None].astype(h.dtype)
        return (h * m).sum(1) / m.sum(1)


class FlaxTokens(nnx.Module):
    def __init__(self, bug, dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.embed = nnx.Embed(VOCAB, WIDTH, **kw)
        self.hidden = nnx.Linear(WIDTH, HIDDEN, **kw)
        self.act = FlaxGelu(bug)
        self.pool = FlaxMaskedMean(ignore_mask=bug == "mask")
        self.head = nnx.Linear(HIDDEN, CLASSES, **kw)

    def __call__(self, ids, mask):
        return self.head(self.pool(self.act(self.hidden(self.embed(ids))), mask))


def _token_batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, size=(4, 6))
    mask = (np.arange(6)[None] < np.array([[6], [3], [4], [2]])).astype(np.int64)
    return {"ids": ids, "mask": mask, "labels": rng.integers(0, CLASSES, size=4)}


def _torch_xent(model, batch):
    logits = model(batch["ids"], batch["mask"])
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def _flax_xent(model, batch):
    logits = model(batch["ids"], batch["mask"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1).mean()


def _tokens(bug, dtype="float64"):
    torch.manual_seed(0)
    with jax.enable_x64(dtype == "float64"):
        flax_model = FlaxTokens(bug, jnp.dtype(dtype), nnx.Rngs(0))
    return TorchTokens().to(getattr(torch, dtype)), flax_model


@pytest.mark.parametrize(
    "bug,site,dtype",
    [
        ("gelu", "act", "float64"),
        ("mask", "pool", "float64"),
        (None, None, "float64"),
        # the tanh GELU differs from the exact one by <= ~5e-4 absolute, 1.9e-4 of this
        # activation's range: float32's tolerance (1e-4) only just sees it, so it is not
        # asserted there; a padding mask ignored is plain in both
        ("mask", "pool", "float32"),
        (None, None, "float32"),
    ],
)
def test_nnx_twin(bug, site, dtype):
    torch_model, flax_model = _tokens(bug, dtype)
    before = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(flax_model, nnx.Param))}
    found = divergence.find(torch_model, flax_model, _torch_xent, _flax_xent, _token_batch())
    assert found.first == site, str(found)
    assert found.kind == ("output" if bug else None)
    if bug:
        assert found.figure > 1e-4
        assert found.row("embed").output == 0.0  # a gather: exact in both
        assert found.row("hidden").output < 1e-2 * found.tolerance
    for name in ("embed", "hidden", "head"):  # every gradient came back through the mapping
        assert found.row(name).gradient is not None and not found.row(name).note
    # nothing left behind: the nnx model keeps its own weights, torch has no gradients
    after = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(flax_model, nnx.Param))}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in torch_model.parameters())
    assert torch.get_num_threads() == 1


def test_nnx_wrong_backward_is_a_gradient_divergence():
    # outputs and loss agree; the backward pass parts at the activation, so the gradients of
    # what runs before it (hidden, embed) differ and those after it (head) do not
    torch_model, flax_model = _tokens("backward")
    found = divergence.find(torch_model, flax_model, _torch_xent, _flax_xent, _token_batch())
    assert found.kind == "gradient" and found.first == "hidden", str(found)
    assert max(r.output for r in found.rows if r.output is not None) < 1e-13
    assert found.loss_difference < 1e-13
    assert found.row("head").gradient < 1e-13
    assert found.row("hidden").gradient > 1e-5 and found.row("embed").gradient > 1e-5
    assert "backward pass first parts" in str(found)


def test_a_different_loss_is_reported_as_such():
    torch_model, flax_model = _tokens(None)

    def summed(model, batch):  # a sum where torch takes the mean
        return _flax_xent(model, batch) * batch["labels"].shape[0]

    found = divergence.find(torch_model, flax_model, _torch_xent, summed, _token_batch())
    assert found.kind == "loss" and found.first is None
    assert found.figure == pytest.approx(3.0)
    assert "losses differ" in str(found)


class TorchConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(5, CLASSES)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


class FlaxRelu(nnx.Module):
    def __call__(self, x):
        return jax.nn.relu(x)


class FlaxConvNet(nnx.Module):
    def __init__(self, dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.conv = nnx.Conv(3, 5, (3, 3), padding="SAME", **kw)
        self.act = FlaxRelu()
        self.head = nnx.Linear(5, CLASSES, **kw)

    def __call__(self, x):  # x: NCHW, as torch's
        return self.head(self.act(self.conv(jnp.transpose(x, (0, 2, 3, 1)))).mean((1, 2)))


def test_conv_outputs_compared_across_layouts():
    torch.manual_seed(1)
    with jax.enable_x64(True):
        flax_model = FlaxConvNet(jnp.float64, nnx.Rngs(1))
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(2, 3, 6, 6)), "labels": np.array([0, 2])}

    def torch_loss(model, b):
        return torch.nn.functional.cross_entropy(model(b["x"]), b["labels"])

    def flax_loss(model, b):
        logp = jax.nn.log_softmax(model(b["x"]), axis=-1)
        return -jnp.take_along_axis(logp, b["labels"][:, None], axis=-1).mean()

    found = divergence.find(TorchConvNet().double(), flax_model, torch_loss, flax_loss, batch)
    assert found.kind is None, str(found)
    for name in ("conv", "act"):  # (2, 5, 6, 6) against (2, 6, 6, 5)
        assert found.row(name).output < 1e-13


class LinenBatchNormNet(linen.Module):
    epsilon: float = 1e-5
    running: bool = False  # use_running_average

    @linen.compact
    def __call__(self, x):  # x: NHWC; auto-named submodules (Conv_0, BatchNorm_0, Dense_0)
        kw = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        h = linen.Conv(6, (3, 3), padding="SAME", **kw)(x)
        h = linen.BatchNorm(use_running_average=self.running, epsilon=self.epsilon, **kw)(h)
        return linen.Dense(3, **kw)(linen.relu(h).mean((1, 2)))


class TorchBatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("epsilon,site", [(1e-5, None), (1e-3, "bn")])
def test_plain_linen_twin_with_batch_stats(epsilon, site):
    rng = np.random.default_rng(2)
    batch = {"x": rng.normal(size=(4, 5, 5, 2)), "y": rng.integers(0, 3, size=4)}
    model = LinenBatchNormNet(epsilon)
    with jax.enable_x64(True):
        variables = model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))

    def flax_loss(variables, b):  # (loss, updates), as a training step with BatchNorm returns
        logits, updates = model.apply(variables, b["x"], mutable=["batch_stats"])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, b["y"][:, None], 1).mean(), updates

    def torch_loss(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"].permute(0, 3, 1, 2)), b["y"])

    torch.manual_seed(0)
    torch_model = TorchBatchNormNet().double()
    found = divergence.find(torch_model, model, torch_loss, flax_loss, batch, variables=variables)
    assert found.first == site, str(found)
    assert [(r.torch_name, r.flax_path) for r in found.rows[:3]] == [
        ("conv", "Conv_0"),
        ("bn", "BatchNorm_0"),
        ("head", "Dense_0"),
    ]
    assert found.row("conv").output < 1e-13  # (4, 6, 5, 5) against (4, 5, 5, 6)
    # the torch model's running statistics are its own again
    assert torch.equal(torch_model.bn.running_mean, torch.zeros(6, dtype=torch.float64))
    assert found.explanation == ""


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_in_the_other_mode_is_explained(train):
    """A linen BatchNorm on running averages while torch trains on batch statistics (the
    mistake of transformers' Flax RegNet), and the reverse in eval mode: the finder stops at
    the BatchNorm and says which statistics the Flax side used."""
    rng = np.random.default_rng(3)
    batch = {"x": rng.normal(size=(4, 5, 5, 2)), "y": rng.integers(0, 3, size=4)}
    model = LinenBatchNormNet(running=train)  # the wrong mode for the torch side's
    with jax.enable_x64(True):
        variables = model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))

    def flax_loss(variables, b):
        logits, _ = model.apply(variables, b["x"], mutable=["batch_stats"])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, b["y"][:, None], 1).mean()

    def torch_loss(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"].permute(0, 3, 1, 2)), b["y"])

    torch.manual_seed(0)
    torch_model = TorchBatchNormNet().double()
    with torch.no_grad():
        torch_model.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 6))
        torch_model.bn.running_var.copy_(torch.linspace(0.5, 2.0, 6))
    found = divergence.find(
        torch_model, model, torch_loss, flax_loss, batch, variables=variables, train=train
    )
    assert (found.first, found.kind) == ("bn", "output") and found.figure > 1e-2, str(found)
    used = "its running averages" if train else "the batch statistics"
    assert f"BatchNorm bn normalizes with {used}" in found.verdict()
    assert found.explanation in found.verdict() and found.to_dict()["explanation"]


# -- errors -------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    torch_model, flax_model = _tokens(None)
    batch = _token_batch()
    args = (torch_model, flax_model, _torch_xent, _flax_xent)
    with pytest.raises(TypeError, match="batch"):
        divergence.find(*args, [batch])
    with pytest.raises(TypeError, match=r"batch\['ids'\] must be a numpy array"):
        divergence.find(*args, {**batch, "ids": torch.from_numpy(batch["ids"])})
    with pytest.raises(ValueError, match="torch_loss must return a scalar"):
        divergence.find(
            torch_model, flax_model, lambda m, b: m(b["ids"], b["mask"]), _flax_xent, batch
        )
    with pytest.raises(ValueError, match="flax_loss must return a scalar"):
        divergence.find(
            torch_model, flax_model, _torch_xent, lambda m, b: m(b["ids"], b["mask"]), batch
        )
    with pytest.raises(ValueError, match="dtype"):
        divergence.find(*args, batch, dtype="float32")
    # a torch model the mapping cannot pair: the mapping's own error
    torch_model.extra = torch.nn.Linear(7, 9).double()
    with pytest.raises(ValueError, match="cannot pair"):
        divergence.find(*args, batch)


def test_gpt2_clean_port_agrees():
    """GPT-2: torch's Conv1D modules against transformers' Flax Conv1D (kernel (out, in)), one
    batch in float64: every module and gradient agrees, and the Flax loss equals the one with
    the weights transformers' own converter loads (independent of parity.own.mapping)."""
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    pair, found = _found("gpt2", None)
    assert found.kind is None, str(found)
    compared = [r for r in found.rows if r.output is not None]
    assert len(compared) >= 20 and max(r.output for r in compared) < 1e-12
    assert found.row("transformer.h.0.attn.c_proj").output < 1e-12
    graded = [r for r in found.rows if r.gradient is not None]
    assert len(graded) >= 14 and max(r.gradient for r in graded) <= F64
    state = {k: v.detach().clone() for k, v in pair.torch_model.state_dict().items()}
    wrapper = SimpleNamespace(params=pair.variables["params"], base_model_prefix="transformer")
    with jax.enable_x64(True):
        params = convert_pytorch_state_dict_to_flax(state, wrapper)
        jb = {k: jnp.asarray(v) for k, v in pair.batches[0].items()}
        converted = float(pair.flax_loss({"params": params}, jb))
    assert abs(converted - found.losses["flax"]) <= 1e-12 * abs(converted)
    assert abs(converted - found.losses["torch"]) <= 1e-12 * abs(converted)


def test_a_module_called_twice_is_judged_call_by_call():
    """One dropout after the first layer and again after the norm (as T5's stack does): the
    port's norm has another epsilon, so the dropout's first call agrees and its second does
    not; the first divergence is the norm, which fires between the two calls."""
    from torch import nn

    class TorchTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8, dtype=torch.float64)
            self.drop = nn.Dropout(0.0)
            self.norm = nn.LayerNorm(8, dtype=torch.float64)
            self.head = nn.Linear(8, 3, dtype=torch.float64)

        def forward(self, x):
            return self.head(self.drop(self.norm(self.drop(self.lin(x)))))

    class NnxTwice(nnx.Module):
        def __init__(self, rngs):
            kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
            self.lin = nnx.Linear(6, 8, **kw)
            self.drop = nnx.Dropout(0.0, rngs=rngs)
            self.norm = nnx.LayerNorm(8, **kw)  # epsilon 1e-6 where torch has 1e-5
            self.head = nnx.Linear(8, 3, **kw)

        def __call__(self, x):
            return self.head(self.drop(self.norm(self.drop(self.lin(x)))))

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(4, 6)) * 1e-3}  # small activations: the epsilon shows
    with jax.enable_x64(True):
        found = divergence.find(
            TorchTwice(),
            NnxTwice(nnx.Rngs(0)),
            lambda m, b: m(b["x"]).square().mean(),
            lambda m, b: jnp.mean(m(b["x"]) ** 2),
            batch,
        )
    assert found.kind == "output" and found.first == "norm", str(found)
    assert found.row("drop").output > F64  # its row still shows the worst of its calls
    assert found.row("lin").output < 1e-12
