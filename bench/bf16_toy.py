"""bf16 parameters on a least-squares toy: does the average stay an average?

Trains w (bf16 or fp32) on 0.5 * mean((A w - b)^2) with Schedule-Free AdamW from sf_optax and
from optax.contrib, and prints the eval loss at x after each variant's run, plus the weight sum
against its closed form. Run: python -m bench.bf16_toy [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sf_optax


def problem(seed: int = 0, n: int = 512, d: int = 64):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)).astype(np.float32)
    w_star = rng.normal(size=d).astype(np.float32)
    b = a @ w_star + 0.01 * rng.normal(size=n).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b)


def loss_fn(w, a, b):
    r = a @ w.astype(jnp.float32) - b
    return 0.5 * jnp.mean(r * r)


F32 = dict(state_dtype=jnp.float32)
# name: (params' dtype, "ours" (sf_optax.adamw) or "contrib" (optax.contrib's), keywords)
VARIANTS = {
    "sf_optax fp32": (jnp.float32, "ours", {}),
    "sf_optax bf16": (jnp.bfloat16, "ours", {}),
    "sf_optax bf16 + fp32 state": (jnp.bfloat16, "ours", F32),
    "sf_optax bf16 + fp32 state + exact_x": (jnp.bfloat16, "ours", F32 | dict(exact_x=True)),
    "optax.contrib fp32": (jnp.float32, "contrib", {}),
    "optax.contrib bf16": (jnp.bfloat16, "contrib", {}),
    "optax.contrib bf16 + fp32 z": (jnp.bfloat16, "contrib", F32),
}


def run(name: str, steps: int = 2000, lr: float = 0.01, seed: int = 0) -> dict:
    dtype, kind, kwargs = VARIANTS[name]
    a, b = problem(seed)
    tx = (sf_optax.adamw if kind == "ours" else optax.contrib.schedule_free_adamw)(lr, **kwargs)
    w = jnp.zeros(a.shape[1], dtype)
    state = tx.init(w)

    def body(carry, _):
        w, state = carry
        g = jax.grad(loss_fn)(w, a, b)
        updates, state = tx.update(g, state, w)
        return (optax.apply_updates(w, updates), state), None

    (w, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((w, state))
    if kind == "ours":
        x = sf_optax.eval_params(state, w)
        weight_sum = float(sf_optax.find_state(state).weight_sum)
    else:
        x = optax.contrib.schedule_free_eval_params(state, w)
        weight_sum = float(state.weight_sum)
    return {
        "variant": name,
        "eval_loss_x": float(loss_fn(x, a, b)),
        "train_loss_y": float(loss_fn(w, a, b)),
        "weight_sum": weight_sum,
        "weight_sum_formula": steps * lr**2,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [run(name, args.steps, args.lr) for name in VARIANTS]
    print(f"least squares 512x64, Schedule-Free AdamW lr={args.lr}, {args.steps} steps")
    print(
        f"{'variant':40s} {'eval loss at x':>15s} {'loss at y':>12s} {'weight sum':>12s} "
        f"{'formula':>10s}"
    )
    for row in rows:
        print(
            f"{row['variant']:40s} {row['eval_loss_x']:15.4g} {row['train_loss_y']:12.4g} "
            f"{row['weight_sum']:12.5g} {row['weight_sum_formula']:10.5g}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
