#!/usr/bin/env bash
# The rest of issue 22 on one GPU within BUDGET seconds (default 540): the cuda-marked tests (the keeper and standby,
# the GPU fault rows, the older CUDA tests), command -> first token cold for the 8B shape against transformers
# (scripts/bench_coldstart.py; the checkpoint is written first, so that both read it from the page cache), and each
# GPU fault row once, timed (scripts/gpu_faults.py). scripts/gpu_recovery.sh measures the restarts themselves.
#   bash scripts/gpu_issue22.sh [BUDGET] [COLD_PRESET]   (COLD_PRESET: llama-3.1-8b by default; llama-3.2-1b is
#   written by the tests already, so it costs no checkpoint write)
set -uo pipefail
cd "$(dirname "$0")/.."
end=$(( $(date +%s) + ${1:-540} ))
left() { local l=$(( end - $(date +%s) )); (( l < $1 )) && echo "$l" || echo "$1"; }
step() { local t; t=$(left "$1"); shift; if (( t > 5 )); then timeout "$t" "$@"; else echo "(no time left: $*)"; fi; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader | head -1
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "(no compiled transport: Python cursors)"
step 160 python -m pytest -q -p no:cacheprovider -m cuda -rs tests/integration/test_gpu_recovery.py \
  tests/integration/test_gpu_faults.py tests/integration/test_cuda.py 2>&1 | tail -30
step 130 python scripts/gpu_faults.py --budget-s "$(left 110)"
cold="${2:-llama-3.1-8b}"
step 60 python -c "from worker.llm.checkpoint import resolve; resolve('', '$cold', '', 0, 'bfloat16', 'cuda')"
step 130 python scripts/bench_coldstart.py --device cuda --preset "$cold" --dtype bfloat16 --rounds 1
