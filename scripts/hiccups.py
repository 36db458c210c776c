#!/usr/bin/env python
"""How often the host takes the CPU away from a busy process, and for how long: the floor under a p99.

A process that never sleeps still loses its CPU now and then: the scheduler tick, other interrupts, a migration,
and in a virtual machine the exits to the hypervisor those cost. A round trip of a few microseconds that meets
one of them takes that much longer. So if a process is interrupted R times a second, a call of D seconds that
keeps P processes busy is hit with probability about ``R x D x P``; once that reaches 1%, the p99 of the call is
its median plus one interruption, whatever the transport does.

Each of --procs processes spins for --seconds reading the clock in a tight loop and records every gap between
two reads longer than --min-us (a loop turn takes well under a microsecond). Printed: gaps per second and process,
their median and p99 length, and what they mean for a call of the median lengths given with --calls-us.

    python scripts/hiccups.py [--procs 2] [--seconds 2] [--min-us 2] [--calls-us 5.5,11.5] [--call-procs 2,9] [--pin]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _spin(seconds: float, min_ns: int, out, cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    perf = time.perf_counter_ns
    gaps = []
    end = perf() + int(seconds * 1e9)
    last = perf()
    while last < end:
        now = perf()
        if now - last >= min_ns:
            gaps.append(now - last)
        last = now
    out.send(gaps)
    out.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--min-us", type=float, default=2.0)
    ap.add_argument("--calls-us", default="5.5,11.5", help="call medians to judge (us), comma-separated")
    ap.add_argument("--call-procs", default="2,9", help="processes busy during each of those calls")
    ap.add_argument("--pin", action="store_true", help="every spinning process on a CPU of its own")
    args = ap.parse_args(argv)
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    cpus = sorted(os.sched_getaffinity(0))
    for i in range(args.procs):
        rd, wr = ctx.Pipe(duplex=False)
        cpu = cpus[i % len(cpus)] if args.pin else None
        p = ctx.Process(target=_spin, args=(args.seconds, int(args.min_us * 1000), wr, cpu), daemon=True)
        p.start()
        wr.close()
        pipes.append(rd)
        procs.append(p)
    gaps = []
    for rd in pipes:
        if rd.poll(args.seconds + 30):
            gaps.extend(rd.recv())
        rd.close()
    for p in procs:
        p.join(10)
    rate = len(gaps) / args.procs / args.seconds
    print(f"host: {os.cpu_count()} CPUs; {args.procs} spinning processes x {args.seconds:g} s"
          + (", each on a CPU of its own" if args.pin else ", placed by the scheduler"))
    if not gaps:
        print(f"no gap of {args.min_us:g} us or more")
        return 0
    us = sorted(g / 1e3 for g in gaps)
    print(f"gaps >= {args.min_us:g} us: {rate:.0f} per second per process; length median {statistics.median(us):.1f} "
          f"us, p99 {us[int(0.99 * (len(us) - 1))]:.1f} us, max {us[-1]:.1f} us")
    for lim in (5, 10, 50, 200):
        print(f"  >= {lim:>3d} us: {sum(g >= lim for g in us) / args.procs / args.seconds:8.1f} per second per process")
    print("a call of D us keeping P processes busy is hit with probability ~ rate x D x P:")
    for d, pcount in zip((float(x) for x in args.calls_us.split(",")), (int(x) for x in args.call_procs.split(","))):
        p_hit = rate * d * 1e-6 * pcount
        print(f"  D={d:g} us, P={pcount}: {100 * p_hit:.1f}% of calls -> p99 "
              + (f"~ median + {statistics.median(us):.1f} us" if p_hit >= 0.01 else "not set by these gaps"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
