"""Runnable examples; each is one file meant to be read top to bottom (`python -m examples...`)."""
