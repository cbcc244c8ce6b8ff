"""The child side of a runner: read the config, train, write the record.

Progress goes to stdout as lines ``@progress <step>``, which the parent turns into its
progress bar; everything else a child prints lands in its log file.

A multi-rank runner's ``train`` returns the record on rank 0 and None on the other ranks (and
reports progress from rank 0 only): only rank 0 writes the result file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from parity.config import RunConfig
from parity.training.record import Record

PROGRESS = "@progress"


def report_progress(step: int) -> None:
    print(f"{PROGRESS} {step}", flush=True)


def main(train: Callable[[RunConfig, Callable[[int], None]], Record | None], argv=None) -> None:
    parser = argparse.ArgumentParser(description="run one parity backend (a child process)")
    parser.add_argument("config", type=Path)
    parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    config = RunConfig.from_json(args.config.read_text())
    record = train(config, report_progress)
    if record is not None:
        record.save(args.result)
    sys.stdout.flush()


def torchrun(module: str, ranks: int, config_path: str, result_path: str) -> list[str]:
    """A multi-rank runner's ``command``: ``ranks`` processes of ``module`` on one machine,
    started by ``torch.distributed.run``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        module,
        config_path,
        result_path,
    ]


def main_on_ranks(train: Callable[[RunConfig, Callable[[int], None]], Record | None]) -> None:
    """:func:`main` in a rank process of ``torch.distributed.run``; never returns.

    A failing rank's traceback goes into the launcher's summary (``record``: the log's end).
    Once the record is saved the interpreter's teardown is skipped: there a rank's native
    threads (gloo, DeepSpeed's comm op) now and then abort a finished process ("terminate
    called without an active exception"), which the launcher reports as a failed run.
    """
    import os

    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)(train)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
