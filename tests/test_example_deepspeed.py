"""The DeepSpeed example runs as its README says, on 2 CPU ranks, and learns at x: with the
README's float32 config, and with bf16 mixed precision."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "deepspeed" / "schedulefree_deepspeed_demo.py"
CONFIG = ROOT / "examples" / "deepspeed" / "ds_config.json"


def run_demo(config, port, *extra):
    path = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(path))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(DEMO),
        "--deepspeed_config",
        str(config),
        "--epochs",
        "2",
        "--warmup-steps",
        "10",
        "--lr",
        "0.01",
        "--quiet",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    epochs = re.findall(
        r"epoch\s+(\d+)\s+train loss \(y\) ([\d.]+)\s+eval loss \(x\) ([\d.]+)\s+"
        r"eval accuracy \(x\) ([\d.]+)%",
        proc.stdout,
    )
    assert [int(e[0]) for e in epochs] == [1, 2]
    return proc.stdout, float(epochs[-1][2]), float(epochs[-1][3]) / 100


def test_demo_on_two_cpu_ranks():
    stdout, final_loss, final_accuracy = run_demo(CONFIG, 29731)
    assert "computing in torch.float32" in stdout
    # chance on 10 balanced classes: accuracy 0.1, cross-entropy log(10) = 2.30
    assert final_accuracy > 0.8 and final_loss < 1.0


def test_demo_in_bf16_on_two_cpu_ranks(tmp_path):
    # bf16 parameters and inputs, float32 BatchNorm statistics: the CPU kernel refused the mix
    # of bf16 weights and float32 statistics at the first forward before.
    config = json.loads(CONFIG.read_text())
    config["bf16"] = {"enabled": True}
    path = tmp_path / "ds_config_bf16.json"
    path.write_text(json.dumps(config))
    stdout, final_loss, final_accuracy = run_demo(path, 29732, "--hidden-dim", "16")
    assert "computing in torch.bfloat16" in stdout
    assert final_accuracy > 0.8 and final_loss < 1.0


def load_demo():
    spec = importlib.util.spec_from_file_location("schedulefree_deepspeed_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CpuWithoutFp16:
    def device_name(self):
        return "cpu"

    def is_fp16_supported(self):
        return False

    def is_bf16_supported(self):
        return True


def test_fp16_on_a_cpu_without_fp16_is_a_clear_message():
    demo = load_demo()
    config = json.loads(CONFIG.read_text())
    demo.check_precision(config, CpuWithoutFp16())  # float32: fine
    demo.check_precision({**config, "bf16": {"enabled": True}}, CpuWithoutFp16())
    with pytest.raises(SystemExit, match="enables fp16, which cpu ranks here cannot run") as err:
        demo.check_precision({**config, "fp16": {"enabled": True}}, CpuWithoutFp16())
    assert "run on GPUs" in str(err.value) and '"bf16": {"enabled": true}' in str(err.value)


def test_float32_batchnorm_matches_torch_and_keeps_float32_statistics():
    import torch

    demo = load_demo()
    torch.manual_seed(0)
    ours, theirs = demo.Float32BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(16, 8)
    for momentum in (0.1, None):  # None: the cumulative average of the recompute at x
        ours.momentum = theirs.momentum = momentum
        for module in (ours, theirs):
            module.train()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        for a, b in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # bf16 weights and input (what DeepSpeed's bf16 gives it): statistics stay float32.
    ours.train()
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and ours.running_var.dtype == torch.float32
