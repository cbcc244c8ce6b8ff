"""Timing helpers shared by the step benchmarks (no framework imported here)."""

from __future__ import annotations

import statistics
import time

ROW_SECONDS = 4.0  # timed seconds a row may take: slow rows get fewer samples (at least 3)


def capped_repeats(repeats: int, seconds_per_step: float, inner: int) -> int:
    """``repeats``, cut so that a row's samples take about ROW_SECONDS (never below 3)."""
    fit = int(ROW_SECONDS / max(seconds_per_step * inner, 1e-9))
    return max(min(repeats, fit), min(repeats, 3))


def time_jax_steps(step, args, advance, warmup: int, repeats: int, inner: int, cap: bool = True):
    """Median seconds per call of a jitted ``step(*args)`` over samples of ``inner`` calls each,
    the samples, and the last arguments; ``advance(args, out)`` gives the next call's arguments
    (donated buffers come back as outputs). Each sample ends with ``block_until_ready``. With
    ``cap``, the samples are cut as ``capped_repeats`` says after the first."""
    import jax

    out = None
    for _ in range(warmup):
        out = step(*args)
        args = advance(args, out)
    jax.block_until_ready(out)
    times: list[float] = []
    n = repeats
    while len(times) < n:
        t0 = time.perf_counter()
        for _ in range(inner):
            out = step(*args)
            args = advance(args, out)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
        if cap and len(times) == 1:
            n = capped_repeats(repeats, times[0], inner)
    return statistics.median(times), times, args


def time_blocks(step, sync, steps: int, block: int) -> list[float]:
    """Seconds per call of ``steps`` calls of ``step()`` (which must not wait for its own work)
    in blocks of ``block`` calls, each block ended by ``sync()``: one sample per block."""
    times = []
    for start in range(0, steps, block):
        n = min(block, steps - start)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        times.append((time.perf_counter() - t0) / n)
    return times
