"""sf_torch.local.LocalSteps on 2 CPU ranks (gloo), float64.

The ranks run in their own processes (tests/local_worker.py, all scenarios in one run); every
expected number is computed here: data-parallel SGD by a plain single-process loop on the
concatenated batch, and Schedule-Free AdamW with local steps by a K-worker simulation written
out below from the update rule (docs/DESIGN.md section 1), averaging by hand.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ds_worker import batch, make_model
from local_worker import SF, SGD_LR, sf_sync

from sf_schedules.sync import QSR

HERE = Path(__file__).parent
K = 2
STEPS = 60
SAVE_AT = 27
TIMINGS = {}


def run_worker(tmp_path, **opts) -> list[dict]:
    out = tmp_path / "out.pt"
    path = [str(HERE.parent), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "local_worker.py"), str(out), json.dumps(opts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    TIMINGS[opts["mode"]] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    return run_worker(folder, mode="torch", steps=STEPS, save_at=SAVE_AT, folder=str(folder))


def max_diff(a, b) -> float:
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b))


def grads_at(params, step: int, worker: int, world: int):
    """The gradient of worker `worker`'s loss at `params` (float64)."""
    model = make_model().double()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    x, y = batch(step, worker, world)
    torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
    return [p.grad for p in model.parameters()]


# -- (a) H = 1 with SGD is data-parallel SGD -----------------------------------------------------


def data_parallel_sgd(steps: int):
    """One process, the concatenated batch of both ranks each step, float64."""
    params = [p.detach().clone() for p in make_model().double().parameters()]
    out = []
    for step in range(steps):
        grads = grads_at(params, step, 0, 1)
        params = [p - SGD_LR * g for p, g in zip(params, grads)]
        out.append(params)
    return out


def test_h1_sgd_equals_data_parallel_sgd(ranks):
    expected = data_parallel_sgd(20)
    for r in ranks:
        worst = max(max_diff(got, want) for got, want in zip(r["sgd_h1"], expected))
        assert worst <= 1e-12, worst
    # the check can fail: averaging every 2nd step is another trajectory
    h2 = max(max_diff(got, want) for got, want in zip(ranks[0]["sgd_h2"], expected))
    assert h2 > 1e-6, h2
    # between syncs of the H = 2 run the ranks differ (no gradient all-reduce)
    assert max_diff(ranks[0]["sgd_h2"][0], ranks[1]["sgd_h2"][0]) > 1e-6
    assert max_diff(ranks[0]["sgd_h2"][1], ranks[1]["sgd_h2"][1]) == 0.0


# -- (b), (c) Schedule-Free AdamW with QSR against a K-worker simulation -------------------------


def simulate(steps: int, sync: tuple[int, ...], average_v: bool):
    """K workers, each Schedule-Free AdamW on its own share of the batch; at the sync steps y
    and z (and v if asked) replaced by their mean over the workers. Records after every step:
    each worker's y, z, v, and its x before the average."""
    b1, b2 = SF["betas"]
    start = [p.detach().clone() for p in make_model().double().parameters()]
    ys = [[p.clone() for p in start] for _ in range(K)]
    zs = [[p.clone() for p in start] for _ in range(K)]
    vs = [[torch.zeros_like(p) for p in start] for _ in range(K)]
    lr_max = weight_sum = 0.0
    records = []
    for k in range(steps):
        lr = SF["lr"] * min(1.0, (k + 1) / SF["warmup_steps"])
        lr_max = max(lr_max, lr)
        weight = lr_max**2  # r = 0, weight_lr_power = 2
        weight_sum += weight
        c = weight / weight_sum
        for w in range(K):
            grads = grads_at(ys[w], k, w, K)
            for i, g in enumerate(grads):
                y, z, v = ys[w][i], zs[w][i], vs[w][i]
                v = b2 * v + (1 - b2) * g * g
                gn = g / ((v / (1 - b2 ** (k + 1))).sqrt() + SF["eps"]) + SF["weight_decay"] * y
                ys[w][i] = (1 - c) * y + c * z + lr * (b1 * (1 - c) - 1) * gn
                zs[w][i] = z - lr * gn
                vs[w][i] = v
        x_before = [[(y - (1 - b1) * z) / b1 for y, z in zip(ys[w], zs[w])] for w in range(K)]
        if k + 1 in sync:
            names = [ys, zs, vs] if average_v else [ys, zs]
            for seq in names:
                mean = [sum(t) / K for t in zip(*seq)]
                for w in range(K):
                    seq[w] = [m.clone() for m in mean]
        records.append(
            {
                "y": [list(t) for t in ys],
                "z": [list(t) for t in zs],
                "v": [list(t) for t in vs],
                "x_before": x_before,
            }
        )
    return records


@pytest.fixture(scope="module")
def sims():
    sync = sf_sync(STEPS)
    return sync, simulate(STEPS, sync, False), simulate(STEPS, sync, True)


def test_sync_schedule_has_growing_rounds():
    sync = sf_sync(STEPS)
    periods = [b - a for a, b in zip((0,) + sync, sync)]
    assert sync[-1] == STEPS and periods[:5] == [1] * 5  # h_warm during warmup
    assert len(set(periods)) >= 3 and max(periods) >= 4, periods
    # not plain QSR on the lr: that one is constant after warmup
    lrs = [SF["lr"] * min(1.0, (t + 1) / SF["warmup_steps"]) for t in range(STEPS)]
    assert len(set(QSR(2, 0.015).periods(lrs)[5:])) == 1


def test_schedule_free_local_steps_match_the_simulation(ranks, sims):
    sync, sim, _ = sims
    assert ranks[0]["sf_syncs"] == len(sync)
    worst = {"y": 0.0, "z": 0.0, "v": 0.0, "x": 0.0}
    for t in range(STEPS):
        for r in ranks:
            got, want = r["sf"][t], sim[t]
            w = r["rank"]
            for key in ("y", "z", "v"):
                worst[key] = max(worst[key], max_diff(got[key], want[key][w]))
            if t + 1 in sync:
                # x averaged exactly: the rank's x is the mean of the workers' x before the sync
                mean_x = [sum(xs) / K for xs in zip(*want["x_before"])]
                worst["x"] = max(worst["x"], max_diff(got["x"], mean_x))
        if t + 1 in sync:  # the ranks hold one model (bitwise), z included
            for key in ("y", "z"):
                assert max_diff(ranks[0]["sf"][t][key], ranks[1]["sf"][t][key]) == 0.0
        else:  # between syncs the ranks part (nothing is all-reduced)
            assert max_diff(ranks[0]["sf"][t]["y"], ranks[1]["sf"][t]["y"]) > 1e-9
    assert max(worst.values()) <= 1e-12, worst
    # the workers' x differ before a sync: the x check above compares a real average
    t = sync[-2] - 1
    assert max_diff(sim[t]["x_before"][0], sim[t]["x_before"][1]) > 1e-6


def test_second_moment_per_rank_by_default_averaged_when_asked(ranks, sims):
    sync, sim, sim_v = sims
    last = STEPS - 1
    # default: v differs across ranks even right after a sync
    assert max_diff(ranks[0]["sf"][last]["v"], ranks[1]["sf"][last]["v"]) > 1e-8
    worst = 0.0
    for t in range(STEPS):
        for r in ranks:
            for key in ("y", "z", "v"):
                worst = max(worst, max_diff(r["sf_avg_v"][t][key], sim_v[t][key][r["rank"]]))
        if t + 1 in sync:
            assert max_diff(ranks[0]["sf_avg_v"][t]["v"], ranks[1]["sf_avg_v"][t]["v"]) == 0.0
    assert worst <= 1e-12, worst
    # averaging v is another trajectory
    assert max_diff(ranks[0]["sf_avg_v"][last]["y"], ranks[0]["sf"][last]["y"]) > 1e-9


# -- (d) resume ----------------------------------------------------------------------------------


def test_state_dict_resumes_bitwise_per_rank(ranks):
    sync = sf_sync(STEPS)
    assert SAVE_AT not in sync  # saved mid-round: the ranks' models differ in the files
    for r in ranks:
        res = r["resume"]
        for key in ("y", "z", "v", "x"):
            assert max_diff(res["resumed"][key], res["uninterrupted"][key]) == 0.0, key
        entry = res["saved_entry"]
        assert entry["steps_taken"] == SAVE_AT and res["steps_taken_after_load"] == SAVE_AT
        assert entry["world_size"] == K and entry["rank"] == r["rank"]
        assert tuple(entry["sync_steps"]) == sync and entry["average"] == ["z"]
        assert entry["rule"] is None  # a list of steps was passed, not a rule
        assert res["syncs"][0] == len(sync)
    # per-rank state: v differs between the ranks' files' trajectories
    v0, v1 = (r["resume"]["resumed"]["v"] for r in ranks)
    assert max_diff(v0, v1) > 1e-8


# -- (e) errors ----------------------------------------------------------------------------------


def test_errors_on_the_ranks(ranks):
    e = ranks[0]["errors"]
    assert "sync schedule ends after step 1" in e["past_end"]
    assert e["past_end_moved"] is False and e["past_end_count"] == 1
    assert "world size of 3" in e["load_world_size"]
    assert "differs from this wrapper's at entry 0" in e["load_sync_steps"]
    assert "no 'local_steps' entry" in e["load_plain"]
    assert "SGDScheduleFree keeps ('z',)" in e["sf_bad_name"] and "exp_avg_sq" in e["sf_bad_name"]
    assert "average names 'nope'" in e["bad_name"]
    assert e["bad_name_moved"] is False
    assert e["bad_name_adam_step"] == 1.0 and e["bad_name_count"] == 1
    assert e["skipped_count"] == 0 and e["skipped_syncs"] == 0
    assert "eval()" in e["plain_eval"]


def test_errors_in_process():
    from sf_torch.local import LocalSteps, resolve_sync

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        LocalSteps(opt, (4, 8))
    with pytest.raises(ValueError, match="sync must be a non-empty 1-d sequence"):
        LocalSteps(opt, ())
    with pytest.raises(ValueError, match=r"sync\[1\] must be in \[5, inf\)"):
        LocalSteps(opt, (4, 4))
    with pytest.raises(TypeError, match=r"sync must hold ints .* got dtype float64"):
        LocalSteps(opt, (1.5, 3))
    with pytest.raises(TypeError, match="needs the run's learning rates"):
        LocalSteps(opt, QSR(2, 0.1))
    with pytest.raises(TypeError, match="average must be a sequence"):
        LocalSteps(opt, (4,), average="z")
    with pytest.raises(ValueError, match="average_second_moment must be in"):
        LocalSteps(opt, (4,), average_second_moment=1)
    with pytest.raises(TypeError, match="optimizer must be a torch optimizer"):
        LocalSteps(model, (4,))
    steps, total, record = resolve_sync((QSR(2, 0.1, warmup_steps=2, h_warm=1), [0.05] * 10))
    assert steps == (1, 2, 6, 10) and total == 10
    assert record["type"] == "QSR" and record["alpha"] == 0.1
    # bool flags, one per step (sf_schedules.sync.sync_mask): the run need not end on a sync
    assert resolve_sync([False, True, False, False]) == ((2,), 4, None)
    assert resolve_sync(np.array([3, 5])) == ((3, 5), 5, None)


# -- BatchNorm -----------------------------------------------------------------------------------


def test_batchnorm_stats_recomputed_per_rank_and_averaged(ranks):
    assert all(r["batchnorm"]["restored"] and r["batchnorm"]["used"] == 3 for r in ranks)
    first = ranks[0]["batchnorm"]
    assert torch.equal(first["weight"], ranks[1]["batchnorm"]["weight"])  # synced, at x
    means, variances = [], []
    for r in ranks:
        bn = r["batchnorm"]
        hidden = [b @ first["weight"].T + first["bias"] for b in bn["batches"]]
        means.append(torch.stack([h.mean(0) for h in hidden]).mean(0))
        variances.append(torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0))
    mean, var = sum(means) / K, sum(variances) / K
    assert float((means[0] - means[1]).abs().max()) > 1e-3  # the ranks' data differ
    for r in ranks:
        got_mean, got_var = r["batchnorm"]["stats"]
        assert float((got_mean - mean).abs().max()) <= 1e-12
        assert float((got_var - var).abs().max()) <= 1e-12


def test_schedule_free_wrapper_gradscaler_and_lr_scheduler(ranks):
    a, b = (r["extras"] for r in ranks)
    for t in range(4):  # ScheduleFreeWrapper keeps z apart: averaged all the same
        for key in ("y", "z"):
            gap = max_diff(a["wrapper"][t][key], b["wrapper"][t][key])
            assert gap == 0.0 if t + 1 in (2, 4) else gap > 1e-6, (t, key, gap)
    for e in (a, b):
        assert e["scaler_skipped"] == (0, 0) and e["scaler_taken"] == (1, 1)
        assert e["scheduler_lrs"] == [SGD_LR * 0.5, SGD_LR * 0.25, SGD_LR * 0.125]
        assert e["scheduler_warnings"] == [], e["scheduler_warnings"]
        assert e["bf16_count"] == (1, 1)
        assert e["one_rank"][0] == 0 and torch.equal(e["one_rank"][1], torch.arange(3.0) + (e is b))
    # bf16: the float32 mean of the ranks' values, rounded to bf16 once; the same on each rank
    mean = [
        ((u.float() + v.float()) / 2).bfloat16() for u, v in zip(a["bf16_before"], b["bf16_before"])
    ]
    assert max_diff(a["bf16_before"], b["bf16_before"]) > 1e-3
    for e in (a, b):
        assert all(torch.equal(got, want) for got, want in zip(e["bf16_after"], mean))


def test_timing(ranks):
    # the whole 2-rank run (both processes, every scenario above) in seconds
    assert TIMINGS.get("torch", 0.0) < 90.0, TIMINGS
