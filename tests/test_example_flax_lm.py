"""The sharded LM example on 8 CPU devices (tests/conftest.py): learning, eval at x, resume.

Independent numbers: the vocabulary size from CPython's help texts, the evaluation loss at
``x = (y - (1 - b1) z) / b1`` rebuilt in float64 numpy and pushed through the model by the test,
and an uninterrupted run that a checkpointed, resumed run must reproduce bit for bit (same
mesh) or to float32 round-off (another mesh shape).
"""

import math
import os
import shutil
from pydoc_data.topics import topics

import jax
import numpy as np
import pytest

import sf_optax
from examples.flax import lm_sharded

STEPS, SPLIT = 6, 3
SMALL = [
    "--cpu-devices=8",
    "--d-model=32",
    "--heads=2",
    "--layers=1",
    "--seq-len=16",
    "--batch-size=16",
    "--lr=0.01",
    "--warmup-steps=2",
    "--eval-batches=2",
    "--eval-every=3",
    "--ckpt-every=3",
    "--quiet",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    whole = lm_sharded.main(SMALL + [f"--steps={STEPS}", f"--ckpt-dir={root / 'whole'}"])
    first = lm_sharded.main(
        SMALL + [f"--steps={SPLIT}", f"--ckpt-dir={root / 'split'}", "--mesh=2,4"]
    )
    shutil.copytree(root / "split", root / "moved")  # the step-3 checkpoint, for another mesh
    resumed = lm_sharded.main(
        SMALL + [f"--steps={STEPS}", f"--ckpt-dir={root / 'split'}", "--resume"]
    )
    moved = lm_sharded.main(
        SMALL + [f"--steps={STEPS}", f"--ckpt-dir={root / 'moved'}", "--resume", "--mesh=4,2"]
    )
    return {"whole": whole, "first": first, "resumed": resumed, "moved": moved, "root": root}


def test_resumed_run_is_the_uninterrupted_run_bit_for_bit(runs):
    whole, first, resumed = runs["whole"], runs["first"], runs["resumed"]
    assert whole["mesh_shape"] == first["mesh_shape"] == resumed["mesh_shape"] == (2, 4)
    assert resumed["start_step"] == SPLIT and int(resumed["state"].step) == STEPS
    assert first["train_losses"] + resumed["train_losses"] == whole["train_losses"]
    for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(whole["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resumed_on_another_mesh_shape_matches_to_float32_roundoff(runs):
    moved, whole = runs["moved"], runs["whole"]
    assert moved["mesh_shape"] == (4, 2)
    w = moved["state"].params["blocks"][0]["up"]["kernel"]
    assert {s.data.shape for s in w.addressable_shards} == {(32, 128 // 2)}  # fsdp = 2 now
    np.testing.assert_allclose(moved["train_losses"], whole["train_losses"][SPLIT:], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(moved["state"]), jax.tree.leaves(whole["state"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_eval_loss_at_x_is_what_numpy_x_gives_and_beats_uniform(runs):
    run = runs["whole"]
    vocab = len(set("\n\n".join(topics.values())))
    assert run["vocab_size"] == vocab
    state, b1 = run["state"], run["b1"]
    z = sf_optax.find_state(state.opt_state).z
    x = jax.tree.map(
        lambda y, z: (
            (np.asarray(y, np.float64) - (1 - b1) * np.asarray(z, np.float64)) / b1
        ).astype(np.float32),
        state.params,
        z,
    )
    apply = jax.jit(state.apply_fn)  # the model's forward pass; the rest is numpy
    losses = []
    for batch in run["eval_batches"]:
        logits = np.asarray(apply(x, batch[:, :-1]), np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = batch[:, 1:]
        losses.append(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())
    np.testing.assert_allclose(run["eval_loss_x"], np.mean(losses), rtol=1e-4)
    # Uniform guessing costs log(vocab) = 4.63; six steps already learn character frequencies.
    assert np.mean(losses) < math.log(vocab) - 0.5
    assert run["train_losses"][-1] < run["train_losses"][0]


def killed_while_saving(runs, tmp_path):
    """A copy of the uninterrupted run's checkpoints as a kill during the step-6 save leaves
    them: Orbax writes a step into STEP.orbax-checkpoint-tmp-TIME and renames it when done."""
    directory = tmp_path / "killed"
    shutil.copytree(runs["root"] / "whole", directory)
    assert sorted(os.listdir(directory)) == ["3", "6"]
    os.rename(directory / "6", directory / "6.orbax-checkpoint-tmp-1767225600")
    return directory


def test_resume_after_a_kill_while_saving_continues_from_the_last_complete_step(runs, tmp_path):
    directory = killed_while_saving(runs, tmp_path)
    resumed = lm_sharded.main(SMALL + [f"--steps={STEPS}", f"--ckpt-dir={directory}", "--resume"])
    assert resumed["start_step"] == SPLIT
    assert resumed["train_losses"] == runs["whole"]["train_losses"][SPLIT:]
    assert sorted(os.listdir(directory)) == ["3", "6"]  # the unfinished save is gone


def test_fresh_run_after_a_kill_while_saving_replaces_the_old_checkpoints(runs, tmp_path):
    directory = killed_while_saving(runs, tmp_path)
    run = lm_sharded.main(SMALL + [f"--steps={SPLIT}", f"--ckpt-dir={directory}"])
    assert run["train_losses"] == runs["whole"]["train_losses"][:SPLIT]
    assert os.listdir(directory) == ["3"]


def test_fresh_run_keeps_files_that_are_not_checkpoints(tmp_path):
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="notes.txt"):
        lm_sharded.main(SMALL + [f"--steps={SPLIT}", f"--ckpt-dir={directory}"])
    assert (directory / "notes.txt").exists()


@pytest.mark.parametrize("exists", [False, True])
def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys, exists):
    directory = tmp_path / "nothing"
    if exists:
        directory.mkdir()
    with pytest.raises(SystemExit) as stop:
        lm_sharded.main(SMALL + [f"--steps={SPLIT}", f"--ckpt-dir={directory}", "--resume"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lm_sharded: error: --resume: ") and str(directory) in err
    assert directory.exists() == exists  # nothing created
