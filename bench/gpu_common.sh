# Shared by bench/gpu.sh, bench/megatron_gpu.sh and bench/vllm_gpu.sh (sourced, not run): pick a
# Python that sees CUDA, and run each step within the script's time budget.
#
# The sourcing script sets: budget (seconds), start ($SECONDS at its start), log (a file), and
# failed=0; it calls `pick_python NAME CHECK` (CHECK: Python code that raises SystemExit(why)
# when this interpreter cannot run the script), then `run NAME SECONDS COMMAND...`.

pick_python() {  # sets PYTHON: $PYTHON, else .venv/bin/python, else python3; exit 2 if none can
    local name=$1 check=$2 candidate why
    local reasons=()
    for candidate in ${PYTHON:-.venv/bin/python python3}; do
        if why=$("$candidate" -c "$check" 2>&1); then
            PYTHON=$candidate
            return 0
        fi
        reasons+=("$candidate: ${why##*$'\n'}")
    done
    echo "$name: nothing measured:" >&2
    printf '  %s\n' "${reasons[@]}" >&2
    exit 2
}

CUDA_CHECK='
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device")'

run() {  # run NAME SECONDS COMMAND...: at most SECONDS, and never past the whole budget
    local name=$1 limit=$2 left rc
    shift 2
    left=$((budget - (SECONDS - start)))
    ((limit > left)) && limit=$left
    if ((limit < ${RUN_MIN_SECONDS:-30})); then
        echo "== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$log"
        failed=1
        return
    fi
    echo "== $name (at most ${limit}s): $*" | tee -a "$log"
    PYTHONUNBUFFERED=1 timeout --kill-after=15 "$limit" "$@" 2>&1 | ${RUN_FILTER:-cat} | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "== $name: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', out of time'))" |
            tee -a "$log"
        failed=1
    fi
}
