"""A gate in front of a group: calls pass while it is open; a restart or recycle closes it and drains in-flight
calls first, so no call is sent to a group that is going away and none is lost by a planned restart."""
from __future__ import annotations

import enum
import threading
import time


class Closed(enum.Enum):
    """Why a gate is closed; the value is the word used in error messages ("group 1 is restarting")."""

    STARTING = "starting"
    RESTARTING = "restarting"
    RECYCLING = "recycling"
    FAILED = "failed"
    REMOVED = "removed"
    GAVE_UP = "gave up"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        """No call will pass this gate again: waiting for it is pointless."""
        return self in (Closed.FAILED, Closed.REMOVED, Closed.GAVE_UP, Closed.STOPPED)

    def __str__(self) -> str:
        return self.value


class GroupGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = False
        self._inflight = 0
        self.closed_reason: Closed | None = Closed.STARTING  # None while open

    def open(self) -> None:
        with self._cond:
            self._open = True
            self.closed_reason = None
            self._cond.notify_all()

    def close(self, reason: Closed) -> None:
        with self._cond:
            self._open = False
            self.closed_reason = reason
            self._cond.notify_all()

    @property
    def is_open(self) -> bool:
        return self._open

    def enter(self, deadline: float | None, wait: bool) -> bool:
        """Count a call in. False if the gate is closed and we may not (or can no longer) wait for it: a gate
        closed for good (failed, removed, gave up, stopped) is never waited on, and closing it wakes every
        waiter, so a call that races a give-up or a stop fails at once instead of waiting on a gate nobody opens."""
        with self._cond:
            while not self._open:
                if not wait or self.closed_reason is not None and self.closed_reason.final:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._inflight += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no call is in flight (the gate should be closed first). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_open(self, timeout: float | None) -> bool:
        """Block until the gate is open (True), it closed for good, or ``timeout`` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._open:
                remaining = None if deadline is None else deadline - time.monotonic()
                if self.closed_reason is not None and self.closed_reason.final or \
                        remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()
