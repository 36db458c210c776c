"""MessageQueue: one writer, N readers, over a ring of fixed-size slots in one shared-memory segment.

::

    writer process                       segment (/dev/shm/rvq-<pid>-<random>, unlinked once all attached)
    enqueue(obj) --encode--> pieces --copy--> [slot 0][slot 1]...[slot k-1]  --copy--> reader 0: dequeue() -> obj
                                                   ^ flags: written, read[r]   --copy--> reader 1 ...
                     futex write_seq: readers sleep here; ack_seq: the writer sleeps here when the ring is full

The same class serves the supervisor's 1->N broadcast of requests and each worker's 1->1 reply queue.
Layout and flag states: transport/layout.py. Waits and fences: transport/_sync.py. Framing: transport/codec.py.

Waiting is adaptive: poll the flag for ``spin_us``, then announce "I sleep" in a per-party byte, fence, re-check,
and sleep in the kernel on a futex word. The other side, after publishing, fences and wakes only if someone
announced sleep, so the common fast case costs no system call and an idle reader costs no CPU. One FUTEX_WAKE
reaches every sleeping reader. Sleeps are sliced so that a dead peer is noticed (``PeerDied``) and a
``threading.Event`` cancel is seen within 5 ms; ``close()`` from any thread or process wakes everyone at once.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from transport import _sync, codec, layout as L, shm
from transport.errors import CorruptMessage, PeerDied, QueueClosed, QueueTimeout

_CANCEL_POLL_S = 0.005  # a threading.Event cannot wake a futex: poll it this often while asleep
_LIVENESS_POLL_S = 0.25  # how often a sleeper checks that its peer process still exists
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Handle:
    """What a reader needs to attach: small and picklable (sent in the READY handshake, or to children)."""

    name: str
    size: int
    n_reader: int
    writer_pid: int
    spin_us: float


class MessageQueue:
    """Create as the writer with ``MessageQueue(n_reader, ...)``; attach readers with ``create_from_handle``."""

    def __init__(
        self,
        n_reader: int,
        max_chunk_bytes: int = 1 << 20,
        max_chunks: int = 8,
        spin_us: float = 50.0,
        max_message_bytes: int = 1 << 31,
        *,
        _attach: tuple[Handle, int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._closed_here = False
        self._users = 0  # threads of this process inside a blocking call (close waits for them before unmapping)
        if _attach is None:
            self._init_writer(n_reader, max_chunk_bytes, max_chunks, spin_us, max_message_bytes)
        else:
            self._init_reader(*_attach)
        self._bind()

    # -- construction ------------------------------------------------------------------------------------------
    def _init_writer(self, n_reader, slot_bytes, n_slots, spin_us, max_message) -> None:
        self.layout = L.Layout(n_reader, n_slots, slot_bytes)
        self.layout.check()
        self._seg = shm.create(self.layout.size)
        L.write_geometry(self._seg.map, self.layout, os.getpid(), max_message)
        self.is_writer, self.reader_rank = True, None
        self.spin_s = spin_us * 1e-6
        self.max_message = max_message
        self.writer_pid = os.getpid()
        self._cursor = 0

    def _init_reader(self, handle: Handle, reader_rank: int) -> None:
        self._seg = shm.attach(handle.name, handle.size)
        try:
            self.layout, self.writer_pid, self.max_message = L.read_geometry(self._seg.map, handle.size)
            if not 0 <= reader_rank < self.layout.n_readers:
                raise ValueError(f"reader_rank {reader_rank} out of range 0..{self.layout.n_readers - 1}")
        except BaseException:
            self._seg.map.close()
            raise
        self.is_writer, self.reader_rank = False, reader_rank
        self.spin_s = handle.spin_us * 1e-6
        self._cursor = 0
        self._partial: bytearray | None = None

    def _bind(self) -> None:
        """Cache offsets and addresses: the hot path must not recompute them."""
        lay = self.layout
        self._mv = memoryview(self._seg.map)
        import ctypes

        probe = ctypes.c_char.from_buffer(self._seg.map)
        self._base = ctypes.addressof(probe)
        del probe  # an exported buffer would stop mmap.close()
        self._n = lay.n_readers
        self._ones = b"\x01" * self._n
        self._zeros = bytes(self._n)
        self._waiting = lay.waiting
        self._waiting_end = lay.waiting + lay.n_readers
        self._nslots = lay.n_slots
        self._write_seq_addr = self._base + L.OFF_WRITE_SEQ
        self._ack_seq_addr = self._base + L.OFF_ACK_SEQ
        self._metas = [lay.slot_meta(i) for i in range(lay.n_slots)]
        self._datas = [lay.slot_data(i) for i in range(lay.n_slots)]
        self._slot_bytes = lay.slot_bytes
        if not self.is_writer:
            self._announce_attached()

    @classmethod
    def create_from_handle(cls, handle: Handle, reader_rank: int) -> "MessageQueue":
        """Attach to a queue as reader ``reader_rank`` (0-based), in any process (spawn, forkserver or fork)."""
        return cls(handle.n_reader, _attach=(handle, reader_rank))

    def export_handle(self) -> Handle:
        return Handle(self._seg.name, self._seg.size, self._n, self.writer_pid, self.spin_s * 1e6)

    @property
    def name(self) -> str:
        return self._seg.name

    def _announce_attached(self) -> None:
        r = self.reader_rank
        _U32.pack_into(self._mv, self.layout.reader_pids + 4 * r, os.getpid())
        self._mv[self.layout.attached + r] = 1
        _sync.full_fence()
        if bytes(self._mv[self.layout.attached:self.layout.attached + self._n]) == self._ones:
            shm.unlink(self._seg.name)  # the last reader in removes the name: nothing can leak from now on
        _sync.fetch_add(self._ack_seq_addr)
        _sync.futex_wake(self._ack_seq_addr)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Writer: block until every reader has attached, then unlink the segment's name. Reader: no-op."""
        if not self.is_writer:
            return
        att = self.layout.attached
        self._wait(lambda: bytes(self._mv[att:att + self._n]) == self._ones, self._ack_seq_addr,
                   L.OFF_WRITER_WAITING, _deadline(timeout), None, self._unattached, "wait_until_ready")
        shm.unlink(self._seg.name)

    def _unattached(self) -> tuple[int, ...]:
        att = self.layout.attached
        return tuple(r for r in range(self._n) if not self._mv[att + r])

    # -- writer ------------------------------------------------------------------------------------------------
    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Broadcast ``obj`` to every reader. Pickling happens before the ring is touched, so an unpicklable
        object raises here and leaves the ring usable. Blocks (bounded by ``timeout``) while the ring is full."""
        if not self.is_writer:
            raise RuntimeError("enqueue on a reader end of the queue")
        pieces, total = codec.encode(obj)
        if total > self.max_message:
            raise ValueError(f"message of {total} bytes is over max_message_bytes={self.max_message}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._enter()
            try:
                if total <= self._slot_bytes:
                    self._write_slot(pieces, total, L.FIRST | L.LAST, deadline)
                else:
                    self._write_stream(pieces, total, deadline)
            finally:
                self._users -= 1

    def _write_slot(self, pieces, length: int, kind: int, deadline: float | None) -> None:
        i = self._cursor
        meta = self._metas[i]
        mv, rf, n = self._mv, meta + 8, self._n
        if mv[meta] and mv[rf:rf + n] != self._ones:  # slot still unread by someone: wait for space
            self._await_free(meta, deadline)
        mv[meta] = 0  # written=0 first: readers must never see "written, unread" over stale bytes
        mv[rf:rf + n] = self._zeros
        off = self._datas[i]
        for p in pieces:
            end = off + len(p)
            mv[off:end] = p
            off = end
        # publish: kind and length, then (release order) the written flag, then the futex word
        mv[meta + 1] = kind
        _U32.pack_into(mv, meta + 4, length)
        _sync.release_fence()
        mv[meta] = 1
        _U32.pack_into(mv, L.OFF_WRITE_SEQ, (_U32.unpack_from(mv, L.OFF_WRITE_SEQ)[0] + 1) & 0xFFFFFFFF)
        self._cursor = i + 1 if i + 1 < self._nslots else 0
        _sync.full_fence()  # store(written, seq) -> load(waiting): Dekker with the reader's announce-then-check
        if mv[self._waiting:self._waiting_end] != self._zeros or not _sync.HAVE_FENCE:
            _sync.futex_wake(self._write_seq_addr)

    def _write_stream(self, pieces, total: int, deadline: float | None) -> None:
        """Spread one frame over consecutive slots, publishing each as soon as it is full."""
        if len(pieces[0]) > self._slot_bytes:
            raise ValueError("message header larger than one slot: too many out-of-band buffers for the slot size")
        kind, room, chunk = L.FIRST, self._slot_bytes, []
        written = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while len(view):
                take = view[:room]
                chunk.append(take)
                view = view[len(take):]
                room -= len(take)
                written += len(take)
                if room == 0 or written == total:
                    last = L.LAST if written == total else 0
                    self._write_slot(chunk, self._slot_bytes - room, kind | last, deadline)
                    kind, room, chunk = 0, self._slot_bytes, []

    def _await_free(self, meta: int, deadline: float | None) -> None:
        mv, rf, n, ones = self._mv, meta + 8, self._n, self._ones
        self._wait(lambda: mv[meta] == 0 or mv[rf:rf + n] == ones, self._ack_seq_addr, L.OFF_WRITER_WAITING,
                   deadline, None, lambda: tuple(r for r in range(n) if not mv[rf + r]), "enqueue")

    # -- reader ------------------------------------------------------------------------------------------------
    def dequeue(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Any:
        """Receive the next message. Raises QueueTimeout, QueueClosed (closed or ``cancel`` set), PeerDied
        (the writer is gone) or CorruptMessage. A message is returned whole or not at all."""
        if self.is_writer:
            raise RuntimeError("dequeue on the writer end of the queue")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._enter()
            try:
                while True:
                    meta, kind, length = self._await_slot(deadline, cancel)
                    if not kind & L.FIRST:  # the tail of a message whose writer gave up: skip it
                        self._release(meta)
                        continue
                    data = self._datas[self._cursor]
                    if kind & L.LAST:
                        return self._read_single(meta, data, length)
                    frame = self._read_stream(meta, data, length, deadline, cancel)
                    if frame is not None:
                        return codec.decode(frame)
            finally:
                self._users -= 1

    def _read_single(self, meta: int, data: int, length: int) -> Any:
        """A one-slot message: unpickle in place when it has no out-of-band buffers (pickle copies everything
        it keeps), else take one copy so that arrays can keep pointing at it after the slot is reused."""
        try:
            view = self._mv[data:data + length]
            if codec.is_inband(view, length):
                return codec.decode_inband(view)
            return codec.decode(bytearray(view))
        finally:
            view = None
            self._release(meta)

    def _read_stream(self, meta, data, length, deadline, cancel) -> bytearray | None:
        """Gather a multi-slot frame. Returns None if the message turned out torn (a new FIRST arrived)."""
        total = codec.frame_length(self._mv[data:data + length], self.max_message)
        frame = bytearray(total)
        got = 0
        while True:
            if got + length > total:
                raise CorruptMessage(f"message chunks exceed the announced {total} bytes")
            frame[got:got + length] = self._mv[data:data + length]
            got += length
            self._release(meta)
            if got == total:
                return frame
            meta, kind, length = self._await_slot(deadline, cancel)
            if kind & L.FIRST:
                return None  # torn: the writer started over; re-read this slot as a new message
            data = self._datas[self._cursor]
            if kind & L.LAST and got + length != total:
                raise CorruptMessage(f"message ended after {got + length} of {total} bytes")

    def _await_slot(self, deadline, cancel) -> tuple[int, int, int]:
        mv, meta = self._mv, self._metas[self._cursor]
        flag = meta + 8 + self.reader_rank
        if not (mv[meta] == 1 and mv[flag] == 0):
            self._wait(lambda: mv[meta] == 1 and mv[flag] == 0, self._write_seq_addr,
                       self._waiting + self.reader_rank, deadline, cancel, lambda: (), "dequeue")
        _sync.acquire_fence()
        kind = mv[meta + 1]
        (length,) = _U32.unpack_from(mv, meta + 4)
        if length > self._slot_bytes or (not kind & L.LAST and length != self._slot_bytes):
            raise CorruptMessage(f"slot {self._cursor} claims {length} bytes (slot size {self._slot_bytes})")
        return meta, kind, length

    def _release(self, meta: int) -> None:
        mv = self._mv
        _sync.release_fence()  # our copy of the payload is complete before the writer may reuse the slot
        mv[meta + 8 + self.reader_rank] = 1
        self._cursor = self._cursor + 1 if self._cursor + 1 < self._nslots else 0
        _sync.full_fence()  # store(read flag) -> load(writer_waiting)
        if mv[L.OFF_WRITER_WAITING] or not _sync.HAVE_FENCE:
            _sync.fetch_add(self._ack_seq_addr)
            _sync.futex_wake(self._ack_seq_addr)

    # -- waiting -----------------------------------------------------------------------------------------------
    def _wait(self, ready, futex_addr, flag_off, deadline, cancel, pending, what) -> None:
        """Spin, then sleep on ``futex_addr`` until ``ready()``; see the module docstring."""
        spin_end = time.perf_counter() + self.spin_s
        while time.perf_counter() < spin_end:
            if ready():
                return
        mv, seq_off = self._mv, futex_addr - self._base
        last_check = time.monotonic()
        while True:
            seq = _U32.unpack_from(mv, seq_off)[0]
            mv[flag_off] = 1
            _sync.full_fence()
            try:
                if ready():
                    return
                self._check_cancelled(cancel)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    p = pending()
                    raise QueueTimeout(f"{what} timed out" + (f": readers {list(p)} have not read" if p else ""), p)
                if now - last_check >= _LIVENESS_POLL_S:
                    self._check_peer(pending)
                    last_check = now
                nap = _CANCEL_POLL_S if cancel is not None else _LIVENESS_POLL_S
                if deadline is not None:
                    nap = min(nap, deadline - now)
                _sync.futex_wait(futex_addr, seq, nap)
            finally:
                mv[flag_off] = 0

    def _check_cancelled(self, cancel) -> None:
        if self._mv[L.OFF_CLOSED]:
            raise QueueClosed("queue closed")
        if cancel is not None and cancel.is_set():
            raise QueueClosed("wait cancelled")

    def _check_peer(self, pending) -> None:
        if not self.is_writer:
            if not _pid_alive(self.writer_pid):
                raise PeerDied(f"writer process {self.writer_pid} died", self.writer_pid)
            return
        for r in pending():
            pid = _U32.unpack_from(self._mv, self.layout.reader_pids + 4 * r)[0]
            if pid and not _pid_alive(pid):
                raise PeerDied(f"reader {r} (pid {pid}) died", pid, r)

    # -- closing -----------------------------------------------------------------------------------------------
    def cancel_all(self) -> None:
        """Mark the queue closed and wake every waiter, in every process. Safe from any thread."""
        if self._seg.map.closed:
            return
        self._mv[L.OFF_CLOSED] = 1
        _sync.full_fence()
        for addr in (self._write_seq_addr, self._ack_seq_addr):
            _sync.fetch_add(addr)  # change the word so that a waiter about to sleep returns at once
            _sync.futex_wake(addr)

    def close(self) -> None:
        """Wake every waiter, remove the name if still there, and release this process's mapping. Idempotent."""
        if self._closed_here:
            return
        self._closed_here = True
        self.cancel_all()
        if self.is_writer:
            shm.unlink(self._seg.name)
        deadline = time.monotonic() + 0.1
        while self._users and time.monotonic() < deadline:  # let woken threads leave the mapping
            time.sleep(0.001)
        if self._users:
            return  # a thread is still inside: leave the mapping to garbage collection rather than crash it
        self._mv.release()
        self._seg.map.close()

    @property
    def closed(self) -> bool:
        return self._closed_here or bool(self._mv[L.OFF_CLOSED])

    def _enter(self) -> None:
        """Count this thread in (close() waits for counted threads before unmapping)."""
        if self._closed_here:
            raise QueueClosed("queue closed")
        self._users += 1

    def __enter__(self) -> "MessageQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed_here and self.is_writer:
                shm.unlink(self._seg.name)
        except Exception:
            pass


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
