#!/usr/bin/env python
"""What the weight keeper's CUDA handles do when the keeper dies, measured on the GPU (worker/weights.py relies on it).

For each way of sharing (torch's CUDA IPC over expandable segments, i.e. the driver's VMM handles; and the legacy
cudaIpc handles of the default allocator): a producer process (the keeper's role) fills 2 GiB on the GPU with a
pattern and exports it; a consumer (a rank's role) maps it, checks the pattern, then the producer is SIGKILLed and,
after other processes allocate and free memory on the card (so freed pages would be reused), the consumer reads the
pattern again. Printed per mode: the consumer's open time, whether its mapping still read the pattern after the
producer's death (or what error it got), and the card's used memory (nvidia-smi) at each step, the last one after the
consumer exited too.

    python scripts/gpu_keeper_check.py            (needs one CUDA GPU; about 30 s)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

NBYTES = 2 << 30


def used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return int(out[0]) if out else -1


def producer(expandable: bool, conn) -> None:
    if expandable:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    buf = torch.empty(NBYTES, dtype=torch.uint8, device="cuda")
    buf.copy_(torch.arange(NBYTES, dtype=torch.int64, device="cuda").remainder_(251).to(torch.uint8))
    torch.cuda.synchronize()
    _, args = reduce_tensor(buf)
    conn.send((args, int(buf.long().sum().item())))
    time.sleep(3600)


def consumer(args, want: int, conn) -> None:
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    torch.zeros(1, device="cuda")
    t0 = time.perf_counter()
    buf = rebuild_cuda_tensor(*args)
    torch.cuda.synchronize()
    conn.send(("opened", time.perf_counter() - t0, int(buf.long().sum().item()) == want))
    conn.recv()  # the producer is dead now, and the card's memory was churned
    try:
        ok = int(buf.long().sum().item()) == want
        torch.cuda.synchronize()
        conn.send(("after", ok, ""))
    except Exception as exc:  # noqa: BLE001 - we report whatever the driver says
        conn.send(("after", False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))


def churn() -> None:
    import torch

    x = torch.empty(NBYTES * 2, dtype=torch.uint8, device="cuda")
    x.fill_(7)
    torch.cuda.synchronize()


def one_mode(expandable: bool) -> list[str]:
    ctx = mp.get_context("spawn")
    base = used_mib()
    p_conn, p_child = ctx.Pipe()
    prod = ctx.Process(target=producer, args=(expandable, p_child))
    prod.start()
    args, want = p_conn.recv()
    c_conn, c_child = ctx.Pipe()
    cons = ctx.Process(target=consumer, args=(args, want, c_child))
    cons.start()
    _, open_s, ok_before = c_conn.recv()
    mapped = used_mib()
    os.kill(prod.pid, signal.SIGKILL)
    prod.join(30)
    time.sleep(0.5)
    after_kill = used_mib()
    for _ in range(2):
        ch = ctx.Process(target=churn)
        ch.start()
        ch.join(120)
    c_conn.send("read")
    _, ok_after, err = c_conn.recv() if c_conn.poll(60) else ("after", False, "no answer in 60 s")
    cons.kill()
    cons.join(30)
    time.sleep(0.5)
    end = used_mib()
    name = "expandable (VMM)" if expandable else "legacy cudaIpc"
    return [name, f"{open_s * 1e3:.1f} ms", str(ok_before), str(ok_after) + (f" ({err})" if err else ""),
            f"{base} / {mapped} / {after_kill} / {end} MiB"]


def main() -> int:
    rows = [one_mode(True), one_mode(False)]
    head = ["mode", "open", "pattern before", "pattern after producer kill -9 + churn",
            "used: base / mapped / producer dead / all exited"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("\n== the weight keeper's CUDA handles when the keeper dies")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
