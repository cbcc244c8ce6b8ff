"""Parity for the user's own models: a torch model and its Flax twin, mapped and compared."""
