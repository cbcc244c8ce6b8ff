"""ScheduleFreeCallback in real Lightning runs on CPU: one process, and DeepSpeed ZeRO-2 and
ZeRO-3 on 2 ranks (gloo) through Lightning's DeepSpeedStrategy.

The runs happen in tests/trainer_lightning_worker.py (one launch per configuration: a full run
with validations and checkpoints, then runs resumed from its checkpoints); the numbers they are
held to come from a plain torch loop written here with the optimizer classes directly (same
data, same initial weights): the eval loss at x after every VAL_EVERY steps, and x and y at
every step. The peer is the ``schedulefree`` package with the user callbacks of the worker's
docstring; each peer test asserts the failure it shows (the README's table).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_lightning_worker import BATCH, STEPS, VAL_EVERY, lr_of

from examples.trainers import lightning_module as ex

HERE = Path(__file__).parent
REL = 1e-5  # float32: the loss at x from Lightning vs the plain loop (measured <= 2e-7)
TIMINGS = {}

PLAIN_RUNS = [
    ["ours", "adamw"],
    ["ours", "sgd"],
    ["ours", "radam"],
    ["ours", "schedulefree_adamw"],
    ["train_only", "schedulefree_adamw"],
    ["naive", "schedulefree_adamw"],
    ["eval_only", "schedulefree_adamw"],
]


def env() -> dict:
    path = [str(HERE.parent), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), DS_ACCELERATOR="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lightning")
    out = folder / "out.pt"
    opts = {"folder": str(folder), "runs": PLAIN_RUNS}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "trainer_lightning_worker.py"), str(out), json.dumps(opts)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    TIMINGS["plain"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def launch_deepspeed(folder: Path, stage: int, runs: list) -> list[dict]:
    """Both ranks started here (Lightning reads LOCAL_RANK, WORLD_SIZE, ... from them)."""
    out = folder / "out.pt"
    opts = {"folder": str(folder), "stage": stage, "world": 2, "runs": runs}
    opts["resume"] = ["step=8.ckpt"]
    port = str(free_port())
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "trainer_lightning_worker.py"), str(out), json.dumps(opts)],
            env=dict(
                env(),
                LOCAL_RANK=str(r),
                NODE_RANK="0",
                WORLD_SIZE="2",
                MASTER_PORT=port,
                MASTER_ADDR="127.0.0.1",
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    TIMINGS[f"deepspeed_stage_{stage}"] = time.perf_counter() - start
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    runs = [["ours", "adamw"], ["naive", "schedulefree_adamw"]]
    return launch_deepspeed(tmp_path_factory.mktemp("zero2"), 2, runs)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return launch_deepspeed(tmp_path_factory.mktemp("zero3"), 3, [["ours", "adamw"]])


# -- the plain loop --------------------------------------------------------------------------


def reference(name: str) -> dict:
    """eval loss at x every VAL_EVERY steps, and x and y after every step (by param name)."""
    net = ex.make_net(0)
    opt = ex.make_optimizer(name, net.parameters(), lr_of(name), 0)
    opt.train()  # schedulefree's classes start in eval mode
    xt, yt, xv, yv = ex.digits()
    names = [f"net.{n}" for n, _ in net.named_parameters()]
    out = {"val": [], "x": {}, "y": {}}
    per_epoch = len(yt) // BATCH
    for step in range(1, STEPS + 1):
        rows = slice((step - 1) % per_epoch * BATCH, ((step - 1) % per_epoch + 1) * BATCH)
        torch.nn.functional.cross_entropy(net(xt[rows]), yt[rows]).backward()
        opt.step()
        opt.zero_grad()
        out["y"][step] = {n: p.detach().clone() for n, p in zip(names, net.parameters())}
        opt.eval()
        out["x"][step] = {n: p.detach().clone() for n, p in zip(names, net.parameters())}
        if step % VAL_EVERY == 0:
            with torch.no_grad():
                losses = [
                    torch.nn.functional.cross_entropy(net(xv[i : i + BATCH]), yv[i : i + BATCH])
                    for i in range(0, len(yv), BATCH)
                ]
            out["val"].append((step, float(torch.stack(losses).mean())))
        opt.train()
    return out


REFERENCE = {}


def ref(name: str) -> dict:
    if name not in REFERENCE:
        REFERENCE[name] = reference(name)
    return REFERENCE[name]


def rel_gap(a: dict, b: dict) -> float:
    return max(float((a[k].detach() - b[k]).abs().max() / b[k].abs().max()) for k in b)


def val_gap(got: list, want: list) -> float:
    assert [s for s, _ in got] == [s for s, _ in want]
    return max(abs(g - w) / abs(w) for (_, g), (_, w) in zip(got, want))


def bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_equal(entry: dict) -> dict:
    full = entry["full"]
    return {
        key: bitwise(run["final"], full["final"]) and bitwise(run["optimizer"], full["optimizer"])
        for key, run in entry.items()
        if key.startswith("resumed:")
    }


# -- one process -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "radam", "schedulefree_adamw"])
def test_ours_one_process(plain, optimizer):
    entry, want = plain[f"ours-{optimizer}"], ref(optimizer)
    assert entry["full"]["error"] is None
    # the validation loss Lightning logged is the loss at x
    assert val_gap(entry["full"]["val"], want["val"]) <= REL
    # every checkpoint's state_dict is x (and far from y), the optimizer saved in eval mode,
    # the exact y beside them
    assert len(entry["checkpoints"]) == 6
    for name, ckpt in entry["checkpoints"].items():
        step = ckpt["global_step"]
        assert rel_gap(ckpt["state_dict"], want["x"][step]) <= REL, name
        assert bitwise(ckpt["x"], ckpt["state_dict"]), name  # load_x_state_dict(file)
        assert ckpt["optimizer_train_mode"] in ([False], []), name
        assert rel_gap(ckpt["schedule_free"]["y"], want["y"][step]) <= REL, name
    # after fit the model holds x; x and y are far apart by then (the checks can fail)
    assert rel_gap(entry["full"]["final"], want["x"][STEPS]) <= REL
    assert rel_gap(want["x"][STEPS], want["y"][STEPS]) > 10 * REL
    # resumed from a train-mode and an eval-mode checkpoint: bitwise the uninterrupted run
    assert resumed_equal(entry) == {"resumed:step=8.ckpt": True, "resumed:val-step=8.ckpt": True}
    for key in ("resumed:step=8.ckpt", "resumed:val-step=8.ckpt"):
        assert entry[key]["val"] == entry["full"]["val"][2:]


@pytest.mark.slow
def test_peer_train_only_evaluates_and_saves_y(plain):
    entry, want = plain["train_only-schedulefree_adamw"], ref("schedulefree_adamw")
    assert entry["full"]["error"] is None
    assert val_gap(entry["full"]["val"], want["val"]) > 1e-3  # evaluated at y
    for name, ckpt in entry["checkpoints"].items():
        step = ckpt["global_step"]
        assert rel_gap(ckpt["state_dict"], want["x"][step]) > 100 * REL, name
        assert rel_gap(ckpt["state_dict"], want["y"][step]) <= REL, name
    assert all(resumed_equal(entry).values())  # never switches: nothing to lose on resume


@pytest.mark.slow
def test_peer_naive_callback_saves_y_and_resumes_off_trajectory(plain):
    entry, want = plain["naive-schedulefree_adamw"], ref("schedulefree_adamw")
    assert entry["full"]["error"] is None
    assert val_gap(entry["full"]["val"], want["val"]) <= REL  # eval at x: right
    for name, ckpt in entry["checkpoints"].items():  # train() ran before ModelCheckpoint saved
        step = ckpt["global_step"]
        assert rel_gap(ckpt["state_dict"], want["x"][step]) > 100 * REL, name
        assert rel_gap(ckpt["state_dict"], want["y"][step]) <= REL, name
    # step=8 was saved before that step's validation, whose eval()/train() round trip moved y by
    # rounding in the uninterrupted run; the resumed run does not validate step 8 again
    assert resumed_equal(entry) == {"resumed:step=8.ckpt": False, "resumed:val-step=8.ckpt": True}


@pytest.mark.slow
def test_peer_eval_only_crashes(plain):
    entry = plain["eval_only-schedulefree_adamw"]
    assert "not in train mode" in entry["full"]["error"]
    assert entry["full"]["val"] == entry["full"]["val"][:1]  # after the first validation


# -- DeepSpeed, 2 ranks ---------------------------------------------------------------------------


def check_ours_deepspeed(ranks: list[dict], stage: int) -> None:
    want = ref("adamw")
    for rank in ranks:
        entry = rank["ours-adamw"]
        assert entry["full"]["error"] is None
        assert val_gap(entry["full"]["val"], want["val"]) <= REL
        assert len(entry["checkpoints"]) == 6
        for name, ckpt in entry["checkpoints"].items():
            # load_x_state_dict: ZeRO-2 the module file, ZeRO-3 the x gathered onto rank 0
            step = ckpt["global_step"]
            assert rel_gap(ckpt["state_dict"], want["x"][step]) <= REL, name
            assert rel_gap(ckpt["state_dict"], want["y"][step]) > 100 * REL, name
        ckpt = entry["checkpoints"]["step=8.ckpt"]
        # the x converter's file, through load_from_checkpoint and load_x_state_dict: x
        assert rel_gap(ckpt["converted_x"], want["x"][8]) <= REL
        assert bitwise(ckpt["converted_x_loaded"], ckpt["state_dict"])
        # DeepSpeed's zero_to_fp32 and Lightning's converter rebuild the fp32 masters: y
        assert rel_gap(ckpt["zero_to_fp32"], want["y"][8]) <= REL
        assert rel_gap(ckpt["lightning_fp32"], want["y"][8]) <= REL
        # load_x_state_dict on Lightning's file: ZeRO-3's carries the callback's x along,
        # ZeRO-2's (no module file) is refused
        if stage == 3:
            assert bitwise(ckpt["lightning_fp32_x"], ckpt["state_dict"])
        else:
            assert "holds no x" in ckpt["lightning_fp32_x"]
        # trainer.validate(ckpt_path=...) evaluates at x: ZeRO-2 the folder, ZeRO-3 the x
        # converter's file with load_full_weights=True
        assert val_gap([(8, v) for v in entry["validate:step=8.ckpt"]], want["val"][1:2]) <= REL
        assert rel_gap(want["x"][STEPS], want["y"][STEPS]) > 100 * REL
        assert rel_gap(entry["full"]["final"], want["x"][STEPS]) <= REL
        assert resumed_equal(entry) == {"resumed:step=8.ckpt": True}  # this rank's z and v too


@pytest.mark.slow
def test_ours_deepspeed_zero2(zero2):
    check_ours_deepspeed(zero2, 2)


@pytest.mark.slow
def test_ours_deepspeed_zero3(zero3):
    check_ours_deepspeed(zero3, 3)


@pytest.mark.slow
def test_peer_deepspeed_zero2_evaluates_and_saves_y(zero2):
    # the user's optimizer.eval() moves DeepSpeed's fp32 masters, not the weights the model
    # computes with: validation and the saved module run at y
    want = ref("schedulefree_adamw")
    for rank in zero2:
        entry = rank["naive-schedulefree_adamw"]
        assert entry["full"]["error"] is None
        assert val_gap(entry["full"]["val"], want["val"]) > 1e-3
        for name, ckpt in entry["checkpoints"].items():
            assert rel_gap(ckpt["state_dict"], want["x"][ckpt["global_step"]]) > 100 * REL, name
        assert resumed_equal(entry) == {"resumed:step=8.ckpt": False}


def test_timings(plain, zero2, zero3):
    print({k: round(v, 1) for k, v in TIMINGS.items()})
    for stage, ranks in ((2, zero2), (3, zero3)):
        entry = ranks[0]["ours-adamw"]
        parts = {k: round(entry[k], 1) for k in ("seconds", "read_seconds", "validate_seconds")}
        print(f"ZeRO-{stage} rank 0, ours-adamw:", parts)


def test_load_x_state_dict_refuses_what_holds_no_x(tmp_path):
    from sf_torch.integrations.lightning import load_x_state_dict

    with pytest.raises(ValueError, match="does not exist"):
        load_x_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="tag must be a str"):
        load_x_state_dict(tmp_path, tag=3)
    with pytest.raises(ValueError, match="no DeepSpeed model-states file"):
        load_x_state_dict(tmp_path)
    weights = {"net.0.weight": torch.ones(2, 2)}
    torch.save({"state_dict": weights}, tmp_path / "other.ckpt")  # saved without the callback
    with pytest.raises(ValueError, match="not saved with ScheduleFreeCallback"):
        load_x_state_dict(tmp_path / "other.ckpt")
    # a ZeRO-3 rank-0 file whose entry has no gathered x (its "module" holds no weights)
    (tmp_path / "z3" / "checkpoint").mkdir(parents=True)
    entry = {"weights": "x", "y": None, "deepspeed": True}
    torch.save(
        {"module": weights, "schedule_free": entry},
        tmp_path / "z3" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    with pytest.raises(ValueError, match="holds no x"):
        load_x_state_dict(tmp_path / "z3")
