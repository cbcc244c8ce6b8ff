"""sf_torch.deepspeed with a local_steps section: 2 CPU ranks (gloo), ZeRO stage 0, fp32 and bf16.

The ranks run in their own processes (tests/local_worker.py, DeepSpeed scenarios in
tests/local_worker_ds.py). The engine's trajectory is compared with sf_torch.local.LocalSteps
around a plain AdamWScheduleFree on the same ranks (no DeepSpeed), the sync steps with
local_worker.sf_sync (the schedule computed from the rule directly), checkpoint resume with the
uninterrupted run. Config errors and ZeRO stages 1-3 are refused before DeepSpeed starts, in this
process.
"""

import copy
import time

import pytest
import torch
from ds_worker import make_model
from local_worker import sf_sync
from local_worker_ds import SAVE_AT, STEPS, ds_config
from test_torch_local import run_worker

import sf_torch.deepspeed as sfds

TIMINGS = {}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds_local")
    start = time.perf_counter()
    results = run_worker(folder, mode="deepspeed", folder=str(folder))
    TIMINGS["deepspeed"] = time.perf_counter() - start
    return results


def max_diff(a, b) -> float:
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b))


def test_schedule_from_the_config(ranks):
    for dtype in ("fp32", "bf16"):
        for r in ranks:
            state = r[dtype]["local_state"]
            assert tuple(state["sync_steps"]) == sf_sync(STEPS)
            assert state["steps_taken"] == STEPS and state["syncs"] == len(sf_sync(STEPS))
            assert state["world_size"] == 2 and state["rank"] == r["rank"]
            assert state["average"] == ["z"] and state["rule"]["type"] == "ScheduleFreeQSR"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ranks_part_between_syncs_and_meet_at_syncs(ranks, dtype):
    sync = sf_sync(STEPS)
    a, b = ranks[0][dtype], ranks[1][dtype]
    for t in range(STEPS):
        weights = max_diff(a["weights"][t], b["weights"][t])
        masters = max_diff(a["masters"][t], b["masters"][t])
        if t + 1 in sync:
            # one model on every rank: masters and the weights the model computes with (bf16
            # ones included, written again from the averaged masters)
            assert weights == 0.0 and masters == 0.0, (t, weights, masters)
        else:  # no gradient all-reduce between syncs
            assert weights > 1e-3 and masters > 1e-3, (t, weights, masters)
    if dtype == "bf16":  # the bf16 weights are the masters rounded, after every step
        for r in ranks:
            for t in range(STEPS):
                rounded = [m.to(torch.bfloat16).float() for m in r[dtype]["masters"][t]]
                assert max_diff(r[dtype]["weights"][t], rounded) == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_same_trajectory_as_local_steps_without_deepspeed(ranks, dtype):
    # fp32: the same float32 operations in the same order (bitwise here; allowed 1e-6
    # relative); bf16: the model computes in bf16, the masters follow within bf16 round-off
    for r in ranks:
        plain = r["local_steps"]
        for t in range(STEPS):
            want = plain["weights"][t]
            scale = max(float(w.abs().max()) for w in want)
            got = r[dtype]["masters"][t]
            tol = 1e-6 * scale if dtype == "fp32" else 3e-2
            assert max_diff(got, want) <= tol, (t, max_diff(got, want))
        # eval(engine) after the last sync: the averaged x, the same on every rank
        tol = 1e-6 if dtype == "fp32" else 3e-2
        assert max_diff(r[dtype]["x_weights"], plain["x"]) <= tol
        assert max_diff(r[dtype]["y_weights_back"], r[dtype]["weights"][-1]) <= (
            1e-6 if dtype == "fp32" else 0.0
        )
    assert max_diff(ranks[0][dtype]["x_weights"], ranks[1][dtype]["x_weights"]) == 0.0
    assert max_diff(ranks[0][dtype]["x_weights"], ranks[0][dtype]["weights"][-1]) > 1e-3


def test_gradient_accumulation_stays_local(ranks):
    # 2 micro-batches per step: DeepSpeed's accumulation (loss / 2 per micro-batch) without its
    # all-reduce is LocalSteps' loop with the same division
    sync = sf_sync(STEPS)
    for r in ranks:
        for t in range(STEPS):
            want = r["local_steps_ga"]["weights"][t]
            assert max_diff(r["ga_weights"][t], want) <= 1e-6 * max(
                float(w.abs().max()) for w in want
            )
    for t in range(STEPS):
        gap = max_diff(ranks[0]["ga_weights"][t], ranks[1]["ga_weights"][t])
        assert gap == 0.0 if t + 1 in sync else gap > 1e-3, (t, gap)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checkpoint_resumes_bitwise_on_every_rank(ranks, dtype):
    sync = sf_sync(STEPS)
    assert SAVE_AT not in sync  # saved mid-round: each rank's own model and state
    for r in ranks:
        run = r[dtype]
        for key in ("masters", "z", "v"):
            assert max_diff(run["resumed_final"][key], run["final"][key]) == 0.0, key
        assert max_diff(run["resumed_weights"], run["weights"][-1]) == 0.0
        assert run["resumed_state"]["steps_taken"] == SAVE_AT
        assert {"sf_local_rank0.pt", "sf_local_rank1.pt"} <= set(run["files"])
    # what was saved differed per rank (v always; the model mid-round)
    v0, v1 = (r[dtype]["final"]["v"] for r in ranks)
    assert max_diff(v0, v1) > 1e-8


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_step_past_the_schedule_is_refused_before_anything_moves(ranks, dtype):
    for r in ranks:
        assert "step 31 is past the end of the local-steps schedule" in r[dtype]["past_end"]
        assert max_diff(r[dtype]["past_end_weights"], r[dtype]["weights"][-1]) == 0.0


# -- refused before DeepSpeed starts -----------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_refused_naming_the_stage(stage):
    cfg = ds_config("fp32", 2)
    cfg["zero_optimization"] = {"stage": stage}
    with pytest.raises(ValueError, match=f"must be 0 with local steps, got stage {stage}"):
        sfds.initialize(model=make_model(), config=cfg)


def bad(**changes):
    cfg = ds_config("fp32", 2)
    section = copy.deepcopy(cfg["local_steps"])
    for key, value in changes.items():
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
    cfg["local_steps"] = section
    return cfg


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(rule="qsr2"), r"local_steps.rule must be in \('constant', 'qsr'"),
        (dict(period=4), r"local_steps.period: not a key of rule 'schedule_free_qsr'"),
        (dict(h_base=0), r"local_steps.h_base must be in \{1, 2, 3, ...\}, got 0"),
        (dict(alpha=-1.0), r"local_steps.alpha must be in \(0, inf\)"),
        (dict(total_steps=None), r"local_steps.total_steps is required"),
        (dict(total_steps=0), r"local_steps.total_steps must be in \{1, 2, 3, ...\}, got 0"),
        (dict(average_second_moment=1), r"local_steps.average_second_moment must be in"),
        (dict(h_base=None), r"local_steps \(rule 'schedule_free_qsr'\):.*h_base"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        sfds.initialize(model=make_model(), config=bad(**changes))


def test_config_errors_about_the_optimizer_and_the_learning_rates():
    cfg = ds_config("fp32", 2)
    cfg["optimizer"] = {"type": "SGDScheduleFree", "params": {"lr": 0.1}}
    cfg["local_steps"]["average_second_moment"] = True
    with pytest.raises(ValueError, match="SGDScheduleFree has no second moment"):
        sfds.initialize(model=make_model(), config=cfg)
    cfg = ds_config("fp32", 2)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}
    with pytest.raises(ValueError, match="local_steps_lrs"):
        sfds.initialize(model=make_model(), config=cfg)
    cfg = ds_config("fp32", 2)
    del cfg["local_steps"]
    with pytest.raises(ValueError, match="local_steps_lrs: the config has no local_steps"):
        sfds.initialize(model=make_model(), config=cfg, local_steps_lrs=[0.1] * 4)
    cfg = ds_config("fp32", 2)
    cfg["local_steps"] = [4]
    with pytest.raises(ValueError, match="local_steps must be a JSON object"):
        sfds.initialize(model=make_model(), config=cfg)


def test_timing(ranks):
    # both processes, fp32 and bf16 engines, resumes and the plain LocalSteps run, in seconds
    assert TIMINGS["deepspeed"] < 90.0, TIMINGS


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_default_rule_without_a_rule_key(kind):
    """A section with total_steps only takes ScheduleFreeQSR with h_base 4, alpha = lr / 2 and
    the optimizer's warmup (bench.local's measured default); the sync steps against that rule
    on learning rates written out here; a given key overrides the default."""
    import sf_torch
    from sf_schedules.sync import ScheduleFreeQSR, sync_steps

    lr, warmup, total, b1 = (2e-3, 10, 400, 0.9) if kind == "adamw" else (0.5, 0, 300, 0.8)
    params = [torch.nn.Parameter(torch.zeros(3))]
    if kind == "adamw":
        client = sf_torch.AdamWScheduleFree(params, lr=lr, warmup_steps=warmup, betas=(b1, 0.99))
    else:
        client = sf_torch.SGDScheduleFree(params, lr=lr, momentum=b1)
    lrs = [lr * min(1.0, (t + 1) / warmup) if warmup else lr for t in range(total)]
    for extra, h_base in (({}, 4), ({"h_base": 2}, 2)):
        got = sfds._LocalSteps.from_config({"total_steps": total, **extra}, client, None, False)
        rule = ScheduleFreeQSR(h_base, lr / 2, b1=b1, warmup_steps=warmup)
        assert got.sync_steps == sync_steps(rule, lrs, total)
        assert got.rule["type"] == "ScheduleFreeQSR"
    # the default's rounds are not constant: short ones while c_t is large, longer ones later
    gaps = set(b - a for a, b in zip(got.sync_steps, got.sync_steps[1:]))
    assert len(gaps) > 1
