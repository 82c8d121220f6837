#!/usr/bin/env bash
# The GPU checks, as one bounded script for a lent NVIDIA machine (issue 6): the tests
# marked `gpu`, then the service benchmark on CUDA fp16 for ViT-B/32 and ViT-L/14 (raw
# ceiling, service images/s and texts/s, decode time beside them). Everything lands in
# $OUT (default out/gpu): nvidia-smi.txt, gpu-tests.txt, and one bench folder per model.
# Budget: about 8 minutes on an H100/H200, start-up excluded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
timeout 180 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt" || true
for model in ViT-B-32 ViT-L-14; do
    timeout 240 "$PY" loadtests/bench.py --model "$model" --device cuda --dtype fp16 \
        --duration 20 --warmup 5 --overload-duration 20 \
        --server-env CLIP_MAX_BATCH_SIZE=64 --out "$OUT/$model" 2>&1 | tail -40 \
        | tee "$OUT/$model.txt" || true
done
