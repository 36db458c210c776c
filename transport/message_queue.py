"""MessageQueue: one writer, N readers, over a ring of fixed-size slots in one shared-memory segment.

::

    writer process                        segment /dev/shm/rvq-<pid>-<random> (unlinked once every reader attached)
    enqueue(obj) --encode--> pieces --copy--> [slot 0][slot 1]...[slot k-1] --copy--> reader 0: dequeue() -> obj
                                              pub: chunks published         --copy--> reader 1 ...
                                              consumed[r]: chunks reader r released
                     futex rwake: readers sleep here;  futex wwake: the writer sleeps here when the ring is full

The same class serves the supervisor's 1->N broadcast of requests and each worker's 1->1 reply queue.
Layout, protocol and state table: transport/layout.py. Waits and fences: transport/_sync.py. Framing:
transport/codec.py.

Waiting is adaptive: poll the counter for up to ``spin_us`` (default 200 us), yielding the CPU
(``os.sched_yield``) between polls, then announce "I sleep", fence, re-check, and sleep in the kernel on a futex
word. The other side, after publishing, fences and wakes only if someone announced sleep, so the common case
costs no system call and an idle reader costs no CPU. One FUTEX_WAKE reaches every sleeping reader. A sleeper
also wakes every ``_LIVENESS_POLL_S`` to check that its peer process still exists (``PeerDied``), and every
``_CANCEL_POLL_S`` while it has a ``threading.Event`` cancel to look at; ``close()`` / ``cancel_all()`` from any
thread or process wakes every sleeper at once through the futex words.

The spin policy, measured on 2 cores with 1..8 readers (scripts/bench_transport.py):

* Yield between polls. A pure busy-poll holds a core for its whole window while the very process it waits for
  sits in the run queue: with more processes than cores it measured 2-3x slower than the pipe it should beat.
  A yielding poll hands the core to whoever is runnable and costs one cheap system call when nobody is.
* Do spin, even with more readers than cores: a futex wake-up costs tens of microseconds here (an idle vCPU
  has to be woken), and "spin 0" lost to every spinning variant at every N.
* Spin only while it pays off: each end keeps an EWMA of "the last spins ended before the window did"; once
  it falls under ``_SPIN_KEEP`` (the other side is consistently slower than the window, e.g. requests that
  come every few milliseconds) it sleeps at once and probes with a spin one wait in eight.
* Back off when a yield loses the CPU for longer than ``_YIELD_LOST_S`` (the score is halved): a CPU-bound
  process outside the queue holds the cores, every yield then waits out its time slice (4 ms medians with two
  hogs on two cores), and a woken futex sleeper is scheduled sooner than a yielder.
* A writer that finds the ring full sleeps until half the ring is free (``wake_target``), not one slot.

``spin_us=0`` never spins, ``spin_yield=False`` busy-polls, ``spin_adaptive=False`` always spins the window.

``close()`` by any party closes the queue for every party (it is how a shutdown wakes everyone). Messages
already published stay readable. A ``dequeue`` that times out in the middle of a multi-slot message drops
that message for this reader (it is never delivered in part).
"""
from __future__ import annotations

import ctypes
import os
import pickle
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from transport import _proc, _sync, codec, layout as L, shm
from transport.errors import CorruptMessage, PeerDied, QueueClosed, QueueTimeout

_CANCEL_POLL_S = 0.005  # a threading.Event cannot wake a futex: poll it this often while asleep
_LIVENESS_POLL_S = 0.25  # how often a sleeper checks that its peer process still exists
_AUTO_SPIN_US = 200.0  # spin window when spin_us is None (measured: 50..1000 us all beat no spin; see below)
_SPIN_KEEP = 0.3  # adaptive spinning: keep spinning while the success EWMA stays above this
_SPIN_EWMA = 0.125  # weight of the latest wait in that EWMA (a few unlucky waits do not stop the spinning)
# A writer on a full ring spins like any other waiter (then sleeps until half the ring is free). Not spinning
# there (the readers have a backlog, so it is a throughput situation) measured no better, and worse for small
# messages; the adaptive policy stops the spinning where it keeps failing anyway.
_SPIN_ON_FULL = True
# A yield that keeps us off the CPU this long means something outside the queue holds the cores (a CPU-bound
# process): a yielder then waits a whole time slice behind it each time (4 ms medians measured with two hogs on
# two cores), while a woken futex sleeper gets to run soon. Longer than a round of our own peers, about a slice.
_YIELD_LOST_S = 0.001
_REUSE_MIN = 256 << 10  # frames of this size and up are recycled (see _frame)
_REUSE_MAX = 64 << 20
_REUSE_COUNT = 3
_MASK = L.MASK
_W_PUB = L.OFF_PUB // 4
_W_RWAKE = L.OFF_RWAKE // 4
_W_WRITER_SLEEPING = L.OFF_WRITER_SLEEPING // 4
_W_WAKE_TARGET = L.OFF_WAKE_TARGET // 4
_W_SLEEPERS = L.OFF_SLEEPERS // 4
_W_WWAKE = L.OFF_WWAKE // 4
_W_CLOSED = L.OFF_CLOSED // 4
_WHOLE = L.WHOLE
_PICKLED = L.PICKLED
_NEED_ORDER_FENCES = _sync.NEED_ORDER_FENCES
_full_fence = _sync.full_fence
_dumps = codec.dumps
_pdumps = pickle.dumps
_modules = sys.modules
_FIRST = L.FIRST
_LAST = L.LAST
_perf = time.perf_counter
_mono = time.monotonic
_loads = pickle.loads
_yield = os.sched_yield


@dataclass(frozen=True)
class Handle:
    """What a reader needs to attach: small and picklable (sent in the READY handshake, or to children)."""

    name: str
    size: int
    n_reader: int
    writer_pid: int
    spin_us: float | None
    spin_yield: bool | None = None
    spin_adaptive: bool = True


class MessageQueue:
    """Create as the writer with ``MessageQueue(n_reader, ...)``; attach readers with ``create_from_handle``.

    ``max_chunk_bytes`` is the payload size of one slot and ``max_chunks`` the number of slots: a message larger
    than a slot is streamed through consecutive slots. ``max_message_bytes`` bounds what a header may announce.
    """

    def __init__(
        self,
        n_reader: int,
        max_chunk_bytes: int = 1 << 20,
        max_chunks: int = 8,
        spin_us: float | None = None,
        max_message_bytes: int = 1 << 31,
        *,
        spin_yield: bool | None = None,
        spin_adaptive: bool = True,
        _attach: tuple[Handle, int] | None = None,
        _fences: str = "auto",
    ) -> None:
        self._lock = threading.Lock()
        self._closed_here = False
        self._pid = os.getpid()  # a forked copy of this object must not close or unlink the owner's queue
        self._fences = _fences  # "auto": asymmetric fences where membarrier works; "full": always full fences
        self.late_wakeups = 0  # sleeps that ended by timeout although the news was there (must stay 0)
        self._watches: dict[int, _proc.Watch] = {}  # liveness of the peers this end has waited for
        if _attach is None:
            self._init_writer(n_reader, max_chunk_bytes, max_chunks, spin_us, max_message_bytes)
            self.spin_yield, self.spin_adaptive = spin_yield, spin_adaptive
        else:
            self._init_reader(*_attach)
        self._bind()

    # -- construction ------------------------------------------------------------------------------------------
    def _init_writer(self, n_reader, slot_bytes, n_slots, spin_us, max_message) -> None:
        if max_message <= 0 or max_message >= 1 << 48:
            raise ValueError(f"max_message_bytes must be in 1..2**48, got {max_message}")
        self.layout = L.Layout(n_reader, n_slots, slot_bytes)
        self.layout.check()
        self._seg = shm.create(self.layout.size)
        self.writer_pid, self.writer_start = os.getpid(), _proc.start_time()
        L.write_geometry(self._seg.map, self.layout, self.writer_pid, self.writer_start, max_message)
        # Asymmetric fences (transport/_sync.py): if this process is registered, its hot path skips the
        # store->load fence, and every sleeper of this ring must use heavy_fence(); the header says so.
        asym = self._fences == "auto" and _sync.register_asymmetric()
        struct.pack_into("<I", self._seg.map, L.OFF_ASYM, int(asym))
        self.is_writer, self.reader_rank = True, None
        self.max_message = max_message
        self.spin_us = spin_us
        self._w = 0  # chunks published (unbounded here; the segment holds it mod 2**32)
        self._limit = n_slots  # chunks below this number may be written without looking at the readers

    def _init_reader(self, handle: Handle, reader_rank: int) -> None:
        self._seg = shm.attach(handle.name, handle.size)
        try:
            head = L.read_geometry(self._seg.map, handle.size)
            if not 0 <= reader_rank < head.layout.n_readers:
                raise ValueError(f"reader_rank {reader_rank} out of range 0..{head.layout.n_readers - 1}")
        except BaseException:
            self._seg.map.close()
            raise
        self.layout, self.writer_pid, self.writer_start = head.layout, head.writer_pid, head.writer_start
        self.max_message = head.max_message
        self.is_writer, self.reader_rank = False, reader_rank
        self.spin_us = handle.spin_us
        self.spin_yield, self.spin_adaptive = handle.spin_yield, handle.spin_adaptive
        self._c = 0  # chunks consumed, mod 2**32
        self._spare: list = []  # recent big frame buffers, reused once nothing references them (_frame)

    def _bind(self) -> None:
        """Cache views, offsets and addresses: the hot path must not recompute them."""
        lay = self.layout
        self._mv = memoryview(self._seg.map)
        self._W = self._mv.cast("I")  # the segment as u32 words: one index op per load or store
        probe = ctypes.c_char.from_buffer(self._seg.map)
        self._base = ctypes.addressof(probe)
        del probe  # an exported buffer would stop mmap.close()
        self._n = lay.n_readers
        self._nslots = lay.n_slots
        self._slot_bytes = lay.slot_bytes
        self._slot = 0
        self._metas = [lay.slot_meta(i) // 4 for i in range(lay.n_slots)]  # word index of each chunk record
        self._datas = [lay.slot_data(i) for i in range(lay.n_slots)]
        self._consumed_words = [lay.reader(r) // 4 for r in range(lay.n_readers)]
        self._rwake = _sync.address(self._base + L.OFF_RWAKE)
        self._wwake = _sync.address(self._base + L.OFF_WWAKE)
        self._sleepers = _sync.address(self._base + L.OFF_SLEEPERS)
        self._always_wake = not _sync.HAVE_FENCE
        self._heavy = bool(self._W[L.OFF_ASYM // 4])  # sleepers must fence the other CPUs too
        self._light = self._heavy and self._fences == "auto" and _sync.register_asymmetric()  # hot paths skip it
        self._spin_s = max(0.0, _AUTO_SPIN_US if self.spin_us is None else self.spin_us) * 1e-6
        self._spin_yields = True if self.spin_yield is None else bool(self.spin_yield)
        self._adaptive = self.spin_adaptive
        self._spin_score = 1.0  # EWMA of "the last spins succeeded"
        self._probe = 0
        if not self.is_writer:
            self._cw = self._consumed_words[self.reader_rank]
            self._announce_attached()

    @classmethod
    def create_from_handle(cls, handle: Handle, reader_rank: int, *, zero_copy: bool = False,
                           _fences: str = "auto") -> "MessageQueue":
        """Attach to a queue as reader ``reader_rank`` (0-based), in any process (spawn, forkserver or fork).

        ``zero_copy=True``: big arrays and tensors come back as views straight into the ring instead of copies;
        each such message keeps its slot from being reused until its arrays are dropped (see
        transport/zero_copy.py for the rules)."""
        if zero_copy:
            from transport.zero_copy import ZeroCopyReader

            cls = ZeroCopyReader
        return cls(handle.n_reader, _attach=(handle, reader_rank), _fences=_fences)

    def export_handle(self) -> Handle:
        return Handle(self._seg.name, self._seg.size, self._n, self.writer_pid, self.spin_us, self.spin_yield,
                      self.spin_adaptive)

    @property
    def name(self) -> str:
        return self._seg.name

    def _announce_attached(self) -> None:
        rec = self.layout.reader(self.reader_rank)
        mv = self._mv
        struct.pack_into("<IQ", mv, rec + L.R_PID, os.getpid(), _proc.start_time())
        self._W[(rec + L.R_ATTACHED) // 4] = 1
        _sync.full_fence()
        if all(self._attached()):
            shm.unlink(self._seg.name)  # the last reader in removes the name: nothing can leak from now on
        _sync.fetch_add(self._wwake)
        _sync.futex_wake(self._wwake)

    def _attached(self) -> list[bool]:
        W, lay = self._W, self.layout
        return [bool(W[(lay.reader(r) + L.R_ATTACHED) // 4]) for r in range(self._n)]

    def _unattached(self) -> tuple[int, ...]:
        return tuple(r for r, ok in enumerate(self._attached()) if not ok)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Writer: block until every reader has attached, then unlink the segment's name. Reader: no-op."""
        if not self.is_writer:
            return
        deadline = None if timeout is None else _mono() + timeout
        self._W[_W_WAKE_TARGET] = 0
        self._sleep_until(lambda: all(self._attached()), self._wwake, deadline, None, self._unattached,
                          "wait_until_ready", self._writer_sleeping)
        shm.unlink(self._seg.name)

    # -- writer ------------------------------------------------------------------------------------------------
    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Broadcast ``obj`` to every reader. Pickling happens before the ring is touched, so an unpicklable
        object raises here and leaves the ring usable. Blocks (bounded by ``timeout``) while the ring is full."""
        if not self.is_writer:
            raise RuntimeError("enqueue on a reader end of the queue")
        if "torch" in _modules and not isinstance(obj, codec.PLAIN):
            main, bufs = _dumps(obj)
        else:
            bufs = []
            main = _pdumps(obj, 5, buffer_callback=bufs.append)
        n = len(main)
        if bufs or n > self._slot_bytes:
            return self._enqueue_frame(main, bufs, timeout)
        # The hot path, inlined (it is most of the cost of a small message): a bare pickle in one slot.
        # Same steps as _publish; keep the two in step.
        with self._lock:
            if self._closed_here:
                raise QueueClosed("queue closed")
            w = self._w
            if w >= self._limit:
                self._await_space(w, None if timeout is None else _mono() + timeout)
            s = self._slot
            off = self._datas[s]
            self._mv[off:off + n] = main
            W = self._W
            m = self._metas[s]
            W[m] = w & _MASK
            W[m + 1] = n
            W[m + 2] = _PICKLED
            if _NEED_ORDER_FENCES:
                _sync.release_fence()  # payload and record before pub
            w += 1
            W[_W_PUB] = w & _MASK
            self._w = w
            self._slot = s + 1 if s + 1 < self._nslots else 0
            if not self._light:
                _full_fence()  # store(pub) -> load(sleepers)
            if W[_W_SLEEPERS] or self._always_wake:
                _sync.fetch_add(self._rwake)
                _sync.futex_wake(self._rwake)

    def _enqueue_frame(self, main, bufs, timeout: float | None) -> None:
        """A message with out-of-band buffers or larger than a slot: a codec frame, in one slot or streamed."""
        pieces, total = codec.frame(main, bufs)
        if total > self.max_message:
            raise ValueError(f"message of {total} bytes is over max_message_bytes={self.max_message}")
        deadline = None if timeout is None else _mono() + timeout
        with self._lock:
            if self._closed_here:
                raise QueueClosed("queue closed")
            if total > self._slot_bytes:
                return self._put_stream(pieces, total, deadline)
            w = self._w
            if w >= self._limit:
                self._await_space(w, deadline)
            s = self._slot
            mv = self._mv
            off = self._datas[s]
            for p in pieces:
                end = off + len(p)
                mv[off:end] = p
                off = end
            self._publish(w, s, total, _WHOLE)

    def _publish(self, w: int, s: int, length: int, kind: int) -> None:
        """Write chunk ``w``'s record (its payload is in slot ``s``), publish it, wake sleeping readers."""
        W = self._W
        m = self._metas[s]
        W[m] = w & _MASK
        W[m + 1] = length
        W[m + 2] = kind
        if _NEED_ORDER_FENCES:
            _sync.release_fence()  # payload and record before pub
        w += 1
        W[_W_PUB] = w & _MASK
        self._w = w
        self._slot = s + 1 if s + 1 < self._nslots else 0
        if not self._light:
            _full_fence()  # store(pub) -> load(sleepers): Dekker with the reader's announce-then-check
        if W[_W_SLEEPERS] or self._always_wake:
            _sync.fetch_add(self._rwake)
            _sync.futex_wake(self._rwake)

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

    # -- reader ------------------------------------------------------------------------------------------------
    def dequeue(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Any:
        """Receive the next message. Raises QueueTimeout, QueueClosed (closed or ``cancel`` set), PeerDied
        (the writer is gone) or CorruptMessage. A message is returned whole or not at all."""
        if self.is_writer:
            raise RuntimeError("dequeue on the writer end of the queue")
        with self._lock:
            if self._closed_here:
                raise QueueClosed("queue closed")
            # the hot path, inlined: the next chunk is a whole bare pickle, unpickled in place
            W, c = self._W, self._c
            if W[_W_PUB] == c:
                self._await_chunk(c, None if timeout is None else _mono() + timeout, cancel)
            if _NEED_ORDER_FENCES:
                _sync.acquire_fence()  # pub before the record and payload
            s = self._slot
            m = self._metas[s]
            length = W[m + 1]
            off = self._datas[s]
            mv = self._mv
            # a pickle starts with PROTO 5 and ends with STOP: a corrupt length or record never feeds pickle a
            # shifted or truncated stream (checked again, with a clear error, in _dequeue_frame)
            if (W[m + 2] != _PICKLED or W[m] != c or not 3 <= length <= self._slot_bytes
                    or mv[off] != 0x80 or mv[off + length - 1] != 0x2E):
                return self._dequeue_frame(timeout, cancel)
            view = mv[off:off + length]
            try:
                return _loads(view)
            except Exception as exc:
                raise CorruptMessage(f"cannot unpickle message: {type(exc).__name__}: {exc}") from exc
            finally:
                view.release()
                # release, inlined: same steps as _release (_advance + _store_consumed); keep them in step
                if _NEED_ORDER_FENCES:
                    _sync.release_fence()  # our copy is complete before the writer may reuse the slot
                c = (c + 1) & _MASK
                W[self._cw] = c
                self._c = c
                self._slot = s + 1 if s + 1 < self._nslots else 0
                if not self._light:
                    _full_fence()  # store(consumed) -> load(writer_sleeping)
                if (W[_W_WRITER_SLEEPING] and (c - W[_W_WAKE_TARGET]) & _MASK < 0x80000000) or self._always_wake:
                    _sync.fetch_add(self._wwake)
                    _sync.futex_wake(self._wwake)

    def _dequeue_frame(self, timeout, cancel) -> Any:
        """Anything but a bare pickle: a one-slot frame, a stream of chunks, stray tails, corruption."""
        deadline = None if timeout is None else _mono() + timeout
        while True:
            kind, length, data = self._next_chunk(deadline, cancel)
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
            if not kind & _FIRST:  # the tail of a message whose writer gave up: skip it
                self._release()
                continue
            frame = self._read_stream(data, length, deadline, cancel)
            if frame is not None:
                return codec.decode(frame)

    def _next_chunk(self, deadline, cancel) -> tuple[int, int, int]:
        """Wait for chunk ``consumed`` and return its (kind, length, data offset), checked."""
        W, c = self._W, self._c
        if W[_W_PUB] == c:
            self._await_chunk(c, deadline, cancel)
        if _NEED_ORDER_FENCES:
            _sync.acquire_fence()  # pub before the record and payload
        d = (W[_W_PUB] - c) & _MASK
        if d > self._nslots:
            raise CorruptMessage(f"ring counter says {d} chunks are pending in a ring of {self._nslots} slots")
        s = self._slot
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
        frame = self._frame(total)
        fv = memoryview(frame).cast("B")
        got = 0
        while True:
            if got + length > total:
                self._release()
                raise CorruptMessage(f"message chunks exceed the announced {total} bytes")
            fv[got:got + length] = mv[data:data + length]
            got += length
            self._release()
            if got == total:
                return frame
            kind, length, data = self._next_chunk(deadline, cancel)
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

    def _release(self) -> None:
        """Hand the current chunk back to the writer."""
        self._advance()
        self._store_consumed(self._c)

    def _advance(self) -> None:
        """Move past the current chunk (this process's cursor only)."""
        self._c = (self._c + 1) & _MASK
        s = self._slot + 1
        self._slot = s if s < self._nslots else 0

    def _store_consumed(self, c: int) -> None:
        """Tell the writer that every chunk below ``c`` is released; wake it if it waits for that."""
        W = self._W
        if _NEED_ORDER_FENCES:
            _sync.release_fence()  # our copy of the payload is complete before the writer may reuse the slot
        W[self._cw] = c
        if not self._light:
            _full_fence()  # store(consumed) -> load(writer_sleeping)
        if (W[_W_WRITER_SLEEPING] and (c - W[_W_WAKE_TARGET]) & _MASK < 0x80000000) or self._always_wake:
            _sync.fetch_add(self._wwake)
            _sync.futex_wake(self._wwake)

    def _await_chunk(self, c: int, deadline, cancel) -> None:
        W = self._W
        if self._spin_s and self._should_spin():
            self._spun(self._spin(lambda: W[_W_PUB] != c))
            if W[_W_PUB] != c:
                return
        self._sleep_until(lambda: W[_W_PUB] != c, self._rwake, deadline, cancel, tuple, "dequeue",
                          self._reader_sleeping)

    # -- spinning ----------------------------------------------------------------------------------------------
    def _should_spin(self) -> bool:
        """Spin only while it pays off: while most recent spins ended before the window did. Once they mostly
        fail (the other side takes longer than the window, as when readers outnumber cores and wait for their
        turn) spinning is CPU thrown away, so sleep at once, and probe with a spin one wait in eight."""
        if not self._adaptive or self._spin_score >= _SPIN_KEEP:
            return True
        self._probe = (self._probe + 1) & 7
        return not self._probe

    def _spun(self, ok: bool) -> None:
        self._spin_score = self._spin_score * (1 - _SPIN_EWMA) + (_SPIN_EWMA if ok else 0.0)

    def _spin(self, ready) -> bool:
        """Poll ``ready()`` for up to the spin window, yielding the CPU between polls (or not)."""
        t = _perf()
        end = t + self._spin_s
        if self._spin_yields:
            while True:
                _yield()
                now = _perf()
                if _YIELD_LOST_S and now - t > _YIELD_LOST_S:
                    # That yield gave our CPU away for a whole time slice: something outside this queue keeps the
                    # cores busy, and a yielder queues behind it each time, while a futex sleeper that is woken
                    # gets to run first. Stop spinning until a probe says otherwise.
                    self._spin_score *= 0.5  # a few of these in a row and the spinning stops
                    return ready()
                if ready():
                    return True
                if now >= end:
                    return False
                t = now
        while _perf() < end:
            if ready():
                return True
        return False

    def _reader_sleeping(self, on: bool) -> None:
        _sync.fetch_add(self._sleepers, 1 if on else -1)  # atomic, and a full fence: store -> load(pub)
        if on and self._heavy:
            _sync.heavy_fence()  # ... also on the writer's CPU, whose publish path has no fence

    # -- waiting -----------------------------------------------------------------------------------------------
    def _sleep_until(self, ready, futex, deadline, cancel, pending, what, announce) -> None:
        """Sleep on ``futex`` until ``ready()``; see the protocol in transport/layout.py.

        ``announce(True)`` publishes "I sleep" with a full fence, so a party that publishes news after our
        check sees it and changes the futex word (which makes the kernel refuse to put us to sleep)."""
        W = self._W
        word = (futex.value - self._base) // 4
        next_liveness = _mono() + _LIVENESS_POLL_S
        nap_max = _CANCEL_POLL_S if cancel is not None else _LIVENESS_POLL_S
        while True:
            seq = W[word]
            announce(True)
            try:
                if ready():
                    return
                self._check_cancelled(cancel)
                now = _mono()
                if deadline is not None and now >= deadline:
                    p = pending()
                    raise QueueTimeout(f"{what} timed out" + (f": readers {list(p)} have not read" if p else ""), p)
                if now >= next_liveness:
                    self._check_peer(pending)
                    next_liveness = now + _LIVENESS_POLL_S
                nap = nap_max if deadline is None else min(nap_max, deadline - now)
                if not _sync.futex_wait(futex, seq, nap) and ready():
                    self.late_wakeups += 1  # news that came without a wake-up: a protocol bug (tests assert 0)
                    return
            finally:
                announce(False)

    def _check_cancelled(self, cancel) -> None:
        if self._W[_W_CLOSED]:
            raise QueueClosed("queue closed")
        if cancel is not None and cancel.is_set():
            raise QueueClosed("wait cancelled")

    def _check_peer(self, pending) -> None:
        if not self.is_writer:
            if not self._watch(0, self.writer_pid, self.writer_start).alive():
                raise PeerDied(f"writer process {self.writer_pid} died", self.writer_pid)
            return
        for r in pending():
            pid, start = struct.unpack_from("<IQ", self._mv, self.layout.reader(r) + L.R_PID)
            if pid and not self._watch(r, pid, start).alive():
                raise PeerDied(f"reader {r} (pid {pid}) died", pid, r)

    def _watch(self, key: int, pid: int, start: int) -> _proc.Watch:
        w = self._watches.get(key)
        if w is None or (w.pid, w.start) != (pid, start):
            if w is not None:
                w.close()
            w = self._watches[key] = _proc.Watch(pid, start)
        return w

    # -- closing -----------------------------------------------------------------------------------------------
    def cancel_all(self) -> None:
        """Mark the queue closed and wake every waiter, in every process. Safe from any thread."""
        if self._seg.map.closed or os.getpid() != self._pid:
            return
        self._W[_W_CLOSED] = 1
        _sync.full_fence()
        for addr in (self._rwake, self._wwake):
            _sync.fetch_add(addr)  # change the word so that a waiter about to sleep returns at once
            _sync.futex_wake(addr)

    def close(self) -> None:
        """Wake every waiter, remove the name if still there, and release this process's mapping. Idempotent.
        Messages already published stay readable by readers that have not closed."""
        if self._closed_here:
            return
        self._closed_here = True
        if os.getpid() != self._pid:  # a forked copy: drop our mapping, leave the queue alone
            self._unmap()
            return
        self.cancel_all()
        if self.is_writer:
            shm.unlink(self._seg.name)
        # A thread of this process inside enqueue/dequeue holds the lock: wait for it to leave the mapping.
        if not self._lock.acquire(timeout=0.1):
            return  # still inside: leave the mapping to garbage collection rather than crash that thread
        try:
            self._unmap()
        finally:
            self._lock.release()

    def _unmap(self) -> None:
        for w in self._watches.values():
            w.close()
        self._watches.clear()
        try:
            self._W.release()
            self._mv.release()
            self._seg.map.close()
        except BufferError:  # a view is still exported somewhere: garbage collection unmaps it later
            pass

    @property
    def closed(self) -> bool:
        return self._closed_here or bool(self._W[_W_CLOSED])

    def __enter__(self) -> "MessageQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        """A writer dropped without close(): remove the name and wake the readers (they would wait forever)."""
        try:
            if not self._closed_here and self.is_writer and os.getpid() == self._pid:
                shm.unlink(self._seg.name)
                self.cancel_all()
        except Exception:
            pass

    def __repr__(self) -> str:
        role = "writer" if self.is_writer else f"reader {self.reader_rank}"
        return f"<MessageQueue {self._seg.name} {role} of {self._n} readers, {self._nslots}x{self._slot_bytes} B>"
