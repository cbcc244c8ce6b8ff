"""The reference ``schedulefree`` classes (the semantics both our backends reproduce).

They start in eval mode, so ``train()`` is called once before the first step. They have no
``eval_params()``; ``x`` is computed here with the same ``lerp`` their ``eval()`` writes into
the params, on copies, so that evaluating leaves the training run as it was.
"""

from __future__ import annotations

NAME = "schedulefree"
FRAMEWORK = "torch"
ROLE = "reference"
REQUIRES = ("torch", "schedulefree")
HANDOFF = False


def unsupported(config) -> str | None:
    if config.optimizer == "adamc_plus":
        return "schedulefree 1.4.1 has no AdamC/Polyak optimizer (upstream main's, unreleased)"
    if config.inner_momentum:
        return "schedulefree 1.4.1 has no inner_momentum (upstream main's, unreleased)"
    return None


def expected_difference(config) -> str | None:
    return None


def make_optimizer(config, params):
    import schedulefree

    from parity.runners.sf_torch import build

    opt = build(schedulefree, config, params)
    opt.train()
    return opt


def eval_params(optimizer):
    """x of every param, as the reference ``eval()`` would write it, without writing it."""
    out = []
    for group in optimizer.param_groups:
        b1 = group["momentum"] if "momentum" in group else group["betas"][0]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            x = p.detach().clone()
            if group["train_mode"] and "z" in state:
                x.lerp_(state["z"].to(p.device), 1 - 1 / b1)
            out.append(x)
    return out


def train(config, progress=None):
    from parity.training import torch_loop

    return torch_loop.run(config, make_optimizer, eval_params=eval_params, progress=progress)


if __name__ == "__main__":
    from parity.runners import _child

    _child.main(train)
