"""Is the process at the other end of a queue still there? (And the project's one reader of /proc/PID/stat.)

A pid alone is not enough: a zombie (killed, not yet reaped by its parent) still answers ``kill(pid, 0)``, and a
pid can be reused. So each party records its pid and its start time (``/proc/PID/stat`` field 22, clock ticks
after boot) in the segment, and a waiter that suspects its peer compares both and looks at the state letter.
Only the slow path (a waiter asleep for a while) calls these. ``Watch`` keeps a pidfd (Linux 5.3+) per peer once
the peer has been checked, so the periodic check of an idle waiter is one ``poll`` instead of reading and parsing
``/proc`` (it matters for the idle CPU cost: every sleeping reader checks its writer four times a second).
"""
from __future__ import annotations

import os
import select


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (field 3 first), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) is in parentheses and may contain spaces or ')': split after the last ')'
    return data[data.rindex(b")") + 2:].split()


def start_time(pid: int | None = None) -> int:
    """Start time of ``pid`` (default: this process) in clock ticks after boot; 0 if unknown."""
    fields = stat_fields(os.getpid() if pid is None else pid)
    try:
        return int(fields[19]) if fields else 0
    except (IndexError, ValueError):
        return 0


def session(pid: int) -> int | None:
    """The session id of ``pid`` (field 6), readable even for a zombie; None if it is gone."""
    fields = stat_fields(pid)
    try:
        return int(fields[3]) if fields else None
    except (IndexError, ValueError):
        return None


def age_s(pid: int | None = None) -> float:
    """Seconds since ``pid`` (default: this process) started, exact to a clock tick (psutil's create_time rounds
    the boot time and can be off by up to a second); 0.0 if unknown."""
    started = start_time(pid)
    if not started:
        return 0.0
    import time

    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK"))


def alive(pid: int, start: int = 0) -> bool:
    """False if ``pid`` is gone, a zombie, or (when ``start`` is known) a different process that reuses the pid."""
    if pid <= 0:
        return True  # never recorded: nothing to say
    fields = stat_fields(pid)
    if fields is None:
        if os.path.isdir("/proc/self"):
            return False
        return _kill0(pid)  # no procfs here: the best we can do
    try:
        state, started = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return _kill0(pid)
    if state in _ENDED:
        return False
    return not start or started == start


PF_EXITING = 0x4  # include/linux/sched.h: set at the start of the kernel's do_exit
_ENDED = (b"Z", b"X", b"x")  # zombie, dead (field 3 of /proc/PID/stat)


def _exiting(fields: list[bytes]) -> bool:
    """Ended, or marked exiting by the kernel (its flags, field 9). Raises IndexError/ValueError on odd fields."""
    return fields[0] in _ENDED or bool(int(fields[6]) & PF_EXITING)


def exit_status(pid: int, start: int = 0) -> int | None:
    """The wait status of ``pid`` once it has begun to exit, before it is reaped; None while it runs, once it is
    gone, or if ``start`` says the pid is another process now.

    The kernel's do_exit sets PF_EXITING (field 9) and the exit code (field 52, waitpid's format) before it tears
    the process down (its memory, then its descriptors: a CUDA context's teardown can take tens of ms), and keeps
    both readable until the parent reaps it. So a process's end can be read here as soon as it is certain, without
    waiting for the teardown and for a forkserver to pass the status on."""
    fields = stat_fields(pid)
    try:
        if fields is None or (start and int(fields[19]) != start):
            return None
        return int(fields[49]) if _exiting(fields) else None
    except (IndexError, ValueError):  # a kernel before 3.5 has no exit_code field
        return None


def leaving(pid: int, start: int = 0) -> bool:
    """True if ``pid`` is gone, a zombie, or already on its way out: the kernel marks a process exiting (its flags,
    field 9 of /proc/PID/stat) before it closes its descriptors, so a peer that sees its socket reset (and answers
    with that error) can never find the process still looking alive here."""
    if pid <= 0:
        return False  # never recorded: nothing to say
    fields = stat_fields(pid)  # read once: alive() and the flags from the same moment
    if fields is None:
        return os.path.isdir("/proc/self") or not _kill0(pid)
    try:
        return bool(start and int(fields[19]) != start) or _exiting(fields)
    except (IndexError, ValueError):
        return not _kill0(pid)


def _kill0(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Watch:
    """Liveness of one peer process, checked cheaply again and again. ``close()`` releases the pidfd."""

    def __init__(self, pid: int, start: int = 0) -> None:
        self.pid, self.start = pid, start
        self._fd: int | None = None
        self._dead = False

    def alive(self) -> bool:
        if self._dead:
            return False
        if self._fd is None:
            if not alive(self.pid, self.start):  # the full check once: zombie, reused pid
                self._dead = True
                return False
            self._fd = _pidfd(self.pid)
            if self._fd is None:
                return True
            if not alive(self.pid, self.start):  # it may have died (and the pid been reused) before the open
                self.close()
                self._dead = True
                return False
            return True
        if self._fd < 0:
            return alive(self.pid, self.start)
        readable, _, _ = select.select([self._fd], [], [], 0)  # a pidfd turns readable when the process exits
        if readable:
            self._dead = True
            self.close()
        return not self._dead

    def close(self) -> None:
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, -1 where pidfds are not available, None if ``pid`` is gone."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return -1
    try:
        return opener(pid)
    except ProcessLookupError:
        return None
    except OSError:
        return -1
