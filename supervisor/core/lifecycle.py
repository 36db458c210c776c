"""The manager: starts groups, reacts to their failures under the restart policy, and stops everything.

::

    monitor thread ──(exits, hangs)──> contain: fail pending calls, close the gate ──> inbox
    API threads ──(shutdown, recycle)────────────────────────────────────────────────> inbox
    manager thread: inbox -> [kill broken groups] -> callbacks -> policy.decide_many -> restart | remove | give up

Every process is started and stopped from the manager thread, which lives as long as the supervisor: the kernel
ties PR_SET_PDEATHSIG to the thread that forked, so a short-lived thread must never spawn workers. Policy (what to
do) is the pure function in policy.py; this module is the mechanism (doing it).
"""
from __future__ import annotations

import enum
import os
import inspect
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

from loguru import logger

from supervisor.backends import make_backend
from supervisor.errors import GaveUp, StartupError, WorkerFailed
from supervisor.core.events import EventLog
from supervisor.core.gate import GroupGate
from supervisor.backends.local.group import GroupState, WorkerGroup
from supervisor.core.policy import Action, ChildExit, Decision, Phase, PolicySpec, PolicyState, decide_many
from supervisor.settings import Config
from supervisor.core.topology import build_specs, resolve_device
from worker.protocol import WorkerState


_COALESCE_S = 0.05  # after a failure, wait this long for more: they join the same recovery


class SupervisorState(enum.Enum):
    """STARTING -> RUNNING -> STOPPING -> STOPPED; STARTING|RUNNING -> GAVE_UP (policy budget spent) -> STOPPED."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    GAVE_UP = "gave_up"


ALLOWED_SUPERVISOR_TRANSITIONS = {
    SupervisorState.STARTING: {SupervisorState.RUNNING, SupervisorState.STOPPING, SupervisorState.GAVE_UP},
    SupervisorState.RUNNING: {SupervisorState.STOPPING, SupervisorState.GAVE_UP},
    SupervisorState.GAVE_UP: {SupervisorState.STOPPING},
    SupervisorState.STOPPING: {SupervisorState.STOPPED},
    SupervisorState.STOPPED: set(),
}


class Lifecycle:
    def __init__(self, cfg: Config, events: EventLog) -> None:
        self.cfg = cfg
        self.events = events
        self.device = resolve_device(cfg.device)
        self.backend = make_backend(cfg)
        dp = cfg.parallel.dp
        self.groups: dict[int, WorkerGroup] = {}
        self.gates = [GroupGate() for _ in range(dp)]
        self.live: list[int] = list(range(dp))  # the policy's children, in start order
        self.attempts = [0] * dp
        self.restarts = [0] * dp
        self.policy = PolicySpec.from_settings(cfg.restart)
        self.pstate = PolicyState()
        self.state = SupervisorState.STARTING
        self.error: BaseException | None = None  # why we gave up (StartupError / GaveUp)
        self.callbacks: list[Callable[..., Any]] = []
        self.inbox: queue.Queue = queue.Queue()
        self.stop_requested = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        _sweep_dead_owners()
        self._tmp = tempfile.mkdtemp(prefix=f"{_RDZV_PREFIX}{os.getpid()}-")
        self.monitor = self.backend.new_monitor(self._on_exit, self._on_hung)
        self.thread = threading.Thread(target=self._run, name="supervisor-manager", daemon=True)

    def transition(self, new: SupervisorState) -> None:
        if new not in ALLOWED_SUPERVISOR_TRANSITIONS[self.state]:
            raise RuntimeError(f"supervisor: illegal transition {self.state.name} -> {new.name}")
        self.state = new

    # -- driving ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.monitor.start()
        self.thread.start()
        self.started.wait()
        if self.state is not SupervisorState.RUNNING and self.error is not None:
            self.finished.wait(timeout=self.cfg.shutdown.grace_s + self.cfg.shutdown.reap_s + 5)
            raise self.error

    def request_shutdown(self) -> None:
        self.stop_requested.set()
        self.inbox.put(("shutdown", None))
        for gate in self.gates:
            gate.wake_all()

    def _run(self) -> None:
        try:
            self._converge(list(self.live), [])
            if self.state is SupervisorState.STARTING:
                self.transition(SupervisorState.RUNNING)
            self.started.set()
            if self.state is SupervisorState.RUNNING:
                self._serve_inbox()
        except BaseException as exc:  # a bug here must not leave processes behind
            logger.exception("supervisor manager failed")
            self.error = self.error or exc
        finally:
            self.started.set()
            self._stop_everything()
            self.finished.set()

    def _serve_inbox(self) -> None:
        while True:
            kind, payload = self.inbox.get()
            if kind == "shutdown" or self.stop_requested.is_set():
                return
            if kind == "failure":
                self._handle_failure(list(payload))
            elif kind == "recycle" and self.state is SupervisorState.RUNNING:
                self._recycle(payload)
            if self.state is SupervisorState.GAVE_UP:
                return

    def _more_failures(self, wait_s: float = 0.0) -> list[ChildExit]:
        """Failures queued now, or within ``wait_s``, are handled together: several ranks killed at once, one
        recovery. Other messages keep their turn."""
        more, keep = [], []
        deadline = time.monotonic() + wait_s
        while True:
            try:
                kind, payload = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (more.extend(payload) if kind == "failure" else keep.append((kind, payload)))
        for item in keep:
            self.inbox.put(item)
        return more

    # -- starting and restarting -----------------------------------------------------------------------------
    def _converge(self, to_start: list[int], exits: list[ChildExit]) -> None:
        """Start groups; feed start-up failures back to the policy until all run, we give up, or we stop."""
        while not self.stop_requested.is_set():
            if exits:
                now = time.monotonic()
                decision = decide_many(self.policy, self.live, self.pstate, exits, now, self.stop_requested.is_set())
                self.pstate = self.pstate.record(decision, now)
                exits = []
                to_start = self._act(decision, to_start)
                if to_start is None:
                    return
            if not to_start:
                self.error = None  # every group runs: earlier start-up failures were recovered from
                return
            i = to_start.pop(0)
            try:
                self._start_group(i)
            except StartupError as exc:
                if self.stop_requested.is_set():
                    return
                self.error = exc
                exits = [ChildExit(i, time.monotonic(), Phase.STARTUP, False, str(exc).splitlines()[0])]

    def _act(self, d: Decision, to_start: list[int]) -> list[int] | None:
        """Carry out a decision. Returns the groups still to start, or None to stop converging."""
        for i in d.remove:
            self._drop_group(i)
        if d.action is Action.GIVE_UP:
            self._give_up(d)
            return None
        if d.finished or not self.live:
            self.request_shutdown()
            return None
        if d.action is not Action.RESTART:
            return to_start
        for i in d.restart:
            self._stop_group(i, graceful=True)  # healthy siblings stop politely; broken groups are gone already
            self.restarts[i] += 1
            self.events.emit("restarting", group=i, attempt=self.attempts[i], backoff_s=d.delay_s,
                             restarts=d.restarts_in_window, reason=d.reason)
        logger.warning(f"restarting groups {list(d.restart)} in {d.delay_s:.2f} s: {d.reason}")
        if d.delay_s > 0 and self.stop_requested.wait(d.delay_s):
            return None  # shutdown during backoff: return at once, spawn nothing
        return sorted(set(to_start) | set(d.restart))

    def _start_group(self, i: int) -> None:
        attempt = self.attempts[i]
        self.attempts[i] += 1
        rdzv = self.backend.rendezvous(self._tmp, i, attempt)
        specs = build_specs(self.cfg, i, attempt, rdzv, self.device, self.backend.name)
        group = self.backend.new_group(i, specs)
        self.groups[i] = group
        t0 = time.monotonic()
        try:
            group.start(self.cfg.runtime.startup_timeout_s, abort=self.stop_requested)
        finally:
            for w in group.workers:
                self.events.emit("started", group=i, rank=group.rank_offset + w.rank, pid=w.pid, attempt=attempt)
        for w in group.workers:
            w.transition(WorkerState.RUNNING)
            self.events.emit("ready", group=i, rank=group.rank_offset + w.rank, pid=w.pid, attempt=attempt,
                             startup_s=round(time.monotonic() - t0, 4))
        self.monitor.watch(group, group.workers)
        self.gates[i].open()

    def _stop_group(self, i: int, graceful: bool) -> None:
        group = self.groups.get(i)
        self.gates[i].close("restarting")
        if group is None or group.state is GroupState.STOPPED:
            return
        self.monitor.unwatch(group.workers)
        group.stop(graceful=graceful)
        self.events.emit("stopped", group=i, ranks=[group.rank_offset + w.rank for w in group.workers],
                         reasons=[w.exit_info().short for w in group.workers])

    def _drop_group(self, i: int) -> None:
        self._stop_group(i, graceful=True)
        self.gates[i].close("removed")
        if i in self.live:
            self.live.remove(i)

    def _recycle(self, i: int) -> None:
        """A worker crossed max_rss / max_calls: restart its group between calls, losing none."""
        gate = self.gates[i]
        gate.close("recycling")
        gate.drain(timeout=self.cfg.worker.heartbeat_timeout_s * 4)
        channel = self.groups[i].channel
        if channel is not None:  # stopping closes the reply queues: collect the replies of calls in flight first
            channel.settle(timeout=self.cfg.worker.heartbeat_timeout_s * 4)
        self._stop_group(i, graceful=True)
        self.events.emit("recycled", group=i)
        self._converge([i], [])

    # -- failures --------------------------------------------------------------------------------------------
    def _on_exit(self, group: WorkerGroup, workers) -> None:
        """Monitor thread: contain at once (pending calls fail now), then hand over to the manager."""
        for w in workers:
            info = w.exit_info()
            w.state = WorkerState.STOPPED if info.clean else WorkerState.FAILED
            self.events.emit("exited", group=group.index, rank=group.rank_offset + w.rank, pid=w.pid,
                             code=info.exitcode, reason=info.short)
        if group.state is not GroupState.READY or self.stop_requested.is_set():
            return  # stopping, or already being handled: reasons are kept in the events
        restarting = self.policy.strategy.value != "never"
        desc = "; ".join(f"rank {group.rank_offset + w.rank} ({w.spec.topology.name}, pid {w.pid}) "
                         f"{w.exit_info().reason}" for w in workers)
        error = WorkerFailed(desc + ("; group restarting" if restarting else ""),
                             tuple(group.rank_offset + w.rank for w in workers), restarting)
        group.transition(GroupState.FAILED)
        self.gates[group.index].close("restarting" if restarting else "failed")
        if group.channel is not None:
            group.channel.fail(error)
        now = time.monotonic()
        phase = Phase.RUNTIME
        clean = all(w.exit_info().clean for w in workers)
        self.inbox.put(("failure", [ChildExit(group.index, now, phase, clean, desc)]))

    def _on_hung(self, group: WorkerGroup, workers, why: str = "missed its heartbeat deadline") -> None:
        for w in workers:
            self.events.emit("hung", group=group.index, rank=group.rank_offset + w.rank, pid=w.pid, why=why)
            logger.error(f"rank {group.rank_offset + w.rank} (pid {w.pid}) {why}; stacks dumped to its log; "
                         "killing it")
            w.kill()

    def declare_hung(self, group: WorkerGroup, ranks: tuple[int, ...]) -> None:
        """A call's deadline passed: those ranks are treated as hung (stack dump, kill, policy)."""
        workers = [w for w in group.workers if group.rank_offset + w.rank in ranks and w.is_alive()]
        for w in workers:
            w.hung = True
            w.dump_stack()
        time.sleep(0.05)
        self._on_hung(group, workers, "did not answer a call within its deadline")

    def _handle_failure(self, exits: list[ChildExit]) -> None:
        """One recovery, charged once, for every failure seen until the broken groups are down: ranks killed "at
        once" die milliseconds apart, and the monitor may report their groups one by one."""
        exits, stopped = self._current(exits), set()
        while {e.child for e in exits} - stopped:
            for child in sorted({e.child for e in exits} - stopped):
                self._stop_group(child, graceful=False)  # survivors of a broken collective are killed
                stopped.add(child)
            healthy = set(self.live) - stopped  # only they can still fail into this recovery (dp=1: no wait)
            exits += self._current(self._more_failures(wait_s=_COALESCE_S if healthy else 0.0))
        if exits:
            self._run_callbacks(exits)
            self._converge([], exits)

    def _current(self, exits: list[ChildExit]) -> list[ChildExit]:
        """Drop failures of a group incarnation that is already gone, e.g. restarted meanwhile by one_for_all
        together with the group that failed first: acting on them would restart it a second time."""
        def current(e: ChildExit) -> bool:
            ready_at = getattr(self.groups.get(e.child), "ready_at", None)
            return ready_at is None or ready_at <= e.time
        return [e for e in exits if current(e)]

    def _run_callbacks(self, exits: list[ChildExit]) -> None:
        for cb in list(self.callbacks):
            try:
                cb(exits) if _takes_argument(cb) else cb()
            except Exception as exc:  # a failing callback must not take the supervisor down
                logger.exception("failure callback raised")
                self.events.emit("callback_failed", error=f"{type(exc).__name__}: {exc}")

    def _give_up(self, d: Decision) -> None:
        self.error = GaveUp(d.reason) if not isinstance(self.error, StartupError) else self.error
        self.events.emit("gave_up", reason=d.reason, restarts=d.restarts_in_window)
        logger.error(f"giving up: {d.reason}")
        if self.state is not SupervisorState.GAVE_UP:
            self.transition(SupervisorState.GAVE_UP)
        for gate in self.gates:
            gate.close("gave up")

    # -- stopping --------------------------------------------------------------------------------------------
    def _stop_everything(self) -> None:
        """One deadline for every group: all workers (reverse start order) go through one escalation."""
        if self.state is not SupervisorState.STOPPED:
            self.transition(SupervisorState.STOPPING)
        for gate in self.gates:
            gate.close("stopped")
        groups = [self.groups[i] for i in sorted(self.groups) if self.groups[i].state is not GroupState.STOPPED]
        for g in groups:
            self.monitor.unwatch(g.workers)
            if g.state is not GroupState.STOPPING:
                g.transition(GroupState.STOPPING)
            if g.channel is not None and g.channel.failure is None:
                g.channel.send_stop()
                g.channel.fail(WorkerFailed("the supervisor is shutting down"))
        workers = [w for g in groups for w in g.workers]
        self.backend.stop_workers(workers, self.cfg.shutdown.grace_s, self.cfg.shutdown.reap_s)
        for g in groups:
            g.finish_stop()
            self.events.emit("stopped", group=g.index, ranks=[g.rank_offset + w.rank for w in g.workers],
                             reasons=[w.exit_info().short for w in g.workers])
        self.monitor.stop()
        self.backend.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.transition(SupervisorState.STOPPED)


_RDZV_PREFIX = "rankvisor-rdzv-"


def _sweep_dead_owners() -> None:
    """Start-up sweep: shared-memory segments and rendezvous folders left by supervisors that died (kill -9)."""
    from transport import sweep_dead

    sweep_dead()
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(_RDZV_PREFIX):
            continue
        try:
            pid = int(name[len(_RDZV_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


def _takes_argument(cb: Callable[..., Any]) -> bool:
    try:
        inspect.signature(cb).bind(None)
        return True
    except (TypeError, ValueError):
        return False
