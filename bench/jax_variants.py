"""Schedule-Free AdamW step formulations in JAX, timed against a copy of the params' bytes.

Why: on a fast GPU (H200) the sf_optax AdamW step on the big parameter sets runs below the copy
bandwidth although its optimized HLO is already the right one (one multi-output fusion per
tensor, no temporaries). What is left is XLA's per-buffer dispatch: every param, grad, z and v
array crosses the jit boundary and gets its own kernel, at a fixed cost per buffer that the
64 small vectors pay as much as the 32 large matrices. This module times the SAME step (lr
1e-3, b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01, fp32 state) written several ways, in one
process, to show how much of that cost a different state layout removes with XLA's own
fusions (V1) and how close a custom kernel gets (the Pallas variants, which are ceilings to
compare with, not candidate implementations).

Parameter sets (the shapes of bench/step.py's big / bf16 / big-vectors; ``--scale`` shrinks the
rows and vectors):

  fp32-big     32 x (2048*scale, 4096) + 64 x (4096*scale,), fp32 params and state
  bf16-big     the same shapes, bf16 params/grads, fp32 z and v
  big-vectors  the 64 vectors of fp32-big alone

Variants (every one takes (params, state, grads), donates params and state, returns
(params, state); y and g are always per-leaf lists, as a user holds them):

  V0  sf_optax          sf_optax.adamw + optax.apply_updates in one jit, as bench/step.py
                        does: the baseline the others are checked against
  V2  direct            hand-written elementwise math per leaf, returns new (y, z, v) directly
  V2b direct-optax      V2 but y written as (y32 + (y_next - y32)).astype(y.dtype), as optax's
                        updates/apply_updates split does (V2b - V2 = cost of the split)
  V2c direct-optax-barrier
                        V2b with the step's scalars computed once, behind
                        jax.lax.optimization_barrier, so that XLA cannot copy the scalar math
                        into every leaf's fusion (small fusions can then be fused horizontally)
  V1  packed-small      V2b's math; leaves with fewer than --pack-threshold elements are
                        handled together: their z/v state is kept across steps as ONE flat
                        buffer per dtype, and each call concatenates their y and g per dtype
                        and cuts the new y back into per-leaf arrays (fewer buffers and
                        kernels per call, a different state layout)
  V1b packed-small-perleaf
                        V1 but z/v stay per leaf too (concatenated and cut inside the jit as
                        well): the packing without the state-layout change
  V3  pallas-B          a Pallas (Triton) kernel per leaf, block of B elements, y/z/v aliased
  V3g pallas-grp-B      one Pallas kernel for up to --group-max same-size leaves (pl.when on
                        program_id(0) picks the leaf): a multi-tensor-apply kernel
  (copy)                jitted donated copy of the params' bytes: the reference bandwidth

Each row reports the median step time over --repeats samples of --inner back-to-back steps
(50 per sample on GPU, so that the host's dispatch of one step overlaps the device's work of
the previous ones, as in training), the useful bytes a step moves (as bench/step.py: y read and
written, g read, every per-parameter state buffer read and written: 28 B/param for fp32 AdamW,
22 B/param for bf16 params with fp32 state), their bandwidth as a share of the copy's, the
kernels in the optimized HLO, the compile time and XLA's extra memory (scratch plus outputs
that do not reuse a donated input).

Each variant is first checked against V0 on one step from a common synthetic state (step 6,
z != y, v > 0): max |a - b| / max |b| per buffer kind (y, z, v; max over leaves), and for
bf16 leaves the max distance in bf16 ulps (and the share of elements that differ). OK means
fp32 buffers within 1e-5 relative and bf16 y within 1 ulp on at most 1% of its elements. The
timed steps then continue from the checked outputs. Kernels are counted in the optimized HLO:
fusion and custom-call instructions (plus copies and other real ops) in every computation
that is not a fusion body (XLA:GPU may wrap fusions into command-buffer computations).

Order: the copy and the XLA variants for every set, then the Pallas variants with the first
--pallas-blocks size for every set, then the other sizes; a Pallas variant starts only while
the --budget-s time budget lasts (the XLA ones always run), and one that cannot run is listed
as skipped with its error instead of ending the run.

On CPU Pallas runs only in interpret mode: the Pallas variants are then checked for
correctness on a tiny set of the same dtypes (with a masked, non-multiple-of-block leaf) and
not timed.

Run:  python -m bench.jax_variants --device gpu [--hlo DIR] [--json OUT]
      python -m bench.jax_variants --device cpu --scale 0.02          (smoke run)
"""

from __future__ import annotations

import os

# Before jax is imported: JAX would otherwise take most of the GPU's memory up front.
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sf_optax  # noqa: E402
from bench.timing import time_jax_steps  # noqa: E402
from sf_optax.alias import ScaleBySecondMomentState  # noqa: E402
from sf_optax.transform import ScheduleFreeState, warmup_factor  # noqa: E402

# Donation is not implemented on every backend (CPU may warn); it is no error here.
warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")

LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01
R, WLP, WARMUP = 0.0, 2.0, 0
F32 = jnp.float32
# The constants as float32 values, the same roundings sf_optax gets from jnp.asarray(x, f32)
B2_32 = np.float32(B2)
OMB2_32 = np.float32(1) - B2_32  # sf_optax computes 1 - beta in float32
EPS_32 = np.float32(EPS)
WD_32 = np.float32(WD)
START_COUNT = 5  # the synthetic state has taken 5 steps: c = 1/6 on the checked step


# ---------------------------------------------------------------------------------------------
# Parameter sets (the shapes of bench/step.py's big / bf16 / big-vectors, with its --scale)


def set_shapes(name: str, scale: float):
    rows = max(1, round(2048 * scale))
    vec = max(1, round(4096 * scale))
    mats, vecs = ((rows, 4096),) * 32, ((vec,),) * 64
    if name == "fp32-big":
        return mats + vecs, jnp.float32
    if name == "bf16-big":
        return mats + vecs, jnp.bfloat16
    if name == "big-vectors":
        return vecs, jnp.float32
    raise ValueError(name)


SET_NAMES = ("fp32-big", "bf16-big", "big-vectors")


def tiny_shapes():
    """For interpret-mode Pallas checks: a block multiple, a masked leaf, a leaf < a block."""
    return ((4, 1024), (4, 1024), (3000,), (82,), (82,))


# ---------------------------------------------------------------------------------------------
# The step's math, mirroring sf_optax.transform / sf_optax.alias operation by operation


def sf_scalars(count, weight_sum, lr_max):
    """The per-step scalars of sf_optax.adamw (warmup 0, r 0, weight_lr_power 2)."""
    sdt = F32
    k = count
    lr = jnp.asarray(LR, sdt) * warmup_factor(k, WARMUP, sdt)
    lr_max = jnp.maximum(lr_max, lr)
    weight = (k.astype(sdt) + 1) ** jnp.asarray(R, sdt) * lr_max ** jnp.asarray(WLP, sdt)
    weight_sum = weight_sum + weight
    c = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)
    beta = jnp.asarray(B1, sdt)
    coef = lr * (beta * (1 - c) - 1)
    step = optax.safe_increment(k)
    corr = 1 - jnp.asarray(B2, sdt) ** step.astype(sdt)
    scal = dict(lr=lr, c=c, omc=1 - c, coef=coef, corr=corr)
    return scal, dict(count=optax.safe_increment(k), weight_sum=weight_sum, lr_max=lr_max)


def elem(y, g, z, v, lr, c, omc, coef, corr, direct: bool):
    """One leaf (or flat buffer): new (y, z, v). ``direct`` writes y_next itself; else y is
    written as optax's apply_updates would: (y32 + (y_next - y32)).astype(y.dtype)."""
    y32 = y.astype(F32)
    g32 = g.astype(F32)
    v_new = (B2_32 * v.astype(F32) + OMB2_32 * g32 * g32).astype(v.dtype)
    d = g32 / (jnp.sqrt(v_new.astype(F32) / corr) + EPS_32)
    gn = d + WD_32 * y32
    z32 = z.astype(F32)
    z_new = (z32 - lr * gn).astype(z.dtype)
    y_next = omc * y32 + c * z32 + coef * gn
    if direct:
        y_new = y_next.astype(y.dtype)
    else:
        y_new = (y32 + (y_next - y32)).astype(y.dtype)
    return y_new, z_new, v_new


# ---------------------------------------------------------------------------------------------
# Variants. Each: make_state(start) -> state, step(params, state, grads) -> (params, state),
# canon(params, state) -> (ys, zs, vs) per-leaf lists for the check.


class Variant:
    def __init__(self, name, make_state, step, canon, pallas=False):
        self.name, self.make_state, self.step, self.canon = name, make_state, step, canon
        self.pallas = pallas


def _scalars_of(state):
    return jnp.asarray(state["count"]), state["weight_sum"], state["lr_max"]


def _fresh(x):
    return jnp.array(x, copy=True)


def _plain_state(start):
    return dict(
        count=_fresh(start["count"]),
        weight_sum=_fresh(start["weight_sum"]),
        lr_max=_fresh(start["lr_max"]),
        z=[_fresh(z) for z in start["z"]],
        v=[_fresh(v) for v in start["v"]],
    )


def _plain_canon(params, state):
    return list(params), list(state["z"]), list(state["v"])


def v0_sf_optax(state_dtype):
    opt = sf_optax.adamw(LR, weight_decay=WD, state_dtype=state_dtype)

    def make_state(start):
        c = _fresh(start["count"])
        st = ScheduleFreeState(
            count=c,
            weight_sum=_fresh(start["weight_sum"]),
            lr_max=_fresh(start["lr_max"]),
            b1=jnp.asarray(B1, F32),
            z=[_fresh(z) for z in start["z"]],
            x=None,
            base_state=(
                ScaleBySecondMomentState(
                    count=_fresh(start["count"]), nu=[_fresh(v) for v in start["v"]]
                ),
                optax.EmptyState(),
            ),
        )
        ref = jax.eval_shape(opt.init, start["y"])
        if jax.tree.structure(ref) != jax.tree.structure(st):
            raise RuntimeError(
                f"sf_optax state layout changed: {jax.tree.structure(ref)} vs "
                f"{jax.tree.structure(st)}"
            )
        return st

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def canon(params, state):
        return list(params), list(state.z), list(state.base_state[0].nu)

    return Variant("V0 sf_optax", make_state, step, canon)


def v2_direct(direct: bool, barrier: bool = False):
    def step(params, state, grads):
        scal, new = sf_scalars(*_scalars_of(state))
        if barrier:
            names = sorted(scal)
            scal = dict(zip(names, jax.lax.optimization_barrier(tuple(scal[n] for n in names))))
        out = [
            elem(y, g, z, v, direct=direct, **scal)
            for y, g, z, v in zip(params, grads, state["z"], state["v"])
        ]
        new["z"] = [o[1] for o in out]
        new["v"] = [o[2] for o in out]
        return [o[0] for o in out], new

    name = "V2 direct" if direct else "V2b direct-optax"
    if barrier:
        name = "V2c direct-optax-barrier"
    return Variant(name, _plain_state, step, _plain_canon)


def _split_small(shapes, dtypes, threshold):
    """Indices of the leaves kept per leaf, and {dtype name: [indices]} of the packed ones."""
    big, small = [], {}
    for i, (s, dt) in enumerate(zip(shapes, dtypes)):
        if math.prod(s) < threshold:
            small.setdefault(jnp.dtype(dt).name, []).append(i)
        else:
            big.append(i)
    return big, small


def _unpack(flat, idxs, shapes):
    out, off = {}, 0
    for i in idxs:
        n = math.prod(shapes[i])
        out[i] = flat[off : off + n].reshape(shapes[i])
        off += n
    return out


def v1_packed(threshold: int, flat_state: bool):
    """Small leaves concatenated per dtype; z/v for them flat (flat_state) or per leaf."""
    layout = {}

    def setup(params):
        shapes = [tuple(p.shape) for p in params]
        big, small = _split_small(shapes, [p.dtype for p in params], threshold)
        layout.update(shapes=shapes, big=big, small=small)

    def make_state(start):
        setup(start["y"])
        if not flat_state:
            return _plain_state(start)
        big, small = layout["big"], layout["small"]
        st = dict(
            count=_fresh(start["count"]),
            weight_sum=_fresh(start["weight_sum"]),
            lr_max=_fresh(start["lr_max"]),
            z_big=[_fresh(start["z"][i]) for i in big],
            v_big=[_fresh(start["v"][i]) for i in big],
            z_flat={
                k: jnp.concatenate([start["z"][i].reshape(-1) for i in ix])
                for k, ix in small.items()
            },
            v_flat={
                k: jnp.concatenate([start["v"][i].reshape(-1) for i in ix])
                for k, ix in small.items()
            },
        )
        return st

    def step(params, state, grads):
        shapes, big, small = layout["shapes"], layout["big"], layout["small"]
        scal, new = sf_scalars(*_scalars_of(state))
        new_y = list(params)
        if flat_state:
            zb, vb = state["z_big"], state["v_big"]
        else:
            zb = [state["z"][i] for i in big]
            vb = [state["v"][i] for i in big]
        zb_new, vb_new = [], []
        for j, i in enumerate(big):
            y, z, v = elem(params[i], grads[i], zb[j], vb[j], direct=False, **scal)
            new_y[i] = y
            zb_new.append(z)
            vb_new.append(v)
        zf_new, vf_new = {}, {}
        z_leaf = list(state["z"]) if not flat_state else None
        v_leaf = list(state["v"]) if not flat_state else None
        for k, ix in small.items():
            ycat = jnp.concatenate([params[i].reshape(-1) for i in ix])
            gcat = jnp.concatenate([grads[i].reshape(-1) for i in ix])
            if flat_state:
                zcat, vcat = state["z_flat"][k], state["v_flat"][k]
            else:
                zcat = jnp.concatenate([state["z"][i].reshape(-1) for i in ix])
                vcat = jnp.concatenate([state["v"][i].reshape(-1) for i in ix])
            yn, zn, vn = elem(ycat, gcat, zcat, vcat, direct=False, **scal)
            for i, a in _unpack(yn, ix, shapes).items():
                new_y[i] = a
            if flat_state:
                zf_new[k], vf_new[k] = zn, vn
            else:
                for i, a in _unpack(zn, ix, shapes).items():
                    z_leaf[i] = a
                for i, a in _unpack(vn, ix, shapes).items():
                    v_leaf[i] = a
        if flat_state:
            new.update(z_big=zb_new, v_big=vb_new, z_flat=zf_new, v_flat=vf_new)
        else:
            for j, i in enumerate(big):
                z_leaf[i], v_leaf[i] = zb_new[j], vb_new[j]
            new.update(z=z_leaf, v=v_leaf)
        return new_y, new

    def canon(params, state):
        if not flat_state:
            return _plain_canon(params, state)
        shapes, big, small = layout["shapes"], layout["big"], layout["small"]
        zs, vs = [None] * len(shapes), [None] * len(shapes)
        for j, i in enumerate(big):
            zs[i], vs[i] = state["z_big"][j], state["v_big"][j]
        for k, ix in small.items():
            for i, a in _unpack(state["z_flat"][k], ix, shapes).items():
                zs[i] = a
            for i, a in _unpack(state["v_flat"][k], ix, shapes).items():
                vs[i] = a
        return list(params), zs, vs

    name = "V1 packed-small" if flat_state else "V1b packed-small-perleaf"
    return Variant(name, make_state, step, canon)


# ---------------------------------------------------------------------------------------------
# Pallas


def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _triton_params(block):
    from jax.experimental.pallas import triton as plt

    cls = getattr(plt, "CompilerParams", None) or plt.TritonCompilerParams
    return cls(num_warps=max(4, min(16, block // 512)), num_stages=1)


N_SCAL = 8  # scalars passed as one float32 vector (a power of 2 for Triton)
# How the kernel reads its scalars: "index" (s_ref[i], a scalar load) or "reduce" (load the
# vector, masked sums); the runner falls back to "reduce" if "index" fails to compile.
PALLAS_OPTS = {"scalars": "index"}


def _scal_vec(scal):
    vals = [scal["lr"], scal["c"], scal["omc"], scal["coef"], scal["corr"]]
    vals = [jnp.asarray(x, F32).reshape(()) for x in vals]
    return jnp.stack(vals + [jnp.zeros((), F32)] * (N_SCAL - len(vals)))


def _kernel_body(s_ref, refs_in, refs_out, mask):
    """Loads y, g, z, v blocks, does the math, stores new y, z, v (masked if mask given)."""
    from jax.experimental.pallas import triton as plt

    if PALLAS_OPTS["scalars"] == "index":
        lr, c, omc, coef, corr = (s_ref[i] for i in range(5))
    else:  # fallback: load the vector, pick each scalar with a masked sum
        sv = s_ref[...]
        iota = jnp.arange(N_SCAL, dtype=jnp.int32)
        lr, c, omc, coef, corr = (jnp.sum(jnp.where(iota == i, sv, 0.0)) for i in range(5))
    if mask is None:
        y, g, z, v = (r[...] for r in refs_in)
    else:  # masked-off lanes hold garbage; they are never stored
        y, g, z, v = (plt.load(r, mask=mask) for r in refs_in)
    yn, zn, vn = elem(y, g, z, v, lr, c, omc, coef, corr, direct=True)
    for r, val in zip(refs_out, (yn, zn, vn)):
        if mask is None:
            r[...] = val
        else:
            plt.store(r, val, mask=mask)


def pallas_leaf_call(scal_vec, y, g, z, v, block, interpret):
    from jax.experimental import pallas as pl

    shape, n = y.shape, y.size
    b = block if n >= block else _next_pow2(n)
    nb = pl.cdiv(n, b)
    masked = n % b != 0

    def kernel(s_ref, y_ref, g_ref, z_ref, v_ref, yo_ref, zo_ref, vo_ref):
        mask = None
        if masked:
            mask = pl.program_id(0) * b + jnp.arange(b, dtype=jnp.int32) < n
        _kernel_body(s_ref, (y_ref, g_ref, z_ref, v_ref), (yo_ref, zo_ref, vo_ref), mask)

    spec = pl.BlockSpec((b,), lambda i: (i,))
    flat = [a.reshape(n) for a in (y, g, z, v)]
    kw = {} if interpret else dict(compiler_params=_triton_params(b))
    yn, zn, vn = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((n,), a.dtype) for a in (y, z, v)),
        grid=(nb,),
        in_specs=[pl.BlockSpec((N_SCAL,), lambda i: (0,))] + [spec] * 4,
        out_specs=(spec, spec, spec),
        input_output_aliases={1: 0, 3: 1, 4: 2},
        interpret=interpret,
        name="sf_adamw_leaf",
        **kw,
    )(scal_vec, *flat)
    return yn.reshape(shape), zn.reshape(shape), vn.reshape(shape)


def pallas_group_call(scal_vec, ys, gs, zs, vs, block, interpret):
    """One kernel for L leaves of the same size and dtypes: grid (L, blocks)."""
    from jax.experimental import pallas as pl

    L = len(ys)
    shape, n = ys[0].shape, ys[0].size
    b = block if n >= block else _next_pow2(n)
    nb = pl.cdiv(n, b)
    masked = n % b != 0

    def kernel(s_ref, *refs):
        ins, outs = refs[: 4 * L], refs[4 * L :]
        mask = None
        if masked:
            mask = pl.program_id(1) * b + jnp.arange(b, dtype=jnp.int32) < n
        leaf = pl.program_id(0)
        for j in range(L):

            @pl.when(leaf == j)
            def _(j=j):
                _kernel_body(
                    s_ref,
                    (ins[j], ins[L + j], ins[2 * L + j], ins[3 * L + j]),
                    (outs[j], outs[L + j], outs[2 * L + j]),
                    mask,
                )

    spec = pl.BlockSpec((b,), lambda l, i: (i,))
    flat = [a.reshape(n) for a in (*ys, *gs, *zs, *vs)]
    out_shape = tuple(jax.ShapeDtypeStruct((n,), a.dtype) for a in (*ys, *zs, *vs))
    # inputs: 0 = scalars, 1..L = y, L+1..2L = g, 2L+1..3L = z, 3L+1..4L = v
    aliases = {}
    for j in range(L):
        aliases[1 + j] = j
        aliases[1 + 2 * L + j] = L + j
        aliases[1 + 3 * L + j] = 2 * L + j
    kw = {} if interpret else dict(compiler_params=_triton_params(b))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(L, nb),
        in_specs=[pl.BlockSpec((N_SCAL,), lambda l, i: (0,))] + [spec] * (4 * L),
        out_specs=tuple([spec] * (3 * L)),
        input_output_aliases=aliases,
        interpret=interpret,
        name="sf_adamw_group",
        **kw,
    )(scal_vec, *flat)
    out = [a.reshape(shape) for a in out]
    return out[:L], out[L : 2 * L], out[2 * L :]


def v3_pallas(block: int, interpret: bool, grouped: bool, group_max: int):
    def step(params, state, grads):
        scal, new = sf_scalars(*_scalars_of(state))
        sv = _scal_vec(scal)
        n_leaves = len(params)
        ys, zs, vs = [None] * n_leaves, [None] * n_leaves, [None] * n_leaves
        if not grouped:
            for i in range(n_leaves):
                ys[i], zs[i], vs[i] = pallas_leaf_call(
                    sv, params[i], grads[i], state["z"][i], state["v"][i], block, interpret
                )
        else:
            groups = {}
            for i, p in enumerate(params):
                key = (tuple(p.shape), p.dtype.name, state["z"][i].dtype.name)
                groups.setdefault(key, []).append(i)
            for ix_all in groups.values():
                for s in range(0, len(ix_all), group_max):
                    ix = ix_all[s : s + group_max]
                    yo, zo, vo = pallas_group_call(
                        sv,
                        [params[i] for i in ix],
                        [grads[i] for i in ix],
                        [state["z"][i] for i in ix],
                        [state["v"][i] for i in ix],
                        block,
                        interpret,
                    )
                    for j, i in enumerate(ix):
                        ys[i], zs[i], vs[i] = yo[j], zo[j], vo[j]
        new["z"], new["v"] = zs, vs
        return ys, new

    name = f"V3g pallas-grp-{block}" if grouped else f"V3 pallas-{block}"
    return Variant(name, _plain_state, step, _plain_canon, pallas=True)


# ---------------------------------------------------------------------------------------------
# HLO analysis

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$")
_TRIVIAL = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "call",
    "while",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
}


def count_kernels(hlo: str) -> dict:
    """fusion / custom-call / copy / other real instructions in every computation that is not a
    fusion body (entry, command-buffer and other called computations)."""
    comps, cur, entry = {}, None, None
    for line in hlo.splitlines():
        s = line.strip()
        if cur is None:
            m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", s)
            if m and not s.startswith("HloModule"):
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        if s == "}":
            cur = None
            continue
        mi = _INSTR.match(line)
        if mi:
            comps[cur].append((mi.group(3), mi.group(4)))
    fused = set()
    for instrs in comps.values():
        for op, rest in instrs:
            if op == "fusion":
                for m in re.finditer(r"calls=%?([\w.\-]+)", rest):
                    fused.add(m.group(1))
    counts = dict(fusion=0, custom_call=0, copy=0, other=0, command_buffers=0)
    other_ops = {}
    for name, instrs in comps.items():
        if name in fused:
            continue
        if "command_buffer" in name:
            counts["command_buffers"] += 1
        for op, _ in instrs:
            if op == "fusion":
                counts["fusion"] += 1
            elif op == "custom-call":
                counts["custom_call"] += 1
            elif op == "copy":
                counts["copy"] += 1
            elif op not in _TRIVIAL:
                # reduction/apply computations of a reduce are tiny and have no fusions; count
                # only ops of computations that hold fusions or are the entry
                other_ops.setdefault(name, []).append(op)
    for name, ops in other_ops.items():
        has_kernels = any(op in ("fusion", "custom-call") for op, _ in comps[name])
        if name == entry or has_kernels:
            counts["other"] += len(ops)
    counts["kernels"] = counts["fusion"] + counts["custom_call"] + counts["copy"] + counts["other"]
    counts["entry_found"] = entry is not None
    return counts


# ---------------------------------------------------------------------------------------------
# Measurement


def moved_bytes(params, grads, state) -> int:
    """As bench/step.py: y read+written, g read, every per-parameter state buffer read+written."""

    def nb(tree, per_param_only=False):
        return sum(x.nbytes for x in jax.tree.leaves(tree) if not per_param_only or x.ndim > 0)

    return 2 * nb(params) + nb(grads) + 2 * nb(state, per_param_only=True)


def extra_bytes(compiled):
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def timed(step, args, advance, warmup, repeats, inner):
    return time_jax_steps(step, args, advance, warmup, repeats, inner, cap=False)


@jax.jit
def _leaf_diff(a, b):
    a32, b32 = a.astype(F32), b.astype(F32)
    num = jnp.max(jnp.abs(a32 - b32))
    den = jnp.max(jnp.abs(b32))
    return num, den


@jax.jit
def _bf16_ulps(a, b):
    """Max |a - b| in bf16 ulps of max(|a|, |b|, 2^-10 max|b|), and the share that differ.
    The floor keeps values near 0 (where optax's y + (y_next - y) loses the low bits to
    cancellation in float32) from counting as thousands of ulps."""
    a32, b32 = a.astype(F32), b.astype(F32)
    floor = jnp.float32(2.0**-10) * jnp.max(jnp.abs(b32))
    mag = jnp.maximum(jnp.maximum(jnp.abs(a32), jnp.abs(b32)), floor)
    _, e = jnp.frexp(mag)  # mag in [2^(e-1), 2^e): a bf16 ulp there is 2^(e-8)
    ulp = jnp.ldexp(jnp.ones_like(mag), e - 8)
    d = jnp.where(a32 == b32, 0.0, jnp.abs(a32 - b32) / ulp)
    return jnp.max(d), jnp.mean((a32 != b32).astype(F32))


def compare(out, ref) -> dict:
    """{kind: max over leaves of max|a-b| / max|b|} for y, z, v, plus bf16 ulps for y."""
    res = {}
    for kind, xs, rs in zip("yzv", out, ref):
        worst, ulps, frac, nbf = 0.0, 0, 0.0, 0
        for a, b in zip(xs, rs):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise RuntimeError(f"{kind}: {a.shape} {a.dtype} vs reference {b.shape} {b.dtype}")
            num, den = (float(t) for t in _leaf_diff(a, b))
            worst = max(worst, num / den if den > 0 else num)
            if a.dtype == jnp.bfloat16:
                u, f = _bf16_ulps(a, b)
                ulps = max(ulps, float(u))
                frac += float(f)
                nbf += 1
        res[kind] = worst
        if nbf:
            res[f"{kind}_bf16_ulps"] = ulps
            res[f"{kind}_bf16_frac_diff"] = frac / nbf
    return res


def check_ok(diff: dict) -> bool:
    for k in "yzv":
        if k in diff and k + "_bf16_ulps" not in diff and not diff[k] <= 1e-5:
            return False
    if diff.get("y_bf16_ulps", 0) > 1.0 or diff.get("y_bf16_frac_diff", 0) > 0.01:
        return False
    return all(diff.get(k, 0) <= 1e-5 for k in "zv")


def fmt_diff(diff: dict | None) -> str:
    if not diff:
        return "n/a"
    s = f"y {diff['y']:.1e} z {diff['z']:.1e} v {diff['v']:.1e}"
    if "y_bf16_ulps" in diff:
        s += (
            f" | y bf16: max {diff['y_bf16_ulps']:.2f} ulp, "
            f"{100 * diff['y_bf16_frac_diff']:.3f}% differ"
        )
    return s + ("  OK" if check_ok(diff) else "  MISMATCH")


# ---------------------------------------------------------------------------------------------
# One set


def make_start(shapes, dtype, seed=0):
    """Canonical starting point: y, g in the params' dtype, fp32 z (= y + noise) and v > 0,
    count = START_COUNT, weight_sum / lr_max as after START_COUNT steps of lr LR."""
    key = jax.random.key(seed)
    ys, gs, zs, vs = [], [], [], []

    def draw(k, s):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        y = 0.02 * jax.random.normal(k1, s, F32)
        g = 1e-3 * jax.random.normal(k2, s, F32)
        z = y + 0.01 * jax.random.normal(k3, s, F32)
        v = 1e-6 * jax.random.uniform(k4, s, F32, 0.25, 2.0)
        return y.astype(dtype), g.astype(dtype), z, v

    draw = jax.jit(draw, static_argnums=1)
    for i, s in enumerate(shapes):
        y, g, z, v = draw(jax.random.fold_in(key, i), tuple(s))
        ys.append(y)
        gs.append(g)
        zs.append(z)
        vs.append(v)
    lr_max = jnp.asarray(LR, F32)
    ws = jnp.asarray(0.0, F32)
    for _ in range(START_COUNT):  # the same float32 sum the optimizer would have made
        ws = ws + lr_max ** jnp.asarray(WLP, F32)
    return dict(
        y=ys,
        g=gs,
        z=zs,
        v=vs,
        count=jnp.asarray(START_COUNT, jnp.int32),
        weight_sum=ws,
        lr_max=lr_max,
    )


class Runner:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.t_start = time.perf_counter()
        self.interpret = device.platform == "cpu"
        self.cache = {}
        self.scalar_fallback_tried = False

    def elapsed(self):
        return time.perf_counter() - self.t_start

    def write_hlo(self, set_name, vname, compiled):
        if not self.args.hlo:
            return
        os.makedirs(self.args.hlo, exist_ok=True)
        fn = re.sub(r"[^\w.\-]+", "_", f"{set_name}_{vname}") + ".hlo.txt"
        with open(os.path.join(self.args.hlo, fn), "w") as f:
            f.write(compiled.as_text())

    def copy_row(self, set_name, n_params, dtype):
        a = self.args
        src = jax.random.normal(jax.random.key(0), (n_params,), F32).astype(dtype)
        dst = jnp.zeros_like(src)
        copy = jax.jit(lambda d, s: s.copy(), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = copy.lower(dst, src).compile()
        ct = time.perf_counter() - t0
        self.write_hlo(set_name, "copy", compiled)
        kc = count_kernels(compiled.as_text())
        med, times, _ = timed(
            copy, (dst, src), lambda x, out: (out, x[1]), a.warmup, a.repeats, a.inner
        )
        nbytes = 2 * src.nbytes
        del src, dst
        return dict(
            variant="copy",
            median_s=med,
            times_s=times,
            bytes=nbytes,
            kernels=kc,
            compile_s=ct,
            diff=None,
            extra_bytes=extra_bytes(compiled),
        )

    def run_variant(self, set_name, var, start, ref, timed_run=True):
        """Compile, check one step against ref, then time from the checked outputs."""
        a = self.args
        params = [_fresh(y) for y in start["y"]]
        grads = start["g"]
        state = var.make_state(start)
        nbytes = moved_bytes(params, grads, state)
        step = jax.jit(var.step, donate_argnums=(0, 1))
        t0 = time.perf_counter()
        compiled = step.lower(params, state, grads).compile()
        ct = time.perf_counter() - t0
        self.write_hlo(set_name, var.name, compiled)
        kc = count_kernels(compiled.as_text())
        out = step(params, state, grads)
        jax.block_until_ready(out)
        canon = var.canon(*out)
        diff = compare(canon, ref) if ref is not None else None
        del canon
        row = dict(
            variant=var.name,
            bytes=nbytes,
            kernels=kc,
            compile_s=ct,
            diff=diff,
            pallas_scalars=PALLAS_OPTS["scalars"] if var.pallas else None,
            extra_bytes=extra_bytes(compiled),
            median_s=None,
            times_s=None,
        )
        if timed_run:
            med, times, last = timed(
                step,
                (out[0], out[1], grads),
                lambda x, o: (o[0], o[1], x[2]),
                a.warmup,
                a.repeats,
                a.inner,
            )
            row.update(median_s=med, times_s=times)
            del last
        del out
        return row

    def reference(self, var, start):
        params = [_fresh(y) for y in start["y"]]
        state = var.make_state(start)
        out = jax.jit(var.step, donate_argnums=(0, 1))(params, state, start["g"])
        return var.canon(*out)

    def variants_for(self, set_name, phase):
        """Phase 1: the XLA variants; 2: Pallas with the first block size; 3: the other sizes."""
        a = self.args
        sdt = F32 if set_name == "bf16-big" else None
        blocks = a.pallas_blocks
        if phase == 1:
            return [
                v0_sf_optax(sdt),
                v2_direct(True),
                v2_direct(False),
                v2_direct(False, barrier=True),
                v1_packed(a.pack_threshold, True),
                v1_packed(a.pack_threshold, False),
            ]
        if a.no_pallas:
            return []
        bs = blocks[:1] if phase == 2 else blocks[1:]
        return [v3_pallas(b, self.interpret, g, a.group_max) for b in bs for g in (False, True)]

    def prepared(self, set_name, tiny=False):
        """(start, reference outputs) of a set, made once: the reference is V0's first step."""
        key = (set_name, tiny)
        if key not in self.cache:
            shapes, dtype = set_shapes(set_name, self.args.scale)
            start = make_start(tiny_shapes() if tiny else shapes, dtype, seed=1 if tiny else 0)
            try:
                ref = self.reference(v0_sf_optax(F32 if set_name == "bf16-big" else None), start)
            except Exception as e:  # noqa: BLE001
                print(f"  (no V0 reference: {type(e).__name__}: {e})")
                ref = None
            self.cache[key] = (start, ref)
        return self.cache[key]

    def run_set(self, set_name, phase, results):
        a = self.args
        shapes, dtype = set_shapes(set_name, a.scale)
        n_params = sum(math.prod(s) for s in shapes)
        res = results.setdefault(
            set_name,
            dict(
                set=set_name,
                n_params=n_params,
                n_tensors=len(shapes),
                param_dtype=jnp.dtype(dtype).name,
                state_dtype="float32",
                rows=[],
                skipped=[],
                pallas_tiny=[],
            ),
        )
        variants = self.variants_for(set_name, phase)
        if not variants:
            return
        print(
            f"\n== {set_name} (phase {phase}): {len(shapes)} tensors, {n_params:,} params, "
            f"{jnp.dtype(dtype).name} params, float32 state  [t={self.elapsed():.0f}s]",
            flush=True,
        )
        if phase == 1:
            try:
                res["rows"].append(self.copy_row(set_name, n_params, dtype))
                self._progress(res["rows"][-1])
            except Exception as e:  # noqa: BLE001
                self._skip(res, "copy", e)
        for var in variants:
            if phase > 1 and self.elapsed() > a.budget_s:
                res["skipped"].append(dict(variant=var.name, reason=f"time budget {a.budget_s}s"))
                print(f"  {var.name}: skipped: time budget ({self.elapsed():.0f}s > {a.budget_s}s)")
                continue
            if not (var.pallas and self.interpret):
                try:
                    start, ref = self.prepared(set_name)
                    run = functools.partial(self.run_variant, set_name, var, start, ref)
                    row = self.with_scalar_fallback(run) if var.pallas else run()
                    res["rows"].append(row)
                    self._progress(row)
                except Exception as e:  # noqa: BLE001
                    self._skip(res, var.name, e)
                gc.collect()
            if var.pallas:
                # A tiny set of the same dtypes with leaves that are no multiple of the block
                # (the masked path): on CPU in interpret mode and the only Pallas check there;
                # on GPU compiled, after the timed run, so that a masked-path failure does not
                # hide the timing of the unmasked big leaves.
                tag = " [interpret, tiny]" if self.interpret else " [tiny, masked]"
                try:
                    start, ref = self.prepared(set_name, tiny=True)
                    row = self.with_scalar_fallback(
                        functools.partial(
                            self.run_variant, set_name + "-tiny", var, start, ref, timed_run=False
                        )
                    )
                    row["variant"] += tag
                    res["pallas_tiny"].append(row)
                    print(
                        f"  {row['variant']:<34} check: {fmt_diff(row['diff'])}  "
                        f"kernels {row['kernels']['kernels']}",
                        flush=True,
                    )
                except Exception as e:  # noqa: BLE001
                    self._skip(res, var.name + tag, e)
                gc.collect()

    def with_scalar_fallback(self, run):
        """Runs a Pallas variant; if it fails with scalar loads s_ref[i], retries once with the
        masked-sum scalars and keeps them if that works."""
        try:
            return run()
        except Exception as e:  # noqa: BLE001
            if PALLAS_OPTS["scalars"] != "index" or self.scalar_fallback_tried:
                raise
            self.scalar_fallback_tried = True
            print(
                f"  (Pallas failed with scalar loads: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}; retrying with masked-sum "
                "scalars)",
                flush=True,
            )
            if self.args.verbose:
                traceback.print_exc()
            PALLAS_OPTS["scalars"] = "reduce"
            try:
                row = run()
            except Exception:
                PALLAS_OPTS["scalars"] = "index"
                raise
            print("  (masked-sum scalars work: kept for the other Pallas variants)", flush=True)
            return row

    def _skip(self, res, name, e):
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        res["skipped"].append(dict(variant=name, reason=reason))
        print(f"  {name}: skipped: {reason}", flush=True)
        if self.args.verbose:
            traceback.print_exc()

    def _progress(self, row):
        ms = "n/a" if row["median_s"] is None else f"{row['median_s'] * 1e3:.3f} ms"
        print(
            f"  {row['variant']:<28} {ms:>12}  kernels {row['kernels']['kernels']:>4}  "
            f"compile {row['compile_s']:.1f}s  check: {fmt_diff(row['diff'])}",
            flush=True,
        )


def format_table(res: dict) -> str:
    rows = res["rows"]
    copy = next((r for r in rows if r["variant"] == "copy" and r["median_s"]), None)
    copy_bw = copy["bytes"] / copy["median_s"] if copy else float("nan")
    lines = [
        f"set={res['set']} params={res['n_params']:,} tensors={res['n_tensors']} "
        f"{res['param_dtype']} params, {res['state_dtype']} state; copy = "
        f"{copy_bw / 1e9:.1f} GB/s",
        f"{'variant':<28} {'ms':>8} {'MB/step':>9} {'GB/s':>8} {'% copy':>7} {'kern':>5} "
        f"{'fus':>4} {'cc':>3} {'cpy':>4} {'oth':>4} {'cmdbuf':>6} {'comp s':>6} {'xtraMB':>7}  "
        "check vs V0",
    ]
    for r in rows:
        k = r["kernels"]
        bw = r["bytes"] / r["median_s"] if r["median_s"] else float("nan")
        ms = f"{r['median_s'] * 1e3:.3f}" if r["median_s"] else "n/a"
        xb = "n/a" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 1e6:.1f}"
        lines.append(
            f"{r['variant']:<28} {ms:>8} {r['bytes'] / 1e6:>9.1f} {bw / 1e9:>8.1f} "
            f"{100 * bw / copy_bw:>6.1f}% {k['kernels']:>5} {k['fusion']:>4} {k['custom_call']:>3} "
            f"{k['copy']:>4} {k['other']:>4} {k['command_buffers']:>6} {r['compile_s']:>6.1f} "
            f"{xb:>7}  {fmt_diff(r['diff']) if r['variant'] != 'copy' else ''}"
        )
    for r in res["pallas_tiny"]:
        lines.append(
            f"{r['variant']:<40} kernels {r['kernels']['kernels']:>3}  check: {fmt_diff(r['diff'])}"
        )
    for s in res["skipped"]:
        lines.append(f"{s['variant']:<28} skipped: {s['reason'][:200]}")
    return "\n".join(lines)


def parse_args(argv=None):
    """The command line, checked and with the device's defaults filled in: (args, set names)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.jax_variants", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the rows (and vectors)")
    p.add_argument(
        "--sets", default=",".join(SET_NAMES), help="comma list of " + ", ".join(SET_NAMES)
    )
    p.add_argument("--hlo", default=None, help="write each variant's optimized HLO here")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--repeats", type=int, default=None, help="timed samples (20 gpu, 5 cpu)")
    p.add_argument("--inner", type=int, default=None, help="steps per sample (50 gpu, 2 cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--pack-threshold",
        type=int,
        default=2**16,
        help="V1/V1b pack leaves with fewer elements than this",
    )
    p.add_argument(
        "--pallas-blocks",
        default="4096,1024,16384",
        help="Pallas block sizes (powers of 2): the first for every set after the XLA "
        "variants, then the others, while the time budget lasts",
    )
    p.add_argument("--group-max", type=int, default=32, help="leaves per grouped Pallas kernel")
    p.add_argument("--no-pallas", action="store_true")
    p.add_argument(
        "--pallas-scalars",
        choices=("index", "reduce"),
        default="index",
        help="how kernels read their scalars (index falls back to reduce on failure)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=140.0,
        help="Pallas variants only start before this many seconds (XLA ones always run)",
    )
    p.add_argument("--verbose", action="store_true", help="tracebacks of skipped variants")
    a = p.parse_args(argv)
    a.pallas_blocks = [int(b) for b in a.pallas_blocks.split(",") if b]
    if any(b & (b - 1) or b <= 0 for b in a.pallas_blocks):
        p.error("--pallas-blocks must be powers of 2")
    sets = [s for s in a.sets.split(",") if s]
    for s in sets:
        if s not in SET_NAMES:
            p.error(f"unknown set {s}")
    gpu = a.device == "gpu"
    a.repeats = a.repeats or (20 if gpu else 5)
    a.inner = a.inner or (50 if gpu else 2)
    return a, sets


def main(argv=None):
    a, sets = parse_args(argv)
    device = jax.devices("gpu" if a.device == "gpu" else "cpu")[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, device {device} "
        f"({getattr(device, 'device_kind', '?')}), scale {a.scale}, repeats {a.repeats} x "
        f"{a.inner} steps, pack threshold {a.pack_threshold}, pallas blocks {a.pallas_blocks}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    PALLAS_OPTS["scalars"] = a.pallas_scalars
    runner = Runner(a, device)
    results = {}
    with jax.default_device(device):
        for phase in (1, 2, 3):
            for s in sets:
                try:
                    runner.run_set(s, phase, results)
                except Exception as e:  # noqa: BLE001
                    print(f"set {s} phase {phase} failed: {type(e).__name__}: {e}")
                    if a.verbose:
                        traceback.print_exc()
                gc.collect()
        runner.cache.clear()
    print(f"\n==== summary  [total {runner.elapsed():.0f}s]")
    print(
        "check: max|a-b|/max|b| per buffer vs V0 after one step (max over leaves); OK = fp32 "
        "<= 1e-5 and bf16 y within 1 ulp on <= 1% of elements"
    )
    for s in sets:
        if s in results:
            print()
            print(format_table(results[s]))
    if a.json:
        out = dict(
            jax=jax.__version__,
            device=str(device),
            device_kind=getattr(device, "device_kind", None),
            scale=a.scale,
            repeats=a.repeats,
            inner=a.inner,
            warmup=a.warmup,
            pack_threshold=a.pack_threshold,
            pallas_blocks=a.pallas_blocks,
            total_s=runner.elapsed(),
            sets=results,
        )
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
