#!/usr/bin/env bash
# vLLM (`--sampler vllm`) against tinkerd's own sampling engine on a GPU, in one go, within a
# bounded time (about 8 minutes; VLLM_BENCH_SECONDS).
#
#   bash bench/vllm_gpu.sh [RESULTS_DIR]        (default: vllm-results)
#
# 1. tests/test_vllm.py on CUDA (fp32): greedy tokens and logprobs equal to tinkerd's engine for
#    the base, a snapshot and a sampler checkpoint; prompt logprobs; stop ids; seeds;
# 2. bench/vllm_check.py in fp32: agreement (greedy tokens, sampled logprobs against tinkerd's
#    score of the same tokens) and tokens/s of both engines, 4 adapters x 32 and 128 requests;
# 3. the same timing in bf16 (the dtype a GPU worker runs), agreement not required.
# Writes RESULTS_DIR/vllm.log (everything printed) and RESULTS_DIR/vllm-{fp32,bf16}.json.
#
# Python: $PYTHON, else .venv/bin/python, else python3; it needs CUDA and vLLM
# (pip install -e '.[vllm]'). Exits 2 without either, 1 if a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-vllm-results}
budget=${VLLM_BENCH_SECONDS:-480}
start=$SECONDS

source bench/gpu_common.sh
pick_python "bench/vllm_gpu.sh (needs CUDA and vLLM: pip install -e '.[vllm]')" "$CUDA_CHECK
import vllm"

mkdir -p "$results" || exit 2
log=$results/vllm.log
failed=0
RUN_MIN_SECONDS=10
RUN_FILTER="grep -v ^(EngineCore\|^(Worker\|^INFO\|^WARNING"

"$PYTHON" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__,
    torch.cuda.get_device_name())' 2>&1 | tail -1 | tee "$log"
run "tests/test_vllm.py (fp32)" 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_vllm.py
run "agreement and speed, fp32" 180 "$PYTHON" bench/vllm_check.py --device cuda --dtype float32 \
    --out "$results/vllm-fp32.json"
run "speed, bf16" 150 "$PYTHON" bench/vllm_check.py --device cuda --dtype bfloat16 \
    --atol 1 --min-agree 0 --out "$results/vllm-bf16.json"
echo "== done in $((SECONDS - start)) s; figures in $results" | tee -a "$log"
exit $failed
