"""Runs backends as child processes (one per backend, several at a time) and collects records.

Each child gets its own config file and writes its record and a log into ``workdir``; its
``@progress`` lines drive one shared progress bar in a terminal, or one plain line per finished
backend where the output goes to a file or a pipe (a redrawn bar would fill a log with
thousands of carriage-return frames).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from parity import data as data_lib
from parity import runners as runner_registry
from parity.config import RunConfig
from parity.runners._child import PROGRESS
from parity.training.record import Record


@dataclass
class Outcome:
    name: str
    record: Record | None
    seconds: float  # wall time of the child process, start-up included
    error: str | None = None
    log: Path | None = None


def run_child(
    runner: ModuleType,
    config: RunConfig,
    workdir: Path,
    tag: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Run one backend in its own process; returns its record, or the error and its log."""
    tag = tag or runner.NAME
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = _with_digits_file(config, workdir)
    config_path = workdir / f"{tag}.config.json"
    result_path = workdir / f"{tag}.npz"
    log_path = workdir / f"{tag}.log"
    config_path.write_text(config.to_json())
    result_path.unlink(missing_ok=True)
    argv = runner_registry.command(runner, config, config_path, result_path)
    env = dict(os.environ, **runner_registry.environment(runner, config))
    env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=_project_root()
        )
        for line in child.stdout:
            if line.startswith(PROGRESS):
                if on_progress is not None:
                    on_progress(int(line.split()[1]))
            else:
                log.write(line)
        rc = child.wait()
    seconds = time.perf_counter() - start
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-15:]
        message = f"exit code {rc}; last lines of {log_path}:\n    " + "\n    ".join(tail)
        return Outcome(tag, None, seconds, message, log_path)
    return Outcome(tag, Record.load(result_path), seconds, None, log_path)


# How run_all shows progress: a redrawn bar, one line per finished backend, or nothing.
BAR, LINES, OFF = "bar", "lines", "off"
PROGRESS_MODES = (BAR, LINES, OFF)
# A bar redraws at most this often (seconds): tqdm's default, 0.1 s, is ten frames a second.
BAR_INTERVAL = 0.5


def default_progress() -> str:
    """A bar where both stdout and stderr are terminals, else plain lines."""
    return BAR if sys.stdout.isatty() and sys.stderr.isatty() else LINES


def run_all(
    jobs: list[tuple[ModuleType, RunConfig]],
    workdir: Path,
    parallel: int = 1,
    progress: str | None = None,
) -> dict[str, Outcome]:
    """Run every ``(runner, config)`` pair, ``parallel`` at a time.

    ``progress``: ``"bar"``, one tqdm bar on stderr (plain lines where tqdm is not installed);
    ``"lines"``, one line on stderr per finished backend; ``"off"``; None picks
    :func:`default_progress`.
    """
    progress = progress or default_progress()
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {progress!r}")
    bar = None
    if progress == BAR:
        try:
            from tqdm import tqdm
        except ImportError:
            progress = LINES
        else:
            bar = tqdm(
                total=sum(c.steps - c.first_step for _, c in jobs),
                unit="step",
                leave=False,
                desc="parity",
                dynamic_ncols=True,
                mininterval=BAR_INTERVAL,
            )
    lock = threading.Lock()
    finished = [0]

    def one(job):
        runner, config = job
        done = [config.first_step]

        def advance(step):
            with lock:
                bar.update(step - done[0])
                # refresh=False: the postfix shows at the next throttled redraw, not as one of
                # its own (a forced redraw per step made thousands of frames).
                bar.set_postfix_str(runner.NAME, refresh=False)
                done[0] = step

        outcome = run_child(runner, config, workdir, on_progress=advance if bar else None)
        if progress == LINES:
            with lock:
                finished[0] += 1
                verdict = "done" if outcome.record is not None else "FAILED"
                print(
                    f"parity: {runner.NAME} {verdict} ({config.steps - config.first_step} steps, "
                    f"{outcome.seconds:.1f} s) [{finished[0]}/{len(jobs)}]",
                    file=sys.stderr,
                    flush=True,
                )
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        outcomes = list(pool.map(one, jobs))
    if bar is not None:
        bar.close()
    return {o.name: o for o in outcomes}


_digits_lock = threading.Lock()


def _with_digits_file(config: RunConfig, workdir: Path) -> RunConfig:
    """The config reading the digits from one file in ``workdir`` (written on first use)."""
    if config.model == "lm" or config.digits_file:
        return config
    path = workdir / "digits.npz"
    with _digits_lock:
        if not path.exists():
            data_lib.save_digits(path)
    return config.replace(digits_file=str(path))


def _project_root() -> str:
    """The directory holding the ``parity`` package, so that children import the same code."""
    return str(Path(__file__).resolve().parent.parent)
