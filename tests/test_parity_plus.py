"""The parity twins of upstream main's ScheduleFree+ options, in float64.

sf_optax (JAX) against sf_torch on the twin models, through the runners' training functions
(in this process, as tests/test_parity_trajectories.py does): ``--inner-momentum`` (AdamW) and
``--optimizer adamc_plus`` (sf_optax via ``update(..., value=loss)``, sf_torch via
``step(loss)``) agree to DESIGN.md's float64 tolerance (1e-10 relative) at every step, params
and losses; the 8-device mesh row too. The CLI: the flags, their errors, the rows that skip and
why.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import tolerances
from parity.compare import compare
from parity.config import RunConfig
from parity.runners import optax_contrib, schedulefree, sf_optax, sf_torch

F64 = tolerances.FLOAT64_RELATIVE
ROOT = Path(__file__).resolve().parents[1]


def assert_within(record, baseline, limit=F64):
    c = compare(record, baseline)
    diffs = {m: c.worst(m) for m in tolerances.METRICS}
    assert all(v <= limit for v in diffs.values()), diffs
    return diffs


def test_inner_momentum_mlp_matches_torch():
    config = RunConfig(
        model="mlp",
        steps=150,
        dtype="float64",
        lr=0.005,
        weight_decay=0.01,
        warmup_steps=10,
        inner_momentum=0.9,
        eval_every=5,
    )
    jax_run, torch_run = sf_optax.train(config), sf_torch.train(config)
    assert_within(jax_run, torch_run)
    assert torch_run.eval_loss[-1] < 0.5 * torch_run.eval_loss[0]
    # The option reaches both sides: without it the run ends elsewhere.
    plain = sf_torch.train(config.replace(inner_momentum=0.0, steps=20))
    assert np.abs(plain.train_loss[:20] - torch_run.train_loss[:20]).max() > 1e-6


@pytest.mark.parametrize(
    "model, steps, options",
    [
        (
            "mlp",
            150,
            dict(
                lr=0.5,
                weight_decay=5.0,
                sf_b1_anneal_steps=60,
                polyak_b=0.5,
                c_warmup=5,
                r=1.0,
                b2=0.95,
            ),
        ),
        ("cnn", 25, dict(lr=1.0, b2=0.95, sf_b1=0.8)),
    ],
)
def test_adamc_plus_matches_torch(model, steps, options):
    config = RunConfig(
        model=model, optimizer="adamc_plus", steps=steps, dtype="float64", eval_every=5, **options
    )
    jax_run, torch_run = sf_optax.train(config), sf_torch.train(config)
    assert_within(jax_run, torch_run)
    assert np.isfinite(torch_run.eval_loss[::5]).all()
    assert torch_run.train_loss[-5:].mean() < torch_run.train_loss[:5].mean()


def test_reference_rows_say_why_they_skip():
    plus = RunConfig(optimizer="adamc_plus")
    inner = RunConfig(inner_momentum=0.9)
    assert "AdamC" in schedulefree.unsupported(plus)
    assert "inner_momentum" in schedulefree.unsupported(inner)
    assert "Polyak" in optax_contrib.unsupported(plus)
    assert "inner momentum" in optax_contrib.unsupported(inner)
    assert sf_torch.unsupported(plus) is None and sf_optax.unsupported(inner) is None


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(optimizer="sgd", inner_momentum=0.5), "inner_momentum is AdamW's"),
        (dict(inner_momentum=1.0), "inner_momentum"),
        (dict(optimizer="adamc_plus", sf_b1_max=1.0), "sf_b1_max"),
        (dict(optimizer="adamc_plus", polyak_b=-0.1), "polyak_b"),
        (dict(optimizer="adamc_plus", sf_b1=1.0, sf_b1_anneal_steps=5), "sf_b1"),
        (dict(optimizer="adamc_plus", c_warmup=-1), "c_warmup"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RunConfig(**changes)


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "parity", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["run", "--optimizer", "sgd", "--inner-momentum", "0.5"], "--inner-momentum"),
        (["run", "--inner-momentum", "1.5"], "--inner-momentum"),
        (["run", "--optimizer", "adamc_plus", "--polyak-b", "1"], "--polyak-b"),
        (["handoff", "--optimizer", "adamc_plus"], "handoff"),
    ],
)
def test_cli_flag_errors(args, match):
    proc = _cli(*args, timeout=120)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]


def test_cli_adamc_plus_run(tmp_path):
    out = tmp_path / "report"
    proc = _cli(
        "run",
        "--optimizer",
        "adamc_plus",
        "--dtype",
        "float64",
        "--steps",
        "15",
        "--sf-b1-anneal-steps",
        "10",
        "--backends",
        "sf_optax,sf_torch,schedulefree",
        "--no-progress",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all checks passed" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    text = json.dumps(report)
    assert "no AdamC" in text  # the schedulefree row, skipped with its reason
    assert '"sf_b1_anneal_steps": 10' in text
