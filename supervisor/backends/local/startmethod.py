"""Choosing how worker processes are started.

forkserver with torch (and our worker modules) preloaded is the default: the server imports torch once, and each
worker is a fork of it, so it starts in milliseconds instead of re-importing torch (seconds). fork is refused once
CUDA is initialised in this process (a forked child cannot use it); spawn is always safe.

Every process of the tree is started ``shielded``: with the signals a terminal or a service manager sends to the
whole process group blocked, so that they reach only the supervisor (worker/session.py tells the whole story).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import threading
from multiprocessing import spawn

from worker import session

# Imported by the forkserver before it forks anything: the heavy part of a worker's start-up, done once.
FIRST_PRELOAD = "supervisor._forkserver_path"  # our packages ahead of the current folder, before anything imports them
_WORKER_MODULES = ("worker.main", "worker.base", "transport", "loguru", "psutil", "setproctitle", "cloudpickle")


# A worker never runs the user's __main__. multiprocessing (spawn and forkserver) re-imports the parent's main
# script in every child so that objects defined there can be unpickled; a script that starts a Supervisor at top
# level (no `if __name__ == "__main__":`, as the README's example is usually pasted) would then start a tree inside
# each worker. Our workers need nothing from __main__: their class comes by "module:Class", callables and
# arguments defined in __main__ travel by value (cloudpickle). So while one of our workers is being started, the
# preparation data sent to it leaves the main module out. Only this thread's starts are affected (a flag).
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")
_starting_worker = threading.local()
_original_preparation = spawn.get_preparation_data


def _preparation_data(name):
    data = _original_preparation(name)
    if getattr(_starting_worker, "on", False):
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


spawn.get_preparation_data = _preparation_data


@contextlib.contextmanager
def without_main():
    """Start processes in this block without re-importing the parent's __main__ in them."""
    _starting_worker.on = True
    try:
        yield
    finally:
        _starting_worker.on = False


@contextlib.contextmanager
def shielded(method: str):
    """Start processes of the tree in this block: they begin with the group signals blocked, and leave the caller's
    group before they unblock them (worker/session.py). The resource tracker (spawn and forkserver use one) is
    started first, alone: CPython's start of it unblocks SIGINT and SIGTERM in this thread on its way out."""
    if method != "fork":
        from multiprocessing import resource_tracker

        with session.held():
            resource_tracker.ensure_running()
    with session.held():
        yield


def cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def resolve(method: str) -> str:
    if method == "auto":
        return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "fork" and cuda_initialized():
        raise ValueError("runtime.start_method: fork is unsafe once CUDA is initialised in the supervisor")
    return method


def context(method: str, preload: tuple[str, ...]):
    """A multiprocessing context for ``method`` (already resolved); forkserver gets its preload list."""
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([FIRST_PRELOAD, *preload, *_WORKER_MODULES])
    return ctx


def prestart(args: list[str]) -> int | None:
    """Boot the forkserver (it imports torch: the longest part of start-up) before the configuration is even
    loaded, so the two overlap. Only for a plain run that keeps the default method and preload; returns the
    forkserver's pid. ``stop_helpers`` stops it again, whether a tree used it or the configuration was refused."""
    if any(a.lstrip("+").startswith(("runtime.preload", "runtime=")) for a in args):
        return None
    method = next((a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("runtime.start_method=")), "auto")
    if method not in ("auto", "forkserver") or resolve(method) != "forkserver" or _not_a_plain_run(args):
        return None
    from multiprocessing import forkserver

    context("forkserver", ("torch",))
    with shielded("forkserver"):
        forkserver.ensure_running()
    return forkserver._forkserver._forkserver_pid


def _not_a_plain_run(args: list[str]) -> bool:
    """Flags (--help, --cfg, -m, ...) print something or sweep: no single tree will use a prestarted forkserver."""
    return any(a.startswith("-") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)


TRACKER_EXIT_WAIT_S = 2.0  # the resource tracker exits at once when its pipe closes (after unlinking what leaked)
_HELPER_POLL_S = 0.01


def stop_helpers() -> None:
    """Stop multiprocessing's helper processes of this process -- the forkserver, then the resource tracker -- and
    reap them, so none outlives the command (left alone they exit 1-2 s after it, when they notice the EOF).

    Call once every worker is gone: the resource tracker then reports (and unlinks) anything still registered."""
    from multiprocessing import forkserver, resource_tracker

    server = forkserver._forkserver
    with server._lock:
        if server._forkserver_pid is not None:  # it holds nothing of ours: killed at once, even mid-preload
            _close_and_reap(server._forkserver_alive_fd, server._forkserver_pid, wait_s=0.0)
            address = server._forkserver_address
            server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
            if address and not address.startswith("\0"):  # a filesystem socket (not Linux's abstract namespace)
                _unlink(address)
    tracker = resource_tracker._resource_tracker
    with tracker._lock:
        if tracker._fd is not None and tracker._pid is not None:
            _close_and_reap(tracker._fd, tracker._pid, wait_s=TRACKER_EXIT_WAIT_S)
            tracker._fd = tracker._pid = None


def _close_and_reap(fd: int, pid: int, wait_s: float) -> None:
    """Close the helper's pipe (its signal to exit), wait up to ``wait_s``, then kill it; always reap it."""
    import os
    import signal
    import time

    try:
        os.close(fd)
    except OSError:  # closed already
        pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # already reaped (by a subreaper sweep of ours)
            return
        time.sleep(_HELPER_POLL_S)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _unlink(path: str) -> None:
    import os

    try:
        os.unlink(path)
    except OSError:
        pass
