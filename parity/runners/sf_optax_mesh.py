"""sf_optax on an 8-device mesh with FSDP-style sharded params, always on 8 CPU devices.

It stays on the CPU under ``--device cuda`` too: one GPU cannot make an 8-device mesh.

Every parameter is split over the mesh axis ``fsdp`` along its first dimension that divides by
8 (a conv kernel along a channel axis), replicated where none does; the optimizer state
follows its parameters and training batches are split over the same axis. It must reproduce
the single-device trajectory (DESIGN.md section 3).
"""

from __future__ import annotations

import os

NAME = "sf_optax_mesh"
FRAMEWORK = "jax"
ROLE = "distributed"
REQUIRES = ("jax", "optax", "flax", "sf_optax")
HANDOFF = False
DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"


def unsupported(config) -> str | None:
    return None


def expected_difference(config) -> str | None:
    return None


def note(config) -> str | None:
    if config.device != "cpu":
        return f"{DEVICES} CPU devices whatever --device (one GPU makes no {DEVICES}-device mesh)"
    return None


def environment(config) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} {_FLAG}".strip()
    return {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def train(config, progress=None):
    # XLA reads the flag when jax first starts its CPU backend: set it before importing jax.
    os.environ.update(environment(config))
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import sf_optax
    from parity.runners.sf_optax import make_tx
    from parity.training import jax_loop

    devices = jax.devices("cpu")
    if len(devices) < DEVICES:
        raise RuntimeError(
            f"sf_optax_mesh needs {DEVICES} devices, jax sees {len(devices)}: jax was imported "
            f"before XLA_FLAGS={_FLAG} was set; run it in a fresh process (python -m parity run)"
        )
    mesh = Mesh(np.array(devices[:DEVICES]), ("fsdp",))
    return jax_loop.run(
        config, make_tx, eval_params=sf_optax.eval_params, mesh=mesh, progress=progress
    )


if __name__ == "__main__":
    from parity.runners import _child

    _child.main(train)
