"""sf_torch on torch's FSDP2 (``fully_shard``, DTensor params): data parallel over N ranks.

Opt-in (``OPT_IN``: not in a default ``python -m parity run``; ``--backends sf_torch,fsdp2``).
The ranks (``--ranks``, default 2) are processes started by ``torch.distributed.run``: gloo on
CPU; NCCL and one GPU per rank under ``--device cuda``. The global batch is the single-process
one, split evenly over the ranks, so the row must reproduce the single-device trajectory
(``parity.training.fsdp2_loop``), float32 and float64 (FSDP2 shards and reduces float64 on
gloo). bfloat16 is FSDP2's mixed precision (float32 sharded params, bf16 compute, float32
reduce), reported against the single-process bf16 rows, which keep ``y`` in bf16.

Opt-in because it adds time, not coverage, to the default run on a small CPU machine: every
step all-gathers and reduce-scatters each unit over gloo and gathers every param for the
record. Measured on a busy 2-core machine, MLP float32, 60 steps: 4.8 s of training loop plus
~16 s of rank start-up, against 0.3 s for sf_torch in one process; tests/test_torch_fsdp2.py
checks the optimizer on FSDP2 in ``make test``. Measured rows (CPU, 2 ranks, against sf_torch):
MLP float32 params 4.6e-7 / eval loss 2.2e-7 relative, float64 5.8e-16 / 4.8e-16; CNN float32
3.6e-7 / 1.6e-7, CNN SGD float64 6.2e-16 / 2.0e-16; LM RAdam float32 1.7e-7 / 1.3e-7.

Not supported: a batch that does not split evenly over the ranks; the handoff.
"""

from __future__ import annotations

NAME = "fsdp2"
FRAMEWORK = "torch"
ROLE = "distributed"
REQUIRES = ("torch", "sf_torch")
HANDOFF = False
OPT_IN = True  # run only when named in --backends
DEFAULT_RANKS = 2


def ranks(config) -> int:
    return int(config.extra.get("ranks", DEFAULT_RANKS))


def unsupported(config) -> str | None:
    if config.batch_size % ranks(config):
        return f"the batch of {config.batch_size} does not split evenly over {ranks(config)} ranks"
    return None


def expected_difference(config) -> str | None:
    if config.dtype == "bfloat16":
        return (
            "FSDP2's mixed precision keeps y in float32 sharded params (bf16 copies for "
            "compute); the single-process rows keep y in bf16, where small steps round away"
        )
    return None


def note(config) -> str | None:
    n = ranks(config)
    where = "CPU" if config.device == "cpu" else "GPU"
    backend = "gloo" if config.device == "cpu" else "NCCL"
    return f"{n} {where} rank{'s' if n > 1 else ''} ({backend}), fully_shard"


def environment(config) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1"}


def command(config, config_path: str, result_path: str) -> list[str]:
    from parity.runners import _child

    return _child.torchrun(__name__, ranks(config), config_path, result_path)


def train(config, progress=None):
    from parity.runners.sf_torch import make_optimizer
    from parity.training import fsdp2_loop

    return fsdp2_loop.run(config, make_optimizer, progress=progress)


if __name__ == "__main__":
    from parity.runners import _child

    _child.main_on_ranks(train)
