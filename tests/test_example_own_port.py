"""examples/own_port: the README's "check your own port" example, run as a user runs it.

The agreeing port must pass (exit 0, every row within float64 tolerance against the
schedulefree package's row among others); the same port with nnx's default LayerNorm epsilon
(1e-6, torch's is 1e-5) must be stopped by the divergence finder at ``norm`` (exit 1), the
size of the mistake checked against a float64 numpy LayerNorm.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_agreeing_port_passes(tmp_path):
    done = _run("-m", "examples.own_port.my_port", "--steps", "30", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no divergence" in done.stdout
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line}
    for name in ("sf_optax", "schedulefree"):
        assert rows[name][-1] == "ok", done.stdout
    assert (tmp_path / "report.json").exists()


def test_wrong_epsilon_is_named():
    done = _run("-m", "examples.own_port.my_port", "--flax-eps", "1e-6")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "first divergence: the output of norm" in done.stdout
    figure = float(re.search(r"the output of norm, ([0-9.e+-]+)", done.stdout).group(1))
    # the size of this mistake, worked out apart: LayerNorm divides by sqrt(var + eps), so the
    # two epsilons part by 1/sqrt(var + 1e-5) vs 1/sqrt(var + 1e-6) relative to the output;
    # at the rows' variance (order 1 at this init) that is about 4.5e-6: within a factor 10
    expected = abs(1 / np.sqrt(1 + 1e-5) - 1 / np.sqrt(1 + 1e-6))
    assert expected / 10 < figure < expected * 10, (figure, expected)
    assert "sf_optax" not in done.stdout  # no training after a divergence


def test_cli_spec():
    done = _run("-m", "parity", "check", "examples.own_port.my_port:pair", "--steps", "10")
    assert done.returncode == 0, done.stdout + done.stderr


_NETS = """
import torch, jax
from flax import nnx
torch.set_num_threads(1)
class MyTorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(10, 8), torch.nn.Linear(8, 3)
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))
class MyFlaxNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(10, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)
    def __call__(self, x):
        return self.fc2(jax.numpy.tanh(self.fc1(x)))
"""


def test_readme_snippet(tmp_path):
    """The README's "Check your own port" code, as printed there, on two small nets."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Check your own port") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```", start)]
    assert len(code.splitlines()) <= 20
    script = tmp_path / "snippet.py"
    script.write_text(_NETS + code.replace('"reports/mine"', repr(str(tmp_path / "mine"))))
    done = _run(str(script))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no divergence" in done.stdout
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line}
    assert rows["sf_optax"][-1] == "ok" and rows["schedulefree"][-1] == "ok", done.stdout
    assert (tmp_path / "mine" / "report.json").exists()
