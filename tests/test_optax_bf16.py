"""bf16 parameters: the scalars stay float32, so the average stays an average (DESIGN 1.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sf_optax
from bench import bf16_toy


def test_weight_sum_in_bf16_follows_the_formula_over_2000_steps():
    steps, lr, warmup, r = 2000, 0.01, 50, 0.5
    tx = sf_optax.adamw(lr, warmup_steps=warmup, r=r, state_dtype=jnp.float32)
    contrib = optax.contrib.schedule_free_adamw(lr, warmup_steps=warmup)
    w = jnp.linspace(-1, 1, 16, dtype=jnp.bfloat16)

    def run(tx):
        def body(carry, i):
            w, state = carry
            g = (w.astype(jnp.float32) - jnp.sin(i.astype(jnp.float32))).astype(jnp.bfloat16)
            updates, state = tx.update(g, state, w)
            return (optax.apply_updates(w, updates), state), None

        (w_end, state), _ = jax.lax.scan(body, (w, tx.init(w)), jnp.arange(steps))
        assert w_end.dtype == jnp.bfloat16
        return state

    k = np.arange(steps, dtype=np.float64)
    lr_max = np.maximum.accumulate(lr * np.minimum((k + 1) / warmup, 1.0))
    formula = np.sum((k + 1) ** r * lr_max**2.0)

    ours = sf_optax.find_state(run(tx))
    assert ours.weight_sum.dtype == jnp.float32
    np.testing.assert_allclose(float(ours.weight_sum), formula, rtol=2e-5)
    # optax.contrib keeps it in bf16, where it stops growing: the average becomes an EMA
    theirs = run(contrib)
    assert float(theirs.weight_sum) < 0.5 * np.sum(lr_max**2.0)


def test_exact_x_keeps_bf16_at_fp32_quality_on_the_toy():
    steps = 2000
    fp32 = bf16_toy.run("optax.contrib fp32", steps)["eval_loss_x"]
    exact = bf16_toy.run("sf_optax bf16 + fp32 state + exact_x", steps)["eval_loss_x"]
    contrib_bf16 = bf16_toy.run("optax.contrib bf16", steps)["eval_loss_x"]
    assert exact < 1.5 * fp32
    assert contrib_bf16 > 100 * fp32


def test_weight_decay_of_bf16_params_is_taken_in_float32():
    # One step from z = y: z1 = y - lr (g / (sqrt(v1 / (1 - b2)) + eps) + wd y), in float64 from
    # the bf16 values. A decay taken in bf16 (coefficient 0.3 -> 0.30078, product rounded to 8
    # bits) would put z off by ~lr wd |y| 2**-9, some 3e-5 relative here.
    lr, wd, b2, eps = 0.05, 0.3, 0.999, 1e-8
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=256), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=256) * 0.1, jnp.bfloat16)
    y64, g64 = np.asarray(y, np.float64), np.asarray(g, np.float64)
    for tx, direction in (
        (
            sf_optax.adamw(lr, b2=b2, eps=eps, weight_decay=wd, state_dtype=jnp.float32),
            g64 / (np.sqrt((1 - b2) * g64**2 / (1 - b2)) + eps),
        ),
        (sf_optax.sgd(lr, weight_decay=wd, state_dtype=jnp.float32), g64),
    ):
        _, state = tx.update(g, tx.init(y), y)
        z1 = np.asarray(sf_optax.find_state(state).z, np.float64)
        want = y64 - lr * (direction + wd * y64)
        assert np.abs(z1 - want).max() / np.abs(want).max() < 1e-6
