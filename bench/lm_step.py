"""One full LM training step with Schedule-Free AdamW against plain AdamW, torch and JAX.

The cost Schedule-Free adds to training is measured where users pay it: one full step of a
GPT-style causal Transformer LM (forward, backward, optimizer step, zero_grad), not the optimizer
alone. The LM is the parity twin of ``parity.models`` (pre-norm blocks, q/k/v/out projections,
exact GELU) with its options ``tied`` (the output head is the embedding) and
``fused_attention`` (``F.scaled_dot_product_attention`` / ``jax.nn.dot_product_attention``).
Both twins start from ``canonical.init_params`` and see the same batch, so their losses agree
step by step (a check that each timed step really trains).

Rows, per framework, same lr, betas, eps and weight decay:

- torch: ``torch.optim.AdamW`` (fused on CUDA, foreach otherwise) and
  ``sf_torch.AdamWScheduleFree`` (its fused Triton step is picked on CUDA, foreach otherwise).
- JAX: ``optax.adamw`` and ``sf_optax.adamw``, one jitted step with params and state donated,
  the model in Flax (``nnx``) with float32 params.

Per row: median step time and its interquartile range over ``--steps`` timed steps (each step
synchronised: ``torch.cuda.synchronize`` / ``jax.block_until_ready``) after ``--warmup`` steps;
then the pipelined step: ``--steps`` more steps dispatched back to back in blocks of
``PIPELINE_BLOCK``, one synchronisation per block (median over the blocks, per step), as a
training loop that does not wait for each loss runs. The synchronised step adds the host's
dispatch of every step to its device time (on a slow host, milliseconds per call for JAX's
hundreds of arrays, and they vary from call to call); the pipelined step hides it behind the
device's work, so it is the device cost of a step that the two optimizers are compared on first;
the optimizer-only time (the same optimizer stepping on one fixed set of gradients) and its share
of the full step; for Schedule-Free rows the time of one switch to the evaluation weights and
back (torch: ``optimizer.eval(); optimizer.train()``; JAX: ``sf_optax.eval_params``, which builds
``x`` without touching ``y``). The ratio Schedule-Free / AdamW is given per framework.

Memory: ``extra`` is what a step needs above params + grads + optimizer state + the batch:
torch: ``max_memory_allocated`` during one step after a reset (CUDA only), minus those bytes;
JAX: the compiled step's memory analysis (arguments + temporaries + outputs that do not reuse a
donated input), minus the same bytes (grads live inside the jitted step). Activations dominate
both; the difference between the two rows of a framework is what Schedule-Free adds.
``opt extra`` is the same for the optimizer step alone (above params + grads + state): 0 means no
parameter-sized temporaries.

``--dtype bfloat16`` is mixed precision with float32 params, grads and state: torch autocast to
bfloat16, the Flax layers with ``compute_dtype=bfloat16``; the loss is taken in float32. On CUDA,
float32 matmuls use TF32 in both frameworks unless ``--matmul fp32``.

Run: python -m bench.lm_step --device cpu|cuda --size tiny|small|gpt2-small|gpt2-medium
[--dtype float32|bfloat16] [--framework torch|jax|both] [--steps N] [--warmup N] [--json out.json]
"""

from __future__ import annotations

import os

# Must happen before jax is imported: JAX would otherwise take most of the GPU up front, and the
# torch rows run first in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sf_torch  # noqa: E402
from bench.timing import (  # noqa: E402
    format_mb,
    jax_extra_bytes,
    release,
    run_rows,
    skipped_lines,
    time_blocks,
)
from parity.models import canonical, torch_models  # noqa: E402

LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.1
PIPELINE_BLOCK = 4  # steps per synchronisation in the pipelined timing
TORCH_ROWS = ("torch.optim adamw", "sf_torch adamw")
JAX_ROWS = ("optax adamw", "sf_optax adamw")

# canonical.lm_sizes' sizes (the MLP is 4 x width) and the batch: sequences of `seq` tokens.
SIZES = {
    "tiny": dict(vocab=256, width=64, layers=2, heads=4, seq=32, batch=4),
    "small": dict(vocab=8192, width=512, layers=8, heads=8, seq=512, batch=8),
    "gpt2-small": dict(vocab=50304, width=768, layers=12, heads=12, seq=1024, batch=8),
    "gpt2-medium": dict(vocab=50304, width=1024, layers=24, heads=16, seq=1024, batch=8),
}


def lm_config(size: str, batch: int | None = None, seq_len: int | None = None):
    """``(lm, batch)``: the named size's LM (``canonical.lm_sizes``, tied, fused attention)
    and its batch size, the batch size and context length optionally replaced."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    lm = dict(SIZES[size], seq=seq_len or SIZES[size]["seq"], tied=True, fused_attention=True)
    default_batch = lm.pop("batch")
    return canonical.lm_sizes(lm | {"mlp": 4 * lm["width"]}), batch or default_batch


def make_batch(lm: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens: inputs (B, T) and next-token labels (B, T), int32."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, lm["vocab"], size=(batch, lm["seq"] + 1), dtype=np.int32)
    return tokens[:, :-1].copy(), tokens[:, 1:].copy()


@dataclass
class Row:
    """One optimizer's full-step timing, optimizer-only timing, switch timing and bytes."""

    name: str
    framework: str
    schedule_free: bool
    impl: str
    median_s: float  # the synchronised steps: median and quartiles
    q25_s: float
    q75_s: float
    times_s: list[float]
    pipelined_s: float  # median per step of the back-to-back blocks
    pipelined_times_s: list[float]  # per step, one per block
    opt_median_s: float
    opt_share: float  # optimizer-only time / full step time
    switch_s: float | None  # one eval()+train() pair (torch) or one eval_params (JAX)
    losses: list[float]  # every full step's loss, warmup included; losses[0] is at the init
    full_steps: int
    n_params: int
    param_bytes: int  # the grads' bytes too
    state_bytes: int
    batch_bytes: int
    peak_bytes: int | None = None
    extra_bytes: int | None = None  # peak - (params + grads + state + batch)
    opt_extra_bytes: int | None = None  # optimizer step alone, above params + grads + state


def _row(times, piped, opt_times, losses, **fields) -> Row:
    """A :class:`Row` from the synchronised ``times``, the pipelined ``piped``, the
    optimizer-alone ``opt_times`` and the ``losses``; ``fields`` are the rest."""
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else []
    q25, median, q75 = quartiles or times * 3
    opt_median = statistics.median(opt_times)
    return Row(
        median_s=median,
        q25_s=q25,
        q75_s=q75,
        times_s=times,
        pipelined_s=statistics.median(piped),
        pipelined_times_s=piped,
        opt_median_s=opt_median,
        opt_share=opt_median / median,
        losses=[float(v) for v in losses],
        full_steps=len(losses),
        **fields,
    )


# ---------------------------------------------------------------------------------------------
# torch


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_optimizer(name: str, params, device: str) -> torch.optim.Optimizer:
    """The optimizer of a torch row; every row shares lr, betas, eps and weight decay."""
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if name == "torch.optim adamw":
        impl = dict(fused=True) if device == "cuda" else dict(foreach=True)
        return torch.optim.AdamW(params, **hyper, **impl)
    if name == "sf_torch adamw":
        # fused=None: sf_torch picks its fused kernel when every param is on CUDA; on the CPU
        # both rows run torch's multi-tensor ops, so that the two steps are built alike.
        impl = {} if device == "cuda" else dict(foreach=True)
        return sf_torch.AdamWScheduleFree(params, **hyper, **impl)
    raise ValueError(f"torch row must be one of {TORCH_ROWS}, got {name!r}")


def _torch_impl(opt: torch.optim.Optimizer) -> str:
    """The step implementation the optimizer runs (call while grads are set)."""
    group = opt.param_groups[0]
    if isinstance(opt, sf_torch.ScheduleFreeOptimizer):
        from sf_torch.dispatch import choose_impl

        params = [p for p in group["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        grads = [p.grad for p in params]
        return choose_impl(params, grads, states, group["foreach"], group["fused"])
    return "fused" if group.get("fused") else "foreach"


def torch_row(name, lm, init, batch, device, dtype, warmup, steps, capture=None) -> Row:
    """Time one torch row; ``capture`` (optional) receives the params after the full steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):
        model = torch_models.build("lm", init, lm=lm)
    opt = torch_optimizer(name, model.parameters(), device)
    schedule_free = isinstance(opt, sf_torch.ScheduleFreeOptimizer)
    inputs, labels = (torch_models.inputs_to_torch(a, device) for a in batch)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    losses = []

    def backward():
        with amp:
            logits = model(inputs)
        loss = torch_models.loss(logits, labels)
        loss.backward()
        return loss.detach()

    def full_step():
        losses.append(backward())
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        full_step()
    sync()
    param_bytes, batch_bytes = _nbytes(model.parameters()), _nbytes([inputs, labels])

    def state_bytes():
        return _nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    peak = extra = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        full_step()
        sync()
        peak = torch.cuda.max_memory_allocated()
        extra = peak - (2 * param_bytes + state_bytes() + batch_bytes)
    times = time_blocks(full_step, sync, steps, 1)
    piped = time_blocks(full_step, sync, steps, PIPELINE_BLOCK)
    if capture is not None:
        capture["params"] = torch_models.to_canonical("lm", model, lm=lm)
        if schedule_free:
            capture["x"] = torch_models.to_canonical("lm", model, opt.eval_params(), lm=lm)

    # The optimizer alone, stepping again and again on one set of gradients.
    backward()
    impl = _torch_impl(opt)
    sync()
    opt_extra = None
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        sync()
        opt_extra = torch.cuda.max_memory_allocated() - base
    opt_times = time_blocks(opt.step, sync, steps, 1)
    opt.zero_grad(set_to_none=True)

    switch = None
    if schedule_free:

        def round_trip():
            opt.eval()
            opt.train()

        switch = statistics.median(time_blocks(round_trip, sync, max(3, steps), 1))

    return _row(
        times,
        piped,
        opt_times,
        losses,
        name=name,
        framework="torch",
        schedule_free=schedule_free,
        impl=impl,
        switch_s=switch,
        n_params=sum(p.numel() for p in model.parameters()),
        param_bytes=param_bytes,
        state_bytes=state_bytes(),
        batch_bytes=batch_bytes,
        peak_bytes=peak,
        extra_bytes=extra,
        opt_extra_bytes=opt_extra,
    )


# ---------------------------------------------------------------------------------------------
# JAX


def jax_optimizer(name: str):
    """The optax transformation of a JAX row (the torch rows' hyperparameters)."""
    import optax

    import sf_optax

    b1, b2 = BETAS
    hyper = dict(b1=b1, b2=b2, eps=EPS, weight_decay=WEIGHT_DECAY)
    if name == "optax adamw":
        return optax.adamw(LR, **hyper)
    if name == "sf_optax adamw":
        return sf_optax.adamw(LR, **hyper)
    raise ValueError(f"JAX row must be one of {JAX_ROWS}, got {name!r}")


def jax_row(name, lm, init, batch, device, dtype, warmup, steps, capture=None) -> Row:
    """Time one JAX row; ``capture`` (optional) receives the params after the full steps."""
    import jax
    import jax.numpy as jnp
    import optax

    import sf_optax
    from parity.models import flax_models

    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    compute = jnp.bfloat16 if dtype == "bfloat16" else None
    with jax.default_device(dev):
        graph, params, rest = flax_models.split(
            flax_models.build("lm", init, lm=lm, compute_dtype=compute)
        )
    opt = jax_optimizer(name)
    schedule_free = name.startswith("sf_optax")
    state = opt.init(params)
    inputs, labels = jax.device_put(batch, dev)

    def loss_fn(params, inputs, labels):
        return flax_models.loss(flax_models.merge(graph, params, rest)(inputs), labels)

    def train_step(params, state, inputs, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    def opt_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, inputs, labels)
    step = step.compile()

    def nbytes(tree):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

    param_bytes, state_bytes, batch_bytes = nbytes(params), nbytes(state), inputs.nbytes * 2
    peak = jax_extra_bytes(step, with_arguments=True)
    extra = None if peak is None else peak - (2 * param_bytes + state_bytes + batch_bytes)

    losses, carry = [], [params, state]

    def full_step():
        carry[0], carry[1], loss = step(carry[0], carry[1], inputs, labels)
        losses.append(loss)

    def sync():
        jax.block_until_ready(carry)

    for _ in range(warmup):
        full_step()
    sync()
    times = time_blocks(full_step, sync, steps, 1)
    piped = time_blocks(full_step, sync, steps, PIPELINE_BLOCK)
    if capture is not None:
        capture["params"] = {n: np.asarray(v, np.float32) for n, v in carry[0].items()}
        if schedule_free:
            x = sf_optax.eval_params(carry[1], carry[0])
            capture["x"] = {n: np.asarray(v, np.float32) for n, v in x.items()}

    # The optimizer alone, stepping again and again on one set of gradients. Its cost does not
    # depend on their values (elementwise, no data-dependent branch), so gradient-sized arrays
    # made from the params do, and spare compiling the backward pass a second time.
    grads = jax.jit(lambda p: jax.tree.map(lambda a: 1e-3 * a, p))(carry[0])
    update = jax.jit(opt_step, donate_argnums=(0, 1)).lower(*carry, grads).compile()
    opt_footprint = jax_extra_bytes(update, with_arguments=True)
    opt_extra = None if opt_footprint is None else opt_footprint - (2 * param_bytes + state_bytes)

    def opt_only():
        carry[0], carry[1] = update(carry[0], carry[1], grads)

    opt_only()  # the first call is not timed
    sync()
    opt_times = time_blocks(opt_only, sync, steps, 1)

    switch = None
    if schedule_free:
        to_x = jax.jit(sf_optax.eval_params).lower(carry[1], carry[0]).compile()
        jax.block_until_ready(to_x(carry[1], carry[0]))

        def eval_view():
            jax.block_until_ready(to_x(carry[1], carry[0]))

        switch = statistics.median(time_blocks(eval_view, lambda: None, max(3, steps), 1))

    return _row(
        times,
        piped,
        opt_times,
        losses,
        name=name,
        framework="jax",
        schedule_free=schedule_free,
        impl="jit, donated",
        switch_s=switch,
        n_params=sum(leaf.size for leaf in jax.tree.leaves(carry[0])),
        param_bytes=param_bytes,
        state_bytes=state_bytes,
        batch_bytes=batch_bytes,
        peak_bytes=peak,
        extra_bytes=extra,
        opt_extra_bytes=opt_extra,
    )


# ---------------------------------------------------------------------------------------------
# Runs


@contextlib.contextmanager
def _matmul_precision(device: str, dtype: str, matmul: str, with_jax: bool):
    """TF32 float32 matmuls on CUDA (``matmul='tf32'``) in both frameworks, restored after."""
    if device != "cuda" or dtype != "float32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if matmul == "tf32" else "highest")
    try:
        with contextlib.ExitStack() as stack:
            if with_jax:
                import jax

                precision = "tensorfloat32" if matmul == "tf32" else "highest"
                stack.enter_context(jax.default_matmul_precision(precision))
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def _ratios(rows: list[Row]) -> dict:
    """Schedule-Free / AdamW per framework: full step, optimizer alone, extra memory."""
    out = {}
    for fw in ("torch", "jax"):
        by_kind = {r.schedule_free: r for r in rows if r.framework == fw}
        if set(by_kind) != {False, True}:
            continue
        plain, sf = by_kind[False], by_kind[True]
        out[fw] = {
            "step": sf.median_s / plain.median_s,
            "step_added_s": sf.median_s - plain.median_s,
            "step_pipelined": sf.pipelined_s / plain.pipelined_s,
            "step_pipelined_added_s": sf.pipelined_s - plain.pipelined_s,
            "optimizer": sf.opt_median_s / plain.opt_median_s,
            "extra_bytes_added": (
                None
                if sf.extra_bytes is None or plain.extra_bytes is None
                else sf.extra_bytes - plain.extra_bytes
            ),
        }
    return out


def run(args: argparse.Namespace, capture: dict | None = None) -> dict:
    """Every requested row; ``capture`` (optional) gets ``{row name: {"params", "x"}}``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a CUDA build of torch and a visible GPU; use 'cpu'")
    for name in ("steps", "warmup"):
        value, low = getattr(args, name), 1 if name == "steps" else 0
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    lm, batch_size = lm_config(args.size, args.batch, args.seq_len)
    init = canonical.cast(canonical.init_params("lm", args.seed, lm), np.float32)
    batch = make_batch(lm, batch_size, args.seed)
    names = (TORCH_ROWS if args.framework != "jax" else ()) + (
        JAX_ROWS if args.framework != "torch" else ()
    )

    def row(name):
        row_fn = torch_row if name in TORCH_ROWS else jax_row
        slot = None if capture is None else capture.setdefault(name, {})
        return row_fn(name, lm, init, batch, args.device, args.dtype, args.warmup, args.steps, slot)

    skipped = []
    with _matmul_precision(args.device, args.dtype, args.matmul, args.framework != "torch"):
        rows = run_rows(names, row, skipped, lambda: release(args.device))
    versions = {"torch": torch.__version__}
    if args.framework != "torch":
        import flax
        import jax
        import optax

        versions |= {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__}
    return {
        "config": {"name": args.size, "batch": batch_size, **lm},
        "n_params": sum(math.prod(s) for s in canonical.param_shapes("lm", lm).values()),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "matmul": args.matmul if args.device == "cuda" and args.dtype == "float32" else "default",
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": args.seed,
        "hyperparameters": {
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WEIGHT_DECAY,
        },
        "versions": versions,
        "rows": [asdict(r) for r in rows],
        "ratios": _ratios(rows),
        "skipped": skipped,
    }


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"LM {cfg['name']}: {result['n_params']:,} params, d={cfg['width']} "
        f"layers={cfg['layers']} heads={cfg['heads']} vocab={cfg['vocab']}, batch "
        f"{cfg['batch']}x{cfg['seq']} tokens, {result['dtype']} "
        f"(matmul {result['matmul']}), device={result['device']} ({result['device_name']}), "
        f"{result['steps']} timed steps after {result['warmup']}",
        f"{'row':<18} {'impl':<13} {'piped ms':>9} {'step ms':>9} {'IQR ms':>8} {'opt ms':>8} "
        f"{'opt %':>6} {'switch ms':>9} {'extra MB':>9} {'opt+MB':>7} {'loss first->last':>17}",
    ]
    for r in result["rows"]:
        switch = "-" if r["switch_s"] is None else f"{r['switch_s'] * 1e3:.3f}"
        lines.append(
            f"{r['name']:<18} {r['impl']:<13} {r['pipelined_s'] * 1e3:>9.3f} "
            f"{r['median_s'] * 1e3:>9.3f} {(r['q75_s'] - r['q25_s']) * 1e3:>8.3f} "
            f"{r['opt_median_s'] * 1e3:>8.3f} {100 * r['opt_share']:>5.1f}% {switch:>9} "
            f"{format_mb(r['extra_bytes']):>9} {format_mb(r['opt_extra_bytes']):>7} "
            f"{r['losses'][0]:>8.4f}->{r['losses'][-1]:.4f}"
        )
    for fw, q in result["ratios"].items():
        added = q["extra_bytes_added"]
        added = "n/a" if added is None else f"{added / 1e6:+.1f} MB"
        lines.append(
            f"{fw}: Schedule-Free / AdamW full step, pipelined {q['step_pipelined']:.4f} "
            f"({100 * (q['step_pipelined'] - 1):+.2f}%, "
            f"{q['step_pipelined_added_s'] * 1e3:+.3f} ms), synchronised {q['step']:.4f} "
            f"({100 * (q['step'] - 1):+.2f}%, {q['step_added_s'] * 1e3:+.3f} ms), "
            f"optimizer alone {q['optimizer']:.3f}x, extra memory {added}"
        )
    lines += skipped_lines(result["skipped"], 18)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lm_step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--framework", choices=("torch", "jax", "both"), default="both")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per row (20 on cuda, 5 on cpu)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (5 on cuda, 2 on cpu)"
    )
    parser.add_argument("--batch", type=int, default=None, help="override the size's batch")
    parser.add_argument("--seq-len", type=int, default=None, help="override the context length")
    parser.add_argument(
        "--matmul",
        choices=("tf32", "fp32"),
        default="tf32",
        help="float32 matmuls on CUDA: TF32 (both frameworks) or full fp32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.device == "cuda" else 5
    if args.warmup is None:
        args.warmup = 5 if args.device == "cuda" else 2
    for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("seq_len", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    return args


def main(argv: list[str] | None = None, capture: dict | None = None) -> dict:
    args = parse_args(argv)
    result = run(args, capture)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
