"""A group: the ranks of one TP×PP torch.distributed world, started, served and stopped as a unit.

Start-up is a typestate: ``spawn`` yields ``WorkerProcess`` handles in STARTING; only ``_await_ready`` turns them
into a serving group, because only a ``Ready`` message carries the reply-queue handle the RPC channel needs. Any
failure on the way (a spawn that raises, a rank that raises, exits or never answers) stops every process started so
far and raises ``StartupError`` naming the rank, with its remote traceback when there is one.

With a reserve (backends/local/reserve.py) two steps come first: the ranks' specs get their kept weights from the
weight keeper, and a warm standby, where the group has one, is promoted in place of spawning; either way the ranks
then go through the same READY handshake. Once READY the reserve is told, and makes the group's next standby.
"""
from __future__ import annotations

import threading
import time
from multiprocessing.connection import wait as mp_wait
from typing import Callable, Sequence

from supervisor.backends.local import escalation
from supervisor.errors import StartupError
from supervisor.backends.local.keeper import KeeperError
from supervisor.backends.local.monitor import STACK_DUMP_WAIT_S
from supervisor.backends.local.process import WorkerProcess, parent_fds
from supervisor.core.rpc import RpcChannel
from transport import MessageQueue, TransportError, sweep_owner
from supervisor.core.states import GroupState, WorkerState
from worker.protocol import PhaseReached, Ready, StartupFailed, StartupPhase
from worker.spec import WorkerSpec


_ABORT_POLL_S = 0.05  # a shutdown during start-up is noticed this fast


class WorkerGroup:
    def __init__(self, index: int, specs: Sequence[WorkerSpec], ctx, transport, grace_s: float, reap_s: float,
                 reaper: escalation.Reaper,
                 output=None, reserve=None, oom=None) -> None:
        self.index = index
        self.reaper = reaper
        self.reserve = reserve  # Reserve: the weight keeper and warm standbys (None: neither)
        self.oom = oom  # OomWitness: tells the OOM killer's SIGKILLs from others
        self.output = output  # RankOutput: the workers' stdout/stderr pipes go there (None: they inherit ours)
        # Start-up progress for whoever watches (the lifecycle sets it): observer(phase, worker, elapsed_s=...).
        self.observer: Callable[..., None] | None = None
        self.specs = list(specs)
        self.ctx = ctx
        self.transport = transport
        self.grace_s, self.reap_s = grace_s, reap_s
        self.state = GroupState.STARTING
        self.workers: list[WorkerProcess] = []
        self.channel: RpcChannel | None = None
        self.world = len(self.specs)
        self.rank_offset = index * self.world
        self.ready_at: float | None = None

    def transition(self, new: GroupState) -> None:
        self.state = self.state.to(new, f"group {self.index}")

    # -- start-up --------------------------------------------------------------------------------------------
    def start(self, timeout_s: float, abort: threading.Event | None = None) -> None:
        self._abort = abort
        deadline = time.monotonic() + timeout_s
        t = self.transport
        bcast = MessageQueue(self.world, t.slot_bytes, t.slots, t.spin_us, t.max_message_bytes, spin_yield=t.spin_yield)
        replies: list[MessageQueue] = []
        try:
            self._take_weights(deadline)
            self._launch(bcast.export_handle())
            readies = self._await_ready(deadline)
            for w in self.workers:
                w.note_memory_cgroup(self.oom)  # again: a rank may have joined a cgroup of its own while starting
            for rank, ready in enumerate(readies):
                replies.append(self._attach_reply(rank, ready))
            self._await_attached(bcast, deadline)
        except BaseException:
            for q in (bcast, *replies):
                q.close()
            self._teardown(graceful=False)
            raise
        self.channel = RpcChannel(bcast, replies, self.rank_offset, peer_leaving=self._peer_leaving)
        for w in self.workers:
            w.transition(WorkerState.READY)
        self.ready_at = time.monotonic()
        self.transition(GroupState.READY)
        if self.reserve is not None:
            self.reserve.group_ready(self.index, self.specs)

    def _take_weights(self, deadline: float) -> None:
        """The ranks' kept weights, from the keeper (which loads them the first time)."""
        if self.reserve is None:
            return
        try:
            self.specs = self.reserve.with_weights(self.specs, deadline, self._abort)
        except KeeperError as exc:
            rank = exc.rank if exc.rank >= 0 else None
            raise StartupError(f"group {self.index}: {exc}", rank, exc.remote_traceback) from None

    def _launch(self, bcast_handle) -> None:
        """A process per rank: the group's warm standby promoted, or fresh ones spawned. Spawning the k-th may
        raise: the ones before are stopped by the caller."""
        spares = self.reserve.take_standby(self.index) if self.reserve is not None else None
        for k, spec in enumerate(self.specs):
            if spares:
                w = spares[k]
                w.promote(spec, bcast_handle)
            else:
                w = WorkerProcess(spec, self.ctx, bcast_handle, parent_fds(), self.output)
                self.reaper.register_worker(w.pid)
            w.note_memory_cgroup(self.oom)
            self.workers.append(w)
            self._observe(StartupPhase.SPAWNED, w, 0.0)

    def _await_ready(self, deadline: float) -> list[Ready]:
        readies: dict[int, Ready] = {}
        by_conn = {w.status_r: w for w in self.workers}
        by_sentinel = {w.exit_fd: w for w in self.workers}
        while len(readies) < self.world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._startup_timeout(readies)
            if self._abort is not None and self._abort.is_set():
                raise StartupError("start-up aborted: the supervisor is shutting down")
            for obj in mp_wait([*by_conn, *by_sentinel], timeout=min(remaining, _ABORT_POLL_S)):
                if obj in by_conn:
                    w = by_conn[obj]
                    self._take_status(w, readies)  # progress reports come first: keep reading until READY
                    if w.rank in readies:
                        del by_conn[obj]
                elif by_sentinel[obj].rank not in readies:
                    w = by_sentinel[obj]
                    while not w.status_r.closed and w.status_r.poll(0):  # its last words first: a StartupFailed
                        self._take_status(w, readies)  # says why (one wake-up may hold several frames and the exit)
                    # the sentinel can fire before the exit status is there: _exited confirms it first
                    raise self._exited(w)
        return [readies[r] for r in range(self.world)]

    def _attach_reply(self, rank: int, ready: Ready) -> MessageQueue:
        """Open rank's reply queue. A worker that dies right after READY takes the queue's name with it (its
        segment is swept once it is gone): that is a start-up failure of that rank, for the policy to handle."""
        try:
            return MessageQueue.create_from_handle(ready.reply_handle, 0)
        except (OSError, TransportError) as exc:
            raise self._exited(self.workers[rank], exc) from None

    def _await_attached(self, bcast: MessageQueue, deadline: float) -> None:
        try:
            bcast.wait_until_ready(timeout=max(0.1, deadline - time.monotonic()))
        except TransportError as exc:  # a rank died (PeerDied names it) or never attached (QueueTimeout does)
            named = [*getattr(exc, "pending", ()), getattr(exc, "reader", None)]
            dead = [w.rank for w in self.workers if not w.is_alive()]
            rank = next((r for r in [*named, *dead] if r is not None), 0)
            raise self._exited(self.workers[rank], exc) from None

    def _exited(self, w: WorkerProcess, exc: BaseException | None = None) -> StartupError:
        """Rank ``w`` is gone (or going) during start-up: reap it (bounded) and name how it ended; if it is somehow
        still alive, name ``exc``, the symptom we saw. A rank that raised sent its error before it exited, but its
        exit can be seen first (the sentinel and the status pipe are ready together, in no fixed order): the error,
        with its remote traceback, is what it says, read from the pipe; the exit code 71 only repeats it."""
        w.reap(1.0)
        failed = self._last_words(w)
        if failed is not None:
            return failed
        why = f"{type(exc).__name__}: {exc}" if exc is not None and w.is_alive() else w.exit_info().reason
        return StartupError(f"rank {self._g(w.rank)} ({w.spec.topology.name}) exited during start-up: {why}",
                            self._g(w.rank))

    def _last_words(self, w: WorkerProcess) -> StartupError | None:
        """The StartupError a StartupFailed still unread in ``w``'s status pipe makes; None if there is none. Reads
        only what is there (a process that exited wrote all it will), never waiting for more."""
        try:
            while w.status_r.poll(0):
                msg = w.read_status()
                if isinstance(msg, StartupFailed):
                    return self._startup_failed(w, msg)
        except (EOFError, OSError):
            pass
        return None

    def _startup_failed(self, w: WorkerProcess, msg: StartupFailed) -> StartupError:
        return StartupError(f"rank {self._g(w.rank)} ({w.spec.topology.name}) failed during start-up: "
                            f"{msg.exc_type}: {msg.message}", self._g(w.rank), msg.traceback)

    def _take_status(self, w: WorkerProcess, readies: dict[int, Ready]) -> None:
        try:
            msg = w.read_status()
        except (EOFError, OSError):
            raise self._exited(w) from None  # the process is exiting: report its exit reason
        if isinstance(msg, StartupFailed):
            raise self._startup_failed(w, msg)
        if isinstance(msg, Ready):
            readies[w.rank] = msg
            self._observe(StartupPhase.READY, w, msg.startup_s)
        elif isinstance(msg, PhaseReached):
            self._observe(StartupPhase(msg.phase), w, msg.elapsed_s)

    def _observe(self, phase: StartupPhase, w: WorkerProcess, elapsed_s: float) -> None:
        if self.observer is not None:
            self.observer(phase, w, elapsed_s=round(elapsed_s, 4))

    def _startup_timeout(self, readies: dict[int, Ready]) -> None:
        late = [self._g(w.rank) for w in self.workers if w.rank not in readies]
        for w in self.workers:
            if w.rank not in readies:
                w.dump_stack()
        time.sleep(STACK_DUMP_WAIT_S)  # let faulthandler write before the teardown's SIGKILL
        logs = [self.output.log_path(r) for r in late] if self.output is not None else []
        where = f"; their stacks are in {', '.join(logs)}" if any(logs) else ""
        raise StartupError(f"ranks {late} did not become READY within the start-up timeout "
                           f"(runtime.startup_timeout_s); they were killed{where}", late[0] if late else None)

    def _peer_leaving(self, rank: int) -> bool:
        """Is a rank other than ``rank`` exiting or gone? (the RPC channel asks when ``rank`` answered an error)"""
        return any(w.leaving() for w in self.workers if w.rank != rank)

    def _g(self, rank: int) -> int:
        return rank + self.rank_offset

    # -- stopping ------------------------------------------------------------------------------------------
    def stop(self, graceful: bool = True) -> None:
        """Stop every process of the group (idempotent)."""
        if self.state is GroupState.STOPPED:
            return
        self.state = self.state.towards(GroupState.STOPPING, f"group {self.index}")
        if graceful and self.channel is not None and self.channel.failure is None:
            self.channel.send_stop()
        self._teardown(graceful)

    def _teardown(self, graceful: bool) -> None:
        escalation.stop(self.workers, self.grace_s if graceful else 0.0, self.reap_s, self.reaper, graceful=graceful)
        self.finish_stop()

    def finish_stop(self) -> None:
        """Bookkeeping once every process of the group is gone: segments, states, queues."""
        for w in self.workers:
            sweep_owner(w.pid)  # segments a dead worker created but nobody attached to
            self.reaper.forget_worker(w.pid)
            w.settle()
        if self.channel is not None:
            self.channel.close()
        self.state = self.state.towards(GroupState.STOPPED, f"group {self.index}")
