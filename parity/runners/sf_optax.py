"""sf_optax under jax.jit on one device: the JAX side of the parity claim."""

from __future__ import annotations

NAME = "sf_optax"
FRAMEWORK = "jax"
ROLE = "primary"
REQUIRES = ("jax", "optax", "flax", "sf_optax")
HANDOFF = True


def unsupported(config) -> str | None:
    return None


def expected_difference(config) -> str | None:
    return None


def make_tx(config):
    """The sf_optax transformation for ``config`` (also used by sf_optax_mesh and the handoff)."""
    import jax.numpy as jnp

    import sf_optax

    # Mixed precision: bf16 params (y), float32 z and v.
    state_dtype = jnp.float32 if config.dtype == "bfloat16" else None
    common = dict(
        warmup_steps=config.warmup_steps,
        r=config.r,
        weight_lr_power=config.weight_lr_power,
        state_dtype=state_dtype,
    )
    if config.optimizer == "adamc_plus":
        # Its update takes the loss: jax_loop passes update(..., value=loss).
        return sf_optax.adamc_plus(
            config.lr,
            config.b1,
            config.b2,
            config.eps,
            config.weight_decay,
            sf_b1=config.sf_b1,
            sf_b1_max=config.sf_b1_max,
            sf_b1_anneal_steps=config.sf_b1_anneal_steps,
            polyak_b=config.polyak_b,
            c_warmup=config.c_warmup,
            r=config.r,
            weight_lr_power=config.weight_lr_power,
            state_dtype=state_dtype,
        )
    if config.optimizer == "adamw":
        return sf_optax.adamw(
            config.lr,
            config.b1,
            config.b2,
            config.eps,
            config.weight_decay,
            inner_momentum=config.inner_momentum,
            **common,
        )
    if config.optimizer == "sgd":
        return sf_optax.sgd(config.lr, config.b1, config.weight_decay, **common)
    return sf_optax.radam(
        config.lr,
        config.b1,
        config.b2,
        config.eps,
        config.weight_decay,
        r=config.r,
        weight_lr_power=config.weight_lr_power,
        silent_sgd_phase=config.silent_sgd_phase,
        state_dtype=state_dtype,
    )


def train(config, progress=None):
    import sf_optax
    from parity.training import jax_loop

    return jax_loop.run(config, make_tx, eval_params=sf_optax.eval_params, progress=progress)


if __name__ == "__main__":
    from parity.runners import _child

    _child.main(train)
