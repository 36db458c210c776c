"""The RPC round trip before and after a change, side by side: `collective_rpc("ping")` through the supervisor's
shared-memory rings, in two checkouts run alternately (A B A B ...), each round a fresh tree in its own process.

    python scripts/bench_ping.py --old /tmp/rv-old          # a `git worktree` of the commit to compare against
    python scripts/bench_ping.py --old /tmp/rv-old --rounds 6 --calls 3000 --tp 2

``--channel``: the channel layer alone, in one process and one tree: this checkout's RpcChannel and the other
checkout's (supervisor/core/rpc.py loaded from --old) take turns over the same rings (A B A B), so nothing else
that changed between the two commits (API, metrics hooks) is in the figures.

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


CHANNEL_CHILD = r"""
import importlib.util, json, sys, time
from supervisor.api import Supervisor
from supervisor.config import load_config

def main():
    old_path, tp, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    spec = importlib.util.spec_from_file_location("old_rpc", old_path)
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    cfg = load_config(["worker=echo", f"parallel.tp={tp}", "logging.events=false", "logging.level=WARNING"])
    res = {"channel old": [], "channel new": []}
    with Supervisor(cfg) as sup:
        new = sup._life.groups[0].channel
        prev = old.RpcChannel(new.bcast, new.replies, new.rank_offset)
        prev._ids = iter(range(10**9, 2 * 10**9))  # ids apart from the new channel's
        for _ in range(rounds):
            for label, ch in (("channel old", prev), ("channel new", new)):
                for i in range(n + 200):
                    t = time.perf_counter()
                    ch.wait(ch.send("ping", (), None, None, None, "ping"), None)
                    if i >= 200:
                        res[label].append(time.perf_counter() - t)
    print(json.dumps(res))

if __name__ == "__main__":
    main()
"""


def channel_main(a) -> None:
    old_rpc = os.path.join(os.path.abspath(a.old), "supervisor", "core", "rpc.py")
    out = subprocess.run([sys.executable, "-c", CHANNEL_CHILD, old_rpc, str(a.tp), str(a.calls), str(a.rounds)],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    old, new = res["channel old"], res["channel new"]
    print(f"\nchannel send+wait of ping, tp={a.tp}, {a.rounds} rounds x {a.calls} calls (A B A B, one tree), us")
    print(f"{'channel':<10} {'p50':>8} {'p99':>8}")
    for label, xs in (("old", old), ("new", new)):
        print(f"{label:<10} {median(xs) * 1e6:>8.1f} {pct(xs, .99) * 1e6:>8.1f}")
    print(f"new/old p50 {median(new) / median(old):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a checkout of the commit to compare against (git worktree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--channel", action="store_true", help="the channel layer alone (see above)")
    a = ap.parse_args()
    if a.channel:
        channel_main(a)
        return
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
