#!/usr/bin/env python
"""What watching the tree costs (issue 15).

    (a) The RPC hot path: collective_rpc("echo") round trips at tp=2 (echo worker), three peers interleaved round
        by round (A B C A B C ...): the call hook off (Supervisor.calls.sent a no-op), the hook on (the default:
        calls in flight for the status table), and the hook plus the Prometheus sink (latency histogram, failure
        counter: what http.when=always adds). Ratios against "hook off", per round, then the median.
    (b) A view's cost at tp=4: Supervisor.status(), one /metrics exposition, one control-socket status request
        (a client in this process, the server thread answering).

    python scripts/bench_observe.py            # 10 rounds x 2000 calls
    python scripts/bench_observe.py --quick    # 4 rounds x 300 calls

Progress goes to stderr; the tables are printed last, on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)


def _calls(sup, n: int) -> list[float]:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        sup.collective_rpc("echo", args=(i,), timeout=30)
        lat.append(time.perf_counter() - t)
    return lat


def bench_hot_path(rounds: int, n: int) -> str:
    from supervisor.api import Supervisor
    from supervisor.observe.metrics import Metrics

    with Supervisor(C.supervisor_config("worker=echo", "parallel.tp=2")) as sup:
        hooked = sup.calls.sent
        metrics = Metrics(sup)
        _calls(sup, n)  # warm-up
        samples: dict[str, list[float]] = {"hook off": [], "hook on": [], "hook + metrics": []}
        per_round: dict[str, list[float]] = {k: [] for k in samples}
        for r in range(rounds):
            for peer in C.rotate(list(samples), r):
                sup.calls.sent = hooked if peer != "hook off" else (lambda *a: None)
                if peer == "hook + metrics":
                    sup.calls.add_sink(metrics.on_call)
                lat = _calls(sup, n)
                sup.calls.remove_sink(metrics.on_call)
                samples[peer] += lat
                per_round[peer].append(C.median(lat))
            C.log(f"round {r + 1}/{rounds}")
        sup.calls.sent = hooked
    off = per_round["hook off"]
    rows = [[peer, len(lat), C.f_ms(C.median(lat) , 3), C.f_ms(C.pct(lat, 0.99), 3),
             C.f_x(C.paired_ratio(per_round[peer], off))] for peer, lat in samples.items()]
    return C.format_table("(a) collective_rpc('echo') at tp=2, echo worker: the call hook's cost",
                          ["peer", "calls", "p50 ms", "p99 ms", "p50 ratio vs off"], rows,
                          [f"{rounds} rounds x {n} calls per peer, interleaved; ratio = median over rounds of "
                           "(this peer's round median / hook off's)"])


def bench_views(repeat: int) -> str:
    from supervisor.api import Supervisor
    from supervisor.observe import control
    from supervisor.observe.metrics import Metrics
    from supervisor.observe.session import Watch

    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = C.supervisor_config("worker=echo", "parallel.tp=4", f"logging.run_dir={run_dir}")
        with Supervisor(cfg) as sup:
            watch = Watch(sup, time.monotonic())
            metrics = Metrics(sup)
            try:
                for name, fn in [("Supervisor.status()", sup.status),
                                 ("/metrics exposition", metrics.exposition),
                                 ("control.sock status request", lambda: control.request(run_dir, {"cmd": "status"}))]:
                    fn()
                    lat = []
                    for _ in range(repeat):
                        t = time.perf_counter()
                        fn()
                        lat.append(time.perf_counter() - t)
                    rows.append([name, repeat, C.f_ms(C.median(lat)), C.f_ms(C.pct(lat, 0.99))])
            finally:
                watch.close(0)
    return C.format_table("(b) one view of a tp=4 tree", ["view", "n", "p50 ms", "p99 ms"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, n, repeat = (4, 300, 50) if args.quick else (10, 2000, 200)
    tables = [bench_hot_path(rounds, n), bench_views(repeat)]
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
