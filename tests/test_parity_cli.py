"""``python -m parity`` end to end: child processes, table, JSON, PNG, exit codes."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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


# --- hyperparameters are checked before anything runs ------------------------------------------


@pytest.mark.parametrize(
    "command, flag, value, accepted",
    [
        ("run", "--lr", "-1", "[0, inf)"),
        ("run", "--lr", "nan", "[0, inf)"),
        ("run", "--b1", "1.5", "(0, 1]"),
        ("run", "--b1", "nan", "(0, 1]"),
        ("run", "--b2", "1.0", "[0, 1)"),
        ("run", "--warmup-steps", "-3", "{0, 1, 2, ...}"),
        ("run", "--weight-decay", "inf", "[0, inf)"),
        ("run", "--steps", "0", "{1, 2, 3, ...}"),
        ("run", "--jobs", "0", "{1, 2, 3, ...}"),
        ("handoff", "--b2", "1.0", "[0, 1)"),
        ("handoff", "--steps", "0", "{1, 2, 3, ...}"),
    ],
)
def test_bad_hyperparameter_is_one_error_naming_the_flag(tmp_path, command, flag, value, accepted):
    out = tmp_path / "report"
    started = time.perf_counter()
    # A small run, so that old code, which started the backends, fails quickly.
    small = ["--backends", "sf_torch"] if command == "run" else ["--switch-at", "1"]
    small += [] if flag == "--steps" else ["--steps", "2"]
    result = parity(command, *small, "--out", str(out), flag, value)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    prefix = f"python -m parity {command}: error: argument {flag}: must be in {accepted}, got "
    assert errors[0].startswith(prefix), errors[0]
    assert "Traceback" not in result.stderr and "first_step" not in result.stderr
    assert not out.exists()  # no backend started (it writes into OUT/records), no report
    assert time.perf_counter() - started < 30


def test_bad_override_value_is_refused_before_any_backend_starts(tmp_path):
    out = tmp_path / "report"
    result = parity(
        "run",
        "--backends",
        "sf_torch,schedulefree",
        "--steps",
        "2",
        "--override",
        "schedulefree:b1=1.5",
        "--out",
        str(out),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--override schedulefree:b1=1.5: b1 must be in (0, 1], got 1.5" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_lone_backend_is_its_own_baseline(tmp_path):
    out = tmp_path / "report"
    result = parity("run", "--backends", "sf_optax", "--steps", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads((out / "report.json").read_text())
    assert payload["baseline"] == "sf_optax"
    assert [(r["name"], r["status"]) for r in payload["rows"]] == [("sf_optax", "baseline")]
    # Nothing was compared, and the verdict says so rather than "all checks passed".
    assert "nothing compared" in result.stdout and "all checks passed" not in result.stdout


def test_default_baseline_prefers_sf_torch_then_a_primary_backend(tmp_path):
    from parity import cli, runners
    from parity.config import RunConfig

    registry, config = runners.discover(), RunConfig()
    assert cli._default_baseline(["schedulefree", "sf_torch"], registry, config) == "sf_torch"
    assert cli._default_baseline(["schedulefree", "sf_optax"], registry, config) == "sf_optax"
    # optax.contrib's warmup lags one step: it is expected to differ, so no baseline.
    warm = RunConfig(warmup_steps=5)
    assert cli._default_baseline(["optax_contrib", "schedulefree"], registry, warm) == (
        "schedulefree"
    )


def help_text(*command):
    result = subprocess.run(
        [sys.executable, "-m", "parity", *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def option_blocks(text):
    """``{--flag: its help text}`` of an argparse help page."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_handoff_help_offers_only_the_dtypes_it_accepts():
    text = help_text("handoff")
    assert "bfloat16" not in text
    assert "--dtype {float64,float32}" in text
    for dtype in ("float64", "float32"):
        assert cli_args("handoff", "--dtype", dtype).dtype == dtype
    with pytest.raises(SystemExit):
        cli_args("handoff", "--dtype", "bfloat16")


def cli_args(*argv):
    from parity import cli

    return cli.parse_args(list(argv))


@pytest.mark.parametrize("command", [(), ("run",), ("handoff",), ("export-digits",)])
def test_every_help_shows_the_defaults(command):
    blocks = option_blocks(help_text(*command))
    flags = {"-h", "--sgd-phase", "--keep-records"}  # store_true: nothing to show
    if command:
        assert len(blocks) > 1
    for flag, block in blocks.items():
        if flag not in flags:
            assert "(default" in block, block


# --- logs ---------------------------------------------------------------------------------------


def test_log_of_a_redirected_run_has_plain_lines_only(tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as f:  # stdout and stderr into one file, as `> log 2>&1`
        result = subprocess.run(
            [sys.executable, "-m", "parity", "run", "--backends", "sf_torch,schedulefree"]
            + ["--steps", "60", "--out", str(tmp_path / "report")],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\r" not in text  # no progress-bar frames
    lines = text.splitlines()
    assert len(lines) <= 20, text
    # One plain progress line per backend, on top of the report.
    assert sum(line.startswith("parity: ") and " done " in line for line in lines) == 2, text


def test_progress_bar_in_a_terminal_redraws_a_few_times_a_second(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed: the run is over
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "parity", "run", "--backends", "sf_torch,schedulefree"]
        + ["--steps", "400", "--eval-every", "400", "--out", str(tmp_path / "report")],
        cwd=ROOT,
        stdout=slave,
        stderr=slave,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    rc = child.wait(timeout=300)
    seconds = time.perf_counter() - started
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert rc == 0, text
    frames = text.count("\r") - text.count("\r\n")  # the terminal turns \n into \r\n
    assert frames >= 1, text  # a bar in a terminal
    # tqdm redraws at most every 0.5 s, plus its first frame and the clearing at the end.
    assert frames <= 2 * seconds / 0.5 + 6, (frames, seconds)
