"""bench.step on the tiny set: every row is there, its byte count is right, its work is real.

The byte counts are recounted here from the shapes and element sizes, not taken from the
benchmark; the foreach step the benchmark times is checked against the reference
``schedulefree.AdamWScheduleFree`` after one step. No timing is asserted.
"""

import json
import math

import pytest
import schedulefree
import torch

from bench import step as bench
from bench.timing import capped_repeats

TINY_NUMEL = sum(math.prod(s) for s in bench.param_set("tiny").shapes)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    bench.main(["--device", "cpu", "--set", "tiny", "--repeats", "3", "--json", str(out)])
    return json.loads(out.read_text())


def test_every_row_present_with_positive_finite_times(result):
    expected = {
        "torch copy",
        "sf_torch adamw loop",
        "sf_torch adamw foreach",
        "sf_torch sgd loop",
        "sf_torch sgd foreach",
        "schedulefree adamw foreach",
        "sf_torch switch foreach",
        "jax copy",
        "sf_optax adamw jit",
        "sf_optax sgd jit",
        "sf_optax adamw packed jit",
        "sf_optax sgd packed jit",
        "sf_optax adamw fori",
        "sf_optax adamw packed fori",
        "sf_optax sgd packed fori",
        "optax sgd fori",
        "optax adamw jit",
        "optax sgd momentum jit",
        "optax.contrib adamw jit",
        "sf_optax eval_params jit",
        "sf_optax switch jit",
        "sf_optax switch packed jit",
        "jax dispatch floor",
    }
    assert result["skipped"] == []
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == expected
    for r in rows.values():
        assert len(r["times_s"]) == 3
        assert all(math.isfinite(t) and t > 0 for t in r["times_s"]), r["name"]
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        if r["kind"] == "floor":  # dispatch alone: no bytes, so no bandwidth
            assert r["bytes"] == 0 and r["bandwidth"] == 0
            continue
        assert math.isfinite(r["bandwidth"]) and r["bandwidth"] > 0
        assert math.isfinite(r["copy_share"]) and r["copy_share"] > 0
    assert max(r["copy_share"] for r in rows.values() if r["kind"] == "copy") == pytest.approx(1)


def test_bytes_match_a_count_from_the_shapes(result):
    n = sum(
        math.prod(s) for s in [(64, 128), (128,), (32, 32), (32,), (3, 5, 7)]
    )  # the tiny set, spelled out again
    assert result["n_params"] == n == TINY_NUMEL
    # fp32 params, grads, state; the dispatch floor moves nothing
    per_param = {"adamw": 28, "sgd": 20, "switch": 12, "copy": 8, "floor": 0}
    for r in result["rows"]:
        kind = "adamw" if "adamw" in r["name"] else r["kind"]
        if r["name"] == "optax sgd fori":  # plain SGD, no state: reads y, g; writes y
            kind = "switch"  # the same 12 B/param
        assert r["bytes"] == per_param[kind] * n, r["name"]


def test_bf16_bytes_count_element_sizes():
    ps = bench.param_set("bf16", scale=1 / 256)
    n = 32 * 8 * 4096 + 64 * 16
    assert ps.n_params == n
    # bf16 y and g (2 B), fp32 z and v (4 B).
    assert bench.useful_bytes("adamw", ps) == (3 * 2 + 3 * 4 + 4) * n
    assert bench.useful_bytes("sgd", ps) == (2 + 2 + 4 + 2 + 4) * n
    assert bench.useful_bytes("switch", ps) == (2 + 4 + 2) * n
    assert bench.param_set("big").n_params == 268_697_600


@pytest.mark.parametrize("name", ["sf_torch adamw foreach", "sf_torch adamw loop"])
def test_timed_step_matches_the_reference(name):
    ps = bench.param_set("tiny")
    ours = bench.torch_tensors(ps, "cpu")
    ref = [p.detach().clone() for p in ours]
    for p, q in zip(ref, ours):
        p.grad = q.grad.clone()
    opt = bench.torch_optimizer(name, ours, ps)
    ref_opt = schedulefree.AdamWScheduleFree(
        ref, lr=bench.LR_ADAMW, weight_decay=bench.WEIGHT_DECAY, foreach=True
    )
    opt.train()
    ref_opt.train()
    before = [p.detach().clone() for p in ours]
    opt.step()
    ref_opt.step()
    for p, q, b in zip(ours, ref, before):
        assert not torch.equal(p, b)  # the step moved the params
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["z"], ref_opt.state[q]["z"])
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


def test_hlo_dump_and_the_big_sets_halves(tmp_path):
    # --hlo writes one compiled program per JAX optimizer row; big-matrices and big-vectors
    # split big's shapes (recounted here) between them.
    bench.main(
        [
            "--device",
            "cpu",
            "--set",
            "tiny",
            "--repeats",
            "1",
            "--no-jax",
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    assert not list(tmp_path.glob("*.hlo.txt"))
    rows = bench.run_jax(
        bench.param_set("tiny"),
        "cpu",
        1,
        1,
        1,
        [],
        names=["sf_optax adamw jit"],
        hlo_dir=str(tmp_path),
    )
    (dump,) = tmp_path.glob("*.hlo.txt")
    assert "ENTRY" in dump.read_text() and rows[0].name == "sf_optax adamw jit"
    mats = bench.param_set("big-matrices", 0.01).shapes
    vecs = bench.param_set("big-vectors", 0.01).shapes
    assert mats == ((20, 4096),) * 32 and vecs == ((41,),) * 64


def test_jax_rows_count_the_bytes_of_the_state_they_keep():
    # bf16 params: ours keeps z and v in float32 (22 B/param moved), optax.contrib keeps v in
    # bf16 (18 B/param); the rows count what each really moves.
    ps = bench.param_set("bf16", scale=1 / 512)
    n = ps.n_params
    rows = {
        r.name: r
        for r in bench.run_jax(
            ps,
            "cpu",
            0,
            1,
            1,
            [],
            names=["sf_optax adamw jit", "sf_optax adamw packed jit", "optax.contrib adamw jit"],
        )
    }
    y_and_g = (2 + 2 + 2) * n  # y read and written, g read, bf16
    assert rows["sf_optax adamw jit"].bytes == y_and_g + (2 * 4 + 2 * 4) * n
    assert rows["sf_optax adamw packed jit"].bytes == y_and_g + (2 * 4 + 2 * 4) * n
    assert rows["optax.contrib adamw jit"].bytes == y_and_g + (2 * 4 + 2 * 2) * n


def test_rows_selects_by_name_and_keeps_the_copies():
    names = bench.torch_row_names(bench.param_set("tiny"), "cuda") + bench.JAX_ROW_NAMES
    picked = bench.select_rows(names, "fused, sf_optax adamw")
    assert picked == [
        "torch copy",
        "sf_torch adamw fused",
        "sf_torch sgd fused",
        "sf_torch switch fused",
        "jax copy",
        "sf_optax adamw jit",
        "sf_optax adamw packed jit",
        "sf_optax adamw fori",
        "sf_optax adamw packed fori",
    ]
    assert bench.select_rows(names, None) == names
    # On CUDA the fused step also runs captured in a CUDA graph (capturable=True), replayed.
    assert bench.select_rows(names, "graph") == [
        "torch copy",
        "sf_torch adamw graph",
        "sf_torch sgd graph",
        "jax copy",
    ]


def test_repeats_shrink_for_slow_rows_but_not_below_three():
    assert capped_repeats(20, 1e-4, 50) == 20  # 0.1 s of samples: all of them
    assert capped_repeats(20, 0.02, 50) == 4  # 1 s a sample: what fits in ROW_SECONDS
    assert capped_repeats(20, 10.0, 50) == 3
    assert capped_repeats(2, 10.0, 50) == 2  # never more than asked
