#!/usr/bin/env bash
# tinkerd's GPU figures in one go, within a bounded time (about 8 minutes; GPU_BENCH_SECONDS).
#
#   bash bench/gpu.sh [RESULTS_DIR]        (default: gpu-results)
#
# Runs bench/train_step.py on CUDA: memory vs the fp32 logits, mixed lengths vs the padded PEFT
# loop, 1..16 adapters at once vs one after another, and the 8B-shaped model's tokens/s and MFU
# (docs/architecture.md, MFU); then the 8B model again on a longer batch with activation
# checkpointing. Writes RESULTS_DIR/gpu.log (everything printed) and one JSON file per run.
# The other bench scripts are not run: they take no device, and their in-process baselines
# would run on the CPU against a server on the GPU.
#
# Python: $PYTHON, else .venv/bin/python when its torch sees CUDA, else python3 (a GPU image's
# torch); it needs torch, transformers, peft, numpy and safetensors. Fails (exit 2) without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-gpu-results}
budget=${GPU_BENCH_SECONDS:-480}
start=$SECONDS

source bench/gpu_common.sh
pick_python bench/gpu.sh "$CUDA_CHECK"

mkdir -p "$results" || exit 2
log="$results/gpu.log"
{
    echo "bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PYTHON" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$log"

failed=0
RUN_MIN_SECONDS=60

run "train_step: every part, 8B-shaped model 4 x 1024 tokens" 300 \
    "$PYTHON" bench/train_step.py --device cuda --rounds 2 --out "$results/train_step.json"
run "train_step: 8B-shaped model 8 x 2048 tokens, activation checkpointing" 170 \
    "$PYTHON" bench/train_step.py --device cuda --parts 8b --big-batch 8x2048 \
    --engine-arg activation_checkpointing=true --out "$results/train_step_checkpointing.json"

echo "bench/gpu.sh: done in $((SECONDS - start))s; results in $results" | tee -a "$log"
exit $failed
