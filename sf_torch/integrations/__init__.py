"""Glue between the sf_torch optimizers and the trainers people already use.

- ``sf_torch.integrations.transformers``: transformers' ``Trainer`` (plain, and DeepSpeed
  through Accelerate): ``ScheduleFreeTrainer``, ``ScheduleFreeCallback``.
- ``sf_torch.integrations.lightning``: Lightning's ``Trainer`` (plain and DeepSpeed strategy).

Each submodule imports its trainer library, so each is imported on first attribute access:
``import sf_torch.integrations`` imports neither transformers nor Lightning.
"""

import importlib

_LAZY_SUBMODULES = ("lightning", "transformers")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
