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
