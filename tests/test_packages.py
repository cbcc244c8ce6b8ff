"""The two packages mirror each other: lazy submodules, what ``import`` pulls in, shared names.

``import sf_optax`` must not import torch, flax or orbax, and ``import sf_torch`` neither jax
nor DeepSpeed; their submodules ``sf_optax.schedules``/``flax``/``checkpoint`` and
``sf_torch.schedules``/``deepspeed`` are imported on first attribute access. Each check runs in
a fresh interpreter, since the test session has long imported everything.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for a GPU
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def docstring_example(path: Path) -> str:
    """The indented code block of a module's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    lines = [line for line in doc.splitlines() if line.startswith("    ")]
    return textwrap.dedent("\n".join(lines))


def test_sf_optax_imports_no_torch_flax_orbax_and_its_submodules_are_lazy():
    run_fresh(
        """
        import sys
        import sf_optax

        def loaded(*names):
            return [n for n in names if n in sys.modules]

        assert not loaded("torch", "flax", "orbax", "sf_optax.flax", "sf_optax.schedules"), loaded(
            "torch", "flax", "orbax", "sf_optax.flax", "sf_optax.schedules"
        )
        assert {"schedules", "flax", "checkpoint", "save_checkpoint"} <= set(dir(sf_optax))

        to_optax = sf_optax.schedules.to_optax
        assert to_optax is sys.modules["sf_optax.schedules"].to_optax
        assert not loaded("flax", "orbax")

        assert sf_optax.recompute_batchnorm_stats is sf_optax.flax.recompute_batchnorm_stats
        assert sf_optax.at_x is sys.modules["sf_optax.flax"].at_x
        assert sf_optax.save_checkpoint is sf_optax.checkpoint.save_checkpoint
        assert sf_optax.restore_checkpoint is sys.modules["sf_optax.checkpoint"].restore_checkpoint
        assert not loaded("torch", "orbax"), loaded("torch", "orbax")  # orbax: on first save
        for name in sf_optax.__all__:
            getattr(sf_optax, name)
        try:
            sf_optax.no_such_thing
        except AttributeError as error:
            assert "no_such_thing" in str(error)
        else:
            raise AssertionError("sf_optax.no_such_thing resolved")
        """
    )


def test_sf_optax_schedules_docstring_example_runs_as_written():
    example = docstring_example(ROOT / "sf_optax" / "schedules.py")
    assert "sf_optax.schedules.to_optax" in example and "import sf_optax.schedules" not in example
    run_fresh(example + "\nimport jax.numpy as jnp\nopt.init({'w': jnp.ones(3)})\n")


def test_sf_torch_imports_no_jax_deepspeed_and_its_submodules_are_lazy():
    run_fresh(
        """
        import sys
        import sf_torch

        def loaded(*names):
            return [n for n in names if n in sys.modules]

        assert not loaded("jax", "deepspeed", "sf_torch.deepspeed", "sf_torch.schedules"), loaded(
            "jax", "deepspeed", "sf_torch.deepspeed", "sf_torch.schedules"
        )
        assert {"schedules", "deepspeed"} <= set(dir(sf_torch))

        assert sf_torch.schedules.to_torch is sys.modules["sf_torch.schedules"].to_torch
        assert sf_torch.schedules.scheduler is sf_torch.schedules.to_torch
        assert not loaded("jax", "deepspeed")
        for name in sf_torch.__all__:
            getattr(sf_torch, name)

        assert callable(sf_torch.deepspeed.initialize)
        assert loaded("sf_torch.deepspeed") and not loaded("jax")
        """
    )


def test_recompute_batchnorm_stats_has_one_name_and_one_signature():
    import sf_optax
    import sf_torch

    def parameters(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert parameters(sf_torch.recompute_batchnorm_stats) == parameters(
        sf_optax.recompute_batchnorm_stats
    )


def test_old_torch_batchnorm_name_still_works_with_a_deprecation_warning():
    torch = pytest.importorskip("torch")
    import sf_torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    batches = [torch.randn(8, 3, dtype=torch.float64) for _ in range(3)]
    with sf_torch.recompute_batchnorm_stats(model, batches) as used:
        expected = (used, model[1].running_mean.clone(), model[1].running_var.clone())
    with pytest.warns(DeprecationWarning, match="recompute_batchnorm_stats"):
        block = sf_torch.batchnorm_stats_at_current_weights(model, batches)
    with block as used:
        assert used == expected[0]
        assert torch.equal(model[1].running_mean, expected[1])
        assert torch.equal(model[1].running_var, expected[2])
    assert model.training
