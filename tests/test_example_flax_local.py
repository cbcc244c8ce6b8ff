"""The Flax local-steps example runs as its docstring says (``python -m
examples.flax.local_steps``, 4 CPU workers it asks XLA for itself) and reports numbers taken at
the averaged x.

Checked against numbers computed here: the sync steps from the rule with the learning rates
written out by hand; the final ``x`` rebuilt in float64 numpy from the workers' ``y`` and ``z``
(one model on every worker after the last sync); the reported eval loss from a float64 numpy
forward pass at that ``x`` with the BatchNorm statistics recomputed from each worker's batches;
and the loss of the untrained model, which training must cut by a factor.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, WORKERS, SEED = 2, 4, 0  # the flags the test passes
# The example's defaults: per-worker batch, lr, b1, warmup, hidden width, BN batches per worker
BATCH, LR, B1, WARMUP, HIDDEN, BN_BATCHES = 16, 0.01, 0.9, 20, 128, 4
LEAVES = ["hidden/kernel", "hidden/bias", "norm/scale", "norm/bias", "out/kernel", "out/bias"]
# The example's default rule: schedule_free_qsr with these constants.
RULE = dict(h_base=4, alpha=0.004, h_warm=2, h_max=64)
EPS = 1e-5  # nnx.BatchNorm's default epsilon


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flax_local") / "final.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the example sets the device count itself
    cmd = [sys.executable, "-m", "examples.flax.local_steps", f"--epochs={EPOCHS}",
           f"--workers={WORKERS}", f"--seed={SEED}", "--quiet", f"--save={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, dict(np.load(out))


@pytest.fixture(scope="module")
def example():
    from examples.flax import local_steps

    return local_steps


def expected_sync_steps(total: int) -> tuple[int, ...]:
    from sf_schedules.sync import ScheduleFreeQSR, sync_steps

    lrs = [LR * min(1.0, (t + 1) / WARMUP) for t in range(total)]  # sf_optax.adamw's warmup
    rule = ScheduleFreeQSR(**RULE, warmup_steps=WARMUP, b1=B1, r=0.0, weight_lr_power=2.0)
    return sync_steps(rule, lrs)


def numpy_eval(params: dict, train_x, rows, test_x, test_y):
    """Float64 forward pass of the example's Net at ``params`` ({"hidden/kernel": ...}), with
    BatchNorm statistics per worker the mean over its batches (``rows[i]``) of the batch mean
    and biased variance, then the mean over workers. Returns loss, accuracy and the stats."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def hidden(images):
        return images.astype(np.float64) @ p["hidden/kernel"] + p["hidden/bias"]

    means, variances = [], []
    for worker_rows in rows:
        h = [hidden(train_x[r]) for r in worker_rows]
        means.append(np.mean([b.mean(0) for b in h], axis=0))
        variances.append(np.mean([b.var(0) for b in h], axis=0))
    mean, var = np.mean(means, axis=0), np.mean(variances, axis=0)
    h = (hidden(test_x) - mean) / np.sqrt(var + EPS) * p["norm/scale"] + p["norm/bias"]
    logits = np.maximum(h, 0.0) @ p["out/kernel"] + p["out/bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(test_y)), test_y].mean()
    return float(loss), float((logits.argmax(1) == test_y).mean()), (mean, var)


def test_syncs_reported_are_the_rules(run, example):
    stdout, _ = run
    train_x = example.load_data(SEED)[0]
    per_epoch = len(train_x) // (WORKERS * BATCH)
    total = EPOCHS * per_epoch
    expected = expected_sync_steps(total)
    assert expected[-1] == total and 2 < len(expected) < total  # some rounds longer than 1
    listed = re.search(r"after steps ([\d, ]+)\n", stdout).group(1)
    assert tuple(int(s) for s in listed.split(", ")) == expected
    epochs = [int(n) for n in re.findall(r"eval accuracy \(x\) [\d.]+%\s+syncs (\d+)", stdout)]
    assert epochs == [sum(s <= e * per_epoch for s in expected) for e in range(1, EPOCHS + 1)]
    done = re.search(r"(\d+) syncs in (\d+) steps, (\d+) model sizes", stdout)
    assert [int(g) for g in done.groups()] == [len(expected), total, 2 * len(expected)]


def test_one_model_after_the_last_sync_and_x_from_y_and_z(run):
    _, saved = run
    names = [k[2:] for k in saved if k.startswith("x/")]
    assert sorted(names) == sorted(LEAVES)
    for name in names:
        y, z = saved[f"y/{name}"], saved[f"z/{name}"]
        assert y.shape[0] == WORKERS
        for i in range(1, WORKERS):  # the last step is a sync: every worker holds the same
            np.testing.assert_array_equal(y[i], y[0], err_msg=name)
            np.testing.assert_array_equal(z[i], z[0], err_msg=name)
        y64, z64 = y[0].astype(np.float64), z[0].astype(np.float64)
        x = (y64 - (1 - B1) * z64) / B1
        np.testing.assert_allclose(saved[f"x/{name}"], x, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.abs(x - y64).max() > 1e-4, name  # x and y apart: the check has teeth


def test_reported_eval_at_x_and_learning(run, example):
    from flax import nnx

    stdout, saved = run
    train_x, test_x, _, test_y = example.load_data(SEED)
    order = np.random.default_rng(SEED).permutation(len(train_x))
    rows = example.bn_rows(order, BN_BATCHES, BATCH, WORKERS)
    assert len(np.unique(rows)) == rows.size  # each worker its own batches
    x = {k[2:]: v for k, v in saved.items() if k.startswith("x/")}
    loss, accuracy, (mean, var) = numpy_eval(x, train_x, rows, test_x, test_y)
    np.testing.assert_allclose(saved["stats/0/mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(saved["stats/0/var"], var, rtol=1e-4, atol=1e-5)
    done = re.search(r"final eval at x: loss ([\d.]+) accuracy ([\d.]+)", stdout)
    assert abs(float(done.group(1)) - loss) < 2e-5 * max(1.0, loss)
    assert abs(float(done.group(2)) - accuracy) <= 1 / len(test_y)
    # Statistics from worker 0's batches only give another loss: the average over workers is
    # what the example reports.
    assert abs(numpy_eval(x, train_x, rows[:1], test_x, test_y)[0] - loss) > 1e-4

    net = example.Net(HIDDEN, rngs=nnx.Rngs(SEED))  # the example's init, untrained
    init = {}
    for name in LEAVES:
        layer, leaf = name.split("/")
        init[name] = np.asarray(getattr(getattr(net, layer), leaf)[...])
    initial_loss, initial_accuracy, _ = numpy_eval(init, train_x, rows, test_x, test_y)
    assert initial_loss > 1.5 and initial_accuracy < 0.3  # the init really is untrained
    # Measured at 2 epochs (42 steps, 13 syncs): loss at x 0.26, accuracy 95.6%.
    assert loss < 0.2 * initial_loss and accuracy > 0.9


def test_two_processes_print_what_one_process_prints(run):
    """2 processes of 2 CPU devices each (jax.distributed, gloo) run the same 4 workers: the
    epoch lines and the final line match the one-process run's to the printed digits."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "examples.flax.local_steps", f"--epochs={EPOCHS}",
           f"--workers={WORKERS}", f"--seed={SEED}", "--quiet", "--cpu-devices=2",
           f"--coordinator=localhost:{port}", "--num-processes=2"]  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd + [f"--process-id={i}"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]

    def lines(text):
        epochs = re.findall(r"^epoch .*$", text, re.M)
        final = re.search(r"\d+ syncs in .*$", text, re.M).group(0)
        return epochs, final

    want = lines(run[0])
    assert len(want[0]) == EPOCHS
    for out, _ in outs:
        assert lines(out) == want
