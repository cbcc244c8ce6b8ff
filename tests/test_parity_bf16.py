"""bfloat16 mixed precision end to end: bf16 weights, rows measured and reported.

The checks use numbers the bf16 runs did not make: a float32 sf_torch run trained here (bf16
must follow it closely over a few steps) and the bf16 grid itself (every recorded weight must
be a bf16 value).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import tolerances
from parity.config import RunConfig
from parity.runners import sf_torch
from parity.training.record import Record

ROOT = Path(__file__).resolve().parent.parent


def is_bf16(values: np.ndarray) -> bool:
    """Whether float32 ``values`` all lie on the bf16 grid (the low 16 bits are zero)."""
    return bool(np.all(values.astype(np.float32).view(np.uint32) & 0xFFFF == 0))


def test_bfloat16_run_reports_every_row(tmp_path):
    pytest.importorskip("deepspeed")
    steps = 8
    backends = "sf_torch,sf_optax,schedulefree,deepspeed_z2"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity",
            "run",
            "--dtype",
            "bfloat16",
            "--steps",
            str(steps),
            "--eval-every",
            "4",
            "--backends",
            backends,
            "--keep-records",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sanity bound" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("report: ")

    payload = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    assert payload["config"]["dtype"] == "bfloat16"
    assert rows["sf_torch"]["status"] == "baseline"
    assert rows["sf_optax"]["status"] == "ok"
    assert rows["sf_optax"]["limits"] == {"eval_loss": tolerances.BFLOAT16_EVAL_LOSS_RELATIVE}
    assert rows["schedulefree"]["status"] == "reported"
    assert rows["deepspeed_z2"]["status"] == "reported"
    assert "float32 masters" in rows["deepspeed_z2"]["note"]

    float32 = sf_torch.train(RunConfig(steps=steps, dtype="float32", eval_every=4))
    for name in backends.split(","):
        record = Record.load(tmp_path / "records" / f"{name}.npz")
        # The weights the model computes with are bf16 (DeepSpeed's too: its bf16 copy).
        assert all(is_bf16(p) for p in record.params.values()), name
        # ... and train like the float32 run, to bf16's few significant digits.
        measured = record.eval_loss[[0, 4, 8]]
        np.testing.assert_allclose(measured, float32.eval_loss[[0, 4, 8]], rtol=5e-3, err_msg=name)
        assert measured[-1] < measured[0]
