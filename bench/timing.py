"""What the step benchmarks share: timing, XLA's memory figure, rows that may fail, report lines.

No framework is imported here.
"""

from __future__ import annotations

import gc
import statistics
import time

ROW_SECONDS = 4.0  # timed seconds a row may take: slow rows get fewer samples (at least 3)


def capped_repeats(repeats: int, seconds_per_step: float, inner: int) -> int:
    """``repeats``, cut so that a row's samples take about ROW_SECONDS (never below 3)."""
    fit = int(ROW_SECONDS / max(seconds_per_step * inner, 1e-9))
    return max(min(repeats, fit), min(repeats, 3))


def capped_samples(sample, repeats: int, inner: int) -> list[float]:
    """``repeats`` calls of ``sample()`` (seconds per step over ``inner`` steps), as many as
    ``capped_repeats`` allows after the first."""
    times = [sample()]
    times += [sample() for _ in range(capped_repeats(repeats, times[0], inner) - 1)]
    return times


def time_jax_steps(step, args, advance, warmup: int, repeats: int, inner: int):
    """Median seconds per call of a jitted ``step(*args)`` and the samples (``inner`` calls
    each, ended by ``block_until_ready``; see :func:`capped_samples`). ``advance(args, out)``
    gives the next call's arguments: donated buffers come back as outputs."""
    import jax

    carry = {"args": args, "out": None}

    def call():
        carry["out"] = step(*carry["args"])
        carry["args"] = advance(carry["args"], carry["out"])

    def sample():
        t0 = time.perf_counter()
        for _ in range(inner):
            call()
        jax.block_until_ready(carry["out"])
        return (time.perf_counter() - t0) / inner

    for _ in range(warmup):
        call()
    jax.block_until_ready(carry["out"])
    times = capped_samples(sample, repeats, inner)
    return statistics.median(times), times


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


def jax_extra_bytes(compiled, with_arguments: bool = False) -> int | None:
    """XLA's memory analysis of a compiled program: temporaries plus the outputs that do not
    reuse a donated input (plus the arguments with ``with_arguments``); None where the backend
    does not report it."""
    try:
        m = compiled.memory_analysis()
        extra = m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return int(extra + (m.argument_size_in_bytes if with_arguments else 0))
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None


def run_rows(names, row, skipped: list, after=None) -> list:
    """``row(name)`` for every name; one that raises is listed in ``skipped`` (and printed)
    while the others still run. ``after()`` follows every row (to give memory back)."""
    rows = []
    for name in names:
        try:
            rows.append(row(name))
        except Exception as e:  # noqa: BLE001  (one row that cannot run must not sink the rest)
            skipped.append({"name": name, "reason": f"{type(e).__name__}: {e}"})
            print(f"skipped {name}: {type(e).__name__}: {e}")
        if after is not None:
            after()
    return rows


def release(device: str) -> None:
    """Memory freed by a row goes back: torch's cached CUDA blocks too, before JAX (which does
    not preallocate here) or the next row allocates."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def format_mb(n_bytes: int | None) -> str:
    """``n_bytes`` in MB (10^6 bytes) to one decimal, or ``n/a`` where it was not measured."""
    return "n/a" if n_bytes is None else f"{n_bytes / 1e6:.1f}"


def skipped_lines(skipped: list[dict], width: int) -> list[str]:
    """One table line per row that could not run: its name padded to ``width`` (the table's
    first column), then the first 200 characters of the reason."""
    return [f"{s['name']:<{width}} skipped: {s['reason'][:200]}" for s in skipped]
