"""``python -m parity`` end to end: child processes, table, JSON, PNG, exit codes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from parity import report, tolerances
from parity.compare import Comparison
from parity.training.record import Record

ROOT = Path(__file__).resolve().parent.parent


def parity(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "parity", *args, "--no-progress"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_end_to_end_every_backend(tmp_path):
    out = tmp_path / "report"
    # float64 with warmup: every checked row must agree to 1e-10, and optax.contrib (whose
    # warmup lags one step) is reported, not failed.
    result = parity(
        "run",
        "--model",
        "mlp",
        "--steps",
        "25",
        "--dtype",
        "float64",
        "--warmup-steps",
        "5",
        "--eval-every",
        "5",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("sf_optax", "sf_optax_mesh", "optax_contrib", "sf_torch", "schedulefree"):
        assert name in result.stdout
    assert "first step over" in result.stdout and str(out / "report.json") in result.stdout
    assert (out / "report.png").stat().st_size > 10_000
    assert not (out / "records").exists()

    payload = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    assert payload["exit_code"] == 0 and payload["baseline"] == "sf_torch"
    assert rows["sf_torch"]["status"] == "baseline"
    assert rows["optax_contrib"]["status"] == "reported"
    assert rows["optax_contrib"]["max_diff"]["params"] > 1e-3
    for name in ("sf_optax", "sf_optax_mesh", "schedulefree"):
        row = rows[name]
        assert row["status"] == "ok"
        assert row["limits"] == dict.fromkeys(tolerances.METRICS, tolerances.FLOAT64_RELATIVE)
        assert len(row["train_loss"]) == 25 and len(row["relative_diff"]["params"]) == 26
        assert row["eval_loss"][5] is not None and row["eval_loss"][6] is None
        assert max(row["relative_diff"]["params"]) <= tolerances.FLOAT64_RELATIVE
    # The table's final losses are the records' own.
    assert math.isclose(
        rows["sf_optax"]["final_eval_loss"], rows["sf_torch"]["final_eval_loss"], rel_tol=1e-10
    )


def test_mismatched_hyperparameter_exits_nonzero(tmp_path):
    out = tmp_path / "report"
    result = parity(
        "run",
        "--backends",
        "sf_optax,sf_torch",
        "--steps",
        "10",
        "--dtype",
        "float64",
        "--override",
        "sf_optax:lr=0.00501",
        "--out",
        str(out),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    row = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}["sf_optax"]
    assert row["status"] == "FAIL" and row["first_step_over"] == 1
    assert "FAIL" in result.stdout and "a tolerance was exceeded" in result.stdout


def test_parent_process_imports_no_framework():
    # Runners are listed and launched without importing jax or torch in the parent.
    code = (
        "import sys, parity.cli, parity.launch, parity.runners as r; r.discover(); "
        "print(sorted(m for m in ('jax', 'torch', 'deepspeed') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_bad_arguments_exit_with_a_message(tmp_path):
    result = parity("run", "--backends", "sf_optax,nope", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown backends ['nope']" in result.stderr


def crafted_record(eval_losses, first_step=0):
    n = len(eval_losses) - 1
    rec = Record.empty(first_step, first_step + n, {"w": (2,)}, np.float64)
    rec.eval_loss[:] = eval_losses
    rec.train_loss[:] = 1.0
    return rec


def test_tolerance_check_on_crafted_comparisons():
    # float32: only the eval loss of primary/distributed rows is checked, at 1e-4.
    limits = tolerances.limits("primary", "float32")
    assert limits == {"eval_loss": 1e-4}
    assert tolerances.limits("reference", "float32") == {}
    steps = np.arange(4)
    zeros = np.zeros(4)
    over = Comparison(steps, zeros, zeros[:-1], np.array([0.0, 5e-5, 2e-4, 3e-4]))
    row = report.make_row(
        "x",
        "primary",
        crafted_record([1, 1, 1, 1]),
        over,
        limits,
        tolerances.nominal("float32"),
        1.0,
    )
    assert row.status == report.FAIL and row.first_step_over == 2
    within = Comparison(steps, zeros, zeros[:-1], np.array([0.0, 5e-5, np.nan, 9e-5]))
    row = report.make_row(
        "x",
        "primary",
        crafted_record([1, 1, np.nan, 1]),
        within,
        limits,
        tolerances.nominal("float32"),
        1.0,
    )
    assert row.status == report.OK and row.first_step_over is None
    # A reference row over the nominal limit is reported, with the step where it parted.
    row = report.make_row(
        "x", "reference", crafted_record([1, 1, 1, 1]), over, {}, tolerances.nominal("float32"), 1.0
    )
    assert row.status == report.REPORTED and row.first_step_over == 2
    # float64 checks params and both losses at 1e-10; an expected difference is reported only.
    assert tolerances.limits("distributed", "float64") == dict.fromkeys(tolerances.METRICS, 1e-10)
    assert tolerances.limits("reference", "float64", "warmup lags") == {}


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a GPU")
    for backends in ("sf_torch,sf_optax", "sf_torch"):
        result = parity(
            "run",
            "--device",
            "cuda",
            "--steps",
            "2",
            "--backends",
            backends,
            "--out",
            str(tmp_path),
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--device cuda" in result.stderr and "no CUDA device" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "report.json").exists()


def test_runs_without_scikit_learn_tqdm_and_matplotlib(tmp_path):
    # The GPU machine may lack them: the digits come from the exported file, there is no
    # progress bar and no PNG, and the JSON report is still written.
    from sklearn.datasets import load_digits

    digits_file = tmp_path / "digits.npz"
    export = subprocess.run(
        [sys.executable, "-m", "parity", "export-digits", "--out", str(digits_file)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr
    with np.load(digits_file) as f:  # exact: pixels 0-16 stored as uint8
        np.testing.assert_array_equal(f["data"], load_digits().data)
        np.testing.assert_array_equal(f["target"], load_digits().target)
    out = tmp_path / "report"
    code = (
        "import sys\n"
        "for name in ('sklearn', 'tqdm', 'matplotlib'):\n"
        "    sys.modules[name] = None  # importing them now raises ImportError\n"
        "import parity.data\n"
        f"parity.data.DIGITS_FILE = parity.data.Path({str(digits_file)!r})\n"
        "from parity.cli import main\n"
        "sys.exit(main(['run', '--backends', 'sf_torch', '--steps', '3', "
        f"'--out', {str(out)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.rstrip().splitlines()[-1]
    assert last == f"report: {out / 'report.json'}, no PNG (matplotlib is not installed)"
    assert (out / "report.json").exists() and not (out / "report.png").exists()
