"""Moving a run between sf_optax and sf_torch mid-run keeps its float64 trajectory."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import sf_optax
from parity import handoff, tolerances
from parity.compare import compare
from parity.config import RunConfig
from parity.models import canonical, flax_models, torch_models
from parity.runners import sf_optax as sf_optax_runner
from parity.runners import sf_torch as sf_torch_runner
from parity.training.record import Record

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_jax_torch_jax_follows_the_single_framework_trajectory(model, tmp_path):
    config = RunConfig(
        model=model, steps=60, dtype="float64", weight_decay=0.01, warmup_steps=10, eval_every=3
    )
    whole = sf_optax_runner.train(config)
    parts = [
        sf_optax_runner.train(config.replace(steps=20, save_to=str(tmp_path / "s20.npz"))),
        sf_torch_runner.train(
            config.replace(
                first_step=20,
                steps=40,
                resume_from=str(tmp_path / "s20.npz"),
                save_to=str(tmp_path / "s40.npz"),
            )
        ),
        sf_optax_runner.train(config.replace(first_step=40, resume_from=str(tmp_path / "s40.npz"))),
    ]
    chain = Record.concatenate(parts)
    c = compare(chain, whole)
    diffs = {m: c.worst(m) for m in tolerances.METRICS}
    assert max(diffs.values()) <= tolerances.FLOAT64_RELATIVE, diffs
    # The torch segment trained from the handed-over state: its losses are not a restart's.
    restart = sf_torch_runner.train(config.replace(steps=40))
    assert abs(parts[1].train_loss[0] - restart.train_loss[20]) < 1e-10
    snapshot = handoff.Snapshot.load(tmp_path / "s40.npz")
    assert snapshot.k == 40 and snapshot.v is not None
    if model == "cnn":
        assert set(snapshot.buffers) == set(canonical.buffer_shapes("cnn"))


def test_state_round_trip_is_exact():
    with jax.enable_x64(True):
        config = RunConfig(model="mlp", steps=7, dtype="float64", warmup_steps=3)
        tx = sf_optax_runner.make_tx(config)
        params = {k: jnp.asarray(v) for k, v in canonical.init_params("mlp", 0).items()}
        state = tx.init(params)
        rng = np.random.default_rng(0)
        for _ in range(config.steps):
            grads = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params.items()}
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)

        module = torch_models.build("mlp", canonical.init_params("mlp", 1), None, torch.float64)
        opt = sf_torch_runner.make_optimizer(config, list(module.parameters()))
        handoff.optax_to_torch("mlp", "adamw", params, state, module, opt)
        group = opt.param_groups[0]
        sf = sf_optax.find_state(state)
        assert group["k"] == 7 and group["weight_sum"] == float(sf.weight_sum)
        assert group["lr_max"] == float(sf.lr_max) and group["betas"][0] == float(sf.b1)
        w = module.hidden.weight
        np.testing.assert_array_equal(w.detach().numpy(), np.asarray(params["hidden.kernel"]).T)
        np.testing.assert_array_equal(
            opt.state[w]["z"].numpy(), np.asarray(sf.z["hidden.kernel"]).T
        )
        nu = handoff._second_moment_states(sf.base_state)[0].nu
        np.testing.assert_array_equal(
            opt.state[w]["exp_avg_sq"].numpy(), np.asarray(nu["hidden.kernel"]).T
        )
        # x agrees across the move: torch's eval_params against sf_optax.eval_params.
        x_jax = sf_optax.eval_params(state, params)
        x_torch = torch_models.to_canonical("mlp", module, opt.eval_params())
        for name in params:
            np.testing.assert_allclose(x_torch[name], np.asarray(x_jax[name]), rtol=1e-14)

        params2, state2, _ = handoff.torch_to_optax("mlp", "adamw", module, opt, tx, jnp.float64)
        for a, b in zip(jax.tree.leaves((params2, state2)), jax.tree.leaves((params, state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_handoff_command(tmp_path):
    out = tmp_path / "handoff"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity",
            "handoff",
            "--model",
            "mlp",
            "--steps",
            "30",
            "--switch-at",
            "10,20",
            "--eval-every",
            "5",
            "--no-progress",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "handoff jax -> torch -> jax" in result.stdout
    assert (out / "report.json").exists() and (out / "report.png").exists()


def test_flax_twin_accepts_handed_over_params():
    # The canonical dict a snapshot holds is what flax_models.build takes.
    with jax.enable_x64(True):
        params = canonical.init_params("lm", 3)
        module = flax_models.build("lm", params, None, jnp.float64)
        got = flax_models.split(module)[1]
        for name, value in params.items():
            np.testing.assert_array_equal(np.asarray(got[name]), value)
