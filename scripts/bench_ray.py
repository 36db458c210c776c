#!/usr/bin/env python
"""backend=ray against backend=local, side by side in one run: start-up to READY and RPC round trips, tp=2, CPU.

A real two-node local Ray cluster (ray.cluster_utils, 2 CPUs a node) is started by this script and shut down at
the end. Each round starts one tree of each kind in turn (local, ray PACK, ray STRICT_SPREAD: the two ranks on two
"nodes"), the order rotating each round, and measures in process:

    READY        Supervisor(cfg) returns: every rank started, torch.distributed (gloo) initialised, model loaded
    ping         collective_rpc("ping") to both ranks, p50 / p99 over --calls calls
    execute      execute_model(x) of the default tp_mlp workload, p50 / p99
    shutdown     sup.shutdown()

The local backend's first round includes booting its forkserver (torch imported once); its later rounds reuse it,
as a long-lived service would. Ray's actors are fresh worker processes each time (Ray's pool is prestarted, but
each actor still imports torch). Usage: python scripts/bench_ray.py [--rounds 3] [--calls 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (REAPER, Watchdog, f_ms, f_s, f_x, format_table, log, median, paired_ratio, pct,  # noqa: E402
                           rotate, stop_forkserver, supervisor_config, vmax)

PEERS = {
    "local": ("backend=local",),
    "ray PACK": ("backend=ray",),
    "ray STRICT_SPREAD": ("backend=ray", "ray.placement_strategy=STRICT_SPREAD"),
}


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return cluster


def one_tree(overrides: tuple[str, ...], calls: int) -> dict:
    from supervisor.api import Supervisor
    from worker.tp_mlp import make_input, reference_forward

    cfg = supervisor_config("parallel.tp=2", "runtime.startup_timeout_s=180", *overrides)
    t0 = time.perf_counter()
    sup = Supervisor(cfg)
    ready = time.perf_counter() - t0
    try:
        x = make_input(cfg.workload, 0)
        err = float((sup.execute_model(x, timeout=120) - reference_forward(cfg.workload, x)).abs().max())
        ping, execute = [], []
        for _ in range(calls):
            t = time.perf_counter()
            sup.collective_rpc("ping", timeout=60)
            ping.append(time.perf_counter() - t)
        for _ in range(max(1, calls // 3)):
            t = time.perf_counter()
            sup.execute_model(x, timeout=60)
            execute.append(time.perf_counter() - t)
    finally:
        t = time.perf_counter()
        sup.shutdown()
        stop_s = time.perf_counter() - t
    return {"ready": ready, "ping": ping, "execute": execute, "stop": stop_s, "err": err}


def report(results: dict[str, list[dict]]) -> str:
    rows = []
    base = [r["ready"] for r in results["local"]]
    for name, runs in results.items():
        ready = [r["ready"] for r in runs]
        ping = [x for r in runs for x in r["ping"]]
        ex = [x for r in runs for x in r["execute"]]
        rows.append([name, f"{len(runs)}", f_s(median(ready)), f_s(vmax(ready)), f_x(paired_ratio(ready, base)),
                     f_ms(median(ping), 3), f_ms(pct(ping, .99), 3), f_ms(median(ex), 3), f_ms(pct(ex, .99), 3),
                     f_s(median([r["stop"] for r in runs])), f"{max(r['err'] for r in runs):.1e}"])
    local_ping = median([x for r in results["local"] for x in r["ping"]])
    notes = [f"ping ratio vs local (median): " + ", ".join(
        f"{n} {f_x(median([x for r in runs for x in r['ping']]) / local_ping)}" for n, runs in results.items()
        if n != "local"),
        "READY: Supervisor(cfg) in this process until it returns (all ranks READY, gloo initialised).",
        "ping: collective_rpc('ping') to both ranks; execute: execute_model of tp_mlp (hidden 256); err: max abs "
        "error of the first output against the single-process reference."]
    return format_table("tp=2 on a local two-node Ray cluster vs the local process tree (CPU, gloo)",
                        ["backend", "rounds", "READY med", "max", "vs local", "ping p50", "p99", "execute p50",
                         "p99", "shutdown", "err"], rows, notes)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--deadline", type=float, default=900.0, help="hard limit for the whole script, seconds")
    args = ap.parse_args()
    import ray

    results: dict[str, list[dict]] = {name: [] for name in PEERS}
    with Watchdog(args.deadline, REAPER, cleanup=stop_forkserver):
        log("starting a two-node local Ray cluster")
        cluster = start_cluster()
        try:
            for r in range(args.rounds):
                for name in rotate(list(PEERS), r):
                    res = one_tree(PEERS[name], args.calls)
                    results[name].append(res)
                    log(f"round {r + 1}/{args.rounds} {name}: READY {res['ready']:.3f} s, ping p50 "
                        f"{median(res['ping']) * 1e3:.3f} ms, shutdown {res['stop']:.3f} s")
        finally:
            ray.shutdown()
            cluster.shutdown()
            stop_forkserver()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
