"""The fsdp2 parity backend (2 CPU ranks, gloo, fully_shard) reproduces the single-process
sf_torch trajectory.

The row runs through the CLI (``python -m parity run --backends sf_torch,fsdp2``, ranks started
by ``torch.distributed.run``); the sf_torch run it is checked against is trained here, in this
process, so that the check does not rest on the report's own baseline row.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity import tolerances
from parity.compare import compare
from parity.config import RunConfig
from parity.runners import sf_torch
from parity.training.record import Record

pytest.importorskip("torch.distributed.fsdp")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "model, dtype, optimizer",
    [("cnn", "float64", "adamw"), ("mlp", "float32", "radam")],  # CNN: BatchNorm over both shares
)
def test_fsdp2_row_reproduces_sf_torch(model, dtype, optimizer, tmp_path):
    steps = 20
    args = ["--model", model, "--dtype", dtype, "--optimizer", optimizer, "--steps", str(steps)]
    done = subprocess.run(
        [sys.executable, "-m", "parity", "run", "--no-progress", *args, "--eval-every", "5"]
        + [
            "--backends",
            "sf_torch,fsdp2",
            "--ranks",
            "2",
            "--keep-records",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = RunConfig(model=model, steps=steps, dtype=dtype, optimizer=optimizer, eval_every=5)
    single = sf_torch.train(config)  # the single-process trajectory, computed here
    assert single.eval_loss[-1] < single.eval_loss[0]  # it trained
    record = Record.load(tmp_path / "records" / "fsdp2.npz")
    c = compare(record, single)
    if dtype == "float64":
        worst = max(c.worst("params"), c.worst("eval_loss"), c.worst("train_loss"))
        assert worst <= tolerances.FLOAT64_RELATIVE, worst
    else:
        assert c.worst("eval_loss") <= tolerances.FLOAT32_EVAL_LOSS_RELATIVE
        assert c.worst("params") <= 1e-5
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert rows["fsdp2"]["status"] == "ok" and rows["fsdp2"]["role"] == "distributed"
