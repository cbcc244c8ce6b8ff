"""bench.anytime at its tiny size, both problems, both frameworks, checked against other numbers.

- The JAX run and the torch run of each config start from the same weights and see the same
  batches through independent implementations (flax + optax vs torch): their eval losses must
  agree to float32 round-off, and so must their accuracies.
- Each table cell is recomputed here from the runs in the JSON: the minimum over the sweep of
  the eval loss at that horizon (SF runs count at every horizon, a baseline only at its own).
- The learning rates the baselines' optimizers report having used are compared with the cosine
  and WSD formulas written out below (not with sf_schedules).
- The Schedule-Free bound curve is compared with its closed form, and its learning rate with a
  grid search.
"""

import json
import math

import numpy as np
import pytest

from bench import anytime, anytime_runs

LRS = (1e-3, 1e-2)
WARMUP = 2
STEPS = 16


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("anytime")
    anytime.main(
        [
            "--size",
            "tiny",
            "--problem",
            "all",
            "--framework",
            "both",
            "--steps",
            str(STEPS),
            "--lrs",
            ",".join(map(str, LRS)),
            "--sf-b1",
            "0.9,0.95",
            "--warmup",
            str(WARMUP),
            "--out",
            str(path),
        ]
    )
    return path


@pytest.fixture(scope="module")
def results(out):
    return json.loads((out / "results.json").read_text())


def test_outputs_exist(out, results):
    assert (out / "anytime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "anytime.png").stat().st_size > 20_000
    table = (out / "table.md").read_text()
    for name in ("digits", "charlm"):
        for framework in ("jax", "torch"):
            assert f"### {name}, {framework}" in table
    assert set(results["problems"]) == {"digits", "charlm"}
    for problem in results["problems"].values():
        assert problem["horizons"] == [4, 8, 16]
        for fw in problem["frameworks"].values():
            # Per lr: SF for two b1, cosine and WSD at three horizons each.
            assert len(fw["runs"]) == len(LRS) * (2 + 3 + 3)
            for run in fw["runs"]:
                assert all(math.isfinite(v) for v in run["eval_loss"])
                assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == run["spec"]["horizon"]
                assert set(problem["horizons"]) & set(range(run["spec"]["horizon"] + 1)) <= set(
                    run["eval_steps"]
                )


def test_jax_and_torch_agree_to_float32(results):
    for name, problem in results["problems"].items():
        jax_runs = problem["frameworks"]["jax"]["runs"]
        torch_runs = problem["frameworks"]["torch"]["runs"]
        assert [r["spec"] for r in jax_runs] == [r["spec"] for r in torch_runs]
        for a, b in zip(jax_runs, torch_runs):
            np.testing.assert_allclose(
                a["eval_loss"], b["eval_loss"], rtol=2e-5, err_msg=f"{name} {a['spec']}"
            )
            if name == "digits":
                # 450 eval images: a 1e-6 logit difference may flip at most one of them.
                np.testing.assert_allclose(a["eval_acc"], b["eval_acc"], atol=1.5 / 450)
        # Training did something: every run's loss at its horizon is below the initial one.
        for run in jax_runs:
            assert run["eval_loss"][-1] < run["eval_loss"][0]


def test_each_cell_is_the_minimum_over_the_sweep(results):
    names = dict(zip(anytime_runs.HORIZON_NAMES, (4, 8, 16)))
    for problem in results["problems"].values():
        for fw in problem["frameworks"].values():
            labels = {r["spec"]["label"] for r in fw["runs"]}
            assert (
                set(fw["table"])
                == labels
                == {"SF b1=0.9", "SF b1=0.95", "cosine", "WSD (cooldown 20%)"}
            )
            for label, row in fw["table"].items():
                for h_name, h in names.items():
                    candidates = [
                        (r["eval_loss"][r["eval_steps"].index(h)], r["spec"]["lr"])
                        for r in fw["runs"]
                        if r["spec"]["label"] == label
                        and (r["spec"]["method"] == "sf" or r["spec"]["horizon"] == h)
                    ]
                    assert len(candidates) == len(LRS)
                    loss, lr = min(candidates)
                    assert row[h_name]["loss"] == loss
                    assert row[h_name]["lr"] == lr


def _cosine(peak, total, warmup, s):
    """Warmup to ``peak``, then a half cosine reaching 0 at the last update ``total - 1``."""
    if s < warmup:
        return peak * (s + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - 1 - warmup)))


def _wsd(peak, total, warmup, s):
    """Warmup, ``peak``, then a linear decay over the last 20% reaching 0 at ``total - 1``."""
    cooldown = round(0.2 * total)
    if s < warmup:
        return peak * (s + 1) / warmup
    if s < total - cooldown:
        return peak
    return peak * (1 - (s - (total - cooldown) + 1) / cooldown)


def test_baselines_ran_with_the_schedules_learning_rates(results):
    formulas = {"cosine": _cosine, "wsd": _wsd}
    checked = 0
    for problem in results["problems"].values():
        for fw in problem["frameworks"].values():
            for run in fw["runs"]:
                spec = run["spec"]
                if spec["method"] == "sf":
                    assert run["lrs_used"] is None
                    continue
                h = spec["horizon"]
                expected = [formulas[spec["method"]](spec["lr"], h, WARMUP, s) for s in range(h)]
                assert len(run["lrs_used"]) == h
                # float32 in JAX (1 + cos near -1 loses digits), float64 in torch
                np.testing.assert_allclose(
                    run["lrs_used"], expected, rtol=1e-6, atol=1e-6 * spec["lr"]
                )
                checked += 1
    assert checked == 2 * 2 * len(LRS) * 6


def test_schedule_free_bound_curve(results):
    for problem in results["problems"].values():
        sf = problem["bounds"]["sf"]
        gamma, bound = sf["base_lr"], np.array(sf["bound"])
        t = np.arange(1, STEPS + 1)
        np.testing.assert_allclose(bound, (1 + gamma**2 * t) / (2 * gamma * t), rtol=1e-12)
        grid = np.geomspace(gamma / 4, gamma * 4, 401)
        at_t = (1 + grid**2 * STEPS) / (2 * grid * STEPS)
        assert bound[-1] <= at_t.min() * (1 + 1e-12)
        for key in ("cosine T/4", "wsd T", "cosine T"):
            curve = problem["bounds"][key]
            assert all(math.isfinite(v) and v > 0 for v in curve["bound"])
            assert curve["base_lr"] > 0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "10"], "steps"),
        (["--steps", "16", "--warmup", "4"], "warmup"),
        (["--lrs", "0.01,-1"], "lrs"),
        (["--sf-b1", "1.5"], "sf-b1"),
        (["--methods", "sf,adam"], "methods"),
    ],
)
def test_bad_input_is_a_value_error(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        anytime.main(
            [
                "--size",
                "tiny",
                "--problem",
                "digits",
                "--framework",
                "torch",
                "--out",
                str(tmp_path),
                *argv,
            ]
        )
