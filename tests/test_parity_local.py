"""The local-steps parity backends: K torch ranks (local_torch) against K JAX CPU devices
(local_optax) on the twin models, and H = 1 against data-parallel.

Each run is a child process (``parity.launch``, as ``python -m parity run`` starts them); the
numbers they are checked against come from elsewhere: the other framework, sync lists written
by hand or computed here from hand-written learning rates, the single-process sf_torch run
trained in this process, and a numpy float64 MLP trained by plain SGD on the whole batch.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import data as data_lib
from parity import launch, runners, tolerances
from parity.compare import compare
from parity.config import RunConfig
from parity.models import canonical
from parity.training import local_plan
from parity.training.record import Record
from sf_schedules import sync as sync_rules

ROOT = Path(__file__).resolve().parent.parent
F64 = tolerances.FLOAT64_RELATIVE
F32 = tolerances.FLOAT32_EVAL_LOSS_RELATIVE


def run_pair(jobs, tmp_path):
    """Runs ``[(backend name, config), ...]`` (distinct backends, two at a time); their
    records, in order."""
    registry = runners.discover()
    for name, config in jobs:
        assert registry[name].unsupported(config) is None, (name, config)
    outcomes = launch.run_all(
        [(registry[name], config) for name, config in jobs], tmp_path, parallel=2, progress="off"
    )
    for name, _ in jobs:
        assert outcomes[name].record is not None, outcomes[name].error
    return [outcomes[name].record for name, _ in jobs]


def local(workers, sync, plain_sgd=False):
    return {"local": {"workers": workers, "sync": sync, "plain_sgd": plain_sgd}}


def assert_in_sync_after_syncs(record, steps):
    """The workers hold one model right after each sync and part inside the rounds."""
    spread = np.asarray(record.meta["spread"])
    synced = np.zeros(len(spread), bool)
    synced[0] = True
    synced[list(steps)] = True
    assert spread[synced].max() <= 1e-15
    if not synced.all():
        assert spread[~synced].min() > 1e-6


# -- torch vs JAX ---------------------------------------------------------------------------------


def test_cnn_float64_qsr_300_steps_torch_and_jax_agree(tmp_path):
    # QSR with a warmup: H = 1 while warming up (h_warm), then max(2, floor((0.011 / 0.005)^2))
    # = 4 at AdamW's lr 0.005. Eval every 25 steps: inside rounds too (x of the workers' mean),
    # with BatchNorm statistics re-estimated at x per worker and averaged.
    config = RunConfig(
        model="cnn",
        steps=300,
        dtype="float64",
        warmup_steps=20,
        eval_every=25,
        extra=local(2, "qsr:h_base=2,alpha=0.011,h_warm=1"),
    )
    by_hand = tuple(range(1, 21)) + tuple(range(24, 301, 4))
    torch_rec, jax_rec = run_pair([("local_torch", config), ("local_optax", config)], tmp_path)
    for rec in (torch_rec, jax_rec):
        assert tuple(rec.meta["sync_steps"]) == by_hand
        assert rec.meta["workers"] == 2
        assert_in_sync_after_syncs(rec, by_hand)
    assert jax_rec.eval_loss[-1] < 0.2 * jax_rec.eval_loss[0]  # it trained
    c = compare(jax_rec, torch_rec)
    for metric in ("params", "train_loss", "eval_loss"):
        assert c.worst(metric) <= F64, (metric, c.worst(metric))
    # Each worker's own loss on its own rows, not only their mean.
    a = np.asarray(jax_rec.meta["worker_train_loss"])
    b = np.asarray(torch_rec.meta["worker_train_loss"])
    assert a.shape == (300, 2) and np.max(np.abs(a - b) / np.abs(b)) <= F64


# -- H = 1 against data-parallel ------------------------------------------------------------------


def numpy_sgd_mlp(config) -> Record:
    """Plain SGD on the whole batch, float64 numpy: the data-parallel trajectory of the MLP."""
    data = data_lib.load("mlp", config.seed, config.batch_size, "float64")
    p = {k: v.copy() for k, v in canonical.init_params("mlp", config.seed).items()}
    rec = Record.empty(0, config.steps, canonical.param_shapes("mlp"), np.float64)

    def forward(p, inputs, labels):
        pre = inputs @ p["hidden.kernel"] + p["hidden.bias"]
        h = np.maximum(pre, 0.0)
        logits = h @ p["out.kernel"] + p["out.bias"]
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -logp[np.arange(len(labels)), labels].mean()
        return loss, pre, h, logp

    def observe(t):
        rec.set_params(t, p)
        if config.evaluates_at(t):
            rec.eval_loss[t] = forward(p, data.eval_inputs, data.eval_labels)[0]

    observe(0)
    for t in range(config.steps):
        inputs, labels = data.train_batch(t)
        loss, pre, h, logp = forward(p, inputs, labels)
        d = np.exp(logp)
        d[np.arange(len(labels)), labels] -= 1.0
        d /= len(labels)
        dh = (d @ p["out.kernel"].T) * (pre > 0)
        grads = {
            "out.kernel": h.T @ d,
            "out.bias": d.sum(axis=0),
            "hidden.kernel": inputs.T @ dh,
            "hidden.bias": dh.sum(axis=0),
        }
        for name, g in grads.items():
            p[name] = p[name] - config.lr * (g + config.weight_decay * p[name])
        rec.train_loss[t] = loss
        observe(t + 1)
    return rec


def test_sgd_syncing_every_step_is_data_parallel(tmp_path):
    # SGD, Schedule-Free or plain, is linear in the gradient with the same scalars on every
    # worker: averaging (y and z) after every step is stepping on the whole batch's mean
    # gradient. With H = 2 the workers step apart in between, and the same check fails.
    base = RunConfig(model="mlp", optimizer="sgd", steps=60, dtype="float64", eval_every=5)
    sf_h2 = base.replace(extra=local(2, "constant:period=2"))
    sf_h1 = base.replace(extra=local(4, "constant:period=1"))
    plain = base.replace(lr=0.3, extra=local(4, "constant:period=1", plain_sgd=True))
    assert local_plan.data_parallel_gap(sf_h1) is None
    assert local_plan.data_parallel_gap(plain) is None
    assert "average 30 times" in local_plan.data_parallel_gap(sf_h2)
    torch_h2, jax_h1 = run_pair([("local_torch", sf_h2), ("local_optax", sf_h1)], tmp_path)
    (jax_plain,) = run_pair([("local_optax", plain)], tmp_path / "plain")
    assert jax_plain.meta["optimizer"] == "optax.sgd"

    from parity.runners import sf_torch

    single = sf_torch.train(base)  # Schedule-Free SGD on the whole batch, trained here
    c = compare(jax_h1, single)
    for metric in ("params", "train_loss", "eval_loss"):
        assert c.worst(metric) <= F64, (metric, c.worst(metric))
    assert compare(torch_h2, single).worst("params") > 1e3 * F64

    reference = numpy_sgd_mlp(base.replace(lr=0.3))  # plain SGD on the whole batch, numpy
    assert reference.eval_loss[-1] < 0.5 * reference.eval_loss[0]
    c = compare(jax_plain, reference)
    for metric in ("params", "train_loss", "eval_loss"):
        assert c.worst(metric) <= F64, (metric, c.worst(metric))


@pytest.mark.parametrize(
    "optimizer, warmup, sgd_phase",
    [("adamw", 7, False), ("sgd", 0, False), ("radam", 0, False), ("radam", 0, True)],
)
def test_sync_list_reads_the_optimizers_own_learning_rates(optimizer, warmup, sgd_phase):
    # The learning rates the rules read are those sf_torch's step uses (its own helper).
    from sf_torch import rule as sf_rule

    config = RunConfig(
        optimizer=optimizer,
        steps=40,
        warmup_steps=warmup,
        silent_sgd_phase=not sgd_phase,
        extra=local(2, "qsr:h_base=1,alpha=0.01"),
    )
    group = {
        "lr": config.lr,
        "betas": (config.b1, config.b2),
        "warmup_steps": warmup,
        "silent_sgd_phase": config.silent_sgd_phase,
    }
    own = [sf_rule._lr_of_step(group, optimizer, t) for t in range(config.steps)]
    np.testing.assert_allclose(local_plan.run_lrs(config), own, rtol=1e-15, atol=0)
    assert local_plan.sync_steps(config) == sync_rules.sync_steps(
        sync_rules.QSR(1, 0.01, warmup_steps=warmup), own
    )


# -- the CLI --------------------------------------------------------------------------------------


def cli(*argv):
    from parity import cli as cli_lib

    return cli_lib.parse_args(["run", *argv])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sync", "qsr:h_base=2"], "argument --sync: rule 'qsr' needs alpha=..."),
        (["--sync", "hourly"], "argument --sync: the rule must be one of"),
        (["--sync", "constant:period=0"], "argument --sync: rule 'constant': period must be in"),
        (["--sync", "qsr:h_base=2,alpha=0.1,fraction=1"], "'fraction' is not a constant of"),
        (["--workers", "0"], "argument --workers: must be in {1, 2, 3, ...}, got 0"),
        (["--plain-sgd"], "argument --plain-sgd: needs --optimizer sgd"),
    ],
)
def test_bad_local_flags_are_one_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_backends_are_opt_in_and_listed():
    from parity import cli as cli_lib

    registry = runners.discover()
    default = cli_lib._select(cli(), registry)
    assert "local_torch" not in default and "local_optax" not in default and "sf_torch" in default
    listing = subprocess.run(
        [sys.executable, "-m", "parity", "backends"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for name in ("local_torch", "local_optax"):
        line = next(row for row in listing.splitlines() if row.startswith(name))
        assert "opt-in" in line


def test_cli_float32_four_workers_local_rows_checked_against_each_other(tmp_path):
    # Schedule-Free QSR: rounds grow as the averaging weight c_t falls. Another algorithm than
    # the single-process run, so the baseline is local_torch and sf_torch's row is reported,
    # not failed.
    steps, lr, warmup = 100, 0.005, 10
    spec = "schedule_free_qsr:h_base=2,alpha=0.002,h_max=16"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "parity", "run", "--no-progress", "--keep-records"),
            *("--steps", str(steps), "--lr", str(lr), "--warmup-steps", str(warmup)),
            *("--dtype", "float32", "--eval-every", "5", "--workers", "4", "--sync", spec),
            *("--backends", "sf_torch,local_torch,local_optax", "--out", str(tmp_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["baseline"] == "local_torch"
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["local_optax"]["status"] == "ok"
    assert "expected to differ" in rows["sf_torch"]["note"]

    # The sync list from learning rates written here (AdamW's warmup, DESIGN.md section 1).
    lrs = [lr * min(1.0, (t + 1) / warmup) for t in range(steps)]
    rule = sync_rules.ScheduleFreeQSR(h_base=2, alpha=0.002, h_max=16, warmup_steps=warmup)
    expected = sync_rules.sync_steps(rule, lrs)
    assert len(set(np.diff(expected))) > 2  # rounds that grow: a schedule worth checking
    torch_rec, jax_rec = (
        Record.load(tmp_path / "records" / f"{name}.npz") for name in ("local_torch", "local_optax")
    )
    for rec in (torch_rec, jax_rec):
        assert tuple(rec.meta["sync_steps"]) == expected and rec.meta["workers"] == 4
        assert_in_sync_after_syncs(rec, expected)
    c = compare(jax_rec, torch_rec)
    assert c.worst("eval_loss") <= F32, c.worst("eval_loss")
    assert jax_rec.eval_loss[-1] < 0.5 * jax_rec.eval_loss[0]  # it trained
