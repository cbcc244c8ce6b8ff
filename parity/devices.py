"""What ``--device cuda`` will find, asked of a fresh process per framework (the parent process
imports neither jax nor torch), so that a machine without CUDA gets one clear error up front
instead of one failed row per backend."""

from __future__ import annotations

import os
import subprocess
import sys

# Each prints the number of CUDA devices, then why there are none.
_PROBES = {
    "torch": (
        "import torch\n"
        "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
        "print(n)\n"
        "print(f'torch {torch.__version__} built for CUDA {torch.version.cuda}')"
    ),
    "jax": (
        "import jax\n"
        "try:\n"
        "    print(len(jax.devices('cuda')))\n"
        "except RuntimeError as err:\n"
        "    print(0)\n"
        "    print(f'jax {jax.__version__}: {err}')"
    ),
}


def cuda_devices(framework: str) -> tuple[int, str]:
    """How many CUDA devices ``framework`` sees in a child process, and what it said if none."""
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)  # ask what there is, not what this shell allows
    try:
        child = subprocess.run(
            [sys.executable, "-c", _PROBES[framework]],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return 0, f"{framework} did not answer within 300 s"
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines()
        return 0, lines[-1] if lines else f"exit code {child.returncode}"
    count, *why = child.stdout.strip().splitlines()
    return int(count), " ".join(why)


def require_cuda(frameworks: set[str]) -> dict[str, int]:
    """CUDA device counts by framework; ValueError (the CLI's exit code 2) where one has none."""
    counts = {}
    for framework in sorted(frameworks):
        count, said = cuda_devices(framework)
        if not count:
            raise ValueError(
                f"--device cuda, but {framework} finds no CUDA device on this machine ({said}); "
                "run with --device cpu, or on a machine with an NVIDIA GPU and a CUDA build of "
                f"{framework}"
            )
        counts[framework] = count
    return counts
