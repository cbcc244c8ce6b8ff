"""sf_torch under ``sf_torch.deepspeed.initialize``: data parallel over N ranks, ZeRO 0-3.

One row per ZeRO stage, ``deepspeed_z0`` ... ``deepspeed_z3``: a default run has all four where
DeepSpeed is installed, ``--backends sf_torch,deepspeed_z2`` picks one. The ranks (``--ranks``,
default 2) are processes started by ``torch.distributed.run``: gloo on CPU; NCCL and one GPU
per rank under ``--device cuda``. The global batch is the single-process one, split evenly over
the ranks, so each row must reproduce the single-device trajectory
(``parity.training.deepspeed_loop``).

Not supported: float64 (DeepSpeed all-reduces float32/bf16/fp16 gradients only, and ZeRO keeps
float32 masters); a batch that does not split evenly over the ranks; the handoff.
"""

from __future__ import annotations

import os

NAME = "deepspeed"
FRAMEWORK = "torch"
ROLE = "distributed"
REQUIRES = ("torch", "sf_torch", "deepspeed")
HANDOFF = False
VARIANTS = {f"deepspeed_z{stage}": {"zero_stage": stage} for stage in range(4)}
DEFAULT_RANKS = 2
# DeepSpeed compiles its CPU communication op on first use (minutes); `make` keeps it here.
TORCH_EXTENSIONS_DIR = os.path.join("~", ".cache", "schedulefree-parity", "torch_extensions")


def stage(config) -> int:
    return int(config.extra.get("zero_stage", 2))


def ranks(config) -> int:
    return int(config.extra.get("ranks", DEFAULT_RANKS))


def unsupported(config) -> str | None:
    if config.optimizer == "adamc_plus":
        return "adamc_plus's step needs the loss, and DeepSpeed's engine.step() passes none"
    if config.dtype == "float64":
        return "DeepSpeed reduces float32/bf16/fp16 gradients only (and ZeRO keeps float32 masters)"
    if config.batch_size % ranks(config):
        return f"the batch of {config.batch_size} does not split evenly over {ranks(config)} ranks"
    return None


def expected_difference(config) -> str | None:
    if config.dtype == "bfloat16":
        return (
            "DeepSpeed's bf16 keeps y in float32 masters (bf16 copies for compute); the "
            "single-process rows keep y in bf16, where small steps round away"
        )
    return None


def note(config) -> str | None:
    n = ranks(config)
    where = "CPU" if config.device == "cpu" else "GPU"
    backend = "gloo" if config.device == "cpu" else "NCCL"
    return f"{n} {where} rank{'s' if n > 1 else ''} ({backend})"


def environment(config) -> dict[str, str]:
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", os.path.expanduser(TORCH_EXTENSIONS_DIR)
        ),
        "OMP_NUM_THREADS": "1",
    }
    # DeepSpeed picks its accelerator when first imported; on CPU it must be told.
    env["DS_ACCELERATOR"] = "cpu" if config.device == "cpu" else "cuda"
    return env


def command(config, config_path: str, result_path: str) -> list[str]:
    from parity.runners import _child

    return _child.torchrun(__name__, ranks(config), config_path, result_path)


def train(config, progress=None):
    from parity.runners.sf_torch import make_optimizer
    from parity.training import deepspeed_loop

    return deepspeed_loop.run(config, make_optimizer, stage=stage(config), progress=progress)


if __name__ == "__main__":
    from parity.runners import _child

    _child.main_on_ranks(train)
