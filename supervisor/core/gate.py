"""A gate in front of a group: calls pass while it is open; a restart or recycle closes it and drains in-flight
calls first, so no call is sent to a group that is going away and none is lost by a planned restart."""
from __future__ import annotations

import threading
import time


class GroupGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = False
        self._inflight = 0
        self.closed_reason = "starting"

    def open(self) -> None:
        with self._cond:
            self._open = True
            self.closed_reason = ""
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        with self._cond:
            self._open = False
            self.closed_reason = reason
            self._cond.notify_all()

    @property
    def is_open(self) -> bool:
        return self._open

    def enter(self, deadline: float | None, wait: bool) -> bool:
        """Count a call in. False if the gate is closed and we may not (or can no longer) wait for it."""
        with self._cond:
            while not self._open:
                if not wait:
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

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()
