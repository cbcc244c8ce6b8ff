"""transformers' Trainer with sf_torch.integrations.transformers, against a plain torch loop.

Four configurations, each one launch of tests/trainer_hf_worker.py (all start together): one
process without DeepSpeed, and DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer offload (ours
only) on 2 CPU ranks (gloo). In each,
``ScheduleFreeTrainer(optim="schedule_free_adamw")`` trains a tiny BERT classifier built from a
config for 8 full-batch steps (eval every 3 steps, a checkpoint every 2), once through and once
resumed from the checkpoint at step 4; the peer (transformers' own ``Trainer`` with the same
``optim``, which gives it the ``schedulefree`` package's optimizer) does the same.

The expected numbers come from a plain loop written here: the same initial weights and data,
``sf_torch.AdamWScheduleFree`` with the Trainer's two param groups, x from ``eval_params()``.
Checks: every eval loss the Trainer logged equals the plain loop's eval loss at x (float32: the
two differ in summation order and in the rounding of the Trainer's eval/save round trips);
every checkpoint's model file equals the plain loop's x; the resumed run's last model file,
eval loss and optimizer state (per rank) are bitwise those of the uninterrupted run. The peer's
results on the same three checks are asserted to be what the README's table says.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from safetensors.torch import load_file  # noqa: E402
from trainer_hf_worker import (  # noqa: E402
    EVAL_STEPS,
    HPARAMS,
    N_EVAL,
    N_TRAIN,
    SAVE_STEPS,
    STEPS,
    WARMUP,
    make_data,
    make_model,
    training_args,
)

import sf_torch  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
CONFIGS = {
    "single": {"world": 1},
    "zero2": {"world": 2, "stage": 2},
    "zero3": {"world": 2, "stage": 3},
    # optimizer offload: Accelerate would swap in DeepSpeed's CPU Adam unless told not to
    "zero3_offload": {"world": 2, "stage": 3, "offload": True, "peer": False},
}
EVAL_RTOL = 1e-5  # measured: <= 1.2e-7 relative (ours, all three configurations)
WEIGHT_ATOL = 1e-5  # measured: <= 9.3e-7; x and y differ by >= 5.7e-4 at every save
# The peer's verdicts (eval at x, saved = x, resume bitwise), as in the README's table.
PEER = {
    "single": (True, False, True),
    "zero2": (False, False, True),
    "zero3": (False, False, True),
}


def full_batch(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the three configurations at once; gives {name: (folder, Popen)}."""
    root = tmp_path_factory.mktemp("trainer_hf")
    torch.manual_seed(0)
    torch.save(make_model().state_dict(), root / "init.pt")
    path = [str(HERE.parent), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), DS_ACCELERATOR="cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    started = {}
    for name, opts in CONFIGS.items():
        folder = root / name
        folder.mkdir()
        log = open(folder / "log.txt", "w")
        opts = dict(opts, init=str(root / "init.pt"))
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "trainer_hf_worker.py"), str(folder), json.dumps(opts)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started[name] = (folder, proc, log)
    yield root, started
    for _, proc, log in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def finished(runs, name: str):
    root, started = runs
    folder, proc, _ = started[name]
    rc = proc.wait(timeout=600)
    assert rc == 0, (folder / "log.txt").read_text()[-4000:]
    return folder, torch.load(folder / "results.pt")


@pytest.fixture(scope="module")
def plain(runs):
    """The plain loop: {step: x}, {step: y}, {step: eval loss at x} (names of the trained
    params; the frozen key biases keep their initial values in every run)."""
    root, _ = runs
    torch.set_num_threads(1)
    model = make_model()
    model.load_state_dict(torch.load(root / "init.pt"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = sf_torch.AdamWScheduleFree(
        [
            {"params": decay, "weight_decay": HPARAMS["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=HPARAMS["learning_rate"],
        betas=(HPARAMS["adam_beta1"], HPARAMS["adam_beta2"]),
        eps=1e-8,
        warmup_steps=WARMUP,
    )
    name_of = {id(p): n for n, p in named}
    order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    train, held_out = full_batch(make_data(N_TRAIN, 1)), full_batch(make_data(N_EVAL, 2))
    probe = make_model()
    probe.load_state_dict(model.state_dict())
    probe.eval()
    xs, ys, evals = {}, {}, {}
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        model(**train).loss.backward()
        opt.step()
        xs[step] = dict(zip(order, opt.eval_params()))
        ys[step] = {n: p.detach().clone() for n, p in named}
        probe.load_state_dict(xs[step], strict=False)
        with torch.no_grad():
            evals[step] = float(probe(**held_out).loss)
    return xs, ys, evals


def max_abs(saved: dict, expected: dict) -> float:
    return max(float((saved[n] - expected[n]).abs().max()) for n in expected)


def verdicts(folder: Path, results: list[dict], run: str, plain, seen: dict | None = None):
    """(eval at x, saved = x, resume bitwise) for `run` ("ours" or "peer"); what they were
    decided on goes into `seen` (for the failure messages)."""
    xs, _, evals = plain
    seen = {} if seen is None else seen
    rank0 = results[0]
    if rank0[run]["error"] is not None:
        seen["error"] = rank0[run]["error"]
        return False, False, False
    logged = rank0[run]["eval_loss"]
    assert sorted(logged) == list(range(EVAL_STEPS, STEPS + 1, EVAL_STEPS))
    seen["eval_rel"] = {s: abs(loss - evals[s]) / abs(evals[s]) for s, loss in logged.items()}
    eval_ok = all(d <= EVAL_RTOL for d in seen["eval_rel"].values())
    saves = range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)
    files = {s: load_file(folder / run / f"checkpoint-{s}" / "model.safetensors") for s in saves}
    seen["saved_from_x"] = {s: max_abs(files[s], xs[s]) for s in saves}
    saved_ok = all(d <= WEIGHT_ATOL for d in seen["saved_from_x"].values())
    resumed = rank0[f"{run}_resumed"]
    if resumed["error"] is not None:
        seen["resumed_error"] = resumed["error"]
        return eval_ok, saved_ok, False
    last = load_file(folder / f"{run}_resumed" / f"checkpoint-{STEPS}" / "model.safetensors")
    seen["same_file"] = all(torch.equal(last[k], files[STEPS][k]) for k in files[STEPS])
    seen["same_eval"] = resumed["eval_loss"] == logged
    seen["same_state"] = all(
        len(r[run]["state"]) == len(r[f"{run}_resumed"]["state"]) > 0
        and all(torch.equal(a, b) for a, b in zip(r[run]["state"], r[f"{run}_resumed"]["state"]))
        for r in results
    )
    return eval_ok, saved_ok, seen["same_file"] and seen["same_eval"] and seen["same_state"]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_trainer_at_x_and_resume_bitwise(runs, plain, config):
    folder, results = finished(runs, config)
    xs, ys, evals = plain
    assert len(results) == CONFIGS[config]["world"]
    seen: dict = {}
    assert verdicts(folder, results, "ours", plain, seen) == (True, True, True), seen
    # What the checks tell apart: eval at y and weights at y are far outside the tolerances.
    root, _ = runs
    probe = make_model()
    probe.load_state_dict(torch.load(root / "init.pt"))
    probe.eval()
    held_out = full_batch(make_data(N_EVAL, 2))
    for step in results[0]["ours"]["eval_loss"]:
        probe.load_state_dict(ys[step], strict=False)
        with torch.no_grad():
            at_y = float(probe(**held_out).loss)
        assert abs(at_y - evals[step]) > 100 * EVAL_RTOL * abs(evals[step])
    assert min(max_abs(ys[s], xs[s]) for s in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)) > (
        20 * WEIGHT_ATOL
    )
    # The peer, on the same checks: the README's table.
    if CONFIGS[config].get("peer", True):
        seen = {}
        assert verdicts(folder, results, "peer", plain, seen) == PEER[config], seen


def test_example_publishes_x(tmp_path):
    """examples/trainers/hf_trainer.py: its last checkpoint's model file, loaded into a fresh
    model and evaluated in plain torch, gives the eval loss the Trainer reported at x after
    training. Step 6 saves without an evaluation at that step: a model file at y (the callback's
    switches taken out) gives an eval loss 1.7e-4 relative away here; the tolerance is 1e-6."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--output-dir", str(tmp_path), "--steps", "6", "--eval-steps", "4", "--save-steps", "3"]
    args += ["--warmup-steps", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "examples.trainers.hf_trainer", *args],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout[proc.stdout.rindex("{\n") :])
    assert result["checkpoint"].endswith("checkpoint-6")
    assert abs(result["published_eval_loss"] - result["eval_loss"]) <= 1e-6 * result["eval_loss"]


@pytest.mark.parametrize(
    "optim", ["schedule_free_adamw", "schedule_free_sgd", "schedule_free_radam"]
)
def test_optim_names_match_transformers(tmp_path, optim):
    """The sf_torch class for each schedule_free optim name gets the arguments transformers
    gives the schedulefree class of the same name (transformers' own mapping, read here)."""
    import schedulefree
    from transformers import Trainer, TrainingArguments

    from sf_torch.integrations.transformers import ScheduleFreeTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim=optim,
        learning_rate=0.03,
        adam_beta1=0.8,
        adam_beta2=0.99,
        adam_epsilon=1e-7,
        weight_decay=0.05,
        warmup_steps=7,
        optim_args="r=0.5,weight_lr_power=1.5",
        report_to="none",
        use_cpu=True,
    )
    ref_cls, ref_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    cls, kwargs = ScheduleFreeTrainer.get_optimizer_cls_and_kwargs(args)
    assert ref_cls.__module__.startswith("schedulefree")
    assert cls is getattr(sf_torch, ref_cls.__name__)
    assert getattr(schedulefree, ref_cls.__name__) is ref_cls
    assert kwargs == ref_kwargs
    cls(make_model().parameters(), **kwargs)  # the sf_torch class accepts them

    args.optim_args = "r=0.5,momentum=0.8"
    with pytest.raises(ValueError, match="optim_args: \\['momentum'\\] not accepted"):
        ScheduleFreeTrainer.get_optimizer_cls_and_kwargs(args)


def test_callback_refuses_another_optimizer(tmp_path):
    """ScheduleFreeCallback on a Trainer whose optimizer is not sf_torch's (here transformers'
    default AdamW, and schedulefree's own) stops at the start of training, naming the class."""
    from transformers import Trainer

    from sf_torch.integrations.transformers import ScheduleFreeCallback

    for optim, name in [("adamw_torch", "torch.optim.adamw.AdamW"), (None, "schedulefree")]:
        args = training_args(str(tmp_path), {"world": 1})
        if optim:
            args.optim = optim
        trainer = Trainer(
            model=make_model(),
            args=args,
            train_dataset=make_data(N_TRAIN, 1),
            eval_dataset=make_data(N_EVAL, 2),
            callbacks=[ScheduleFreeCallback()],
        )
        with pytest.raises(ValueError, match=f"optimizer is {name}.*not an sf_torch"):
            trainer.train()


def test_integrations_are_lazy():
    """``import sf_torch`` and ``import sf_torch.integrations`` import no trainer library and no
    DeepSpeed; ``sf_torch.integrations.transformers`` imports transformers, not DeepSpeed."""
    code = (
        "import sys, sf_torch, sf_torch.integrations\n"
        "heavy = ('transformers', 'lightning', 'accelerate', 'deepspeed')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "t = sf_torch.integrations.transformers\n"
        "assert 'transformers' in sys.modules and 'deepspeed' not in sys.modules\n"
        "assert t.ScheduleFreeTrainer.__mro__[2].__name__ == 'Trainer'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE.parent, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
