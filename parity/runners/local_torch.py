"""Local steps in torch: K CPU ranks on gloo, each a worker, ``sf_torch.local.LocalSteps``.

Opt-in (``OPT_IN``: not in a default ``python -m parity run``; ``--backends
local_torch,local_optax``). The options come from ``RunConfig.extra["local"]`` (``--workers``,
``--sync``, ``--plain-sgd``), the data split, the sync list and what the record holds from
``parity.training.local_plan``; the loop is ``parity.training.local_torch_loop``. The ranks are
processes started by ``torch.distributed.run``, one per worker, always on the CPU.

It is compared with ``local_optax`` (the same workers, rows and sync steps in JAX), and with the
single-process rows only where the algorithms are the same (``local_plan.data_parallel_gap``).
"""

from __future__ import annotations

NAME = "local_torch"
FRAMEWORK = "torch"
ROLE = "distributed"
REQUIRES = ("torch", "sf_torch")
HANDOFF = False
OPT_IN = True  # run only when named in --backends
LOCAL = True  # a local-steps backend (parity.training.local_plan)


def unsupported(config) -> str | None:
    from parity.training import local_plan

    if config.device != "cpu":
        return "local_torch runs its ranks on the CPU (gloo) only"
    return local_plan.unsupported(config)


def expected_difference(config) -> str | None:
    return None


def note(config) -> str | None:
    from parity.training import local_plan

    try:
        k, steps = local_plan.workers(config), local_plan.sync_steps(config)
    except (TypeError, ValueError):
        return None
    return f"{k} CPU rank{'s' if k > 1 else ''} (gloo), {len(steps)} syncs"


def environment(config) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1"}


def command(config, config_path: str, result_path: str) -> list[str]:
    from parity.runners import _child
    from parity.training import local_plan

    return _child.torchrun(__name__, local_plan.workers(config), config_path, result_path)


def train(config, progress=None):
    from parity.runners.sf_torch import make_optimizer
    from parity.training import local_torch_loop

    return local_torch_loop.run(config, make_optimizer, progress=progress)


if __name__ == "__main__":
    from parity.runners import _child

    _child.main_on_ranks(train)
