"""optax.contrib's schedule_free_adamw / schedule_free_sgd: a reference row.

Known differences (reported, not failed): its warmup schedule is evaluated at a step count
that starts at 1, so its learning rate lags ours by one step (its first ``z`` step has lr 0);
it has no RAdam and no polynomial weighting ``r``.
"""

from __future__ import annotations

NAME = "optax_contrib"
FRAMEWORK = "jax"
ROLE = "reference"
REQUIRES = ("jax", "optax", "flax")
HANDOFF = False


def unsupported(config) -> str | None:
    if config.optimizer == "adamc_plus":
        return "optax.contrib has no schedule-free AdamC with a Polyak step size"
    if config.inner_momentum:
        return "optax.contrib's schedule_free_adamw has no inner momentum"
    if config.optimizer == "radam":
        return "optax.contrib has no schedule-free RAdam"
    if config.r != 0:
        return "optax.contrib has no polynomial weighting r"
    return None


def expected_difference(config) -> str | None:
    if config.warmup_steps > 0:
        return "optax.contrib's warmup lags one step (its first z step has lr 0)"
    return None


def make_tx(config):
    from optax import contrib

    warmup = config.warmup_steps or None
    if config.optimizer == "adamw":
        return contrib.schedule_free_adamw(
            config.lr,
            warmup_steps=warmup,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            weight_lr_power=config.weight_lr_power,
        )
    return contrib.schedule_free_sgd(
        config.lr,
        warmup_steps=warmup,
        b1=config.b1,
        weight_decay=config.weight_decay,
        weight_lr_power=config.weight_lr_power,
    )


def train(config, progress=None):
    from optax import contrib

    from parity.training import jax_loop

    return jax_loop.run(
        config, make_tx, eval_params=contrib.schedule_free_eval_params, progress=progress
    )


if __name__ == "__main__":
    from parity.runners import _child

    _child.main(train)
