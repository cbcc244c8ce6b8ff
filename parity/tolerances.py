"""Every tolerance of a parity report, in one place (DESIGN.md section 3).

Each row of a report is compared with the baseline row at every step, on three relative
differences (``parity.compare``): the parameters (``params``), the training loss at ``y``
(``train_loss``) and the eval loss at ``x`` (``eval_loss``). Which of them must stay within
which limit depends on the dtype and on the row's role (``parity.runners``):

=========  ==============================  ===========================================
dtype      checked rows                    limits (relative, at every step)
=========  ==============================  ===========================================
float64    primary, reference, distributed params, train_loss, eval_loss <= 1e-10
float32    primary, distributed            eval_loss <= 1e-4
bfloat16   primary, distributed            eval_loss <= 5e-2 (a sanity bound only)
=========  ==============================  ===========================================

bfloat16 is mixed precision (bf16 params and compute, float32 optimizer state): two correct
implementations part after a few steps, as bf16 rounding of ``y`` differs with the order of
operations, so no parity is claimed there. Its bound only catches what is plainly broken (a
wrong learning rate, bf16 optimizer state, a missing eval/train switch): on CPU, sf_optax and
its 8-device mesh stayed within 3e-3 of sf_torch for the MLP, 1.2e-2 for the CNN and 5e-4 for
the LM over 300 steps, while the reference ``schedulefree`` class, whose state is bf16, parted
by 21-30% (MLP, CNN).

Everything else is measured and reported, never failed: reference rows in float32 and bfloat16,
and any row whose runner declares an ``expected_difference`` for the run (optax.contrib with
warmup; DeepSpeed in bfloat16, which keeps ``y`` in float32 masters).
"""

from __future__ import annotations

FLOAT64_RELATIVE = 1e-10
FLOAT32_EVAL_LOSS_RELATIVE = 1e-4
BFLOAT16_EVAL_LOSS_RELATIVE = 5e-2

METRICS = ("params", "train_loss", "eval_loss")

_CHECKED = {
    "float64": (("primary", "reference", "distributed"), dict.fromkeys(METRICS, FLOAT64_RELATIVE)),
    "float32": (("primary", "distributed"), {"eval_loss": FLOAT32_EVAL_LOSS_RELATIVE}),
    "bfloat16": (("primary", "distributed"), {"eval_loss": BFLOAT16_EVAL_LOSS_RELATIVE}),
}


def nominal(dtype: str) -> dict[str, float]:
    """The limits of ``dtype`` for a checked row (also used to show where others part)."""
    return dict(_CHECKED[dtype][1]) if dtype in _CHECKED else {}


def limits(role: str, dtype: str, expected_difference: str | None = None) -> dict[str, float]:
    """The limits a row of ``role`` must meet against the baseline; empty: reported only."""
    if expected_difference or dtype not in _CHECKED:
        return {}
    roles, checked = _CHECKED[dtype]
    return dict(checked) if role in roles else {}


# -- The divergence finder (parity.own.divergence) ----------------------------------------------
# One batch through a torch model and its Flax twin holding identical weights; every module's
# output and every parameter gradient is compared as max|flax - torch| / max|torch|. Two correct
# ports differ there only by the order of floating-point operations (summation order inside
# matmuls and reductions, fused or not): a few ulps per operation, grown by what follows
# (LayerNorm divides by a standard deviation, softmax exponentiates) over a few dozen layers.
# Measured on CPU, clean transformers twins (RoBERTa, ELECTRA, ViT; two batches each): outputs
# <= 7.4e-16 and gradients <= 1.3e-15 in float64, outputs <= 4.6e-7 and gradients <= 6.9e-7 in
# float32. The porting mistakes the finder is for move the output of their module by far more: a
# LayerNorm epsilon of 1e-3 for the config's 1e-12 or 1e-5 by 4.9e-4..0.46 relative, the tanh
# GELU for the exact one by 2.5e-5..3.7e-5 in the transformers twins (small pre-activations,
# where the two GELUs are close) and 1.9e-4 in a hand-written MLP. Hence:
# - float64 1e-9: ~1e6 x the round-off measured and >= 2.5e4 x below those mistakes (a float32
#   round trip somewhere in the port, e.g. transformers' Flax ViT casting pixels to float32,
#   shows as ~3e-8 and is reported too);
# - float32 1e-4: ~150 x the round-off measured; a LayerNorm epsilon is still seen (5x above),
#   the transformers twins' GELU variant is not (above float32's round-off, under the limit):
#   float64 is the dtype to look for a porting mistake in, float32 tells whether the port holds
#   in float32. (CPU figures; TF32 matmuls on a GPU would need a looser limit: pass rtol=.)
DIVERGENCE_FLOAT64_RELATIVE = 1e-9
DIVERGENCE_FLOAT32_RELATIVE = 1e-4

_DIVERGENCE = {"float64": DIVERGENCE_FLOAT64_RELATIVE, "float32": DIVERGENCE_FLOAT32_RELATIVE}


def divergence_tolerance(dtype: str) -> float:
    """The divergence finder's relative limit for ``dtype`` ("float64" or "float32")."""
    if dtype not in _DIVERGENCE:
        raise ValueError(
            f"the divergence finder has tolerances for {sorted(_DIVERGENCE)}, got {dtype!r}; "
            "pass rtol= for another dtype"
        )
    return _DIVERGENCE[dtype]
