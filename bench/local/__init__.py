"""Local steps (periodic averaging) against data-parallel training: ``python -m bench.local``.

- :mod:`bench.local.rows`: the settings, the rows (data-parallel, constant ``H``, QSR, the 1/lr
  rule, ScheduleFreeQSR, AveragingWindow), their sync steps and volumes, the data (numpy only);
- :mod:`bench.local.train`: the runs, K workers on a JAX device mesh (sf_optax.local);
- :mod:`bench.local.cli`: the command line, the table, the JSON and the plot.
"""
