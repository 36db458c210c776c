"""Each ring end's cursor and its hot path: compiled (transport/_ringfast.c) where it was built, Python otherwise.

A cursor holds where this end is in the ring (the writer's ``w``, ``slot``, ``limit``; a reader's ``c``, ``slot``)
and does the one common case in a single call: the writer's ``put(pickle)`` publishes a bare pickle that fits a
slot of a ring with room; a reader's ``take()`` returns the next message when it is such a pickle, ``EMPTY`` when
nothing is there, ``SLOW`` otherwise. Everything else (frames, streams, waiting, sleeping, timeouts, corruption
and its error messages) stays in transport/writer.py and transport/reader.py, which read and move the same cursor
while they hold the ring's lock and set ``busy`` (a fast call refuses while it is set). ``closed`` is set before
the mapping goes away.

Why compiled: on a small round trip each enqueue and dequeue was ~40 bytecodes of word loads and stores, as much
time as pickling the message (H200 host: 8 of a round trip's 16 us; scripts/profile_transport.py prints the
split). The C version is the same steps, the same words, the same fences, run as one call under the GIL; it also
unpickles from a private copy, so no Python code runs while it holds a slot.

The C module is built by ``pip install`` where a compiler is there (setup.py marks it optional); without it, or
with ``RV_TRANSPORT_PURE=1`` in the environment (read when a ring end is made), the Python classes below do the
same. ``IMPLEMENTATION`` names the one a new ring end gets.
"""
from __future__ import annotations

import os
import pickle
import time
import weakref

from transport import _sync, layout as L

try:
    from transport import _ringfast
except ImportError:  # not built here (no compiler at install time): the Python cursors below
    _ringfast = None

EMPTY = _ringfast.EMPTY if _ringfast is not None else object()
SLOW = _ringfast.SLOW if _ringfast is not None else object()
MAX_COPY = 64 << 10  # take() copies a pickle this size or smaller out of the ring; bigger ones unpickle in place
_MASK = L.MASK
_PICKLED = L.PICKLED
_W_PUB = L.OFF_PUB // 4
_W_SLEEPERS = L.OFF_SLEEPERS // 4
_W_WRITER_SLEEPING = L.OFF_WRITER_SLEEPING // 4
_W_WAKE_TARGET = L.OFF_WAKE_TARGET // 4
_W_CLOSED = L.OFF_CLOSED // 4
_NEED_ORDER_FENCES = _sync.NEED_ORDER_FENCES
_full_fence = _sync.full_fence
_loads = pickle.loads
_perf_ns = time.perf_counter_ns
_yield = os.sched_yield


def compiled() -> bool:
    """True if new ring ends get the compiled cursor."""
    return _ringfast is not None and os.environ.get("RV_TRANSPORT_PURE", "") in ("", "0")


def implementation() -> str:
    return "compiled" if compiled() else "python"


class PyWriterCursor:
    """The writer's cursor in Python: the same state, ``put`` and ``publish`` as _ringfast.Writer."""

    __slots__ = ("_mv", "_W", "_slot_bytes", "_nslots", "_metas", "_datas", "_consumed", "_rwake", "_light",
                 "_always_wake", "_wake", "w", "limit", "slot", "busy", "closed")

    def __init__(self, mv, W, slot_bytes, nslots, metas, datas, consumed, rwake, limit, light, always_wake, wake):
        self._mv, self._W, self._wake = mv, W, wake
        self._slot_bytes, self._nslots = slot_bytes, nslots
        self._metas = [m // 4 for m in metas]
        self._datas = list(datas)
        self._consumed = [cw // 4 for cw in consumed]
        self._rwake, self._light, self._always_wake = rwake, light, always_wake
        self.w, self.limit, self.slot, self.busy, self.closed = 0, limit, 0, 0, 0

    def put(self, main) -> bool:
        n = len(main)
        if self.busy or self.closed or n > self._slot_bytes:
            return False
        w, W = self.w, self._W
        if w >= self.limit:
            lag = 0
            for cw in self._consumed:
                d = (w - W[cw]) & _MASK
                if d > lag:
                    lag = d
            if lag > self._nslots:
                return False  # an impossible counter: the Python path reads it again and says so
            self.limit = w - lag + self._nslots
            if w >= self.limit:
                return False
        off = self._datas[self.slot]
        self._mv[off:off + n] = main
        self.publish(n, _PICKLED)
        return True

    def publish(self, length: int, kind: int) -> None:
        """Chunk ``w``'s record (its payload is in the current slot), then pub = w + 1, then wake sleeping readers.
        Also the Python paths' publish of a slot they filled (they hold the cursor)."""
        W, w, s = self._W, self.w, self.slot
        m = self._metas[s]
        W[m] = w & _MASK
        W[m + 1] = length
        W[m + 2] = kind
        if _NEED_ORDER_FENCES:
            _sync.release_fence()  # payload and record before pub
        w += 1
        W[_W_PUB] = w & _MASK
        self.w = w
        self.slot = s + 1 if s + 1 < self._nslots else 0
        if not self._light:
            _full_fence()  # store(pub) -> load(sleepers): Dekker with the reader's announce-then-check
        if W[_W_SLEEPERS] or self._always_wake:
            wake = self._wake()  # the ring's (a weak reference: no cycle), which never touches a closed mapping
            if wake is not None:
                wake(self._rwake)


class PyReaderCursor:
    """A reader's cursor in Python: the same state, ``take`` and ``spin`` as _ringfast.Reader."""

    __slots__ = ("_mv", "_W", "_slot_bytes", "_nslots", "_metas", "_datas", "_cw", "_wwake", "_light",
                 "_always_wake", "_loads", "_max_copy", "_wake", "c", "slot", "busy", "closed")
    spinning = 0  # its spin holds the GIL between polls and reads a memoryview: an unmap cannot crash it

    def __init__(self, mv, W, slot_bytes, nslots, metas, datas, consumed, wwake, light, always_wake, loads,
                 max_copy, wake):
        self._mv, self._W, self._wake = mv, W, wake
        self._slot_bytes, self._nslots = slot_bytes, nslots
        self._metas = [m // 4 for m in metas]
        self._datas = list(datas)
        self._cw = consumed // 4
        self._wwake, self._light, self._always_wake = wwake, light, always_wake
        self._loads, self._max_copy = loads, max_copy
        self.c, self.slot, self.busy, self.closed = 0, 0, 0, 0

    def take(self):
        if self.busy or self.closed:
            return SLOW
        W, c = self._W, self.c
        pub = W[_W_PUB]
        if pub == c:
            return EMPTY
        if (pub - c) & _MASK > self._nslots:
            return SLOW
        if _NEED_ORDER_FENCES:
            _sync.acquire_fence()  # pub before the record and payload
        s = self.slot
        m = self._metas[s]
        length = W[m + 1]
        off = self._datas[s]
        mv = self._mv
        if (W[m + 2] != _PICKLED or W[m] != c or not 3 <= length <= self._slot_bytes or length > self._max_copy
                or mv[off] != 0x80 or mv[off + length - 1] != 0x2E):
            return SLOW
        copy = bytes(mv[off:off + length])
        if _NEED_ORDER_FENCES:
            _sync.release_fence()  # our copy is complete before the writer may reuse the slot
        c = (c + 1) & _MASK
        W[self._cw] = c
        self.c = c
        self.slot = s + 1 if s + 1 < self._nslots else 0
        if not self._light:
            _full_fence()  # store(consumed) -> load(writer_sleeping)
        if (W[_W_WRITER_SLEEPING] and (c - W[_W_WAKE_TARGET]) & _MASK < 0x80000000) or self._always_wake:
            wake = self._wake()  # the ring's (a weak reference: no cycle), which never touches a closed mapping
            if wake is not None:
                wake(self._wwake)
        return self._loads(copy)

    def spin(self, window_ns: int, yields: bool, lost_ns: int) -> int:
        """1 news, 0 the window passed, 2 a yield lost the CPU for ``lost_ns`` or more, 3 closed."""
        W, c = self._W, self.c
        perf = _perf_ns
        t = perf()
        end = t + window_ns
        while True:
            if W[_W_PUB] != c:
                return 1
            if W[_W_CLOSED]:
                return 3
            if yields:
                _yield()
                now = perf()
                if lost_ns > 0 and now - t >= lost_ns:
                    return 1 if W[_W_PUB] != c else 2
                if now >= end:
                    return 0
                t = now
            elif perf() >= end:
                return 0


def writer_cursor(ring, limit: int):
    """The cursor for a writer end whose views and offsets ``ring._bind()`` has cached."""
    lay = ring.layout
    metas = [lay.slot_meta(i) for i in range(lay.n_slots)]
    consumed = [lay.reader(r) + L.R_CONSUMED for r in range(lay.n_readers)]
    if compiled():
        return _ringfast.Writer(ring._base, lay.slot_bytes, lay.n_slots, metas, ring._datas, consumed, L.OFF_PUB,
                                L.OFF_SLEEPERS, L.OFF_RWAKE, limit, ring._light, ring._always_wake)
    return PyWriterCursor(ring._mv, ring._W, lay.slot_bytes, lay.n_slots, metas, ring._datas, consumed,
                          ring._rwake, limit, ring._light, ring._always_wake, weakref.WeakMethod(ring._wake))


def reader_cursor(ring, rank: int):
    """The cursor for reader ``rank`` of a ring whose views and offsets ``ring._bind()`` has cached."""
    lay = ring.layout
    metas = [lay.slot_meta(i) for i in range(lay.n_slots)]
    consumed = lay.reader(rank) + L.R_CONSUMED
    if compiled():
        return _ringfast.Reader(ring._base, lay.slot_bytes, lay.n_slots, metas, ring._datas, consumed, L.OFF_PUB,
                                L.OFF_WRITER_SLEEPING, L.OFF_WAKE_TARGET, L.OFF_WWAKE, ring._light,
                                ring._always_wake, _loads, MAX_COPY, ring._seg.map)
    return PyReaderCursor(ring._mv, ring._W, lay.slot_bytes, lay.n_slots, metas, ring._datas, consumed,
                          ring._wwake, ring._light, ring._always_wake, _loads, MAX_COPY, weakref.WeakMethod(ring._wake))

