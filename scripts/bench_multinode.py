"""rankvisor-run --nnodes against torchrun (python -m torch.distributed.run), side by side in one run on this host:
N launchers on 127.0.0.1 are N nodes (c10d rendezvous on a free port, node 0 hosting the store), 2 ranks each,
running this file as a gloo DDP script that resumes from the snapshot rank 0 writes every step.

For N in 2, 3 and each launcher (the order rotated from one round to the next):
  rank   --nnodes=N: start -> every rank in main(); kill -9 of a rank of the last node -> every rank of every node
         re-initialised (process group and DDP up again) and resumed from the snapshot        (target <= 5 s)
  node   --nnodes=1:N: kill -9 of the last node's launcher -> its ranks (and their children) gone (target <= 1 s);
         the other nodes' ranks re-initialised without it and resumed                          (target <= 10 s)
Then the job is told to finish (a file the ranks look for): each launcher's exit code is recorded (one that has not
exited 60 s later is stopped and shown as "hung"), and every process seen anywhere (launchers, ranks, each rank's
child) is counted alive 5 s after the end (target 0). A launcher that has not brought the ranks back 120 s after the
fault is stopped there and shown as "hung > 120 s". The restart counts each node's ranks saw
(TORCHELASTIC_RESTART_COUNT, per node) are listed against --max-restarts=3.

Both launchers get the same --rdzv-conf: keep_alive_interval=1, keep_alive_max_attempt=3, last_call_timeout=1
(rankvisor-run's defaults; torchrun's own are 5, 3 and 30 s, which would only make its figures longer).

    python scripts/bench_multinode.py                        # N = 2, 3; one round; ~10 min on 2 shared CPUs
    python scripts/bench_multinode.py --nodes 2 --rounds 3 --launchers torchrun rankvisor-run
    python scripts/bench_multinode.py --launchers "rankvisor-run --fast" "rankvisor-run --fast +dynamo"
"""
from __future__ import annotations

import time

T_START = time.time()  # the script's first line: a rank process is running it (before torch is imported)

import gc  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
MAX_RESTARTS = 3
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=1"
START_WAIT_S = 180.0
RESUME_WAIT_S = 120.0
FINISH_WAIT_S = 60.0
LEFT_AFTER_S = 5.0
GONE_WAIT_S = 5.0
SNAPSHOTS_BEFORE_FAULT = 3


# -- the rank script ----------------------------------------------------------------------------------------------
def _write(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def rank_main() -> None:
    t_main = time.time()
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP  # imported at the top, as scripts do (below)

    out = os.environ["BENCH_MN_DIR"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(16, 16))  # broadcasts the parameters: every rank of every node is connected
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    snap = os.path.join(out, "snapshot.json")
    step = json.load(open(snap))["step"] if os.path.exists(snap) else 0
    child = subprocess.Popen(["sleep", "1000"])  # a descendant, like a DataLoader worker
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    _write(os.path.join(out, f"main-{restart}-r{rank}-{os.getpid()}.json"),
           {"pid": os.getpid(), "child": child.pid, "t_start": T_START, "t_main": t_main,
            "t_resumed": time.time(), "step": step,
            "rank": rank, "world": world, "node": int(os.environ["GROUP_RANK"]), "restart": int(restart)})
    finish = os.path.join(out, "finish")
    while True:
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()  # the gradient all-reduce, across the nodes
        opt.step()
        step += 1
        if rank == 0:
            _write(snap, {"step": step})
        done = torch.tensor([float(rank == 0 and os.path.exists(finish))])
        dist.all_reduce(done)  # every rank leaves at the same step
        if done.item():
            break
        time.sleep(0.1)
    child.kill()
    child.wait()
    del model, opt  # DDP's reducer holds work on the group in cycles: gone before the group is (ddp_steps.py)
    gc.collect()
    dist.destroy_process_group()


# -- the launchers ------------------------------------------------------------------------------------------------
LAUNCHERS = ("torchrun", "rankvisor-run", "rankvisor-run --fast")
# --fast with DDP's own lazy import (torch._dynamo, seconds) done once in the forkserver, not in every restart
DYNAMO = "rankvisor-run --fast +dynamo"


def command(name: str, nnodes: str, node: int, port: int) -> list[str]:
    conf = f"{RDZV_CONF},is_host={int(node == 0)}"
    common = [f"--nnodes={nnodes}", "--nproc-per-node=2", f"--max-restarts={MAX_RESTARTS}", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench", f"--rdzv-conf={conf}"]
    me = os.path.abspath(__file__)
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *common, me]
    fast = ["--fast"] if "--fast" in name else []
    if name == DYNAMO:
        fast += ["-c", "runtime.preload=[torch,torch._dynamo]"]
    return [sys.executable, "-m", "supervisor.launch.cli", *common, *fast, me]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mains(d: str) -> list[dict]:
    got = []
    for path in glob.glob(os.path.join(d, "main-*.json")):
        try:
            got.append(json.load(open(path)))
        except (OSError, ValueError):
            pass
    return got


def _snapshot_step(d: str) -> int:
    try:
        return json.load(open(os.path.join(d, "snapshot.json")))["step"]
    except (OSError, ValueError, KeyError):
        return 0


class Run:
    """One job: ``n`` launchers of one kind, a fault, the figures."""

    def __init__(self, c, name: str, n: int, kind: str, tmp: str) -> None:
        self.c, self.name, self.n, self.kind = c, name, n, kind
        self.d = tempfile.mkdtemp(dir=tmp)
        port = _free_port()
        env = c.child_env(BENCH_MN_DIR=self.d, OMP_NUM_THREADS="1")
        nnodes = str(n) if kind == "rank" else f"1:{n}"
        self.procs = []
        for i in range(n):
            cwd = os.path.join(self.d, f"node{i}")
            os.makedirs(cwd)
            with open(os.path.join(cwd, "launcher.log"), "w") as log:
                self.procs.append(c.spawn(command(name, nnodes, i, port), cwd=cwd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        self.t0 = time.time()
        self.seen: set[int] = set()
        self.row: dict = {"launcher": name, "nodes": n, "fault": kind}

    def measure(self) -> dict:
        c, row = self.c, self.row
        first = c.wait_until(lambda: (m := _mains(self.d)) and len(m) >= 2 * self.n and m, START_WAIT_S, 0.02)
        if not first:
            raise RuntimeError(f"{self.name} N={self.n}: the ranks did not all reach main()\n{self.tail()}")
        row["start"] = max(m["t_main"] for m in first) - self.t0
        self._track(first)
        c.wait_until(lambda: _snapshot_step(self.d) >= SNAPSHOTS_BEFORE_FAULT, RESUME_WAIT_S)
        t_fault = time.time()
        (self._kill_rank if self.kind == "rank" else self._kill_node)(first)
        want = 2 * self.n if self.kind == "rank" else 2 * (self.n - 1)
        again = c.wait_until(lambda: self._resumed(t_fault, want), RESUME_WAIT_S, 0.02)
        row["back"] = max(m["t_start"] for m in again) - t_fault if again else None
        row["resume"] = max(m["t_resumed"] for m in again) - t_fault if again else None
        row["resumed_from"] = min(m["step"] for m in again) if again else None
        row["counts"] = self._counts(again or [])
        self._finish()
        return row

    def _kill_rank(self, first: list[dict]) -> None:
        victim = max(first, key=lambda m: m["rank"])  # a rank of the last node
        os.kill(victim["pid"], signal.SIGKILL)

    def _kill_node(self, first: list[dict]) -> None:
        import psutil

        launcher = self.procs[-1]  # node n-1: never the store's host (is_host=0)
        below = {p.pid for p in psutil.Process(launcher.pid).children(recursive=True)}
        dead = [p for m in first if m["pid"] in below for p in (m["pid"], m["child"])]
        t = time.monotonic()
        launcher.kill()
        gone = self.c.wait_until(lambda: not any(self.c.alive(p) for p in dead), GONE_WAIT_S, 0.01)
        self.row["gone"] = time.monotonic() - t if gone else None
        self.victim = launcher

    def _resumed(self, t_fault: float, want: int) -> list[dict] | None:
        """Every rank of the new world up (started after the fault, in a world of ``want`` ranks)."""
        newer = [m for m in _mains(self.d) if m["t_start"] > t_fault and m["world"] == want]
        latest = {}
        for m in sorted(newer, key=lambda m: m["t_resumed"]):
            latest[m["rank"]] = m
        if len(latest) < want:
            return None
        self._track(list(latest.values()))
        return list(latest.values())

    def _counts(self, again: list[dict]) -> str:
        """The restart count each node's ranks saw in the round after the fault (node = GROUP_RANK)."""
        by_node: dict[int, set[int]] = {}
        for m in again:
            by_node.setdefault(m["node"], set()).add(m["restart"])
        return " ".join(f"{'/'.join(map(str, sorted(v)))}" for _, v in sorted(by_node.items())) or "-"

    def _finish(self) -> None:
        c = self.c
        open(os.path.join(self.d, "finish"), "w").close()
        codes = []
        for p in self.procs:
            if p is getattr(self, "victim", None):
                codes.append(p.wait())
                continue
            try:
                codes.append(p.wait(FINISH_WAIT_S))
            except subprocess.TimeoutExpired:
                codes.append("hung")
        self.row["exit"] = " ".join(str(x) for x in codes)
        for p in self.procs:
            c.stop_process(p)
        time.sleep(LEFT_AFTER_S)
        left = [p for p in self.seen if c.alive(p)]
        self.row["left"] = len(left)

    def _track(self, mains: list[dict]) -> None:
        for m in mains:
            self.seen.update((m["pid"], m["child"]))
            self.c.REAPER.track(m["pid"], m["child"])
        for p in self.procs:
            self.seen.update(self.c.REAPER.track_tree(p.pid))

    def tail(self) -> str:
        return "\n".join(open(f).read()[-1500:] for f in glob.glob(os.path.join(self.d, "node*", "launcher.log")))


def one_run(c, name: str, n: int, kind: str, tmp: str) -> dict:
    run = Run(c, name, n, kind, tmp)
    try:
        return run.measure()
    finally:
        for p in run.procs:
            c.stop_process(p)
        c.REAPER.kill_all()


def _common():
    """scripts/_bench_common.py (imported here only: a rank runs this file too, and needs none of it)."""
    sys.path.insert(0, SCRIPTS)
    import _bench_common

    return _bench_common


def _args():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 3])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=[*LAUNCHERS, DYNAMO])
    return p.parse_args()


def main() -> int:
    c, ns = _common(), _args()
    tmp = tempfile.mkdtemp(prefix="bench_multinode-")
    rows = []
    try:
        with c.Watchdog(3600):
            for n in ns.nodes:
                for r in range(ns.rounds):
                    for kind in ("rank", "node"):
                        for name in c.rotate(ns.launchers, r):
                            c.log(f"{name}: {n} nodes x 2 ranks, kill -9 of a {kind if kind == 'rank' else 'launcher'}")
                            rows.append(one_run(c, name, n, kind, tmp))
    finally:
        c.REAPER.kill_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(table(c, rows, ns))
    return 0


def table(c, rows: list[dict], ns) -> str:
    out = []
    for n in ns.nodes:
        for kind in ("rank", "node"):
            for name in ns.launchers:
                rs = [r for r in rows if (r["launcher"], r["nodes"], r["fault"]) == (name, n, kind)]
                resumed = [r["resume"] for r in rs if r["resume"] is not None]
                back = [r["back"] for r in rs if r["back"] is not None]
                hung = f"hung > {RESUME_WAIT_S:.0f} s"
                out.append([n, "rank" if kind == "rank" else "launcher (1:N)", name,
                            c.f_s(c.median([r["start"] for r in rs]), 2), c.f_s(c.median(back), 2) if back else hung,
                            c.f_s(c.median(resumed), 2) if resumed else hung,
                            f"{len(resumed)}/{len(rs)}",
                            "-" if kind == "rank" else
                            " ".join(c.f_s(r["gone"], 2) if r.get("gone") is not None else f"> {GONE_WAIT_S:.0f} s"
                                     for r in rs),
                            "; ".join(r["exit"] for r in rs), "; ".join(r["counts"] for r in rs),
                            sum(r["left"] for r in rs)])
    return c.format_table(
        "multi-node: rankvisor-run vs torchrun, N launchers on one host (c10d), 2 gloo DDP ranks each "
        "(medians over rounds)",
        ["N", "kill -9 of", "launcher", "start", "script again after", "resumed after", "resumed",
         "its ranks gone", "exit codes",
         f"restart count per node (max {MAX_RESTARTS})", "left"], out,
        ["start: launchers started -> every rank in main(); script again after: the kill -> every rank of the new "
         "world running the script's first line (the launcher's part)",
         "resumed after: the kill -> every rank of the new world re-initialised (process group, DDP) from the "
         "snapshot: the script's own start (python, import torch, DDP's first use) included",
         "its ranks gone: the killed launcher's ranks and their children, all dead (kill -9 of a launcher only)",
         "exit codes: node 0 .. N-1 once the job was told to finish (-9: the killed launcher; hung: stopped 60 s "
         "later)",
         "restart count per node: TORCHELASTIC_RESTART_COUNT seen by each node's ranks after the fault, by GROUP_RANK",
         f"left: processes seen anywhere (launchers, ranks, their children) alive {LEFT_AFTER_S:.0f} s after the end",
         f"the same --rdzv-conf for both: {RDZV_CONF}"])


if __name__ == "__main__":
    if os.environ.get("BENCH_MN_DIR"):
        import torch.nn.parallel  # noqa: F401  a training script imports torch at the top, before main() runs
        rank_main()
    else:
        sys.exit(main())
