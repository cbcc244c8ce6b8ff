"""sf_torch's optimizers on one device: the torch side of the parity claim."""

from __future__ import annotations

NAME = "sf_torch"
FRAMEWORK = "torch"
ROLE = "primary"
REQUIRES = ("torch", "sf_torch")
HANDOFF = True


def unsupported(config) -> str | None:
    return None


def expected_difference(config) -> str | None:
    return None


def build(classes, config, params, **extra):
    """``config``'s optimizer from ``classes`` (sf_torch, or the drop-in-compatible reference
    package ``schedulefree``): one mapping of the parity config to the shared constructors.
    ``inner_momentum`` is passed only where it is not 0 (schedulefree 1.4.1 has none)."""
    if config.optimizer == "adamc_plus":
        return classes.AdamCScheduleFreePlus(
            params,
            lr=config.lr,
            betas=(config.b1, config.b2),
            sf_beta1=config.sf_b1,
            eps=config.eps,
            weight_decay=config.weight_decay,
            r=config.r,
            polyak_beta=config.polyak_b,
            c_warmup=config.c_warmup,
            sf_beta1_anneal_steps=config.sf_b1_anneal_steps,
            sf_beta1_max=config.sf_b1_max,
            weight_lr_power=config.weight_lr_power,
            **extra,
        )
    if config.inner_momentum:
        extra = dict(extra, inner_momentum=config.inner_momentum)
    common = dict(
        weight_decay=config.weight_decay,
        r=config.r,
        weight_lr_power=config.weight_lr_power,
        **extra,
    )
    if config.optimizer == "adamw":
        return classes.AdamWScheduleFree(
            params,
            lr=config.lr,
            betas=(config.b1, config.b2),
            eps=config.eps,
            warmup_steps=config.warmup_steps,
            **common,
        )
    if config.optimizer == "sgd":
        return classes.SGDScheduleFree(
            params, lr=config.lr, momentum=config.b1, warmup_steps=config.warmup_steps, **common
        )
    return classes.RAdamScheduleFree(
        params,
        lr=config.lr,
        betas=(config.b1, config.b2),
        eps=config.eps,
        silent_sgd_phase=config.silent_sgd_phase,
        **common,
    )


def make_optimizer(config, params):
    """The sf_torch optimizer for ``config`` (also used by the handoff)."""
    import torch

    import sf_torch

    # Mixed precision: bf16 params (y), float32 z and v.
    state_dtype = torch.float32 if config.dtype == "bfloat16" else None
    return build(sf_torch, config, params, state_dtype=state_dtype)


def train(config, progress=None):
    from parity.training import torch_loop

    # adamc_plus's step takes the loss (torch_loop passes it: step(loss)).
    return torch_loop.run(
        config, make_optimizer, eval_params=lambda opt: opt.eval_params(), progress=progress
    )


if __name__ == "__main__":
    from parity.runners import _child

    _child.main(train)
