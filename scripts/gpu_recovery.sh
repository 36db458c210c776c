#!/usr/bin/env bash
# Issue 22 on one GPU, in one go, within BUDGET seconds (default 570): what the keeper's CUDA handles do when the keeper
# dies (scripts/gpu_keeper_check.py); the cuda-marked tests (tests/integration/test_gpu_recovery.py, test_cuda.py and,
# when present, test_gpu_faults.py); kill -9 of the rank -> first tokens again for workload=llm at the llama-3.2-1b
# and llama-3.1-8b shapes (seeded random bf16), tp=1: as configured (weight keeper + warm standby), keeper only, no
# keeper (scripts/bench_restart.py); and, when a copy of the code before the keeper is at .old/
# (git archive <commit> | tar -x -C .old), the same bench of that code in the same lease, for the before column.
# Each step gets what is left of the budget at most, so the script always ends in time with what it measured.
#   bash scripts/gpu_recovery.sh [KILLS] [BUDGET]
set -uo pipefail
cd "$(dirname "$0")/.."
kills="${1:-4}"
end=$(( $(date +%s) + ${2:-570} ))
left() { local l=$(( end - $(date +%s) )); (( l < $1 )) && echo "$l" || echo "$1"; }
step() { local t; t=$(left "$1"); shift; (( t > 5 )) && timeout "$t" "$@" || echo "(skipped or cut: $*)"; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader | head -1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "(no compiled transport: Python cursors)"
step 60 python scripts/gpu_keeper_check.py
tests=(tests/integration/test_gpu_recovery.py tests/integration/test_cuda.py)
[ -f tests/integration/test_gpu_faults.py ] && tests+=(tests/integration/test_gpu_faults.py)
step 200 python -m pytest -q -p no:cacheprovider -m cuda -rs "${tests[@]}" 2>&1 | tail -25
step 230 python scripts/bench_restart.py --device cuda --dtype bfloat16 --rounds 1 --kills "$kills" \
  --presets llama-3.2-1b,llama-3.1-8b --variants "as configured,keeper only,no keeper" --budget-s "$(left 220)"
if [ -d .old ]; then
  (cd .old && python setup.py -q build_ext --inplace >/dev/null 2>&1
   t=$(( end - $(date +%s) - 5 )); (( t > 30 )) && timeout "$t" python scripts/bench_restart.py --device cuda \
     --dtype bfloat16 --rounds 1 --kills "$kills" --budget-s "$(( t - 5 ))" --presets llama-3.1-8b,llama-3.2-1b \
     --variants "as configured" | sed 's/as configured/before (bc553f0)/')
fi
