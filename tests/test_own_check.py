"""parity.own.check on pairs this project did not write (transformers' RoBERTa and ViT) and on
a hand-written nnx pair with BatchNorm: sf_optax against sf_torch (the other framework), the
reference ``schedulefree`` classes and optax.contrib, the zero-gradient leaves, the CLI and the
state handoff between frameworks.

Budget: the whole file runs in about two minutes on one CPU core (most of it JAX compiling the
transformers models); the step counts below are what fits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("flax")

from parity.own import check as check_lib  # noqa: E402
from parity.own.spec import Pair, load_spec  # noqa: E402

METRICS = ("params", "train_loss", "eval_loss")
F64 = 1e-10
F32_EVAL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _hf(arch: str, dtype: str = "float64"):
    pytest.importorskip("transformers")
    return load_spec(f"parity.own.hf:{arch}", dtype=dtype)


def _worst(result, name):
    return result.row(name).max_diff


def _bn_pair(dtype: str = "float64") -> Pair:
    """A small CNN with BatchNorm written twice: torch (NCHW) and flax.nnx (NHWC)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    tdtype = getattr(torch, dtype)

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(6)
            self.head = torch.nn.Linear(6, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            return self.head(h.mean(dim=(2, 3)))

    class FlaxNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 6, (3, 3), padding=1, rngs=rngs)
            self.bn = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
            self.head = nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.relu(self.bn(self.conv(x)))
            return self.head(h.mean(axis=(1, 2)))

    torch.manual_seed(0)
    torch_model = TorchNet().to(tdtype)
    flax_model = FlaxNet(nnx.Rngs(0))

    def torch_loss(model, batch):
        logits = model(batch["x"])
        return torch.nn.functional.cross_entropy(logits, batch["y"])

    def flax_loss(model, batch):
        logits = model(jnp.transpose(batch["x"], (0, 2, 3, 1)))
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, batch["y"][:, None], axis=1).mean()

    rng = np.random.default_rng(0)

    def batches(n):
        return [
            {"x": rng.normal(size=(8, 3, 5, 5)), "y": rng.integers(0, 4, size=8)} for _ in range(n)
        ]

    return Pair(
        torch_model, flax_model, torch_loss, flax_loss, batches(4), batches(1), name="bn-cnn"
    )


def test_roberta_float64_every_row():
    """RoBERTa float64: sf_optax, the reference classes and optax.contrib against sf_torch over
    200 steps; the attention key biases are zero-gradient leaves, compared absolutely."""
    result = check_lib.check_pair(_hf("roberta"), steps=200, lr=2e-3, log=False)
    assert result.exit_code == 0, result.table()
    for name in ("sf_optax", "schedulefree", "optax_contrib"):
        worst = _worst(result, name)
        assert max(worst[m] for m in METRICS) <= F64, (name, worst)
    zero = result.zero_gradient["leaves"]
    assert zero == [f"roberta.encoder.layer.{i}.attention.self.key.bias" for i in (0, 1)]
    assert "zero-gradient leaves" in result.table()
    for name in ("sf_optax", "optax_contrib"):
        assert 0 < _worst(result, name)["zero_gradient_abs"] <= 1e-12
    # Compared relatively, the key bias (rounding noise on a zero start) would fail.
    from parity.compare import compare

    plain = compare(result.row("sf_optax").record, result.row("sf_torch").record)
    assert plain.worst("params") > F64
    # Training did something: the training loss fell (labels are random: the eval loss need not).
    record = result.row("sf_torch").record
    assert record.train_loss[-8:].mean() < record.train_loss[:8].mean() - 0.5


def test_vit_float64():
    pair = _hf("vit")
    # transformers' Flax ViT wrapper casts pixel_values to float32 (FlaxViTPreTrainedModel):
    # give it images that float32 holds exactly, so that both sides see the same input.
    for batch in pair.batches + pair.eval_batches:
        batch["pixel_values"] = batch["pixel_values"].astype(np.float32).astype(np.float64)
    result = check_lib.check_pair(
        pair, steps=200, lr=2e-3, backends=("sf_torch", "sf_optax"), log=False
    )
    assert result.exit_code == 0, result.table()
    assert max(_worst(result, "sf_optax")[m] for m in METRICS) <= F64


@pytest.mark.parametrize("arch", ["bart", "resnet"])
def test_more_transformers_float64(arch):
    """BART (an encoder-decoder whose final_logits_bias is a torch buffer and a Flax param,
    held fixed in both) and ResNet (linen BatchNorm, statistics recomputed at x): sf_optax
    against sf_torch over a few steps, float64."""
    result = check_lib.check_pair(
        _hf(arch), steps=6, lr=2e-3, backends=("sf_torch", "sf_optax"), log=False
    )
    assert result.exit_code == 0, result.table()
    assert max(_worst(result, "sf_optax")[m] for m in METRICS) <= F64, result.table()
    fixed = [n for n in result.notes if n.startswith("held fixed")]
    assert fixed == (["held fixed in Flax as torch does (a torch buffer, a Flax param): "
                      "final_logits_bias"] if arch == "bart" else [])  # fmt: skip


def test_roberta_float32_eval_loss():
    result = check_lib.check_pair(
        _hf("roberta", "float32"),
        dtype="float32",
        steps=200,
        lr=2e-3,
        backends=("sf_torch", "sf_optax"),
        log=False,
    )
    assert result.exit_code == 0, result.table()
    assert _worst(result, "sf_optax")["eval_loss"] <= F32_EVAL


def test_nnx_batchnorm_pair_float64():
    """Conv + BatchNorm + Linear in torch and nnx: the statistics recomputed at x on both
    sides (biased variance), sf_optax within 1e-10 of sf_torch, the reference within too."""
    result = check_lib.check_pair(
        _bn_pair(),
        steps=200,
        lr=5e-3,
        weight_decay=1e-3,
        warmup_steps=10,
        backends=("sf_torch", "sf_optax", "schedulefree"),
        log=False,
    )
    assert result.exit_code == 0, result.table()
    for name in ("sf_optax", "schedulefree"):
        worst = _worst(result, name)
        assert max(worst[m] for m in METRICS) <= F64, (name, result.table())
    # The conv bias feeds BatchNorm, which subtracts the mean: its gradient is exactly zero.
    assert result.zero_gradient["leaves"] == ["conv.bias"]
    assert _worst(result, "sf_optax")["zero_gradient_abs"] <= 1e-6


def test_linen_batchnorm_pair_float64():
    """A linen MLP with BatchNorm (variables with batch_stats, a training loss returning its
    updates) against torch's BatchNorm1d: statistics recomputed at x on both sides."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 6)
            self.bn = torch.nn.BatchNorm1d(6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.fc(x))))

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(6, name="fc")(x))
            return nn.Dense(3, name="head")(nn.relu(h))

    torch.manual_seed(0)
    linen = LinenNet()
    variables = linen.init(jax.random.PRNGKey(0), jnp.ones((4, 5)), train=False)

    def nll(logits, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1).mean()

    def flax_loss(v, batch):
        logits, updates = linen.apply(v, batch["x"], train=True, mutable=["batch_stats"])
        return nll(logits, batch["y"]), updates

    def flax_eval_loss(v, batch):
        return nll(linen.apply(v, batch["x"], train=False), batch["y"])

    def torch_loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(8, 5)), "y": rng.integers(0, 3, size=8)} for _ in range(4)]
    result = check_lib.check(
        TorchNet(),
        linen,
        torch_loss,
        flax_loss,
        batches,
        eval_batches=batches[:1],
        variables=dict(variables),
        flax_eval_loss=flax_eval_loss,
        steps=200,
        lr=5e-3,
        backends=("sf_torch", "sf_optax"),
        log=False,
    )
    assert result.exit_code == 0, result.table()
    assert max(_worst(result, "sf_optax")[m] for m in METRICS) <= F64
    assert result.zero_gradient["leaves"] == ["fc.bias"]  # BatchNorm subtracts its mean


def test_handoff_both_ways():
    """torch -> jax at step 15 and jax -> torch at step 30: both directions in one run."""
    pair = _hf("roberta")
    for start in ("torch", "jax"):
        out = check_lib.handoff(pair, switch_at=[15, 30], start=start, steps=40, lr=2e-3)
        assert out["zero_gradient"]["leaves"], out["zero_gradient"]
        # The moved run against each unmoved one, and the two unmoved ones against each other.
        for name, comparison in out["comparisons"].items():
            for metric in METRICS:
                assert comparison.worst(metric) <= F64, (start, name, metric)
        # Moved into the framework it started in, it is that framework's run bit for bit
        # until the first switch.
        moved = out["records"][f"handoff {out['route']}"]
        alone = out["records"]["sf_torch" if start == "torch" else "sf_optax"]
        assert np.array_equal(moved.train_loss[:15], alone.train_loss[:15])


def test_handoff_batchnorm_pair():
    """The nnx BatchNorm pair (BatchNorm statistics moved with the state, conv kernels in
    their layouts), jax -> torch -> jax."""
    out = check_lib.handoff(_bn_pair(), switch_at=[10, 20], start="jax", steps=30, lr=5e-3)
    for name, comparison in out["comparisons"].items():
        for metric in METRICS:
            assert comparison.worst(metric) <= F64, (name, metric)


def test_deepspeed_rows_from_spec():
    """sf_torch under DeepSpeed ZeRO-3 on 2 CPU ranks, each rank rebuilding RoBERTa from the
    SPEC and starting from the saved initial weights; float32 within the eval-loss limit."""
    pytest.importorskip("deepspeed")
    spec = "parity.own.hf:roberta"
    result = check_lib.check_pair(
        load_spec(spec, dtype="float32"),
        dtype="float32",
        steps=8,
        backends=("sf_torch", "deepspeed_z3"),
        spec=spec,
        log=False,
    )
    assert result.exit_code == 0, result.table()
    row = result.row("deepspeed_z3")
    assert row.role == "distributed" and row.limits == {"eval_loss": F32_EVAL}
    assert row.max_diff["eval_loss"] <= F32_EVAL
    assert row.record.meta["zero_stage"] == 3 and row.record.meta["ranks"] == 2
    # Without a SPEC there is nothing for the ranks to rebuild: a skipped row, said why.
    alone = check_lib.check_pair(
        _hf("roberta", "float32"),
        dtype="float32",
        steps=2,
        backends=("sf_torch", "deepspeed_z2"),
        log=False,
    )
    assert alone.row("deepspeed_z2").status == "skipped"
    assert "SPEC" in alone.row("deepspeed_z2").note


def test_compare_absolute_by_hand():
    """compare(absolute=...) on numbers worked out by hand; without it, as before."""
    from parity.compare import compare
    from parity.training.record import Record

    def record(w, b):
        return Record(
            first_step=0,
            train_loss=np.array([1.0]),
            eval_loss=np.array([1.0, 1.0]),
            params={"w": np.array(w), "b": np.array(b)},
        )

    base = record([[2.0, -4.0], [2.0, -4.0]], [[0.0], [1e-15]])
    run = record([[2.0, -4.0], [2.0, -4.0 + 4e-12]], [[0.0], [3e-15]])
    plain = compare(run, base)
    assert plain.absolute is None
    assert plain.params[1] == pytest.approx(2e-15 / 1e-15)  # b against its own scale
    split = compare(run, base, absolute={"b"})
    assert split.params[1] == pytest.approx(4e-12 / 4.0)  # w alone
    assert split.absolute[1] == pytest.approx(2e-15 / 4.0)  # b against the largest |param|
    assert split.absolute[0] == 0.0
    with pytest.raises(ValueError, match="absolute"):
        compare(run, base, absolute={"nope"})


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "parity", "check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_roberta(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "report"
    done = _cli(
        "parity.own.hf:roberta",
        "--steps",
        "20",
        "--backends",
        "sf_torch,sf_optax",
        "--out",
        str(out),
        "--divergence",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first batch, layer by layer: no divergence" in done.stdout
    payload = json.loads((out / "report.json").read_text())
    assert payload["exit_code"] == 0
    assert [r["name"] for r in payload["rows"]] == ["sf_torch", "sf_optax"]
    assert len(payload["zero_gradient"]["leaves"]) == 2
    assert payload["divergence"]["kind"] is None
    assert "\r" not in done.stdout + done.stderr


def test_cli_bad_spec_and_flags():
    done = _cli("no_such_module_xyz:pair")
    assert done.returncode == 2
    assert "SPEC" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = _cli("parity.own.hf:roberta", "--lr", "-1")
    assert done.returncode == 2 and "--lr" in done.stderr


def test_inner_momentum_rows_on_a_pair():
    """AdamW with upstream main's inner_momentum on the nnx BatchNorm pair: sf_optax against
    sf_torch (the other framework) within float64 tolerance; the 1.4.1 and optax.contrib rows,
    which have no inner momentum, are skipped rows, not failures."""
    result = check_lib.check_pair(
        _bn_pair("float64"), steps=30, dtype="float64", inner_momentum=0.9, log=False
    )
    assert result.exit_code == 0, result.table()
    assert result.row("sf_optax").max_diff["params"] <= 1e-10
    for name in ("schedulefree", "optax_contrib"):
        assert result.row(name).status == "skipped", result.table()
    with pytest.raises(ValueError, match="inner_momentum is AdamW's"):
        check_lib.check_pair(_bn_pair("float64"), optimizer="sgd", inner_momentum=0.5, log=False)
