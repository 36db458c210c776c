"""The tree's reserve: the weight keeper and a warm standby per dp group, kept ready beside the serving groups.

::

    manager thread                                  reserve thread (from the first need until the backend closes)
    group.start ──with_weights(specs)──▶ keeper      waits on: the keeper's sentinel, every standby's sentinel and
               ──take_standby(g)──▶ its processes     status pipe, a wake-up pipe; reads the standbys' phases
                 (promoted in place of a spawn)       standby died / too slow to warm up ─▶ stopped, replaced after
    group READY ──group_ready(g, specs)──────────▶    a backoff; keeper died ─▶ core/recovery.on_keeper_loss
                                                      replenish: a standby for every ready group that has none
    backend.close ──close()──▶ standbys, then the keeper, stopped (escalation), the thread joined

What is decided where: whether there is a keeper or standby at all, what a keeper's death means and how long to wait
before replacing a failed standby are supervisor/core/recovery.py's; this module does them.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable

from loguru import logger

from supervisor.backends.local import escalation
from supervisor.backends.local.keeper import KeeperError, KeeperProcess
from supervisor.backends.local.process import WorkerProcess, parent_fds
from supervisor.core import recovery
from supervisor.core.states import StandbyState
from worker.protocol import PhaseReached, StartupFailed, StartupPhase
from worker.weights import remove_ipc_leftovers

Emit = Callable[..., Any]


@dataclass
class Standby:
    """One group's warm standby: a process per rank (supervisor/core/states.py has its lifecycle)."""

    group: int
    workers: list[WorkerProcess]
    started: float = field(default_factory=time.monotonic)
    ready: set[int] = field(default_factory=set)  # ranks that reported STANDBY
    state: StandbyState = StandbyState.WARMING

    def transition(self, new: StandbyState) -> None:
        self.state = self.state.to(new, f"standby of group {self.group}")

    def rank_ready(self, rank: int) -> bool:
        """Rank ``rank`` reported STANDBY; True once every rank has (the standby is READY)."""
        self.ready.add(rank)
        if len(self.ready) == len(self.workers) and self.state is StandbyState.WARMING:
            self.transition(StandbyState.READY)
            return True
        return False

    @property
    def is_ready(self) -> bool:
        return self.state is StandbyState.READY

    def alive(self) -> bool:
        return all(w.is_alive() for w in self.workers)


class Reserve:
    def __init__(self, ctx, output, reaper: escalation.Reaper, *, keeper: bool, standby: bool,
                 warm_up_timeout_s: float, delay_s: float, backoff_s: float, stop_s: tuple[float, float]) -> None:
        self.ctx, self.output, self.reaper = ctx, output, reaper
        self.keeper_on, self.standby_on = keeper, standby
        self.warm_up_timeout_s, self.delay_s, self.backoff_s = warm_up_timeout_s, delay_s, backoff_s
        self.grace_s, self.reap_s = stop_s
        self.emit: Emit = lambda kind, **fields: None  # the lifecycle's EventLog.emit, once attached
        self.on_weights_lost: Callable[[int], None] = lambda keeper_pid: None  # the backend stops the ranks
        self.keeper: KeeperProcess | None = None
        self.standbys: dict[int, Standby] = {}
        self._wanted: dict[int, list] = {}  # group -> the specs its standby is made from
        self._failures: dict[int, int] = {}  # group -> standby failures in a row
        self._next_try: dict[int, float] = {}
        self._lock = threading.RLock()
        self._keeper_lock = threading.Lock()  # one keeper start at a time
        self._closing = threading.Event()
        self._wake_r = self._wake_w = -1  # the thread's wake-up pipe: made with the thread (a tree never started
        self._thread: threading.Thread | None = None  # holds no descriptor)

    # -- the manager's side -------------------------------------------------------------------------------------
    def with_weights(self, specs: list, deadline: float, abort: threading.Event | None = None) -> list:
        """``specs`` with each rank's kept weights (unchanged without a keeper). Raises KeeperError."""
        if not self.keeper_on:
            return list(specs)
        handles = self._running_keeper(_keeper_env(specs[0])).keep(specs, deadline, abort)
        return [dataclasses.replace(s, weights=handles.get(s.topology.global_rank)) for s in specs]

    def take_standby(self, group: int) -> list[WorkerProcess] | None:
        """The group's standby processes, in rank order, to promote in place of spawning; None if there is none
        alive. Whether still warming up or ready, a standby is never slower than a fresh spawn: it started earlier."""
        with self._lock:
            sb = self.standbys.pop(group, None)
        if sb is None:
            return None
        self._wake()
        if not sb.alive():
            self._stop([sb], StandbyState.FAILED)
            return None
        self.emit("standby_promoted", group=group, pids=[w.pid for w in sb.workers], ready=sb.is_ready,
                  waited_s=round(time.monotonic() - sb.started, 4))
        sb.transition(StandbyState.PROMOTED)
        return sb.workers

    def group_ready(self, group: int, specs: list) -> None:
        """Group ``group`` serves (again): make its next standby, in the reserve thread."""
        if not self.standby_on or self._closing.is_set():
            return
        with self._lock:
            self._wanted[group] = list(specs)
            self._next_try[group] = max(self._next_try.get(group, 0.0), time.monotonic() + self.delay_s)
        self._ensure_thread()
        self._wake()

    def status(self) -> dict[str, Any]:
        with self._lock:
            k = self.keeper
            return {"keeper": None if k is None else {"pid": k.pid, "alive": k.is_alive(),
                                                       "held_bytes": dict(k.held_bytes), "load_s": k.load_s},
                    "standbys": {g: {"pids": [w.pid for w in sb.workers], "ready": sb.is_ready,
                                     "state": sb.state.value} for g, sb in self.standbys.items()}}

    def close(self) -> None:
        """Stop every standby, then the keeper (the last process of the tree to go). Idempotent."""
        self._closing.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.grace_s + 2 * self.reap_s + 5.0)
        with self._lock:
            standbys, self.standbys = list(self.standbys.values()), {}
            keeper, self.keeper = self.keeper, None
        self._stop(standbys)
        if keeper is not None:
            escalation.stop([keeper], self.grace_s, self.reap_s, self.reaper)
            remove_ipc_leftovers(keeper.pid)
        with self._lock:  # no _wake() writes into a descriptor number being closed (and perhaps reused)
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    # -- the keeper ---------------------------------------------------------------------------------------------
    def _running_keeper(self, env: tuple) -> KeeperProcess:
        with self._keeper_lock:
            k = self.keeper
            if k is not None and k.is_alive():
                return k
            if self._closing.is_set():
                raise KeeperError("the supervisor is shutting down")
            k = KeeperProcess(self.ctx, env, self.output)
            self.reaper.register_worker(k.pid)
            with self._lock:
                self.keeper = k
            self.emit("keeper_started", pid=k.pid)
        self._ensure_thread()  # it watches the keeper's life
        self._wake()
        return k

    def _keeper_died(self, k: KeeperProcess) -> None:
        k.reap(1.0)
        info = k.exit_info()
        handles_outlive = True  # memfd and VMM mappings hold their memory; legacy cudaIpc ones do not
        from worker.weights import legacy_ipc

        if legacy_ipc() and any(d != "cpu" for d in k.held_bytes):
            handles_outlive = False
        action = recovery.on_keeper_loss(handles_outlive)
        self.emit("keeper_exited", pid=k.pid, code=info.exitcode, reason=info.short, action=action.value)
        logger.warning(f"the weight keeper (pid {k.pid}) exited: {info.reason}; "
                       + ("its ranks keep serving from their own mappings, a new keeper loads at the next restart"
                          if action is recovery.KeeperLoss.RELOAD_LATER else
                          "its ranks' weights went with it: stopping them for the restart policy"))
        with self._lock:
            if self.keeper is k:
                self.keeper = None
        escalation.stop([k], 0.0, self.reap_s, self.reaper)
        remove_ipc_leftovers(k.pid)  # killed: it could not remove them itself
        self.reaper.forget_worker(k.pid)
        if action is recovery.KeeperLoss.STOP_RANKS:
            with self._lock:
                lost, self.standbys = list(self.standbys.values()), {}
            self._stop(lost, StandbyState.FAILED)
            self.on_weights_lost(k.pid)

    # -- the reserve thread -------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing.is_set():
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._thread = threading.Thread(target=self._run, name="supervisor-reserve", daemon=True)
                self._thread.start()

    def _wake(self) -> None:
        with self._lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # full: the thread is awake anyway

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._step()
            except Exception:  # the reserve must outlive anything one standby does
                logger.exception("reserve step failed")
                self._closing.wait(0.1)

    def _step(self) -> None:
        with self._lock:
            keeper = self.keeper
            standbys = list(self.standbys.values())
        waitables: dict[Any, tuple[str, Any]] = {}
        if keeper is not None:
            waitables[keeper.exit_fd] = ("keeper", keeper)
        for sb in standbys:
            for w in sb.workers:
                waitables[w.exit_fd] = ("died", sb)
                if not w.status_r.closed:
                    waitables[w.status_r] = ("status", (sb, w))
        ready = mp_wait([*waitables, self._wake_r], timeout=self._next_timeout(standbys))
        self._drain_wake()
        for obj in ready:
            if obj in waitables and not self._closing.is_set():
                self._handle(*waitables[obj])
        self._expire_slow(standbys)
        self._replenish()

    def _handle(self, kind: str, what: Any) -> None:
        if kind == "keeper":
            if not what.is_alive() or what.exitcode is not None:
                self._keeper_died(what)
        elif kind == "died":
            self._standby_failed(what, "a standby process exited")
        else:
            self._read_status(*what)

    def _read_status(self, sb: Standby, w: WorkerProcess) -> None:
        with self._lock:
            if self.standbys.get(sb.group) is not sb:
                return  # taken meanwhile: its messages are the group's now
            try:
                msg = w.read_status()
            except (EOFError, OSError):
                return  # exiting: its sentinel says so
        if isinstance(msg, PhaseReached) and msg.phase == StartupPhase.STANDBY.value:
            if sb.rank_ready(w.rank):
                self._failures[sb.group] = 0
                self.emit("standby_ready", group=sb.group, pids=[x.pid for x in sb.workers],
                          warm_up_s=round(time.monotonic() - sb.started, 4))
        elif isinstance(msg, StartupFailed):
            logger.warning(f"standby of group {sb.group}, rank {w.global_rank}: warm-up failed: "
                           f"{msg.exc_type}: {msg.message}")

    def _standby_failed(self, sb: Standby, why: str) -> None:
        with self._lock:
            if self.standbys.get(sb.group) is not sb:
                return
            del self.standbys[sb.group]
        self._stop([sb], StandbyState.FAILED)
        n = self._failures[sb.group] = self._failures.get(sb.group, 0) + 1
        delay = recovery.standby_backoff_s(self.backoff_s, n)
        self._next_try[sb.group] = time.monotonic() + delay
        reasons = [w.exit_info().short for w in sb.workers]
        self.emit("standby_exited", group=sb.group, pids=[w.pid for w in sb.workers], reasons=reasons, why=why,
                  retry_in_s=round(delay, 3))
        logger.warning(f"standby of group {sb.group}: {why} ({', '.join(reasons)}); a new one in {delay:.1f} s")

    def _next_timeout(self, standbys: list[Standby]) -> float | None:
        now = time.monotonic()
        times = [sb.started + self.warm_up_timeout_s for sb in standbys if not sb.is_ready]
        times += [t for g, t in self._next_try.items() if g in self._wanted and g not in self.standbys]
        return max(0.0, min(times) - now) + 0.001 if times else None

    def _expire_slow(self, standbys: list[Standby]) -> None:
        now = time.monotonic()
        for sb in standbys:
            if not sb.is_ready and now > sb.started + self.warm_up_timeout_s:
                self._standby_failed(sb, f"did not warm up within runtime.startup_timeout_s "
                                         f"({self.warm_up_timeout_s:g} s)")

    def _replenish(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(g, specs) for g, specs in self._wanted.items()
                   if g not in self.standbys and now >= self._next_try.get(g, 0.0)]
        for group, specs in due:
            if self._closing.is_set():
                return
            self._make_standby(group, specs)

    def _make_standby(self, group: int, specs: list) -> None:
        try:
            kept = self.with_weights(specs, time.monotonic() + self.warm_up_timeout_s, self._closing)
            workers: list[WorkerProcess] = []
            try:
                for spec in kept:
                    w = WorkerProcess(dataclasses.replace(spec, standby=True), self.ctx, None, parent_fds(),
                                      self.output)
                    self.reaper.register_worker(w.pid)
                    workers.append(w)
            except BaseException:
                self._stop([Standby(group, workers)], StandbyState.FAILED)
                raise
        except (KeeperError, OSError) as exc:
            n = self._failures[group] = self._failures.get(group, 0) + 1
            self._next_try[group] = time.monotonic() + recovery.standby_backoff_s(self.backoff_s, n)
            self.emit("standby_failed", group=group, error=str(exc))
            logger.warning(f"no standby for group {group}: {exc}")
            return
        with self._lock:
            self.standbys[group] = Standby(group, workers)
        self.emit("standby_started", group=group, pids=[w.pid for w in workers])

    def _stop(self, standbys: list[Standby], why: StandbyState = StandbyState.STOPPED) -> None:
        for sb in standbys:
            sb.state = sb.state.towards(why, f"standby of group {sb.group}")
        workers = [w for sb in standbys for w in sb.workers]
        if workers:
            escalation.stop(workers, 0.0, self.reap_s, self.reaper, graceful=False)
            for w in workers:
                self.reaper.forget_worker(w.pid)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass


def _keeper_env(spec: Any) -> tuple:
    """A rank's environment without what names the rank (torchrun's variables): the tree's marker, the devices,
    runtime.env and the thread settings stay."""
    from supervisor.core.topology import RANK_ENV_KEYS

    return tuple((k, v) for k, v in spec.env if k not in RANK_ENV_KEYS)
