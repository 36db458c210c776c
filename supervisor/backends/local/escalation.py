"""Stopping processes for sure: death pipe -> SIGTERM -> grace -> SIGKILL -> bounded reap, over whole trees.

One deadline for the whole set (not per process), workers stopped in reverse start order, descendants found with
psutil before anything is signalled (a dead parent's children are re-parented and harder to find), children
signalled before their parents. Only processes we started are touched: workers are verified by pid + create time,
descendants by being below a verified worker, re-parented orphans by carrying our tree marker in their environment.
Idempotent: stopping what is already gone is a no-op.

What a supervisor knows about its tree (its workers' pids and sessions, every process seen below them, its marker)
lives in its own ``Reaper``, so two supervisors in one process never reap each other's orphans. Two things are
process-wide because the kernel makes them so: being a child subreaper (a process attribute), and the set of
children we wait for (``psutil.Process().children()`` lists every supervisor's adopted orphans; each Reaper takes
only those carrying its own marker or seen below its own workers).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Iterable, Sequence

import psutil
from multiprocessing.connection import wait as mp_wait

from supervisor.backends.local.process import WorkerProcess, held_pids
from supervisor.core.topology import TREE_ENV
from transport import _proc

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_REGISTRY_CAP = 100_000  # a very long soak: forget the oldest entries rather than grow without bound


class Reaper:
    """One supervisor's knowledge of its process tree, for reaping what escapes it (see reap_orphans)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker  # the value of TREE_ENV in every process of this tree
        self._live_workers: set[int] = set()
        self._sessions: dict[int, None] = {}  # sessions our workers opened (a worker's pid), oldest first
        self._descendants: dict[int, float] = {}  # pid -> create time of every process seen below a worker

    def register_worker(self, pid: int) -> None:
        self._live_workers.add(pid)
        _remember(self._sessions, pid, None)

    def forget_worker(self, pid: int) -> None:
        self._live_workers.discard(pid)

    def remember(self, p: psutil.Process) -> None:
        try:
            _remember(self._descendants, p.pid, p.create_time())
        except psutil.Error:
            pass

    def was_descendant(self, p: psutil.Process) -> bool:
        """Seen below a worker while alive; the create time (readable for a zombie) rules out a reused pid."""
        try:
            return self._descendants.get(p.pid) == p.create_time()
        except psutil.Error:
            return False

    def is_ours(self, p: psutil.Process) -> str | None:
        """"zombie" or "live" for an adopted child of this tree, None for anything else (another supervisor's,
        the user's own, a live worker handled through its handle)."""
        if p.pid in self._live_workers:
            return None
        kin = _proc.session(p.pid) in self._sessions or self.was_descendant(p)
        if p.status() == psutil.STATUS_ZOMBIE:
            return "zombie" if kin else None
        return "live" if kin or self._carries_marker(p) else None

    def _carries_marker(self, p: psutil.Process) -> bool:
        """Our marker in what /proc shows of its environment: inherited through exec (the worker's os.environ)
        and through fork (the worker publishes its environment there, worker/proc_environ.py)."""
        try:
            return p.environ().get(TREE_ENV) == self.marker
        except psutil.AccessDenied:  # another user's process: not ours
            return False


def _remember(registry: dict, key: int, value) -> None:
    if len(registry) >= _REGISTRY_CAP:
        del registry[next(iter(registry))]  # the oldest entry, not the whole registry
    registry[key] = value


def _descendants(workers: Iterable[WorkerProcess], reaper: Reaper) -> list[psutil.Process]:
    """Every live process below the workers, deepest first (the workers themselves are not included). Each is
    remembered, so that its zombie can be reaped once it is re-parented to us (see reap_orphans)."""
    tree: list[psutil.Process] = []
    for w in workers:
        root = w.psutil_process()
        if root is None:
            continue
        try:
            tree.extend(reversed(root.children(recursive=True)))
        except psutil.Error:
            pass
    for p in tree:
        reaper.remember(p)
    return tree


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _signal_workers(workers: Iterable[WorkerProcess], sig: int) -> None:
    """``sig`` to the workers still running. Each is marked: its signal death is then the stop's, not a failure
    of its own (ExitInfo.by_stop). One already exiting (killed a moment ago, its teardown under way) is left alone
    and unmarked: how it ended is its own. (Only looked at: its code is the monitor's to read, once it is set.)"""
    live = [w for w in workers if not w.leaving()]
    for w in live:
        w.stop_signal = sig
    _signal_all(filter(None, (w.psutil_process() for w in live)), sig)


def _wait(workers: Sequence[WorkerProcess], others: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until every worker and every other process is gone, or the deadline. Workers are waited for through
    their exit descriptors and reaped by multiprocessing (is_alive), which keeps their exit status; returns the
    other processes still alive."""
    while True:
        alive = [w for w in workers if w.is_alive()]
        others = [p for p in others if _running(p)]
        remaining = deadline - time.monotonic()
        if (not alive and not others) or remaining <= 0:
            return others
        if alive:
            mp_wait([w.exit_fd for w in alive], timeout=min(remaining, 0.02))
        else:
            time.sleep(min(remaining, 0.01))


def _running(p: psutil.Process) -> bool:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            p.wait(0)  # a re-parented orphan that is now our child: reap it
            return False
        return True
    except (psutil.Error, psutil.TimeoutExpired):
        return False


def stop(workers: Sequence[WorkerProcess], grace_s: float, reap_s: float, reaper: Reaper, *,
         graceful: bool = True) -> None:
    """Stop ``workers`` (given in start order) and everything below them within grace_s + reap_s."""
    order = list(reversed(workers))
    below = _descendants((w for w in order if w.is_alive()), reaper)
    if graceful:
        deadline = time.monotonic() + grace_s
        for w in order:
            w.request_stop(grace_s)
        _signal_all(below, signal.SIGTERM)  # children first, then the workers
        _signal_workers(order, signal.SIGTERM)
        below = _wait(order, below, deadline)
        below += [p for p in _descendants((w for w in order if w.is_alive()), reaper) if p not in below]
    else:
        for w in order:
            w.request_stop(0.0)
    _signal_all(below, signal.SIGKILL)
    _signal_workers(order, signal.SIGKILL)
    deadline = time.monotonic() + reap_s
    _wait(order, below, deadline)
    _until_exited(order, deadline)
    for w in order:
        w.close()
    reap_orphans(reaper, reap_s)


def _until_exited(workers: Sequence[WorkerProcess], deadline: float) -> None:
    """Until each worker has finished exiting (its exit descriptor readable), or the deadline. A status read from
    a worker still being torn down (TreeProcess.note_exit) comes before the kernel hands its children to us: the
    sweep after this would miss them, and a detached grandchild of a killed worker lived on."""
    pending = [w.exit_fd for w in workers]
    while pending and (remaining := deadline - time.monotonic()) > 0:
        done = mp_wait(pending, timeout=remaining)
        pending = [fd for fd in pending if fd not in done]


def reap_orphans(reaper: Reaper, timeout: float = 0.5) -> list[int]:
    """Kill and reap descendants of our workers that were re-parented to us (we are a child subreaper) after
    their worker died. A live one is recognised by the tree marker in its environment; a zombie (it died before its
    worker) has no readable environment, so by its session (a worker's descendants stay in the session the worker
    opened with setsid, whose id is the worker's pid) or, for one that opened a session of its own, because we saw
    it below a worker while it lived (pid + create time).
    A user's own children match none of these, nor do another supervisor's in the same process. Nor does a worker
    (or keeper, or standby) whose handle is still held, even once its group is forgotten: a worker whose end was
    read early lingers until multiprocessing has reaped it, and reaping it here would take its exit status away
    (multiprocessing would never get it, and the handle's pipes would stay open)."""
    found, zombies = [], []
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    held = held_pids()
    for p in children:
        if p.pid in held:
            continue
        try:
            kind = reaper.is_ours(p)
        except psutil.Error:
            continue
        if kind == "zombie":
            zombies.append(p.pid)
        elif kind == "live":
            reaper.remember(p)  # if it dies before we kill it, its zombie is still recognised
            found.append(p)
    for pid in zombies:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    _signal_all(found, signal.SIGKILL)
    psutil.wait_procs(found, timeout=timeout)
    return [p.pid for p in found] + zombies


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphaned grandchildren come back to us to be reaped instead of to init."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
