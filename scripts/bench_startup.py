#!/usr/bin/env python
"""The supervised tree end to end: start-up to READY, shutdown, and what happens when the launcher dies.

Peers, interleaved (A B C, B C A, ...) in one run so that machine noise hits every peer alike:

    forkserver   `python -m supervisor parallel.tp=N workload.steps=1 runtime.start_method=auto` (the default:
                 forkserver, torch preloaded, booted while the config loads)
    spawn        the same command with runtime.start_method=spawn
    torchrun     `python -m torch.distributed.run --standalone --nproc-per-node=N _bench_common.py`: each rank
                 imports torch, init_process_group("gloo"), records a READY timestamp (no model is built, so it
                 does slightly less than a tp_mlp worker)

Measurements:

    1. start-up, tp = 1 2 4 8 on CPU (gloo): READY from the command's start as the CLI's summary reports it
       (counted from process creation), READY from our Popen to the last rank's READY (wall clock, the same clock
       for every peer: events.jsonl for the supervisor, READY files for torchrun), and the whole command's wall time.
    2. shutdown of N idle workers: the summary's "shutdown" line (torchrun: last rank done -> torchrun exited).
    3. a worker that ignores SIGTERM, grace 1 s (in process: Supervisor(...).shutdown() timed) against torchrun
       with the same rank deaf, SIGINT to torchrun (with --shutdown-timeout=1, and once with its default 30 s, the
       wait capped).
    4. kill -9 of the launcher (`python -m supervisor workload=serve` in its own session; torchrun): how long until
       every worker is gone (torchrun's orphans: capped wait, then we kill them by pid).

    python scripts/bench_startup.py            # full run (R = 3 rounds)
    python scripts/bench_startup.py --quick    # one round, a sanity run

Progress goes to stderr; the tables are printed last, on stdout.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)

SUP_PEERS = {"forkserver": "auto", "spawn": "spawn"}
TARGET_READY_TP8_S = 2.0
TARGET_SPAWN_RATIO = 2.5
TARGET_IDLE_SHUTDOWN_S = 0.5
DEAF_GRACE_S = 1.0
DEAF_SLACK_S = 0.3
CMD_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 120.0
_seq = itertools.count()


# ---------------------------------------------------------------------------------------------------------------
# 1 + 2: start-up and idle shutdown
def startup_supervisor(tmp: C.TempDir, method: str, tp: int) -> dict[str, Any]:
    cwd = tmp.sub(f"cli-{next(_seq)}")
    args = [C.PY, "-m", "supervisor", f"parallel.tp={tp}", "workload.steps=1", f"runtime.start_method={method}"]
    res = C.run_command(args, CMD_TIMEOUT_S, cwd=cwd, env=C.child_env(OMP_NUM_THREADS="1", TMPDIR=cwd))
    got = C.parse_summary(res.out)
    run_dir = C.run_dir_of(res.err, cwd)
    ready = [e for e in C.read_events(run_dir) if e.get("kind") == "ready"] if run_dir else []
    row: dict[str, Any] = {"cmd_s": res.wall_s, "ready_s": got.get("ready_s"), "shutdown_s": got.get("shutdown_s"),
                           "ready_wall_s": (max(e["time"] for e in ready) - res.t0_unix) if len(ready) >= tp else None,
                           "ok": res.rc == 0 and "ready_s" in got}
    if not row["ok"]:
        row["error"] = f"rc={res.rc} timed_out={res.timed_out}: {res.tail(600)}"
    shutil.rmtree(cwd, ignore_errors=True)
    return row


def startup_torchrun(tmp: C.TempDir, tp: int) -> dict[str, Any]:
    d = tmp.sub(f"torchrun-{next(_seq)}")
    env = C.child_env(BENCH_DIR=d, BENCH_MODE="exit", TMPDIR=d, OMP_NUM_THREADS="1")
    res = C.run_command(C.torchrun_args(tp), CMD_TIMEOUT_S, cwd=d, env=env)
    ready = C.torchrun_ready(d)
    done = C.torchrun_done(d)
    t_exit = res.t0_unix + res.wall_s
    row: dict[str, Any] = {"cmd_s": res.wall_s, "ready_s": None,
                           "ready_wall_s": (max(r["t_ready"] for r in ready.values()) - res.t0_unix)
                           if len(ready) >= tp else None,
                           "shutdown_s": (t_exit - max(done.values())) if len(done) >= tp else None,
                           "ok": res.rc == 0 and len(ready) >= tp}
    if not row["ok"]:
        row["error"] = f"rc={res.rc} timed_out={res.timed_out}: {res.tail(600)}"
    shutil.rmtree(d, ignore_errors=True)
    return row


def part_startup(tmp: C.TempDir, tps: list[int], rounds: int, peers: list[str]) -> dict:
    data: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in range(rounds):
        for i, tp in enumerate(tps):
            for peer in C.rotate(peers, r + i):
                row = startup_torchrun(tmp, tp) if peer == "torchrun" else \
                    startup_supervisor(tmp, SUP_PEERS[peer], tp)
                data[(peer, tp)].append(row)
                C.log(f"start-up round {r + 1}/{rounds} tp={tp} {peer}: " +
                      (f"READY {row['ready_s'] or float('nan'):.3f} s (summary), "
                       f"{row['ready_wall_s'] or float('nan'):.3f} s (Popen->last READY), command "
                       f"{row['cmd_s']:.3f} s" if row["ok"] else f"FAILED {row.get('error')}"))
    return data


def _vals(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] if r.get(key) is not None else float("nan") for r in rows]


def table_startup(data: dict, tps: list[int], peers: list[str]) -> tuple[str, dict]:
    header = ["tp", "peer", "n ok", "READY med", "max", "summary's READY med", "max", "summary - ours",
              "command med", "max", "READY vs forkserver"]
    rows, facts = [], {}
    for tp in tps:
        base = _vals(data.get(("forkserver", tp), []), "ready_wall_s")
        for peer in peers:
            rs = data.get((peer, tp), [])
            if not rs:
                continue
            summ, wall, cmd = _vals(rs, "ready_s"), _vals(rs, "ready_wall_s"), _vals(rs, "cmd_s")
            rel = C.paired_ratio(wall, base) if peer != "forkserver" else 1.0
            bias = C.median([s - w for s, w in zip(summ, wall)])
            rows.append([tp, peer, f"{sum(r['ok'] for r in rs)}/{len(rs)}", C.f_s(C.median(wall)), C.f_s(C.vmax(wall)),
                         C.f_s(C.median(summ)), C.f_s(C.vmax(summ)), "" if math.isnan(bias) else f"{bias:+.3f} s",
                         C.f_s(C.median(cmd)), C.f_s(C.vmax(cmd)), C.f_x(rel)])
            facts[(peer, tp)] = {"ready_med": C.median(wall), "ready_max": C.vmax(wall), "summary_med": C.median(summ),
                                 "ratio": rel}
        if ("spawn", tp) in data and ("forkserver", tp) in data:
            facts[("spawn_ratio", tp)] = C.paired_ratio(_vals(data[("spawn", tp)], "ready_wall_s"), base)
    notes = ["READY: our time.time() just before Popen -> the last rank's READY (supervisor: 'ready' events of "
             "events.jsonl; torchrun: READY files), one clock for every peer. Used for the verdicts.",
             "summary's READY: the CLI's own 'start-up to READY (from the command's start)', counted from its process "
             "creation time (psutil); 'summary - ours' > 0 means the CLI over-reports (it cannot start before Popen).",
             "READY vs forkserver: median over rounds of the per-round ratio peer / forkserver; > 1 = slower.",
             "command: Popen -> exit, including the workload (reference check, steps, RPCs) and shutdown.",
             "torchrun ranks only import torch and init gloo; supervisor ranks also build their tp_mlp shards."]
    return C.format_table("1. start-up to READY (CPU, gloo)", header, rows, notes), facts


def table_idle_shutdown(data: dict, tps: list[int], peers: list[str]) -> tuple[str, dict]:
    header = ["tp", "peer", "n", "shutdown med", "p99", "max", "vs forkserver (paired)"]
    rows, facts = [], {}
    for tp in tps:
        base = _vals(data.get(("forkserver", tp), []), "shutdown_s")
        for peer in peers:
            rs = data.get((peer, tp), [])
            if not rs:
                continue
            v = _vals(rs, "shutdown_s")
            rel = C.paired_ratio(v, base) if peer != "forkserver" else 1.0
            rows.append([tp, peer, len(rs), C.f_s(C.median(v)), C.f_s(C.pct(v, .99)), C.f_s(C.vmax(v)), C.f_x(rel)])
            facts[(peer, tp)] = {"med": C.median(v), "max": C.vmax(v)}
    notes = ["supervisor: the CLI summary's 'shutdown' (sup.shutdown() of idle workers after the workload).",
             "torchrun: last rank's destroy_process_group done -> torchrun exited (its ranks exit on their own)."]
    return C.format_table("2. shutdown of idle workers", header, rows, notes), facts


# ---------------------------------------------------------------------------------------------------------------
# 3: a worker that ignores SIGTERM
def deaf_supervisor(deaf: bool) -> dict[str, Any]:
    from supervisor.api import Supervisor

    overrides = ["worker.cls=worker.faults:FaultyWorker", "parallel.tp=2", f"shutdown.grace_s={DEAF_GRACE_S}"]
    if deaf:
        overrides += ["+runtime.env.RV_FAULT=ignore_sigterm", "+runtime.env.RV_FAULT_RANK=1"]
    sup = Supervisor(C.supervisor_config(*overrides), start=False)
    pids: list[int] = []
    try:
        sup.start()
        pids = sup.pids()
        C.REAPER.track(*pids)
        t0 = time.monotonic()
        sup.shutdown()
        dt = time.monotonic() - t0
        left = C.wait_until(lambda: not any(C.alive(p) for p in pids), 5.0) is None
        return {"total_s": dt, "ok": not left, "error": "workers left after shutdown" if left else ""}
    finally:
        sup.shutdown()
        C.REAPER.kill(pids)


def deaf_torchrun(tmp: C.TempDir, timeout_s: int | None, cap_s: float) -> dict[str, Any]:
    d = tmp.sub(f"deaf-{next(_seq)}")
    extra = [f"--shutdown-timeout={timeout_s}"] if timeout_s is not None else []
    env = C.child_env(BENCH_DIR=d, BENCH_MODE="serve", BENCH_DEAF_RANK="1", TMPDIR=d, OMP_NUM_THREADS="1")
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    with open(os.path.join(d, "out.txt"), "w") as out:
        proc = C.spawn(C.torchrun_args(2, *extra), cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT)
    pids = [proc.pid]
    try:
        ready = C.wait_until(lambda: (lambda r: r if len(r) >= 2 else None)(C.torchrun_ready(d)), READY_TIMEOUT_S, 0.02)
        if not ready:
            return {"total_s": None, "ok": False, "error": "torchrun did not get READY: " + _tail(d)}
        pids += [r["pid"] for r in ready.values()]
        C.REAPER.track(*pids)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        gone = C.wait_until(lambda: proc.poll() is not None and not any(C.alive(p) for p in pids), cap_s, 0.005)
        dt = time.monotonic() - t0
        return {"total_s": dt if gone else None, "capped": not gone, "ok": True, "error": ""}
    finally:
        C.stop_process(proc)
        C.REAPER.kill(pids)


def _tail(d: str) -> str:
    try:
        with open(os.path.join(d, "out.txt")) as f:
            return f.read()[-800:]
    except OSError:
        return ""


def part_deaf(tmp: C.TempDir, rounds: int, with_torchrun: bool, default_cap: float) -> dict[str, list[dict[str, Any]]]:
    peers = ["supervisor, all polite", "supervisor, rank 1 deaf"]
    if with_torchrun:
        peers.append("torchrun --shutdown-timeout=1, rank 1 deaf")
    data: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(rounds):
        for peer in C.rotate(peers, r):
            if peer.startswith("torchrun"):
                row = deaf_torchrun(tmp, int(DEAF_GRACE_S), 40.0)
            else:
                row = deaf_supervisor("deaf" in peer)
            data[peer].append(row)
            C.log(f"SIGTERM-deaf round {r + 1}/{rounds} {peer}: "
                  + (f"{row['total_s']:.3f} s" if row.get("total_s") is not None else f"n/a {row.get('error')}"))
    if with_torchrun and default_cap > 0:  # one sample: torchrun's own default (30 s) is too slow to repeat
        row = deaf_torchrun(tmp, None, default_cap)
        data["torchrun default timeout, rank 1 deaf"].append(row)
        C.log(f"SIGTERM-deaf torchrun default: {row.get('total_s')}")
    return data


def table_deaf(data: dict, default_cap: float) -> tuple[str, dict]:
    header = ["peer", "n", "stop all med", "p99", "max", "vs supervisor deaf (paired)", "target"]
    base = [r.get("total_s") for r in data.get("supervisor, rank 1 deaf", [])]
    rows, facts = [], {}
    bound = DEAF_GRACE_S + DEAF_SLACK_S
    for peer, rs in data.items():
        v = [r["total_s"] if r.get("total_s") is not None else float("nan") for r in rs]
        capped = sum(1 for r in rs if r.get("capped"))
        shown = [C.f_s(C.median(v)), C.f_s(C.pct(v, .99)), C.f_s(C.vmax(v))]
        if capped:
            cap = 40.0 if "--shutdown-timeout" in peer else default_cap
            shown = [f"> {cap:.0f} s (cap, {capped}/{len(rs)})"] + shown[1:]
        target = ""
        if peer == "supervisor, rank 1 deaf":
            ok = C.le(C.median(v), bound)
            target = f"<= grace + {DEAF_SLACK_S} = {bound:.1f} s: {C.verdict(ok)}"
            facts["deaf"] = {"med": C.median(v), "max": C.vmax(v), "ok": ok}
        rows.append([peer, len(rs), *shown, C.f_x(C.paired_ratio(v, base)) if peer.startswith("torchrun --") else
                     ("1.00x" if peer == "supervisor, rank 1 deaf" else C.f_x(C.paired_ratio(v, base))), target])
    notes = [f"2 ranks, grace (shutdown.grace_s / --shutdown-timeout) = {DEAF_GRACE_S:g} s. supervisor: "
             "Supervisor(...).shutdown() timed in process (FaultyWorker, RV_FAULT=ignore_sigterm on rank 1, whose "
             "shutdown() never returns); torchrun: SIGINT to torchrun until torchrun and every rank are gone "
             "(the deaf rank ignores SIGTERM and SIGINT)."]
    return C.format_table(f"3. stopping with a rank that ignores SIGTERM (grace {DEAF_GRACE_S:g} s)", header, rows,
                          notes), facts


# ---------------------------------------------------------------------------------------------------------------
# 4: kill -9 of the launcher
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _poll_gone(pids: list[int], cap_s: float) -> tuple[dict[int, float], list[int]]:
    """Poll until every pid is gone (or cap): pid -> seconds until gone, and the survivors."""
    t0 = time.monotonic()
    gone: dict[int, float] = {}
    while True:
        now = time.monotonic() - t0
        for p in pids:
            if p not in gone and not C.alive(p):
                gone[p] = now
        left = [p for p in pids if p not in gone]
        if not left or now > cap_s:
            return gone, left
        time.sleep(0.002)


def kill9_supervisor(tmp: C.TempDir, tp: int, cap_s: float) -> dict[str, Any]:
    import psutil

    cwd = tmp.sub(f"kill9-{next(_seq)}")
    err_path = os.path.join(cwd, "stderr.txt")
    args = [C.PY, "-m", "supervisor", "workload=serve", f"parallel.tp={tp}", "workload.status_interval_s=3600"]
    with open(err_path, "w") as err:
        # TMPDIR: its rendezvous directory, which a supervisor killed with -9 cannot remove, stays in our scratch
        proc = C.spawn(args, cwd=cwd, env=C.child_env(OMP_NUM_THREADS="1", TMPDIR=cwd), stderr=err)
    workers: list[int] = []
    try:
        run_dir = C.wait_until(lambda: C.run_dir_of(_read(err_path), cwd), READY_TIMEOUT_S, 0.02)
        ready = run_dir and C.wait_until(
            lambda: (lambda e: e if len(e) >= tp else None)(
                [x for x in C.read_events(run_dir) if x.get("kind") == "ready"]), READY_TIMEOUT_S, 0.02)
        if not ready:
            return {"ok": False, "error": "supervisor did not get READY: " + _read(err_path)[-800:]}
        workers = [e["pid"] for e in ready]
        helpers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True) if c.pid not in workers]
        C.REAPER.track(*workers, *helpers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        gone, left = _poll_gone(workers + helpers, cap_s)
        return {"ok": True, "all_gone_s": max(gone[p] for p in workers) if not left else None,
                "first_gone_s": min(gone.values()) if gone else None, "survivors": len([p for p in left if p in workers]),
                "helpers_left": len([p for p in left if p in helpers])}
    finally:
        C.stop_process(proc)
        C.REAPER.kill(workers)


def kill9_torchrun(tmp: C.TempDir, tp: int, cap_s: float) -> dict[str, Any]:
    d = tmp.sub(f"kill9-tr-{next(_seq)}")
    env = C.child_env(BENCH_DIR=d, BENCH_MODE="serve", TMPDIR=d, OMP_NUM_THREADS="1")
    with open(os.path.join(d, "out.txt"), "w") as out:
        proc = C.spawn(C.torchrun_args(tp), cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        ready = C.wait_until(lambda: (lambda r: r if len(r) >= tp else None)(C.torchrun_ready(d)), READY_TIMEOUT_S,
                             0.02)
        if not ready:
            return {"ok": False, "error": "torchrun did not get READY: " + _tail(d)}
        workers = [r["pid"] for r in ready.values()]
        C.REAPER.track(*workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        gone, left = _poll_gone(workers, cap_s)
        return {"ok": True, "all_gone_s": max(gone.values()) if not left else None,
                "first_gone_s": min(gone.values()) if gone else None, "survivors": len(left), "helpers_left": 0}
    finally:
        C.stop_process(proc)
        C.REAPER.kill(workers)  # the orphans: ours to kill, by pid


def part_kill9(tmp: C.TempDir, tp: int, rounds: int, cap_s: float, with_torchrun: bool) -> dict[str, list]:
    peers = ["supervisor"] + (["torchrun"] if with_torchrun else [])
    data: dict[str, list] = defaultdict(list)
    for r in range(rounds):
        for peer in C.rotate(peers, r):
            row = kill9_supervisor(tmp, tp, cap_s) if peer == "supervisor" else kill9_torchrun(tmp, tp, cap_s)
            data[peer].append(row)
            C.log(f"kill -9 round {r + 1}/{rounds} {peer}: {row}")
    return data


def table_kill9(data: dict, tp: int, cap_s: float) -> tuple[str, dict]:
    header = ["launcher killed", "n", "all workers gone med", "max", "first gone med", "runs with survivors",
              "helpers left"]
    rows, facts = [], {}
    for peer, rs in data.items():
        ok = [r for r in rs if r.get("ok")]
        v = [r["all_gone_s"] if r.get("all_gone_s") is not None else float("nan") for r in ok]
        first = [r["first_gone_s"] if r.get("first_gone_s") is not None else float("nan") for r in ok]
        surv = sum(1 for r in ok if r["survivors"])
        med = C.f_s(C.median(v)) if not surv else f"> {cap_s:.0f} s (cap)" if surv == len(ok) else C.f_s(C.median(v))
        rows.append([f"{peer} (tp={tp})", f"{len(ok)}/{len(rs)}", med, C.f_s(C.vmax(v)) if not surv else
                     f"> {cap_s:.0f} s", C.f_s(C.median(first)), f"{surv}/{len(ok)}",
                     sum(r.get("helpers_left", 0) for r in ok)])
        facts[peer] = {"med": C.median(v), "survivors": surv, "n": len(ok)}
    notes = ["kill -9 of the launcher's pid; then every worker pid polled (psutil, zombies count as gone) every 2 ms.",
             f"survivors: workers still alive {cap_s:g} s after the kill (then killed by us, by pid).",
             "helpers left: the supervisor's forkserver still alive at the cap."]
    return C.format_table("4. kill -9 of the launcher: time until every worker is gone", header, rows, notes), facts


# ---------------------------------------------------------------------------------------------------------------
def summary_table(st: dict, idle: dict, deaf: dict, k9: dict, tps: list[int]) -> str:
    rows = []
    tp = 8 if 8 in tps else max(tps)
    fs = st.get(("forkserver", tp), {})
    if fs:
        rows.append([f"tp={tp} READY from the command's start (forkserver, median / max)",
                     f"{C.f_s(fs.get('ready_med'))} / {C.f_s(fs.get('ready_max'))}", f"<= {TARGET_READY_TP8_S} s",
                     C.verdict(C.le(fs.get("ready_med", math.nan), TARGET_READY_TP8_S))])
        rows.append([f"tp={tp} the same, as the CLI summary reports it (median)", C.f_s(fs.get("summary_med")),
                     f"<= {TARGET_READY_TP8_S} s", C.verdict(C.le(fs.get("summary_med", math.nan), TARGET_READY_TP8_S))])
    sr = st.get(("spawn_ratio", tp))
    if sr is not None:
        rows.append([f"tp={tp} spawn / forkserver READY (paired median)", C.f_x(sr), f">= {TARGET_SPAWN_RATIO}x",
                     C.verdict(C.ge(sr, TARGET_SPAWN_RATIO))])
    tr = st.get(("torchrun", tp))
    if tr:
        rows.append([f"tp={tp} torchrun / forkserver READY (paired median)", C.f_x(tr["ratio"]), "(peer)", ""])
    isd = idle.get(("forkserver", tp))
    if isd:
        rows.append([f"shutdown of {tp} idle workers (forkserver, median / max)",
                     f"{C.f_s(isd['med'])} / {C.f_s(isd['max'])}", f"<= {TARGET_IDLE_SHUTDOWN_S} s",
                     C.verdict(C.le(isd["med"], TARGET_IDLE_SHUTDOWN_S))])
    d = deaf.get("deaf")
    if d:
        rows.append(["SIGTERM-deaf rank: total shutdown (median / max)", f"{C.f_s(d['med'])} / {C.f_s(d['max'])}",
                     f"<= {DEAF_GRACE_S + DEAF_SLACK_S:.1f} s", C.verdict(d["ok"])])
    for peer, f in k9.items():
        rows.append([f"kill -9 {peer}: workers gone (median)",
                     C.f_s(f["med"]) if not f["survivors"] else f"survived in {f['survivors']}/{f['n']} runs",
                     "all gone" if peer == "supervisor" else "(peer)",
                     C.verdict(f["survivors"] == 0) if peer == "supervisor" else ""])
    return C.format_table("summary", ["measure", "value", "target", "verdict"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, a sanity run")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per cell (default 3; --quick 1)")
    ap.add_argument("--tps", default="1,2,4,8", help="tensor-parallel sizes for start-up (default 1,2,4,8)")
    ap.add_argument("--kill-tp", type=int, default=4, help="workers per launcher in the kill -9 test (default 4)")
    ap.add_argument("--orphan-cap", type=float, default=None, help="seconds to watch orphans (default 10; quick 5)")
    ap.add_argument("--torchrun-default-cap", type=float, default=40.0,
                    help="cap of the one torchrun run with its default 30 s shutdown timeout (0 = skip it)")
    ap.add_argument("--no-torchrun", action="store_true", help="leave the torchrun peer out")
    ap.add_argument("--parts", default="1,3,4", help="which parts to run (2 comes from 1)")
    ap.add_argument("--deadline", type=float, default=None, help="hard limit for the whole script, seconds")
    a = ap.parse_args()
    rounds = a.repeats or (1 if a.quick else 3)
    tps = [int(x) for x in a.tps.split(",") if x]
    orphan_cap = a.orphan_cap or (5.0 if a.quick else 10.0)
    parts = set(a.parts.split(","))
    peers = ["forkserver", "spawn"] + ([] if a.no_torchrun else ["torchrun"])
    deadline = a.deadline or (1200.0 if a.quick else 3600.0)

    tmp = C.TempDir("bench-startup-")
    tables: list[str] = []
    st_f, idle_f, deaf_f, k9_f = {}, {}, {}, {}
    with C.Watchdog(deadline, cleanup=tmp.remove):
        try:
            if "1" in parts:
                C.log(f"part 1: start-up, tp={tps}, peers={peers}, {rounds} round(s)")
                data = part_startup(tmp, tps, rounds, peers)
                t, st_f = table_startup(data, tps, peers)
                tables.append(t)
                t, idle_f = table_idle_shutdown(data, tps, peers)
                tables.append(t)
            if "4" in parts:
                C.log(f"part 4: kill -9 of the launcher, tp={a.kill_tp}")
                data4 = part_kill9(tmp, a.kill_tp, rounds, orphan_cap, not a.no_torchrun)
                t4, k9_f = table_kill9(data4, a.kill_tp, orphan_cap)
            if "3" in parts:  # in process last: it makes this process a subreaper and starts a forkserver here
                C.log("part 3: a rank that ignores SIGTERM")
                data3 = part_deaf(tmp, rounds, not a.no_torchrun, a.torchrun_default_cap)
                t, deaf_f = table_deaf(data3, a.torchrun_default_cap)
                tables.append(t)
            if "4" in parts:
                tables.append(t4)
        finally:
            C.cleanup(tmp)
    tables.append(summary_table(st_f, idle_f, deaf_f, k9_f, tps))
    print("\n\n".join(tables), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
