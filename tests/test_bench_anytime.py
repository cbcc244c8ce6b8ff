"""bench.anytime at its tiny size, every problem, both frameworks, checked against other numbers.

- The JAX and torch runs of each config start from the same weights and see the same batches
  through independent implementations: digits' and charlm's eval losses and accuracies agree to
  float32 round-off, convex's float64 trajectories to 1e-10, and a plain numpy replay of three
  convex runs (SGD + cosine written out here, Schedule-Free SGD from the recurrence of DESIGN.md
  1.1, with and without warmup) lands on the same weights.
- Each table cell is recomputed here from the runs in the JSON: the minimum over the sweep of
  the loss at that horizon (a run of a schedule told its length counts only at its own).
- The learning rates the baselines' optimizers report having used are compared with the cosine
  and WSD formulas written out below (not with sf_schedules).
- Convex: f* agrees with scikit-learn's solution, the gradient (written here) is ~0 at W*, and
  every loss is the objective recomputed here minus f*; G is the proven bound (recomputed
  here, and checked on random weights and batches with torch autograd), every bound lies above
  its run's suboptimality, and the bounds of the constant-lr runs equal their closed forms.
- The Schedule-Free bound curve at D = G = 1 equals its closed form, at the lr minimising it.
- The new rows (SF AdamW with ``inner_momentum``, SF+ = AdamC + Polyak with its own lr sweep) run
  in both frameworks and agree as above; charlm's equal, at every evaluation, a training loop
  written here with upstream's ``AdamWScheduleFree(inner_momentum=...)`` and
  ``AdamCScheduleFreePlusPaper`` (its base-lr warmup written out here).
"""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from bench.anytime import cli, problems, runs
from parity import data as parity_data
from parity.models import torch_models

LRS = (1e-3, 1e-2)
INNER = 0.9  # one SF AdamW row with inner_momentum
PLUS_LRS = (0.5, 1.0)  # base lrs of the SF+ (AdamC, Polyak) row
PLUS = "SF+ AdamC (Polyak)"
WARMUP = 2
STEPS = 16
LAM = 1e-3
UPSTREAM = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/schedulefree_main"
HORIZONS = {"T/4": 4, "T/2": 8, "T": 16}
CONVEX_HORIZONS = {"T/4": 40, "T/2": 80, "T": 160}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """digits and charlm with a sweep of our own."""
    path = tmp_path_factory.mktemp("anytime")
    cli.main(
        ["--size", "tiny", "--problem", "digits,charlm", "--framework", "both"]
        + ["--steps", str(STEPS), "--lrs", ",".join(map(str, LRS)), "--sf-b1", "0.9,0.95"]
        + ["--warmup", str(WARMUP), "--out", str(path)]
        + ["--sf-inner", str(INNER), "--plus-lrs", ",".join(map(str, PLUS_LRS))]
    )
    return path


@pytest.fixture(scope="module")
def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def convex_out(tmp_path_factory):
    """convex with its own tiny sweep: lrs 0.5, 1, 2; T = 160; SF without and with warmup 8."""
    path = tmp_path_factory.mktemp("convex")
    results = cli.main(
        ["--size", "tiny", "--problem", "convex", "--out", str(path)] + ["--trajectories"]
    )
    with np.load(path / "trajectories.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return results["problems"]["convex"], arrays, path


def _snaps(arrays, framework, i):
    """The evaluated weights of convex run ``i``, as (evals, 65, 10)."""
    return arrays[f"convex/{framework}/{i}/snaps"].reshape(-1, 65, 10)


@pytest.fixture(scope="module")
def features():
    """The convex training and test features and labels, built here: pixels / 16, then a 1."""
    d = parity_data.load("mlp", 0, 1, "float64")

    def bias(x):
        return np.hstack([x, np.ones((len(x), 1))])

    return (
        bias(d.train_inputs),
        d.train_labels.astype(int),
        bias(d.eval_inputs),
        d.eval_labels.astype(int),
    )


def objective(a, y, w):
    z = a @ w
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    ce = -np.take_along_axis(log_p, np.broadcast_to(y[:, None], z.shape[:-1] + (1,)), -1)
    return ce[..., 0].mean(axis=-1) + 0.5 * LAM * (w * w).sum(axis=(-2, -1))


def gradient(a, y, w):
    z = a @ w
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return a.T @ p / len(y) + LAM * w


def test_outputs_exist(out, results, convex_out):
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
            # Per lr: SF for two b1 and one inner_momentum, cosine and WSD at three horizons
            # each; then SF+ per its lr.
            assert len(fw["runs"]) == len(LRS) * (3 + 3 + 3) + len(PLUS_LRS)
            for run in fw["runs"]:
                assert all(math.isfinite(v) for v in run["eval_loss"])
                assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == run["spec"]["horizon"]
                assert set(problem["horizons"]) & set(range(run["spec"]["horizon"] + 1)) <= set(
                    run["eval_steps"]
                )
    convex, _, path = convex_out
    for name in ("results.json", "table.md", "anytime.png"):
        assert (path / name).stat().st_size > 0
    assert "f* = 0.2550157566" in (path / "table.md").read_text()
    assert convex["horizons"] == [40, 80, 160]
    for fw in convex["frameworks"].values():
        # 3 lrs x (SF, SF with warmup, constant, sqrt, cosine and WSD at three horizons each)
        assert len(fw["runs"]) == 30


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


def test_each_cell_is_the_minimum_over_the_sweep(results, convex_out):
    entries = [(p, HORIZONS) for p in results["problems"].values()]
    entries.append((convex_out[0], CONVEX_HORIZONS))
    for problem, horizons in entries:
        for fw in problem["frameworks"].values():
            labels = {r["spec"]["label"] for r in fw["runs"]}
            assert set(fw["table"]) == labels
            for label, row in fw["table"].items():
                for h_name, h in horizons.items():
                    candidates = [
                        (r["eval_loss"][r["eval_steps"].index(h)], r["spec"]["lr"])
                        for r in fw["runs"]
                        if r["spec"]["label"] == label
                        and (
                            r["spec"]["method"] not in ("cosine", "wsd")
                            or r["spec"]["horizon"] == h
                        )
                    ]
                    lrs = PLUS_LRS if label == PLUS else problem["sweep"]["lrs"]
                    assert sorted(lr for _, lr in candidates) == sorted(lrs)
                    loss, lr = min(candidates)
                    assert row[h_name]["loss"] == loss
                    assert row[h_name]["lr"] == lr
    assert set(results["problems"]["digits"]["frameworks"]["jax"]["table"]) == {
        "SF b1=0.9",
        "SF b1=0.95",
        f"SF b1=0.9, inner {INNER:g}",
        "cosine",
        "WSD (cooldown 20%)",
        PLUS,
    }


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


def _constant(peak, total, warmup, s):
    """SF+'s base lr: warmup to ``peak``, then ``peak``."""
    return peak * (s + 1) / warmup if s < warmup else peak


def test_baselines_ran_with_the_schedules_learning_rates(results, convex_out):
    formulas = {"cosine": _cosine, "wsd": _wsd, "sf_plus": _constant}
    checked = 0
    problems_ = [*results["problems"].values(), convex_out[0]]
    for problem in problems_:
        warmup = problem["sweep"]["warmup"]
        for fw in problem["frameworks"].values():
            for run in fw["runs"]:
                spec = run["spec"]
                if spec["method"] == "sf":
                    assert run["lrs_used"] is None
                    continue
                if spec["method"] not in formulas:
                    continue
                h = spec["horizon"]
                expected = [formulas[spec["method"]](spec["lr"], h, warmup, s) for s in range(h)]
                assert len(run["lrs_used"]) == h
                # float32 in JAX (1 + cos near -1 loses digits), float64 in torch
                np.testing.assert_allclose(
                    run["lrs_used"], expected, rtol=1e-6, atol=1e-6 * spec["lr"]
                )
                checked += 1
    assert checked == 2 * 2 * (len(LRS) * 6 + len(PLUS_LRS)) + 2 * 3 * 6


def test_schedule_free_bound_curve(results):
    for problem in results["problems"].values():
        sf = problem["bounds"]["curves"]["sf T"]
        lr, bound = sf["lr"], np.array(sf["bound"])
        # D = G = 1; the optimizer's x after n updates, restarted at z_2 (sf_schedules'
        # schedule_free_optimizer_bound): (D^2 + lr^2 G^2 (n + 1)) / (2 n lr)
        n = np.arange(1, STEPS + 1)
        np.testing.assert_allclose(bound, (1 + lr**2 * (n + 1)) / (2 * n * lr), rtol=1e-12)
        best = math.sqrt(STEPS + 1) / STEPS  # at lr = 1 / sqrt(T + 1)
        assert best <= bound[-1] <= best * (1 + 1e-4)
        for key in ("cosine T/4", "wsd T", "cosine T"):
            curve = problem["bounds"]["curves"][key]
            assert all(math.isfinite(v) and v > 0 for v in curve["bound"])
            assert curve["lr"] > 0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "10"], "steps"),
        (["--steps", "16", "--warmup", "4"], "warmup"),
        (["--lrs", "0.01,-1"], "lrs"),
        (["--sf-b1", "1.5"], "sf-b1"),
        (["--methods", "sf,adam"], "methods"),
        (["--problem", "digits,mnist"], "problem"),
        (["--sf-inner", "1"], "sf-inner"),
        (["--plus-lrs", "1,0"], "plus-lrs"),
    ],
)
def test_bad_input_is_a_value_error(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        cli.main(
            ["--size", "tiny", "--problem", "digits", "--framework", "torch"]
            + ["--out", str(tmp_path), *argv]
        )
    with pytest.raises(ValueError, match="size must be one of"):
        problems.load("convex", "huge")
    sgd = dict(optimizer="sgd", methods=("sf",), lrs=(1.0,), sf_b1=(0.9,), sf_warmups=())
    with pytest.raises(ValueError, match="AdamW rows"):
        runs.plan(16, 4, **sgd, warmup=0, weight_decay=0.0, plus_lrs=(1.0,))


def _upstream(name: str):
    """Upstream main's module ``name`` (``../shared/reference/schedulefree_main``), by path."""
    path = UPSTREAM / f"{name}.py"
    if not path.exists():
        pytest.skip(f"upstream reference not present: {path}")
    module_name = f"_upstream_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def _upstream_charlm_run(optimizer_of, step, eval_steps: list[int]) -> list[float]:
    """charlm's eval losses at ``eval_steps``, trained here with an upstream optimizer
    (``optimizer_of(params)``; ``step(optimizer, loss, k)`` takes one step) on the study's
    batches and initial weights, evaluated at x after upstream's ``eval()``."""
    problem = problems.load("charlm", "tiny", 0, STEPS)
    inputs, labels = problem.all_train_batches()
    model = torch_models.build("lm", problem.params0, dtype=torch.float32, lm=problem.lm)
    optimizer = optimizer_of(model.parameters())
    eval_labels = torch.from_numpy(problem.eval_labels).long().flatten()
    losses = []

    def evaluate():
        optimizer.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(problem.eval_inputs).long())
            losses.append(float(F.cross_entropy(logits.flatten(0, -2), eval_labels)))
        optimizer.train()

    evaluate()
    for k in range(STEPS):
        logits = model(torch.from_numpy(inputs[k]).long())
        loss = F.cross_entropy(logits.flatten(0, -2), torch.from_numpy(labels[k]).long().flatten())
        optimizer.zero_grad()
        loss.backward()
        step(optimizer, loss, k)
        if k + 1 in eval_steps:
            evaluate()
    return losses


def test_new_rows_equal_upstreams_optimizers(results):
    """The inner-momentum row and the SF+ rows of charlm (both frameworks) against the same
    training written here with upstream's AdamWScheduleFree(inner_momentum) and
    AdamCScheduleFreePlusPaper (its base lr warmed up here by hand)."""
    charlm = results["problems"]["charlm"]
    wd = charlm["sweep"]["weight_decay"]
    checked = 0
    for fw in charlm["frameworks"].values():
        for run in fw["runs"]:
            spec = run["spec"]
            if spec["method"] == "sf" and spec["inner_momentum"] and spec["lr"] == LRS[-1]:
                cls = _upstream("adamw_schedulefree").AdamWScheduleFree
                kw = dict(betas=(0.9, 0.999), warmup_steps=WARMUP, weight_decay=wd)

                def make(params, cls=cls, kw=kw, lr=spec["lr"]):
                    return cls(params, lr=lr, inner_momentum=INNER, **kw)

                def step(optimizer, loss, k):
                    optimizer.step()
            elif spec["method"] == "sf_plus" and spec["lr"] == PLUS_LRS[-1]:
                cls = _upstream("adamc_schedulefree_plus_paper").AdamCScheduleFreePlusPaper

                def make(params, cls=cls):
                    return cls(params, lr=PLUS_LRS[-1], c_warmup=WARMUP)

                def step(optimizer, loss, k):
                    lr = _constant(PLUS_LRS[-1], STEPS, WARMUP, k)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step_func(loss.item())
            else:
                continue
            losses = _upstream_charlm_run(make, step, run["eval_steps"])
            assert losses[-1] < losses[0] - 0.1  # it trained
            np.testing.assert_allclose(run["eval_loss"], losses, rtol=2e-5, err_msg=str(spec))
            checked += 1
    assert checked == 4


# -- convex -----------------------------------------------------------------------------------


def test_convex_jax_and_torch_trajectories_agree(convex_out):
    convex, arrays, _ = convex_out
    torch_runs = convex["frameworks"]["torch"]["runs"]
    jax_runs = convex["frameworks"]["jax"]["runs"]
    for i, (run, jax_run) in enumerate(zip(torch_runs, jax_runs)):
        t, j = _snaps(arrays, "torch", i), _snaps(arrays, "jax", i)
        assert t.shape == j.shape == (len(run["eval_steps"]), 65, 10)
        assert np.abs(t[-1]).max() > 0.1  # the run moved
        name = run["spec"]["name"]
        np.testing.assert_allclose(j, t, rtol=0, atol=1e-10 * np.abs(t).max(), err_msg=name)
        for key in ("w_norm", "g_norm"):
            np.testing.assert_allclose(
                arrays[f"convex/jax/{i}/{key}"],
                arrays[f"convex/torch/{i}/{key}"],
                rtol=1e-10,
                atol=1e-14,
            )
        np.testing.assert_allclose(jax_run["eval_loss"], run["eval_loss"], rtol=1e-9, atol=1e-13)


def _replay(features, rows, steps, lrs, b1=None, warmup=0):
    """Numpy SGD (b1 None) or Schedule-Free SGD (DESIGN.md 1.1, weight_lr_power 2, r 0);
    returns the evaluated weights after every update."""
    a, y = features[0], features[1]
    w = np.zeros((65, 10))
    z, weight_sum, lr_max, out = w.copy(), 0.0, 0.0, []
    for k in range(steps):
        g = gradient(a[rows[k]], y[rows[k]], w)
        if b1 is None:
            w = w - lrs[k] * g
            out.append(w)
            continue
        lr = lrs[k] * ((k + 1) / warmup if k < warmup else 1.0)
        lr_max = max(lr_max, lr)
        weight = lr_max**2
        weight_sum += weight
        c = weight / weight_sum
        w = (1 - c) * w + c * z + lr * (b1 * (1 - c) - 1) * g
        z = z - lr * g
        out.append((w - (1 - b1) * z) / b1)
    return np.stack(out)


@pytest.mark.parametrize("name", ["cosine lr 1 h 80", "SF b1=0.9 lr 2", "SF b1=0.9, warmup 8 lr 1"])
def test_convex_numpy_replay(convex_out, features, name):
    convex, arrays, _ = convex_out
    runs = convex["frameworks"]["torch"]["runs"]
    i = next(k for k, r in enumerate(runs) if r["spec"]["name"] == name)
    spec, steps = runs[i]["spec"], runs[i]["spec"]["horizon"]
    rows = problems.batch_rows(len(features[1]), 16, steps)
    if spec["method"] == "cosine":
        # half cosine from lr to 0 over the updates 0 .. steps-1
        lrs = spec["lr"] * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / (steps - 1)))
        replay = _replay(features, rows, steps, lrs)
    else:
        assert spec["warmup"] == (8 if "warmup" in name else 0)
        lrs = np.full(steps, spec["lr"])
        replay = _replay(features, rows, steps, lrs, b1=0.9, warmup=spec["warmup"])
    evaluated = replay[np.asarray(runs[i]["eval_steps"][1:]) - 1]
    snaps = _snaps(arrays, "torch", i)[1:]
    np.testing.assert_allclose(snaps, evaluated, rtol=0, atol=1e-10 * np.abs(evaluated).max())


def test_convex_optimum_matches_sklearn_and_lies_below_every_run(convex_out, features):
    convex, arrays, _ = convex_out
    a, y, test_a, test_y = features
    info = convex["info"]
    # sklearn minimises C * sum_i CE_i + ||W||^2 / 2: the same minimiser when C = 1/(lam n).
    clf = LogisticRegression(
        C=1 / (LAM * len(y)), fit_intercept=False, tol=1e-12, max_iter=10_000
    ).fit(a, y)
    w_sk = clf.coef_.T
    f_sk = objective(a, y, w_sk)
    assert info["f_star"] <= f_sk + 1e-15
    assert f_sk - info["f_star"] < 1e-10
    w_star, _ = problems.convex_optimum(0)
    assert np.linalg.norm(gradient(a, y, w_star)) < 1e-12
    assert np.abs(w_star - w_sk).max() < 1e-4
    assert info["D"] == pytest.approx(np.linalg.norm(w_sk), rel=1e-6)
    assert info["test_acc_at_optimum"] == pytest.approx(
        np.mean(np.argmax(test_a @ w_sk, 1) == test_y)
    )
    for fw, fw_runs in convex["frameworks"].items():
        for i, run in enumerate(fw_runs["runs"]):
            w = _snaps(arrays, fw, i)
            f = objective(a, y, w)
            assert np.all(f > info["f_star"]), run["spec"]["name"]
            np.testing.assert_allclose(run["eval_loss"], f - info["f_star"], rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(
                run["eval_acc"], np.mean(np.argmax(test_a @ w, -1) == test_y, -1)
            )


def test_gradient_bound_holds_on_random_weights(convex_out, features):
    a, y = torch.as_tensor(features[0]), torch.as_tensor(features[1])
    gen = torch.Generator().manual_seed(0)
    bound_a = math.sqrt(2) * torch.linalg.vector_norm(a, dim=1).max().item()
    for scale in (0.0, 1.0, 30.0):
        for batch in (1, 16):
            w = (scale * torch.randn(65, 10, generator=gen, dtype=torch.float64)).requires_grad_()
            rows = torch.randint(0, len(y), (batch,), generator=gen)
            loss = torch.nn.functional.cross_entropy(a[rows] @ w, y[rows])
            (loss + 0.5 * LAM * (w * w).sum()).backward()
            norm = torch.linalg.vector_norm(w.grad).item()
            assert norm <= bound_a + LAM * torch.linalg.vector_norm(w).item()
    info = convex_out[0]["info"]
    assert math.sqrt(2) * info["max_feature_norm"] == pytest.approx(bound_a, rel=1e-14)


def test_convex_bound_above_measured_suboptimality(convex_out, features):
    convex, arrays, _ = convex_out
    n_runs = len(convex["frameworks"]["torch"]["runs"])
    radius = max(
        arrays[f"convex/{fw}/{i}/w_norm"].max() for fw in ("torch", "jax") for i in range(n_runs)
    )
    G = math.sqrt(2) * np.linalg.norm(features[0], axis=1).max() + LAM * radius
    assert convex["convex"]["G"] == pytest.approx(G, rel=1e-12)
    assert max(arrays[f"convex/torch/{i}/g_norm"].max() for i in range(n_runs)) <= G
    checked = 0
    for i, run in enumerate(convex["frameworks"]["torch"]["runs"]):
        spec = run["spec"]
        w_norm = arrays[f"convex/torch/{i}/w_norm"]
        assert w_norm.shape == (spec["horizon"] + 1,)  # every gradient point and the last one
        if spec["method"] != "sf":  # the last SGD iterate is the last evaluated W
            last = np.linalg.norm(_snaps(arrays, "torch", i)[-1])
            assert w_norm[-1] == pytest.approx(last, rel=1e-14)
        if run["bound"] is None:
            assert spec["warmup"] > 0  # only SF with warmup lacks a theorem
            continue
        assert np.all(np.asarray(run["eval_loss"][1:]) < np.asarray(run["bound"][1:])), spec
        checked += 1
    assert checked == 27


def test_convex_constant_lr_bounds_equal_their_closed_forms(convex_out):
    convex = convex_out[0]
    D, G = convex["info"]["D"], convex["convex"]["G"]
    for run in convex["frameworks"]["torch"]["runs"]:
        n = np.asarray(run["eval_steps"][1:], dtype=float)
        spec, lr = run["spec"], run["spec"]["lr"]
        if spec["method"] == "constant":
            # Theorem 1 at constant lr for the iterate after n updates (T = n + 1):
            # D^2 / (2 T lr) + lr G^2 (1 + H_{T-1}) / 2, H_m the m-th harmonic number.
            harmonic = np.array([np.sum(1.0 / np.arange(1, m + 1)) for m in n.astype(int)])
            want = D**2 / (2 * (n + 1) * lr) + lr * G**2 * (1 + harmonic) / 2
        elif spec["method"] == "sf" and not spec["warmup"]:
            # SF restarted at z_2, ||z_2 - x*||^2 <= D^2 + lr^2 G^2: n updates average n z's.
            want = (D**2 + lr**2 * G**2 * (n + 1)) / (2 * n * lr)
        else:
            continue
        np.testing.assert_allclose(run["bound"][1:], want, rtol=1e-12, err_msg=spec["name"])
