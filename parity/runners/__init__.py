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
    variables to set in the child (e.g. ``XLA_FLAGS``), over those every runner of its
    framework gets (JAX: ``JAX_PLATFORMS`` from ``config.device``).
``note(config) -> str | None``
    a remark for the row of the report (e.g. that it runs on CPU devices whatever ``--device``).
``OPT_IN``
    True: the backend runs only when ``--backends`` names it (it is left out of a plain
    ``python -m parity run`` and of ``make demo``; ``python -m parity backends`` marks it).
``LOCAL``
    True: a local-steps backend (K workers, ``--workers`` / ``--sync``; see
    ``parity.training.local_plan``), compared with the other local rows, and with the
    single-process rows only where its run is data-parallel (``H = 1``).
``VARIANTS``
    ``{row name: {key: value}}``: the module runs as several rows (``deepspeed_z1``,
    ``deepspeed_z2``, ...), each with its entries merged into ``RunConfig.extra``
    (:func:`configure`); ``NAME`` then names the module, and each row is a :class:`Variant`.

The module ends with ``if __name__ == "__main__": parity.runners._child.main(train)``, which
reads the config, calls ``train`` and writes the record.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from types import ModuleType

_ATTRIBUTES = (
    "NAME",
    "FRAMEWORK",
    "ROLE",
    "REQUIRES",
    "HANDOFF",
    "unsupported",
    "expected_difference",
    "train",
)
ROLES = ("primary", "reference", "distributed")


class Variant:
    """One row of a runner module with ``VARIANTS``: the module, under the row's name, with
    the row's entries for ``RunConfig.extra``."""

    def __init__(self, module: ModuleType, name: str, extra: dict):
        self.module, self.NAME, self.extra = module, name, dict(extra)

    def __getattr__(self, attribute):
        return getattr(self.module, attribute)

    def __repr__(self) -> str:
        return f"<runner {self.NAME} of {self.module.__name__}>"


def discover() -> dict[str, ModuleType | Variant]:
    """Every runner (module, or row of a module with ``VARIANTS``) by name, in a stable order."""
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
        variants = getattr(module, "VARIANTS", None)
        if variants:
            found.update({name: Variant(module, name, extra) for name, extra in variants.items()})
        else:
            found[module.NAME] = module
    return found


def configure(runner, config):
    """``config`` as ``runner`` runs it: a variant's entries merged into ``config.extra``."""
    if isinstance(runner, Variant):
        return config.replace(extra={**config.extra, **runner.extra})
    return config


def note(runner, config) -> str | None:
    return runner.note(config) if hasattr(runner, "note") else None


def unavailable(runner: ModuleType) -> str | None:
    """Why this machine cannot run the backend (a missing package), else None."""
    for name in runner.REQUIRES:
        if importlib.util.find_spec(name) is None:
            return f"needs the Python package {name!r}"
    return None


def command(runner, config, config_path, result_path) -> list[str]:
    if hasattr(runner, "command"):
        return list(runner.command(config, str(config_path), str(result_path)))
    module = runner.module if isinstance(runner, Variant) else runner
    return [sys.executable, "-m", module.__name__, str(config_path), str(result_path)]


def environment(runner, config) -> dict[str, str]:
    env = {}
    if runner.FRAMEWORK == "jax":
        # --device cpu keeps JAX on the CPU also where a GPU is present.
        env["JAX_PLATFORMS"] = config.device
        if config.device == "cuda":
            # Backends share the GPU (--jobs): JAX must not take 75% of it up front.
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if hasattr(runner, "environment"):
        env.update(runner.environment(config))
    return env
