#!/usr/bin/env python
"""Restart policies under fire: how fast failures are noticed and recovered, and who notices.

Everything runs in this process through the Supervisor API (events are read from ``sup.events``, which carry
unix time, against ``time.time()`` taken just before the kill).

    (a) SIGKILL -> "exited" event latency: one_for_one, tp=1, echo worker, an intensity that never gives up;
        >= 200 kills (--quick: 20), with the default start method (forkserver, torch preloaded) and with spawn.
        Floor peers, interleaved: a bare multiprocessing.Process started the same way, killed the same way, noticed
        by a thread blocked on its sentinel (ratio = supervisor / floor). A process that maps torch takes the kernel
        tens of ms to tear down before anyone can see it die; the floor shows how much.
    (b) one_for_all restart of tp = 1 2 4 (default tp_mlp worker, gloo): kill one rank, time until every rank of
        the group is READY again ("ready" events of the next attempt) and until execute_model answers again; every
        pid must have changed. Peer: torchrun --max-restarts (it also restarts every rank), same kill, time until
        every rank of the next restart wrote its READY file.
    (c) SIGSTOP -> declared hung: heartbeat interval 0.2 s, timeout 1.0 s; time from SIGSTOP to the "hung" event.
    (d) dp=2, tp=1, one_for_one, echo worker: a client thread calls collective_rpc("echo", group=0) back to back
        while group 1 is killed again and again (phases with kills and quiet phases interleaved); calls to the
        healthy replica must all succeed.

    python scripts/bench_recovery.py            # full run
    python scripts/bench_recovery.py --quick    # small counts, a sanity run

Progress goes to stderr; the tables are printed last, on stdout.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)

TARGET_EXIT_P99_S = 0.010
TARGET_RESTART_TP4_S = 1.0
HB_INTERVAL_S = 0.2
HB_TIMEOUT_S = 1.0
EVENT_TIMEOUT_S = 10.0
RESTART_TIMEOUT_S = 60.0
NEVER_GIVE_UP = ("restart.intensity=100000", "restart.period_s=1")


# ---------------------------------------------------------------------------------------------------------------
# in-process supervisors
class Tree:
    """A Supervisor started in this process, its workers recorded for cleanup, shut down by close()."""

    def __init__(self, *overrides: str) -> None:
        from supervisor.api import Supervisor

        self.sup = Supervisor(C.supervisor_config(*overrides), start=False)
        self.failed = threading.Event()
        self.sup.register_failure_callback(lambda: self.failed.set())
        try:
            self.sup.start()
        except BaseException:
            self.close()
            raise
        self.track()

    def track(self) -> list[int]:
        pids = [p for p in self.sup.pids() if p]
        C.REAPER.track(*pids)
        return pids

    def events(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.sup.events.of_kind(kind) if all(e.get(k) == v for k, v in match.items())]

    def last_attempt(self, group: int = 0) -> int:
        return max((e.get("attempt", 0) for e in self.events("ready", group=group)), default=0)

    def wait_ready_after(self, attempt: int, n: int, group: int = 0, timeout: float = RESTART_TIMEOUT_S):
        """The n "ready" events of group ``group`` with an attempt > ``attempt`` (None on timeout)."""
        def got():
            evs = [e for e in self.events("ready", group=group) if e.get("attempt", 0) > attempt]
            return evs if len(evs) >= n else None

        evs = C.wait_until(got, timeout, 0.002)
        if evs:
            self.track()
        return evs

    def pid_of(self, group: int, rank: int) -> int:
        return next(r["pid"] for r in self.sup.status() if r["group"] == group and r["rank"] == rank)

    def close(self) -> None:
        pids = [p for p in self.sup.pids() if p]
        try:
            self.sup.shutdown()
        finally:
            C.REAPER.kill(pids)


def _floor_target(conn) -> None:
    """The floor peer's process: say it is up, then idle (module level: spawn and forkserver pickle it by name)."""
    conn.send_bytes(b"up")
    time.sleep(1000)


class FloorChild:
    """The floor of the supervisor's own mechanism: a bare multiprocessing.Process started the same way as the
    workers (forkserver: the very forkserver the supervisor started, torch preloaded; or spawn) and a thread
    blocked on its sentinel, noting time.time() when it fires. No supervisor code in the path."""

    def __init__(self, method: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context(method)
        r, w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_floor_target, args=(w,), daemon=True)
        self.proc.start()
        w.close()
        C.REAPER.track(self.proc.pid)
        up = r.poll(60)
        r.close()
        if not up:
            self.close()
            raise RuntimeError(f"floor process ({method}) did not start")
        self.t_exit: float | None = None
        self.done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        from multiprocessing.connection import wait

        wait([self.proc.sentinel], timeout=EVENT_TIMEOUT_S + 5)
        self.t_exit = time.time()
        self.done.set()

    def kill_and_time(self) -> float | None:
        time.sleep(0.01)  # the same settling pause as the supervised peers
        t = time.time()
        os.kill(self.proc.pid, signal.SIGKILL)
        if not self.done.wait(EVENT_TIMEOUT_S):
            return None
        return self.t_exit - t

    def close(self) -> None:
        C.REAPER.kill([self.proc.pid])
        self.proc.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# (a) SIGKILL -> exited
A_PEERS = ("supervisor forkserver", "floor forkserver", "supervisor spawn", "floor spawn")
A_PEERS_NO_SPAWN = A_PEERS[:2]


def kill_supervised_once(tree: Tree) -> tuple[float, float, float]:
    """kill -9 the only worker: (kill -> 'exited' event, kill -> 'restarting' event, kill -> 'ready' again), NaN
    when missed."""
    attempt = tree.last_attempt()
    pid = tree.pid_of(0, 0)
    tree.failed.clear()
    time.sleep(0.01)
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    tree.failed.wait(EVENT_TIMEOUT_S)  # a wake-up only: the latency is the event's own timestamp
    ev = C.wait_until(lambda: tree.events("exited", pid=pid), EVENT_TIMEOUT_S, 0.002)
    ready = tree.wait_ready_after(attempt, 1)
    if not ready:
        raise RuntimeError(f"(a) the worker (pid {pid}) did not come back")
    rs = [e for e in tree.events("restarting") if e["time"] >= t_kill]
    return (ev[-1]["time"] - t_kill if ev else math.nan), (rs[0]["time"] - t_kill if rs else math.nan), \
        ready[-1]["time"] - t_kill


def part_a(kills: int, with_spawn: bool) -> dict[str, Any]:
    base = ("worker=echo", "restart=one_for_one", "parallel.tp=1", *NEVER_GIVE_UP)
    trees: dict[str, Tree] = {}
    lat: dict[str, list[float]] = defaultdict(list)
    restart: dict[str, list[float]] = defaultdict(list)
    decided: dict[str, list[float]] = defaultdict(list)
    try:
        trees["forkserver"] = Tree(*base)  # the default start method: forkserver, torch preloaded
        if with_spawn:
            trees["spawn"] = Tree(*base, "runtime.start_method=spawn")  # the echo worker never imports torch
        peers = A_PEERS if with_spawn else A_PEERS_NO_SPAWN
        for i in range(kills):
            for peer in C.rotate(peers, i):
                kind, method = peer.split()
                if kind == "floor":
                    child = FloorChild(method)
                    try:
                        v = child.kill_and_time()
                    finally:
                        child.close()
                    lat[peer].append(v if v is not None else math.nan)
                else:
                    v, dec, back = kill_supervised_once(trees[method])
                    lat[peer].append(v)
                    decided[peer].append(dec - v)
                    restart[peer].append(back)
            if (i + 1) % max(1, kills // 5) == 0:
                C.log(f"(a) {i + 1}/{kills}: " + ", ".join(f"{p} p50 {C.f_ms(C.median(lat[p]))}" for p in peers))
        restarts = {m: t.sup.status()[0]["restarts"] for m, t in trees.items()}
    finally:
        for t in trees.values():
            t.close()
    return {"lat": lat, "restart": restart, "decided": decided, "restarts": restarts, "kills": kills}


def table_a(d: dict[str, Any]) -> tuple[str, dict]:
    header = ["peer", "n", "kill -> noticed p50", "p99", "max", "vs floor p50", "vs floor p99", "missed",
              "exited -> restarting p50", "kill -> READY again p50", "p99"]
    rows = []
    lat, rst, dec = d["lat"], d["restart"], d["decided"]
    for peer in [p for p in A_PEERS if lat.get(p)]:
        v = lat.get(peer, [])
        floor = lat.get("floor " + peer.split()[1], [])
        is_sup = peer.startswith("supervisor")
        rows.append([peer, len(v), C.f_ms(C.median(v)), C.f_ms(C.pct(v, .99)), C.f_ms(C.vmax(v)),
                     C.f_x(C.ratio(C.median(v), C.median(floor))) if is_sup else "",
                     C.f_x(C.ratio(C.pct(v, .99), C.pct(floor, .99))) if is_sup else "",
                     sum(1 for x in v if math.isnan(x)), C.f_ms(C.median(dec.get(peer, []))) if is_sup else "",
                     C.f_ms(C.median(rst.get(peer, []))) if is_sup else "", C.f_ms(C.pct(rst.get(peer, []), .99))
                     if is_sup else ""])
    s = lat.get("supervisor forkserver", [])
    p99 = C.pct(s, .99)
    ok = C.le(p99, TARGET_EXIT_P99_S)
    fl = lat.get("floor forkserver", [])
    notes = [f"one_for_one, tp=1, echo worker, {d['kills']} kills per peer, peers interleaved (rotating order). "
             f"restarts counted by the supervisors: {d['restarts']}.",
             "noticed: supervisor = the 'exited' event's time; floor = a thread blocked on a bare multiprocessing."
             "Process's sentinel (same start method; forkserver = the supervisor's own forkserver).",
             "forkserver workers carry torch (preloaded): the kernel reports their death only after tearing down "
             "that address space, which the floor row shows; spawn echo workers never import torch.",
             f"target p99 <= {TARGET_EXIT_P99_S * 1e3:g} ms (default start method): {C.verdict(ok)}"]
    return C.format_table("(a) SIGKILL -> failure noticed", header, rows, notes), \
        {"p50": C.median(s), "p99": p99, "ok": ok, "floor_p50": C.median(fl), "floor_p99": C.pct(fl, .99),
         "ratio_p50": C.ratio(C.median(s), C.median(fl)),
         "spawn_p99": C.pct(lat.get("supervisor spawn", []), .99)}


# ---------------------------------------------------------------------------------------------------------------
# (b) one_for_all restart time
class TorchrunTree:
    """torchrun --max-restarts: ranks in serve mode write a READY file per restart attempt."""

    def __init__(self, tmp: C.TempDir, tp: int) -> None:
        self.tp = tp
        self.dir = tmp.sub(f"torchrun-tp{tp}")
        env = C.child_env(BENCH_DIR=self.dir, BENCH_MODE="serve", TMPDIR=self.dir, OMP_NUM_THREADS="1")
        self.out = open(os.path.join(self.dir, "out.txt"), "w")
        self.proc = C.spawn(C.torchrun_args(tp, "--max-restarts=100000", "--monitor-interval=0.1"), cwd=self.dir,
                            env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self.attempt = 0
        self.broken = False
        if not self.wait_attempt(0, 180.0):
            self.close()
            raise RuntimeError(f"torchrun tp={tp} did not get READY: {self._tail()}")

    def wait_attempt(self, attempt: int, timeout: float) -> dict[int, dict[str, Any]] | None:
        got = C.wait_until(lambda: (lambda r: r if len(r) >= self.tp else None)(C.torchrun_ready(self.dir, attempt)),
                           timeout, 0.005)
        if got:
            C.REAPER.track(*(r["pid"] for r in got.values()))
        return got

    def _complete_after(self, attempt: int) -> tuple[int, dict[int, dict[str, Any]]] | None:
        """The first restart attempt after ``attempt`` in which every rank wrote READY (an attempt can fail: gloo
        sometimes cannot connect after a restart, and torchrun then tries again)."""
        for a in range(attempt + 1, attempt + 50):
            got = C.torchrun_ready(self.dir, a)
            if len(got) >= self.tp:
                return a, got
        return None

    def _latest_complete(self) -> tuple[int, dict[int, dict[str, Any]]]:
        best = (self.attempt, C.torchrun_ready(self.dir, self.attempt))
        for a in range(self.attempt + 1, self.attempt + 50):
            got = C.torchrun_ready(self.dir, a)
            if len(got) >= self.tp:
                best = (a, got)
        return best

    def kill_one(self, rank: int, cap_s: float) -> dict[str, Any]:
        if self.broken:
            return {"ready_s": None, "capped": True, "error": "skipped: an earlier restart never completed"}
        self.attempt, ready = self._latest_complete()  # a late restart may have completed since
        pid = ready[rank]["pid"]
        if not all(C.alive(r["pid"]) for r in ready.values()):
            self.broken = True
            return {"ready_s": None, "capped": True, "error": f"no complete group to kill: {self._tail()}"}
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        found = C.wait_until(lambda: self._complete_after(self.attempt) or (self.proc.poll() is not None and "exit"),
                             cap_s, 0.005)
        if not found or found == "exit":
            self.broken = True
            return {"ready_s": None, "capped": not found,
                    "error": f"torchrun {'exited' if found else f'got no complete restart within {cap_s:g} s'}"}
        attempt, got = found
        C.REAPER.track(*(r["pid"] for r in got.values()))
        extra = attempt - self.attempt - 1
        self.attempt = attempt
        return {"ready_s": max(r["t_ready"] for r in got.values()) - t_kill, "failed_attempts": extra,
                "first_start_s": min(r["t_start"] for r in got.values()) - t_kill}

    def _tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "out.txt")) as f:
                return f.read()[-800:]
        except OSError:
            return ""

    def close(self) -> None:
        pids = []
        for a in range(self.attempt + 50):
            pids += [r["pid"] for r in C.torchrun_ready(self.dir, a).values()]
        C.stop_process(self.proc)
        C.REAPER.kill(pids)
        self.out.close()


def kill_one_supervised(tree: Tree, tp: int, rank: int, x) -> dict[str, Any]:
    old = tree.track()
    attempt = tree.last_attempt()
    victim = tree.pid_of(0, rank)
    time.sleep(0.01)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    ready = tree.wait_ready_after(attempt, tp)
    if not ready:
        return {"ready_s": None, "error": "not READY again"}
    out = tree.sup.execute_model(x, timeout=30)
    t_call = time.time() - t_kill
    new = tree.track()
    exited = tree.events("exited", pid=victim)
    restarting = [e for e in tree.events("restarting") if e["time"] >= t_kill]
    return {"ready_s": max(e["time"] for e in ready) - t_kill, "call_s": t_call,
            "detect_s": exited[0]["time"] - t_kill if exited else None,
            "restarting_s": restarting[0]["time"] - t_kill if restarting else None,
            "pids_changed": not (set(old) & set(new)) and len(new) == tp, "call_ok": out is not None}


def part_b(tmp: C.TempDir, tps: list[int], rounds: int, with_torchrun: bool, cap_s: float) -> dict:
    from worker.tp_mlp import make_input  # imports torch: only here

    trees: dict[int, Tree] = {}
    peers_tr: dict[int, TorchrunTree] = {}
    data: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    try:
        for tp in tps:
            trees[tp] = Tree("restart=one_for_all", f"parallel.tp={tp}", *NEVER_GIVE_UP)
            if with_torchrun:
                peers_tr[tp] = TorchrunTree(tmp, tp)
        x = make_input(trees[tps[0]].sup.cfg.workload, 0)
        peers = ["supervisor"] + (["torchrun"] if with_torchrun else [])
        for r in range(rounds):
            for i, tp in enumerate(tps):
                rank = r % tp
                for peer in C.rotate(peers, r + i):
                    try:
                        row = kill_one_supervised(trees[tp], tp, rank, x) if peer == "supervisor" else \
                            peers_tr[tp].kill_one(rank, cap_s)
                    except Exception as exc:  # recorded as a failed sample; the other peers go on
                        row = {"ready_s": None, "error": f"{type(exc).__name__}: {exc}"}
                    data[(peer, tp)].append(row)
                    C.log(f"(b) round {r + 1}/{rounds} tp={tp} {peer} killed rank {rank}: "
                          + (f"READY again after {row['ready_s']:.3f} s" if row.get("ready_s") is not None
                             else f"FAILED {str(row.get('error'))[-300:]}"))
    finally:
        for tree in trees.values():
            tree.close()
        for tr in peers_tr.values():
            tr.close()
    return data


def table_b(data: dict, tps: list[int], cap_s: float) -> tuple[str, dict]:
    header = ["tp", "peer", "n ok", "detect med", "READY again med", "p99", "max", "first call OK med",
              "pids changed", "failed attempts", "vs supervisor (paired)"]
    rows, facts = [], {}
    for tp in tps:
        base = [r.get("ready_s") for r in data.get(("supervisor", tp), [])]
        for peer in ("supervisor", "torchrun"):
            rs = data.get((peer, tp))
            if not rs:
                continue
            v = [r["ready_s"] if r.get("ready_s") is not None else math.nan for r in rs]
            det = [r["detect_s"] if r.get("detect_s") is not None else math.nan for r in rs]
            call = [r["call_s"] if r.get("call_s") is not None else math.nan for r in rs]
            changed = f"{sum(1 for r in rs if r.get('pids_changed'))}/{len(rs)}" if peer == "supervisor" else "n/a"
            n_ok = sum(1 for r in rs if r.get("ready_s") is not None)
            capped = sum(1 for r in rs if r.get("capped"))
            med = C.f_s(C.median(v)) if n_ok else f"> {cap_s:g} s (cap)" if capped else "n/a"
            mx = f"> {cap_s:g} s (cap)" if capped else C.f_s(C.vmax(v))
            rows.append([tp, peer, f"{n_ok}/{len(rs)}", C.f_s(C.median(det)), med, C.f_s(C.pct(v, .99)), mx, C.f_s(C.median(call)), changed,
                         sum(r.get("failed_attempts", 0) for r in rs),
                         C.f_x(C.paired_ratio(v, [b if b is not None else math.nan for b in base]))])
            facts[(peer, tp)] = {"med": C.median(v), "max": C.vmax(v),
                                 "ratio": C.paired_ratio(v, [b if b is not None else math.nan for b in base])}
    notes = ["supervisor: restart=one_for_all, tp_mlp worker (gloo); kill -9 of one rank (rotating) -> the last "
             "'ready' event of the next attempt; detect = the 'exited' event; first call OK = execute_model after that.",
             "torchrun: --max-restarts --monitor-interval=0.1; kill -9 of one rank -> the last rank's READY "
             "(import torch + init gloo) of the first restart attempt that got every rank READY; failed attempts = "
             "restarts in between that did not (e.g. gloo 'connectFullMesh failed ... Connection refused'); "
             f"a torchrun tree with no complete restart within {cap_s:g} s is not killed again ('n ok' counts it)."]
    return C.format_table("(b) one_for_all: kill one rank -> whole group READY again", header, rows, notes), facts


# ---------------------------------------------------------------------------------------------------------------
# (c) SIGSTOP -> hung
def part_c(runs: int) -> dict[str, Any]:
    tree = Tree("worker=echo", "restart=one_for_one", "parallel.tp=1", *NEVER_GIVE_UP,
                f"worker.heartbeat_interval_s={HB_INTERVAL_S}", f"worker.heartbeat_timeout_s={HB_TIMEOUT_S}")
    hung, back, misses = [], [], 0
    try:
        for i in range(runs):
            attempt = tree.last_attempt()
            pid = tree.pid_of(0, 0)
            time.sleep(0.05 + 0.37 * (i % 4) / 4)  # land at different points of the heartbeat cycle
            t = time.time()
            os.kill(pid, signal.SIGSTOP)
            try:
                ev = C.wait_until(lambda: tree.events("hung", pid=pid), HB_TIMEOUT_S * 5 + 5, 0.005)
                if not ev:
                    misses += 1
                    hung.append(math.nan)
                    continue
                hung.append(ev[0]["time"] - t)
                ready = tree.wait_ready_after(attempt, 1)
                back.append(ready[-1]["time"] - t if ready else math.nan)
            finally:
                if C.alive(pid):
                    os.kill(pid, signal.SIGCONT)  # not declared hung in time: let the next kill work normally
            C.log(f"(c) {i + 1}/{runs}: SIGSTOP -> hung {C.f_s(hung[-1])}")
    finally:
        tree.close()
    return {"hung": hung, "back": back, "misses": misses}


def table_c(d: dict[str, Any]) -> tuple[str, dict]:
    bound = HB_TIMEOUT_S + HB_INTERVAL_S
    rows = []
    for name, v in (("SIGSTOP -> 'hung' event", d["hung"]), ("SIGSTOP -> 'ready' again (restarted)", d["back"])):
        rows.append([name, len(v), C.f_s(C.median(v)), C.f_s(C.pct(v, .99)), C.f_s(C.vmax(v)), C.f_s(min(v) if v else
                                                                                                 math.nan)])
    ok = C.le(C.vmax(d["hung"]), bound) if not d["misses"] else False
    notes = [f"heartbeat interval {HB_INTERVAL_S:g} s, timeout {HB_TIMEOUT_S:g} s; a stopped worker cannot be "
             f"declared hung before timeout - interval = {HB_TIMEOUT_S - HB_INTERVAL_S:g} s after the stop.",
             f"never declared hung: {d['misses']}. target max <= timeout + interval = {bound:g} s: {C.verdict(ok)}"]
    return C.format_table("(c) SIGSTOP -> declared hung", ["measure", "n", "median", "p99", "max", "min"], rows,
                          notes), {"med": C.median(d["hung"]), "max": C.vmax(d["hung"]), "ok": ok}


# ---------------------------------------------------------------------------------------------------------------
# (d) the healthy replica keeps serving
def part_d(phases: int, kills_per_phase: int) -> dict[str, Any]:
    tree = Tree("worker=echo", "restart=one_for_one", "parallel.dp=2", "parallel.tp=1", *NEVER_GIVE_UP)
    stop = threading.Event()
    phase = ["warm-up"]
    stats: dict[str, dict[str, Any]] = defaultdict(lambda: {"ok": 0, "failed": 0, "lat": [], "errors": []})
    payload = {"ids": list(range(16)), "lens": [7] * 16}

    def client() -> None:
        while not stop.is_set():
            p = phase[0]
            t = time.perf_counter()
            try:
                got = tree.sup.collective_rpc("echo", args=(payload,), group=0, timeout=5)
                good = got == [payload]
            except Exception as exc:  # counted, and the first few kept for the report
                good = False
                if len(stats[p]["errors"]) < 3:
                    stats[p]["errors"].append(f"{type(exc).__name__}: {str(exc)[:120]}")
            dt = time.perf_counter() - t
            s = stats[p]
            s["ok" if good else "failed"] += 1
            if good:
                s["lat"].append(dt)

    th = threading.Thread(target=client, name="client", daemon=True)
    kills, restart_lat, durations = 0, [], defaultdict(float)
    quiet_len = 2.0
    try:
        th.start()
        time.sleep(0.3)
        for r in range(phases):
            for name in C.rotate(["kills", "quiet"], r):
                t0 = time.monotonic()
                if name == "kills":
                    phase[0] = "kills"
                    for _ in range(kills_per_phase):
                        attempt = tree.last_attempt(group=1)
                        pid = tree.pid_of(1, 1)
                        t = time.time()
                        os.kill(pid, signal.SIGKILL)
                        ready = tree.wait_ready_after(attempt, 1, group=1)
                        if not ready:
                            raise RuntimeError("(d) group 1 did not come back")
                        kills += 1
                        restart_lat.append(ready[-1]["time"] - t)
                        time.sleep(0.02)
                    quiet_len = time.monotonic() - t0  # quiet phases last as long as the last kill phase
                else:
                    phase[0] = "quiet"
                    time.sleep(quiet_len)
                durations[name] += time.monotonic() - t0
            C.log(f"(d) phase pair {r + 1}/{phases}: kills so far {kills}, "
                  f"healthy calls ok {sum(s['ok'] for s in stats.values())} failed "
                  f"{sum(s['failed'] for s in stats.values())}")
        phase[0] = "done"
        stop.set()
        th.join(timeout=10)
        status = tree.sup.status()
    finally:
        stop.set()
        th.join(timeout=10)
        tree.close()
    restarts = {row["group"]: row["restarts"] for row in status}
    return {"stats": {k: v for k, v in stats.items() if k in ("kills", "quiet")}, "kills": kills,
            "failed_elsewhere": sum(v["failed"] for k, v in stats.items() if k not in ("kills", "quiet")),
            "restarts": restarts, "restart_lat": restart_lat, "durations": dict(durations)}


def table_d(d: dict[str, Any]) -> tuple[str, dict]:
    header = ["phase", "seconds", "calls ok", "failed", "ok %", "call p50", "p99", "max", "p99 vs quiet"]
    rows = []
    quiet = d["stats"].get("quiet", {"lat": []})
    for name in ("kills", "quiet"):
        s = d["stats"].get(name)
        if not s:
            continue
        n = s["ok"] + s["failed"]
        rows.append([name, f"{d['durations'].get(name, 0):.1f}", s["ok"], s["failed"],
                     f"{100.0 * s['ok'] / n:.2f}%" if n else "n/a", C.f_ms(C.median(s["lat"])),
                     C.f_ms(C.pct(s["lat"], .99)), C.f_ms(C.vmax(s["lat"])),
                     C.f_x(C.ratio(C.pct(s["lat"], .99), C.pct(quiet["lat"], .99)))])
    k = d["stats"].get("kills", {"ok": 0, "failed": 0, "errors": []})
    total_failed = sum(s["failed"] for s in d["stats"].values()) + d["failed_elsewhere"]
    ok = (k["ok"] > 0 and total_failed == 0)
    rl = d["restart_lat"]
    notes = [f"dp=2, tp=1, one_for_one, echo worker; group 1 killed {d['kills']} times; restarts per group "
             f"(supervisor's count): {d['restarts']}; group 1 kill -> READY again p50 {C.f_ms(C.median(rl))}, "
             f"max {C.f_ms(C.vmax(rl))}.",
             f"target: 100% of calls to the healthy replica (group 0) ok: {C.verdict(ok)}"]
    errors = [e for s in d["stats"].values() for e in s["errors"]]
    if errors:
        notes.append("first errors: " + " | ".join(errors[:3]))
    return C.format_table("(d) healthy replica while the other one is killed repeatedly", header, rows, notes), \
        {"ok": ok, "kills_ok": k["ok"], "failed": total_failed, "restarts": d["restarts"], "kills": d["kills"]}


# ---------------------------------------------------------------------------------------------------------------
def summary_table(fa: dict, fb: dict, fc: dict, fd: dict, tps: list[int]) -> str:
    rows = []
    if fa:
        rows.append(["(a) SIGKILL -> 'exited' event, default start method: p99 (p50)",
                     f"{C.f_ms(fa['p99'])} ({C.f_ms(fa['p50'])})", f"<= {TARGET_EXIT_P99_S * 1e3:g} ms",
                     C.verdict(fa["ok"])])
        rows.append(["(a) floor: bare forkserver child's sentinel, p99 (p50)",
                     f"{C.f_ms(fa['floor_p99'])} ({C.f_ms(fa['floor_p50'])})", "(peer)", ""])
        rows.append(["(a) supervisor / floor, p50", C.f_x(fa["ratio_p50"]), "(peer)", ""])
        if not math.isnan(fa["spawn_p99"]):
            rows.append(["(a) SIGKILL -> 'exited' event, spawn (torch-free echo worker): p99",
                         C.f_ms(fa["spawn_p99"]), f"<= {TARGET_EXIT_P99_S * 1e3:g} ms",
                         C.verdict(C.le(fa["spawn_p99"], TARGET_EXIT_P99_S))])
    if fb:
        tp = 4 if ("supervisor", 4) in fb else max(t for (p, t) in fb if p == "supervisor")
        s = fb[("supervisor", tp)]
        rows.append([f"(b) one_for_all tp={tp}: kill -> READY again (median / max)",
                     f"{C.f_s(s['med'])} / {C.f_s(s['max'])}", f"<= {TARGET_RESTART_TP4_S:g} s",
                     C.verdict(C.le(s["med"], TARGET_RESTART_TP4_S))])
        t = fb.get(("torchrun", tp))
        if t:
            rows.append([f"(b) torchrun tp={tp} restart / supervisor (paired median)", C.f_x(t["ratio"]), "(peer)", ""])
    if fc:
        rows.append(["(c) SIGSTOP -> 'hung' (median / max)", f"{C.f_s(fc['med'])} / {C.f_s(fc['max'])}",
                     f"<= {HB_TIMEOUT_S + HB_INTERVAL_S:g} s", C.verdict(fc["ok"])])
    if fd:
        rows.append(["(d) healthy replica calls ok during kills", f"{fd['kills_ok']} ok, {fd['failed']} failed",
                     "100% ok", C.verdict(fd["ok"])])
        rows.append(["(d) restarts (group: count) / kills", f"{fd['restarts']} / {fd['kills']}", "group 0: 0",
                     C.verdict(fd["restarts"].get(0, 0) == 0 and fd["restarts"].get(1, 0) == fd["kills"])])
    return C.format_table("summary", ["measure", "value", "target", "verdict"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, a sanity run")
    ap.add_argument("--kills", type=int, default=None, help="(a) kills (default 200; quick 20)")
    ap.add_argument("--repeats", type=int, default=None, help="(b) rounds per tp (default 5; quick 2)")
    ap.add_argument("--tps", default="1,2,4", help="(b) tensor-parallel sizes (default 1,2,4)")
    ap.add_argument("--stops", type=int, default=None, help="(c) SIGSTOPs (default 10; quick 3)")
    ap.add_argument("--phases", type=int, default=None, help="(d) kill/quiet phase pairs (default 4; quick 2)")
    ap.add_argument("--kills-per-phase", type=int, default=None, help="(d) kills per phase (default 10; quick 4)")
    ap.add_argument("--no-torchrun", action="store_true", help="(b) leave the torchrun peer out")
    ap.add_argument("--no-spawn", action="store_true", help="(a) leave the spawn peers out")
    ap.add_argument("--torchrun-cap", type=float, default=None,
                    help="(b) seconds to wait for torchrun's restart (default 60; quick 30)")
    ap.add_argument("--parts", default="a,b,c,d", help="which parts to run (default a,b,c,d)")
    ap.add_argument("--deadline", type=float, default=None, help="hard limit for the whole script, seconds")
    a = ap.parse_args()
    q = a.quick
    kills = a.kills or (20 if q else 200)
    rounds = a.repeats or (2 if q else 5)
    stops = a.stops or (3 if q else 10)
    phases = a.phases or (2 if q else 4)
    per_phase = a.kills_per_phase or (4 if q else 10)
    tps = [int(x) for x in a.tps.split(",") if x]
    torchrun_cap = a.torchrun_cap or (30.0 if q else 60.0)
    parts = set(a.parts.split(","))
    deadline = a.deadline or (900.0 if q else 3600.0)

    tmp = C.TempDir("bench-recovery-")
    tables: list[str] = []
    fa = fb = fc = fd = {}
    with C.Watchdog(deadline, cleanup=tmp.remove):
        try:
            if "a" in parts:
                C.log(f"(a) SIGKILL -> exited: {kills} kills")
                t, fa = table_a(part_a(kills, not a.no_spawn))
                tables.append(t)
            if "b" in parts:
                C.log(f"(b) one_for_all restart, tp={tps}, {rounds} round(s)")
                t, fb = table_b(part_b(tmp, tps, rounds, not a.no_torchrun, torchrun_cap), tps, torchrun_cap)
                tables.append(t)
            if "c" in parts:
                C.log(f"(c) SIGSTOP -> hung: {stops} stops")
                t, fc = table_c(part_c(stops))
                tables.append(t)
            if "d" in parts:
                C.log(f"(d) healthy replica: {phases} phase pairs x {per_phase} kills")
                t, fd = table_d(part_d(phases, per_phase))
                tables.append(t)
        finally:
            C.cleanup(tmp)
    tables.append(summary_table(fa, fb, fc, fd, tps))
    print("\n\n".join(tables), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
