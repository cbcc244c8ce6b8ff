"""Parity: one twin model, one seed, one data stream, several Schedule-Free backends.

    python -m parity run            # table, report.json and report.png under reports/
    python -m parity handoff        # JAX -> torch -> JAX mid-run

- ``parity.models``: the twin models (canonical layout, flax.nnx, torch) and their mapping;
- ``parity.data``: every batch, from numpy and the seed;
- ``parity.runners``: one file per backend, each run in its own process;
- ``parity.training``: the per-framework training loops and the per-step record;
- ``parity.compare``, ``parity.tolerances``, ``parity.report``: differences, limits, output;
- ``parity.handoff``: moving a run's state between sf_optax and sf_torch.

Importing this package imports neither jax nor torch.
"""
