"""bench.jax_variants on CPU: every variant runs, agrees with sf_optax, and counts its bytes.

Two parts, small enough for CI (most of the time is XLA compiling one kernel per leaf):

- ``main()`` on the ``big-vectors`` set (the fewest leaves of the benchmark's sets: 64) at a
  tiny ``--scale``, without Pallas: the copy and every XLA variant are timed, and each
  variant is checked against V0 by the benchmark itself.
- The benchmark's functions on a small bf16 set (bf16 params and grads, fp32 z and v) of five
  leaves, large and small, so that V1 keeps some leaves per leaf and packs the others, and the
  bf16 y of every variant is held to the 1-ulp criterion. The Pallas variants (V3 per leaf and
  V3g grouped) run there in interpret mode, checked and not timed, as main() does on CPU; in
  main() (--no-pallas here) they would build a second small set and V0 reference of their own,
  ~13 s more on 2 busy cores.

The byte counts are recounted here from the shapes and element sizes. No timing is asserted
beyond the times being positive and finite.
"""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from bench import jax_variants as bench

XLA_VARIANTS = (
    "V2 direct",
    "V2b direct-optax",
    "V2c direct-optax-barrier",
    "V1 packed-small",
    "V1b packed-small-perleaf",
)
SCALE = 0.001  # big-vectors: 64 vectors of round(4096 * 0.001) = 4 elements
REPEATS = 2


def assert_ok(diff, name):
    """The benchmark's own criterion, spelled out as well: fp32 buffers within 1e-5 relative
    of V0, bf16 y within 1 ulp on at most 1% of its elements."""
    assert diff is not None, name
    assert bench.check_ok(diff), (name, diff)
    for kind in "zv":  # fp32 state in every set here
        assert 0 <= diff[kind] <= 1e-5, (name, kind, diff)
    if "y_bf16_ulps" in diff:
        assert diff["y_bf16_ulps"] <= 1.0 and diff["y_bf16_frac_diff"] <= 0.01, (name, diff)
    else:
        assert 0 <= diff["y"] <= 1e-5, (name, diff)


def assert_times(row):
    assert len(row["times_s"]) == REPEATS, row["variant"]
    assert all(math.isfinite(t) and t > 0 for t in row["times_s"]), row["variant"]
    assert math.isfinite(row["median_s"]) and row["median_s"] > 0, row["variant"]


def test_cli_defaults():
    gpu, _ = bench.parse_args(["--device", "gpu"])
    cpu, _ = bench.parse_args(["--device", "cpu"])
    assert (gpu.inner, gpu.repeats) == (50, 20)
    assert (cpu.inner, cpu.repeats) == (2, 5)


# ---------------------------------------------------------------------------------------------
# main() on big-vectors


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "jax_variants.json"
    bench.main(
        [
            "--device", "cpu",
            "--sets", "big-vectors",
            "--scale", str(SCALE),
            "--repeats", str(REPEATS),
            "--warmup", "1",
            "--inner", "1",
            "--no-pallas",
            "--json", str(out),
        ]
    )  # fmt: skip
    return json.loads(out.read_text())["sets"]["big-vectors"]


def test_every_xla_variant_ran_and_agrees_with_v0(result):
    assert result["skipped"] == []
    assert result["pallas_tiny"] == []  # --no-pallas
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"copy", "V0 sf_optax", *XLA_VARIANTS}
    for name in ("V0 sf_optax", *XLA_VARIANTS):
        assert_ok(rows[name]["diff"], name)
    assert rows["V0 sf_optax"]["diff"] == {"y": 0.0, "z": 0.0, "v": 0.0}  # V0 against itself
    for r in rows.values():
        assert_times(r)
        assert r["kernels"]["kernels"] > 0, r["variant"]


def test_bytes_match_a_count_from_the_shapes(result):
    n = 64 * 4  # 64 vectors of 4 elements, spelled out again
    assert (result["n_params"], result["n_tensors"]) == (n, 64)
    # fp32 AdamW: y read + written, g read, z and v read + written: 7 x 4 B = 28 B/param;
    # the copy reads and writes the params: 2 x 4 B
    for r in result["rows"]:
        assert r["bytes"] == (8 if r["variant"] == "copy" else 28) * n, r["variant"]


# ---------------------------------------------------------------------------------------------
# The functions on a small bf16 set

# Two leaves at the pack threshold or above (kept per leaf by V1) and three below it (packed,
# of two sizes). Pallas: V3 with 4096-element blocks gives every leaf one block of the next
# power of 2 (full for the large leaves, masked for the others); V3g with 1024-element blocks
# runs two full blocks for each of the two large leaves (one grouped kernel) and masked ones
# for the rest. Few distinct shapes: the synthetic start compiles one random draw per shape,
# ~1.5 s each on CPU.
BF16_SHAPES = ((4, 512), (4, 512), (300,), (33,), (33,))
N_BF16 = 2 * 4 * 512 + 300 + 33 + 33  # spelled out again
PACK_THRESHOLD = 2048
# bf16 y read + written and g read (3 x 2 B), fp32 z and v read + written (4 x 4 B)
BF16_BYTES_PER_PARAM = 3 * 2 + 4 * 4


@pytest.fixture(scope="module")
def bf16():
    args, _ = bench.parse_args(
        [
            "--device", "cpu",
            "--repeats", str(REPEATS),
            "--warmup", "1",
            "--inner", "1",
            "--pack-threshold", str(PACK_THRESHOLD),
        ]
    )  # fmt: skip
    runner = bench.Runner(args, jax.devices("cpu")[0])
    assert runner.interpret  # Pallas in interpret mode on CPU
    start = bench.make_start(BF16_SHAPES, jnp.bfloat16, seed=2)
    variants = runner.variants_for("bf16-big", 1)
    ref = runner.reference(variants[0], start)
    return runner, start, variants, ref


def test_bf16_start_and_reference_dtypes(bf16):
    _, start, _, ref = bf16
    assert BF16_BYTES_PER_PARAM == 22
    assert sum(math.prod(s) for s in BF16_SHAPES) == N_BF16
    assert [y.dtype for y in start["y"] + start["g"] + ref[0]] == [jnp.bfloat16] * 15
    assert {a.dtype for a in ref[1] + ref[2]} == {jnp.dtype(jnp.float32)}


def test_bf16_xla_variants_agree_with_v0_and_count_22_bytes_per_param(bf16):
    runner, start, variants, ref = bf16
    assert [v.name for v in variants] == ["V0 sf_optax", *XLA_VARIANTS]
    for var in variants:
        row = runner.run_variant("bf16-small", var, start, ref)
        assert row["bytes"] == BF16_BYTES_PER_PARAM * N_BF16, var.name
        assert "y_bf16_ulps" in row["diff"], var.name
        assert_ok(row["diff"], var.name)
        assert_times(row)


def test_v1_keeps_the_small_leaves_state_in_one_flat_buffer(bf16):
    _, start, variants, _ = bf16
    v1 = next(v for v in variants if v.name == "V1 packed-small")
    state = v1.make_state(start)
    assert [z.shape for z in state["z_big"]] == [(4, 512), (4, 512)]
    for key in ("z_flat", "v_flat"):
        assert {k: a.shape for k, a in state[key].items()} == {"bfloat16": (300 + 33 + 33,)}
        assert state[key]["bfloat16"].dtype == jnp.float32


@pytest.mark.parametrize(("grouped", "block"), [(False, 4096), (True, 1024)], ids=["V3", "V3g"])
def test_pallas_interpret_agrees_with_v0(bf16, grouped, block):
    runner, start, _, ref = bf16
    var = bench.v3_pallas(block, interpret=True, grouped=grouped, group_max=32)
    assert var.pallas and var.name.startswith("V3g" if grouped else "V3 ")
    row = runner.with_scalar_fallback(
        lambda: runner.run_variant("bf16-small", var, start, ref, timed_run=False)
    )
    assert row["bytes"] == BF16_BYTES_PER_PARAM * N_BF16
    assert row["kernels"]["kernels"] > 0
    assert_ok(row["diff"], var.name)
