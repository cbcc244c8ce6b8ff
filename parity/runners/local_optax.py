"""Local steps in JAX: K CPU devices along a ``"workers"`` mesh axis, ``sf_optax.local``.

Opt-in (``OPT_IN``: not in a default ``python -m parity run``; ``--backends
local_torch,local_optax``). The options come from ``RunConfig.extra["local"]`` (``--workers``,
``--sync``, ``--plain-sgd``), the data split, the sync list and what the record holds from
``parity.training.local_plan``; the loop is ``parity.training.local_jax_loop``. The devices are
XLA's host-platform devices (``--xla_force_host_platform_device_count``), whatever ``--device``.

It is compared with ``local_torch`` (the same workers, rows and sync steps in torch), and with
the single-process rows only where the algorithms are the same (``local_plan.data_parallel_gap``).
"""

from __future__ import annotations

import os
import re

NAME = "local_optax"
FRAMEWORK = "jax"
ROLE = "distributed"
REQUIRES = ("jax", "optax", "flax", "sf_optax")
HANDOFF = False
OPT_IN = True  # run only when named in --backends
LOCAL = True  # a local-steps backend (parity.training.local_plan)
_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def unsupported(config) -> str | None:
    from parity.training import local_plan

    return local_plan.unsupported(config)


def expected_difference(config) -> str | None:
    return None


def note(config) -> str | None:
    from parity.training import local_plan

    try:
        k, steps = local_plan.workers(config), local_plan.sync_steps(config)
    except (TypeError, ValueError):
        return None
    where = "" if config.device == "cpu" else " whatever --device"
    return f"{k} CPU device{'s' if k > 1 else ''}{where}, {len(steps)} syncs"


def environment(config) -> dict[str, str]:
    from parity.training import local_plan

    flag = f"--xla_force_host_platform_device_count={local_plan.workers(config)}"
    flags = _COUNT.sub("", os.environ.get("XLA_FLAGS", "")).strip()
    return {"XLA_FLAGS": f"{flags} {flag}".strip(), "JAX_PLATFORMS": "cpu"}


def train(config, progress=None):
    # XLA reads the flag when jax first starts its CPU backend: set it before importing jax.
    os.environ.update(environment(config))
    import jax

    from parity.runners.sf_optax import make_tx
    from parity.training import local_jax_loop, local_plan

    k = local_plan.workers(config)
    devices = jax.devices("cpu")
    if len(devices) < k:
        raise RuntimeError(
            f"local_optax needs {k} CPU devices, jax sees {len(devices)}: jax was imported "
            "before XLA_FLAGS was set; run it in a fresh process (python -m parity run)"
        )
    return local_jax_loop.run(config, make_tx, devices=devices, progress=progress)


if __name__ == "__main__":
    from parity.runners import _child

    _child.main(train)
