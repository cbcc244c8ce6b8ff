"""Test-session setup shared by every test module.

The JAX tests run on an 8-device CPU mesh, which XLA only provides when the flag is set before
jax is first imported, so it is set here, at collection time, for the whole session.
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the XLA flags above, which must precede any jax import)


@pytest.fixture
def x64():
    """float64 in JAX for the test (``pytestmark = pytest.mark.usefixtures("x64")``): the
    float64 comparisons against the reference need it."""
    import jax

    with jax.enable_x64(True):
        yield
