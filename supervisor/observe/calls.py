"""Calls in flight and calls done, as seen from the API: which call each rank is on and for how long (the status
table), latency by method and failures by kind (the metrics), and a short latency history (the live page).

Fed by one hook in ``Supervisor._send`` (``sent``); a call reports its own end through its Future's done-callback,
so nobody has to remember to. Cheap on the hot path: a dict insert and a callback per call, under one lock.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

# A call nobody ever completes (an old-style call object without a done-callback) must not grow the table forever.
MAX_IN_FLIGHT = 10_000
HISTORY = 2_000  # finished calls kept for the page's latency chart

Sink = Callable[[str, float, "str | None"], None]  # (method, seconds, failure kind or None)


class CallStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[int, str, float, Any]] = {}  # id(call) -> (group, method, t0, call)
        self.history: deque[tuple[float, str, float, str | None]] = deque(maxlen=HISTORY)  # (unix, method, s, kind)
        self._sinks: list[Sink] = []

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks = [*self._sinks, sink]

    def remove_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    def sent(self, group: int, call: Any, started: float | None = None) -> None:
        """A call was broadcast to ``group`` (its ``method_name``, ``expected`` and ``missing()`` are read later).
        ``started``: the ``time.monotonic()`` taken before the broadcast (a call's latency includes the send, and
        a rank may be done before this is called); now if not given."""
        with self._lock:
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                self._in_flight.pop(next(iter(self._in_flight)))
            self._in_flight[id(call)] = (group, call.method_name, time.monotonic() if started is None else started,
                                         call)
        on_done = getattr(call, "add_done_callback", None)
        if on_done is not None:
            on_done(self._done)

    def _done(self, call: Any) -> None:
        error = None if call.cancelled() else call.exception()
        self.finished(call, error)

    def finished(self, call: Any, error: BaseException | None = None) -> None:
        with self._lock:
            entry = self._in_flight.pop(id(call), None)
            sinks = self._sinks
        if entry is None:
            return
        _, method, t0, _ = entry
        seconds = time.monotonic() - t0
        kind = None if error is None else type(error).__name__
        self.history.append((time.time(), method, seconds, kind))
        for sink in sinks:
            sink(method, seconds, kind)

    def in_progress(self, group: int, local_rank: int) -> tuple[str, float] | None:
        """The oldest call to ``group`` that ``local_rank`` has not answered yet: (method, seconds so far)."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._in_flight.values())
        for g, method, t0, call in entries:  # insertion order: oldest first
            if g == group and local_rank in _missing(call):
                return method, now - t0
        return None


def _missing(call: Any) -> tuple[int, ...]:
    try:
        return call.missing()
    except Exception:  # a call object of another shape: say nothing rather than fail the status view
        return ()
