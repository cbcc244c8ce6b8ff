"""The DeepSpeed example runs as its README says, on 2 CPU ranks, and learns at x."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_on_two_cpu_ranks():
    path = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(path))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        "29731",
        str(ROOT / "examples" / "deepspeed" / "schedulefree_deepspeed_demo.py"),
        "--deepspeed_config",
        str(ROOT / "examples" / "deepspeed" / "ds_config.json"),
        "--epochs",
        "2",
        "--warmup-steps",
        "10",
        "--lr",
        "0.01",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    epochs = re.findall(
        r"epoch\s+(\d+)\s+train loss \(y\) ([\d.]+)\s+eval loss \(x\) ([\d.]+)\s+"
        r"eval accuracy \(x\) ([\d.]+)%",
        proc.stdout,
    )
    assert [int(e[0]) for e in epochs] == [1, 2]
    final_loss, final_accuracy = float(epochs[-1][2]), float(epochs[-1][3]) / 100
    # chance on 10 balanced classes: accuracy 0.1, cross-entropy log(10) = 2.30
    assert final_accuracy > 0.8 and final_loss < 1.0
