"""Parity: one twin model, one seed, one data stream, several Schedule-Free backends.

    python -m parity run            # table, report.json and report.png under reports/
    python -m parity handoff        # JAX -> torch -> JAX mid-run

- ``parity.models``: the twin models (canonical layout, flax.nnx, torch) and their mapping;
- ``parity.data``: every batch, from numpy and the seed;
- ``parity.runners``: one file per backend, each run in its own process;
- ``parity.training``: the per-framework training loops and the per-step record;
- ``parity.compare``, ``parity.tolerances``, ``parity.report``: differences, limits, output;
- ``parity.handoff``: moving a run's state between sf_optax and sf_torch.

- ``parity.own``: the same checks on the user's own torch model and Flax twin
  (``parity.check(...)``, ``python -m parity check SPEC``).

Importing this package imports neither jax nor torch.
"""


def __getattr__(name: str):
    if name == "check":  # parity.check(...) is parity.own.check(...), loaded on first use
        import parity.own.check

        return parity.own.check
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
