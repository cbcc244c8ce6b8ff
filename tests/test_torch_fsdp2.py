"""sf_torch's optimizers on FSDP2 (torch's ``fully_shard``, DTensor params): 2 CPU ranks, gloo.

Two launches of tests/fsdp2_worker.py, both under Triton's interpreter (``fused=True`` runs the
Triton kernel on the local shards): 2 ranks run every scenario, then 1 rank loads their
checkpoint. What the records must hold is computed here: the ``schedulefree`` reference classes
on one process over the whole batch (float64), torch's own lerp for the eval()/train() views,
and bitwise equality where a resumed run must repeat the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fsdp2_worker as fw  # noqa: E402

# float64: the sharded run and the reference part only by round-off (the gradient is averaged
# over 2 ranks, the reference's over one batch). float32 against the float64 reference: 8
# steps of float32 round-off, measured <= 2e-7 relative; the limit leaves 25x.
TOL = {"float64": 1e-12, "float32": 5e-6}
TIMINGS: dict = {}


def launch(where: Path, **opts) -> list[dict]:
    out = where / f"{opts['mode']}.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "fsdp2_worker.py"), str(out), json.dumps(opts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    TIMINGS[opts["mode"]] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    main = launch(folder, mode="main", folder=str(folder), world=2)
    resized = launch(folder, mode="resize", folder=str(folder), world=1)
    return {"main": main, "resize": resized[0]["resize"]}


@pytest.fixture(scope="module")
def reference():
    """The ``schedulefree`` classes, one process, whole batches, float64: y and x (and z, v)
    after STEPS steps, in the model's parameter order."""
    import schedulefree

    classes = {
        "adamw": schedulefree.AdamWScheduleFree,
        "sgd": schedulefree.SGDScheduleFree,
        "radam": schedulefree.RAdamScheduleFree,
    }
    out = {}
    for kind, kw in fw.KINDS.items():
        for steps in (fw.SAVE_AT, fw.STEPS):
            model = fw.make_model(torch.float64)
            opt = classes[kind](fw.param_groups(model), **kw)
            opt.train()
            for step in range(steps):
                fw.loss_of(model, step, dtype=torch.float64).backward()
                opt.step()
                opt.zero_grad()
            params = list(model.parameters())
            y = [p.detach().clone() for p in params]
            z = [opt.state[p]["z"].clone() for p in params]
            opt.eval()
            x = [p.detach().clone() for p in params]
            out[kind, steps] = {"y": y, "x": x, "z": z}
    return out


def rel(a, b) -> float:
    """max |a - b| over all tensors, relative to the largest |b|."""
    scale = max(float(t.double().abs().max()) for t in b if t.numel())
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b)) / scale


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def test_every_implementation_matches_the_reference(runs, reference):
    records = runs["main"][0]["trajectories"]
    assert len(records) == 2 * len(fw.KINDS) * len(fw.IMPLS)
    for key, rec in records.items():
        kind, _, dtype = key.split("/")
        ref = reference[kind, fw.STEPS]
        for view in ("y", "x", "z"):
            assert rel(rec[view], ref[view]) <= TOL[dtype], (key, view, rel(rec[view], ref[view]))
        # counters: once per step, in every group
        assert [c["k"] for c in rec["counters"]] == [fw.STEPS, fw.STEPS], key


def test_state_is_sharded_like_its_param(runs):
    for r in runs["main"]:
        for key, rec in r["trajectories"].items():
            assert rec["state_sharded"], key  # z, v: DTensors with the param's placements
            assert all(rec["eval_params_dtensor"]), key
            # each rank reassembles the same full tensors
        other = runs["main"][1 - r["rank"]]["trajectories"]
        for key, rec in r["trajectories"].items():
            assert same(rec["y"], other[key]["y"]) and same(rec["z"], other[key]["z"]), key


def test_eval_and_train_switch_the_shards_exactly(runs):
    for key, rec in runs["main"][0]["trajectories"].items():
        kind, impl, dtype = key.split("/")
        b1 = fw.KINDS[kind].get("momentum") or fw.KINDS[kind]["betas"][0]
        # eval() writes x = lerp(y, z, 1 - 1/b1) into every shard, as eval_params() gives it;
        # train() writes y = lerp(x, z, 1 - b1) back. torch's lerp on the full tensors gives
        # the same bits as the loop's on the shards; the lerp kernel (fused) rounds within an
        # ulp of it (2 ulps relative to the largest weight)
        want_x = [torch.lerp(y, z, 1 - 1 / b1) for y, z in zip(rec["y"], rec["z"])]
        want_y = [torch.lerp(x, z, 1 - b1) for x, z in zip(rec["after_eval"], rec["z"])]
        if impl == "fused":
            ulp = torch.finfo(getattr(torch, dtype)).eps
            assert rel(rec["after_eval"], want_x) <= 2 * ulp, key
            assert rel(rec["after_eval"], rec["x"]) <= 2 * ulp, key
            assert rel(rec["after_train"], want_y) <= 2 * ulp, key
        else:
            assert same(rec["after_eval"], want_x), key
            assert same(rec["after_eval"], rec["x"]), key
            assert same(rec["after_train"], want_y), key


def test_a_forward_without_backward_needs_reshard_before_a_switch(runs):
    # FSDP2 keeps the root's own params unsharded after a forward without backward (an eval
    # forward), and a later forward does not all-gather them again: a switch after it, without
    # model.reshard(), is not seen by the root's params (the README's recipe reshards).
    for r in runs["main"]:
        stale = r["stale_root"]
        assert stale[True] == stale["plain"]
        assert abs(stale[False] - stale["plain"]) > 1e-4


def test_mixed_precision_policy(runs):
    # bf16 compute, float32 reduce: the optimizer steps the float32 shards with the float32
    # gradients FSDP2 reduced. Replayed here on one process from the same gradients: sf_torch
    # unsharded (the same elementwise ops) and the schedulefree reference.
    import schedulefree

    import sf_torch

    for impl, run in runs["main"][0]["mixed_precision"].items():
        assert run["dtypes"] == ["torch.float32"], impl
        replays = {}
        for name, cls in (
            ("sf_torch", sf_torch.AdamWScheduleFree),
            ("schedulefree", schedulefree.AdamWScheduleFree),
        ):
            model = fw.make_model()
            with torch.no_grad():
                for p, y0 in zip(model.parameters(), run["y0"]):
                    p.copy_(y0)
            extra = dict(foreach=False) if name == "sf_torch" else {}
            opt = cls(fw.param_groups(model), **fw.KINDS["adamw"], **extra)
            opt.train()
            for grads in run["grads"]:
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
                opt.step()
            params = list(model.parameters())
            replays[name] = {
                "y": [p.detach().clone() for p in params],
                "z": [opt.state[p]["z"] for p in params],
                "v": [opt.state[p]["exp_avg_sq"] for p in params],
            }
        final = run["final"]
        for view in ("y", "z", "v"):
            if impl == "loop":
                assert same(final[view], replays["sf_torch"][view]), (impl, view)
            else:  # the Triton kernel rounds like torch's ops to an ulp or so
                assert rel(final[view], replays["sf_torch"][view]) <= 1e-6, (impl, view)
            assert rel(final[view], replays["schedulefree"][view]) <= 1e-6, (impl, view)


def test_dcp_probe_counts_nothing(runs):
    # get_state_dict on optimizers without state runs torch's probe step (lr 0, zero
    # gradients): the state is created (z = y, v = 0), no counter moves, also in eval mode
    probe = runs["main"][0]["checkpoints"]["probe"]
    assert probe == {"k": [0, 0, 0, 0], "z_is_y": True, "v_zero": True, "grads_none": True}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dcp_resume_is_bitwise(runs, reference, mode):
    for r in runs["main"]:
        c = r["checkpoints"][mode]
        for view in ("y", "z", "v", "x", "counters", "train_mode"):
            assert (
                c["loaded"][view] == c["saved"][view]
                if view in ("counters", "train_mode")
                else same(c["loaded"][view], c["saved"][view])
            ), (mode, view)
            assert (
                c["resumed"][view] == c["final"][view]
                if view in ("counters", "train_mode")
                else same(c["resumed"][view], c["final"][view])
            ), (mode, view)
        assert c["saved"]["train_mode"] == [mode == "train"] * 2
        assert c["final"]["counters"][0]["k"] == fw.STEPS
    ref = reference["adamw", fw.STEPS]
    final = runs["main"][0]["checkpoints"][mode]["final"]
    # the train-mode run took get_state_dict's probe first; the eval-mode one a round trip
    assert rel(final["y"], ref["y"]) <= TOL["float32"]
    saved = runs["main"][0]["checkpoints"][mode]["saved"]
    assert rel(saved["z"], reference["adamw", fw.SAVE_AT]["z"]) <= TOL["float32"]


def test_flattened_optimizer_state_dict_keys(runs):
    keys = runs["main"][0]["checkpoints"]["eval"]["saved"]["flat_keys"]
    for key in ("k", "weight_sum", "lr_max", "train_mode", "lr", "betas"):
        assert f"param_groups.0.weight.{key}" in keys


def test_resize_two_ranks_to_one(runs, reference):
    saved = runs["main"][0]["checkpoints"]["train"]["saved"]
    two_ranks = runs["main"][0]["checkpoints"]["train"]["final"]
    for layout in ("sharded", "plain"):
        run = runs["resize"][layout]
        for view in ("y", "z", "v", "x"):
            assert same(run["loaded"][view], saved[view]), (layout, view)
        assert run["loaded"]["counters"] == saved["counters"]
        assert run["final"]["counters"][0]["k"] == fw.STEPS
        # one rank's gradient rounds otherwise than the mean over two: float32 round-off
        assert rel(run["final"]["y"], two_ranks["y"]) <= TOL["float32"], layout
        assert rel(run["final"]["y"], reference["adamw", fw.STEPS]["y"]) <= TOL["float32"]
    assert runs["resize"]["sharded"]["loaded"]["state_sharded"]


def test_skip_nonfinite_skips_on_every_rank(runs):
    # an inf in rank 1's shard only: the flag is all-reduced, both ranks skip the step
    for r in runs["main"]:
        s = r["skip_nonfinite"]
        for view in ("y", "z", "v"):
            assert same(s["after"][view], s["before"][view]), (r["rank"], view)
        assert s["after"]["counters"] == s["before"]["counters"]
        assert s["k_end"] == [3, 3]


def test_refusals(runs):
    for r in runs["main"]:
        out = r["refusals"]
        assert "capturable=True" in out["capturable"] and "DTensor" in out["capturable"]
        assert "capturable=False" in out["capturable"]
        fused = out["mismatch_fused"]
        assert not fused["ok"]
        assert "fused=True" in fused["error"] and "Replicate()" in fused["error"]
        assert "fused=False" in fused["error"]
        for view in ("y", "z", "v"):  # refused before anything moved
            assert same(fused["after"][view], fused["unchanged"][view]), view
        assert fused["after"]["counters"] == fused["unchanged"]["counters"]
        # the loop takes DTensor ops where z's placements differ from its param's
        assert out["mismatch_loop"] == {"ok": True, "k": 2}
        assert out["mismatch_loop_eval"] == "ok"


def test_timings(runs):
    # not a check of speed: the launches' wall times, printed with -s
    print({k: round(v, 1) for k, v in TIMINGS.items()}, runs["main"][0]["timings"])
