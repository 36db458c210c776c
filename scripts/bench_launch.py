"""rankvisor-run (fresh interpreter, and --fast) against torchrun, side by side in one run (A B C, B C A, ...).

For --nproc-per-node in 1, 2, 4, 8 on CPU, every launcher run measures
  start     launcher started -> every rank in main() (its module-level `import torch.distributed` done)
and then, in the first round, kill -9 of the launcher:
  survivors how many rank scripts and their children (one each) are alive 5 s later
or, in the later rounds, kill -9 of one rank's script:
  restart   -> every rank running again (process group re-initialised, snapshot read), with --max-restarts=1
Then once per launcher at 2 ranks, both ranks ignoring SIGTERM: SIGTERM to the launcher -> launcher gone
(rankvisor-run with --shutdown-timeout=1; torchrun has no such flag: its agent waits its fixed 30 s).

    python scripts/bench_launch.py                 # ~6 min on 2 CPUs (torchrun's failed restarts wait ~20 s each)
    python scripts/bench_launch.py --nproc 1 2 --rounds 2 --no-sigterm
    python scripts/bench_launch.py --nproc 1 --rounds 2 --no-sigterm --backend nccl   # scripts/gpu_launch.sh

The same file is the rank script of every launcher (BENCH_LAUNCH_DIR set): torchrun-style, it reads its environment,
init_process_group, resumes from a snapshot rank 0 keeps writing, and starts one child process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


# -- the rank script --------------------------------------------------------------------------------------------
def _write(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _init_backend(dist):
    """gloo on CPU; with BENCH_BACKEND=nccl, the rank's GPU (LOCAL_RANK) and one all-reduce per step on it."""
    if os.environ.get("BENCH_BACKEND", "gloo") != "nccl":
        dist.init_process_group("gloo")
        return lambda: None
    import torch

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    x = torch.ones(1 << 20, device=device)

    def step() -> None:
        dist.all_reduce(x)
        torch.cuda.synchronize(device)
    step()  # the communicator is up before the rank says it runs
    return step


def rank_main() -> None:
    t_main = time.time()
    import torch.distributed as dist

    out = os.environ["BENCH_LAUNCH_DIR"]
    if os.environ.get("BENCH_DEAF") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    collective = _init_backend(dist)
    rank, attempt = dist.get_rank(), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    snap = os.path.join(out, "snapshot.json")
    step = json.load(open(snap))["step"] if os.path.exists(snap) else 0
    child = subprocess.Popen(["sleep", "1000"])  # a descendant, like a DataLoader worker
    _write(os.path.join(out, f"main-a{attempt}-r{rank}.json"),
           {"pid": os.getpid(), "child": child.pid, "t_main": t_main, "t_resumed": time.time(), "step": step})
    while True:
        time.sleep(0.1)
        collective()
        step += 1
        if rank == 0:
            _write(snap, {"step": step})


# -- the benchmark ----------------------------------------------------------------------------------------------
def launchers(nproc: int, deaf: bool = False) -> dict[str, list[str]]:
    me = os.path.abspath(__file__)
    py = sys.executable
    ours = [py, "-m", "supervisor.launch.cli", f"--nproc-per-node={nproc}", "--max-restarts=1"]
    if deaf:
        ours.append("--shutdown-timeout=1")
    return {
        "torchrun": [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                     "--max-restarts=1", me],
        "rankvisor-run": [*ours, me],
        "rankvisor-run --fast": [*ours, "--fast", me],
    }


def _mains(d: str, attempt: int) -> dict[int, dict]:
    got = {}
    for name in os.listdir(d):
        if name.startswith(f"main-a{attempt}-r") and name.endswith(".json"):
            try:
                got[int(name[len(f"main-a{attempt}-r"):-5])] = json.load(open(os.path.join(d, name)))
            except (OSError, ValueError):
                pass
    return got


def _tail(path: str, n: int = 3000) -> str:
    try:
        return open(path, errors="replace").read()[-n:]
    except OSError:
        return ""


def one_run(c, name: str, args: list[str], nproc: int, tmp: str, kind: str) -> dict:
    """kind "survivors": start, then kill -9 of the launcher; kind "restart": start, then kill -9 of one rank."""
    d = c.tempfile.mkdtemp(dir=tmp)
    env = c.child_env(BENCH_LAUNCH_DIR=d, OMP_NUM_THREADS="1")
    t0 = time.time()
    log_path = os.path.join(d, "launcher.log")
    with open(log_path, "w") as log:
        proc = c.spawn(args, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    row: dict = {"launcher": name, "nproc": nproc}
    try:
        first = _all_ranks(c, proc, d, 0, nproc)
        if not first:
            raise RuntimeError(f"{name} nproc={nproc}: ranks did not all reach main():\n{_tail(log_path)}")
        row["start"] = max(m["t_main"] for m in first.values()) - t0
        pids = [p for m in first.values() for p in (m["pid"], m["child"])]
        c.REAPER.track(*pids)
        c.REAPER.track_tree(proc.pid)
        if kind == "survivors":
            t_kill = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            gone = c.wait_until(lambda: not any(c.alive(p) for p in pids), SURVIVOR_WAIT_S, interval=0.01)
            row["gone"] = time.monotonic() - t_kill if gone else None
            time.sleep(max(0.0, t_kill + SURVIVOR_WAIT_S - time.monotonic()))
            row["survivors"] = f"{sum(c.alive(p) for p in pids)}/{len(pids)}"
        else:  # mid-run: rank 0 has saved a few snapshots, as a real job would have
            c.wait_until(lambda: _snapshot_step(d) >= SNAPSHOTS_BEFORE_KILL, RANK_WAIT_S)
            t_kill = time.time()
            os.kill(first[nproc - 1]["pid"], signal.SIGKILL)
            again = _all_ranks(c, proc, d, 1, nproc)
            row["restart"] = max(m["t_resumed"] for m in again.values()) - t_kill if again else None
            row["resumed"] = bool(again) and min(m["step"] for m in again.values()) > 0
            if not again:
                c.log(f"{name} nproc={nproc}: the restart failed (launcher exit code {proc.poll()})")
    finally:
        c.stop_process(proc)
        c.REAPER.kill_all()
    return row


SURVIVOR_WAIT_S = 5.0
SNAPSHOTS_BEFORE_KILL = 3


def _snapshot_step(d: str) -> int:
    try:
        return json.load(open(os.path.join(d, "snapshot.json")))["step"]
    except (OSError, ValueError, KeyError):
        return 0
RANK_WAIT_S = 120.0


def _all_ranks(c, proc, d: str, attempt: int, nproc: int) -> dict | None:
    """Every rank's record of ``attempt``, or None once the launcher gave up (exited) or after RANK_WAIT_S."""
    got = c.wait_until(lambda: ((m := _mains(d, attempt)) and len(m) == nproc and m) or proc.poll() is not None,
                       RANK_WAIT_S)
    return got if isinstance(got, dict) else None


def sigterm_run(c, name: str, args: list[str], tmp: str) -> dict:
    d = c.tempfile.mkdtemp(dir=tmp)
    proc = c.spawn(args, cwd=d, env=c.child_env(BENCH_LAUNCH_DIR=d, BENCH_DEAF="1", OMP_NUM_THREADS="1"))
    try:
        first = c.wait_until(lambda: (m := _mains(d, 0)) and len(m) == 2 and m, 180)
        if not first:
            raise RuntimeError(f"{name}: ranks did not reach main()")
        pids = [p for m in first.values() for p in (m["pid"], m["child"])]
        c.REAPER.track(*pids)
        c.REAPER.track_tree(proc.pid)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        return {"launcher": name, "stop": time.monotonic() - t, "rc": rc,
                "left": f"{sum(c.alive(p) for p in pids)}/{len(pids)}"}
    finally:
        c.stop_process(proc)
        c.REAPER.kill_all()


def main() -> int:
    import argparse

    sys.path.insert(0, SCRIPTS)
    import _bench_common as c
    import tempfile

    c.tempfile = tempfile
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per nproc, launcher order rotated each round: the first kills the launcher "
                        "(survivors), the others kill a rank (restart)")
    p.add_argument("--no-sigterm", action="store_true")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="nccl: one GPU per rank (LOCAL_RANK)")
    ns = p.parse_args()
    os.environ["BENCH_BACKEND"] = ns.backend  # inherited by every launcher and its ranks (child_env copies it)
    if ns.backend == "nccl":  # NVLink multicast off on shared hosts (what rankvisor sets for its own ranks)
        os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    tmp = tempfile.mkdtemp(prefix="bench_launch-")
    rows, stops = [], []
    try:
        with c.Watchdog(1200):
            for nproc in ns.nproc:
                for r in range(ns.rounds):
                    kind = "survivors" if r == 0 else "restart"
                    for name, args in c.rotate(list(launchers(nproc).items()), r):
                        c.log(f"{name} nproc={nproc} round {r} ({kind})")
                        rows.append(one_run(c, name, args, nproc, tmp, kind))
            if not ns.no_sigterm:
                for name, args in launchers(2, deaf=True).items():
                    c.log(f"{name}: SIGTERM with a rank ignoring it")
                    stops.append(sigterm_run(c, name, args, tmp))
    finally:
        c.REAPER.kill_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(table(c, rows, ns.nproc, ns.backend))
    if stops:
        print(c.format_table("SIGTERM to the launcher, 2 ranks, rank scripts ignore SIGTERM",
                             ["launcher", "launcher gone after", "exit code", "ranks+children left"],
                             [[s["launcher"], c.f_s(s["stop"], 2), s["rc"], s["left"]] for s in stops],
                             ["rankvisor-run: --shutdown-timeout=1; torchrun: its agent's fixed 30 s timeout"]))
    return 0


def table(c, rows: list[dict], nprocs: list[int], backend: str = "gloo") -> str:
    out = []
    names = list(launchers(1))
    for nproc in nprocs:
        by = {n: [r for r in rows if r["launcher"] == n and r["nproc"] == nproc] for n in names}
        base = by["torchrun"]
        for n in names:
            rs = by[n]
            st = [r["start"] for r in rs]
            rt = [r.get("restart") for r in rs if "resumed" in r]
            ok = [r for r in rt if r is not None]
            out.append([nproc, n, c.f_s(c.median(st), 2), c.f_s(c.pct(st, .99), 2),
                        c.f_x(c.paired_ratio([r["start"] for r in base], st)),
                        c.f_s(c.median(ok), 2) if ok else "failed", c.f_s(c.pct(ok, .99), 2) if ok else "-",
                        c.f_x(c.paired_ratio([r.get("restart") for r in base if "resumed" in r], rt)),
                        f"{sum(bool(r.get('resumed')) for r in rs)}/{len(rt)}",
                        next((r["survivors"] for r in rs if "survivors" in r), "n/a"),
                        next((c.f_s(r["gone"], 2) if r["gone"] is not None else "> 5 s" for r in rs if "gone" in r),
                             "n/a")])
    return c.format_table(
        f"rankvisor-run vs torchrun, {'CPU, gloo' if backend == 'gloo' else 'CUDA, nccl'} "
        "(medians and p99 over rounds; speed-up = torchrun / this, paired)",
        ["nproc", "launcher", "start med", "start p99", "start speed-up", "restart med", "restart p99",
         "restart speed-up", "restarts resumed", "alive 5 s after kill -9 launcher", "all gone after"], out,
        ["start: launcher started -> every rank in main(); restart: kill -9 of a rank -> every rank re-initialised",
         "alive: rank scripts + one child each, 5 s after kill -9 of the launcher",
         "restart 'failed': the launcher gave up instead of bringing every rank back (speed-up n/a)"])


if __name__ == "__main__":
    if os.environ.get("BENCH_LAUNCH_DIR"):
        import torch.distributed  # noqa: F401  a torchrun script imports torch at the top, before main() runs
        rank_main()
    else:
        sys.exit(main())
