#!/usr/bin/env python
"""Chaos soak: random faults against a serving tree, with invariants checked after every cycle.

::

    python scripts/chaos.py                      # 200 faults, dp=2 tp=2, echo/faulty worker, seed printed
    python scripts/chaos.py --cycles 1000        # the full soak
    python scripts/chaos.py --seed 7 -v          # replay one schedule, one line per cycle on stderr
    python scripts/chaos.py --worker tp_mlp      # the real tensor-parallel model (slower: torch.distributed/gloo)
    python scripts/chaos.py --exclude grandchild/stopping --supervisor-phases idle,mid-call   # narrow the deck

The tree runs in this process through the Supervisor API (``restart=one_for_one`` between dp groups, with an
intensity large enough that random faults never exhaust it; inside a group a failure always restarts the whole
group). A client thread issues calls all the time (collective_rpc by name, by callable, per group, with
unique_reply_rank; execute_model), each with a timeout, and checks the answers.

Each cycle injects one fault, drawn from a shuffled deck of every (kind, phase) pair, against a random rank:

    kinds   sigkill   SIGKILL from outside          sigstop   SIGSTOP (caught by the heartbeat deadline)
            sigsegv   a real segfault (callable, worker.faults.crash('segv')) or SIGSEGV from outside
            sigterm   SIGTERM (a clean exit 0, restarted: permanent children)
            exit      os._exit(3) inside a call     raise     the called callable raises
            hang      a call that sleeps past its deadline: RpcTimeout -> the rank is declared hung
            grandchild  a callable spawns a subprocess (sometimes in its own session), then the rank is killed:
                      the grandchild must be reaped
    phases  starting    the target's group is being started: a fresh tree, or a group's restart
            idle        the client is paused; no call is in flight
            mid-call    a call to the target's group is in flight
            restarting  another rank of the group was just killed; the group is being torn down / restarted
            stopping    the tree is shutting down (then a fresh tree is started)

Signals reach a process at any point; a callable can only run in a READY worker, so in the starting phase it
queues at the group's gate and runs the moment the group opens. Every ``--supervisor-every``-th cycle targets the
supervisor itself instead: a tree runs in a child process (this script with ``--child-tree``, or
``python -m supervisor workload=serve`` while starting), is SIGKILLed while starting, idle or mid-call, every
worker and grandchild must be gone within 1 s, and the tree is started again and stopped with SIGTERM.

After every cycle: the tree is healthy again (``check_health`` succeeds within ``--recovery-timeout``) or has
given up per policy (then a fresh tree is started); every call was answered or failed with one of the
supervisor's error types, and none ran past timeout + 5 s (HUNG); the fault's victims are gone; nothing leaked:
processes beyond the current workers, ``/dev/shm/rvq-*`` segments of our processes, POSIX semaphores mapped by our
processes, this process's file descriptors and threads. Every wait is bounded; a finally-block stops everything
by pid. Deterministic schedule with --seed (timing is not: the machine is shared). Exit status 0 iff no
invariant was violated.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from supervisor.core.topology import TREE_ENV  # noqa: E402  (every worker descendant carries its supervisor's pid)
from transport.shm import SHM_DIR  # noqa: E402
from transport.shm import owner_pid as shm_owner  # noqa: E402

KINDS = ("sigkill", "sigsegv", "sigstop", "sigterm", "exit", "raise", "hang", "grandchild")
PHASES = ("starting", "idle", "mid-call", "restarting", "stopping")
SUPERVISOR_PHASES = ("starting", "idle", "mid-call")
RDZV_PREFIX = "rankvisor-rdzv-"
_mono = time.monotonic
_FD_SLACK = 2  # descriptors a live tree may hold beyond the baseline at a cycle's end (see check_leaks)


# ---------------------------------------------------------------------------------------------------------------
# options
@dataclass
class SoakOptions:
    seed: int = 0
    cycles: int = 200
    dp: int = 2
    tp: int = 2
    worker: str = "echo"  # echo (the faulty echo worker: fast) | tp_mlp (the real model)
    start_method: str = "forkserver"
    supervisor_every: int = 20  # every N-th cycle kills the supervisor (0 = never)
    supervisor_phases: tuple = SUPERVISOR_PHASES  # when the supervisor is killed
    exclude: tuple = ()  # (kind, phase) pairs left out of the deck
    intensity: int = 1000  # restart.intensity / period_s: generous, so random faults never exhaust it
    period_s: float = 1.0
    call_timeout_s: float = 0.0  # 0 = by worker (echo 4 s, tp_mlp 30 s)
    hang_call_timeout_s: float = 1.5  # the deadline of the call that hangs on purpose
    recovery_timeout_s: float = 0.0  # 0 = by worker (echo 30 s, tp_mlp 120 s)
    startup_timeout_s: float = 0.0  # runtime.startup_timeout_s; 0 = by worker (echo 4 s, tp_mlp 60 s)
    heartbeat_timeout_s: float = 1.0
    heartbeat_interval_s: float = 0.2
    grace_s: float = 1.0
    hung_slack_s: float = 5.0  # a call still running at timeout + this is HUNG
    late_slack_s: float = 1.0  # a call that ends after timeout + this is late (reported, not fatal)
    orphan_timeout_s: float = 1.0  # supervisor SIGKILLed: every worker and grandchild gone within this
    settle_s: float = 3.0  # leak checks wait this long for things to go away
    child_ready_timeout_s: float = 120.0
    verbose: bool = False
    quiet_log: bool = True  # silence the supervisor's loguru messages (restarts are expected here)

    def __post_init__(self) -> None:
        echo = self.worker == "echo"
        self.call_timeout_s = self.call_timeout_s or (4.0 if echo else 30.0)
        self.recovery_timeout_s = self.recovery_timeout_s or (30.0 if echo else 120.0)
        self.startup_timeout_s = self.startup_timeout_s or (4.0 if echo else 60.0)

    @property
    def world(self) -> int:
        return self.tp

    def overrides(self, child: bool = False) -> list[str]:
        """Hydra overrides of the tree under test."""
        if self.worker == "echo":
            worker = ["worker=echo", "worker.cls=worker.faults:FaultyWorker"]
            if child:
                worker.append("runtime.preload=[]")  # a child tree's forkserver need not import torch for echo
        else:
            worker = ["workload.hidden=64"]  # the default worker and workload: the tensor-parallel MLP
        return [*worker, f"parallel.dp={self.dp}", f"parallel.tp={self.tp}", "restart=one_for_one",
                f"restart.intensity={self.intensity}", f"restart.period_s={self.period_s}",
                f"restart.startup_intensity={self.intensity}", f"restart.startup_period_s={self.period_s}",
                f"worker.heartbeat_timeout_s={self.heartbeat_timeout_s}",
                f"worker.heartbeat_interval_s={self.heartbeat_interval_s}", f"shutdown.grace_s={self.grace_s}",
                f"runtime.startup_timeout_s={self.startup_timeout_s}", f"runtime.start_method={self.start_method}",
                "logging.level=WARNING"]

    def config(self):
        from supervisor.config import load_config

        return load_config([*self.overrides(), "logging.events=false"])

    def shutdown_bound(self) -> float:
        return self.grace_s + 3 * 1.0 + 10 + self.hung_slack_s  # Supervisor.shutdown's own bound, plus slack

    def start_bound(self) -> float:
        return self.startup_timeout_s * 4 + 60


# ---------------------------------------------------------------------------------------------------------------
# callables sent to workers (they receive the worker first; every rank of the group runs them, one misbehaves)
def _fault_crash(w, target: int, how: str, delay: float):
    if w.rank == target:
        time.sleep(delay)
        from worker.faults import crash

        crash(how)
    return w.rank


def _fault_raise(w, target: int, delay: float):
    if w.rank == target:
        time.sleep(delay)
        raise RuntimeError(f"chaos: injected failure on rank {w.rank}")
    return w.rank


def _fault_hang(w, target: int, seconds: float):
    if w.rank == target:
        time.sleep(seconds)
    return w.rank


def _spawn_grandchild(w, target: int, detach: bool):
    if target >= 0 and w.rank != target:
        return None
    import subprocess as sp

    p = sp.Popen(["sleep", "600"], start_new_session=detach, stdin=sp.DEVNULL, stdout=sp.DEVNULL,
                 stderr=sp.DEVNULL)
    return p.pid


def _slow(w, seconds: float):
    time.sleep(seconds)
    return w.rank


def _tag(w, k: int):
    return (w.rank, k)


def _pickle_callables_by_value() -> None:
    """Workers cannot import this script as a module: ship its callables by value."""
    if __name__ != "__main__" and __name__ in sys.modules:
        try:
            import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[__name__])
        except (ImportError, ValueError):
            pass


_pickle_callables_by_value()


# ---------------------------------------------------------------------------------------------------------------
# calls: bounded, classified
def _supervisor_errors() -> tuple[type, ...]:
    from supervisor.errors import SupervisorError

    return (SupervisorError,)


@dataclass
class CallResult:
    status: str  # ok | error | unclear | hung | wrong
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def error_type(self) -> str:
        return type(self.error).__name__ if self.error is not None else ""


class CallStats:
    """Every call's outcome, from every thread."""

    def __init__(self, opts: SoakOptions) -> None:
        self.opts = opts
        self._lock = threading.Lock()
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.unclear: list[str] = []
        self.wrong: list[str] = []
        self.hung: list[str] = []
        self.late = 0
        self.max_overrun = 0.0

    def record(self, what: str, res: CallResult, timeout: float) -> None:
        overrun = res.seconds - timeout
        with self._lock:
            self.max_overrun = max(self.max_overrun, overrun)
            if res.status == "hung" or overrun > self.opts.hung_slack_s:
                self.hung.append(f"{what}: {res.seconds:.1f} s with a {timeout} s timeout")
                return
            if overrun > self.opts.late_slack_s:
                self.late += 1
            if res.status == "ok":
                self.ok += 1
            elif res.status == "error":
                self.failed[res.error_type] += 1
            elif res.status == "wrong":
                self.wrong.append(f"{what}: {res.value!r:.200}")
            else:
                self.unclear.append(f"{what}: {res.error_type}: {str(res.error)[:200]}")

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values()) + len(self.unclear) + len(self.wrong)


def call_once(fn: Callable[[], Any], check: Callable[[Any], bool] | None = None) -> CallResult:
    """Run one call here and classify it (no bound: the caller bounds it, or watches it)."""
    t0 = _mono()
    try:
        value = fn()
    except _supervisor_errors() as exc:
        return CallResult("error", error=exc, seconds=_mono() - t0)
    except Exception as exc:  # anything else is not a clear error
        return CallResult("unclear", error=exc, seconds=_mono() - t0)
    seconds = _mono() - t0
    if check is not None and not check(value):
        return CallResult("wrong", value=value, seconds=seconds)
    return CallResult("ok", value=value, seconds=seconds)


class Pending:
    """A call running in its own thread, so that the soak's thread never waits on it without a bound."""

    def __init__(self, what: str, fn: Callable[[], Any], timeout: float, check=None) -> None:
        self.what, self.timeout = what, timeout
        self.t0 = _mono()
        self.result: CallResult | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, check), name=f"chaos-call {what}", daemon=True)
        self._thread.start()

    def _run(self, fn, check) -> None:
        self.result = call_once(fn, check)

    def finish(self, slack: float) -> CallResult:
        """Wait up to timeout + slack from the start; HUNG if it is still running then."""
        self._thread.join(max(0.0, self.t0 + self.timeout + slack - _mono()))
        if self._thread.is_alive():
            return CallResult("hung", seconds=_mono() - self.t0)
        assert self.result is not None
        return self.result


def bounded(what: str, fn: Callable[[], Any], timeout: float, slack: float, check=None) -> CallResult:
    return Pending(what, fn, timeout, check).finish(slack)


# ---------------------------------------------------------------------------------------------------------------
# the client: calls all the time
class Client(threading.Thread):
    def __init__(self, soak: "Soak", seed: int) -> None:
        super().__init__(name="chaos-client", daemon=True)
        self.soak = soak
        self.rng = random.Random(seed)
        self._cond = threading.Condition()
        self._paused = False
        self._busy = False
        self._halt = False
        self.current: tuple[float, float, str] | None = None  # (start, timeout, what) of the call in flight
        self.calls = 0

    def run(self) -> None:
        while True:
            with self._cond:
                while self._paused and not self._halt:
                    self._cond.wait(0.1)
                if self._halt:
                    return
                self._busy = True
            try:
                self._one()
            finally:
                with self._cond:
                    self._busy = False
                    self.current = None
                    self._cond.notify_all()

    def _one(self) -> None:
        sup = self.soak.sup
        if sup is None:
            time.sleep(0.01)
            return
        what, fn, check = self.soak.random_call(self.rng, sup)
        timeout = self.soak.opts.call_timeout_s
        self.current = (_mono(), timeout, what)
        res = call_once(fn, check)
        self.calls += 1
        self.soak.calls.record(f"client {what}", res, timeout)
        if res.status in ("wrong", "unclear"):
            self.soak.violation(f"client call {what}: {res.status}: "
                                f"{res.error_type or ''} {str(res.error or res.value)[:200]}")
        time.sleep(0.002 if res.status == "ok" else 0.01)  # leave some CPU to the tree on a small machine

    def hung_for(self) -> float:
        cur = self.current
        if cur is None:
            return 0.0
        over = _mono() - cur[0] - cur[1]
        return over if over > self.soak.opts.hung_slack_s else 0.0

    def pause(self, timeout: float) -> bool:
        deadline = _mono() + timeout
        with self._cond:
            self._paused = True
            while self._busy:
                left = deadline - _mono()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        self.join(timeout)


# ---------------------------------------------------------------------------------------------------------------
# process bookkeeping
def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _verified(w) -> psutil.Process | None:
    """The live process of a worker view, verified by create time (a recycled pid is never signalled)."""
    try:
        p = psutil.Process(w.pid)
        if w.create_time is not None and abs(p.create_time() - w.create_time) > 0.01:
            return None
        return p
    except psutil.Error:
        return None


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(p: psutil.Process | None, sig: int) -> bool:
    """Signal a process we recorded (psutil refuses a pid that was reused since)."""
    if p is None:
        return False
    try:
        p.send_signal(sig)
        return True
    except psutil.Error:
        return False


def gone_within(procs, timeout: float) -> tuple[list[psutil.Process], float]:
    """Processes still running (not zombies) after ``timeout``; and how long it took until none was."""
    t0 = _mono()
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or _mono() - t0 > timeout:
            return alive, _mono() - t0
        time.sleep(0.005)


def _describe(p: psutil.Process) -> str:
    parts = [str(p.pid)]
    for what, get in (("", p.name), ("", p.status), ("parent ", p.ppid),
                      ("", lambda: " ".join(p.cmdline())[:80])):  # a zombie has no command line
        try:
            parts.append(f"{what}{get()}")
        except psutil.Error:
            pass
    return " ".join(parts) if len(parts) > 1 else f"{p.pid} (gone)"


def _is_mp_helper(p: psutil.Process) -> bool:
    """multiprocessing's forkserver or resource tracker (of a child tree)."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd


def direct_children() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children()}
    except psutil.Error:
        return {}


def reap_zombie_children(pids) -> None:
    """We are a child subreaper (the local backend makes us one): orphans of a child tree we killed are
    re-parented to us, and we must collect their exit status."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def marked_processes(markers: set[str], since: float) -> list[psutil.Process]:
    """Processes anywhere whose environment carries one of our tree markers (exec'd descendants of workers)."""
    out = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if (p.info["create_time"] or 0) < since or p.pid == os.getpid():
                continue
            if p.environ().get(TREE_ENV, "").split(":")[0] in markers and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def rendezvous_dirs(owners: set[int]) -> list[str]:
    """The supervisor's private rendezvous folders (tempdir/rankvisor-rdzv-<pid>-*) created by these pids."""
    try:
        names = os.listdir(tempfile.gettempdir())
    except OSError:
        return []
    out = []
    for n in names:
        if n.startswith(RDZV_PREFIX):
            try:
                if int(n[len(RDZV_PREFIX):].split("-", 1)[0]) in owners:
                    out.append(n)
            except ValueError:
                continue
    return out


def mapped_sems(pids) -> set[str]:
    """POSIX semaphores (/dev/shm/sem.*) mapped by these processes."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find("/dev/shm/sem.")
                    if i >= 0:
                        out.add(line[i + len("/dev/shm/"):].split()[0])
        except OSError:
            continue
    return out


# ---------------------------------------------------------------------------------------------------------------
# a tree in a child process (the supervisor-kill cycles)
class ChildTree:
    """``mode="chaos"``: this script with --child-tree (prints a JSON line with pids once READY; optional calls
    and grandchildren). ``mode="cli"``: ``python -m supervisor workload=serve`` (pids found with psutil)."""

    def __init__(self, opts: SoakOptions, mode: str, calls: bool = False, grandchildren: bool = False) -> None:
        self.opts, self.mode = opts, mode
        self.tmp = tempfile.mkdtemp(prefix="chaos-child-")
        self.err = open(os.path.join(self.tmp, "stderr.log"), "w+b")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if mode == "chaos":
            args = [sys.executable, "-u", os.path.abspath(__file__), "--child-tree", "--worker", opts.worker,
                    "--dp", str(opts.dp), "--tp", str(opts.tp), "--start-method", opts.start_method]
            args += ["--child-calls"] if calls else []
            args += ["--child-grandchildren"] if grandchildren else []
            stdout = subprocess.PIPE
        else:
            args = [sys.executable, "-m", "supervisor", "workload=serve", *opts.overrides(child=True)]
            stdout = subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=stdout, stderr=self.err, stdin=subprocess.DEVNULL,
                                     cwd=self.tmp if mode == "cli" else REPO, env=env)
        self.pid = self.proc.pid
        self.seen: dict[int, psutil.Process] = {}
        self.info: dict[str, Any] = {}
        self._buf = b""

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        for p in kids:
            self.seen.setdefault(p.pid, p)
        return kids

    def wait_ready(self, timeout: float) -> bool:
        """The READY line (chaos mode), bounded; records descendants meanwhile."""
        deadline = _mono() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            self.descendants()
            left = deadline - _mono()
            if left <= 0 or self.proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
                return False
            if select.select([fd], [], [], min(left, 0.05))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return False
                self._buf += chunk
        self.info = json.loads(self._buf.split(b"\n", 1)[0])
        self.descendants()
        return True

    def wait_descendants(self, n: int, timeout: float) -> bool:
        deadline = _mono() + timeout
        while _mono() < deadline and self.proc.poll() is None:
            if len(self.descendants()) >= n:
                return True
            time.sleep(0.002)
        return False

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            self.err.flush()
            self.err.seek(0)
            return self.err.read().decode(errors="replace")[-n:]
        except (OSError, ValueError):
            return ""

    def reap(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Whatever happened: the child and everything it started are gone afterwards (by pid)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.reap(10)
        for p in self.seen.values():
            _signal(p, signal.SIGKILL)
        reap_zombie_children(self.seen)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def child_tree_main(args) -> int:
    """--child-tree: serve a tree until SIGTERM/SIGINT; print {"pids": [...], "grandchildren": [...]} once READY."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from supervisor.api import Supervisor
    from supervisor.config import load_config

    opts = SoakOptions(worker=args.worker, dp=args.dp, tp=args.tp, start_method=args.start_method)
    cfg = load_config([*opts.overrides(child=True), "logging.events=false"])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with Supervisor(cfg) as sup:
        kids = []
        if args.child_grandchildren:
            for detach in (False, True):
                kids += [p for p in sup.collective_rpc(_spawn_grandchild, args=(-1, detach), timeout=30) if p]
        print(json.dumps({"pids": sup.pids(), "grandchildren": kids}), flush=True)
        while not stop.is_set():
            if args.child_calls:
                try:
                    sup.collective_rpc("ping", timeout=5)
                except Exception:
                    stop.wait(0.01)
            else:
                stop.wait(0.1)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# one fault and what became of it
@dataclass
class Fault:
    cycle: int
    kind: str
    phase: str
    target: str = "rank"  # rank | supervisor
    group: int = 0
    rank: int = 0  # group-local
    via: str = "signal"  # signal | callable
    t_inject: float = 0.0
    victims: list = field(default_factory=list)  # psutil.Process objects that must be gone afterwards
    grandchildren: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # (Pending, expected error types or None)
    expect_restart: bool = False
    restarts_before: int = 0
    tree_replaced: bool = False
    recovered: bool = False
    recovery_s: float | None = None
    gave_up: bool = False
    missed_window: bool = False
    notes: list = field(default_factory=list)


def _cycle_seed(seed: int, *parts: int) -> int:
    return hash((seed, *parts)) & 0xFFFFFFFF


class SoakAborted(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the soak
class Soak:
    def __init__(self, opts: SoakOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.cfg = opts.config()
        self.sup = None
        self.client: Client | None = None
        self.calls = CallStats(opts)
        self.violations: list[str] = []
        self.faults: list[Fault] = []
        self.cycle = -1
        self.t_start = time.time()
        self.my_pid = os.getpid()
        self.our_pids: set[int] = {self.my_pid}  # owners of shm segments that are ours
        self.markers: set[str] = {str(self.my_pid)}
        # What this process already had before the soak (e.g. a test session's adopted orphans of earlier tests, a
        # rendezvous folder of an earlier supervisor in this process): the soak judges only what it caused.
        from tests import leaks

        self.pre_existing_children: set[int] = set(leaks._children())
        self.pre_existing_rdzv: set[str] = set(rendezvous_dirs({self.my_pid}))
        self.child_pids: set[int] = set()
        self.child_supervisors: dict[int, str] = {}
        self.leaked_procs: set[int] = set()
        self.leaked_shm: set[str] = set()
        self.leaked_rdzv: set[str] = set()
        self.seen_sems: set[str] = set()
        self.fd_excess = 0
        self.thread_excess = 0
        self.tree_starts = 0
        self.group_restarts = 0
        self.orphan_times: list[float] = []
        self.slow_helpers: list[float] = []
        self.shutdown_times: list[float] = []
        self.deck: list[tuple[str, str]] = []
        self.base_fds = self.base_threads = 0
        self.pre: dict[str, Any] = {}
        self._x = None  # tp_mlp: one input and its reference output

    # -- reporting -------------------------------------------------------------------------------------------
    def violation(self, text: str) -> None:
        self.violations.append(f"cycle {self.cycle}: {text}")
        if self.opts.verbose:
            print(f"  VIOLATION cycle {self.cycle}: {text}", file=sys.stderr, flush=True)

    # -- the tree --------------------------------------------------------------------------------------------
    def start_tree(self, sup=None) -> None:
        """A fresh tree (bounded); a tree that will not start aborts the soak."""
        from supervisor.api import Supervisor

        for attempt in range(3):
            sup = sup or Supervisor(self.cfg, start=False)
            self.sup = sup
            self.tree_starts += 1
            res = bounded("start", sup.start, self.opts.start_bound(), self.opts.hung_slack_s)
            if res.status == "ok":
                self._note_pids()
                return
            self.violation(f"a fresh tree did not start (attempt {attempt + 1}): {res.status} "
                           f"{res.error_type}: {str(res.error)[:300]}")
            self.stop_tree(sup)
            sup = None
        raise SoakAborted("the tree does not start")

    def stop_tree(self, sup=None) -> float:
        """Shut a tree down (bounded); then make sure its processes are gone, by pid."""
        sup = sup or self.sup
        if sup is None:
            return 0.0
        procs = self._tree_procs(sup)
        t0 = _mono()
        res = bounded("shutdown", sup.shutdown, self.opts.shutdown_bound(), 0.0)
        took = _mono() - t0
        if res.status != "ok":
            self.violation(f"shutdown: {res.status} {res.error_type}: {str(res.error)[:200]}")
        left, _ = gone_within(procs, 2.0)
        if left:
            self.violation(f"after shutdown, still running: {[_describe(p) for p in left]}")
            for p in left:
                _signal(p, signal.SIGKILL)
        if self.sup is sup:
            self.sup = None
        return took

    def replace_tree(self, why: str) -> None:
        self.stop_tree()
        self.start_tree()

    def _tree_procs(self, sup) -> list[psutil.Process]:
        out = []
        for g in sup.groups():
            for w in g.workers:
                p = _verified(w) if w.alive else None
                if p is not None:
                    out.append(p)
                    try:
                        out.extend(p.children(recursive=True))
                    except psutil.Error:
                        pass
        return out

    def _note_pids(self) -> None:
        sup = self.sup
        if sup is None:
            return
        for e in sup.events.of_kind("started"):
            self.our_pids.add(e["pid"])
        for g in sup.groups():
            self.our_pids.update(w.pid for w in g.workers)

    def restarts(self) -> int:
        sup = self.sup
        return sum(g.restarts for g in sup.groups()) if sup is not None else 0

    def live_workers(self, group: int | None = None) -> list[tuple[int, int, psutil.Process]]:
        """(group, local rank, process) of every running worker (of one group)."""
        sup = self.sup
        out = []
        if sup is None:
            return out
        for g in sup.groups():
            if group is not None and g.index != group:
                continue
            for w in g.workers:
                p = _verified(w) if w.alive else None
                if p is not None and _running(p):
                    out.append((g.index, w.local_rank, p))
        return out

    def current_worker_pids(self) -> set[int]:
        return {p.pid for _, _, p in self.live_workers()}

    # -- client calls ----------------------------------------------------------------------------------------
    def random_call(self, rng: random.Random, sup):
        o = self.opts
        T, world, dp = o.call_timeout_s, o.world, o.dp
        k = rng.randrange(1 << 30)
        c = rng.random()
        if c < 0.2:
            return "ping", lambda: sup.collective_rpc("ping", timeout=T), lambda r: r == list(range(world * dp))
        if c < 0.4:
            g = rng.randrange(dp)
            return "ping group", lambda: sup.collective_rpc("ping", timeout=T, group=g), \
                lambda r: r == list(range(g * world, (g + 1) * world))
        if c < 0.55:
            gr = rng.randrange(dp * world)
            return "ping unique", lambda: sup.collective_rpc("ping", timeout=T, unique_reply_rank=gr), \
                lambda r: r == gr
        if c < 0.8:
            g = rng.randrange(dp)
            return "callable", lambda: sup.collective_rpc(_tag, timeout=T, args=(k,), group=g), \
                lambda r: r == [(i, k) for i in range(world)]
        return self._execute_model_call(sup, k, T)

    def _execute_model_call(self, sup, k: int, T: float):
        if self.opts.worker == "echo":
            return "execute_model", lambda: sup.execute_model(k, timeout=T), lambda r: r == (0, (k,), {})
        if self._x is None:
            from worker.tp_mlp import make_input, reference_forward

            x = make_input(self.cfg.workload, 0)
            self._x = (x, reference_forward(self.cfg.workload, x))
        x, ref = self._x
        return "execute_model", lambda: sup.execute_model(x, timeout=T), \
            lambda r: float((r - ref).abs().max()) < 1e-4

    # -- leaks -----------------------------------------------------------------------------------------------
    def take_baseline(self) -> None:
        gc.collect()
        self.base_fds = len(os.listdir("/proc/self/fd"))
        self.base_threads = threading.active_count()

    def leak_problems(self) -> dict[str, list]:
        from tests import leaks

        allowed = self.current_worker_pids() | leaks.helper_pids()
        procs = {}
        for pid, p in leaks._children().items():
            if pid in allowed or pid in self.pre_existing_children:
                continue
            try:
                zombie = p.status() == psutil.STATUS_ZOMBIE
                zombie_orphan = zombie and p.ppid() == self.my_pid
                if zombie and p.ppid() in allowed:
                    continue  # a live worker's own exited child: the worker reaps it (or dies and we do)
            except psutil.Error:
                continue
            if zombie_orphan and pid in self.child_pids:
                reap_zombie_children([pid])  # an orphan of a child tree we killed: ours to reap
                continue
            procs[pid] = p
        for p in marked_processes(self.markers, self.t_start - 1):
            if p.pid not in allowed:
                procs.setdefault(p.pid, p)
        shm = sorted(n for n in shm_entries() if shm_owner(n) in self.our_pids)
        current = os.path.basename(self.sup.rendezvous_dir) if self.sup is not None else None
        rdzv = [n for n in rendezvous_dirs(self.our_pids) if n != current and n not in self.pre_existing_rdzv]
        fds = len(os.listdir("/proc/self/fd")) - self.base_fds
        threads = threading.active_count() - self.base_threads
        out = {"processes": list(procs.values()), "shm": shm, "rendezvous": rdzv}
        if fds > 0:
            out["descriptors"] = [fds, self._fd_targets()]
        if threads > 0:
            out["threads"] = [threads, [t.name for t in threading.enumerate()]]
        return {k: v for k, v in out.items() if v}

    def _owner(self, pid: int | None) -> str:
        if pid == self.my_pid:
            return "this process (the in-process supervisor)"
        if pid in self.child_supervisors:
            return f"child supervisor {pid} ({self.child_supervisors[pid]})"
        if pid in self.child_pids:
            return f"{pid}, a worker of a child tree"
        return f"{pid}, a worker of the in-process tree"

    def _fd_targets(self) -> list[str]:
        out = []
        for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")):
            try:
                out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                pass
        return out

    def check_leaks(self) -> None:
        """After settling (bounded): record what is left, then clean it up by pid / name."""
        gc.collect()
        deadline = _mono() + self.opts.settle_s
        while True:
            problems = self.leak_problems()
            if not problems or _mono() > deadline:
                break
            time.sleep(0.05)
        ours = [self.my_pid, *self.current_worker_pids()]
        self.seen_sems |= mapped_sems(ours)
        for p in problems.get("processes", []):
            if p.pid not in self.leaked_procs:
                self.violation(f"leaked process {_describe(p)}")
            self.leaked_procs.add(p.pid)
            _signal(p, signal.SIGKILL)
        for name in problems.get("shm", []):
            self.violation(f"leaked /dev/shm/{name} (owner {self._owner(shm_owner(name))})")
            self.leaked_shm.add(name)
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        for name in problems.get("rendezvous", []):
            self.violation(f"leaked rendezvous folder {os.path.join(tempfile.gettempdir(), name)}")
            self.leaked_rdzv.add(name)
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)
        if "descriptors" in problems:
            n, targets = problems["descriptors"]
            # While a tree is up its own descriptor count moves by a few (pipes and mappings of groups that are
            # being replaced, a callable's subprocess pipes): only a steady climb is a leak mid-soak. After the
            # final shutdown the count must be back to the baseline exactly (end_fds).
            if n > self.fd_excess + _FD_SLACK:
                self.violation(f"{n} more file descriptors than at the start: {targets[-n - 4:]}")
                self.fd_leaked = max(getattr(self, "fd_leaked", 0), n)
            self.fd_excess = max(self.fd_excess, n)
        if "threads" in problems:
            n, names = problems["threads"]
            if n > self.thread_excess:
                self.violation(f"{n} more threads than at the start: {names}")
            self.thread_excess = max(self.thread_excess, n)

    # -- the deck of faults ----------------------------------------------------------------------------------
    def plan(self, cycle: int) -> tuple[str, str, str]:
        """(target, kind, phase) for a cycle, from the seeded generator only."""
        every = self.opts.supervisor_every
        if every and (cycle + 1) % every == 0:
            return "supervisor", "sigkill", self.rng.choice(tuple(self.opts.supervisor_phases))
        if not self.deck:
            self.deck = [(k, p) for k in KINDS for p in PHASES if (k, p) not in self.opts.exclude]
            self.rng.shuffle(self.deck)
        kind, phase = self.deck.pop()
        return "rank", kind, phase

    # -- running ---------------------------------------------------------------------------------------------
    def run(self) -> "Summary":
        from loguru import logger

        if self.opts.quiet_log:
            for mod in ("supervisor", "transport", "worker"):
                logger.disable(mod)
        t0 = _mono()
        try:
            self._warm_up()
            self.start_tree()
            self.client = Client(self, _cycle_seed(self.opts.seed, 0xC11E))
            self.client.start()
            self._settle_healthy()
            self.take_baseline()
            for cycle in range(self.opts.cycles):
                self.cycle = cycle
                self._run_cycle(cycle)
        except SoakAborted as exc:
            self.violation(f"soak aborted: {exc}")
        finally:
            self._teardown()
            if self.opts.quiet_log:
                for mod in ("supervisor", "transport", "worker"):
                    logger.enable(mod)
        return Summary(self, _mono() - t0)

    def _warm_up(self) -> None:
        """Boot the long-lived helpers (forkserver) first: they are not leaks."""
        from supervisor.backends.local import startmethod

        if startmethod.resolve(self.opts.start_method) == "forkserver":
            from multiprocessing import forkserver

            startmethod.context("forkserver", tuple(self.cfg.runtime.preload))
            forkserver.ensure_running()
        gc.collect()
        self.pre = {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count()}

    def _settle_healthy(self) -> None:
        f = Fault(-1, "none", "idle", t_inject=_mono())
        self._await_recovery(f)
        if not f.recovered:
            raise SoakAborted("the first tree never became healthy")

    def _run_cycle(self, cycle: int) -> None:
        target, kind, phase = self.plan(cycle)
        t0 = _mono()
        try:
            if target == "supervisor":
                fault = self.supervisor_cycle(cycle, phase)
            else:
                fault = self.rank_cycle(cycle, kind, phase)
        except SoakAborted:
            raise
        except Exception:
            self.violation(f"{kind}/{phase}: the soak itself failed:\n{traceback.format_exc()[-2000:]}")
            fault = Fault(cycle, kind, phase, target)
            self.replace_tree("soak error")
            self._await_recovery(fault)
        self.faults.append(fault)
        self._check_client()
        self._note_pids()
        self.check_leaks()
        if self.opts.verbose:
            rec = f"{fault.recovery_s:.2f} s" if fault.recovery_s is not None else "-"
            print(f"cycle {cycle:4d} {fault.target:<10} {kind:<10} {phase:<10} via {fault.via:<8} "
                  f"recovered={fault.recovered} in {rec}  ({_mono() - t0:.1f} s)"
                  + ("  GAVE UP (tree replaced)" if fault.gave_up else "")
                  + (f"  {'; '.join(fault.notes)}" if fault.notes else ""), file=sys.stderr, flush=True)
        elif (cycle + 1) % 10 == 0:
            print(f"  {cycle + 1}/{self.opts.cycles} cycles, {len(self.violations)} violations",
                  file=sys.stderr, flush=True)

    def _check_client(self) -> None:
        c = self.client
        over = c.hung_for() if c is not None else 0.0
        if c is not None and over:
            what = c.current[2] if c.current else "?"
            self.calls.hung.append(f"client {what}: still running {over:.1f} s past timeout + slack")
            self.violation(f"client call {what} HUNG")
            c.stop(0.0)  # abandoned (it is daemonic); a fresh client carries on
            self.client = Client(self, _cycle_seed(self.opts.seed, 0xC11E, self.cycle))
            self.client.start()
            self.take_baseline()

    def _teardown(self) -> None:
        """Stop everything, by pid where it must be."""
        if self.client is not None:
            self.client.stop(self.opts.call_timeout_s + self.opts.hung_slack_s)
        if self.sup is not None:
            self.stop_tree()
        from tests import leaks

        helpers = leaks.helper_pids()
        deadline = _mono() + self.opts.settle_s
        while True:
            extra = [p for pid, p in leaks._children().items() if pid not in helpers]
            extra += [p for p in marked_processes(self.markers, self.t_start - 1) if p.pid not in helpers]
            reap_zombie_children([p.pid for p in extra if p.pid in self.child_pids])
            extra = [p for p in extra if _running(p)]
            if not extra or _mono() > deadline:
                break
            time.sleep(0.05)
        for p in extra:
            if p.pid not in self.leaked_procs:
                self.violation(f"left running at the end: {_describe(p)}")
                self.leaked_procs.add(p.pid)
            _signal(p, signal.SIGKILL)
        for name in sorted(n for n in shm_entries() if shm_owner(n) in self.our_pids):
            self.violation(f"left at the end: /dev/shm/{name}")
            self.leaked_shm.add(name)
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        for name in rendezvous_dirs(self.our_pids):
            self.violation(f"left at the end: rendezvous folder {name}")
            self.leaked_rdzv.add(name)
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)
        gc.collect()
        self.end_fds = len(os.listdir("/proc/self/fd")) - self.pre.get("fds", 0) if self.pre else 0
        self.end_threads = threading.active_count() - self.pre.get("threads", 0) if self.pre else 0
        self.leaked_sems = self.seen_sems & shm_entries()

    # -- rank faults -----------------------------------------------------------------------------------------
    def rank_cycle(self, cycle: int, kind: str, phase: str) -> Fault:
        rng = self.rng
        f = Fault(cycle, kind, phase, group=rng.randrange(self.opts.dp), rank=rng.randrange(self.opts.world))
        f.via = "callable" if kind in ("exit", "raise", "hang", "grandchild") else "signal"
        if kind == "sigsegv" and rng.random() < 0.5:
            f.via = "callable"
        f.restarts_before = self.restarts()
        getattr(self, "phase_" + phase.replace("-", "_"))(f)
        self._finish_calls(f)
        if not f.tree_replaced:
            self._await_recovery(f)
        self._check_victims(f)
        self.group_restarts += max(0, self.restarts() - f.restarts_before) if not f.tree_replaced else 0
        return f

    def _target(self, f: Fault, group: int | None = None) -> psutil.Process | None:
        """The running process of (group, rank) now, or of any rank of that group, or of any group."""
        group = f.group if group is None else group
        live = self.live_workers(group) or self.live_workers()
        for gi, r, p in live:
            if gi == group and r == f.rank:
                return p
        if live:
            gi, r, p = self.rng.choice(live)
            f.group, f.rank = gi, r
            return p
        return None

    def _inject(self, f: Fault, proc: psutil.Process | None, sup=None) -> None:
        """Deliver the fault: a signal to ``proc``, or a callable to the group (it runs on rank f.rank)."""
        sup = sup or self.sup
        rng, o = self.rng, self.opts
        f.t_inject = _mono()
        if f.via == "signal":
            sig = {"sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigstop": signal.SIGSTOP,
                   "sigterm": signal.SIGTERM}[f.kind]
            if not _signal(proc, sig):
                f.notes.append("target already gone")
            elif proc is not None:
                f.victims.append(proc)
            return
        delay = rng.uniform(0.0, 0.2) if f.phase == "mid-call" else 0.0
        T, expect = o.call_timeout_s, None
        if f.kind in ("exit", "sigsegv"):
            fn, args, expect = _fault_crash, (f.rank, "exit" if f.kind == "exit" else "segv", delay), ("WorkerFailed",)
        elif f.kind == "raise":
            fn, args, expect = _fault_raise, (f.rank, delay), ("RemoteError",)
        elif f.kind == "hang":
            fn, args, T = _fault_hang, (f.rank, 600.0), o.hang_call_timeout_s
            expect = ("RpcTimeout", "WorkerFailed")
        else:  # grandchild: spawn it, then kill the rank
            self._grandchild(f, proc, sup)
            return
        if proc is not None and f.kind != "raise":
            f.victims.append(proc)
        g = f.group
        pending = Pending(f.kind, lambda: sup.collective_rpc(fn, deadline=T, args=args, group=g), T)
        f.calls.append((pending, expect if f.phase in ("idle", "mid-call") else None))

    def _grandchild(self, f: Fault, proc, sup) -> None:
        o, g = self.opts, f.group
        detach = self.rng.random() < 0.5
        res = bounded("spawn grandchild", lambda: sup.collective_rpc(_spawn_grandchild, timeout=o.call_timeout_s,
                                                                     args=(f.rank, detach), group=g),
                      o.call_timeout_s, o.hung_slack_s)
        self.calls.record("fault spawn grandchild", res, o.call_timeout_s)
        if res.status == "ok":
            for pid in res.value:
                p = _proc(pid) if pid else None
                if p is not None:
                    f.grandchildren.append(p)
        elif res.status != "error":
            self.violation(f"grandchild spawn: {res.status} {res.error_type} {res.error}")
        proc = self._target(f) if proc is None or not _running(proc) else proc
        f.t_inject = _mono()
        if _signal(proc, signal.SIGKILL):
            f.victims.append(proc)
        else:
            f.notes.append("rank gone before the kill")

    # phases --------------------------------------------------------------------------------------------------
    def phase_idle(self, f: Fault) -> None:
        if not self.client.pause(self.opts.call_timeout_s + self.opts.hung_slack_s):
            f.notes.append("client did not pause")
        try:
            f.expect_restart = f.kind != "raise"
            self._inject(f, self._target(f))
            self._finish_calls(f)  # nothing else runs until the fault's own call has ended
        finally:
            self.client.resume()

    def phase_mid_call(self, f: Fault) -> None:
        o, g, sup = self.opts, f.group, self.sup
        f.expect_restart = f.kind != "raise"
        probe = lambda: sup.collective_rpc(_slow, timeout=o.call_timeout_s, args=(1.0,), group=g)  # noqa: E731
        if f.via == "signal":
            f.calls.append((Pending("probe", probe, o.call_timeout_s), None))
            time.sleep(self.rng.uniform(0.05, 0.4))
            self._inject(f, self._target(f))
        else:
            self._inject(f, self._target(f))
            f.calls.append((Pending("probe", probe, o.call_timeout_s), None))  # queued behind the fault

    def phase_restarting(self, f: Fault) -> None:
        """Kill one rank of the group, then hit the group (or the other one) while it is being replaced."""
        first = self._target(f)
        _signal(first, signal.SIGKILL)
        time.sleep(self.rng.uniform(0.0, 0.15))
        group = f.group if self.rng.random() < 0.7 or self.opts.dp == 1 else (f.group + 1) % self.opts.dp
        f.group, f.rank = group, self.rng.randrange(self.opts.world)
        self._inject(f, self._target(f, group))

    def phase_starting(self, f: Fault) -> None:
        if self.rng.random() < 0.4:
            return self._starting_fresh_tree(f)
        old_attempts = self.sup.groups()[f.group].attempts
        first = self._target(f)
        _signal(first, signal.SIGKILL)  # the group restarts: hit it while its new workers are starting
        proc = self._await_starting(self.sup, f, lambda g: g.attempts > old_attempts)
        self._inject(f, proc)

    def _await_starting(self, sup, f: Fault, is_new: Callable[[Any], bool]) -> psutil.Process | None:
        """Poll (bounded) until the target's group is STARTING with its processes spawned; the target then."""
        from supervisor.core.states import GroupState

        deadline = _mono() + self.opts.start_bound()
        want = self.rng.randint(1, self.opts.world)  # hit it after this many ranks were spawned
        while _mono() < deadline:
            g = sup.groups()[f.group]
            if g.state is not None and is_new(g):
                if g.state is not GroupState.STARTING:
                    f.missed_window = True
                    break
                workers = g.workers
                if len(workers) >= want:
                    w = workers[min(f.rank, len(workers) - 1)]
                    f.rank = w.local_rank
                    return _verified(w)
            time.sleep(0.001)
        f.notes.append("missed the start-up window")
        f.missed_window = True
        return self._target(f)

    def _starting_fresh_tree(self, f: Fault) -> None:
        from supervisor.api import Supervisor

        self.stop_tree()
        sup = Supervisor(self.cfg, start=False)
        self.sup = sup
        self.tree_starts += 1
        f.restarts_before = 0
        start = Pending("start", sup.start, self.opts.start_bound())
        proc = self._await_starting(sup, f, lambda g: True)
        self._inject(f, proc, sup)
        res = start.finish(self.opts.hung_slack_s)
        if res.status != "ok":
            self.violation(f"start with a fault in start-up: {res.status} {res.error_type}: {str(res.error)[:300]}")
            self.replace_tree("start failed")
        f.expect_restart = f.via == "signal" and not f.missed_window

    def phase_stopping(self, f: Fault) -> None:
        """Shut the tree down while the fault lands; everything must be gone; then a fresh tree starts."""
        sup = self.sup
        procs = self._tree_procs(sup)
        target = self._target(f)
        if f.via == "callable":
            self._inject(f, target)
        stopping = Pending("shutdown", sup.shutdown, self.opts.shutdown_bound())
        time.sleep(self.rng.uniform(0.0, 0.03))
        if f.via == "signal":
            self._inject(f, target)
        res = stopping.finish(0.0)
        took = _mono() - stopping.t0
        self.shutdown_times.append(took)
        if res.status != "ok":
            self.violation(f"shutdown with a {f.kind} fault: {res.status} {res.error_type}: {str(res.error)[:200]}")
        left, _ = gone_within(procs + f.grandchildren, 2.0)
        if left:
            self.violation(f"after a shutdown hit by {f.kind}, still running: {[_describe(p) for p in left]}")
            for p in left:
                _signal(p, signal.SIGKILL)
        self._finish_calls(f)
        self.sup = None
        self.start_tree()
        f.tree_replaced = True
        self._await_recovery(f)

    # outcomes ------------------------------------------------------------------------------------------------
    def _finish_calls(self, f: Fault) -> None:
        for pending, expect in f.calls:
            res = pending.finish(self.opts.hung_slack_s)
            what = f"fault {f.kind}/{f.phase} {pending.what}"
            self.calls.record(what, res, pending.timeout)
            if res.status in ("hung", "unclear", "wrong"):
                self.violation(f"{what}: {res.status} {res.error_type}: {str(res.error or res.value)[:300]}")
            elif expect is not None and pending.what == f.kind and res.error_type not in expect:
                self.violation(f"{what}: expected {' or '.join(expect)}, got "
                               f"{res.status} {res.error_type}: {str(res.error or res.value)[:300]}")
        f.calls = []

    def _await_recovery(self, f: Fault) -> None:
        """Healthy again (check_health succeeds, the fault's victims are gone) within the bound; a tree that
        gave up is replaced by a fresh one; one that never recovers is a violation (and is replaced)."""
        o = self.opts
        deadline = (f.t_inject or _mono()) + o.recovery_timeout_s
        while _mono() < deadline:
            sup = self.sup
            if sup is not None and sup.gave_up:
                f.gave_up = True
                self._after_give_up(sup)
                continue
            if sup is not None and not any(_running(p) for p in f.victims):
                res = bounded("check_health", lambda: sup.check_health(timeout=2.0), 2.0, o.hung_slack_s)
                if res.status == "hung":
                    self.violation("check_health HUNG")
                if res.status == "ok":
                    f.recovered = True
                    f.recovery_s = _mono() - f.t_inject if f.t_inject else 0.0
                    break
            time.sleep(0.02)
        if not f.recovered:
            self.violation(f"{f.kind}/{f.phase}: not healthy within {o.recovery_timeout_s} s "
                           f"(victims running: {[_describe(p) for p in f.victims if _running(p)]}; "
                           f"status {self._status_line()})")
            self.replace_tree("not recovered")
        elif f.expect_restart and not f.tree_replaced and not f.gave_up and self.restarts() <= f.restarts_before:
            self.violation(f"{f.kind}/{f.phase}: the fault went unnoticed (no restart)")

    def _after_give_up(self, sup) -> None:
        procs = self._tree_procs(sup)
        if not sup.wait(self.opts.shutdown_bound()):
            self.violation("gave up but did not stop within its bound")
        left, _ = gone_within(procs, 2.0)
        if left:
            self.violation(f"gave up but left running: {[_describe(p) for p in left]}")
        self.stop_tree(sup)
        self.start_tree()

    def _status_line(self) -> str:
        sup = self.sup
        if sup is None:
            return "no tree"
        try:
            return f"{sup.state.value}; " + ", ".join(f"g{r['group']}r{r['rank']}:{r['pid']}:{r['state']}"
                                                      for r in sup.status())
        except Exception as exc:
            return f"status failed: {exc}"

    def _check_victims(self, f: Fault) -> None:
        left, _ = gone_within(f.victims, 2.0)
        if left:
            self.violation(f"{f.kind}/{f.phase}: victims still running: {[_describe(p) for p in left]}")
        if f.grandchildren:
            left, took = gone_within(f.grandchildren, 3.0)
            if left:
                self.violation(f"grandchildren survived their rank: {[_describe(p) for p in left]}")
                for p in left:
                    _signal(p, signal.SIGKILL)
            f.notes.append(f"grandchildren gone after {took:.2f} s")

    # -- supervisor faults -----------------------------------------------------------------------------------
    def supervisor_cycle(self, cycle: int, phase: str) -> Fault:
        """A tree in a child process is SIGKILLed; everything below it must be gone within 1 s; start again."""
        f = Fault(cycle, "sigkill", phase, target="supervisor", via="signal")
        before = set(direct_children())
        try:
            self._supervisor_kill_and_restart(f, phase)
        finally:
            self._collect_child_orphans(before)
        return f

    def _supervisor_kill_and_restart(self, f: Fault, phase: str) -> None:
        mode = "cli" if phase == "starting" else "chaos"
        tree = ChildTree(self.opts, mode, calls=phase == "mid-call", grandchildren=mode == "chaos")
        self.child_supervisors[tree.pid] = f"{mode}, SIGKILLed while {phase}"
        self.child_pids.add(tree.pid)
        self.markers.add(str(tree.pid))
        try:
            if not self._child_reached(tree, f, phase):
                return
            self._kill_child(tree, f)
        finally:
            self._forget_child(tree)
        again = ChildTree(self.opts, "chaos")
        self.child_supervisors[again.pid] = "chaos, started again after a SIGKILL"
        self.child_pids.add(again.pid)
        self.markers.add(str(again.pid))
        try:
            self._start_again(again, f)
        finally:
            self._forget_child(again)

    def _collect_child_orphans(self, before: set[int]) -> None:
        """Our new direct children are orphans of the child trees (we are a subreaper): processes the kill
        missed (forked after it) must be gone within the bound; their exit status is ours to collect."""
        deadline = _mono() + 5.0
        while True:
            new = {pid: p for pid, p in direct_children().items() if pid not in before}
            self.child_pids.update(new)
            self.our_pids.update(new)
            reap_zombie_children(new)
            alive = [p for p in new.values() if _running(p)]
            if not alive or _mono() > deadline:
                break
            time.sleep(0.02)
        for p in alive:
            self.violation(f"an orphan of a killed child tree is still running: {_describe(p)}")
            self.leaked_procs.add(p.pid)
            _signal(p, signal.SIGKILL)
        reap_zombie_children(new)

    def _child_reached(self, tree: ChildTree, f: Fault, phase: str) -> bool:
        o = self.opts
        if phase == "starting":
            want = self.rng.randint(1, o.dp * o.world + 1)  # the forkserver, then workers as they spawn
            if not tree.wait_descendants(want, o.child_ready_timeout_s):
                f.notes.append(f"fewer than {want} processes started before the kill")
            return True
        if not tree.wait_ready(o.child_ready_timeout_s):
            self.violation(f"child tree not READY within {o.child_ready_timeout_s} s: {tree.stderr_tail()}")
            return False
        time.sleep(self.rng.uniform(0.05, 0.3))
        return True

    def _kill_child(self, tree: ChildTree, f: Fault) -> None:
        """SIGKILL the child supervisor; its workers and grandchildren must be gone within orphan_timeout_s.
        multiprocessing's helpers of the child (forkserver, resource tracker) get a looser bound: a forkserver
        still importing its preload when its parent dies only notices once the import is done."""
        everyone = {p.pid: p for p in tree.descendants()}
        for p in marked_processes({str(tree.pid)}, self.t_start - 1):
            everyone.setdefault(p.pid, p)
        tree.proc.kill()
        f.t_inject = t_kill = _mono()
        for p in tree.descendants():  # spawned between the snapshot and the kill
            everyone.setdefault(p.pid, p)
        tree.reap(5.0)
        helpers = {pid: p for pid, p in everyone.items() if _is_mp_helper(p)}
        workers = [p for pid, p in everyone.items() if pid not in helpers]
        left, took = gone_within(workers, self.opts.orphan_timeout_s)
        late = marked_processes({str(tree.pid)}, self.t_start - 1)  # descendants we never saw: still there?
        late, _ = gone_within(late, max(0.0, t_kill + self.opts.orphan_timeout_s - _mono()))
        stragglers = {p.pid: p for p in left + late}
        if stragglers:
            self.violation(f"supervisor SIGKILLed ({f.phase}): {len(stragglers)} of its workers/grandchildren "
                           f"outlived it by more than {self.opts.orphan_timeout_s} s: "
                           f"{[_describe(p) for p in stragglers.values()]}")
        left_h, took_h = gone_within(list(helpers.values()), max(0.0, t_kill + 5.0 - _mono()))
        if took_h > self.opts.orphan_timeout_s:
            self.slow_helpers.append(round(_mono() - t_kill, 2))
            f.notes.append(f"the child's multiprocessing helpers lived {_mono() - t_kill:.2f} s after the kill")
        for p in [*gone_within(list(stragglers.values()), max(0.0, t_kill + 5.0 - _mono()))[0], *left_h]:
            self.violation(f"supervisor SIGKILLed ({f.phase}): still running 5 s later: {_describe(p)}")
            self.leaked_procs.add(p.pid)
            _signal(p, signal.SIGKILL)
        self.orphan_times.append(took)
        f.victims = list(everyone.values())
        f.notes.append(f"{len(workers)} workers/grandchildren gone {took:.2f} s after the SIGKILL")

    def _start_again(self, tree: ChildTree, f: Fault) -> None:
        o = self.opts
        if not tree.wait_ready(o.child_ready_timeout_s):
            self.violation(f"the tree did not start again: {tree.stderr_tail()}")
            return
        f.recovered = True
        f.recovery_s = _mono() - f.t_inject if f.t_inject else None
        procs = tree.descendants()
        tree.proc.send_signal(signal.SIGTERM)
        code = tree.reap(o.shutdown_bound())
        if code != 0:
            self.violation(f"the restarted child tree exited {code} after SIGTERM: {tree.stderr_tail()}")
        left, _ = gone_within(procs, 2.0)
        if left:
            self.violation(f"after a graceful stop of the child tree, still running: {[_describe(p) for p in left]}")

    def _forget_child(self, tree: ChildTree) -> None:
        self.our_pids.add(tree.pid)
        self.our_pids.update(tree.seen)
        self.child_pids.update(tree.seen)
        tree.close()


# ---------------------------------------------------------------------------------------------------------------
# the summary
def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


class Summary:
    def __init__(self, soak: Soak, wall_s: float) -> None:
        self.opts = soak.opts
        self.faults = soak.faults
        self.violations = list(soak.violations)
        c = soak.calls
        self.calls_ok, self.calls_failed, self.calls_hung = c.ok, c.failed_total, len(c.hung)
        self.failed_by_type = dict(c.failed)
        self.unclear, self.wrong, self.late, self.max_overrun = list(c.unclear), list(c.wrong), c.late, c.max_overrun
        self.recovered = sum(f.recovered for f in self.faults)
        self.not_recovered = [f for f in self.faults if not f.recovered]
        self.give_ups = sum(f.gave_up for f in self.faults)
        self.recovery = [f.recovery_s for f in self.faults
                         if f.target == "rank" and f.recovered and f.recovery_s is not None]
        self.restart_again = [f.recovery_s for f in self.faults
                              if f.target == "supervisor" and f.recovered and f.recovery_s is not None]
        self.missed_windows = sum(f.missed_window for f in self.faults)
        self.leaked_processes = len(soak.leaked_procs)
        self.leaked_shm = len(soak.leaked_shm)
        self.leaked_rdzv = len(soak.leaked_rdzv)
        self.leaked_sems = len(getattr(soak, "leaked_sems", ()))
        self.leaked_fds = max(getattr(soak, "fd_leaked", 0), getattr(soak, "end_fds", 0))
        self.leaked_threads = max(soak.thread_excess, getattr(soak, "end_threads", 0))
        self.orphan_times = soak.orphan_times
        self.slow_helpers = soak.slow_helpers
        self.tree_starts, self.group_restarts = soak.tree_starts, soak.group_restarts
        self.shutdown_times = soak.shutdown_times
        self.wall_s = wall_s

    @property
    def leaks(self) -> int:
        return (self.leaked_processes + self.leaked_shm + self.leaked_sems + self.leaked_fds + self.leaked_threads
                + self.leaked_rdzv)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.calls_hung and not self.leaks and not self.not_recovered

    def matrix(self) -> str:
        counts = Counter((("supervisor" if f.target == "supervisor" else f.kind), f.phase) for f in self.faults)
        rows = [k for k in (*KINDS, "supervisor") if any(counts[(k, p)] for p in PHASES)]
        head = f"    {'':<11}" + "".join(f"{p:>11}" for p in PHASES) + f"{'total':>8}"
        lines = [head]
        for k in rows:
            cells = "".join(f"{counts[(k, p)] or '-':>11}" for p in PHASES)
            lines.append(f"    {k:<11}{cells}{sum(counts[(k, p)] for p in PHASES):>8}")
        totals = "".join(f"{sum(counts[(k, p)] for k in rows):>11}" for p in PHASES)
        lines.append(f"    {'total':<11}{totals}{len(self.faults):>8}")
        return "\n".join(lines)

    def table(self) -> str:
        o = self.opts
        rank_faults = sum(f.target == "rank" for f in self.faults)
        sup_faults = len(self.faults) - rank_faults
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(self.failed_by_type.items())) or "none"
        orphan = (f"{percentile(self.orphan_times, .5):.2f} s / {max(self.orphan_times):.2f} s"
                  if self.orphan_times else "n/a")
        items = [
            ("seed", f"{o.seed}  (replay: python scripts/chaos.py --seed {o.seed} --cycles {o.cycles}"
                     f"{' --worker ' + o.worker if o.worker != 'echo' else ''})"),
            ("tree", f"worker {o.worker}, dp={o.dp} tp={o.tp}, one_for_one between groups (intensity "
                     f"{o.intensity}/{o.period_s:g} s), heartbeat timeout {o.heartbeat_timeout_s:g} s, "
                     f"call timeout {o.call_timeout_s:g} s"),
            ("cycles", f"{len(self.faults)} ({rank_faults} rank faults, {sup_faults} supervisor SIGKILLs); "
                       f"wall {self.wall_s:.0f} s"),
            ("recoveries", f"{self.recovered} of {len(self.faults)} cycles "
                           f"({self.group_restarts} group restarts, {self.tree_starts} tree starts)"),
            ("give-ups", str(self.give_ups)),
            ("calls ok / failed / hung", f"{self.calls_ok} / {self.calls_failed} / {self.calls_hung}"),
            ("  failed, by error", by_type),
            ("  unclear errors / wrong answers", f"{len(self.unclear)} / {len(self.wrong)}"),
            ("  late (> timeout + 1 s)", f"{self.late} (max overrun {self.max_overrun:+.2f} s)"),
            ("recovery time p50 / p99", f"{percentile(self.recovery, .5):.3f} s / "
                                        f"{percentile(self.recovery, .99):.3f} s "
                                        f"(max {max(self.recovery, default=0):.3f} s)"),
            ("supervisor SIGKILL: all gone p50 / max", orphan),
            ("supervisor SIGKILL: READY again p50 / max",
             f"{percentile(self.restart_again, .5):.2f} s / {max(self.restart_again):.2f} s"
             if self.restart_again else "n/a"),
            ("child's mp helpers alive > 1 s after its SIGKILL", f"{len(self.slow_helpers)} "
             f"{'(' + ', '.join(f'{t:.1f} s' for t in self.slow_helpers) + ')' if self.slow_helpers else ''}"),
            ("start-up windows missed", f"{self.missed_windows} (fault landed after READY instead)"),
            ("leaked processes / shm / semaphores / descriptors / threads",
             f"{self.leaked_processes} / {self.leaked_shm} / {self.leaked_sems} / {self.leaked_fds} / "
             f"{self.leaked_threads}"),
            ("leaked rendezvous folders", str(self.leaked_rdzv)),
            ("invariant violations", str(len(self.violations))),
        ]
        width = max(len(k) for k, _ in items)
        out = ["", "chaos soak summary"]
        out += [f"  {k:<{width}}  {v}" for k, v in items]
        out += ["  faults by kind and phase:", self.matrix()]
        if self.violations:
            out.append("  violations (first 20):")
            out += [f"    - {v}" for v in self.violations[:20]]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--worker", choices=("echo", "tp_mlp"), default="echo")
    ap.add_argument("--start-method", default="forkserver", choices=("forkserver", "spawn", "fork"))
    ap.add_argument("--supervisor-every", type=int, default=20,
                    help="every N-th cycle SIGKILLs a supervisor (0: never)")
    ap.add_argument("--supervisor-phases", default=",".join(SUPERVISOR_PHASES),
                    help="comma-separated phases in which the supervisor is killed: starting,idle,mid-call")
    ap.add_argument("--exclude", default="", help="comma-separated kind/phase pairs to leave out, e.g. "
                                                  "grandchild/stopping")
    ap.add_argument("--intensity", type=int, default=1000)
    ap.add_argument("--period", type=float, default=1.0)
    ap.add_argument("--call-timeout", type=float, default=0.0)
    ap.add_argument("--recovery-timeout", type=float, default=0.0)
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per cycle; supervisor warnings")
    ap.add_argument("--child-tree", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-calls", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-grandchildren", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_tree:
        return child_tree_main(args)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING" if args.verbose else "CRITICAL")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    opts = SoakOptions(seed=seed, cycles=args.cycles, dp=args.dp, tp=args.tp, worker=args.worker,
                       start_method=args.start_method, supervisor_every=args.supervisor_every,
                       supervisor_phases=tuple(p for p in args.supervisor_phases.split(",") if p),
                       exclude=tuple(tuple(x.split("/", 1)) for x in args.exclude.split(",") if x),
                       intensity=args.intensity, period_s=args.period, call_timeout_s=args.call_timeout,
                       recovery_timeout_s=args.recovery_timeout, verbose=args.verbose, quiet_log=not args.verbose)
    print(f"chaos soak: seed {seed}, {opts.cycles} cycles, worker {opts.worker}, dp={opts.dp} tp={opts.tp}",
          file=sys.stderr, flush=True)
    summary = Soak(opts).run()
    print(summary.table(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
