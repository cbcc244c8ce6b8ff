"""The DeepSpeed example runs as its README says, on 2 CPU ranks, and learns at x: with the
README's float32 config, with bf16 mixed precision, and with local steps (``--local-steps``)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "deepspeed" / "schedulefree_deepspeed_demo.py"
CONFIG = ROOT / "examples" / "deepspeed" / "ds_config.json"
LOCAL_CONFIG = ROOT / "examples" / "deepspeed" / "ds_config_local.json"
EPOCHS, LR, WARMUP, BATCH, B1 = 2, 0.01, 10, 32, 0.9  # run_demo's flags; the demo's batch, b1


def run_demo(config, port, *extra):
    path = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(path))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(DEMO),
        *(["--deepspeed_config", str(config)] if config is not None else []),
        "--epochs",
        str(EPOCHS),
        "--warmup-steps",
        str(WARMUP),
        "--lr",
        str(LR),
        "--quiet",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    epochs = re.findall(
        r"epoch\s+(\d+)\s+train loss \(y\) ([\d.]+)\s+eval loss \(x\) ([\d.]+)\s+"
        r"eval accuracy \(x\) ([\d.]+)%",
        proc.stdout,
    )
    assert [int(e[0]) for e in epochs] == [1, 2]
    return proc.stdout, float(epochs[-1][2]), float(epochs[-1][3]) / 100


def test_demo_on_two_cpu_ranks():
    stdout, final_loss, final_accuracy = run_demo(CONFIG, 29731)
    assert "computing in torch.float32" in stdout
    # chance on 10 balanced classes: accuracy 0.1, cross-entropy log(10) = 2.30
    assert final_accuracy > 0.8 and final_loss < 1.0


def test_demo_in_bf16_on_two_cpu_ranks(tmp_path):
    # bf16 parameters and inputs, float32 BatchNorm statistics: the CPU kernel refused the mix
    # of bf16 weights and float32 statistics at the first forward before.
    config = json.loads(CONFIG.read_text())
    config["bf16"] = {"enabled": True}
    path = tmp_path / "ds_config_bf16.json"
    path.write_text(json.dumps(config))
    stdout, final_loss, final_accuracy = run_demo(path, 29732, "--hidden-dim", "16")
    assert "computing in torch.bfloat16" in stdout
    assert final_accuracy > 0.8 and final_loss < 1.0


def load_demo():
    spec = importlib.util.spec_from_file_location("schedulefree_deepspeed_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CpuWithoutFp16:
    def device_name(self):
        return "cpu"

    def is_fp16_supported(self):
        return False

    def is_bf16_supported(self):
        return True


def test_fp16_on_a_cpu_without_fp16_is_a_clear_message():
    demo = load_demo()
    config = json.loads(CONFIG.read_text())
    demo.check_precision(config, CpuWithoutFp16())  # float32: fine
    demo.check_precision({**config, "bf16": {"enabled": True}}, CpuWithoutFp16())
    with pytest.raises(SystemExit, match="enables fp16, which cpu ranks here cannot run") as err:
        demo.check_precision({**config, "fp16": {"enabled": True}}, CpuWithoutFp16())
    assert "run on GPUs" in str(err.value) and '"bf16": {"enabled": true}' in str(err.value)


def test_float32_batchnorm_matches_torch_and_keeps_float32_statistics():
    import torch

    demo = load_demo()
    torch.manual_seed(0)
    ours, theirs = demo.Float32BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(16, 8)
    for momentum in (0.1, None):  # None: the cumulative average of the recompute at x
        ours.momentum = theirs.momentum = momentum
        for module in (ours, theirs):
            module.train()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        for a, b in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # bf16 weights and input (what DeepSpeed's bf16 gives it): statistics stay float32.
    ours.train()
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and ours.running_var.dtype == torch.float32


def numpy_eval_at_x(demo, weights: dict, bn_rows: list, train_x, test_x, test_y):
    """Eval loss and accuracy of the demo's MLP in float64 numpy at ``weights`` (a state dict),
    with each BatchNorm's statistics recomputed from every rank's batches (``bn_rows[rank]``):
    per rank the mean over its batches of the batch mean and of the unbiased batch variance (the
    normalisation itself uses the biased one, as in training mode), then the mean over ranks."""
    w = {k: v.double().numpy() for k, v in weights.items()}
    eps = 1e-5  # BatchNorm1d's default

    def layers(h, stats=None):
        out_stats = []
        for i, (lin, bn) in enumerate(((0, 1), (3, 4))):
            h = h @ w[f"body.{lin}.weight"].T + w[f"body.{lin}.bias"]
            if stats is None:  # training mode: this batch's statistics
                mean, biased = h.mean(0), h.var(0)
                out_stats.append((mean, h.var(0, ddof=1)))
            else:
                mean, biased = stats[i]
            h = (h - mean) / np.sqrt(biased + eps) * w[f"body.{bn}.weight"] + w[f"body.{bn}.bias"]
            h = np.maximum(h, 0.0)
        return h @ w["body.6.weight"].T + w["body.6.bias"], out_stats

    per_rank = []
    for rows in bn_rows:
        batch_stats = [layers(train_x[r].astype(np.float64))[1] for r in rows]
        per_rank.append(
            [
                tuple(np.mean([b[layer][j] for b in batch_stats], axis=0) for j in range(2))
                for layer in range(2)
            ]
        )
    stats = [
        tuple(np.mean([p[layer][j] for p in per_rank], axis=0) for j in range(2))
        for layer in range(2)
    ]
    logits, _ = layers(test_x.astype(np.float64), stats)
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(test_y)), test_y].mean()
    return float(loss), float((logits.argmax(1) == test_y).mean())


def test_demo_with_local_steps_on_two_cpu_ranks(tmp_path):
    import torch

    from sf_schedules.sync import ScheduleFreeQSR, sync_steps

    demo = load_demo()
    train_x, test_x, train_y, test_y = demo.load_data(0)
    world = 2
    steps_per_epoch = len(train_x) // (BATCH * world)
    total = EPOCHS * steps_per_epoch
    save = tmp_path / "ckpt"
    # --local-steps with no config: the demo's ds_config_local.json
    stdout, final_loss, final_accuracy = run_demo(None, 29733, "--local-steps", "--save-dir", save)
    assert "computing in torch.float32" in stdout

    # The sync steps, from the config file's rule constants, the run's length, and the
    # optimizer's warmup written out by hand: lr (t + 1) / W during warmup, then lr.
    section = json.loads(LOCAL_CONFIG.read_text())["local_steps"]
    constants = {k: section[k] for k in ("h_base", "alpha", "h_warm", "h_max")}
    rule = ScheduleFreeQSR(**constants, warmup_steps=WARMUP, b1=B1, r=0.0, weight_lr_power=2.0)
    lrs = [LR * min(1.0, (t + 1) / WARMUP) for t in range(total)]
    expected = sync_steps(rule, lrs)
    assert expected[-1] == total and 2 < len(expected) < total  # some rounds longer than 1
    planned = re.search(r"(\d+) syncs planned in (\d+) steps \(after steps ([\d, ]+)\)", stdout)
    assert tuple(int(s) for s in planned.group(3).split(", ")) == expected
    per_epoch = [int(n) for n in re.findall(r"eval accuracy \(x\) [\d.]+%\s+syncs (\d+)", stdout)]
    assert per_epoch == [sum(s <= e * steps_per_epoch for s in expected) for e in (1, 2)]
    done = re.search(
        r"local steps done: (\d+) syncs in (\d+) steps; (\d+) model sizes communicated.*"
        r"final eval at x: loss ([\d.]+) accuracy ([\d.]+)",
        stdout,
    )
    assert (int(done.group(1)), int(done.group(2))) == (len(expected), total)
    assert int(done.group(3)) == 2 * len(expected)  # params and z at every sync

    # Epoch 1 ends mid-round (no sync at its last step): the ranks' models differ there, as no
    # gradient is all-reduced; the run's last step is a sync, after which they are one model.
    assert steps_per_epoch not in expected
    ranks = {
        tag: [torch.load(save / tag / f"sf_local_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for tag in ("epoch1", "epoch2")
    }
    mid, end = ranks["epoch1"], ranks["epoch2"]
    weight = "body.0.weight"
    assert (mid[0]["module"][weight] - mid[1]["module"][weight]).abs().max() > 1e-4
    for key, value in end[0]["module"].items():
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(value, end[1]["module"][key]), key
    z0, z1 = (r["optimizer"]["state"] for r in end)
    for i in z0:
        assert torch.equal(z0[i]["z"], z1[i]["z"]), i
        # v stays per rank (never averaged): it differs, unless gradients were all-reduced
        assert (z0[i]["exp_avg_sq"] - z1[i]["exp_avg_sq"]).abs().max() > 0, i
    for r in end:  # saved after sfds.eval: the module's weights are x, not y or z
        assert not r["optimizer"]["param_groups"][0]["train_mode"]
        assert r["local_steps"]["syncs"] == len(expected)
        assert (r["module"][weight] - r["optimizer"]["state"][0]["z"]).abs().max() > 1e-3

    # The reported final eval at x, recomputed in float64 from the saved x, with the BatchNorm
    # statistics from each rank's batches averaged over the ranks.
    order = np.random.default_rng(0).permutation(len(train_x))
    bn_rows = [demo.bn_rows(order, 8, BATCH, r, world) for r in range(world)]
    assert not set(bn_rows[0][0]) & set(bn_rows[1][0])  # each rank its own batches
    loss, accuracy = numpy_eval_at_x(demo, end[0]["module"], bn_rows, train_x, test_x, test_y)
    assert abs(float(done.group(4)) - loss) < 2e-5 * max(1.0, loss)
    assert abs(float(done.group(5)) - accuracy) <= 1 / len(test_y)
    assert abs(final_loss - loss) < 1e-4
    assert final_accuracy > 0.8 and final_loss < 1.0
