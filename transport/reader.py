"""A reader end of a ring: attaches to the writer's segment, takes chunks in order, hands each slot back.

::

    dequeue() --cursor.take: a small bare pickle?--yes--> copy it out, release the slot, unpickle the copy
                       |nothing yet: spin (cursor.spin), take again
                       |anything else
                       v
                _dequeue_frame (ring's lock, cursor busy) --PICKLED--> unpickle in place, release
                       |WHOLE--> _read_whole: copy the frame out, release, decode
                       |FIRST
                       v
                _read_stream: gather FIRST .. LAST chunks into one buffer, releasing each slot as it is copied

The hot path is the cursor's ``take`` (transport/cursor.py: compiled where it was built). Extension points for
subclasses (transport/zero_copy.py): ``_read_whole(data, length)`` decides how a one-slot frame leaves the ring,
``_release()`` hands the current chunk back (``_advance()`` moves the cursor, ``_store_consumed(c)`` tells the
writer). ``take`` releases slots its own way: a subclass that changes how slots are released overrides
``dequeue`` to go through ``_dequeue_frame`` (as ZeroCopyReader does).

``close()`` by any party closes the queue for every party (it is how a shutdown wakes everyone). Messages
already published stay readable. A ``dequeue`` that times out (or is cancelled) in the middle of a multi-slot
message keeps the part it gathered, and the next ``dequeue`` goes on with it: a message is delivered whole,
never in part, and never lost to a timeout.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import threading
import time
from typing import Any

from transport import _proc, _sync, codec, cursor, layout as L, shm
from transport.errors import CorruptMessage, QueueClosed, QueueTimeout
from transport.ring import _YIELD_LOST_S, Handle, Ring, _release_view

_REUSE_MIN = 256 << 10  # frames of this size and up are recycled (see _frame)
_REUSE_MAX = 64 << 20
_REUSE_COUNT = 3
_MASK = L.MASK
_W_PUB = L.OFF_PUB // 4
_W_WRITER_SLEEPING = L.OFF_WRITER_SLEEPING // 4
_W_WAKE_TARGET = L.OFF_WAKE_TARGET // 4
_WHOLE = L.WHOLE
_PICKLED = L.PICKLED
_FIRST = L.FIRST
_LAST = L.LAST
_NEED_ORDER_FENCES = _sync.NEED_ORDER_FENCES
_full_fence = _sync.full_fence
_loads = pickle.loads
_mono = time.monotonic
_EMPTY, _SLOW = cursor.EMPTY, cursor.SLOW
_SLEEP = object()  # dequeue: spun in vain, go to sleep without spinning again
_SPIN_NEWS, _SPIN_LOST = 1, 2  # cursor.spin's answers (0: the window passed; 3: closed)
_YIELD_LOST_NS = int(_YIELD_LOST_S * 1e9)


def _no_announce(on: bool) -> None:
    """A sleep whose waker always wakes needs not say that it sleeps."""


class RingReader(Ring):
    """Reader ``reader_rank`` (0-based) of a ring. ``MessageQueue.create_from_handle`` builds one."""

    is_writer = False

    def __init__(self, handle: Handle, reader_rank: int, *, _fences: str = "auto") -> None:
        self._init_common(_fences)
        self._seg = shm.attach(handle.name, handle.size, handle.writer_pid, handle.fd)
        try:
            head = L.read_geometry(self._seg.map, handle.size)
            if not 0 <= reader_rank < head.layout.n_readers:
                raise ValueError(f"reader_rank {reader_rank} out of range 0..{head.layout.n_readers - 1}")
        except BaseException:
            self._seg.map.close()
            raise
        self.layout, self.writer_pid, self.writer_start = head.layout, head.writer_pid, head.writer_start
        self.max_message = head.max_message
        self.reader_rank = reader_rank
        self.spin_us = handle.spin_us
        self.spin_yield, self.spin_adaptive = handle.spin_yield, handle.spin_adaptive
        self._spare: list = []  # recent big frame buffers, reused once nothing references them (_frame)
        self._partial: tuple | None = None  # (frame, bytes gathered, total) of a stream a wait left part-way
        self._before_attach()
        self._bind()
        self._cur = cursor.reader_cursor(self, reader_rank)  # c: chunks consumed, mod 2**32
        self._make_hold()
        self._cw = self._consumed_words[reader_rank]
        self._announce_attached()

    @property
    def _c(self) -> int:
        return self._cur.c

    @_c.setter
    def _c(self, c: int) -> None:
        self._cur.c = c

    def _before_attach(self) -> None:
        """What a subclass must record in its reader record before the writer may see it attached."""

    def _announce_attached(self) -> None:
        rec = self.layout.reader(self.reader_rank)
        struct.pack_into("<IQ", self._mv, rec + L.R_PID, os.getpid(), _proc.start_time())
        self._W[(rec + L.R_ATTACHED) // 4] = 1
        _sync.full_fence()
        if all(self._attached()):
            self._seg.unlink()  # the last reader in removes the name: nothing can leak from now on
        _sync.fetch_add(self._wwake)
        _sync.futex_wake(self._wwake)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """A reader is ready once it exists."""

    def wait_all_attached(self, timeout: float | None = None) -> None:
        """Block until every reader of the ring has attached: a reader's half of a collective readiness (every
        attach bumps and wakes the futex word ``wwake``, so this sleep needs no announcement)."""
        self._sleep_until(lambda: all(self._attached()), self._wwake, None if timeout is None else _mono() + timeout,
                          None, self._unattached, "wait_until_ready", _no_announce)

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        raise RuntimeError("enqueue on a reader end of the queue")

    # -- receiving ---------------------------------------------------------------------------------------------
    def dequeue(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Any:
        """Receive the next message. Raises QueueTimeout, QueueClosed (closed or ``cancel`` set), PeerDied
        (the writer is gone) or CorruptMessage. A message is returned whole or not at all."""
        cur = self._cur
        try:
            msg = cur.take()
            if msg is _EMPTY and self._spin_s and self._should_spin():
                got = cur.spin(self._spin_ns, self._spin_yields, _YIELD_LOST_NS)
                if got == _SPIN_LOST:
                    self._spin_score *= 0.5  # see Ring._spin: something outside the ring holds the cores
                self._spun(got == _SPIN_NEWS)
                msg = cur.take() if got == _SPIN_NEWS else _SLEEP
        except Exception as exc:  # the copy of a message that does not unpickle: its slot is released already
            if self._closed_here:  # closed by another thread meanwhile (the Python cursor's views are released)
                raise QueueClosed("queue closed") from None
            raise CorruptMessage(f"cannot unpickle message: {type(exc).__name__}: {exc}") from exc
        if msg is _EMPTY or msg is _SLOW or msg is _SLEEP:
            return self._dequeue_slow(timeout, cancel, spin=msg is not _SLEEP)
        return msg

    def _dequeue_slow(self, timeout, cancel, spin: bool) -> Any:
        with self._hold:
            if self._closed_here:
                raise QueueClosed("queue closed")
            return self._dequeue_frame(timeout, cancel, spin)

    @contextlib.contextmanager
    def borrow(self, timeout: float | None = None, cancel: threading.Event | None = None):
        """The next chunk's payload as a memoryview into the ring, whatever it holds; the slot is handed back when
        the block exits. For callers that frame their own bytes (transport/compat/vllm.py's ``acquire_read``)."""
        with self._hold:
            if self._closed_here:
                raise QueueClosed("queue closed")
            _, length, data = self._next_chunk(None if timeout is None else _mono() + timeout, cancel)
            view = self._mv[data:data + length]
            try:
                yield view
            finally:
                _release_view(view)
                self._release()

    def _dequeue_frame(self, timeout, cancel, spin: bool = True) -> Any:
        """The next message, whatever it is: a bare pickle (unpickled in place), a one-slot frame, a stream of
        chunks, stray tails, corruption. ``spin=False``: the caller has just spun; sleep at once if nothing is
        there yet."""
        deadline = None if timeout is None else _mono() + timeout
        while True:
            kind, length, data = self._next_chunk(deadline, cancel, spin)
            spin = True
            partial, self._partial = self._partial, None  # a stream left part-way: continued below, or torn
            if kind == _PICKLED:
                view = self._mv[data:data + length]
                try:
                    codec.check_pickle(view)
                    return _loads(view)
                except CorruptMessage:
                    raise
                except Exception as exc:
                    raise CorruptMessage(f"cannot unpickle message: {type(exc).__name__}: {exc}") from exc
                finally:
                    view.release()
                    self._release()
            if kind == _WHOLE:
                return self._read_whole(data, length)
            if not kind & _FIRST:
                if partial is None:  # the tail of a message whose writer gave up: skip it
                    self._release()
                    continue
                frame = self._gather(*partial, length, data, deadline, cancel)  # an earlier wait timed out in it
            else:
                frame = self._read_stream(data, length, deadline, cancel)
            if frame is not None:
                return codec.decode(frame)

    def _next_chunk(self, deadline, cancel, spin: bool = True) -> tuple[int, int, int]:
        """Wait for chunk ``consumed`` and return its (kind, length, data offset), checked."""
        W, cur = self._W, self._cur
        c = cur.c
        if W[_W_PUB] == c:
            self._await_chunk(c, deadline, cancel, spin)
        if _NEED_ORDER_FENCES:
            _sync.acquire_fence()  # pub before the record and payload
        d = (W[_W_PUB] - c) & _MASK
        if d > self._nslots:
            raise CorruptMessage(f"ring counter says {d} chunks are pending in a ring of {self._nslots} slots")
        s = cur.slot
        m = self._metas[s]
        seq, length, kind = W[m], W[m + 1], W[m + 2]
        L.check_chunk(seq, length, kind, c, self._slot_bytes)
        return kind, length, self._datas[s]

    def _read_whole(self, data: int, length: int) -> Any:
        """A one-slot codec frame (it has out-of-band buffers): one copy, so that arrays can keep pointing at
        it after the slot is reused."""
        try:
            if length < _REUSE_MIN:
                frame = bytearray(self._mv[data:data + length])  # no zero-fill; arrays will point into it
            else:
                frame = self._frame(length)
                memoryview(frame).cast("B")[:] = self._mv[data:data + length]
        finally:
            self._release()
        return codec.decode(frame)

    def _read_stream(self, data, length, deadline, cancel):
        """Gather a multi-slot frame. Returns None if the message turned out torn (a new FIRST arrived)."""
        mv = self._mv
        total = codec.frame_length(mv[data:data + length], self.max_message)
        if total <= length:
            raise CorruptMessage(f"a {total}-byte frame does not need more than one {length}-byte chunk")
        return self._gather(self._frame(total), 0, total, length, data, deadline, cancel)

    def _gather(self, frame, got: int, total: int, length: int, data: int, deadline, cancel):
        """Copy chunks into ``frame`` from byte ``got`` on, the first at ``data``, until ``total`` bytes. A wait that
        times out or is cancelled between two chunks keeps what was gathered (``_partial``): the next dequeue goes
        on from there, so a message is never lost to a timeout part-way through it."""
        mv = self._mv
        fv = memoryview(frame).cast("B")
        while True:
            if got + length > total:
                self._release()
                raise CorruptMessage(f"message chunks exceed the announced {total} bytes")
            fv[got:got + length] = mv[data:data + length]
            got += length
            self._release()
            if got == total:
                return frame
            try:
                kind, length, data = self._next_chunk(deadline, cancel)
            except (QueueTimeout, QueueClosed):
                self._partial = (frame, got, total)
                raise
            if kind & _FIRST:
                return None  # torn: the writer started over; this chunk is read again as a new message
            if kind & _LAST and got + length != total:
                self._release()
                raise CorruptMessage(f"message ended after {got + length} of {total} bytes")

    def _frame(self, n: int):
        """A buffer for an ``n``-byte frame. Big frames reuse one of the last few this reader handed out once
        nothing references it any more (the arrays decoded from it are gone): a fresh big allocation costs page
        faults and a zero-fill of every page, as much CPU as the copy itself."""
        if n < _REUSE_MIN:
            return codec.alloc(n)
        spare = self._spare
        for i in range(len(spare)):
            # 2 = the list's reference + getrefcount's argument: no array, view or memoryview holds it
            if len(spare[i]) == n and sys.getrefcount(spare[i]) == 2:
                buf = spare.pop(i)
                spare.append(buf)
                return buf
        buf = codec.alloc(n)
        if n <= _REUSE_MAX:
            spare.append(buf)
            if len(spare) > _REUSE_COUNT:
                del spare[0]
        return buf

    # -- handing slots back ------------------------------------------------------------------------------------
    def _release(self) -> None:
        """Hand the current chunk back to the writer."""
        self._advance()
        self._store_consumed(self._cur.c)

    def _advance(self) -> None:
        """Move past the current chunk (this process's cursor only)."""
        cur = self._cur  # its attributes, not this class's properties over them: every chunk of a slow path comes here
        cur.c = (cur.c + 1) & _MASK
        s = cur.slot + 1
        cur.slot = s if s < self._nslots else 0

    def _store_consumed(self, c: int) -> None:
        """Tell the writer that every chunk below ``c`` is released; wake it if it waits for that."""
        W = self._W
        if _NEED_ORDER_FENCES:
            _sync.release_fence()  # our copy of the payload is complete before the writer may reuse the slot
        W[self._cw] = c
        if not self._light:
            _full_fence()  # store(consumed) -> load(writer_sleeping)
        if (W[_W_WRITER_SLEEPING] and (c - W[_W_WAKE_TARGET]) & _MASK < 0x80000000) or self._always_wake:
            self._wake(self._wwake)  # zero_copy's finalizers get here from any thread, outside the ring's lock

    # -- waiting -----------------------------------------------------------------------------------------------
    def _await_chunk(self, c: int, deadline, cancel, spin: bool = True) -> None:
        W = self._W
        if spin and self._spin_s and self._should_spin():
            self._spun(self._spin(lambda: W[_W_PUB] != c))
            if W[_W_PUB] != c:
                return
        self._sleep_until(lambda: W[_W_PUB] != c, self._rwake, deadline, cancel, tuple, "dequeue",
                          self._reader_sleeping)

    def _reader_sleeping(self, on: bool) -> None:
        _sync.fetch_add(self._sleepers, 1 if on else -1)  # atomic, and a full fence: store -> load(pub)
        if on and self._heavy:
            _sync.heavy_fence()  # ... also on the writer's CPU, whose publish path has no fence

    def _check_peer(self, pending) -> None:
        self._peer_died(self.writer_pid, self.writer_start, 0, f"writer process {self.writer_pid} died")
