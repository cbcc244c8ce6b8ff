"""Flax (flax.nnx) training runs with sf_optax: `python -m examples.flax.digits_demo`."""
