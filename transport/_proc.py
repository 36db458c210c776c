"""Is the process at the other end of a queue still there?

A pid alone is not enough: a zombie (killed, not yet reaped by its parent) still answers ``kill(pid, 0)``, and a
pid can be reused. So each party records its pid and its start time (``/proc/PID/stat`` field 22, clock ticks
after boot) in the segment, and a waiter that suspects its peer compares both and looks at the state letter.
Only the slow path (a waiter asleep for a while) calls these.
"""
from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) is in parentheses and may contain spaces or ')': split after the last ')'
    return data[data.rindex(b")") + 2:].split()


def start_time(pid: int | None = None) -> int:
    """Start time of ``pid`` (default: this process) in clock ticks after boot; 0 if unknown."""
    fields = _stat_fields(os.getpid() if pid is None else pid)
    try:
        return int(fields[19]) if fields else 0
    except (IndexError, ValueError):
        return 0


def alive(pid: int, start: int = 0) -> bool:
    """False if ``pid`` is gone, a zombie, or (when ``start`` is known) a different process that reuses the pid."""
    if pid <= 0:
        return True  # never recorded: nothing to say
    fields = _stat_fields(pid)
    if fields is None:
        if os.path.isdir("/proc/self"):
            return False
        return _kill0(pid)  # no procfs here: the best we can do
    try:
        state, started = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return _kill0(pid)
    if state in (b"Z", b"X", b"x"):
        return False
    return not start or started == start


def _kill0(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
