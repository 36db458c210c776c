"""A reader that lends out the ring's memory instead of copying it: ``create_from_handle(h, rank, zero_copy=True)``.

A plain reader copies every frame with out-of-band buffers (numpy arrays, CPU tensors) out of its slot before
handing the slot back, so that the arrays it returns can outlive the slot. This reader skips that copy for
one-slot frames of at least ``BORROW_MIN`` bytes: the arrays it returns are views into the shared segment, and
the slot stays pinned (the writer cannot reuse it) until the last of those arrays is gone::

    dequeue() --> frame in slot s --> arrays view slot s      consumed[r] stays at the oldest pinned chunk
                                       (ctypes window on s)    until the window's finalizer runs:
    del arrays --> window collected --> finalizer --> consumed[r] = oldest still-pinned chunk (or the cursor)

Bookkeeping: ``_c`` is this reader's read cursor as before; ``_held`` lists pinned chunks in order, each
``[chunk, dropped]``; the counter the writer sees is the first chunk still pinned, or ``_c`` when none is.
Chunks read and copied in between are released implicitly when the pins before them go. Finalizers run in
whatever thread drops the last view (even inside this reader's own code, through the garbage collector), so they
never block: they append to ``_dropped`` and publish only if they can take ``_rlock`` at once; whoever holds it
drains ``_dropped`` on the way out.

Rules for the caller: a pinned slot is a slot the writer cannot use, and the ring is used in order, so a
message that is held stops the writer once ``n_slots - 1`` more chunks have been published after it. Drop
borrowed arrays before waiting for more than that (or keep a copy, ``array.copy()``, of what must live longer);
otherwise the writer blocks and its ``enqueue`` times out naming this reader. The reader's record says that it
lends slots (``lends``), so a writer on a full ring waits for one free slot rather than half the ring. Frames larger than a slot are streamed, and copied as before. The
arrays are writable views of memory the other readers read too: treat them as read-only.
"""
from __future__ import annotations

import collections
import ctypes
import struct
import threading
import weakref
from typing import Any

from transport import codec, layout as L
from transport.errors import QueueClosed
from transport.reader import RingReader

BORROW_MIN = 64 << 10  # smaller frames are copied: a copy of a few KiB costs less than the pin's bookkeeping


class ZeroCopyReader(RingReader):
    """A reader end whose big arrays are views into the ring (see the module docstring)."""

    def _before_attach(self) -> None:
        self._held: collections.deque[list] = collections.deque()  # [chunk, dropped] per pinned slot, in order
        self._dropped: list[list] = []  # entries whose views are gone, not yet accounted for
        self._rlock = threading.Lock()  # guards _held, the cursor's moves and the stores of consumed[r]
        struct.pack_into("<I", self._seg.map, self.layout.reader(self.reader_rank) + L.R_LENDS, 1)  # before attached

    @property
    def pinned(self) -> int:
        """Slots this reader still lends out (their arrays are alive)."""
        return sum(not dropped for _, dropped in self._held)

    def dequeue(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Any:
        """As RingReader.dequeue; the arrays of a one-slot frame of BORROW_MIN bytes or more are views."""
        with self._lock:
            if self._closed_here:
                raise QueueClosed("queue closed")
            return self._dequeue_frame(timeout, cancel)  # no inlined fast path: every release goes through ours

    def _read_whole(self, data: int, length: int) -> Any:
        if length < BORROW_MIN:
            return super()._read_whole(data, length)
        entry = [self._c, False]
        with self._rlock:
            self._held.append(entry)  # pinned before the cursor moves past it: consumed[r] cannot overtake it
            self._advance()
        self._drain()
        try:
            window = (ctypes.c_char * length).from_buffer(self._seg.map, data)
        except BaseException:
            self._on_dropped(entry)
            raise
        # The window is the exporter behind every view decoded from it: it dies with the last of them.
        weakref.finalize(window, self._on_dropped, entry).atexit = False  # at exit the mapping goes anyway
        return codec.decode(memoryview(window).cast("B"))

    def _release(self) -> None:
        with self._rlock:
            self._advance()
            self._publish()
        self._drain()

    def _publish(self) -> None:
        """Store consumed[r] = the first chunk still pinned, or the cursor (caller holds _rlock)."""
        held = self._held
        while held and held[0][1]:
            held.popleft()
        self._store_consumed(held[0][0] if held else self._c)

    def _on_dropped(self, entry: list) -> None:
        self._dropped.append(entry)
        self._drain()

    def _drain(self) -> None:
        """Account for dropped views, unless someone (maybe this very thread, further up) holds _rlock: then
        they do it when they let go."""
        while self._dropped:
            if not self._rlock.acquire(blocking=False):
                return
            try:
                while self._dropped:
                    self._dropped.pop()[1] = True
                if not self._closed_here:
                    self._publish()
            except ValueError:  # closed meanwhile: the counter's memory is gone from this process's view
                pass
            finally:
                self._rlock.release()
