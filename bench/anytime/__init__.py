"""The anytime study: Schedule-Free against schedules that must be told their length.

A cosine or WSD schedule is given its length ``T`` in advance, and its model is only good at
that length; Schedule-Free needs none: its ``x`` is meant to be good at every step. The study
measures that claim at the horizons ``T/4``, ``T/2`` and ``T`` (``runs.py``: the sweep and its
table) on three problems (``problems.py``): ``digits`` (parity's BatchNorm CNN) and ``charlm``
(a character-level Transformer) with AdamW in float32, and ``convex`` (logistic regression,
its ``f*`` known) with SGD in float64, where the convex bounds apply (``bounds.py``). The
AdamW problems also run Schedule-Free AdamW with ``inner_momentum`` and SF+ (AdamC with a
Polyak step, ``sf_optax.adamc_plus``), whose Polyak rule takes the minimum loss as 0. Every run
starts from the same weights and sees the same batches in both frameworks (``jax_trainer.py``,
``torch_trainer.py``); ``plot.py`` draws the curves beside the bounds, and ``python -m
bench.anytime`` (``cli.py``) runs it all.
"""
