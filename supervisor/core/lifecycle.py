"""The manager: starts groups, reacts to their failures under the restart policy, and stops everything.

::

    monitor thread ──(exits, hangs)──> contain: fail pending calls, close the gate ──> inbox: Failure
    API threads ──(shutdown, recycle)──────────────────────────────────────────────> inbox: Shutdown | Recycle
    manager thread: inbox -> [kill broken groups] -> callbacks -> policy.decide_many -> restart | remove | give up
                    ... -> stop everything -> Outcome (how the run ended: read by the API, the CLI, the exit code)

Every process is started and stopped from the manager thread, which lives as long as the supervisor: the kernel
ties PR_SET_PDEATHSIG to the thread that forked, so a short-lived thread must never spawn workers. Policy (what to
do) is the pure function in policy.py; this module is the mechanism (doing it).
"""
from __future__ import annotations

import enum
import inspect
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

from loguru import logger

from supervisor.errors import GaveUp, StartupError, WorkerFailed
from supervisor.core.events import EventLog
from supervisor.core.gate import Closed, GroupGate
from supervisor.core.requests import Requests
from supervisor.core.policy import Action, ChildExit, Decision, Phase, PolicySpec, PolicyState, decide_many
from supervisor.core.states import GroupState, SupervisorState, WorkerState
from supervisor.core.topology import build_specs, resolve_device
from supervisor.settings import Config
from worker.protocol import StartupPhase

if TYPE_CHECKING:  # the written contract only: core never imports a backend
    from supervisor.backends.base import Backend, Group as WorkerGroup


_COALESCE_S = 0.05  # after a failure, wait this long for more: they join the same recovery
# A planned restart (recycle) lets the calls in flight finish first. Their own deadlines bound them; this bounds
# the wait when they have none: a few missed heartbeats' worth, after which the monitor would have acted anyway.
_RECYCLE_DRAIN_HEARTBEATS = 4
# How long start() waits for the manager to finish tearing down after a failed start: the escalation's own bound
# (grace, then reap) plus slack for the bookkeeping around it.
_TEARDOWN_SLACK_S = 10.0
_DRAIN_SLICE_S = 0.05  # a drain collects replies in slices this long, so that a second signal cuts it short at once


# -- the manager's inbox: typed messages ------------------------------------------------------------------------
@dataclass(frozen=True)
class Shutdown:
    """Stop everything (a caller, a signal, the end of the workload, a collected Supervisor)."""


@dataclass(frozen=True)
class Failure:
    """The monitor saw ranks die or hang; the exits are for the policy."""

    exits: tuple[ChildExit, ...]


class Planned(enum.Enum):
    """Why a group restarts between calls, losing none. The value is the event it is told by (and, in the metrics,
    a restart cause of its own: supervisor/observe/metrics.py)."""

    RECYCLE = "recycled"  # a worker crossed worker.max_rss_mb / max_calls
    ROLLING = "rolling_restart"  # asked for: rolling_restart() (SIGUSR2, status --restart all), restart_group(g)


@dataclass(frozen=True)
class Recycle:
    """Restart a group between calls: a worker crossed max_rss / max_calls, or a person asked (restart_group)."""

    group: int
    why: Planned = Planned.RECYCLE


@dataclass(frozen=True)
class RollingRestart:
    """Restart every dp group, one at a time, through the recycle path (no call lost). ``seconds`` per group
    (gate closed -> serving again) is filled in and ``done`` set by the manager."""

    done: threading.Event = field(default_factory=threading.Event)
    seconds: dict = field(default_factory=dict)


Message = Union[Shutdown, Failure, Recycle, RollingRestart]


# -- how a run ended --------------------------------------------------------------------------------------------
class Ending(enum.Enum):
    RUNNING = "running"  # not ended (yet)
    STOPPED = "stopped"  # a stop was asked for: by the caller, a signal, the end of the workload
    GAVE_UP = "gave_up"  # the restart policy's budget was spent (start-up failures included)


@dataclass(frozen=True)
class Outcome:
    """How the tree's run ended: the one record the API (``Supervisor.outcome``), the CLI's summary and its exit
    code read, so that "did it give up?" is answered in one place."""

    ending: Ending
    error: BaseException | None = None  # why it gave up: StartupError or GaveUp
    restarts: tuple[int, ...] = ()  # restarts per dp group

    @property
    def gave_up(self) -> bool:
        return self.ending is Ending.GAVE_UP

    def exit_code(self, signum: int | None = None) -> int:
        """The command's exit code: 128+N when stopped by signal N, 1 when it gave up, else 0."""
        if signum:
            return 128 + signum
        return 1 if self.gave_up else 0


class Lifecycle:
    def __init__(self, cfg: Config, events: EventLog, backend: Backend) -> None:
        self.cfg = cfg
        self.events = events
        self.device = resolve_device(cfg.device)
        self.backend = backend  # the mechanism, behind the contract of supervisor/backends/base.py
        dp = cfg.parallel.dp
        self.groups: dict[int, WorkerGroup] = {}
        self.gates = [GroupGate() for _ in range(dp)]
        self.live: list[int] = list(range(dp))  # the policy's children, in start order
        self.attempts = [0] * dp
        self.restarts = [0] * dp
        self.policy = PolicySpec.from_settings(cfg.restart)
        self.pstate = PolicyState()
        self.state = SupervisorState.STARTING
        self.error: BaseException | None = None  # the latest start-up failure; why we gave up once we did
        self.ending = Ending.RUNNING
        self.callbacks: list[Callable[..., Any]] = []
        self.inbox: "queue.Queue[Message]" = queue.Queue()
        self.stop_requested = threading.Event()
        self.drain_s = 0.0  # set by the first request_shutdown that asks for a drain window
        self.requests = Requests(dp)  # multi-call requests in flight per group: what planned stops wait for
        self.skip_drain = threading.Event()  # a second signal: stop draining, stop now
        self.started = threading.Event()
        self.finished = threading.Event()
        self._tmp = ""  # the private rendezvous folder: made at start(), removed with the tree
        self.monitor = self.backend.new_monitor(self._on_exit, self._on_hung)
        attach = getattr(self.backend, "attach_events", None)  # a backend with processes of its own reports them
        if attach is not None:
            attach(self.events.emit)
        self.thread = threading.Thread(target=self._run, name="supervisor-manager", daemon=True)

    def transition(self, new: SupervisorState) -> None:
        self.state = self.state.to(new, "supervisor")

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.ending, self.error if self.ending is Ending.GAVE_UP else None, tuple(self.restarts))

    # -- driving ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        _sweep_dead_owners()
        self._tmp = tempfile.mkdtemp(prefix=f"{_RDZV_PREFIX}{os.getpid()}-")
        self.monitor.start()
        self.thread.start()
        self.started.wait()
        if self.state is not SupervisorState.RUNNING and self.error is not None:
            self.finished.wait(timeout=self.teardown_bound_s())
            raise self.error

    def teardown_bound_s(self) -> float:
        """How long stopping everything can take: the escalation (grace, then reap), reaping adopted orphans and
        the monitor's exit (a reap each), plus the bookkeeping. Only an upper bound: waiters return when it is done."""
        return self.cfg.shutdown.grace_s + 3 * self.cfg.shutdown.reap_s + _TEARDOWN_SLACK_S

    def stop_words(self) -> str:
        """How a refused call says why: "is shutting down" while the stop is under way, "has shut down" after."""
        return "has shut down" if self.finished.is_set() else "is shutting down"

    def request_shutdown(self, drain_s: float | None = None) -> None:
        """Stop everything. ``drain_s`` > 0: new calls are refused at once, calls in flight get up to that long to
        finish first (the first such request sets it); 0 cuts a drain in progress short; None asks nothing of it."""
        if drain_s is not None and drain_s > 0 and not self.stop_requested.is_set():
            self.drain_s = drain_s
            self.requests.close(draining=True)  # no new request; those in flight may still call until drained
        elif drain_s is not None and drain_s <= 0:
            self.skip_drain.set()
            self.requests.close()
        elif not self.stop_requested.is_set():
            self.requests.close()
        self.stop_requested.set()
        self.inbox.put(Shutdown())
        for gate in self.gates:
            gate.wake_all()

    def request_recycle(self, group: int, why: Planned = Planned.RECYCLE) -> None:
        self.inbox.put(Recycle(group, why))

    def request_rolling_restart(self, msg: RollingRestart) -> None:
        self.inbox.put(msg)

    def force_stop(self) -> None:
        """SIGKILL every worker at once (a second Ctrl-C): safe from any thread, including a signal handler's;
        the manager then finds them dead and finishes the stop."""
        self.stop_requested.set()
        workers = [w for g in list(self.groups.values()) for w in list(g.workers)]
        self.events.emit("forced_stop", pids=[w.pid for w in workers])
        self.backend.stop_workers(workers, 0.0, self.cfg.shutdown.reap_s)
        self.request_shutdown()

    def _run(self) -> None:
        try:
            self._converge(list(self.live), [])
            if self.state is SupervisorState.STARTING:
                self.transition(SupervisorState.RUNNING)  # else it gave up on the way (or stopped)
            self.started.set()
            if self.state is SupervisorState.RUNNING:
                self._serve_inbox()
        except BaseException as exc:  # a bug here must not leave processes behind
            logger.exception("supervisor manager failed")
            self.error = self.error or exc
            self.ending = Ending.GAVE_UP
        finally:
            self.started.set()
            self._drain()
            self._stop_everything()
            self.finished.set()

    def _serve_inbox(self) -> None:
        while True:
            msg = self.inbox.get()
            if isinstance(msg, Shutdown) or self.stop_requested.is_set():
                return
            if isinstance(msg, Failure):
                self._handle_failure(list(msg.exits))
            elif isinstance(msg, Recycle) and self.state is SupervisorState.RUNNING:
                self._recycle(msg.group, msg.why)
            elif isinstance(msg, RollingRestart):
                self._rolling_restart(msg)
            if self.state is SupervisorState.GAVE_UP:
                return

    def _more_failures(self, wait_s: float = 0.0) -> list[ChildExit]:
        """Failures queued now, or within ``wait_s``, are handled together: several ranks killed at once, one
        recovery. Other messages keep their turn."""
        more, keep = [], []
        deadline = time.monotonic() + wait_s
        while True:
            try:
                msg = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (more.extend(msg.exits) if isinstance(msg, Failure) else keep.append(msg))
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
        specs = build_specs(self.cfg, i, attempt, rdzv, self.device, self.backend.name, self.backend.tree_marker)
        group = self.backend.new_group(i, specs)
        self.groups[i] = group
        reported = self._watch_startup(group, attempt)
        t0 = time.monotonic()
        try:
            group.start(self.cfg.runtime.startup_timeout_s, abort=self.stop_requested)
        finally:
            for w in group.workers:
                if w.pid not in reported:  # a backend without start-up progress (Ray): "started" comes late
                    self.events.emit("started", group=i, rank=group.rank_offset + w.rank, pid=w.pid, attempt=attempt)
        for w in group.workers:
            w.transition(WorkerState.RUNNING)
            self.events.emit("ready", group=i, rank=group.rank_offset + w.rank, pid=w.pid, attempt=attempt,
                             startup_s=round(time.monotonic() - t0, 4))
        self.monitor.watch(group, group.workers)
        if group.channel is not None:  # a missed call deadline declares the silent ranks hung
            group.channel.on_deadline = lambda ranks, why, g=group: self.declare_hung(g, ranks, why)
        self.gates[i].open()
        self.events.emit("group_ready", group=i, attempt=attempt, startup_s=round(time.monotonic() - t0, 4),
                         ranks=[group.rank_offset + w.rank for w in group.workers])

    def _watch_startup(self, group, attempt: int) -> set[int]:
        """Start-up progress as events: ``started`` at spawn, ``phase`` as each rank enters the next phase (a
        backend that reports none leaves ``group.observer`` unused). Returns the pids reported as started."""
        reported: set[int] = set()

        def observe(phase: StartupPhase, w, elapsed_s: float) -> None:
            where = dict(group=group.index, rank=group.rank_offset + w.rank, pid=w.pid, attempt=attempt)
            if phase is StartupPhase.SPAWNED:
                reported.add(w.pid)
                self.events.emit("started", **where)
            else:
                self.events.emit("phase", **where, phase=phase.value, elapsed_s=elapsed_s)

        group.observer = observe
        return reported

    def stack_log(self, rank: int) -> str:
        """Where global rank ``rank``'s stacks go when dumped: its rank log ("" when the backend keeps none)."""
        rank_log = getattr(self.backend, "rank_log", None)
        return rank_log(rank) if rank_log is not None else ""

    def _stop_group(self, i: int, graceful: bool) -> None:
        group = self.groups.get(i)
        self.gates[i].close(Closed.RESTARTING)
        if group is None or group.state is GroupState.STOPPED:
            return
        self.monitor.unwatch(group.workers)
        group.stop(graceful=graceful)
        self._emit_stopped(group)

    def _emit_stopped(self, group: WorkerGroup) -> None:
        """How each rank of a stopped group ended. The ranks the monitor had not reported are here only: one that
        ended by itself just before the stop (a code the stop does not give) is a failure too (launch/rootcause)."""
        infos = [w.exit_info() for w in group.workers]
        self.events.emit("stopped", group=group.index, ranks=[group.rank_offset + w.rank for w in group.workers],
                         reasons=[i.short for i in infos], pids=[w.pid for w in group.workers],
                         codes=[i.exitcode for i in infos], by_stop=[i.by_stop for i in infos])

    def _drop_group(self, i: int) -> None:
        self._stop_group(i, graceful=True)
        self.gates[i].close(Closed.REMOVED)
        if i in self.live:
            self.live.remove(i)

    def _recycle(self, i: int, why: Planned) -> None:
        """A planned restart of group i (max_rss / max_calls, a rolling restart), losing no call and no request:
        admit no new request there and let those in flight finish, then close the gate, drain, settle, restart."""
        bound = self.cfg.worker.heartbeat_timeout_s * _RECYCLE_DRAIN_HEARTBEATS
        self.requests.close(i)
        try:
            self.requests.wait_idle([i], bound, cancel=self.stop_requested)
            self._restart_between_calls(i, bound, why)
        finally:
            self.requests.reopen(i)

    def _restart_between_calls(self, i: int, bound: float, why: Planned) -> None:
        gate = self.gates[i]
        gate.close(Closed.RECYCLING)
        gate.drain(timeout=bound)
        channel = self.groups[i].channel
        if channel is not None:  # stopping closes the reply queues: collect the replies of calls in flight first
            channel.settle(timeout=bound)
        self._stop_group(i, graceful=True)
        self.events.emit(why.value, group=i)  # told as what it is: a recycle, or a restart someone asked for
        self._converge([i], [])

    def _rolling_restart(self, msg: RollingRestart) -> None:
        """Every serving group in turn through _recycle: its gate closes (calls go to the other replicas, or wait
        for it), calls in flight finish, it stops and starts again; then the next. A group that is down already
        is the failure path's to restart."""
        try:
            for i in list(self.live):
                if self.stop_requested.is_set() or self.state is not SupervisorState.RUNNING:
                    break
                if not self.gates[i].is_open:
                    continue
                t0 = time.monotonic()
                self._recycle(i, Planned.ROLLING)
                msg.seconds[i] = time.monotonic() - t0
        finally:
            msg.done.set()

    # -- failures --------------------------------------------------------------------------------------------
    def _on_exit(self, group: WorkerGroup, workers) -> None:
        """Monitor thread: contain at once (pending calls fail now), then hand over to the manager."""
        for w in workers:
            info = w.exit_info()
            w.settle()
            self.events.emit("exited", group=group.index, rank=group.rank_offset + w.rank, pid=w.pid,
                             code=info.exitcode, reason=info.short, meaning=info.meaning)
        if group.state is not GroupState.READY or self.stop_requested.is_set():
            return  # stopping, or already being handled: reasons are kept in the events
        restarting = self.policy.strategy.value != "never"
        desc = "; ".join(f"rank {group.rank_offset + w.rank} ({w.spec.topology.name}, pid {w.pid}) "
                         f"{w.exit_info().reason}" for w in workers)
        error = WorkerFailed(desc + ("; group restarting" if restarting else ""),
                             tuple(group.rank_offset + w.rank for w in workers), restarting)
        group.transition(GroupState.FAILED)
        self.gates[group.index].close(Closed.RESTARTING if restarting else Closed.FAILED)
        if group.channel is not None:
            group.channel.fail(error)
        now = time.monotonic()
        phase = Phase.RUNTIME
        clean = all(w.exit_info().clean for w in workers)
        self.inbox.put(Failure((ChildExit(group.index, now, phase, clean, desc),)))

    def _on_hung(self, group: WorkerGroup, workers, why: str = "missed its heartbeat deadline") -> None:
        for w in workers:
            rank = group.rank_offset + w.rank
            w.hung_why = why  # the exit is then worded by what fired: heartbeat or call deadline
            where = self.stack_log(rank) or "its stderr"
            self.events.emit("hung", group=group.index, rank=rank, pid=w.pid, why=why, stack_log=where)
            logger.error(f"rank {rank} (pid {w.pid}) {why}; stacks dumped to {where}; killing it")
            w.kill()

    def declare_hung(self, group: WorkerGroup, ranks: tuple[int, ...],
                     why: str = "missed a call deadline") -> None:
        """A call's deadline passed: those ranks are treated as hung (stack dump, kill, policy). Runs in a thread
        of the RPC channel's; a group that is no longer serving is being handled already."""
        if group.state is not GroupState.READY or self.stop_requested.is_set():
            return
        workers = [w for w in group.workers if group.rank_offset + w.rank in ranks and w.is_alive()]
        for w in workers:
            w.hung = True
            w.dump_stack()
        time.sleep(0.05)
        self._on_hung(group, workers, why)

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
        self.ending = Ending.GAVE_UP
        self.events.emit("gave_up", reason=d.reason, restarts=d.restarts_in_window)
        logger.error(f"giving up: {d.reason}")
        self.state = self.state.towards(SupervisorState.GAVE_UP, "supervisor")
        for gate in self.gates:
            gate.close(Closed.GAVE_UP)

    # -- stopping --------------------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Before a stop asked with a drain window: no call enters any more (new calls already get
        ShutdownInProgress), and the calls in flight get their replies collected (channel.settle, as a recycle
        does), so their callers are answered although the queues close. Bounded by drain_s; skip_drain cuts it."""
        if self.drain_s <= 0 or self.state is not SupervisorState.RUNNING or self.skip_drain.is_set():
            return
        t0 = time.monotonic()
        deadline = t0 + self.drain_s
        self.events.emit("draining", drain_s=self.drain_s, requests=self.requests.in_flight())
        requests_done = self.requests.wait_idle(list(self.live), self.drain_s, cancel=self.skip_drain)
        self.requests.end_drain()  # from here on every new call is refused, a request's too
        serving = [i for i in self.live if i in self.groups and self.gates[i].is_open]
        for i in serving:
            self.gates[i].close(Closed.STOPPED)
        complete = all([self.gates[i].drain(max(0.0, deadline - time.monotonic())) for i in serving])
        for i in serving:
            complete = self._settle_until(self.groups[i], deadline) and complete
        self.events.emit("drained", seconds=round(time.monotonic() - t0, 4), complete=complete and requests_done,
                         requests_left=self.requests.in_flight(), skipped=self.skip_drain.is_set())

    def _settle_until(self, group: WorkerGroup, deadline: float) -> bool:
        """Collect the replies of ``group``'s calls in flight, in short slices so that a second signal is heard;
        False if time ran out, the drain was cut short, or a rank died (the stop then fails what is left)."""
        channel = group.channel
        while channel is not None and not channel.settle(timeout=min(_DRAIN_SLICE_S, deadline - time.monotonic())):
            alive = all(w.is_alive() for w in group.workers)
            if not alive or self.skip_drain.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def _stop_everything(self) -> None:
        """One deadline for every group: all workers (reverse start order) go through one escalation."""
        self.transition(SupervisorState.STOPPING)
        if self.ending is Ending.RUNNING:
            self.ending = Ending.STOPPED
        for gate in self.gates:
            gate.close(Closed.STOPPED)
        groups = [self.groups[i] for i in sorted(self.groups) if self.groups[i].state is not GroupState.STOPPED]
        for g in groups:
            self.monitor.unwatch(g.workers)
            g.state = g.state.towards(GroupState.STOPPING, f"group {g.index}")
            if g.channel is not None and g.channel.failure is None:
                g.channel.send_stop()
                g.channel.fail(WorkerFailed("the supervisor is shutting down"))
        workers = [w for g in groups for w in g.workers]
        self.backend.stop_workers(workers, self.cfg.shutdown.grace_s, self.cfg.shutdown.reap_s)
        for g in groups:
            g.finish_stop()
            self._emit_stopped(g)
        self.monitor.stop()
        self.backend.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self.transition(SupervisorState.STOPPED)


_RDZV_PREFIX = "rankvisor-rdzv-"


def _sweep_dead_owners() -> None:
    """Shared-memory segments and rendezvous folders left by supervisors that died (kill -9), swept by every
    supervisor as it starts (not when it is constructed: building a Supervisor(start=False) touches nothing)."""
    from transport import _proc, sweep_dead

    sweep_dead()
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(_RDZV_PREFIX):
            continue
        try:
            pid = int(name[len(_RDZV_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not _proc.alive(pid):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


def _takes_argument(cb: Callable[..., Any]) -> bool:
    try:
        inspect.signature(cb).bind(None)
        return True
    except (TypeError, ValueError):
        return False
