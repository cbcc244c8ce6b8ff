"""Float64 trajectories: sf_optax (JAX) against sf_torch and the reference `schedulefree`.

The runners' training functions are called in this process (JAX and torch side by side; the
CLI keeps them apart, the numbers are the same). DESIGN.md section 3: params and losses agree
to 1e-10 relative at every step; the 8-device mesh reproduces the single-device run.
"""

import numpy as np
import pytest

from parity import tolerances
from parity.compare import compare
from parity.config import RunConfig
from parity.runners import optax_contrib, schedulefree, sf_optax, sf_optax_mesh, sf_torch

F64 = tolerances.FLOAT64_RELATIVE


def worst(record, baseline):
    c = compare(record, baseline)
    return {m: c.worst(m) for m in tolerances.METRICS}


def assert_within(record, baseline, limit=F64):
    diffs = worst(record, baseline)
    assert all(v <= limit for v in diffs.values()), diffs
    return diffs


def test_mlp_500_steps_adamw_matches_torch_and_reference():
    config = RunConfig(
        model="mlp",
        steps=500,
        dtype="float64",
        lr=0.005,
        weight_decay=0.01,
        warmup_steps=20,
        eval_every=5,
    )
    jax_run = sf_optax.train(config)
    torch_run = sf_torch.train(config)
    reference = schedulefree.train(config)
    assert_within(jax_run, reference)
    assert_within(torch_run, reference)
    # It trained (the comparison is not between two runs that stand still).
    assert reference.eval_loss[-1] < 0.3 * reference.eval_loss[0]
    assert np.isfinite(jax_run.eval_loss[::5]).all()


@pytest.mark.parametrize(
    "model, optimizer, steps",
    [("cnn", "adamw", 80), ("lm", "adamw", 60), ("mlp", "sgd", 100), ("mlp", "radam", 100)],
)
def test_models_and_optimizers_match_torch(model, optimizer, steps):
    config = RunConfig(
        model=model,
        optimizer=optimizer,
        steps=steps,
        dtype="float64",
        weight_decay=0.01,
        warmup_steps=0 if optimizer == "radam" else 10,
        r=0.5 if optimizer == "sgd" else 0.0,
        eval_every=10,
    )
    torch_run = sf_torch.train(config)
    assert_within(sf_optax.train(config), torch_run)
    assert torch_run.eval_loss[-1] < torch_run.eval_loss[0]


def test_mesh_reproduces_single_device():
    # tests/conftest.py gives this process 8 CPU devices.
    config = RunConfig(model="mlp", steps=60, dtype="float64", eval_every=10)
    assert_within(sf_optax_mesh.train(config), sf_torch.train(config))
    config32 = config.replace(dtype="float32")
    mesh32, single32 = sf_optax_mesh.train(config32), sf_optax.train(config32)
    assert "fsdp" in mesh32.meta["shardings"]["hidden.kernel"]
    assert worst(mesh32, single32)["eval_loss"] <= tolerances.FLOAT32_EVAL_LOSS_RELATIVE


def test_optax_contrib_without_warmup_agrees_and_with_warmup_is_expected_to_differ():
    config = RunConfig(model="mlp", steps=40, dtype="float64", eval_every=10)
    torch_run = sf_torch.train(config)
    assert optax_contrib.expected_difference(config) is None
    assert_within(optax_contrib.train(config), torch_run)

    warm = config.replace(warmup_steps=10)
    reason = optax_contrib.expected_difference(warm)
    assert reason and tolerances.limits("reference", "float64", reason) == {}
    diffs = worst(optax_contrib.train(warm), sf_torch.train(warm))
    assert diffs["params"] > 1e-3  # the one-step lag is visible, and only reported
