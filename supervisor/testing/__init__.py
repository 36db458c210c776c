"""Testing your own workers under the supervisor: a pytest plugin (entry point ``pytest11``, loaded by itself once
rankvisor is installed) and plain functions for any test runner.

    def test_my_worker_recovers(rankvisor_tree):
        sup = rankvisor_tree("worker.cls=mypkg.workers:MyWorker", "parallel.tp=2", "restart=one_for_one")
        assert sup.collective_rpc("ping") == [0, 1]
        kill(sup, rank=1)                                   # fault injectors take a global rank
        assert wait_until_serving(sup, group=0)              # the policy restarted the group
        assert wait_for_event(sup, "restarting", group=0)
        assert sup.collective_rpc("ping") == [0, 1]

Fixtures: ``rankvisor_tree`` (start a tree from Hydra overrides; stopped after the test, whatever happened) and
``rankvisor_leak_check`` (fails the test if it left a process, a /dev/shm entry, a descriptor or a thread behind).
Fault injectors for one rank: ``kill``, ``stop`` (SIGSTOP: the heartbeat declares it hung), ``hang`` (a call
that sleeps on that rank only), ``raise_in``, ``ignore_sigterm``, ``spawn_grandchild``. Waiting:
``wait_for_event``, ``wait_until_serving``. Everything waits with a timeout; nothing is imported before it is used,
so the plugin costs nothing to test sessions that do not use it.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import pytest

DEFAULT_TIMEOUT_S = 30.0
_POLL_S = 0.01
_TEST_OVERRIDES = ("logging.events=false", "logging.level=WARNING")  # events stay in memory (sup.events)


# -- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture
def rankvisor_tree():
    """``rankvisor_tree(*overrides, start=True)`` -> a started Supervisor; every tree it made is shut down after
    the test. Overrides are the command line's (``parallel.tp=2``, ``worker.cls=pkg.mod:Cls``, ...)."""
    from supervisor.api import Supervisor
    from supervisor.config import load_config

    made: list[Any] = []

    def start(*overrides: str, start: bool = True):
        sup = Supervisor(load_config([*_TEST_OVERRIDES, *overrides]), start=start)
        made.append(sup)
        return sup

    yield start
    for sup in reversed(made):
        sup.shutdown()


@pytest.fixture
def rankvisor_leak_check():
    """Fail the test if it leaves a process, a /dev/shm entry, a descriptor or a thread behind (after a bounded
    settle). Request it before ``rankvisor_tree`` so the tree is stopped first."""
    from supervisor.testing import leaks

    warm_helpers()
    before = leaks.Snapshot.take()
    yield
    problems = leaks.leftovers(before)
    if problems:
        leaks.kill_extra(before)
        pytest.fail("left behind: " + "; ".join(problems), pytrace=False)


def warm_helpers() -> None:
    """Start multiprocessing's long-lived helpers (the forkserver with our preload, the resource tracker) once,
    before a leak baseline: they live for the whole session and are not leaks. Idempotent."""
    global _warm
    if _warm:
        return
    from supervisor.backends.local import startmethod

    proc = startmethod.context("forkserver", ("torch",)).Process(target=os.getpid)
    proc.start()
    proc.join(60)
    proc.close()
    _warm = True


_warm = False


# -- fault injectors (a global rank) ----------------------------------------------------------------------------------
def pid_of(sup, rank: int) -> int:
    """The live pid of global ``rank`` now."""
    for row in sup.status():
        if row["rank"] == rank and row["pid"] and row["state"] in ("ready", "running"):
            return row["pid"]
    raise LookupError(f"rank {rank} has no live worker now")


def kill(sup, rank: int, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` (SIGKILL by default) to the rank's worker; returns its pid."""
    pid = pid_of(sup, rank)
    os.kill(pid, sig)
    return pid


def stop(sup, rank: int) -> int:
    """SIGSTOP the rank's worker: alive but frozen, so its heartbeat stops and it is declared hung."""
    return kill(sup, rank, signal.SIGSTOP)


def hang(sup, rank: int, seconds: float = 3600.0, deadline: float | None = None):
    """A call that sleeps ``seconds`` on that rank only (the others answer at once); returns its Future. With
    ``deadline`` the supervisor declares the rank hung when it passes."""
    group, local = divmod(rank, sup.world)
    return sup.collective_rpc(_sleep_on, args=(local, seconds), group=group, non_block=True, deadline=deadline)


def raise_in(sup, rank: int, exc: BaseException | None = None):
    """A call that raises ``exc`` (a RuntimeError by default) on that rank; returns the RemoteError it caused."""
    from supervisor.errors import RemoteError

    group, local = divmod(rank, sup.world)
    try:
        sup.collective_rpc(_raise_on, args=(local, exc or RuntimeError(f"injected on rank {rank}")), group=group,
                           timeout=DEFAULT_TIMEOUT_S)
    except RemoteError as err:
        return err
    raise AssertionError(f"rank {rank} did not raise")


def ignore_sigterm(sup, rank: int) -> None:
    """Make the rank's worker deaf to SIGTERM (only the SIGKILL at the grace deadline stops it)."""
    group, local = divmod(rank, sup.world)
    sup.collective_rpc(_ignore_sigterm_on, args=(local,), group=group, timeout=DEFAULT_TIMEOUT_S)


def spawn_grandchild(sup, rank: int, detach: bool = False) -> int:
    """The rank's worker starts a child process (in its own session with ``detach``); returns the child's pid."""
    return sup.collective_rpc(_spawn_child, args=(detach,), unique_reply_rank=rank, timeout=DEFAULT_TIMEOUT_S)


# -- waiting ---------------------------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(_POLL_S)


def wait_for_event(sup, kind: str, timeout: float = DEFAULT_TIMEOUT_S, **match: Any) -> dict | None:
    """The first event of ``kind`` whose fields equal ``match`` (e.g. ``wait_for_event(sup, "restarting",
    group=1)``), waiting up to ``timeout``; None if none came."""
    return wait_for(lambda: next((e for e in sup.events.of_kind(kind)
                                  if all(e.get(k) == v for k, v in match.items())), None), timeout)


def wait_until_serving(sup, group: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                       after_pids: list[int] | None = None) -> bool:
    """Group ``group`` (default: every live group) serves; with ``after_pids``, by workers other than those
    (a restart has happened, not just "still serving")."""
    if after_pids:
        if not wait_for(lambda: not set(after_pids) & set(sup.pids()), timeout):
            return False
    return sup.wait_until_serving(group, timeout)


# -- what runs inside the worker (module-level: sent by reference, importable there) ---------------------------------
def _sleep_on(worker, rank: int, seconds: float) -> int:
    if worker.rank == rank:
        time.sleep(seconds)
    return worker.rank


def _raise_on(worker, rank: int, exc: BaseException) -> int:
    if worker.rank == rank:
        raise exc
    return worker.rank


def _ignore_sigterm_on(worker, rank: int) -> None:
    if worker.rank == rank:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _spawn_child(worker, detach: bool) -> int:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdin=subprocess.DEVNULL,
                            start_new_session=detach).pid
