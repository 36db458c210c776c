"""Choosing how worker processes are started.

forkserver with torch (and our worker modules) preloaded is the default: the server imports torch once, and each
worker is a fork of it, so it starts in milliseconds instead of re-importing torch (seconds). fork is refused once
CUDA is initialised in this process (a forked child cannot use it); spawn is always safe.
"""
from __future__ import annotations

import multiprocessing as mp
import sys

# Imported by the forkserver before it forks anything: the heavy part of a worker's start-up, done once.
_WORKER_MODULES = ("worker.main", "worker.base", "transport", "loguru", "psutil", "setproctitle", "cloudpickle")


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
        ctx.set_forkserver_preload([*preload, *_WORKER_MODULES])
    return ctx


def prestart(args: list[str]) -> int | None:
    """Boot the forkserver (it imports torch: the longest part of start-up) before the configuration is even
    loaded, so the two overlap. Only when the command line keeps the default method and preload; returns the
    forkserver's pid so the caller can stop it at once if the configuration then turns out to be invalid."""
    if any(a.lstrip("+").startswith(("runtime.preload", "runtime=")) for a in args):
        return None
    method = next((a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("runtime.start_method=")), "auto")
    if method not in ("auto", "forkserver") or resolve(method) != "forkserver" or "-m" in args:
        return None
    from multiprocessing import forkserver

    context("forkserver", ("torch",))
    forkserver.ensure_running()
    return forkserver._forkserver._forkserver_pid


def stop_prestarted(pid: int | None) -> None:
    """Undo ``prestart`` (bad configuration: nothing may stay running)."""
    if pid is None:
        return
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
