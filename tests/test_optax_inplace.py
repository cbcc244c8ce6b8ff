"""The jitted, donated sf_optax step updates y and z in place on the CPU: XLA's compiled HLO
holds no copy of a parameter-sized buffer.

XLA's CPU backend computes y' and z' in separate loops (it has no multi-output fusion). If y'
read the old z, or z' the old y after y' was written, XLA would copy y and z every step (a
parameter-sized temporary each, and two extra passes over memory). The HLO checked here is
XLA's own output; the step's numbers are checked against the reference elsewhere.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import sf_optax

SHAPES = ((64, 32), (32,), (16, 16, 3), (128,))


def _params(dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
    return {
        f"p{i}": jax.random.normal(k, s, jnp.float32).astype(dtype)
        for i, (k, s) in enumerate(zip(keys, SHAPES))
    }


def _compiled_copies(fn, *args) -> list[str]:
    """The shapes of the copy instructions in the entry computation of ``fn`` jitted with its
    first two arguments donated."""
    hlo = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}\n")]
    return re.findall(r"= (\S+) copy\(", entry)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sf_optax.adamw(1e-3, weight_decay=0.01),
        lambda: sf_optax.adamw(1e-3, weight_decay=0.01, warmup_steps=5, r=0.5),
        lambda: sf_optax.sgd(0.1, weight_decay=0.01),
        lambda: sf_optax.radam(1e-3, weight_decay=0.01),
        lambda: sf_optax.adamw(1e-3, state_dtype=jnp.float32),
        lambda: sf_optax.adamw(1e-3, weight_decay=0.01, pack_small_leaves=256),
    ],
    ids=["adamw", "adamw-warmup-r", "sgd", "radam", "adamw-f32-state", "adamw-packed"],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_has_no_parameter_sized_copies(make, dtype):
    opt = make()
    params = _params(jnp.dtype(dtype))
    grads = jax.tree.map(lambda p: (1e-2 * p.astype(jnp.float32)).astype(p.dtype), params)
    state = opt.init(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    copies = _compiled_copies(step, params, state, grads)
    # Scalars (the step count) may be copied; no array (a parameter, z, v, a packed slot).
    big = [c for c in copies if "[]" not in c]
    assert big == [], f"array copies in the step: {big}"


def test_the_check_finds_the_copies_of_a_crossed_update():
    # y' reads the old z and z' the old y, as the y-from-old-z form of the step did: XLA's CPU
    # backend must copy both to update them in place (this test fails if it no longer does,
    # and the check above would then prove nothing on this XLA).
    params = _params(jnp.float32)

    def crossed(y, z, g):
        y_new = jax.tree.map(lambda y, z, g: 0.9 * y + 0.1 * z - 1e-3 * (g + 0.01 * y), y, z, g)
        z_new = jax.tree.map(lambda y, z, g: z - 1e-3 * (g + 0.01 * y), y, z, g)
        return y_new, z_new

    z = jax.tree.map(lambda p: p + 1.0, params)
    copies = _compiled_copies(crossed, params, z, params)
    assert len([c for c in copies if "[]" not in c]) >= len(SHAPES)
