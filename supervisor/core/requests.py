"""Requests in flight per dp group: the unit a planned stop waits for.

A request is several calls to one group that only make sense together -- a generation is a prefill and then
decode steps that read the KV cache the prefill built. A call gate (gate.py) drains calls; it cannot know that a
decode step is still to come. So a planned stop of a group (a rolling restart, a recycle) and a shutdown with a
drain window first stop *admitting* requests, wait for the ones in flight to finish, and only then close the gates::

    serving layer: admit(g) ──> calls to g ... ──> finish(g)        (supervisor/serving.py, one thread per request)
    recycle of g:  close(g) ──> wait_idle([g]) ──> gate: close, drain, settle, stop, start ──> reopen(g)
    shutdown(drain): close() ──> wait_idle(all) ──> gates closed, calls settled ──> stop
                     meanwhile new calls are refused, except those of a request in flight (carries(g))
"""
from __future__ import annotations

import threading
import time

_WAIT_SLICE_S = 0.05  # waits wake this often to notice a cancel (a second signal)


class Requests:
    def __init__(self, groups: int) -> None:
        self._cond = threading.Condition()
        self._inflight = [0] * groups
        self._closed: set[int] = set()
        self._all_closed = False
        self._draining = False  # a shutdown's drain window: calls of admitted requests still pass
        self._local = threading.local()  # the group whose request this thread is running, if any

    # -- the serving layer ---------------------------------------------------------------------------------------
    def admit(self, group: int) -> bool:
        """Count a request in on ``group`` for the calling thread; False while that group (or all) admits none."""
        with self._cond:
            if self._all_closed or group in self._closed:
                return False
            self._inflight[group] += 1
            self._local.group = group
            return True

    def finish(self, group: int) -> None:
        with self._cond:
            self._inflight[group] -= 1
            if getattr(self._local, "group", None) == group:
                self._local.group = None
            self._cond.notify_all()

    def carries(self, group: int) -> bool:
        """During a shutdown's drain window: the calling thread runs a request admitted to ``group`` (so its
        next call is part of work in flight, not a new call)."""
        return self._draining and getattr(self._local, "group", None) == group

    def in_flight(self, group: int | None = None) -> int:
        with self._cond:
            return sum(self._inflight) if group is None else self._inflight[group]

    # -- the manager -----------------------------------------------------------------------------------------------
    def close(self, group: int | None = None, draining: bool = False) -> None:
        """Admit no new request on ``group`` (None: on any group, for good; ``draining``: a shutdown's drain)."""
        with self._cond:
            if group is None:
                self._all_closed = True
                self._draining = draining
            else:
                self._closed.add(group)

    def reopen(self, group: int) -> None:
        with self._cond:
            self._closed.discard(group)

    def end_drain(self) -> None:
        with self._cond:
            self._draining = False

    def wait_idle(self, groups: list[int], timeout: float, cancel: threading.Event | None = None) -> bool:
        """Until no request is in flight on ``groups``; False if ``timeout`` passed or ``cancel`` was set first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(self._inflight[g] for g in groups):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (cancel is not None and cancel.is_set()):
                    return False
                self._cond.wait(min(_WAIT_SLICE_S, remaining))
            return True
