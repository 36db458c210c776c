"""A worker's stdout and stderr: pipes to the supervisor, line-buffered.

Why pipes and not the worker writing prefixed lines itself: everything that reaches file descriptors 1 and 2 must
be caught, not only Python's ``print`` — faulthandler's stack dumps, C++ and NCCL warnings, a native crash's last
words are written straight to the descriptor in many small ``write()`` calls, and two ranks doing that at once glue
lines together. So descriptors 1 and 2 become the write ends of two pipes; the supervisor reads each pipe, cuts it
into whole lines, prefixes each with ``[rankN]:`` (torchrun's way) and writes it to its own stdout/stderr with one
write, and into ``RUN_DIR/ranks/rankN.log`` (supervisor/backends/local/output.py). A line can never mix two ranks:
each pipe carries one rank's bytes, and a line is written out only once it is whole.

A third pipe carries the rank's Python stacks when the supervisor asks for them (SIGUSR1: a hang, or a person's
``kill -USR1``): those ~100 lines go into the rank's log only, not onto the console (``stacks``).
"""
from __future__ import annotations

import os
import sys
from typing import Any


_stacks: Any = None  # where faulthandler writes our stacks on SIGUSR1 (None: stderr)


def stacks() -> Any:
    """The file our Python stacks are dumped to: the stacks pipe once attached, else stderr."""
    return _stacks if _stacks is not None else sys.stderr


def attach(stdout_conn: Any, stderr_conn: Any, stacks_conn: Any = None) -> None:
    """Make the given pipe ends (multiprocessing Connections) this process's fds 1 and 2, and Python's streams
    line-buffered on them; ``stacks_conn`` becomes ``stacks()``. Call first thing in the worker, before anything
    prints or faulthandler registers."""
    global _stacks
    if stacks_conn is not None:
        _stacks = open(os.dup(stacks_conn.fileno()), "w", buffering=1, encoding="utf-8")
        stacks_conn.close()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    for conn, fd in ((stdout_conn, 1), (stderr_conn, 2)):
        os.dup2(conn.fileno(), fd)
        conn.close()
    # New streams rather than reconfiguring the old ones: those may have been opened on a file (seekable, so
    # reconfigure() would tell() on a pipe) or be missing altogether in a forkserver child.
    for fd, name in ((1, "stdout"), (2, "stderr")):
        setattr(sys, name, open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False))
