"""bench.convex at the tiny size, checked against numbers it did not produce.

- the JAX and torch trajectories of every run agree in float64 (two frameworks), and a plain
  numpy replay of three runs (SGD + cosine written out here, Schedule-Free SGD from the
  recurrence of DESIGN.md 1.1, with and without warmup) lands on the same weights;
- f* agrees with scikit-learn's solution of the same problem, the gradient (written here) is
  ~0 at W*, and f* lies below every objective the runs reached (recomputed here);
- G is the proven bound (recomputed here, and checked on random weights and batches with torch
  autograd), every bound lies above its run's suboptimality, and the bounds of the constant-lr
  runs equal their closed forms;
- the best lr reported per method and horizon is the minimum over the sweep.
"""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from bench import convex
from parity import data as parity_data

LAM = 1e-3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("convex")
    results = convex.main(["--size", "tiny", "--out", str(out), "--trajectories"])
    with np.load(out / "trajectories.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return results, arrays, out


@pytest.fixture(scope="module")
def features():
    """The training and test features and labels, built here: pixels / 16, then a 1."""
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


def test_outputs_written(bench):
    results, _, out = bench
    for name in ("results.json", "table.md", "convex.png"):
        assert (out / name).stat().st_size > 0
    assert results["config"]["horizons"] == [40, 80, 160]
    assert len(results["runs"]) == 30  # 3 lrs x (SF, SF warmup, constant, sqrt, 3 cos, 3 WSD)


def test_jax_and_torch_trajectories_agree(bench):
    results, arrays, _ = bench
    for i, run in enumerate(results["runs"]):
        t, j = arrays[f"torch/{i}/snaps"], arrays[f"jax/{i}/snaps"]
        assert t.shape == j.shape == (len(run["eval_steps"]), 65, 10)
        assert np.abs(t[-1]).max() > 0.1  # the run moved
        np.testing.assert_allclose(j, t, rtol=0, atol=1e-10 * np.abs(t).max(), err_msg=run["name"])
        for key in ("w_norm", "g_norm"):
            np.testing.assert_allclose(
                arrays[f"jax/{i}/{key}"], arrays[f"torch/{i}/{key}"], rtol=1e-10, atol=1e-14
            )
        np.testing.assert_allclose(run["subopt_jax"], run["subopt"], rtol=1e-9, atol=1e-13)


def _replay(features, idx, steps, lrs, b1=None, warmup=0):
    """Numpy SGD (b1 None) or Schedule-Free SGD (DESIGN.md 1.1, weight_lr_power 2, r 0);
    returns the evaluated weights after every update."""
    a, y = features[0], features[1]
    w = np.zeros((65, 10))
    z, weight_sum, lr_max, out = w.copy(), 0.0, 0.0, []
    for k in range(steps):
        g = gradient(a[idx[k]], y[idx[k]], w)
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


@pytest.mark.parametrize("name", ["SGD+cosine lr=1 T=80", "SF-SGD lr=2", "SF-SGD warmup 5% lr=1"])
def test_numpy_replay(bench, features, name):
    results, arrays, _ = bench
    i = next(k for k, r in enumerate(results["runs"]) if r["name"] == name)
    run = results["runs"][i]
    steps = run["steps"]
    if run["kind"] == "cosine":
        # half cosine from lr to 0 over the updates 0 .. steps-1
        lrs = run["lr"] * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / (steps - 1)))
        replay = _replay(features, arrays["idx"], steps, lrs)
    else:
        assert run["warmup_steps"] == (8 if "warmup" in name else 0)
        lrs = np.full(steps, run["lr"])
        replay = _replay(features, arrays["idx"], steps, lrs, b1=0.9, warmup=run["warmup_steps"])
    evaluated = replay[np.asarray(run["eval_steps"]) - 1]
    snaps = arrays[f"torch/{i}/snaps"]
    np.testing.assert_allclose(snaps, evaluated, rtol=0, atol=1e-10 * np.abs(evaluated).max())


def test_optimum_matches_sklearn_and_lies_below_every_run(bench, features):
    results, arrays, _ = bench
    a, y, test_a, test_y = features
    p = results["problem"]
    # sklearn minimises C * sum_i CE_i + ||W||^2 / 2: the same minimiser when C = 1/(lam n).
    clf = LogisticRegression(
        C=1 / (LAM * len(y)), fit_intercept=False, tol=1e-12, max_iter=10_000
    ).fit(a, y)
    w_sk = clf.coef_.T
    f_sk = objective(a, y, w_sk)
    assert p["f_star"] <= f_sk + 1e-15
    assert f_sk - p["f_star"] < 1e-10
    w_star = convex.optimum(0).w
    assert np.linalg.norm(gradient(a, y, w_star)) < 1e-12
    assert np.abs(w_star - w_sk).max() < 1e-4
    assert p["D"] == pytest.approx(np.linalg.norm(w_sk), rel=1e-6)
    assert p["test_acc_at_optimum"] == pytest.approx(np.mean(np.argmax(test_a @ w_sk, 1) == test_y))
    for i, run in enumerate(results["runs"]):
        for fw, sub in (("torch", run["subopt"]), ("jax", run["subopt_jax"])):
            f = objective(a, y, arrays[f"{fw}/{i}/snaps"])
            assert np.all(f > p["f_star"]), run["name"]
            np.testing.assert_allclose(sub, f - p["f_star"], rtol=1e-10, atol=1e-14)


def test_gradient_bound_holds_on_random_weights(features):
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
    assert convex.gradient_bound(convex.load_problem(0), 0.0) == pytest.approx(bound_a, rel=1e-14)


def test_bound_above_measured_suboptimality(bench, features):
    results, arrays, _ = bench
    p = results["problem"]
    n_runs = len(results["runs"])
    radius = max(arrays[f"{fw}/{i}/w_norm"].max() for fw in ("torch", "jax") for i in range(n_runs))
    G = math.sqrt(2) * np.linalg.norm(features[0], axis=1).max() + LAM * radius
    assert p["G"] == pytest.approx(G, rel=1e-12)
    assert max(arrays[f"torch/{i}/g_norm"].max() for i in range(n_runs)) <= G
    for i, run in enumerate(results["runs"]):
        w_norm = arrays[f"torch/{i}/w_norm"]
        assert w_norm.shape == (run["steps"] + 1,)  # every gradient point and the last one
        if run["kind"] != "sf":  # the last SGD iterate is the last evaluated W
            last = np.linalg.norm(arrays[f"torch/{i}/snaps"][-1])
            assert w_norm[-1] == pytest.approx(last, rel=1e-14)
    checked = 0
    for run in results["runs"]:
        if run["bound"] is None:
            assert run["warmup_steps"] > 0  # only SF with warmup lacks a theorem
            continue
        assert np.all(np.asarray(run["subopt"]) < np.asarray(run["bound"])), run["name"]
        checked += 1
    assert checked == 27


def test_constant_lr_bounds_equal_their_closed_forms(bench):
    results, _, _ = bench
    D, G = results["problem"]["D"], results["problem"]["G"]
    for run in results["runs"]:
        n = np.asarray(run["eval_steps"], dtype=float)
        lr = run["lr"]
        if run["kind"] == "constant":
            # Theorem 1 at constant lr for the iterate after n updates (T = n + 1):
            # D^2 / (2 T lr) + lr G^2 (1 + H_{T-1}) / 2, H_m the m-th harmonic number.
            harmonic = np.array([np.sum(1.0 / np.arange(1, m + 1)) for m in n.astype(int)])
            want = D**2 / (2 * (n + 1) * lr) + lr * G**2 * (1 + harmonic) / 2
        elif run["kind"] == "sf" and not run["warmup_steps"]:
            # SF restarted at z_2, ||z_2 - x*||^2 <= D^2 + lr^2 G^2: n updates average n z's.
            want = (D**2 + lr**2 * G**2 * (n + 1)) / (2 * n * lr)
        else:
            continue
        np.testing.assert_allclose(run["bound"], want, rtol=1e-12, err_msg=run["name"])


def test_best_is_the_minimum_over_the_sweep(bench):
    results, _, _ = bench
    lrs = set(results["config"]["lrs"])
    for label, per_h in results["best"].items():
        for h, best in per_h.items():
            cands = {}
            for run in results["runs"]:
                if run["label"] == label and run["horizon"] in (None, int(h)):
                    cands[run["lr"]] = run["subopt"][run["eval_steps"].index(int(h))]
            assert set(cands) == lrs, (label, h)
            lr = min(cands, key=cands.get)
            assert best["lr"] == lr and best["subopt"] == cands[lr], (label, h)


def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="size must be one of"):
        convex.run("huge", tmp_path)
