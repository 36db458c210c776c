"""A rank of a multi-node job that needs no torch (the multi-node tests keep their CPU for the launchers): it writes
its environment and pid to $OUT_DIR/up.<RANK>.<TORCHELASTIC_RESTART_COUNT>.json, then takes $STEPS steps of 0.1 s,
resuming from its snapshot $OUT_DIR/snap.<RANK>, and exits 0. A file $OUT_DIR/hold keeps it stepping (no end)."""
import json
import os
import time

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main() -> None:
    out, rank = os.environ["OUT_DIR"], os.environ["RANK"]
    snap = os.path.join(out, f"snap.{rank}")
    step = int(open(snap).read()) if os.path.exists(snap) else 0
    info = {k: os.environ.get(k) for k in KEYS}
    info.update(pid=os.getpid(), resumed_at=step)
    _write(os.path.join(out, f"up.{rank}.{os.environ['TORCHELASTIC_RESTART_COUNT']}.json"), json.dumps(info))
    while step < int(os.environ.get("STEPS", "20")) or os.path.exists(os.path.join(out, "hold")):
        time.sleep(0.1)
        step += 1
        _write(snap, str(step))


if __name__ == "__main__":
    main()
