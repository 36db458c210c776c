#!/usr/bin/env bash
# Issue 22 on one GPU, in one go (under 9 minutes on an H100/H200): what the keeper's CUDA handles do when the keeper
# dies (scripts/gpu_keeper_check.py); then kill -9 of the rank -> first tokens again for workload=llm at the
# llama-3.2-1b and llama-3.1-8b shapes (seeded random bf16), tp=1: as configured (weight keeper + warm standby),
# keeper only, no keeper (scripts/bench_restart.py); and, when a copy of the code before the keeper is at .old/
# (git archive <commit> | tar -x -C .old), the same bench from that code in the same lease, for the before column.
#   bash scripts/gpu_recovery.sh [KILLS]
set -uo pipefail
cd "$(dirname "$0")/.."
kills="${1:-5}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader | head -1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "(no compiled transport: Python cursors)"
[ -d .old ] && (cd .old && python setup.py -q build_ext --inplace >/dev/null 2>&1)
timeout 120 python scripts/gpu_keeper_check.py
bench() { timeout "$1" python scripts/bench_restart.py --device cuda --dtype bfloat16 --rounds 1 --kills "$kills" \
  --budget-s "$(( $1 - 10 ))" "${@:2}"; }
bench 330 --presets llama-3.2-1b,llama-3.1-8b --variants "as configured,keeper only,no keeper"
if [ -d .old ]; then
  (cd .old && timeout 150 python scripts/bench_restart.py --device cuda --dtype bfloat16 --rounds 1 \
     --kills "$kills" --budget-s 140 --presets llama-3.2-1b,llama-3.1-8b --variants "as configured") \
    | sed 's/as configured/before (bc553f0)/'
fi
