#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md, in one go (one H100: ~10 minutes). Writes JSON, HLO and
# tables under ${OUT:-reports/gpu}. Run from the repository root with torch (CUDA), jax (CUDA),
# optax, flax and schedulefree importable.
set -euo pipefail
out="${OUT:-reports/gpu}"
mkdir -p "$out"
python -m pytest -q tests/test_torch_fused_gpu.py tests/test_torch_capturable_gpu.py \
    tests/test_torch_fused_plan.py tests/test_optax_packing.py | tail -3
for set in big bf16 big-matrices big-vectors; do
    python -m bench.step --device cuda --set "$set" --json "$out/step_$set.json" \
        --hlo "$out/hlo" | tee "$out/step_$set.txt"
done
# The small set's JAX rows take ~0.1 s a step: 20 steps per sample keep the run short.
python -m bench.step --device cuda --set small --inner 20 --json "$out/step_small.json" \
    | tee "$out/step_small.txt"
for dtype in float32 bfloat16; do
    python -m bench.lm_step --device cuda --size gpt2-small --dtype "$dtype" --framework both \
        --steps 40 --json "$out/lm_step_$dtype.json" | tee "$out/lm_step_$dtype.txt"
done
