"""A rank of a multi-node job: it writes its environment and pid to $OUT_DIR/up.<RANK>.<TORCHELASTIC_RESTART_COUNT>.json,
then takes $STEPS steps of 0.1 s, resuming from its snapshot $OUT_DIR/snap.<RANK>, and exits 0. A file $OUT_DIR/hold
keeps it stepping (no end). Without torch by default (the multi-node tests keep their CPU for the launchers); with
GLOO=1 every step is a gloo all-reduce of the whole world, so a node's loss finds its peers inside a collective."""
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


def _collective():
    if not os.environ.get("GLOO"):
        return None
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()  # every rank of every node connected before the rank says it is up
    return dist


def _more(step: int, out: str, dist) -> bool:
    """Another step? With gloo, an all-reduce of every rank's answer: they all leave at the same step."""
    more = step < int(os.environ.get("STEPS", "20")) or os.path.exists(os.path.join(out, "hold"))
    if dist is None:
        return more
    import torch

    flag = torch.tensor([int(more)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def main() -> None:
    dist = _collective()
    out, rank = os.environ["OUT_DIR"], os.environ["RANK"]
    snap = os.path.join(out, f"snap.{rank}")
    step = int(open(snap).read()) if os.path.exists(snap) else 0
    info = {k: os.environ.get(k) for k in KEYS}
    info.update(pid=os.getpid(), resumed_at=step)
    _write(os.path.join(out, f"up.{rank}.{os.environ['TORCHELASTIC_RESTART_COUNT']}.json"), json.dumps(info))
    while _more(step, out, dist):
        time.sleep(0.1)
        step += 1
        _write(snap, str(step))
    if dist is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
