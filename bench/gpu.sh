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

cuda_check='
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device")'
reasons=()
for candidate in ${PYTHON:-.venv/bin/python python3}; do
    if why=$("$candidate" -c "$cuda_check" 2>&1); then
        PYTHON=$candidate
        break
    fi
    reasons+=("$candidate: ${why##*$'\n'}")
    PYTHON=
done
if [[ -z "$PYTHON" ]]; then
    echo "bench/gpu.sh: no CUDA device, nothing measured:" >&2
    printf '  %s\n' "${reasons[@]}" >&2
    exit 2
fi

mkdir -p "$results" || exit 2
log="$results/gpu.log"
{
    echo "bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PYTHON" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$log"

failed=0
run() {  # run NAME SECONDS COMMAND...: at most SECONDS, and never past the whole budget
    local name=$1 limit=$2 left
    shift 2
    left=$((budget - (SECONDS - start)))
    ((limit > left)) && limit=$left
    if ((limit < 60)); then
        echo "== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$log"
        failed=1
        return
    fi
    echo "== $name (at most ${limit}s): $*" | tee -a "$log"
    PYTHONUNBUFFERED=1 timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "== $name: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', out of time'))" |
            tee -a "$log"
        failed=1
    fi
}

run "train_step: every part, 8B-shaped model 4 x 1024 tokens" 300 \
    "$PYTHON" bench/train_step.py --device cuda --rounds 2 --out "$results/train_step.json"
run "train_step: 8B-shaped model 8 x 2048 tokens, activation checkpointing" 170 \
    "$PYTHON" bench/train_step.py --device cuda --parts 8b --big-batch 8x2048 \
    --engine-arg activation_checkpointing=true --out "$results/train_step_checkpointing.json"

echo "bench/gpu.sh: done in $((SECONDS - start))s; results in $results" | tee -a "$log"
exit $failed
