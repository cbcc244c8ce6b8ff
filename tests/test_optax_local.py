"""sf_optax.local: workers on a 4-device CPU mesh axis taking local steps and averaging at the
steps of an sf_schedules.sync mask.

The expected numbers come from outside the code under test: data-parallel SGD and K workers of
Schedule-Free AdamW written out in float64 numpy (the rule of DESIGN.md section 1, gradients of
a small MLP by hand, averages taken by hand at the sync steps); for the compositions, each
worker stepped alone with the optimizer in a Python loop and averaged by hand; BatchNorm
statistics in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import sf_optax
from sf_optax import local
from sf_schedules.sync import AveragingWindow, Constant, sync_mask

K = 4  # workers
SHAPES = {"w1": (5, 8), "b1": (8,), "w2": (8, 2), "b2": (2,)}
N = 6  # examples per worker batch


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()
    if len(devices) < K:
        pytest.fail("the local-step tests need 4 CPU devices: XLA_FLAGS is set in conftest.py")
    return Mesh(np.array(devices[:K]), ("workers",))


def init_params(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {k: (0.5 * rng.normal(size=s)).astype(dtype) for k, s in SHAPES.items()}


def worker_batches(step, dtype=np.float64):
    """The K workers' batches of one step: inputs (K, N, 5), targets (K, N, 2)."""
    rng = np.random.default_rng([11, step])
    x = rng.normal(size=(K, N, 5))
    t = np.sin(x[..., :2] * 1.5) + 0.1 * rng.normal(size=(K, N, 2))
    return {"x": x.astype(dtype), "t": t.astype(dtype)}


def mlp_loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
    out = h @ p["w2"] + p["b2"]
    return 0.5 * jnp.mean(jnp.sum((out - batch["t"]) ** 2, axis=-1))


def numpy_grad(p, x, t):
    """The gradient of mlp_loss by hand, float64."""
    h = np.tanh(x @ p["w1"] + p["b1"])
    d = (h @ p["w2"] + p["b2"] - t) / len(x)
    dh = (d @ p["w2"].T) * (1 - h * h)
    return {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ d, "b2": d.sum(0)}


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_rel(a, b):
    return max(max_rel(a[k], b[k]) for k in b)


def spread(stacked):
    """The largest difference between a worker and worker 0, over a stacked tree."""
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(a)[0]))) for a in jax.tree.leaves(stacked)
    )


def as_jax(batch):
    return jax.tree.map(jnp.asarray, batch)


# ---------------------------------------------------------------------------------------------
# (a) H = 1 with plain SGD is data-parallel SGD on the concatenated batch


def test_sync_every_step_is_data_parallel_sgd(mesh, x64):
    lr, steps = 0.3, 15
    tx = optax.sgd(lr)
    step = local.make_local_train_step(mlp_loss, tx, mesh)
    params, state = local.local_init(tx, init_params(), mesh)
    mask = sync_mask(Constant(1), [lr] * steps)
    ref = init_params()
    for t in range(steps):
        batch = worker_batches(t)
        params, state, _ = step(params, state, as_jax(batch), mask[t])
        # One batch of K * N examples, the mean loss over all of them.
        x, tt = batch["x"].reshape(K * N, 5), batch["t"].reshape(K * N, 2)
        g = numpy_grad(ref, x, tt)
        ref = {k: ref[k] - lr * g[k] for k in ref}
    assert params["w1"].dtype == jnp.float64
    assert spread(params) == 0.0
    assert tree_rel(local.worker(params, 2), ref) < 1e-12


# ---------------------------------------------------------------------------------------------
# (b, c) Schedule-Free AdamW against K workers in numpy; one compilation for every period

LR, B1, B2, EPS, WD, WARMUP = 0.02, 0.9, 0.999, 1e-8, 0.01, 5
STEPS = 60


def sf_mask():
    lrs = [LR * min(1.0, (t + 1) / WARMUP) for t in range(STEPS)]
    return sync_mask(AveragingWindow(0.5, h_base=1, h_max=16, warmup_steps=WARMUP, h_warm=2), lrs)


def numpy_sf_adamw_workers(mask, moments):
    """K workers of Schedule-Free AdamW (DESIGN.md section 1) in float64; at each sync y and z
    (and v with ``moments``) are replaced by their mean over the workers. Returns the trace of
    (y, z, v) per worker at every sync step."""
    p0 = init_params()
    y = [dict(p0) for _ in range(K)]
    z = [dict(p0) for _ in range(K)]
    v = [{k: np.zeros_like(a) for k, a in p0.items()} for _ in range(K)]
    lr_max = weight_sum = 0.0
    out = {}
    for k in range(STEPS):
        batch = worker_batches(k)
        lr = LR * ((k + 1) / WARMUP if k < WARMUP else 1.0)
        lr_max = max(lr_max, lr)
        weight = lr_max**2.0
        weight_sum += weight
        c = weight / weight_sum
        for i in range(K):
            g = numpy_grad(y[i], batch["x"][i], batch["t"][i])
            for name in p0:
                v[i][name] = B2 * v[i][name] + (1 - B2) * g[name] ** 2
                denom = np.sqrt(v[i][name] / (1 - B2 ** (k + 1))) + EPS
                gn = g[name] / denom + WD * y[i][name]
                y[i][name] = (1 - c) * y[i][name] + c * z[i][name] + lr * (B1 * (1 - c) - 1) * gn
                z[i][name] = z[i][name] - lr * gn
        if mask[k]:
            averaged = [y, z, v] if moments else [y, z]
            for seq in averaged:
                for name in p0:
                    m = sum(seq[i][name] for i in range(K)) / K
                    for i in range(K):
                        seq[i][name] = m.copy()
            out[k] = ([dict(a) for a in y], [dict(a) for a in z], [dict(a) for a in v])
    return out


@pytest.mark.parametrize("moments", [False, True])
def test_schedule_free_adamw_matches_numpy_workers(mesh, x64, moments):
    """(b) y and z (and v with average_second_moment) equal across workers at every sync and
    equal to K numpy workers; (c) one trace for the whole run."""
    mask = sf_mask()
    periods = np.diff(np.r_[0, np.flatnonzero(mask) + 1])
    assert len(set(periods.tolist())) >= 5  # (c) many different periods in one run
    traces = []

    def loss_fn(p, batch):
        traces.append(1)  # runs once per trace
        return mlp_loss(p, batch)

    tx = sf_optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, warmup_steps=WARMUP)
    step = local.make_local_train_step(loss_fn, tx, mesh, average_second_moment=moments)
    params, state = local.local_init(tx, init_params(), mesh)
    expected = numpy_sf_adamw_workers(mask, moments)
    v_spread = []
    for t in range(STEPS):
        params, state, losses = step(params, state, as_jax(worker_batches(t)), mask[t])
        assert losses.shape == (K,)
        if not mask[t]:
            continue
        sf = sf_optax.find_state(state)
        assert spread(params) == 0.0 and spread(sf.z) == 0.0  # equal on every worker
        y_ref, z_ref, v_ref = expected[t]
        for i in (0, K - 1):
            assert tree_rel(local.worker(params, i), y_ref[i]) < 1e-10
            assert tree_rel(local.worker(sf.z, i), z_ref[i]) < 1e-10
            v_i = local.worker(sf.base_state[0].nu, i)
            assert tree_rel(v_i, v_ref[i]) < 1e-10
        v_spread.append(spread(sf.base_state[0].nu))
        # The counters: identical on every worker, the number of steps taken.
        assert np.all(np.asarray(sf.count) == t + 1)
    # x after the final sync, against numpy's x = (y - (1 - b1) z) / b1.
    y_ref, z_ref, _ = expected[STEPS - 1]
    x_ref = {k: (y_ref[0][k] - (1 - B1) * z_ref[0][k]) / B1 for k in SHAPES}
    assert tree_rel(local.local_eval_params(params, state), x_ref) < 1e-10
    assert tree_rel(local.local_eval_params(params, state, 3), x_ref) < 1e-10
    if moments:
        assert max(v_spread) == 0.0
    else:
        assert v_spread[-1] > 1e-8  # v stays per worker
    # (c) one trace and one compiled program for every period of the run.
    assert len(traces) == 1
    assert step.compilations() == 1


def test_no_communication_outside_the_sync_branch(mesh):
    """The compiled step's all-reduces all sit in a branch of the sync's conditional: a step
    without a sync communicates nothing."""
    tx = sf_optax.adamw(0.01)
    step = local.make_local_train_step(mlp_loss, tx, mesh, average_second_moment=True)
    params, state = local.local_init(tx, init_params(np.float32), mesh)
    batch = as_jax(worker_batches(0, np.float32))
    hlo = step.jitted.lower(params, state, batch, jnp.asarray(True)).compile().as_text()
    where, seen = None, {}
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and not line.startswith(" "):
            where = line.split()[0] if not line.startswith("ENTRY") else "ENTRY"
        if " all-reduce(" in line or " all-reduce-start(" in line:
            seen[where] = seen.get(where, 0) + 1
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    body = hlo[hlo.index(entry) :]
    branches = [
        b.strip("%") for b in body.split("branch_computations={", 1)[1].split("}")[0].split(", ")
    ]
    assert seen and "ENTRY" not in seen
    assert all(name.strip("%") in branches for name in seen)


# ---------------------------------------------------------------------------------------------
# (d) compositions: optax.chain around sf_optax, packed states, plain optax with a schedule


def sequential_reference(tx, steps, mask, average_state, dtype=np.float32):
    """Each worker stepped alone with ``tx`` (jitted, no mesh), averaged by hand at syncs."""
    p0 = jax.tree.map(jnp.asarray, init_params(dtype))
    ps = [p0] * K
    ss = [tx.init(p0)] * K

    @jax.jit
    def one(p, s, batch):
        g = jax.grad(mlp_loss)(p, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for t in range(steps):
        batch = worker_batches(t, dtype)
        for i in range(K):
            ps[i], ss[i] = one(ps[i], ss[i], {"x": batch["x"][i], "t": batch["t"][i]})
        if mask[t]:
            mean = jax.tree.map(lambda *a: sum(np.asarray(x, np.float64) for x in a) / K, *ps)
            ps = [jax.tree.map(lambda a: jnp.asarray(a, dtype), mean)] * K
            ss = average_state(ss)
    return ps, ss


def mean_field(states, get, put):
    mean = jax.tree.map(lambda *a: sum(np.asarray(x, np.float64) for x in a) / K, *map(get, states))
    return [
        put(s, jax.tree.map(lambda m, a: jnp.asarray(m, a.dtype), mean, get(s))) for s in states
    ]


def sf_of(s):
    return sf_optax.find_state(s)


def with_sf(s, sf):
    return jax.tree.map(
        lambda n: sf if isinstance(n, sf_optax.ScheduleFreeState) else n,
        s,
        is_leaf=lambda n: isinstance(n, sf_optax.ScheduleFreeState),
    )


def average_z(states):
    return mean_field(states, lambda s: sf_of(s).z, lambda s, z: with_sf(s, sf_of(s)._replace(z=z)))


def average_z_x(states):
    states = average_z(states)
    return mean_field(states, lambda s: sf_of(s).x, lambda s, x: with_sf(s, sf_of(s)._replace(x=x)))


def average_z_v(states):
    states = average_z(states)
    get = lambda s: sf_of(s).base_state[0].nu  # noqa: E731

    def put(s, nu):
        sf = sf_of(s)
        base = (sf.base_state[0]._replace(nu=nu), *sf.base_state[1:])
        return with_sf(s, sf._replace(base_state=base))

    return mean_field(states, get, put)


def average_adam_moments(states):
    get = lambda s: (s[0].mu, s[0].nu)  # noqa: E731
    return mean_field(states, get, lambda s, m: (s[0]._replace(mu=m[0], nu=m[1]), *s[1:]))


COMPOSITIONS = {
    "chain_clip_adamw": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), sf_optax.adamw(0.01, warmup_steps=3)),
        (),
        average_z,
    ),
    "sgd_exact_x_packed": (
        lambda: sf_optax.sgd(0.2, exact_x=True, pack_small_leaves=64),
        (),
        average_z_x,
    ),
    "optax_adamw_schedule": (
        lambda: optax.adamw(optax.cosine_decay_schedule(0.01, 12), weight_decay=0.01),
        (),
        lambda states: states,
    ),
    "optax_adamw_schedule_moments": (
        lambda: optax.adamw(optax.cosine_decay_schedule(0.01, 12), weight_decay=0.01),
        ("mu", "nu"),
        average_adam_moments,
    ),
    "inject_hyperparams_adamw_v": (
        lambda: optax.inject_hyperparams(sf_optax.adamw)(learning_rate=0.01, warmup_steps=2),
        ("nu",),
        average_z_v,
    ),
}


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_compositions_match_workers_stepped_alone(mesh, name):
    make_tx, moments, average_state = COMPOSITIONS[name]
    tx, steps = make_tx(), 12
    mask = sync_mask(Constant(3), [1.0] * 10 + [0.5] * 2)
    step = local.make_local_train_step(mlp_loss, tx, mesh, average=moments)
    params, state = local.local_init(tx, init_params(np.float32), mesh)
    for t in range(steps):
        params, state, _ = step(params, state, as_jax(worker_batches(t, np.float32)), mask[t])
    ps, ss = sequential_reference(tx, steps, mask, average_state)
    for i in range(K):
        assert tree_rel(local.worker(params, i), ps[i]) < 2e-6
        got = jax.tree.leaves(local.worker(state, i))
        want = jax.tree.leaves(ss[i])
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert max_rel(a, b) < 2e-6
    if "optax" not in name:
        x = local.local_eval_params(params, state)
        assert tree_rel(x, sf_optax.eval_params(ss[0], ps[0])) < 2e-6


def test_workers_times_model_sharding_matches_workers_alone(mesh):
    """4 workers, each sharded over a 2-device "model" axis (8 devices), against the 4-device
    run: the same numbers to float32 round-off, and every buffer keeps its model sharding."""
    from jax.sharding import PartitionSpec as P

    mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(K, 2), ("workers", "model"))
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
    tx = optax.chain(optax.clip_by_global_norm(1.0), sf_optax.adamw(0.01, warmup_steps=2))
    mask = sync_mask(Constant(3), [1.0] * 6)
    runs = []
    for m, kw in ((mesh, {}), (mesh2, {"param_specs": specs})):
        step = local.make_local_train_step(mlp_loss, tx, m, average_second_moment=True)
        params, state = local.local_init(tx, init_params(np.float32), m, **kw)
        for t in range(6):
            params, state, _ = step(params, state, as_jax(worker_batches(t, np.float32)), mask[t])
        runs.append((params, state))
    (p1, s1), (p2, s2) = runs
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        assert max_rel(b, a) < 1e-6
    assert p2["w1"].sharding.spec == P("workers", None, "model")
    sf = sf_optax.find_state(s2)
    assert sf.z["w2"].sharding.spec == P("workers", "model")  # trailing None dropped
    assert sf.base_state[0].nu["b1"].sharding.spec == P("workers", "model")
    assert sf.count.sharding.spec == P("workers")
    with pytest.raises(ValueError, match="uses the workers' axis 'workers'"):
        local.stack(init_params(), mesh2, specs={**specs, "b2": P("workers")})


# ---------------------------------------------------------------------------------------------
# (e) BatchNorm statistics at x, re-estimated per worker and averaged


def test_batchnorm_stats_averaged_over_workers(mesh):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
            self.out = nnx.Linear(6, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.bn(self.lin(x))))

    model = Net(nnx.Rngs(0))
    graphdef, params0, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, batch):
        m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))  # variables of this trace
        return jnp.mean((m(batch["x"])[:, 0] - batch["t"]) ** 2)

    tx = sf_optax.adamw(0.05, warmup_steps=2)
    step = local.make_local_train_step(loss_fn, tx, mesh)
    params, state = local.local_init(tx, params0, mesh)
    rng = np.random.default_rng(3)
    mask = sync_mask(Constant(2), [1.0] * 6)
    for t in range(6):
        x = rng.normal(size=(K, 8, 3)).astype(np.float32)
        batch = {"x": jnp.asarray(x), "t": jnp.asarray(x.sum(-1))}
        params, state, _ = step(params, state, batch, mask[t])
    x_params = local.local_eval_params(params, state)

    # Each worker's own 3 batches, with different scales so that the workers' statistics differ.
    data = rng.normal(size=(K, 3, 10, 3)) * np.arange(1, K + 1)[:, None, None, None] + 0.5
    data = data.astype(np.float32)
    stats_of = local.make_local_batch_stats(local.nnx_batchnorm_stats_fn(model), mesh)
    [(mean, var)] = stats_of(local.stack(x_params, mesh), jnp.asarray(data))

    kernel = np.asarray(x_params["lin"]["kernel"][...], np.float64)
    bias = np.asarray(x_params["lin"]["bias"][...], np.float64)
    h = data.astype(np.float64) @ kernel + bias  # (K, 3, 10, 6)
    batch_mean = h.mean(axis=2)
    batch_var = ((h - batch_mean[:, :, None]) ** 2).mean(axis=2)
    assert max_rel(mean, batch_mean.mean(axis=(0, 1))) < 1e-5
    assert max_rel(var, batch_var.mean(axis=(0, 1))) < 1e-5
    # Not one worker's statistics: the workers' data differ.
    assert max_rel(batch_var[0].mean(0), batch_var.mean(axis=(0, 1))) > 0.1

    local.set_nnx_batchnorm_stats(model, [(mean, var)])
    np.testing.assert_array_equal(np.asarray(model.bn.var[...]), np.asarray(var))
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), np.asarray(mean))


# ---------------------------------------------------------------------------------------------
# (f) clear errors


def test_sync_forms_agree():
    lrs = [0.01 * min(1.0, (t + 1) / 4) for t in range(30)]
    rule = AveragingWindow(0.5, h_max=8, warmup_steps=4)
    mask = sync_mask(rule, lrs)
    steps = np.flatnonzero(mask) + 1
    for form in (mask, list(mask), steps, tuple(int(s) for s in steps), (rule, lrs)):
        np.testing.assert_array_equal(local.resolve_sync_mask(form, total_steps=30), mask)


def test_errors_name_the_argument(mesh):
    tx = sf_optax.sgd(0.1)
    with pytest.raises(TypeError, match="sync must hold bools .* or ints"):
        local.resolve_sync_mask(np.ones(5))
    with pytest.raises(ValueError, match="sync has 5 steps but the run has 6"):
        local.resolve_sync_mask(np.ones(5, bool), total_steps=6)
    with pytest.raises(ValueError, match="non-empty 1-d"):
        local.resolve_sync_mask(np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"sync\[2\] must be in \[5, inf\)"):
        local.resolve_sync_mask([2, 4, 4])
    with pytest.raises(TypeError, match="a rule needs the run's learning rates"):
        local.resolve_sync_mask(Constant(2))
    with pytest.raises(ValueError, match=r"axis_name 'data' is not an axis of the mesh.*'workers'"):
        local.make_local_train_step(mlp_loss, tx, mesh, axis_name="data")
    with pytest.raises(TypeError, match="average_second_moment must be a Python bool"):
        local.make_local_train_step(mlp_loss, tx, mesh, average_second_moment=1)
    with pytest.raises(TypeError, match="average must be a sequence of state field names"):
        local.make_local_train_step(mlp_loss, tx, mesh, average="nu")
    p = jax.tree.map(jnp.asarray, init_params(np.float32))
    with pytest.raises(ValueError, match=r"average must run inside jax.shard_map.*'workers'"):
        local.average(p, tx.init(p))

    # A field name found nowhere (sf_optax.sgd has no v): the error comes when the step traces.
    sgd_v = local.make_local_train_step(mlp_loss, tx, mesh, average_second_moment=True)
    params, state = local.local_init(tx, p, mesh)
    batch = as_jax(worker_batches(0, np.float32))
    with pytest.raises(ValueError, match=r"average names \['nu'\]: no state"):
        sgd_v(params, state, batch, True)

    step = local.make_local_train_step(mlp_loss, tx, mesh)
    with pytest.raises(TypeError, match="sync must be a bool"):
        step(params, state, batch, 1.0)
    with pytest.raises(TypeError, match="sync must be a bool.*int32"):
        step(params, state, batch, jnp.asarray(1))
    with pytest.raises(ValueError, match=r"sync must be a scalar"):
        step(params, state, batch, jnp.ones(2, bool))
    with pytest.raises(ValueError, match="params: every leaf needs a leading axis of length 4"):
        step(p, state, batch, True)
    with pytest.raises(ValueError, match="batch: every leaf needs a leading axis of length 4"):
        step(params, state, jax.tree.map(lambda a: a[:2], batch), True)
    batches = [batch] * 3
    with pytest.raises(ValueError, match="sync has 2 steps but 3 batches"):
        local.run_local(step, params, state, batches[:3], np.array([False, True]))
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 4\)"):
        local.worker(params, 4)
    # run_local and the step agree.
    mask = np.array([False, False, True])
    p1, s1, losses = local.run_local(step, params, state, batches, mask)
    assert losses.shape == (3, K)
    p2, s2 = params, state
    for t in range(3):
        p2, s2, _ = step(p2, s2, batch, mask[t])
    assert spread(p1) == 0.0
    np.testing.assert_array_equal(np.asarray(p1["w1"]), np.asarray(p2["w1"]))
    # has_aux: the aux comes back stacked, one per worker.
    aux_step = local.make_local_train_step(
        lambda q, b: (mlp_loss(q, b), {"n": b["x"].shape[0]}), tx, mesh, has_aux=True
    )
    _, _, loss, aux = aux_step(params, state, batch, False)
    np.testing.assert_array_equal(np.asarray(aux["n"]), [N] * K)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(losses[0]), rtol=1e-6)


def test_explicit_axes_mesh_matches_auto_mesh(mesh):
    """jax.make_mesh gives explicit axes by default (jax >= 0.7): the same run on such a mesh
    ends where the run on the plain Mesh does, and worker / local_eval_params read it (they
    used to raise ShardingTypeError there: a slice of an explicitly sharded dimension)."""
    from jax.sharding import AxisType

    explicit = jax.make_mesh(
        (K,), ("workers",), axis_types=(AxisType.Explicit,), devices=mesh.devices
    )
    tx = sf_optax.adamw(1e-2, warmup_steps=2)
    mask = sync_mask(Constant(2), [1.0] * 6)
    ends = []
    for m in (mesh, explicit):
        step = local.make_local_train_step(mlp_loss, tx, m)
        params, state = local.local_init(tx, init_params(np.float32), m)
        for t in range(6):
            params, state, _ = step(params, state, as_jax(worker_batches(t, np.float32)), mask[t])
        ends.append((params, state))
    (p_auto, s_auto), (p_exp, s_exp) = ends
    for i in (0, K - 1):
        assert tree_rel(local.worker(p_exp, i), local.worker(p_auto, i)) < 1e-6
    x_exp, x_auto = local.local_eval_params(p_exp, s_exp), local.local_eval_params(p_auto, s_auto)
    assert tree_rel(x_exp, x_auto) < 1e-6
    # worker's slice is the stacked array's row, read on the host
    assert np.array_equal(np.asarray(local.worker(p_exp, 1)["w1"]), np.asarray(p_exp["w1"])[1])
