#!/usr/bin/env bash
# One NCCL script at --nproc-per-node=1 under torchrun, rankvisor-run and rankvisor-run --fast: start; kill -9 of
# the rank mid-run -> resumed from its snapshot, kill -9 of the launcher -> survivors after 5 s. Prints one table.
# Under 3 minutes on one GPU. Run from the repository root:  bash scripts/gpu_launch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, hydra, psutil, loguru, cloudpickle; assert torch.cuda.is_available(), 'no GPU visible'" \
  || { echo "gpu_launch.sh: needs torch with CUDA, hydra-core, psutil, loguru, cloudpickle" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || true
exec timeout 170 python scripts/bench_launch.py --nproc 1 --rounds 2 --no-sigterm --backend nccl
