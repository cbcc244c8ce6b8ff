"""Running a test module's checks in a child process under Triton's CPU interpreter.

Triton decides at ``triton.jit`` time whether to interpret, from ``TRITON_INTERPRET``, so the
modules that run the fused kernel on CPU start themselves as a script with it set; the script
prints one JSON line of results, which the tests then assert on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run(script: str, timeout: int = 600) -> dict:
    """Runs ``script`` (a test module's path) with ``TRITON_INTERPRET=1``; its last line, as
    JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
