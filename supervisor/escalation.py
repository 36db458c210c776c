"""Stopping processes for sure: death pipe -> SIGTERM -> grace -> SIGKILL -> bounded reap, over whole trees.

One deadline for the whole set (not per process), workers stopped in reverse start order, descendants found with
psutil before anything is signalled (a dead parent's children are re-parented and harder to find), children
signalled before their parents. Only processes we started are touched: workers are verified by pid + create time,
descendants by being below a verified worker, re-parented orphans by carrying our tree marker in their environment.
Idempotent: stopping what is already gone is a no-op.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Iterable, Sequence

import psutil
from multiprocessing.connection import wait as mp_wait

from supervisor.process import WorkerProcess
from supervisor.topology import TREE_ENV


def _descendants(workers: Iterable[WorkerProcess]) -> list[psutil.Process]:
    """Every live process below the workers, deepest first (the workers themselves are not included)."""
    tree: list[psutil.Process] = []
    for w in workers:
        root = w.psutil_process()
        if root is None:
            continue
        try:
            tree.extend(reversed(root.children(recursive=True)))
        except psutil.Error:
            pass
    return tree


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _signal_workers(workers: Iterable[WorkerProcess], sig: int) -> None:
    _signal_all(filter(None, (w.psutil_process() for w in workers if w.is_alive())), sig)


def _wait(workers: Sequence[WorkerProcess], others: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until every worker and every other process is gone, or the deadline. Workers are waited for through
    their multiprocessing sentinels (so multiprocessing, not psutil, reaps them and keeps their exit status);
    returns the other processes still alive."""
    while True:
        alive = [w for w in workers if w.is_alive()]
        others = [p for p in others if _running(p)]
        remaining = deadline - time.monotonic()
        if (not alive and not others) or remaining <= 0:
            return others
        if alive:
            mp_wait([w.sentinel for w in alive], timeout=min(remaining, 0.02))
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


def stop(workers: Sequence[WorkerProcess], grace_s: float, reap_s: float, *, graceful: bool = True) -> None:
    """Stop ``workers`` (given in start order) and everything below them within grace_s + reap_s."""
    order = list(reversed(workers))
    below = _descendants(w for w in order if w.is_alive())
    if graceful:
        deadline = time.monotonic() + grace_s
        for w in order:
            w.request_stop(grace_s)
        _signal_all(below, signal.SIGTERM)  # children first, then the workers
        _signal_workers(order, signal.SIGTERM)
        below = _wait(order, below, deadline)
        below += [p for p in _descendants(w for w in order if w.is_alive()) if p not in below]
    else:
        for w in order:
            w.request_stop(0.0)
    _signal_all(below, signal.SIGKILL)
    _signal_workers(order, signal.SIGKILL)
    _wait(order, below, time.monotonic() + reap_s)
    for w in order:
        w.close()
    reap_orphans(reap_s)


def kill(workers: Sequence[WorkerProcess], reap_s: float) -> None:
    """SIGKILL at once (a broken collective cannot be stopped politely), then reap."""
    stop(workers, 0.0, reap_s, graceful=False)


def reap_orphans(timeout: float = 0.5) -> list[int]:
    """Kill and reap descendants of our workers that were re-parented to us (we are a child subreaper) after
    their worker died. Recognised by the tree marker in their environment, so a user's own children are safe."""
    me = str(os.getpid())
    found = []
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    for p in children:
        try:
            if p.environ().get(TREE_ENV) == me and not _is_worker_entry(p):
                found.append(p)
        except psutil.Error:
            continue
    _signal_all(found, signal.SIGKILL)
    psutil.wait_procs(found, timeout=timeout)
    return [p.pid for p in found]


def _is_worker_entry(p: psutil.Process) -> bool:
    """Live workers are handled by their handles, not by the orphan sweep."""
    return p.pid in _LIVE_WORKER_PIDS


_LIVE_WORKER_PIDS: set[int] = set()


def register_worker(pid: int) -> None:
    _LIVE_WORKER_PIDS.add(pid)


def forget_worker(pid: int) -> None:
    _LIVE_WORKER_PIDS.discard(pid)


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphaned grandchildren come back to us to be reaped instead of to init."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
