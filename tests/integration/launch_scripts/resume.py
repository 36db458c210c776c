"""The elastic tutorials' snapshot pattern: save every step, resume after a restart. Rank $KILL_RANK kills itself
(SIGKILL) at step $KILL_STEP of the first attempt; the run must still finish all steps from the snapshot. With
$HOLD set, every rank then stays up with one child process, writing both pids to $OUT_DIR/held.<RANK>."""
import json
import os
import signal
import subprocess
import time

import torch.distributed as dist

STEPS = 6


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = os.environ["OUT_DIR"]
    snap = os.path.join(out, "snapshot.json")
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    start = json.load(open(snap))["step"] if os.path.exists(snap) else 0
    with open(os.path.join(out, f"resumed.{rank}.{restart}"), "w") as f:
        f.write(str(start))
    for step in range(start, STEPS):
        dist.barrier()
        if rank == 0:
            tmp = snap + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"step": step + 1}, f)
            os.replace(tmp, snap)
        if restart == 0 and rank == int(os.environ["KILL_RANK"]) and step == int(os.environ["KILL_STEP"]):
            time.sleep(0.2)  # let rank 0 write the snapshot of this step
            os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    with open(os.path.join(out, f"done.{rank}"), "w") as f:
        f.write(str(restart))
    dist.destroy_process_group()
    if os.environ.get("HOLD"):  # stay up with a child, for a kill -9 of the launcher (FAULTS row 47)
        child = subprocess.Popen(["sleep", "600"])
        with open(os.path.join(out, f"held.{rank}.tmp"), "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        os.replace(os.path.join(out, f"held.{rank}.tmp"), os.path.join(out, f"held.{rank}"))
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main()
