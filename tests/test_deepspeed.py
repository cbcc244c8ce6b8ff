"""sf_torch.deepspeed on 2 CPU ranks (gloo): ZeRO 0/1/2/3, fp32 and bf16, CPU offload.

Each configuration runs in its own processes (tests/ds_worker.py). What the engine's model
computes with after eval/train is compared with a single-process sf_torch run on the same global
batches (float32), and checkpoint resume with the uninterrupted DeepSpeed run. (fp16 is not
supported by DeepSpeed's CPU accelerator; it runs on the GPU machine.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_worker import IN, OUT, ROWS, batch, make_model, param_groups

import sf_torch

HERE = Path(__file__).parent
OPT = {"lr": 0.02, "betas": [0.9, 0.999], "weight_decay": 0.01, "warmup_steps": 3}
STEPS = (6, 4)
CONFIGS = [
    dict(stage=0, dtype="fp32"),
    dict(stage=1, dtype="fp32"),
    dict(stage=2, dtype="fp32"),
    dict(stage=3, dtype="fp32"),
    dict(stage=0, dtype="bf16"),
    dict(stage=1, dtype="bf16"),
    dict(stage=2, dtype="bf16"),
    dict(stage=3, dtype="bf16"),
    dict(stage=2, dtype="fp32", offload=True),
    dict(stage=3, dtype="fp32", offload=True),
    # gradient accumulation, clipping that bites, and several ZeRO-3 sub-groups per group
    dict(stage=3, dtype="fp32", ga=2, clip=0.05, sub_group_size=40),
    dict(stage=1, dtype="fp32", ga=3, clip=0.05),
]


def run_deepspeed(tmp_path, **opts):
    opts = dict({"optimizer": OPT}, **opts, steps=list(STEPS))
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out.pt"
    path = [str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    if opts.get("device", "cpu") == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(HERE / "ds_worker.py"), str(out), json.dumps(opts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def reference(steps, ga=1, clip=0.0):
    """Single process, whole global batches: y and x after each of `steps` steps (float32)."""
    model = make_model()
    kwargs = {k: v for k, v in OPT.items() if k != "weight_decay"}
    kwargs["betas"] = tuple(kwargs["betas"])
    opt = sf_torch.AdamWScheduleFree(param_groups(model, OPT["weight_decay"]), **kwargs)
    ys, xs = [], []
    for step in range(steps):
        opt.zero_grad()
        for micro_step in range(step * ga, (step + 1) * ga):
            xb, yb = batch(micro_step, 0, 1)
            (torch.nn.functional.mse_loss(model(xb), yb) / ga).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        ys.append([p.detach().clone() for p in model.parameters()])
        group_params = [p for g in opt.param_groups for p in g["params"]]
        x_by_id = {id(p): x for p, x in zip(group_params, opt.eval_params())}
        xs.append([x_by_id[id(p)] for p in model.parameters()])
    return ys, xs


def max_diff(a, b):
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b))


def test_worker_data_is_the_global_batch():
    assert batch(0, 1, 2)[0].shape == (ROWS // 2, IN)
    assert batch(0, 0, 2)[1].shape == (ROWS // 2, OUT)
    assert torch.equal(torch.cat([batch(3, 0, 2)[0], batch(3, 1, 2)[0]]), batch(3, 0, 1)[0])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_eval_train_and_resume(tmp_path, config):
    check_run(run_deepspeed(tmp_path, **config), config)


def check_run(results, config):
    """What every configuration must show (also used by tests/test_deepspeed_gpu.py)."""
    n1, n2 = STEPS
    ys, xs = reference(n1 + n2, config.get("ga", 1), config.get("clip", 0.0))
    in_place = config["stage"] == 0 and config["dtype"] == "fp32"
    # float32: the same trajectory up to reduction order; bf16: the model computes in bf16
    tol = 2e-5 if config["dtype"] == "fp32" else 3e-2
    b1 = OPT["betas"][0]
    lp = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config["dtype"]]
    for r in results:
        # the bug this module exists for: eval must move the weights the model computes with,
        # to x = (y - (1 - b1) z) / b1 of DeepSpeed's own masters y and z (float64 here)
        for weight, y_weight, (master, z) in zip(r["x_weights"], r["y_weights"], r["masters_z"]):
            x = ((master.double() - (1 - b1) * z.double()) / b1).to(lp).float()
            ulp = 0.0 if lp == torch.float32 else torch.finfo(lp).eps * float(x.abs().max())
            assert float((weight - x).abs().max()) <= max(ulp, 1e-6 * float(x.abs().max()))
            assert torch.equal(y_weight, master.to(lp).float())
        assert max_diff(r["x_weights"], r["y_weights"]) > 1e-3
        if lp == torch.float32:
            moved = max_diff(r["x_weights"], r["y_weights"])
            expected = max_diff(xs[n1 - 1], ys[n1 - 1])
            assert abs(moved - expected) <= 1e-3 * expected, (moved, expected)
        assert max_diff(r["y_weights"], ys[n1 - 1]) <= tol
        assert max_diff(r["x_weights"], xs[n1 - 1]) <= tol
        assert max_diff(r["x_weights_again"], r["x_weights"]) == 0.0
        assert r["module_training"] is False
        if config.get("ga", 1) == 1:
            assert "eval mode" in r["step_in_eval"]
        assert r["state_keys"] == sorted(r["state_keys"]) and set(r["state_keys"]) == {2}
        back = max_diff(r["y_weights_back"], r["y_weights"])
        assert back <= (1e-6 if in_place else 0.0)
        assert r["k"] == [n1 + n2] * 2 and r["k_resumed"] == [n1 + n2] * 2
        assert max_diff(r["final_uninterrupted"], ys[-1]) <= tol
        assert max_diff(r["final_x"], xs[-1]) <= tol
        # resume from the checkpoint saved in eval mode: the model loads at x, then continues
        assert max_diff(r["resumed_x_weights"], r["x_weights"]) <= (1e-6 if in_place else 0.0)
        resumed = max_diff(r["final_resumed"], r["final_uninterrupted"])
        assert resumed <= (1e-5 if in_place else 0.0), resumed
        # saved in train mode (DeepSpeed's own path): bit-exact in every configuration
        assert max_diff(r["final_resumed_from_train_mode"], r["final_uninterrupted"]) == 0.0
        assert r["losses_resumed"] == pytest.approx(r["losses_uninterrupted"], rel=1e-5)
    # every rank computes with the same weights
    for key in ("x_weights", "y_weights_back", "final_uninterrupted"):
        assert max_diff(results[0][key], results[-1][key]) == 0.0
    for r in results:
        if "overflow" in r:
            o = r["overflow"]
            assert o["weights_moved"] == 0.0 and o["k_after"] == o["k_before"], o
            assert o["skipped"] >= 1


SGD = {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.01, "warmup_steps": 3}


@pytest.mark.parametrize(
    "stage,kind", [(2, "AdamWScheduleFree"), (3, "AdamWScheduleFree"), (2, "SGDScheduleFree")]
)
def test_universal_checkpoint_resumes_on_another_world_size(tmp_path, stage, kind):
    """Saved on 2 ranks (in eval mode), converted, resumed on 1 rank: the same trajectory."""
    from sf_torch.deepspeed import to_universal

    ckpt = tmp_path / "ckpt"
    opt = dict(optimizer_type=kind, optimizer=OPT if kind == "AdamWScheduleFree" else SGD)
    both = run_deepspeed(tmp_path, stage=stage, dtype="fp32", checkpoint_dir=str(ckpt), **opt)
    first = both[0]
    universal = tmp_path / "universal" / "mid"
    to_universal(str(ckpt / "mid"), str(universal))
    # z is kept (named z.pt; ZeRO-3's loader only reads Adam's name exp_avg.pt)
    z_file = "exp_avg.pt" if stage == 3 else "z.pt"
    assert (universal / "zero" / "0.weight" / z_file).exists()
    has_v = (universal / "zero" / "0.weight" / "exp_avg_sq.pt").exists()
    assert has_v == (kind != "SGDScheduleFree" or stage == 3)
    resumed = run_deepspeed(
        tmp_path / "one", stage=stage, dtype="fp32", world=1, resume_from=str(universal), **opt
    )[0]
    n1, n2 = STEPS
    assert resumed["resumed_train_mode"] == [False, False] and resumed["resumed_k"] == [n1] * 2
    assert max_diff(resumed["resumed_x_weights"], first["x_weights"]) <= 1e-7
    assert resumed["k_resumed"] == [n1 + n2] * 2
    # 1 rank sums the batch in another order than 2: float32 round-off, nothing more
    assert max_diff(resumed["final_resumed"], first["final_uninterrupted"]) <= 1e-6
    # one rank's loss is the mean of the two ranks' losses (equal shares of the batch)
    two_rank_mean = [(a + b) / 2 for a, b in zip(*(r["losses_uninterrupted"] for r in both))]
    assert resumed["losses_resumed"] == pytest.approx(two_rank_mean, rel=1e-5)


# What DeepSpeed itself writes into its ZeRO-1/2/3 optimizer shards (its loss scaler, its ZeRO
# stage enum, its fragment addresses): torch.load's default refuses these whatever the client
# optimizer; every object of sf_torch's in them is weights_only-safe.
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


@pytest.mark.parametrize(
    "stage,dtype", [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "fp32"), (3, "fp32")]
)
def test_checkpoint_files_load_with_weights_only(tmp_path, stage, dtype):
    """engine.save_checkpoint's files under torch.load's default (weights_only=True): the model
    states file (with ZeRO-0, the optimizer's state too) loads as it is; a ZeRO optimizer shard
    needs only DeepSpeed's own classes allowed. ZeRO-0: the model states file, read so and
    loaded by load_state_dict into a fresh engine, continues bit for bit."""
    results = run_deepspeed(tmp_path, stage=stage, dtype=dtype, weights_only=True)
    refused = results[0]["refused_globals"]
    assert any("model_states" in name for name in refused), refused
    assert any("optim_states" in name for name in refused) == (stage > 0), refused
    for name, needed in refused.items():
        if "model_states" in name:
            assert needed == [], (name, needed)
        else:
            assert needed and set(needed) <= DEEPSPEED_GLOBALS, (name, needed)
    if stage == 0:
        for r in results:
            assert max_diff(r["final_plain_load"], r["final_uninterrupted"]) == 0.0
