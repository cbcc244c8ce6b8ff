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
