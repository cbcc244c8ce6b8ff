"""Check your own port: a torch model, its flax.nnx twin, and ``parity.check``.

    python -m examples.own_port.my_port                   # divergence, then 100 steps, float64
    python -m examples.own_port.my_port --flax-eps 1e-6   # flax's default LayerNorm epsilon:
                                                          # the divergence finder names 'norm'
    python -m parity check examples.own_port.my_port:pair --steps 100 --divergence

``pair()`` is the whole description of the port (a ``parity.own.Pair``): the two models, a loss
for each, and the batches (dicts of numpy arrays, the same for both). The weights need no
mapping by hand: ``parity.own.mapping`` pairs ``fc1.weight`` with ``fc1.kernel`` (transposed),
``norm.weight`` with ``norm.scale`` and so on, and copies torch's initial weights into the Flax
model. The exit code is ``parity.check``'s: 0 agreed, 1 a tolerance exceeded, 2 a failure.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def pair(dtype: str = "float64", flax_eps: float = 1e-5):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from parity.own import Pair

    torch.set_num_threads(1)  # torch and JAX share this process: keep torch off JAX's cores

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm = torch.nn.Linear(10, 32), torch.nn.LayerNorm(32)  # eps 1e-5
            self.fc2 = torch.nn.Linear(32, 3)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))

    class FlaxNet(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.fc1 = nnx.Linear(10, 32, rngs=rngs)
            self.norm = nnx.LayerNorm(32, epsilon=flax_eps, rngs=rngs)  # nnx's default: 1e-6
            self.fc2 = nnx.Linear(32, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.gelu(self.norm(self.fc1(x)), approximate=False))

    def torch_loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    def flax_loss(model, batch):
        logp = jax.nn.log_softmax(model(batch["x"]))
        return -jnp.take_along_axis(logp, batch["y"][:, None], axis=1).mean()

    rng = np.random.default_rng(0)

    def batches(n):
        return [{"x": rng.normal(size=(16, 10)), "y": rng.integers(0, 3, 16)} for _ in range(n)]

    torch.manual_seed(0)
    return Pair(
        torch_model=TorchNet().to(getattr(torch, dtype)),
        flax_model=FlaxNet(nnx.Rngs(0)),
        torch_loss=torch_loss,
        flax_loss=flax_loss,
        batches=batches(8),
        eval_batches=batches(2),
        name=f"my port ({dtype})",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--steps", type=int, default=100, help="training steps, >= 1")
    p.add_argument("--flax-eps", type=float, default=1e-5, help="the Flax LayerNorm's epsilon")
    p.add_argument("--out", default=None, help="a folder for report.json and report.png")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not args.flax_eps > 0:
        p.error(f"--flax-eps must be > 0, got {args.flax_eps}")

    import jax

    import parity
    from parity.own import divergence

    with jax.enable_x64(args.dtype == "float64"):
        mine = pair(args.dtype, args.flax_eps)
        # 1. one batch through both, layer by layer: where does the port part?
        found = divergence.find_pair(mine, dtype=args.dtype)
        print(found)
        if found.first is not None:
            return 1
    # 2. the optimizer's trajectories on the pair: sf_torch, sf_optax and the reference rows
    result = parity.check(
        mine.torch_model,
        mine.flax_model,
        mine.torch_loss,
        mine.flax_loss,
        mine.batches,
        eval_batches=mine.eval_batches,
        name=mine.name,
        steps=args.steps,
        dtype=args.dtype,
        out=args.out,
    )
    print(result.table())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
