"""Liveness and progress of running workers, in one thread that never blocks on anything but the kernel.

It waits (``multiprocessing.connection.wait``) on every watched worker's pidfd (its process sentinel where there is
none) and status pipe, plus a wake-up pipe, never on a data queue. A death is confirmed by the exit status before
anyone acts on it; several deaths seen in one wake-up are reported together (one coherent recovery). What the kernel
offers makes that early: the pidfd turns readable at the exit itself (no relay through the forkserver), and the
status pipe's end of file comes while the process is still being torn down (its descriptors close before its exit
is announced), when its exit status can already be read (``WorkerProcess.note_exit``). A status frame is a
heartbeat; a worker whose last heartbeat is older than the timeout is declared hung: its Python stacks are dumped
(faulthandler, SIGUSR1), it is killed, and its death is then reported like any other.

Each exit has one owner. A worker the manager unwatched (its group is being stopped or recycled) is the stopper's
to account for, even if its exit lands in a wait that began before the unwatch: the monitor claims a worker
(checks that it is still watched and unwatches it, in one step under the lock) before it reports it.
"""
from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import wait as mp_wait
from typing import Callable

from loguru import logger

from supervisor.backends.local.process import WorkerProcess, settle_lingering

STACK_DUMP_WAIT_S = 0.05  # give faulthandler a moment to write before the kill
LINGER_POLL_S = 0.05  # how often a lingering process's status is looked for (the kernel's teardown: milliseconds)


class Monitor(threading.Thread):
    def __init__(self, on_exit: Callable[[object, list[WorkerProcess]], None],
                 on_hung: Callable[[object, list[WorkerProcess]], None], heartbeat_timeout_s: float) -> None:
        super().__init__(name="supervisor-monitor", daemon=True)
        self.on_exit, self.on_hung = on_exit, on_hung
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lock = threading.Lock()
        self._watched: dict[WorkerProcess, object] = {}  # worker -> its group
        self._status_eof: set[WorkerProcess] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopped = threading.Event()

    def watch(self, group, workers) -> None:
        with self._lock:
            now = time.monotonic()
            for w in workers:
                w.last_beat = now
                self._watched[w] = group
        self.wake()

    def unwatch(self, workers) -> None:
        with self._lock:
            for w in workers:
                self._watched.pop(w, None)
                self._status_eof.discard(w)
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the monitor is awake anyway

    def stop(self) -> None:
        self._stopped.set()
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._step()
            except Exception:  # the monitor must survive anything a single worker does
                logger.exception("monitor step failed")
                time.sleep(0.01)

    def _step(self) -> None:
        with self._lock:
            watched = dict(self._watched)
            eof = set(self._status_eof)
        waitables: dict[object, tuple[str, WorkerProcess]] = {}
        for w in watched:
            waitables[w.exit_fd] = ("exit", w)
            if w not in eof and not w.status_r.closed:
                waitables[w.status_r] = ("status", w)
        ready = mp_wait([*waitables, self._wake_r], timeout=self._timeout(watched))
        exited: list[WorkerProcess] = []
        for obj in ready:
            if obj == self._wake_r:
                self._drain_wake()
                continue
            kind, w = waitables[obj]
            if kind == "exit" or not self._read_status(w) and w.note_exit():
                exited.append(w)
        self._report_exits(exited, watched)
        self._check_heartbeats(watched)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _read_status(self, w: WorkerProcess) -> bool:
        """A frame (a heartbeat); False at the end of file: the worker is exiting, or closed the pipe."""
        try:
            w.read_status()
            return True
        except (EOFError, OSError):
            with self._lock:
                self._status_eof.add(w)
            return False

    def _timeout(self, watched) -> float | None:
        """Until the next heartbeat deadline; while a closed process still lingers (its exit read early, its status
        not yet in), no longer than LINGER_POLL_S, and it is settled on each pass: its descriptors are let go a
        moment after the kernel's teardown ends, not at the tree's next close (a soak would count them as leaked)."""
        timeout = self._next_deadline(watched)
        if settle_lingering(0.0):
            timeout = LINGER_POLL_S if timeout is None else min(timeout, LINGER_POLL_S)
        return timeout

    def _next_deadline(self, watched) -> float | None:
        live = [w.last_beat for w in watched if not w.hung]
        if not live:
            return None
        return max(0.0, min(live) + self.heartbeat_timeout_s - time.monotonic()) + 0.001

    def _report_exits(self, exited: list[WorkerProcess], watched) -> None:
        exited = self._claim(exited)
        if not exited:
            return
        for w in exited:
            if not w.note_exit():
                w.reap(1.0)  # confirm the exit status before acting on it
        by_group: dict[int, tuple[object, list[WorkerProcess]]] = {}
        for w in exited:
            group = watched[w]
            by_group.setdefault(id(group), (group, []))[1].append(w)
        for group, workers in by_group.values():
            self.on_exit(group, workers)

    def _claim(self, exited: list[WorkerProcess]) -> list[WorkerProcess]:
        """Unwatch and return those of ``exited`` still watched. The step waited on a snapshot: a worker unwatched
        meanwhile belongs to whoever unwatched it (a group being stopped or recycled, whose stop made it exit), and
        reporting its exit would be a failure that never happened. Check and unwatch are one step under the lock,
        so each exit has one owner: the monitor or the stopper (and a worker listed twice, by its pidfd and by its
        status pipe, is claimed once)."""
        with self._lock:
            mine = [w for w in exited if self._watched.pop(w, None) is not None]
            self._status_eof.difference_update(mine)
        return mine

    def _check_heartbeats(self, watched) -> None:
        now = time.monotonic()
        late = [w for w in watched if not w.hung and now - w.last_beat > self.heartbeat_timeout_s and w.is_alive()]
        with self._lock:  # as for exits: a worker unwatched since the snapshot is no longer ours to judge
            late = [w for w in late if w in self._watched]
        if not late:
            return
        for w in late:
            w.hung = True
            w.dump_stack()
        time.sleep(STACK_DUMP_WAIT_S)
        by_group: dict[int, tuple[object, list[WorkerProcess]]] = {}
        for w in late:
            by_group.setdefault(id(watched[w]), (watched[w], []))[1].append(w)
        for group, workers in by_group.values():
            self.on_hung(group, workers)
