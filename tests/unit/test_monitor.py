"""The monitor's ownership of exits, with the race ordered by hand: fake workers whose "process" is a pipe (its
read end is the sentinel; closing the write end is the exit), and the monitor's wait wrapped so that the manager's
moves land exactly between the monitor taking its snapshot and its wait returning."""
from __future__ import annotations

import os
import threading
import time
from multiprocessing import Pipe

import pytest

from supervisor.backends.local import monitor as monitor_module
from supervisor.backends.local.monitor import Monitor

pytestmark = pytest.mark.timeout(30)


class FakeWorker:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.sentinel, self._alive_w = os.pipe()
        self.status_r, self._status_w = Pipe(duplex=False)
        self.last_beat = time.monotonic()
        self.hung = False
        self.exit_fd = self.sentinel  # what the monitor waits on for the exit

    def note_exit(self) -> bool:
        return not self.is_alive()

    def exit(self) -> None:
        os.close(self._alive_w)
        self._alive_w = -1

    def is_alive(self) -> bool:
        return self._alive_w >= 0

    def reap(self, timeout: float) -> None:
        pass

    def read_status(self):
        return self.status_r.recv_bytes()

    def dump_stack(self) -> None:
        pass

    def close(self) -> None:
        for fd in (self.sentinel, self._alive_w):
            if fd >= 0:
                os.close(fd)
        self.status_r.close()
        self._status_w.close()


class Steps:
    """Wraps the monitor's wait: ``before_first`` runs once the monitor has taken the snapshot of its first step
    that includes the worker; ``count`` tells how many waits began (the next one begins once a step is done)."""

    def __init__(self, monkeypatch, sentinel: int, before_first) -> None:
        self.count = 0
        self._done = False
        self._cond = threading.Condition()
        real = monitor_module.mp_wait

        def wait(objs, timeout=None):
            if not self._done and sentinel in objs:
                self._done = True
                before_first()
            with self._cond:
                self.count += 1
                self._cond.notify_all()
            return real(objs, timeout)

        monkeypatch.setattr(monitor_module, "mp_wait", wait)

    def wait_for(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, timeout=10), f"the monitor did not reach step {n}"


def _run(monkeypatch, moves, heartbeat_timeout_s: float = 60.0) -> tuple[list, list]:
    """Watch one fake worker, let ``moves(monitor, worker)`` run inside the monitor's first wait, and return what
    the monitor reported once that step is over: (exits, hangs) as (group, ranks)."""
    exits, hangs = [], []
    mon = Monitor(lambda group, workers: exits.append((group, [w.rank for w in workers])),
                  lambda group, workers: hangs.append((group, [w.rank for w in workers])), heartbeat_timeout_s)
    w = FakeWorker(1)
    steps = Steps(monkeypatch, w.sentinel, lambda: moves(mon, w))
    try:
        mon.watch("group 0", [w])
        mon.start()
        steps.wait_for(2)  # the step that saw the manager's moves is over
    finally:
        mon.stop()
        w.close()
    return exits, hangs


def _stopped_by_the_manager(mon: Monitor, w: FakeWorker) -> None:
    mon.unwatch([w])  # what stopping (or recycling) a group does first; then its stop makes the process exit
    w.exit()


def _exited_by_itself(mon: Monitor, w: FakeWorker) -> None:
    w.exit()


def _unwatched_while_late(mon: Monitor, w: FakeWorker) -> None:
    mon.unwatch([w])
    w.last_beat -= 10  # its heartbeat is long overdue, but it is no longer the monitor's


def test_an_exit_of_a_worker_unwatched_meanwhile_is_not_reported(monkeypatch):
    """The recycle race: the manager unwatched the group and stopped it while the monitor was between its
    snapshot and its wait. That exit is the stopper's; reporting it made an `exited` event out of a recycle."""
    assert _run(monkeypatch, _stopped_by_the_manager) == ([], [])


def test_an_exit_of_a_watched_worker_is_reported_once(monkeypatch):
    assert _run(monkeypatch, _exited_by_itself) == ([("group 0", [1])], [])


def test_a_worker_unwatched_meanwhile_is_not_declared_hung(monkeypatch):
    assert _run(monkeypatch, _unwatched_while_late, heartbeat_timeout_s=1.0) == ([], [])
