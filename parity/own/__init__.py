"""Parity on the user's own pair: a torch model and its Flax twin, trained by every backend.

    import parity.own
    result = parity.own.check(torch_model, flax_model, torch_loss, flax_loss, batches,
                              eval_batches=evals, optimizer="adamw", steps=200)
    result.exit_code, print(result.table()), result.write("reports/mine")

    python -m parity check my_package.pairs:resnet --dtype float32 --steps 200

- :class:`Pair` / :func:`load_spec` (``parity.own.spec``): what a user hands over;
- :func:`check` / :func:`check_pair` (``parity.own.check``): the trajectories and the report;
- :func:`handoff`: one run moved between sf_torch and sf_optax mid-run;
- ``parity.own.mapping``: which torch tensor is which Flax leaf;
- ``parity.own.divergence``: where a port first differs, layer by layer;
- ``parity.own.hf``: ready-made transformers pairs.

Importing this package imports neither torch nor jax (each name loads its module on first use).
"""

from __future__ import annotations

import importlib

from parity.own.spec import Pair, load_spec

# ``check`` is the module parity.own.check, which is callable: ``parity.own.check(...)`` is
# ``parity.own.check.check(...)`` (a function of that name here would be replaced by the module
# the moment anything imports ``parity.own.check``).
_LAZY_MODULES = ("check", "mapping", "divergence", "hf", "spec")
_LAZY_FUNCTIONS = {"check_pair": "check", "handoff": "check", "CheckResult": "check"}

__all__ = ["Pair", "check", "check_pair", "handoff", "load_spec", "mapping", "divergence"]


def __getattr__(name: str):
    if name in _LAZY_FUNCTIONS:
        module = importlib.import_module(f"parity.own.{_LAZY_FUNCTIONS[name]}")
        return getattr(module, name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"parity.own.{name}")
    raise AttributeError(f"module 'parity.own' has no attribute {name!r}")
