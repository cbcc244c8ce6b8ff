"""Backends. One module per backend in this folder; adding a backend is adding a file.

A runner module is imported by the parent (to list, check and launch it) and run as a child
process, ``python -m parity.runners.<name> CONFIG.json RESULT.npz``, so that JAX, torch and
DeepSpeed's ranks never share a process. At import it must stay light (no jax/torch imports at
module level) and define:

``NAME``
    the backend's name (the module's name).
``FRAMEWORK``
    ``"jax"`` or ``"torch"``.
``ROLE``
    which tolerance of DESIGN.md section 3 applies (see ``parity.tolerances``):
    ``"primary"`` (sf_optax, sf_torch), ``"reference"`` (the packages we reproduce),
    ``"distributed"`` (sharded or multi-rank runs of a primary).
``REQUIRES``
    importable modules it needs; the backend is unavailable on machines without them.
``HANDOFF``
    whether it can start from / stop at a ``parity.handoff.Snapshot`` (``RunConfig.resume_from``
    and ``save_to``).
``unsupported(config) -> str | None``
    why this backend cannot run ``config`` (e.g. no RAdam in optax.contrib), else None.
``expected_difference(config) -> str | None``
    why its trajectory is known to differ for ``config`` (reported, never failed), else None.
``train(config, progress) -> parity.training.record.Record``
    in the child: train and record every step; call ``progress(step)`` after each step.

and may define:

``command(config, config_path, result_path) -> list[str]``
    the child's argv; the default runs this module with the current Python. A multi-rank
    backend returns a launcher here (e.g. ``python -m torch.distributed.run --nproc-per-node 2
    -m parity.runners.deepspeed CONFIG RESULT``, the rank count from ``config.extra``); its
    ``train`` returns the record on rank 0 (which also prints the progress lines) and None on
    the other ranks.
``environment(config) -> dict[str, str]``
    variables to set in the child (e.g. ``XLA_FLAGS``).

The module ends with ``if __name__ == "__main__": parity.runners._child.main(train)``, which
reads the config, calls ``train`` and writes the record.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from types import ModuleType

_ATTRIBUTES = ("NAME", "FRAMEWORK", "ROLE", "REQUIRES", "HANDOFF", "unsupported",
               "expected_difference", "train")
ROLES = ("primary", "reference", "distributed")


def discover() -> dict[str, ModuleType]:
    """Every runner module in this folder, by name, in a stable order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [a for a in _ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise TypeError(f"runner {info.name} lacks {missing}: see parity/runners/__init__.py")
        if module.ROLE not in ROLES:
            raise ValueError(f"runner {info.name}: ROLE must be one of {ROLES}")
        found[module.NAME] = module
    return found


def unavailable(runner: ModuleType) -> str | None:
    """Why this machine cannot run the backend (a missing package), else None."""
    for name in runner.REQUIRES:
        if importlib.util.find_spec(name) is None:
            return f"needs the Python package {name!r}"
    return None


def command(runner: ModuleType, config, config_path, result_path) -> list[str]:
    if hasattr(runner, "command"):
        return list(runner.command(config, str(config_path), str(result_path)))
    return [sys.executable, "-m", f"{__name__}.{runner.NAME}", str(config_path), str(result_path)]


def environment(runner: ModuleType, config) -> dict[str, str]:
    return dict(runner.environment(config)) if hasattr(runner, "environment") else {}
