#!/usr/bin/env bash
# The Megatron backend on CUDA in one go (about 6 minutes; GPU_BENCH_SECONDS): the CPU tests'
# equalities at TP=1 on one GPU with nccl (tests/megatron_parity.py against the HF backend, both
# in float32: forward logprobs and every registry loss, gradients, AdamW, two models in one pass,
# PEFT round trips, sampling), then a timed step of a Qwen3-8B-shaped random model (bf16 base,
# fp32 LoRA rank 32 everywhere, 4 x 1,024 tokens) with its MFU, and TP=2 as well when the host
# has two GPUs. Writes RESULTS_DIR/megatron-gpu.log and megatron-parity.json.
#
#   bash bench/megatron_gpu.sh [RESULTS_DIR]        (default: gpu-results)
#
# Python: $PYTHON, else .venv/bin/python when its torch sees CUDA, else python3. It needs torch,
# transformers, peft, safetensors, numpy and megatron-core 0.16.1; a machine that cannot reach
# PyPI takes megatron-core from a wheel carried beside the repository ($MEGATRON_WHEEL, or
# bench/wheels/megatron_core-*.whl: `pip download --no-deps megatron-core==0.16.1 -d bench/wheels`).
# Exit 2 without CUDA, 1 if an equality fails or a step cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-gpu-results}
budget=${GPU_BENCH_SECONDS:-360}
start=$SECONDS

source bench/gpu_common.sh
pick_python bench/megatron_gpu.sh "$CUDA_CHECK"
if ! "$PYTHON" -c 'import megatron.core' 2>/dev/null; then
    wheel=${MEGATRON_WHEEL:-$(ls bench/wheels/megatron_core-*.whl 2>/dev/null | head -1)}
    "$PYTHON" -m pip install -q --no-deps "${wheel:-megatron-core==0.16.1}" || exit 1
fi

mkdir -p "$results" || exit 2
log="$results/megatron-gpu.log"
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
{
    echo "bench/megatron_gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $gpus GPU(s)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
} | tee "$log"

failed=0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
models=$("$PYTHON" tests/megatron_parity.py --build "$work/models" 2>/dev/null | tail -1)
torchrun=("$PYTHON" -m torch.distributed.run --standalone)
export TINKERD_PARITY_DEVICE=cuda HF_HUB_OFFLINE=1
run "parity at TP=1 on one GPU (nccl), float32" 180 \
    "${torchrun[@]}" --nproc-per-node 1 tests/megatron_parity.py 1 1 "$work/parity" \
    "$results/megatron-parity.json" $models
if [[ -f "$results/megatron-parity.json" ]]; then
    "$PYTHON" - "$results/megatron-parity.json" <<'PY' 2>&1 | tee -a "$log" || failed=1
import json, sys
report = json.load(open(sys.argv[1]))
worst = {m: max(d.items(), key=lambda kv: kv[1]) for m, d in report.items()}
for model, (what, diff) in worst.items():
    print(f"   {model}: largest difference {diff:.2e} ({what})")
sys.exit(0 if all(diff <= 1e-5 for _, diff in worst.values()) else 1)
PY
fi
shapes=1x1
((gpus >= 2)) && shapes=1x1,2x1
run "8B-shaped step, shapes $shapes" 240 \
    "$PYTHON" bench/megatron_step.py --device cuda --model 8b --configs "$shapes" \
    --sequences 4 --length 1024 --warmup 1 --steps 3
echo "log: $log" | tee -a "$log"
exit $failed
