"""The RPC round trip before and after a change, side by side: `collective_rpc("ping")` through the supervisor's
shared-memory rings, in two checkouts run alternately (A B A B ...), each round a fresh tree in its own process.

    python scripts/bench_ping.py --old /tmp/rv-old          # a `git worktree` of the commit to compare against
    python scripts/bench_ping.py --old /tmp/rv-old --rounds 6 --calls 3000 --tp 2

Per checkout it times blocking pings (no timeout, and timeout=5), and for this checkout also a non-blocking
Future's result(). Prints median / p99 per variant and the new/old ratio of medians. Each round runs in a child
interpreter whose sys.path starts with the checkout, so the two never mix.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import median, pct  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import json, sys, time
from supervisor.api import Supervisor
from supervisor.config import load_config

def timed(fn, n):
    for _ in range(200):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out

def main():
    tp, n = int(sys.argv[1]), int(sys.argv[2])
    cfg = load_config(["worker=echo", f"parallel.tp={tp}", "logging.events=false", "logging.level=WARNING"])
    with Supervisor(cfg) as sup:
        res = {"ping": timed(lambda: sup.collective_rpc("ping"), n),
               "ping timeout=5": timed(lambda: sup.collective_rpc("ping", timeout=5), n)}
        try:
            from supervisor.core.rpc import CallFuture  # noqa: F401  (only the new design has it)
            res["future result()"] = timed(lambda: sup.collective_rpc("ping", non_block=True).result(), n)
        except ImportError:
            pass
    print(json.dumps(res))

if __name__ == "__main__":
    main()
"""


def run_round(checkout: str, tp: int, calls: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tp), str(calls)], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"round in {checkout} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a checkout of the commit to compare against (git worktree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tp", type=int, default=2)
    a = ap.parse_args()
    samples: dict[tuple[str, str], list[float]] = {}
    for i in range(a.rounds):
        for label, checkout in (("old", os.path.abspath(a.old)), ("new", ROOT)):  # A B A B
            for what, lat in run_round(checkout, a.tp, a.calls).items():
                samples.setdefault((label, what), []).extend(lat)
        print(f"round {i + 1}/{a.rounds} done", file=sys.stderr)
    print(f"\nping round trip, tp={a.tp}, {a.rounds} rounds x {a.calls} calls each (A B A B), microseconds")
    print(f"{'variant':<20} {'old p50':>9} {'old p99':>9} {'new p50':>9} {'new p99':>9} {'new/old p50':>12}")
    for what in dict.fromkeys(w for _, w in samples):
        old, new = samples.get(("old", what), []), samples.get(("new", what), [])
        o50, o99 = (median(old) * 1e6, pct(old, .99) * 1e6) if old else (float("nan"),) * 2
        n50, n99 = median(new) * 1e6, pct(new, .99) * 1e6
        print(f"{what:<20} {o50:>9.1f} {o99:>9.1f} {n50:>9.1f} {n99:>9.1f} {n50 / o50 if old else float('nan'):>12.3f}")


if __name__ == "__main__":
    main()
