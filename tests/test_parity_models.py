"""The twin models: same canonical numpy params -> same outputs, losses and gradients.

Every check is float64 and compares numbers from two independent sources: flax.nnx against
torch (each with its own layers and autodiff), and both against plain numpy or torch's own
fused kernels where the twins write an operation by hand (attention, BatchNorm).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from parity import data as data_lib
from parity.models import canonical, flax_models, torch_models

pytestmark = pytest.mark.usefixtures("x64")


def batch(model, n=16, seed=0):
    data = data_lib.load(model, seed, n, "float64")
    return data.train_batch(3)


def twins(model, seed=0):
    params = canonical.init_params(model, seed)
    buffers = canonical.init_buffers(model)
    return (
        params,
        flax_models.build(model, params, buffers, jnp.float64),
        torch_models.build(model, params, buffers, torch.float64),
    )


def flax_loss_and_grads(module, inputs, labels):
    graph, params, rest = flax_models.split(module)

    def loss_fn(params):
        model = flax_models.merge(graph, params, rest)
        return flax_models.loss(model(jnp.asarray(inputs)), jnp.asarray(labels))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return float(loss), {k: np.asarray(v) for k, v in grads.items()}


def torch_loss_and_grads(model_name, module, inputs, labels):
    module.zero_grad()
    x = torch_models.inputs_to_torch(inputs, dtype=torch.float64)
    loss = torch_models.loss(module(x), torch_models.inputs_to_torch(labels))
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    return loss.item(), torch_models.to_canonical(model_name, module, grads)


def assert_close(a, b, rtol=1e-12, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-300)
    assert np.abs(a - b).max() / scale <= rtol, what


@pytest.mark.parametrize("model", canonical.MODELS)
def test_names_shapes_and_layout_round_trip(model):
    params, flax_module, torch_module = twins(model)
    # Every canonical name exists in both frameworks, with the converted shape.
    flax_params = flax_models.split(flax_module)[1]
    assert {k: v.shape for k, v in flax_params.items()} == canonical.param_shapes(model)
    torch_params = dict(torch_module.named_parameters())
    assert len(torch_params) == len(params)
    for name, value in params.items():
        t = torch_params[canonical.torch_name(name)].detach().numpy()
        np.testing.assert_array_equal(t, canonical.to_torch_layout(name, value))
        np.testing.assert_array_equal(canonical.from_torch_layout(name, t), value)
    # A torch Linear weight is the transpose of the flax kernel; a conv OIHW of HWIO.
    if model == "mlp":
        assert torch_params["hidden.weight"].shape == (64, 64) and params["out.kernel"].shape == (
            64,
            10,
        )
        assert torch_params["out.weight"].shape == (10, 64)
    if model == "cnn":
        assert params["conv2.kernel"].shape == (3, 3, 8, 16)
        assert torch_params["conv2.weight"].shape == (16, 8, 3, 3)
    back = torch_models.to_canonical(model, torch_module)
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])


@pytest.mark.parametrize("model", canonical.MODELS)
def test_outputs_losses_and_grads_agree(model):
    params, flax_module, torch_module = twins(model)
    inputs, labels = batch(model)
    torch_module.train()
    out_flax = np.asarray(flax_module(jnp.asarray(inputs)))
    out_torch = torch_module(torch_models.inputs_to_torch(inputs, dtype=torch.float64))
    assert_close(out_flax, out_torch.detach().numpy(), what="logits")

    _, flax_module, torch_module = twins(model)  # fresh BatchNorm statistics
    loss_f, grads_f = flax_loss_and_grads(flax_module, inputs, labels)
    loss_t, grads_t = torch_loss_and_grads(model, torch_module, inputs, labels)
    assert abs(loss_f - loss_t) <= 1e-12 * abs(loss_t)
    assert set(grads_f) == set(grads_t) == set(params)
    for name in params:
        assert np.abs(grads_t[name]).max() > 0, f"{name} gets no gradient"
        assert_close(grads_f[name], grads_t[name], what=name)


def test_mlp_matches_numpy():
    params, flax_module, torch_module = twins("mlp")
    inputs, _ = batch("mlp")
    hidden = np.maximum(inputs @ params["hidden.kernel"] + params["hidden.bias"], 0)
    want = hidden @ params["out.kernel"] + params["out.bias"]
    assert_close(np.asarray(flax_module(jnp.asarray(inputs))), want)
    assert_close(torch_module(torch.from_numpy(inputs)).detach().numpy(), want)


def test_cnn_first_layer_matches_numpy_convolution():
    params, flax_module, torch_module = twins("cnn")
    images, _ = batch("cnn")  # NHWC
    kernel = params["conv1.kernel"]  # HWIO
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(
        padded[:, i : i + 8, j : j + 8, :] @ kernel[i, j] for i in range(3) for j in range(3)
    )
    got_flax = np.asarray(flax_module.conv1(jnp.asarray(images)))
    got_torch = torch_module.conv1(torch_models.inputs_to_torch(images, dtype=torch.float64))
    assert_close(got_flax, want)
    assert_close(got_torch.detach().numpy().transpose(0, 2, 3, 1), want)  # NCHW -> NHWC


def test_batch_norm_matches_torch_functional_and_recalibration_agrees():
    _, flax_module, torch_module = twins("cnn")
    images, _ = batch("cnn", n=32)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous()
    h_torch = torch_module.conv1(x)
    norm = torch_module.bn1
    norm.train()
    got = norm(h_torch).detach()
    want = F.batch_norm(
        h_torch.detach(),
        None,
        None,
        norm.weight.detach(),
        norm.bias.detach(),
        training=True,
        eps=1e-5,
    )
    assert_close(got.numpy(), want.numpy(), what="training-mode normalization")

    # Recalibration at some params: running stats = mean of the batches' (biased) statistics,
    # and eval-mode outputs then agree between the twins.
    batches = [batch("cnn", n=32, seed=0)[0], batch("cnn", n=32, seed=1)[0]]
    flax_models.recalibrate(flax_module, [jnp.asarray(b) for b in batches])
    torch_models.recalibrate(torch_module, [torch_models.inputs_to_torch(b) for b in batches])
    stats = []
    for b in batches:
        h = torch_module.conv1(torch_models.inputs_to_torch(b)).detach().numpy()
        stats.append((h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))))
    assert_close(torch_module.bn1.mean.numpy(), np.mean([s[0] for s in stats], axis=0))
    assert_close(torch_module.bn1.var.numpy(), np.mean([s[1] for s in stats], axis=0))
    assert_close(np.asarray(flax_module.bn1.var[...]), torch_module.bn1.var.numpy())
    assert_close(np.asarray(flax_module.bn2.mean[...]), torch_module.bn2.mean.numpy())
    out_flax = np.asarray(flax_module(jnp.asarray(images)))
    out_torch = torch_module(torch_models.inputs_to_torch(images)).detach().numpy()
    assert_close(out_flax, out_torch, what="eval-mode logits")


def test_attention_matches_torch_sdpa():
    _, flax_module, torch_module = twins("lm")
    tokens, _ = batch("lm")
    h = torch_module.embed(torch.from_numpy(tokens).long()).detach()
    attn = torch_module.blocks[0].attn
    b, t, d = h.shape
    heads = canonical.LM["heads"]

    def split(a):
        return a.reshape(b, t, heads, d // heads).permute(0, 2, 1, 3)

    with torch.no_grad():
        q, k, v = split(attn.query(h)), split(attn.key(h)), split(attn.value(h))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = attn.out(mixed.permute(0, 2, 1, 3).reshape(b, t, d)).numpy()
        got_torch = attn(h).numpy()
    got_flax = np.asarray(flax_module.blocks[0].attn(jnp.asarray(h.numpy())))
    assert_close(got_torch, want)
    assert_close(got_flax, want)


def test_flax_model_is_a_plain_nnx_module():
    # The twin trains with nnx's own optimizer wrapper as well (no parity machinery needed).
    import optax

    _, module, _ = twins("mlp")
    optimizer = nnx.Optimizer(module, optax.sgd(0.1), wrt=nnx.Param)
    inputs, labels = batch("mlp")

    def loss_fn(m):
        return flax_models.loss(m(jnp.asarray(inputs)), jnp.asarray(labels))

    before = float(loss_fn(module))
    for _ in range(5):
        optimizer.update(module, nnx.grad(loss_fn)(module))
    assert float(loss_fn(module)) < before


def test_lm_with_other_sizes_agrees_across_frameworks():
    # The LM twin at non-default sizes (what bench.anytime trains): both frameworks load the
    # same float64 weights and give the same logits; bad sizes are refused by name.
    lm = dict(vocab=11, width=12, layers=3, heads=3, seq=9, mlp=20)
    rng = np.random.default_rng(4)
    shapes = canonical.param_shapes("lm", lm)
    assert shapes["blocks.2.mlp_in.kernel"] == (12, 20) and "blocks.3.ln1.scale" not in shapes
    params = {k: rng.normal(size=s) * 0.3 for k, s in shapes.items()}
    flax_lm = flax_models.build("lm", params, None, jnp.float64, lm=lm)
    torch_lm = torch_models.build("lm", params, None, torch.float64, lm=lm)
    tokens = rng.integers(0, 11, size=(2, 9))
    logits_flax = np.asarray(flax_lm(jnp.asarray(tokens)))
    logits_torch = torch_lm(torch.as_tensor(tokens)).detach().numpy()
    assert logits_flax.shape == (2, 9, 11)
    assert_close(logits_torch, logits_flax, 1e-12, "logits")
    back = torch_models.to_canonical("lm", torch_lm, lm=lm)
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value)
    with pytest.raises(ValueError, match="heads"):
        canonical.param_shapes("lm", dict(lm, heads=5))
