"""The DeepSpeed runner on 2 CPU ranks reproduces the single-process sf_torch trajectory.

The DeepSpeed rows run through the CLI (``python -m parity run``, ranks started by
``torch.distributed.run``); the sf_torch run they are checked against is trained here, in this
process, so that the check does not rest on the report's own baseline row.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import runners, tolerances
from parity.compare import compare
from parity.config import RunConfig
from parity.runners import sf_torch
from parity.training.record import Record

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parent.parent
F32 = tolerances.FLOAT32_EVAL_LOSS_RELATIVE


def parity_run(*args):
    env = dict(os.environ)
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        str(Path.home() / ".cache" / "schedulefree-parity" / "torch_extensions"),
    )
    return subprocess.run(
        [sys.executable, "-m", "parity", "run", "--no-progress", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.parametrize(
    "model, stages",
    [("mlp", (2, 3)), ("cnn", (3,))],  # the CNN: BatchNorm statistics over both ranks' shares
)
def test_zero_stages_reproduce_sf_torch_float32(model, stages, tmp_path):
    steps = 20
    names = [f"deepspeed_z{s}" for s in stages]
    result = parity_run(
        "--model",
        model,
        "--steps",
        str(steps),
        "--eval-every",
        "5",
        "--backends",
        ",".join(["sf_torch", *names]),
        "--ranks",
        "2",
        "--keep-records",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr

    config = RunConfig(model=model, steps=steps, dtype="float32", eval_every=5)
    single = sf_torch.train(config)  # the single-process trajectory, computed here
    assert single.eval_loss[-1] < 0.95 * single.eval_loss[0]  # it trained
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    for stage, name in zip(stages, names):
        record = Record.load(tmp_path / "records" / f"{name}.npz")
        assert record.meta["zero_stage"] == stage and record.meta["ranks"] == 2
        assert record.meta["backend"] == "gloo"
        c = compare(record, single)
        assert c.worst("eval_loss") <= F32, (name, c.worst("eval_loss"))
        # Round-off only: float32 weights and losses agree to a few ulps' drift over 20 steps.
        assert c.worst("params") <= 1e-5 and c.worst("train_loss") <= 1e-5, name
        assert np.isfinite(record.eval_loss[::5]).all() and np.isnan(record.eval_loss[1])
        assert rows[name]["status"] == "ok" and rows[name]["role"] == "distributed"


def test_variants_and_what_they_cannot_run():
    registry = runners.discover()
    assert {f"deepspeed_z{s}" for s in range(4)} <= set(registry)
    z3 = registry["deepspeed_z3"]
    config = runners.configure(z3, RunConfig(dtype="float32", extra={"ranks": 2}))
    assert config.extra == {"ranks": 2, "zero_stage": 3}
    assert z3.unsupported(config) is None
    assert "float32" in z3.unsupported(config.replace(dtype="float64"))
    assert "3 ranks" in z3.unsupported(config.replace(extra={**config.extra, "ranks": 3}))
    assert z3.expected_difference(config.replace(dtype="bfloat16"))
    argv = runners.command(z3, config, "c.json", "r.npz")
    assert argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in argv
    assert argv[-3:] == ["parity.runners.deepspeed", "c.json", "r.npz"]
    assert runners.environment(z3, config)["DS_ACCELERATOR"] == "cpu"
