"""The writer end of a ring: creates the segment, publishes chunks, waits for space.

::

    enqueue(obj) --pickle--> bare pickle, one slot, room? --yes--> cursor.put: copy into slot w, record, pub = w + 1
                  |                 |no
                  |                 v
                  |          _enqueue_slow (ring's lock, cursor busy): wait for room --> _publish(PICKLED)
                  |                 |bigger than a slot
                  |out-of-band      v
                  |buffers---> codec frame (ring's lock, cursor busy) --fits a slot--> publish(WHOLE)
                                    |no
                                    v
                             _put_stream: FIRST .. middle .. LAST chunks, each published when full

The hot path is the cursor's ``put`` (transport/cursor.py: compiled where it was built), the same steps as
``_publish``: keep the two in step.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import time
from typing import Any

from transport import _proc, _sync, codec, cursor, layout as L, shm
from transport.defaults import MAX_MESSAGE_BYTES, SLOT_BYTES, SLOTS
from transport.errors import CorruptMessage, QueueClosed
from transport.ring import Ring, _release_view

# A writer on a full ring spins like any other waiter (then sleeps until half the ring is free). Not spinning
# there (the readers have a backlog, so it is a throughput situation) measured no better, and worse for small
# messages; the adaptive policy stops the spinning where it keeps failing anyway.
_SPIN_ON_FULL = True
_MASK = L.MASK
_W_WRITER_SLEEPING = L.OFF_WRITER_SLEEPING // 4
_W_WAKE_TARGET = L.OFF_WAKE_TARGET // 4
_WHOLE = L.WHOLE
_PICKLED = L.PICKLED
_FIRST = L.FIRST
_LAST = L.LAST
_dumps = codec.dumps
_pdumps = pickle.dumps
_modules = sys.modules
_mono = time.monotonic


class RingWriter(Ring):
    """The one writer of a ring. ``MessageQueue(n_reader, ...)`` builds one (transport/message_queue.py)."""

    is_writer = True
    reader_rank = None

    def __init__(
        self,
        n_reader: int,
        max_chunk_bytes: int = SLOT_BYTES,
        max_chunks: int = SLOTS,
        spin_us: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        *,
        spin_yield: bool | None = None,
        spin_adaptive: bool = True,
        named: bool | None = None,
        _fences: str = "auto",
    ) -> None:
        self._init_common(_fences)
        if not 0 < max_message_bytes < L.MESSAGE_LIMIT:
            raise ValueError(f"max_message_bytes must be in 1..2**48-1, got {max_message_bytes}")
        self.layout = L.Layout(n_reader, max_chunks, max_chunk_bytes)
        self.layout.check()
        self._seg = shm.create(self.layout.size, named)
        self.writer_pid, self.writer_start = os.getpid(), _proc.start_time()
        L.write_geometry(self._seg.map, self.layout, self.writer_pid, self.writer_start, max_message_bytes)
        # Asymmetric fences (transport/_sync.py): if this process is registered, its hot path skips the
        # store->load fence, and every sleeper of this ring must use heavy_fence(); the header says so.
        asym = self._fences == "auto" and _sync.register_asymmetric()
        struct.pack_into("<I", self._seg.map, L.OFF_ASYM, int(asym))
        self.max_message = max_message_bytes
        self.spin_us, self.spin_yield, self.spin_adaptive = spin_us, spin_yield, spin_adaptive
        self._bind()
        # w: chunks published (unbounded here; the segment holds it mod 2**32); limit: chunks below it may be
        # written without looking at the readers
        self._cur = cursor.writer_cursor(self, limit=max_chunks)
        self._make_hold()

    @property
    def _w(self) -> int:
        return self._cur.w

    @_w.setter
    def _w(self, w: int) -> None:
        self._cur.w = w

    @property
    def _limit(self) -> int:
        return self._cur.limit

    @_limit.setter
    def _limit(self, limit: int) -> None:
        self._cur.limit = limit

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until every reader has attached, then unlink the segment's name."""
        deadline = None if timeout is None else _mono() + timeout
        self._W[_W_WAKE_TARGET] = 0
        self._sleep_until(lambda: all(self._attached()), self._wwake, deadline, None, self._unattached,
                          "wait_until_ready", self._writer_sleeping)
        self._seg.unlink()

    def dequeue(self, timeout: float | None = None, cancel=None) -> Any:
        raise RuntimeError("dequeue on the writer end of the queue")

    # -- publishing --------------------------------------------------------------------------------------------
    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Broadcast ``obj`` to every reader. Pickling happens before the ring is touched, so an unpicklable
        object raises here and leaves the ring usable. Blocks (bounded by ``timeout``) while the ring is full."""
        if "torch" in _modules and not isinstance(obj, codec.PLAIN):
            main, bufs = _dumps(obj)
        else:
            bufs = []
            main = _pdumps(obj, 5, buffer_callback=bufs.append)
        if bufs:
            self._enqueue_frame(main, bufs, timeout)
        elif not self._cur.put(main):
            self._enqueue_slow(main, timeout)

    def _enqueue_slow(self, main, timeout: float | None) -> None:
        """A bare pickle the cursor's put refused: bigger than a slot (then a frame), a full ring, a closed queue,
        or another thread inside a slow path."""
        n = len(main)
        if n > self._slot_bytes:
            return self._enqueue_frame(main, [], timeout)
        with self._hold:
            if self._closed_here:
                raise QueueClosed("queue closed")
            w = self._w
            if w >= self._limit:
                self._await_space(w, None if timeout is None else _mono() + timeout)
            s = self._slot
            off = self._datas[s]
            self._mv[off:off + n] = main
            self._publish(w, s, n, _PICKLED)

    @contextlib.contextmanager
    def reserve(self, timeout: float | None = None):
        """The next slot as a writable memoryview of ``slot_bytes`` bytes; published (whole, as a one-slot frame
        of that length) when the block exits normally, left unpublished if it raises. For callers that frame
        their own bytes (transport/compat/vllm.py's ``acquire_write``); readers take it with ``borrow``."""
        deadline = None if timeout is None else _mono() + timeout
        with self._hold:
            if self._closed_here:
                raise QueueClosed("queue closed")
            w = self._w
            if w >= self._limit:
                self._await_space(w, deadline)
            s = self._slot
            off = self._datas[s]
            view = self._mv[off:off + self._slot_bytes]
            try:
                yield view
            finally:
                _release_view(view)
            self._publish(w, s, self._slot_bytes, _WHOLE)

    def _enqueue_frame(self, main, bufs, timeout: float | None) -> None:
        """A message with out-of-band buffers or larger than a slot: a codec frame, in one slot or streamed."""
        pieces, total = codec.frame(main, bufs)
        if total > self.max_message:
            raise ValueError(f"message of {total} bytes is over max_message_bytes={self.max_message}")
        deadline = None if timeout is None else _mono() + timeout
        with self._hold:
            if self._closed_here:
                raise QueueClosed("queue closed")
            if total > self._slot_bytes:
                return self._put_stream(pieces, total, deadline)
            cur = self._cur
            w = cur.w
            if w >= cur.limit:
                self._await_space(w, deadline)
            s = cur.slot
            mv = self._mv
            off = self._datas[s]
            for p in pieces:
                end = off + len(p)
                mv[off:end] = p
                off = end
            cur.publish(total, _WHOLE)  # slot s, chunk w: the cursor's next (see _publish)

    def _publish(self, w: int, s: int, length: int, kind: int) -> None:
        """Publish chunk ``w`` (the cursor's next, its payload written into slot ``s``) and wake sleeping readers:
        the cursor's steps, the same as its hot path's."""
        assert (w, s) == (self._cur.w, self._cur.slot), "publishing a chunk other than the cursor's next"
        self._cur.publish(length, kind)

    def _put_stream(self, pieces, total: int, deadline: float | None) -> None:
        """Spread one frame over consecutive slots, publishing each as soon as it is full."""
        if len(pieces[0]) > self._slot_bytes:
            raise ValueError("message header larger than one slot: too many out-of-band buffers for the slot size")
        mv, size = self._mv, self._slot_bytes
        kind, room, off, left = _FIRST, 0, 0, total
        w = s = 0
        for piece in pieces:
            view = memoryview(piece).cast("B") if not isinstance(piece, bytes) else piece
            pos, n = 0, len(view)
            while pos < n:
                if not room:
                    w = self._w
                    if w >= self._limit:
                        self._await_space(w, deadline)
                    s, room = self._slot, size
                    off = self._datas[s]
                k = min(room, n - pos)
                mv[off:off + k] = view[pos:pos + k]
                pos += k
                off += k
                room -= k
                left -= k
                if not room or not left:
                    self._publish(w, s, size - room, kind | (_LAST if not left else 0))
                    kind, room = 0, 0

    # -- waiting for space -------------------------------------------------------------------------------------
    def _await_space(self, w: int, deadline: float | None) -> None:
        """Block until chunk ``w`` may be written: every reader has released chunk ``w - n_slots``."""
        if w < self._refresh_limit(w):
            return
        if _SPIN_ON_FULL and self._spin_s and self._should_spin():
            ok = self._spin(lambda: w < self._refresh_limit(w))
            self._spun(ok)
            if ok:
                return
        # Asleep, wait until half the ring is free, not one slot: a writer ahead of slow readers then sleeps
        # once per half ring instead of once per message (each wake-up costs two system calls and a switch).
        # Not with a reader that lends slots out: its pinned slots may keep half the ring busy indefinitely.
        need = w - self._nslots + (1 if self._some_reader_lends() else max(1, self._nslots // 2))
        self._W[_W_WAKE_TARGET] = need & _MASK
        self._sleep_until(lambda: need <= self._refresh_limit(w) - self._nslots, self._wwake, deadline, None,
                          lambda: self._behind(w), "enqueue", self._writer_sleeping)

    def _some_reader_lends(self) -> bool:
        W, lay = self._W, self.layout
        return any(W[(lay.reader(r) + L.R_LENDS) // 4] for r in range(self._n))

    def _refresh_limit(self, w: int) -> int:
        """Read every reader's counter; the slowest one bounds how far the writer may run ahead."""
        W, S = self._W, self._nslots
        lag = 0
        for cw in self._consumed_words:
            d = (w - W[cw]) & _MASK
            if d > lag:
                lag = d
        if lag > S:
            raise CorruptMessage(f"a reader's counter is {lag} chunks behind a ring of {S} slots")
        self._limit = w - lag + S
        return self._limit

    def _behind(self, w: int) -> tuple[int, ...]:
        """Readers that have not released the chunk the writer needs."""
        W, S = self._W, self._nslots
        return tuple(r for r, cw in enumerate(self._consumed_words) if (w - W[cw]) & _MASK >= S)

    def _writer_sleeping(self, on: bool) -> None:
        self._W[_W_WRITER_SLEEPING] = 1 if on else 0
        if on:  # store(writer_sleeping) -> load(consumed[*]), on this CPU and on the readers' (light hot paths)
            _sync.heavy_fence() if self._heavy else _sync.full_fence()

    def _check_peer(self, pending) -> None:
        for r in pending():
            pid, start = self._reader_identity(r)
            self._peer_died(pid, start, r, f"reader {r} (pid {pid}) died", r)

    # -- closing -----------------------------------------------------------------------------------------------
    def _on_close(self) -> None:
        self._seg.unlink()

    def __del__(self) -> None:
        """A writer dropped without close(): remove the name and wake the readers (they would wait forever)."""
        try:
            if not self._closed_here and os.getpid() == self._pid:
                self._seg.unlink()
                self.cancel_all()
        except Exception:
            pass
