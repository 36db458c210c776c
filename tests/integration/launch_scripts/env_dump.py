"""Writes the torchrun variables it sees to $OUT_DIR/env.<RANK>.json, its arguments included."""
import json
import os
import sys

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_ERROR_FILE",
        "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS")

if __name__ == "__main__":
    env = {k: os.environ.get(k) for k in KEYS}
    env["argv"] = sys.argv[1:]
    with open(os.path.join(os.environ["OUT_DIR"], f"env.{env['RANK']}.json"), "w") as f:
        json.dump(env, f)
    print(f"hello from rank {env['RANK']}")
    print(f"stderr of rank {env['RANK']}", file=sys.stderr)
