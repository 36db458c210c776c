#!/usr/bin/env python
"""Where the microseconds of a small round trip go: one table, measured in this process and across processes.

Rows (medians of --reps batches of --n operations, us per operation; A B A B interleaved):

    pickle.dumps(request) / pickle.loads(request)      the serialization a round trip pays (x2 with the reply)
    enqueue+dequeue, same process, request / reply     queue work + pickling, no hand-off (no other process)
    queue work only                                    the line above minus its pickling
    round trip across processes (N=1)                  request out, reply back: two hand-offs
    hand-off (each way)                                (round trip - 2 x same-process pairs) / 2: wake-up latency,
                                                       cache-line transfers, scheduling

    python scripts/profile_transport.py [--spin-us US] [--spin-yield 0|1]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_transport import REQUEST  # noqa: E402
from transport import MessageQueue  # noqa: E402

REPLY = ("ok", 0, 1)


def _per_op(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _echo(handle, boot, opts):
    q = MessageQueue.create_from_handle(handle, 0)
    back = MessageQueue(1, 1 << 16, 8, **opts)
    boot.send(back.export_handle())
    back.wait_until_ready(timeout=60)
    while True:
        msg = q.dequeue()
        if msg is None:
            break
        back.enqueue(REPLY)
    q.close()
    back.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--spin-us", type=float, default=None)
    ap.add_argument("--spin-yield", type=int, choices=(0, 1), default=None)
    args = ap.parse_args(argv)
    opts = {k: v for k, v in (("spin_us", args.spin_us),
                              ("spin_yield", None if args.spin_yield is None else bool(args.spin_yield)))
            if v is not None}
    req_p, rep_p = pickle.dumps(REQUEST, 5), pickle.dumps(REPLY, 5)
    w = MessageQueue(1, 1 << 16, 8, **opts)
    r = MessageQueue.create_from_handle(w.export_handle(), 0)
    ctx = mp.get_context("spawn")
    xw = MessageQueue(1, 1 << 16, 8, **opts)
    boot_r, boot_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_echo, args=(xw.export_handle(), boot_w, opts), daemon=True)
    child.start()
    xr = MessageQueue.create_from_handle(boot_r.recv(), 0)
    xw.wait_until_ready(timeout=60)

    def pair(obj):
        return lambda: (w.enqueue(obj), r.dequeue())

    def round_trip():
        xw.enqueue(REQUEST)
        xr.dequeue()

    rows = {
        "pickle.dumps(request)": lambda: pickle.dumps(REQUEST, 5),
        "pickle.loads(request)": lambda: pickle.loads(req_p),
        "pickle.dumps+loads(reply)": lambda: pickle.loads(pickle.dumps(REPLY, 5)),
        "enqueue+dequeue request, same process": pair(REQUEST),
        "enqueue+dequeue reply, same process": pair(REPLY),
        "round trip across processes (N=1)": round_trip,
    }
    samples = {k: [] for k in rows}
    try:
        for _ in range(args.reps):
            for name, fn in rows.items():
                samples[name].append(_per_op(fn, args.n))
    finally:
        xw.enqueue(None)
        child.join(10)
        for q in (w, r, xw, xr):
            q.close()
        boot_r.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    pickling = med["pickle.dumps(request)"] + med["pickle.loads(request)"] + med["pickle.dumps+loads(reply)"]
    same = med["enqueue+dequeue request, same process"] + med["enqueue+dequeue reply, same process"]
    derived = {
        "queue work only (both pairs minus pickling)": same - pickling,
        "hand-off, each way ((round trip - both pairs) / 2)": (med["round trip across processes (N=1)"] - same) / 2,
    }
    print(f"\nsmall round trip, us per operation (median of {args.reps} x {args.n}; options {opts or 'default'})")
    for name, v in [*med.items(), *derived.items()]:
        print(f"  {name:55s} {v:8.2f}")
    rt = med["round trip across processes (N=1)"]
    print(f"  {'share of the round trip: pickling / queue / hand-offs':55s} "
          f"{pickling / rt:7.0%} {(same - pickling) / rt:5.0%} {(rt - same) / rt:5.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
