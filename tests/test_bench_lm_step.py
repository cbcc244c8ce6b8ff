"""bench.lm_step on the tiny LM, CPU, both frameworks: every row is there and its steps train.

What is independent of the code under test: the parameter count (a closed form here), the loss
at the init (near ln(vocab): the tied head's logits start small), the reference
``schedulefree.AdamWScheduleFree`` stepping the same model on the same batch (the timed torch
Schedule-Free steps must land on its params, y and x), and the other framework (torch and JAX
start from one init and must follow one loss trajectory and reach the same params). No timing
is asserted.
"""

import json
import math

import jax
import numpy as np
import pytest
import schedulefree
import torch
import torch.nn.functional as F

from bench import lm_step as bench
from parity.models import canonical, torch_models

TINY = dict(vocab=256, width=64, layers=2, heads=4, seq=32, mlp=256, tied=True)
TINY_BATCH = 4
WARMUP, STEPS = 2, 3
ROWS = ("torch.optim adamw", "sf_torch adamw", "optax adamw", "sf_optax adamw")
TWINS = (("torch.optim adamw", "optax adamw"), ("sf_torch adamw", "sf_optax adamw"))


def tiny_param_count(vocab, width, layers, seq, **_):
    d = width
    # per block: q, k, v, out d*d each with biases but k's 3d, mlp d*4d + 4d and 4d*d + d,
    # two LayerNorms 4d
    per_block = 12 * d * d + 12 * d
    return vocab * d + seq * d + layers * per_block + 2 * d  # tied head, final LayerNorm


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Two cores shared with other processes: torch's default two threads stall each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lm_step.json"
    capture = {}
    argv = ["--device", "cpu", "--size", "tiny", "--framework", "both"]
    argv += ["--steps", str(STEPS), "--warmup", str(WARMUP), "--json", str(out)]
    bench.main(argv, capture=capture)
    return json.loads(out.read_text()), capture


def test_rows_fields_and_ratios(bench_run):
    result, _ = bench_run
    assert result["skipped"] == []
    assert result["config"] == {
        "name": "tiny",
        "batch": TINY_BATCH,
        "fused_attention": True,
        **TINY,
    }
    rows = {r["name"]: r for r in result["rows"]}
    assert tuple(rows) == ROWS
    for r in rows.values():
        assert len(r["times_s"]) == STEPS
        assert all(math.isfinite(t) and t > 0 for t in r["times_s"]), r["name"]
        assert r["q25_s"] <= r["median_s"] <= r["q75_s"]
        assert r["median_s"] == pytest.approx(float(np.median(r["times_s"])))
        assert r["opt_median_s"] > 0
        assert r["opt_share"] == pytest.approx(r["opt_median_s"] / r["median_s"])
        # the synchronised steps, then as many pipelined ones in blocks of PIPELINE_BLOCK
        assert r["full_steps"] == WARMUP + 2 * STEPS == len(r["losses"])
        blocks = -(-STEPS // bench.PIPELINE_BLOCK)
        assert len(r["pipelined_times_s"]) == blocks
        assert all(math.isfinite(t) and t > 0 for t in r["pipelined_times_s"]), r["name"]
        assert r["pipelined_s"] == pytest.approx(float(np.median(r["pipelined_times_s"])))
        if r["schedule_free"]:
            assert r["switch_s"] > 0
        else:
            assert r["switch_s"] is None
    assert rows["torch.optim adamw"]["impl"] == rows["sf_torch adamw"]["impl"] == "foreach"
    for fw, plain, sf in (("torch", *ROWS[:2]), ("jax", *ROWS[2:])):
        q = result["ratios"][fw]
        assert q["step"] == pytest.approx(rows[sf]["median_s"] / rows[plain]["median_s"])
        assert q["step_pipelined"] == pytest.approx(
            rows[sf]["pipelined_s"] / rows[plain]["pipelined_s"]
        )
        assert q["optimizer"] == pytest.approx(
            rows[sf]["opt_median_s"] / rows[plain]["opt_median_s"]
        )


def test_byte_counts(bench_run):
    result, _ = bench_run
    n = tiny_param_count(**TINY)
    assert result["n_params"] == n == 118_400
    tokens = TINY_BATCH * TINY["seq"]
    for r in result["rows"]:
        assert r["n_params"] == n
        assert r["param_bytes"] == 4 * n
        # Two float32 buffers per param (m and v; z and v) plus a few scalars.
        assert 8 * n <= r["state_bytes"] <= 8 * n + 1024, r["name"]
        # inputs and labels: int64 in torch, int32 in JAX
        assert r["batch_bytes"] == (16 if r["framework"] == "torch" else 8) * tokens
        if r["framework"] == "torch":  # CUDA only
            assert r["peak_bytes"] is r["extra_bytes"] is r["opt_extra_bytes"] is None
        else:  # XLA's memory analysis exists on CPU too
            assert r["peak_bytes"] > 2 * r["param_bytes"] + r["state_bytes"]
            assert r["extra_bytes"] is not None and r["opt_extra_bytes"] is not None


def test_first_loss_is_the_same_in_both_frameworks_and_near_log_vocab(bench_run):
    result, _ = bench_run
    first = [r["losses"][0] for r in result["rows"]]
    # logits of variance s^2 add about s^2 / 2 to ln(vocab); the tied head starts with s ~ 1
    assert math.log(TINY["vocab"]) < first[0] < math.log(TINY["vocab"]) + 1
    for value in first[1:]:
        assert value == pytest.approx(first[0], rel=1e-6)


def test_torch_and_jax_follow_one_trajectory(bench_run):
    result, capture = bench_run
    rows = {r["name"]: r for r in result["rows"]}
    for t, j in TWINS:
        # float32 round-off, grown by 8 Adam steps: entries whose gradient is near eps (a
        # GELU far in its tail) take visibly different steps
        np.testing.assert_allclose(rows[t]["losses"], rows[j]["losses"], rtol=1e-5)
        # the steps train: the loss on the fixed batch falls
        assert rows[t]["losses"][-1] < rows[t]["losses"][0] - 0.3
        keys = ("params", "x") if rows[t]["schedule_free"] else ("params",)
        for key in keys:
            ours, theirs = capture[t][key], capture[j][key]
            # embedding, positions, final LayerNorm's 2, and 15 per block (the key has no bias)
            assert set(ours) == set(theirs) and len(ours) == 4 + 15 * TINY["layers"]
            diff = np.concatenate([np.abs(ours[n] - theirs[n]).ravel() for n in ours])
            # lr 1e-3: one step moves an entry by ~1e-3; float32 round-off stays far below
            assert diff.max() < 1e-4, (t, key, diff.max())
    # ... and the two optimizers do differ, so agreement above is not by construction
    sf, plain = rows["sf_torch adamw"]["losses"], rows["torch.optim adamw"]["losses"]
    assert abs(sf[-1] - plain[-1]) > 0.05


def test_timed_sf_torch_steps_match_the_reference_class(bench_run):
    result, capture = bench_run
    row = next(r for r in result["rows"] if r["name"] == "sf_torch adamw")
    lm, batch = bench.lm_config("tiny")
    init = canonical.cast(canonical.init_params("lm", 0, lm), np.float32)
    model = torch_models.build("lm", init, lm=lm)
    inputs, labels = (torch.from_numpy(a).long() for a in bench.make_batch(lm, batch, 0))
    ref = schedulefree.AdamWScheduleFree(
        model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1
    )
    ref.train()
    losses = []
    for _ in range(row["full_steps"]):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
        loss.backward()
        ref.step()
        ref.zero_grad()
        losses.append(loss.item())
    np.testing.assert_allclose(row["losses"], losses, rtol=1e-6)
    y = torch_models.to_canonical("lm", model, lm=lm)
    ref.eval()
    x = torch_models.to_canonical("lm", model, lm=lm)
    for name, value in capture["sf_torch adamw"]["params"].items():
        np.testing.assert_allclose(value, y[name], rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(
            capture["sf_torch adamw"]["x"][name], x[name], rtol=1e-5, atol=1e-7, err_msg=name
        )
    assert not np.allclose(y["blocks.0.mlp_in.kernel"], x["blocks.0.mlp_in.kernel"], atol=1e-6)


def test_bfloat16_mixed_precision_rows_run_and_agree_roughly():
    # The Schedule-Free rows only: the AdamW rows run the same model code.
    lm, batch = bench.lm_config("tiny")
    init = canonical.cast(canonical.init_params("lm", 0, lm), np.float32)
    tokens = bench.make_batch(lm, batch, 0)
    rows = [
        row(name, lm, init, tokens, "cpu", "bfloat16", warmup=1, steps=1)
        for row, name in ((bench.torch_row, "sf_torch adamw"), (bench.jax_row, "sf_optax adamw"))
    ]
    assert all(math.isfinite(v) for r in rows for v in r.losses)
    # bf16 matmuls: ~3 significant digits, and the two frameworks round in different places
    for r in rows:
        assert r.losses[0] == pytest.approx(rows[0].losses[0], rel=5e-3)
        assert r.losses[1] < r.losses[0]
        assert r.param_bytes == 4 * tiny_param_count(**TINY)  # float32 params under bf16


def test_cuda_matmul_precision_is_set_and_restored():
    before_torch = torch.get_float32_matmul_precision()
    before_jax = jax.config.jax_default_matmul_precision
    with bench._matmul_precision("cuda", "float32", "tf32", with_jax=True):
        assert torch.get_float32_matmul_precision() == "high"
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
    assert torch.get_float32_matmul_precision() == before_torch
    assert jax.config.jax_default_matmul_precision == before_jax
    with bench._matmul_precision("cuda", "bfloat16", "tf32", with_jax=True):
        assert torch.get_float32_matmul_precision() == before_torch


def test_bad_input_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="size must be one of tiny"):
        bench.lm_config("huge")
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        bench.lm_config("tiny", batch=0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    args = bench.parse_args([])
    args.warmup = -1
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        bench.run(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' needs a CUDA build"):
        bench.run(bench.parse_args(["--device", "cuda"]))


@pytest.mark.usefixtures("x64")
def test_the_lm_options_compute_the_parity_twins_formula():
    # What lm_step turns on beside the parity LM: fused attention must give the written-out
    # formula's logits, and the tied head those of an untied one holding E^T and a zero bias.
    import jax.numpy as jnp

    from parity.models import flax_models

    lm = dict(vocab=11, width=12, layers=2, heads=3, seq=9, mlp=20)
    tied = canonical.init_params("lm", 0, dict(lm, tied=True))
    untied = tied | {"head.kernel": tied["embed.embedding"].T, "head.bias": np.zeros(11)}
    tokens = np.random.default_rng(0).integers(0, 11, size=(2, 9))
    want = torch_models.build("lm", untied, None, torch.float64, lm=lm)(torch.as_tensor(tokens))
    for fused in (False, True):
        options = dict(lm, tied=True, fused_attention=fused)
        ours = torch_models.build("lm", tied, None, torch.float64, lm=options)
        theirs = flax_models.build("lm", tied, None, jnp.float64, lm=options)
        logits = ours(torch.as_tensor(tokens))
        torch.testing.assert_close(logits, want, rtol=1e-12, atol=1e-12)
        # jax.nn.dot_product_attention takes its softmax in float32, whatever the inputs' dtype
        tol = 1e-6 if fused else 1e-12
        logits = np.asarray(theirs(jnp.asarray(tokens)))
        np.testing.assert_allclose(logits, want.detach(), rtol=tol, atol=tol, err_msg=str(fused))
