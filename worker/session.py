"""Leaving the caller's process group without taking its signals along.

A terminal's Ctrl-C, ``timeout``, ``kill -- -PGID``, systemd and Kubernetes signal a whole process group. The
supervisor is the one process of the caller's group that acts on such a signal; every process the tree starts (the
forkserver, each worker) lives in a session of its own, where those signals do not reach. A new process is born in
its parent's group, though, and stays there until it calls ``setsid``: a group signal in that window (a Python
start-up, a forkserver's ``import torch``) would hit it with its default action -- a KeyboardInterrupt traceback,
a forkserver killed under every worker it reports for.

So the supervisor starts every such process with the group signals blocked (``held``), and the process, first thing,
opens its own session and drops what arrived meanwhile (``leave_group``): those signals were sent to the caller's
group, and the supervisor has them too. They stay blocked until the process has installed its own handlers
(``release``). The same mask, inherited, also keeps the resource tracker (multiprocessing's, left in the caller's
group) from dying of a SIGHUP, SIGQUIT or SIGUSR1 sent to the group: it unblocks only the SIGINT and SIGTERM it
ignores itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

# What a terminal, a shell or a service manager sends to a whole group, and what the supervisor itself handles.
GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Block the group signals in this thread for the block: a process started here inherits them blocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def leave_group() -> None:
    """Open a session of our own, then discard the group signals that were held meanwhile (setting a pending
    signal's action to SIG_IGN discards it) and leave each at its default action (Python's KeyboardInterrupt for
    SIGINT). Main thread only. The signals stay blocked: ``release`` once our own handlers are in place."""
    try:
        os.setsid()
    except OSError:  # already a group leader: started so by someone else, no group of the caller's to leave
        pass
    for sig in GROUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in GROUP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def release() -> None:
    """Let the group signals through: from now on they are meant for us (sent to our pid or our own group)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
