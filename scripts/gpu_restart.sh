#!/usr/bin/env bash
# kill -9 of the rank -> serving again for workload=llm at the llama-3.2-1b and llama-3.1-8b shapes (seeded random
# bf16 weights), tp=1, on one GPU, split into its parts: detect + policy + spawn, process start, CUDA init, NCCL init,
# weight read (safetensors -> CPU), host -> device copy, READY -> serving, first step (prefill + 1 decode). Variants
# side by side: as configured, without the worker's gc.freeze(), with eager NCCL init (the code before the cuts). One table per
# shape. Under 5 minutes on an H200 (the first run also writes the 8B random checkpoint once, ~16 GB, into
# ~/.cache/rankvisor/llm; later runs read it from the page cache). Run from the repository root:
#   bash scripts/gpu_restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, hydra, psutil, loguru, cloudpickle, safetensors; assert torch.cuda.is_available(), 'no GPU'" \
  || { echo "gpu_restart.sh: needs torch with CUDA, hydra-core, psutil, loguru, cloudpickle, safetensors" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
df -h "${HOME}/.cache" 2>/dev/null | tail -1 || true
exec timeout 290 python scripts/bench_restart.py --device cuda --presets llama-3.2-1b,llama-3.1-8b --dtype bfloat16 \
  --variants "as configured,no gc.freeze,eager NCCL" --rounds 1 --kills 2 --budget-s 280
