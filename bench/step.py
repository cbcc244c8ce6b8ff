"""Optimizer step time against the device's copy bandwidth, torch and JAX, one parameter set.

A Schedule-Free step is memory bound: AdamW reads y, g, z, v and writes y, z, v (28 B/param in
fp32), SGD reads y, g, z and writes y, z (20 B/param), and a train()/eval() switch reads y, z
and writes y (12 B/param). Each row's median step time is turned into the bandwidth of those
useful bytes and compared with a plain device copy of the parameters' bytes, measured in the
same run (a copy reads and writes the buffer: 2x its bytes).

Rows: torch ``copy_`` and a jitted JAX copy (the references); sf_torch AdamW and SGD with each
step implementation the device has (loop, foreach, and on CUDA fused, and "graph": the fused
step with ``capturable=True`` captured in a CUDA graph and replayed); the reference
``schedulefree.AdamWScheduleFree`` (foreach; fp32 sets only, its state follows the params'
dtype); sf_torch's train()/eval() switch; sf_optax.adamw, sf_optax.sgd (each also with
``pack_small_leaves``: leaves below 65536 elements share flat state slots) and
optax.contrib.schedule_free_adamw, jitted with the params and state donated; the "fori" rows
time FORI_STEPS steps inside one jitted ``lax.fori_loop`` (per step), the cost of the step in
a training loop that stays on the device, without JAX's per-call cost per array; "optax sgd
fori" (plain SGD: reads y and g, writes y) is what any optimizer pays per array there. JAX's
switch rows: ``eval_params`` (new x arrays), and "switch" (eval_params then train_params with
the params donated, per switch: x takes y's buffers, as torch's in-place switch).

Parameter sets: ``big`` (32 x 2048x4096 + 64 x 4096, fp32, 268.7M params), ``bf16`` (the same
shapes in bf16 with fp32 state), ``small`` (2000 x 64x64 + 4 x 1024x1024) and ``tiny`` (for CI).
``--scale`` shrinks the rows of big/bf16 for smaller machines.

Torch rows run first; their memory is released before JAX allocates any (JAX does not
preallocate here). Extra memory is what a step needs above params + grads + state: torch's
``max_memory_allocated`` after a reset (CUDA only), and XLA's compiled memory analysis for JAX
(scratch plus outputs that do not reuse a donated input).

Run: python -m bench.step --device cpu|cuda [--set big|bf16|small|tiny] [--repeats N]
[--json out.json]
"""

from __future__ import annotations

import os

# Must happen before jax is imported: JAX would otherwise take most of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402

import sf_torch  # noqa: E402
from bench.timing import (  # noqa: E402
    ROW_SECONDS,
    capped_samples,
    format_mb,
    jax_extra_bytes,
    release,
    run_rows,
    skipped_lines,
    time_jax_steps,
)

LR_ADAMW = 1e-3
LR_SGD = 0.1
WEIGHT_DECAY = 0.01
PACK_SMALL_LEAVES = 2**16  # the "packed" sf_optax rows: leaves below this share state slots
FORI_STEPS = 20  # steps per call of the "fori" rows (a jitted lax.fori_loop of steps)

# ---------------------------------------------------------------------------------------------
# Parameter sets


@dataclass(frozen=True)
class ParamSet:
    """Shapes, the params' dtype and the state's dtype (torch names: 'float32', 'bfloat16')."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    param_dtype: str
    state_dtype: str

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


SET_NAMES = ("big", "bf16", "big-matrices", "big-vectors", "small", "tiny")


def param_set(name: str, scale: float = 1.0) -> ParamSet:
    """The named set; ``scale`` multiplies the rows of big/bf16's matrices (and vectors)."""
    if name in ("big", "bf16"):
        rows = max(1, round(2048 * scale))
        shapes = ((rows, 4096),) * 32 + ((max(1, round(4096 * scale)),),) * 64
        dtype = "float32" if name == "big" else "bfloat16"
        return ParamSet(name, shapes, dtype, "float32")
    if name in ("big-matrices", "big-vectors"):
        # big's two halves alone: where the JAX step loses bandwidth (one fusion per tensor).
        big = param_set("big", scale)
        shapes = tuple(sh for sh in big.shapes if (len(sh) == 2) == (name == "big-matrices"))
        return ParamSet(name, shapes, "float32", "float32")
    if name == "small":
        return ParamSet(name, ((64, 64),) * 2000 + ((1024, 1024),) * 4, "float32", "float32")
    if name == "tiny":
        shapes = ((64, 128), (128,), (32, 32), (32,), (3, 5, 7))
        return ParamSet(name, shapes, "float32", "float32")
    raise ValueError(f"unknown parameter set {name!r}: use one of {', '.join(SET_NAMES)}")


def useful_bytes(kind: str, ps: ParamSet) -> int:
    """Bytes a step must move, from the element sizes (grads have the params' dtype).

    adamw: reads y, g, z, v; writes y, z, v. sgd: reads y, g, z; writes y, z.
    switch: one eval() or train(): reads y, z; writes y. copy: reads and writes the params' bytes.
    """
    p, s = getattr(torch, ps.param_dtype).itemsize, getattr(torch, ps.state_dtype).itemsize
    per_param = {
        "adamw": 3 * p + 4 * s,
        "sgd": 3 * p + 2 * s,
        "switch": 2 * p + s,
        "copy": 2 * p,
    }[kind]
    return per_param * ps.n_params


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    name: str
    framework: str
    kind: str  # adamw | sgd | switch | copy | floor (dispatch alone: no bytes)
    median_s: float
    times_s: list[float]
    bytes: int
    bandwidth: float = 0.0  # bytes / s
    copy_share: float = 0.0
    extra_mem_bytes: int | None = None
    # JAX rows: arrays crossing the jit boundary per call (in + out) and kernels the compiled
    # step launches (fusions, library calls, copies of its entry computation): where a jitted
    # step spends host and device time beyond the bytes it moves.
    arrays: int | None = None
    kernels: int | None = None


# HLO instructions that launch work on the device (a fusion is one kernel however many ops it
# holds; fused computations hold no fusions, so the whole module can be counted).
_LAUNCHING = (" fusion(", " custom-call(", " copy-start(", " all-reduce(")


def hlo_kernels(hlo_text: str) -> int:
    """Kernels of a compiled step: its fusions, library calls and collectives, wherever XLA
    placed them (the entry computation, or a command buffer on the GPU)."""
    return sum(any(op in line for op in _LAUNCHING) for line in hlo_text.splitlines())


def _kind_of(name: str) -> str:
    for kind in ("copy", "switch", "sgd", "floor"):
        if kind in name.split(" "):
            return kind
    return "adamw"


def _per_call(row: Row, calls: int) -> Row:
    """``row`` whose timed function made ``calls`` steps (a switch pair, a fori loop)."""
    row.median_s /= calls
    row.times_s = [t / calls for t in row.times_s]
    return row


# ---------------------------------------------------------------------------------------------
# torch


def torch_tensors(ps: ParamSet, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Params (leaf tensors) with gradients set, both from a fixed seed."""
    # Drawn on the device: drawing 2 x 268M numbers on the host would dominate a GPU run.
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, ps.param_dtype)
    params = []
    for shape in ps.shapes:
        p = (0.02 * torch.randn(shape, generator=gen, device=device)).to(dtype)
        p.grad = (1e-3 * torch.randn(shape, generator=gen, device=device)).to(dtype)
        params.append(p)
    return params


def torch_optimizer(name: str, params, ps: ParamSet) -> torch.optim.Optimizer:
    """The optimizer of a torch row, by row name (hyperparameters shared by every row)."""
    state_dtype = getattr(torch, ps.state_dtype)
    if state_dtype == params[0].dtype:
        state_dtype = None
    package, kind, impl = name.split(" ")
    if package == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(
            params, lr=LR_ADAMW, weight_decay=WEIGHT_DECAY, foreach=True
        )
    # fused=False: with fused=None sf_torch would pick its fused kernel for CUDA params
    flags = {
        "loop": dict(foreach=False, fused=False),
        "foreach": dict(foreach=True, fused=False),
        "fused": dict(fused=True),
        "graph": dict(fused=True, capturable=True),
    }[impl]
    if kind == "adamw":
        return sf_torch.AdamWScheduleFree(
            params, lr=LR_ADAMW, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype, **flags
        )
    return sf_torch.SGDScheduleFree(
        params, lr=LR_SGD, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype, **flags
    )


def torch_row_names(ps: ParamSet, device: str) -> list[str]:
    impls = ["loop", "foreach"] + (["fused", "graph"] if device == "cuda" else [])
    names = ["torch copy"]
    names += [f"sf_torch adamw {i}" for i in impls]
    names += [f"sf_torch sgd {i}" for i in impls]
    if ps.param_dtype == ps.state_dtype:
        names.append("schedulefree adamw foreach")
    names += [f"sf_torch switch {i}" for i in impls if i not in ("loop", "graph")]
    return names


JAX_ROW_NAMES = [
    "jax copy",
    "sf_optax adamw jit",
    "sf_optax sgd jit",
    "sf_optax adamw packed jit",
    "sf_optax sgd packed jit",
    "sf_optax adamw fori",
    "sf_optax adamw packed fori",
    "sf_optax sgd packed fori",
    "optax sgd fori",
    "optax adamw jit",
    "optax sgd momentum jit",
    "optax.contrib adamw jit",
    "sf_optax eval_params jit",
    "sf_optax switch jit",
    "sf_optax switch packed jit",
    "jax dispatch floor",
]


def _time_torch(fn, device: str, inner: int) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls: CUDA events on cuda, else a clock."""
    if device == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def captured_step(opt: torch.optim.Optimizer, warmup: int):
    """``opt.step()`` (capturable=True) captured in a CUDA graph after ``warmup`` steps on a
    side stream, as torch's docs do it; returns the graph's ``replay``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def _torch_row(name, ps, device, warmup, repeats, inner) -> Row:
    kind, calls = _kind_of(name), 1
    if kind == "copy":
        src = torch.randn(ps.n_params, device=device).to(getattr(torch, ps.param_dtype))
        dst = torch.empty_like(src)

        def fn():
            dst.copy_(src)

    else:
        params = torch_tensors(ps, device)
        opt = torch_optimizer(name.replace("switch", "adamw"), params, ps)
        opt.train()  # the reference classes start in eval mode
        fn = opt.step
        if kind == "switch":
            opt.step()  # creates z: a switch needs a state to switch with
            calls = 2

            def fn():
                opt.eval()
                opt.train()

        elif name.endswith(" graph"):
            fn = captured_step(opt, warmup)
    for _ in range(warmup):
        fn()
    extra = None
    if device == "cuda":  # the peak above what is allocated, in one more untimed call
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    times = capped_samples(lambda: _time_torch(fn, device, inner), repeats, inner)
    median, nbytes = statistics.median(times), useful_bytes(kind, ps)
    return _per_call(Row(name, "torch", kind, median, times, nbytes, extra_mem_bytes=extra), calls)


def run_torch(
    ps: ParamSet, device: str, warmup: int, repeats: int, inner: int, skipped: list, names=None
) -> list[Row]:
    return run_rows(
        names or torch_row_names(ps, device),
        lambda name: _torch_row(name, ps, device, warmup, repeats, inner),
        skipped,
        lambda: release(device),
    )


# ---------------------------------------------------------------------------------------------
# JAX


def jax_optimizer(name: str, ps: ParamSet):
    import jax.numpy as jnp
    import optax

    import sf_optax

    state_dtype = None if ps.state_dtype == ps.param_dtype else jnp.dtype(ps.state_dtype)
    pack = PACK_SMALL_LEAVES if "packed" in name.split(" ") else 0
    if name in ("sf_optax adamw jit", "sf_optax adamw packed jit"):
        return sf_optax.adamw(
            LR_ADAMW, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype, pack_small_leaves=pack
        )
    if name in ("sf_optax sgd jit", "sf_optax sgd packed jit"):
        return sf_optax.sgd(
            LR_SGD, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype, pack_small_leaves=pack
        )
    if name == "optax sgd jit":
        # Plain SGD without momentum (reads y, g; writes y): the least any optimizer does per
        # leaf, the yardstick for what JAX costs per array inside a loop.
        return optax.sgd(LR_SGD)
    if name == "optax adamw jit":
        # The optimizer users compare with: two state buffers per leaf, as Schedule-Free AdamW.
        return optax.adamw(LR_ADAMW, weight_decay=WEIGHT_DECAY)
    if name == "optax sgd momentum jit":
        return optax.sgd(LR_SGD, momentum=0.9)
    if name == "optax.contrib adamw jit":
        return optax.contrib.schedule_free_adamw(
            LR_ADAMW, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype
        )
    raise ValueError(f"no JAX optimizer named {name!r}")


def _jax_moved_bytes(params, state, grads) -> int:
    """Bytes a JAX step must move, from the buffers it really has: y read and written, g read,
    every per-parameter state buffer read and written. Peers may keep state in other dtypes
    than ours (optax.contrib keeps v in the params' dtype), so it is counted, not assumed."""
    import jax

    def nbytes(tree, per_param_only=False):
        leaves = jax.tree.leaves(tree)
        return sum(leaf.nbytes for leaf in leaves if not per_param_only or leaf.ndim > 0)

    return 2 * nbytes(params) + nbytes(grads) + 2 * nbytes(state, per_param_only=True)


def run_jax(
    ps: ParamSet,
    device: str,
    warmup: int,
    repeats: int,
    inner: int,
    skipped: list,
    names=None,
    hlo_dir: str | None = None,
) -> list[Row]:
    import jax
    import jax.numpy as jnp
    import optax

    import sf_optax

    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    dtype = jnp.dtype(ps.param_dtype)

    def tensors(opt_name="sf_optax adamw jit"):
        """Params, their optimizer state (``opt_name``'s) and grads, from fixed seeds."""
        keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(ps.shapes))

        def draw(key, shape, std):
            return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

        params = [draw(keys[2 * i], s, 0.02) for i, s in enumerate(ps.shapes)]
        grads = [draw(keys[2 * i + 1], s, 1e-3) for i, s in enumerate(ps.shapes)]
        return params, jax_optimizer(opt_name, ps).init(params), grads

    def timed(name, kind, fn, args, advance, nbytes, calls=1, compiled=None):
        """The row of ``fn(*args)``, ``advance`` as in ``time_jax_steps``; its extra memory is
        that of ``compiled`` (default: ``fn`` compiled for ``args``)."""
        compiled = compiled or fn.lower(*args).compile()
        median, times = time_jax_steps(fn, args, advance, warmup, repeats, inner)
        row = Row(name, "jax", kind, median, times, nbytes, 0, 0, jax_extra_bytes(compiled))
        return _per_call(row, calls)

    def opt_step_row(name):
        # "fori": FORI_STEPS steps in one jitted lax.fori_loop, as in a training loop that
        # stays on the device: the step's own cost, without the per-call cost of its arrays.
        fori = name.endswith(" fori")
        opt_name = name.removesuffix(" fori") + " jit" if fori else name
        opt = jax_optimizer(opt_name, ps)

        def step_fn(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        def loop_fn(params, state, grads):
            def body(_, carry):
                return step_fn(*carry, grads)

            return jax.lax.fori_loop(0, FORI_STEPS, body, (params, state))

        step = jax.jit(loop_fn if fori else step_fn, donate_argnums=(0, 1))
        args = tensors(opt_name)
        moved = _jax_moved_bytes(*args)
        compiled = step.lower(*args).compile()
        if hlo_dir:
            # The optimized HLO: one multi-output fusion per tensor is what a step should be.
            os.makedirs(hlo_dir, exist_ok=True)
            path = os.path.join(hlo_dir, f"{ps.name} {name}.hlo.txt".replace(" ", "_"))
            with open(path, "w") as f:
                f.write(compiled.as_text())
        result = timed(
            name,
            _kind_of(name),
            step,
            args,
            lambda a, out: (*out, a[2]),
            moved,
            calls=FORI_STEPS if fori else 1,
            compiled=compiled,
        )
        # params, state and grads in; params and state out
        result.arrays = len(jax.tree.leaves(args)) + len(jax.tree.leaves(args[:2]))
        result.kernels = None if fori else hlo_kernels(compiled.as_text())
        return result

    def row(name):
        if name == "jax copy":
            src = jax.random.normal(jax.random.PRNGKey(0), (ps.n_params,), jnp.float32)
            src = src.astype(dtype)
            # dst is donated: the copy's output reuses its memory, so each call moves the bytes
            # anew.
            copy = jax.jit(lambda dst, src: src.copy(), donate_argnums=0)
            args = (jnp.zeros_like(src), src)
            return timed(
                name, "copy", copy, args, lambda a, out: (out, a[1]), useful_bytes("copy", ps)
            )
        if name == "sf_optax eval_params jit":
            # JAX's train()/eval(): x = (y - (1 - b1) z) / b1 as new arrays (reads y, z; writes x).
            params, state, _ = tensors()
            view = jax.jit(lambda params, state: sf_optax.eval_params(state, params))
            args = (params, state)
            return timed(name, "switch", view, args, lambda a, out: a, useful_bytes("switch", ps))
        if name.startswith("sf_optax switch"):
            # JAX's in-place train()/eval(): params = eval_params(state, params) and back with
            # train_params, the params donated (x takes y's buffers, as torch's switch writes p).
            packed = "packed" in name.split(" ")
            params, state, _ = tensors(f"sf_optax adamw {'packed ' if packed else ''}jit")
            to_x = jax.jit(lambda state, y: sf_optax.eval_params(state, y), donate_argnums=1)
            to_y = jax.jit(lambda state, x: sf_optax.train_params(state, x), donate_argnums=1)
            return timed(
                name,
                "switch",
                lambda state, params: to_y(state, to_x(state, params)),
                (state, params),
                lambda a, out: (a[0], out),
                useful_bytes("switch", ps),
                calls=2,
                compiled=to_x.lower(state, params).compile(),
            )
        if name == "jax dispatch floor":
            # The same buffers as sf_optax's AdamW step in and out of a jitted call that does no
            # arithmetic (the donated params and state come back as they are): what JAX's
            # dispatch alone costs per step for this many arrays, whatever the optimizer computes.
            floor = jax.jit(lambda params, state, grads: (params, state), donate_argnums=(0, 1))
            return timed(name, "floor", floor, tensors(), lambda a, out: (*out, a[2]), 0)
        return opt_step_row(name)

    with jax.default_device(dev):
        return run_rows(names or JAX_ROW_NAMES, row, skipped, lambda: release(device))


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_bw(bw: float, device: str) -> str:
    return f"{bw / 1e12:.3f} TB/s" if device == "cuda" else f"{bw / 1e9:.2f} GB/s"


def format_table(result: dict) -> str:
    device = result["device"]
    lines = [
        f"set={result['set']} params={result['n_params']:,} tensors={result['n_tensors']} "
        f"{result['param_dtype']} params, {result['state_dtype']} state, device={device} "
        f"({result['device_name']}), copy reference={_fmt_bw(result['copy_bandwidth'], device)}",
        f"{'row':<28} {'median ms':>10} {'MB/step':>10} {'bandwidth':>13} {'% copy':>7} "
        f"{'extra MB':>9} {'arrays':>7} {'kernels':>7}",
    ]
    for r in result["rows"]:
        extra = format_mb(r["extra_mem_bytes"])
        arrays, kernels = (
            "" if r.get(key) is None else str(r[key]) for key in ("arrays", "kernels")
        )
        lines.append(
            f"{r['name']:<28} {r['median_s'] * 1e3:>10.3f} {r['bytes'] / 1e6:>10.1f} "
            f"{_fmt_bw(r['bandwidth'], device):>13} {100 * r['copy_share']:>6.1f}% {extra:>9} "
            f"{arrays:>7} {kernels:>7}"
        )
    lines += skipped_lines(result["skipped"], 28)
    return "\n".join(lines)


def select_rows(names: list[str], patterns: str | None) -> list[str]:
    """The rows whose name contains one of the comma-separated ``patterns`` (all without any),
    always with the copy rows (every share is measured against them)."""
    if not patterns:
        return list(names)
    wanted = [w.strip() for w in patterns.split(",") if w.strip()]
    return [n for n in names if _kind_of(n) == "copy" or any(w in n for w in wanted)]


def run(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA build of torch and a visible GPU")
    if args.set in ("big", "bf16") and args.device == "cpu" and args.scale >= 1.0:
        print("note: the full big/bf16 sets are meant for a GPU; pass --scale to shrink them")
    ps = param_set(args.set, args.scale)
    repeats = args.repeats or (20 if args.device == "cuda" else 5)
    # 50 steps per sample on CUDA: the first call of a sample waits for the host (JAX's dispatch
    # of hundreds of buffers takes ~1 ms), which 10 steps would not amortise.
    inner = args.inner or (50 if args.device == "cuda" else 1)
    skipped: list = []
    torch_names = select_rows(torch_row_names(ps, args.device), args.rows)
    rows = run_torch(ps, args.device, args.warmup, repeats, inner, skipped, names=torch_names)
    jax_names = select_rows(JAX_ROW_NAMES, args.rows)
    if not args.no_jax and any(_kind_of(n) != "copy" for n in jax_names):
        rows += run_jax(
            ps, args.device, args.warmup, repeats, inner, skipped, names=jax_names, hlo_dir=args.hlo
        )
    if ps.name == "small":
        # The same bytes in one tensor: what the step would cost without per-tensor overhead.
        one = ParamSet("small as one tensor", ((ps.n_params,),), ps.param_dtype, ps.state_dtype)
        impls = ["fused", "graph"] if args.device == "cuda" else ["foreach"]
        timing = (args.device, args.warmup, repeats, inner, skipped)
        flat = run_torch(one, *timing, names=[f"sf_torch adamw {impl}" for impl in impls])
        if not args.no_jax:
            flat += run_jax(one, *timing, names=["sf_optax adamw jit", "sf_optax adamw fori"])
        for r in flat:
            r.name += " [1 tensor]"
        rows += flat
    for r in rows:
        r.bandwidth = r.bytes / r.median_s
    # One denominator for every row: the faster of the copies measured in this run.
    copies = [r.bandwidth for r in rows if r.kind == "copy"]
    copy_bw = max(copies) if copies else float("nan")
    for r in rows:
        r.copy_share = r.bandwidth / copy_bw
    return {
        "set": ps.name,
        "scale": args.scale,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "n_params": ps.n_params,
        "n_tensors": len(ps.shapes),
        "param_dtype": ps.param_dtype,
        "state_dtype": ps.state_dtype,
        "repeats": repeats,
        "steps_per_repeat": inner,
        "warmup": args.warmup,
        "copy_bandwidth": copy_bw,
        "torch_version": torch.__version__,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--set", choices=SET_NAMES, default="tiny")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the rows of big/bf16 (e.g. 0.25)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed samples per row (20 on cuda, 5 on cpu; fewer where they would take more "
        f"than {ROW_SECONDS:.0f} s)",
    )
    parser.add_argument(
        "--inner", type=int, default=None, help="steps per timed sample (50 on cuda, 1 on cpu)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--no-jax", action="store_true", help="torch rows only")
    parser.add_argument(
        "--rows",
        default=None,
        help="only the rows whose name contains one of these comma-separated words "
        "(e.g. 'fused,sf_optax'; the copy rows always run)",
    )
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument(
        "--hlo", default=None, help="write each JAX step's optimized HLO into this folder"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not args.scale > 0:
        parser.error("--scale must be > 0")
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
