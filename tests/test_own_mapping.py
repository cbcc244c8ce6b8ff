"""parity.own.mapping: torch <-> Flax parameter mapping inferred from names and structure.

Oracles the mapping did not produce: transformers' own PyTorch <-> Flax weight conversion for
RoBERTa (tied decoder), ELECTRA and ViT (a conv patch embedding), and for hand-written pairs the
forward pass of the other framework (float64, within 1e-12).
"""

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

import flax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from parity.own import mapping as pm  # noqa: E402

torch.set_num_threads(1)

TOKENS, IMAGE, CHANNELS = 11, 5, 3


# -- hand-written pairs -------------------------------------------------------------------------


class TorchNet(nn.Module):
    """Conv2d + BatchNorm2d on NHWC images, an Embedding, two Linears, a LayerNorm, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(TOKENS, 6)
        self.conv = nn.Conv2d(CHANNELS, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.blocks = nn.ModuleList([nn.Linear(4 * IMAGE * IMAGE + 6, 16), nn.Linear(16, 12)])
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, images, tokens):
        x = F.silu(self.bn(self.conv(images.permute(0, 3, 1, 2))))
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        h = torch.cat([x, self.embed(tokens)], -1)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(self.norm(h))


class NnxNet(nnx.Module):
    """The nnx twin; its Linear list is called ``layers`` where torch says ``blocks``."""

    def __init__(self, rngs, head=True):
        kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
        self.embed = nnx.Embed(TOKENS, 6, **kw)
        self.conv = nnx.Conv(CHANNELS, 4, (3, 3), padding="SAME", **kw)
        self.bn = nnx.BatchNorm(4, use_running_average=True, epsilon=1e-5, **kw)
        self.bn.mean = nnx.BatchStat(jnp.zeros(4, jnp.float64))  # flax keeps them in float32
        self.bn.var = nnx.BatchStat(jnp.ones(4, jnp.float64))
        self.layers = nnx.List(
            [nnx.Linear(4 * IMAGE * IMAGE + 6, 16, **kw), nnx.Linear(16, 12, **kw)]
        )
        self.norm = nnx.LayerNorm(12, epsilon=1e-5, **kw)
        if head:
            self.head = nnx.Linear(12, 5, **kw)

    def __call__(self, images, tokens):
        x = jax.nn.silu(self.bn(self.conv(images)))
        h = jnp.concatenate([x.reshape(x.shape[0], -1), self.embed(tokens)], -1)
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return self.head(self.norm(h))


class LinenNet(linen.Module):
    """The linen twin: auto-named layers (Conv_0, BatchNorm_0, Dense_0 ...) and a list-like
    ``blocks_0``/``blocks_1``."""

    @linen.compact
    def __call__(self, images, tokens):
        kw = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        x = linen.Conv(4, (3, 3), padding="SAME", **kw)(images)
        x = jax.nn.silu(linen.BatchNorm(use_running_average=True, epsilon=1e-5, **kw)(x))
        e = linen.Embed(TOKENS, 6, **kw)(tokens)
        h = jnp.concatenate([x.reshape(x.shape[0], -1), e], -1)
        h = jnp.tanh(linen.Dense(16, name="blocks_0", **kw)(h))
        h = jnp.tanh(linen.Dense(12, name="blocks_1", **kw)(h))
        return linen.Dense(5, **kw)(linen.LayerNorm(epsilon=1e-5, **kw)(h))


def _torch_net(seed=0):
    torch.manual_seed(seed)
    model = TorchNet().double().eval()
    with torch.no_grad():  # non-trivial norm parameters and running statistics
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("bn" in name or "norm" in name):
                t.copy_(torch.rand_like(t) + 0.5)
    return model


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3, IMAGE, IMAGE, CHANNELS)), rng.integers(0, TOKENS, size=3)


def _torch_forward(model, images, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(images), torch.from_numpy(tokens)).numpy()


def _assert_round_trips(m, t_arrays, f_arrays):
    back = m.to_torch(m.to_flax(t_arrays))
    assert set(back) == set(t_arrays)
    for name, array in back.items():
        assert array.dtype == t_arrays[name].dtype
        assert np.array_equal(array, t_arrays[name]), name
    again = m.to_flax(m.to_torch(f_arrays))
    assert set(again) == set(f_arrays)
    for path, array in again.items():
        assert np.array_equal(array, f_arrays[path]), path


@pytest.mark.usefixtures("x64")
def test_nnx_twin_by_names_and_structure():
    tm = _torch_net()
    model = NnxNet(nnx.Rngs(0))
    m = pm.infer(tm, model)
    by_name = {e.torch_name: e for e in m.entries}
    assert by_name["blocks.0.weight"].flax_path == ("params", "layers", "0", "kernel")
    assert by_name["blocks.0.weight"].layout == "linear"
    assert by_name["conv.weight"].layout == "conv"
    assert by_name["embed.weight"].flax_path == ("params", "embed", "embedding")
    assert by_name["norm.weight"].flax_path == ("params", "norm", "scale")
    assert by_name["bn.running_var"].flax_path == ("batch_stats", "bn", "var")
    assert by_name["bn.running_mean"].kind == "buffer"
    assert "bn.num_batches_tracked" not in by_name
    assert [e.torch_name for e in m.entries] == list(pm.torch_arrays(tm))
    assert ("blocks.1", ("layers", "1")) in m.module_pairs()
    assert len(m.describe().splitlines()) == len(m.entries) + 2

    images, tokens = _inputs()
    pm.load_flax(m, model, pm.torch_arrays(tm))
    out = np.asarray(model(jnp.asarray(images), jnp.asarray(tokens)))
    np.testing.assert_allclose(out, _torch_forward(tm, images, tokens), rtol=0, atol=1e-12)

    # the other way: fresh Flax values into the torch model, torch's forward as the oracle
    other = NnxNet(nnx.Rngs(7))
    stats = {
        p: np.random.default_rng(3).uniform(0.5, 1.5, a.shape)
        for p, a in pm.flax_arrays(other).items()
        if p[0] == "batch_stats"
    }
    pm.load_flax(m, other, m.to_torch(pm.flax_arrays(other) | stats))
    pm.load_torch(m, tm, pm.flax_arrays(other))
    out = np.asarray(other(jnp.asarray(images), jnp.asarray(tokens)))
    np.testing.assert_allclose(out, _torch_forward(tm, images, tokens), rtol=0, atol=1e-12)
    _assert_round_trips(m, pm.torch_arrays(tm), pm.flax_arrays(other))


@pytest.mark.usefixtures("x64")
def test_linen_twin_auto_names():
    tm = _torch_net(seed=2)
    images, tokens = _inputs()
    net = LinenNet()
    variables = net.init(jax.random.key(0), jnp.asarray(images), jnp.asarray(tokens))
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)  # float32 statistics
    m = pm.infer(tm, net, variables)
    by_name = {e.torch_name: e for e in m.entries}
    assert by_name["head.weight"].flax_path == ("params", "Dense_0", "kernel")
    assert by_name["blocks.1.bias"].flax_path == ("params", "blocks_1", "bias")
    assert by_name["conv.weight"].flax_path == ("params", "Conv_0", "kernel")
    assert by_name["bn.running_mean"].flax_path == ("batch_stats", "BatchNorm_0", "mean")

    new = pm.load_flax(m, net, pm.torch_arrays(tm), variables)
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(variables)))
    out = np.asarray(net.apply(new, jnp.asarray(images), jnp.asarray(tokens)))
    np.testing.assert_allclose(out, _torch_forward(tm, images, tokens), rtol=0, atol=1e-12)

    frozen = pm.load_flax(m, net, pm.torch_arrays(tm), flax.core.freeze(variables))
    assert isinstance(frozen, flax.core.FrozenDict)
    assert jax.tree.structure(frozen) == jax.tree.structure(flax.core.freeze(new))

    pm.load_torch(m, tm, pm.flax_arrays(net, variables))
    out = np.asarray(net.apply(variables, jnp.asarray(images), jnp.asarray(tokens)))
    np.testing.assert_allclose(out, _torch_forward(tm, images, tokens), rtol=0, atol=1e-12)
    _assert_round_trips(m, pm.torch_arrays(tm), pm.flax_arrays(net, new))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _torch_net(seed=4)

    def forward(self, images, tokens):
        return self.net(images, tokens)


@pytest.mark.usefixtures("x64")
def test_wrapper_module_on_one_side():
    tm, model = Wrapped().double().eval(), NnxNet(nnx.Rngs(0))
    m = pm.infer(tm, model)
    assert m.entry("net.blocks.1.weight").flax_path == ("params", "layers", "1", "kernel")
    assert m.entry("net.bn.running_var").flax_path == ("batch_stats", "bn", "var")
    images, tokens = _inputs()
    pm.load_flax(m, model, pm.torch_arrays(tm))
    out = np.asarray(model(jnp.asarray(images), jnp.asarray(tokens)))
    np.testing.assert_allclose(out, _torch_forward(tm, images, tokens), rtol=0, atol=1e-12)


# -- errors and overrides -----------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
def test_missing_layer_is_listed():
    with pytest.raises(ValueError) as err:
        pm.infer(_torch_net(), NnxNet(nnx.Rngs(0), head=False))
    msg = str(err.value)
    assert "head.weight (5, 12)" in msg and "head.bias (5,)" in msg
    assert "overrides" in msg
    assert "blocks.0" not in msg  # the rest is mapped


class TorchTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(3))
        self.beta = nn.Parameter(torch.ones(3))
        self.register_buffer("table", torch.arange(4.0))  # torch-only constant


class NnxTwo(nnx.Module):
    def __init__(self):
        self.a = nnx.Param(jnp.full(3, 2.0))
        self.b = nnx.Param(jnp.full(3, 3.0))


def test_ambiguity_names_candidates_and_overrides_resolve_it():
    with pytest.raises(ValueError) as err:
        pm.infer(TorchTwo(), NnxTwo())
    msg = str(err.value)
    assert "alpha (3,): candidates params/a (3,), params/b (3,)" in msg
    assert "beta (3,): candidates params/a (3,), params/b (3,)" in msg
    assert "table (4,)" in msg and "overrides" in msg

    m = pm.infer(TorchTwo(), NnxTwo(), overrides={"alpha": "params/b", "table": None})
    assert {e.torch_name: e.flax_path for e in m.entries} == {
        "alpha": ("params", "b"),
        "beta": ("params", "a"),
    }
    assert m.unmapped == ("table",)
    m2 = pm.infer(TorchTwo(), NnxTwo(), overrides={"alpha": ("b",), "table": None})
    assert m2.entries == m.entries  # the collection may be left out
    tm = TorchTwo()
    pm.load_torch(m, tm, pm.flax_arrays(NnxTwo()))
    assert tm.alpha.tolist() == [3.0] * 3 and tm.beta.tolist() == [2.0] * 3


def test_override_errors():
    with pytest.raises(ValueError, match=r"overrides\['alpha'\].*no leaf 'params/c'"):
        pm.infer(TorchTwo(), NnxTwo(), overrides={"alpha": "params/c"})
    with pytest.raises(ValueError, match=r"overrides\['gamma'\].*no parameter"):
        pm.infer(TorchTwo(), NnxTwo(), overrides={"gamma": "params/a"})
    with pytest.raises(ValueError, match=r"overrides\['table'\].*does not fit"):
        pm.infer(TorchTwo(), NnxTwo(), overrides={"table": "params/a"})
    with pytest.raises(ValueError, match="variables must be None"):
        pm.infer(TorchTwo(), NnxTwo(), {"params": {}})
    with pytest.raises(ValueError, match="variables must be the linen"):
        pm.infer(TorchTwo(), LinenNet())


class TorchRaw(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(16.0).reshape(4, 4))


class NnxRaw(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.zeros((4, 4)))
        self.extra = nnx.Param(jnp.zeros(2))


def test_raw_parameter_against_a_kernel_needs_its_layout():
    with pytest.raises(ValueError) as err:
        pm.infer(TorchRaw(), NnxRaw())
    msg = str(err.value)
    assert "w (4, 4)" in msg and "not a torch Linear or Conv" in msg and "params/extra (2,)" in msg
    m = pm.infer(
        TorchRaw(), NnxRaw(), overrides={"w": ("kernel", "linear")}, ignore=["params/extra"]
    )
    assert m.entry("w").layout == "linear" and m.ignored == (("params", "extra"),)
    assert np.array_equal(
        m.to_flax(pm.torch_arrays(TorchRaw()))[("params", "kernel")],
        np.arange(16.0).reshape(4, 4).T,
    )


@pytest.mark.usefixtures("x64")
def test_bfloat16_round_trip_and_int_path_elements():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tm = _torch_net().to(torch.bfloat16)
    model = NnxNet(nnx.Rngs(0))
    m = pm.infer(tm, model, overrides={"blocks.0.weight": ("layers", 0, "kernel")})
    arrays = pm.torch_arrays(tm)
    assert arrays["conv.weight"].dtype == ml_dtypes.bfloat16
    _assert_round_trips(m, arrays, m.to_flax(arrays))
    expected = {k: v.float() for k, v in tm.state_dict().items()}
    target = _torch_net(seed=9).to(torch.bfloat16)
    pm.load_torch(m, target, m.to_flax(arrays))
    for name, tensor in target.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(tensor.float(), expected[name]), name


class TorchProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6)


class NnxProj(nnx.Module):
    """A DenseGeneral-style kernel (in, heads, head_dim) with a flat bias."""

    def __init__(self):
        self.proj = nnx.Dict(
            kernel=nnx.Param(jnp.arange(48.0).reshape(8, 2, 3)), bias=nnx.Param(jnp.zeros(6))
        )


def test_reshaped_kernel_needs_a_custom_override():
    with pytest.raises(ValueError, match="reshaped"):
        pm.infer(TorchProj(), NnxProj())
    m = pm.infer(
        TorchProj(),
        NnxProj(),
        overrides={
            "proj.weight": (
                "params/proj/kernel",
                lambda w: w.T.reshape(8, 2, 3),
                lambda k: k.reshape(8, 6).T,
            )
        },
    )
    assert m.entry("proj.weight").layout == "custom"
    _assert_round_trips(m, pm.torch_arrays(TorchProj()), pm.flax_arrays(NnxProj()))
    with pytest.raises(ValueError, match="invert each other"):
        pm.infer(
            TorchProj(),
            NnxProj(),
            overrides={
                "proj.weight": (
                    "params/proj/kernel",
                    lambda w: w.T.reshape(8, 2, 3),
                    lambda k: 2 * k.reshape(8, 6).T,
                )
            },
        )


# -- transformers' own conversion as the oracle -------------------------------------------------


def _hf(arch):
    transformers = pytest.importorskip("transformers")
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "vit":
        config = transformers.ViTConfig(image_size=8, patch_size=4, num_labels=5, **common)
        pair = transformers.ViTForImageClassification, transformers.FlaxViTForImageClassification
    elif arch == "roberta":
        config = transformers.RobertaConfig(vocab_size=64, max_position_embeddings=20, **common)
        pair = transformers.RobertaForMaskedLM, transformers.FlaxRobertaForMaskedLM
    else:
        config = transformers.ElectraConfig(
            vocab_size=64, embedding_size=16, max_position_embeddings=20, **common
        )
        pair = transformers.ElectraForMaskedLM, transformers.FlaxElectraForMaskedLM
    torch.manual_seed(0)
    return pair[0](config).eval(), pair[1](config, seed=1)


@pytest.fixture(scope="module", params=["roberta", "vit", "electra"])
def hf_pair(request):
    return request.param, *_hf(request.param)


def test_hf_torch_to_flax_matches_transformers(hf_pair):
    from flax.traverse_util import flatten_dict
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    arch, tm, fm = hf_pair
    variables = {"params": fm.params}
    m = pm.infer(tm, fm.module, variables)
    assert {e.flax_path for e in m.entries} == set(pm.flax_arrays(fm.module, variables))
    ours = pm.flax_arrays(None, pm.load_flax(m, fm.module, pm.torch_arrays(tm), variables))
    oracle = flatten_dict(convert_pytorch_state_dict_to_flax(dict(tm.state_dict()), fm))
    for path, array in ours.items():
        expected = np.asarray(oracle[path[1:]])
        assert array.dtype == expected.dtype and np.array_equal(array, expected), path
    if arch == "vit":
        assert m.entry("vit.embeddings.patch_embeddings.projection.weight").layout == "conv"


def test_hf_flax_to_torch_matches_transformers(hf_pair):
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    arch, tm, fm = hf_pair
    variables = {"params": fm.params}
    m = pm.infer(tm, fm.module, variables)
    expected = pm.torch_arrays(load_flax_weights_in_pytorch_model(_hf(arch)[0], fm.params))
    mine = _hf(arch)[0]
    pm.load_torch(m, mine, pm.flax_arrays(fm.module, variables))
    got = pm.torch_arrays(mine)
    assert set(got) == set(expected)
    for name in got:
        assert np.array_equal(got[name], expected[name]), name
    _assert_round_trips(m, pm.torch_arrays(tm), pm.flax_arrays(fm.module, variables))


TIED = {
    "roberta": {
        "roberta.embeddings.word_embeddings.weight": ("lm_head.decoder.weight",),
        "lm_head.bias": ("lm_head.decoder.bias",),
    },
    "electra": {"electra.embeddings.word_embeddings.weight": ("generator_lm_head.weight",)},
    "vit": {},
}


def test_hf_tied_weights_are_aliases(hf_pair):
    arch, tm, fm = hf_pair
    variables = {"params": fm.params}
    m = pm.infer(tm, fm.module, variables)
    assert {e.torch_name: e.aliases for e in m.entries if e.aliases} == TIED[arch]
    flax = {p: a + 1.0 for p, a in pm.flax_arrays(fm.module, variables).items()}  # new values
    back = m.to_torch(flax)
    for name, aliases in TIED[arch].items():
        assert m.entry(aliases[0]).torch_name == name
        assert all(np.array_equal(back[a], back[name]) for a in aliases)
    pm.load_torch(m, tm, flax)
    arrays = pm.torch_arrays(tm)
    assert set(arrays) == set(back)
    for name, array in back.items():
        assert np.array_equal(arrays[name], array), name


# -- other transformers architectures, and raw (in, out) weights ---------------------------------


class Proj(nn.Module):
    """A layer of the user's own with a raw ``weight`` kept (in, out), as transformers' Conv1D."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


class TorchProjNet(nn.Module):
    def __init__(self, wide: bool):
        super().__init__()
        self.a, self.b = Proj(4, 4), Proj(4, 4)
        self.c = Proj(4, 6) if wide else None

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        return h if self.c is None else self.c(h)


class NnxProjNet(nnx.Module):
    def __init__(self, wide: bool):
        kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        self.a, self.b = nnx.Linear(4, 4, **kw), nnx.Linear(4, 4, **kw)
        self.c = nnx.Linear(4, 6, **kw) if wide else None

    def __call__(self, x):
        h = self.b(jnp.tanh(self.a(x)))
        return h if self.c is None else self.c(h)


@pytest.mark.usefixtures("x64")
def test_square_raw_weights_take_the_layout_of_their_class():
    torch.manual_seed(0)
    with pytest.raises(ValueError) as err:
        pm.infer(TorchProjNet(wide=False), NnxProjNet(wide=False))
    msg = str(err.value)
    assert "layout is unknown" in msg and "a.weight (4, 4) [Proj]" in msg
    assert "no other Proj weight has a non-square shape" in msg
    assert "overrides={'a.weight': ('params/a/kernel', 'linear')" in msg
    # one non-square instance of the class says (in, out) is the Flax kernel as it is
    tm, fm = TorchProjNet(wide=True), NnxProjNet(wide=True)
    m = pm.infer(tm, fm)
    assert {m.entry(f"{n}.weight").layout for n in "abc"} == {"same"}
    pm.load_flax(m, fm, pm.torch_arrays(tm))
    x = np.random.default_rng(0).normal(size=(3, 4))
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x))), expected, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module", params=["gpt2", "bart", "resnet"])
def hf_more(request):
    pytest.importorskip("transformers")
    from parity.own import hf

    return request.param, getattr(hf, request.param)(dtype="float32")


def test_more_hf_architectures_match_transformers(hf_more):
    """GPT-2 (Conv1D weights (in, out) against Flax kernels (out, in)), BART (an encoder and a
    decoder; ``final_logits_bias`` a torch buffer and a Flax param) and ResNet (BatchNorm
    statistics in ``batch_stats``): every leaf as transformers' converter has it, bit for bit."""
    from flax.traverse_util import flatten_dict
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    arch, pair = hf_more
    tm, variables = pair.torch_model, pair.variables
    m = pm.infer(tm, pair.flax_model, variables)
    assert {e.flax_path for e in m.entries} == set(pm.flax_arrays(None, variables))
    ours = m.to_flax(pm.torch_arrays(tm))
    wrapper = SimpleNamespace(params=variables if arch == "resnet" else variables["params"],
                              base_model_prefix=tm.base_model_prefix)  # fmt: skip
    state = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    oracle = flatten_dict(convert_pytorch_state_dict_to_flax(state, wrapper))
    for path, array in ours.items():
        expected = np.asarray(oracle[path] if path in oracle else oracle[path[1:]])
        assert np.array_equal(array, expected), path
    _assert_round_trips(m, pm.torch_arrays(tm), pm.flax_arrays(None, variables))
    if arch == "gpt2":
        conv1d = [e for e in m.entries if "c_" in e.torch_name and e.torch_name.endswith("weight")]
        assert len(conv1d) == 8 and {e.layout for e in conv1d} == {"linear"}
        assert m.entry("transformer.h.0.attn.c_proj.weight").torch_shape == (32, 32)
    if arch == "bart":
        e = m.entry("final_logits_bias")
        assert e.kind == "buffer" and e.flax_path == ("params", "final_logits_bias")
    if arch == "resnet":
        norms = [x for x in tm.modules() if isinstance(x, nn.BatchNorm2d)]
        assert len(norms) >= 5 and len(m.buffers()) == 2 * len(norms)
        assert {e.flax_path[0] for e in m.buffers()} == {"batch_stats"}


# -- weight norm ---------------------------------------------------------------------------------


def test_wav2vec2_weight_norm_matches_transformers():
    """Wav2Vec2's positional convolution is weight-normed: torch's
    ``parametrizations.weight.original0/1`` (and the legacy ``weight_g``/``weight_v`` of
    ``torch.nn.utils.weight_norm``) are transformers' Flax ``weight_g``/``weight_v``, as its
    converter has them, bit for bit; ``masked_spec_embed`` (Flax only) needs ``ignore``."""
    pytest.importorskip("transformers")
    from flax.traverse_util import flatten_dict
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    from parity.own import hf

    pair = hf.wav2vec2(dtype="float32")
    tm, variables = pair.torch_model, pair.variables
    with pytest.raises(ValueError) as err:
        pm.infer(tm, pair.flax_model, variables)
    msg = str(err.value)
    assert "params/wav2vec2/masked_spec_embed (32,)" in msg
    assert "ignore=['params/wav2vec2/masked_spec_embed']" in msg
    assert "parametrizations" not in msg  # the weight-norm pair is matched
    wrapper = SimpleNamespace(params=variables["params"], base_model_prefix=tm.base_model_prefix)
    conv = "wav2vec2.encoder.pos_conv_embed.conv"
    flax_conv = ("params", "wav2vec2", "encoder", "pos_conv_embed", "conv")
    for form in ("parametrizations", "legacy"):
        if form == "legacy":
            module = tm.get_submodule(conv)
            torch.nn.utils.parametrize.remove_parametrizations(module, "weight")
            torch.nn.utils.weight_norm(module, name="weight", dim=2)
            g, v = f"{conv}.weight_g", f"{conv}.weight_v"
        else:
            g = f"{conv}.parametrizations.weight.original0"
            v = f"{conv}.parametrizations.weight.original1"
        m = pm.infer(tm, pair.flax_model, variables, ignore=pair.ignore)
        assert m.ignored == (("params", "wav2vec2", "masked_spec_embed"),)
        assert m.entry(g).flax_path == flax_conv + ("weight_g",)
        assert m.entry(v).flax_path == flax_conv + ("weight_v",)
        assert m.entry(g).layout == m.entry(v).layout == "same"
        assert m.entry(v).torch_shape == (32, 16, 4) and m.entry(g).torch_shape == (1, 1, 4)
        state = {k: val.detach().clone() for k, val in tm.state_dict().items()}
        oracle = flatten_dict(convert_pytorch_state_dict_to_flax(state, wrapper))
        ours = m.to_flax(pm.torch_arrays(tm))
        assert set(oracle) == {p[1:] for p in ours}
        for path, array in ours.items():
            expected = np.asarray(oracle[path[1:]])
            assert array.dtype == expected.dtype and np.array_equal(array, expected), path
        flax_all = pm.flax_arrays(None, variables)
        _assert_round_trips(m, pm.torch_arrays(tm), {p: flax_all[p] for p in ours})


class TorchWeightNormed(nn.Module):
    def __init__(self, square=False):
        super().__init__()
        if square:
            self.proj = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4), dim=None)
        else:
            self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 5, 2), dim=0)

    def forward(self, x):  # x: (batch, width, channels)
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class NnxWeightNormedConv(nnx.Module):
    """A weight-normed Conv1d that keeps v as a Flax kernel (width, in, out) and g (1, 1, out)."""

    def __init__(self, rngs):
        kw = dict(dtype=jnp.float64)
        self.weight_v = nnx.Param(jax.random.normal(rngs.params(), (2, 3, 5), **kw))
        self.weight_g = nnx.Param(jnp.ones((1, 1, 5), **kw))
        self.bias = nnx.Param(jnp.zeros((5,), **kw))

    def __call__(self, x):
        v = self.weight_v[...]
        kernel = v / jnp.linalg.norm(v, axis=(0, 1), keepdims=True) * self.weight_g[...]
        numbers = ("NWC", "WIO", "NWC")
        y = jax.lax.conv_general_dilated(x, kernel, (1,), "VALID", dimension_numbers=numbers)
        return y + self.bias[...]


class NnxSquare(nnx.Module):
    def __init__(self, g_shape):
        self.weight_g = nnx.Param(jnp.ones(g_shape))
        self.weight_v = nnx.Param(jnp.ones((4, 4)))
        self.bias = nnx.Param(jnp.zeros(4))


class NnxWeightNormed(nnx.Module):
    def __init__(self, rngs, square_g=None):
        if square_g is not None:
            self.proj = NnxSquare(square_g)
        else:
            self.conv = NnxWeightNormedConv(rngs)

    def __call__(self, x):
        return self.conv(x)


@pytest.mark.usefixtures("x64")
def test_weight_norm_pair_in_kernel_layout_and_ambiguity():
    """A port that stores v as a Flax conv kernel: g and v both take the conv layout (the
    forward passes agree in float64); a pair that fits both layouts is an error naming it."""
    torch.manual_seed(0)
    tm = TorchWeightNormed().double()
    fm = NnxWeightNormed(nnx.Rngs(0))
    m = pm.infer(tm, fm)
    g, v = "conv.parametrizations.weight.original0", "conv.parametrizations.weight.original1"
    assert (m.entry(g).layout, m.entry(v).layout) == ("conv", "conv")
    assert m.entry(g).flax_shape == (1, 1, 5)
    assert m.entry(v).flax_path == ("params", "conv", "weight_v")
    pm.load_flax(m, fm, pm.torch_arrays(tm))
    x = np.random.default_rng(0).normal(size=(2, 6, 3))
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x))), expected, rtol=1e-12, atol=1e-12)
    _assert_round_trips(m, pm.torch_arrays(tm), pm.flax_arrays(fm))

    with pytest.raises(ValueError) as err:
        square = TorchWeightNormed(square=True)
        g_shape = square.proj.parametrizations.weight.original0.shape
        pm.infer(square, NnxWeightNormed(nnx.Rngs(0), square_g=g_shape))
    msg = str(err.value)
    assert "layout is unknown" in msg
    assert "proj.parametrizations.weight.original1 (4, 4) [Linear weight_norm]" in msg
    assert "a weight-norm pair whose shapes fit both 'same' and 'linear'" in msg
    suggested = "overrides={'proj.parametrizations.weight.original0': ('params/proj/weight_g', "
    assert suggested + "'same'), 'proj.parametrizations.weight.original1': (" in msg
    names = ("proj.parametrizations.weight.original0", "proj.parametrizations.weight.original1")
    overrides = {names[0]: ("params/proj/weight_g", "same"), names[1]: ("proj/weight_v", "linear")}
    m = pm.infer(square, NnxWeightNormed(nnx.Rngs(0), square_g=g_shape), overrides=overrides)
    assert [m.entry(n).layout for n in names] == ["same", "linear"]
