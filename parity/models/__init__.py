"""The twin models: ``canonical`` (framework-neutral layout and init), ``flax_models``,
``torch_models``. Only the latter two import their framework."""
