"""bench.local --quick (digits MLP, K = 4 workers, T = 40, 2 seeds), checked against numbers
computed here.

- Sync steps: constant H against hand-written lists; QSR, the 1/lr rule, ScheduleFreeQSR and
  AveragingWindow against ``sf_schedules.sync.sync_steps`` for rules built here on learning
  rates written out here (cosine and linear warmup in numpy); volumes = syncs x units (1 for
  AdamW, 2 for Schedule-Free's y and z, T for data-parallel).
- Runs (default backend: the workers as a vmap): the data-parallel rows equal one plain optax /
  sf_optax run on the concatenated batch (one device, no mesh); the local AdamW and
  Schedule-Free rows with H = 8 equal K workers stepped one by one here, whose params (and
  Schedule-Free's z) are averaged by hand.
- The mesh backend (one worker per CPU device, sf_optax.local's shard_map step) gives the
  same numbers as the vmap backend (one seed).
- The summary (mean, std, paired difference, reaches, target) is recomputed from the per-seed
  numbers.
- Bad options are refused with messages naming the option and its range.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax
from bench.local import cli
from parity import data as parity_data
from parity.models import canonical
from sf_schedules import sync

ROOT = Path(__file__).resolve().parents[1]
K, B, T, W, LR, SEEDS, HB = 4, 8, 40, 4, 1e-2, 2, 4


def _bench(path, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.local", "--quick", "--out", str(path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, proc.stdout


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def results(out):
    return json.loads((out[0] / "results.json").read_text())


def by_name(results, optimizer, name):
    (row,) = [r for r in results["rows"] if r["optimizer"] == optimizer and r["name"] == name]
    return row


def cosine_lrs():
    s = np.arange(T, dtype=np.float64)
    p = (s - W) / (T - 1 - W)
    return np.where(s < W, LR * (s + 1) / W, 0.5 * LR * (1 + np.cos(math.pi * p)))


def constant_lrs():
    s = np.arange(T, dtype=np.float64)
    return np.where(s < W, LR * (s + 1) / W, LR)


def test_settings_and_rows(results):
    s = results["settings"]
    assert (s["task"], s["workers"], s["batch"], s["steps"], s["warmup"]) == ("digits", K, B, T, W)
    assert (s["lr"], s["sf_lr"], s["h_base"]) == (LR, LR, HB)
    assert results["seeds"] == list(range(SEEDS))
    names = {(r["optimizer"], r["name"]) for r in results["rows"]}
    for opt in ("adamw", "sf"):
        for name in ("data-parallel", "constant H=8", "constant H=32", "QSR", "1/lr"):
            assert (opt, name) in names
    for name in ("ScheduleFreeQSR a=0.5", "ScheduleFreeQSR a=1", "AveragingWindow f=0.1"):
        assert ("sf", name) in names


def test_sync_steps_and_volume(results):
    hand = {"constant H=8": [8, 16, 24, 32, 40], "constant H=32": [32, 40]}
    a_qsr = LR * math.sqrt(HB) / 2
    a_inv = LR * HB / 2
    rules = {
        ("adamw", "QSR"): (sync.QSR(HB, a_qsr, warmup_steps=W), cosine_lrs()),
        ("adamw", "1/lr"): (sync.QSR(HB, a_inv, power=1.0, warmup_steps=W), cosine_lrs()),
        ("sf", "QSR"): (sync.QSR(HB, a_qsr, warmup_steps=W), constant_lrs()),
        ("sf", "ScheduleFreeQSR a=1"): (
            sync.ScheduleFreeQSR(HB, LR, b1=0.9, warmup_steps=W),
            constant_lrs(),
        ),
        ("sf", "AveragingWindow f=0.25"): (
            sync.AveragingWindow(0.25, h_base=HB, h_max=T, warmup_steps=W),
            constant_lrs(),
        ),
    }
    for r in results["rows"]:
        units = {"adamw": 1, "sf": 2}[r["optimizer"]]
        if r["name"] == "data-parallel":
            assert r["syncs"] == T and r["volume"] == T and r["volume_fraction"] == 1.0
            continue
        if r["name"] in hand:
            assert r["sync_steps"] == hand[r["name"]]
        key = (r["optimizer"], r["name"])
        if key in rules:
            assert r["sync_steps"] == list(sync.sync_steps(*rules[key]))
        assert r["sync_steps"][-1] == T
        assert r["syncs"] == len(r["sync_steps"])
        assert r["volume"] == r["syncs"] * units
        assert r["volume_fraction"] == pytest.approx(r["volume"] / T)
    # QSR on Schedule-Free's constant lr is a constant period h_base after warmup.
    assert by_name(results, "sf", "QSR")["sync_steps"] == list(range(4, T + 1, 4))


def test_summary_recomputed(results):
    for r in results["rows"]:
        for key in ("eval_loss", "eval_accuracy"):
            vals = np.array([p[key] for p in r["per_seed"]])
            assert len(vals) == SEEDS
            assert r[key]["mean"] == pytest.approx(vals.mean(), rel=1e-12)
            assert r[key]["std"] == pytest.approx(vals.std(ddof=1), rel=1e-12)
            assert (r[key]["min"], r[key]["max"]) == (vals.min(), vals.max())
        # Every run ends right after a sync: the workers hold the same params.
        assert max(p["worker_spread"] for p in r["per_seed"]) <= 1e-6
        dp = by_name(results, r["optimizer"], "data-parallel")["eval_loss"]
        dp_runs = by_name(results, r["optimizer"], "data-parallel")["per_seed"]
        diffs = [a["eval_loss"] - b["eval_loss"] for a, b in zip(r["per_seed"], dp_runs)]
        assert r["loss_minus_dp"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
        reaches = r["eval_loss"]["mean"] <= dp["mean"] + dp["std"]
        assert r["reaches_dp"] == reaches
        assert r["meets_target"] == (reaches and r["volume"] <= 0.25 * T)


def test_table_and_plot(out, results):
    path, stdout = out
    assert (path / "local.png").stat().st_size > 10_000
    table = (path / "table.txt").read_text()
    assert table.strip() in stdout
    for r in results["rows"]:
        line = next(
            ln for ln in table.splitlines() if ln.startswith(f"{r['optimizer']:5s} {r['name']} ")
        )
        assert f"{r['eval_loss']['mean']:.4f}" in line
        assert f" {r['volume']} " in line


# -- the runs, replayed here -----------------------------------------------------------------


def _mlp_loss(params, x, y):
    h = jnp.maximum(x @ params["hidden.kernel"] + params["hidden.bias"], 0.0)
    logits = h @ params["out.kernel"] + params["out.bias"]
    logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1)), logits


def _data(seed):
    d = parity_data.load("mlp", seed, K * B, "float32")
    batches = [d.train_batch(t) for t in range(T)]
    params = {k: jnp.asarray(v, jnp.float32) for k, v in canonical.init_params("mlp", seed).items()}
    return batches, params, (jnp.asarray(d.eval_inputs), jnp.asarray(d.eval_labels))


def _eval(params, eval_set):
    loss, logits = _mlp_loss(params, *eval_set)
    return float(loss), float(jnp.mean(jnp.argmax(logits, -1) == eval_set[1]))


def _adamw():
    lrs = cosine_lrs()
    return optax.adamw(lambda count: jnp.asarray(lrs, jnp.float32)[count], weight_decay=0.0)


def _sf():
    return sf_optax.adamw(LR, b1=0.9, warmup_steps=W)


def _replay(tx, seed, sync_steps=None):
    """``sync_steps`` None: data-parallel on the global batch; else K workers on their slices,
    averaging params (and Schedule-Free's z) after the listed steps."""
    batches, params0, eval_set = _data(seed)
    grad = jax.jit(jax.grad(lambda p, x, y: _mlp_loss(p, x, y)[0]))
    update = jax.jit(tx.update)
    n = 1 if sync_steps is None else K
    params = [params0] * n
    states = [tx.init(params0)] * n
    for t, (x, y) in enumerate(batches):
        for k in range(n):
            xs, ys = (x, y) if n == 1 else (x[k * B : (k + 1) * B], y[k * B : (k + 1) * B])
            g = grad(params[k], jnp.asarray(xs), jnp.asarray(ys))
            u, states[k] = update(g, states[k], params[k])
            params[k] = optax.apply_updates(params[k], u)
        if sync_steps is not None and t + 1 in sync_steps:
            mean = jax.tree.map(lambda *a: sum(a) / n, *params)
            params = [mean] * n
            if hasattr(states[0], "z"):
                z = jax.tree.map(lambda *a: sum(a) / n, *[s.z for s in states])
                states = [s._replace(z=z) for s in states]
    final = params[0]
    if hasattr(states[0], "z"):
        final = sf_optax.eval_params(states[0], final)
    return _eval(final, eval_set)


@pytest.mark.parametrize(
    "optimizer,name",
    [
        ("adamw", "data-parallel"),
        ("sf", "data-parallel"),
        ("adamw", "constant H=8"),
        ("sf", "constant H=8"),
    ],
)
def test_runs_replayed(results, optimizer, name):
    row = by_name(results, optimizer, name)
    tx = _adamw() if optimizer == "adamw" else _sf()
    syncs = None if name == "data-parallel" else [8, 16, 24, 32, 40]
    for seed in range(SEEDS):
        loss, acc = _replay(tx, seed, syncs)
        got = row["per_seed"][seed]
        assert got["eval_loss"] == pytest.approx(loss, rel=2e-5, abs=1e-6)
        assert got["eval_accuracy"] == pytest.approx(acc, abs=1.5 / 450)


def test_local_differs_from_data_parallel(results):
    # A check that the replay can tell the rows apart: local AdamW H=8 is not data-parallel.
    dp = by_name(results, "adamw", "data-parallel")["per_seed"][0]["eval_loss"]
    local = by_name(results, "adamw", "constant H=8")["per_seed"][0]["eval_loss"]
    assert abs(dp - local) > 1e-3


def test_mesh_backend_matches(results, tmp_path):
    """The same rows on a 4-device mesh (sf_optax.local.make_local_train_step, shard_map) give
    the vmap backend's numbers."""
    path, _ = _bench(tmp_path, "--backend", "mesh", "--seeds", "1")
    mesh = json.loads((path / "results.json").read_text())
    assert mesh["backend"] == "mesh" and results["backend"] == "vmap"
    for a, b in zip(mesh["rows"], results["rows"]):
        assert (a["optimizer"], a["name"], a["sync_steps"]) == (
            b["optimizer"],
            b["name"],
            b["sync_steps"],
        )
        got, want = a["per_seed"][0], b["per_seed"][0]
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=2e-5, abs=1e-6)


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "0"], "--seeds must be in [1, 100], got 0"),
        (["--workers", "1"], "--workers must be in [2, 64], got 1"),
        (["--steps", "x"], "--steps must be an integer, got 'x'"),
        (["--lr", "-1"], "--lr must be in (0, inf), got -1.0"),
        (["--task", "mnist"], "invalid choice: 'mnist'"),
    ],
)
def test_bad_options(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_bad_combinations():
    with pytest.raises(SystemExit, match=r"--warmup must be in \[0, 39\]"):
        cli.settings_from(cli.parser().parse_args(["--quick", "--warmup", "40"]))
    with pytest.raises(SystemExit, match="--workers x --batch must be at most 1347"):
        cli.settings_from(
            cli.parser().parse_args(["--task", "digits", "--workers", "64", "--batch", "64"])
        )


def test_schedule_free_default(results):
    """The recommended Schedule-Free rule is the bench's ScheduleFreeQSR a=0.5 row; its late
    rounds last floor((0.5 / (0.1 + 0.9 c_t))**2) steps, 24 once c_t < 1/2000 (25 in the
    limit), written out here."""
    rule = sync.schedule_free_default(LR, warmup_steps=W)
    row = by_name(results, "sf", "ScheduleFreeQSR a=0.5")
    assert row["sync_steps"] == list(sync.sync_steps(rule, constant_lrs()))
    steps = np.array(sync.sync_steps(rule, [LR] * 4000))
    late = np.diff(steps)[steps[:-1] > 2500][:-1]  # the last round is clamped to the end
    assert set(late.tolist()) == {24}
    with pytest.raises(ValueError, match="lr"):
        sync.schedule_free_default(0.0)
