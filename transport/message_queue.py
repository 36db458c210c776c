"""MessageQueue: one writer, N readers, over a ring of fixed-size slots in one shared-memory segment.

::

    writer process                        segment memfd rvq-<pid>-<random> (transport/shm.py; or a /dev/shm name)
    enqueue(obj) --encode--> pieces --copy--> [slot 0][slot 1]...[slot k-1] --copy--> reader 0: dequeue() -> obj
                                              pub: chunks published         --copy--> reader 1 ...
                                              consumed[r]: chunks reader r released
                     futex rwake: readers sleep here;  futex wwake: the writer sleeps here when the ring is full

The same queue serves the supervisor's 1->N broadcast of requests and each worker's 1->1 reply queue. This module
is the public face only: ``MessageQueue(n_reader, ...)`` returns the writer end (transport/writer.py),
``MessageQueue.create_from_handle(handle, rank)`` a reader end (transport/reader.py, or transport/zero_copy.py);
both are ``MessageQueue`` instances. What they share (mapping, spin policy, sleep, close) is transport/ring.py.
Layout, protocol and state table: transport/layout.py. Waits and fences: transport/_sync.py. Framing:
transport/codec.py.

``close()`` by any party closes the queue for every party (it is how a shutdown wakes everyone). Messages
already published stay readable. A ``dequeue`` that times out in the middle of a multi-slot message drops
that message for this reader (it is never delivered in part).
"""
from __future__ import annotations

import abc
import threading
from typing import Any

from transport.defaults import MAX_MESSAGE_BYTES, SLOT_BYTES, SLOTS
from transport.reader import RingReader
from transport.ring import Handle, Ring
from transport.writer import RingWriter
from transport.zero_copy import ZeroCopyReader

__all__ = ["Handle", "MessageQueue"]


class MessageQueue(abc.ABC):
    """Create as the writer with ``MessageQueue(n_reader, ...)``; attach readers with ``create_from_handle``.

    ``max_chunk_bytes`` is the payload size of one slot and ``max_chunks`` the number of slots: a message larger
    than a slot is streamed through consecutive slots. ``max_message_bytes`` bounds what a header may announce.

    Both ends offer: ``enqueue(obj, timeout)`` (writer), ``dequeue(timeout, cancel)`` (reader; the other end's
    call raises RuntimeError), ``wait_until_ready(timeout)`` (writer: every reader attached; reader: no-op),
    ``export_handle()``, ``name``, ``cancel_all()``, ``close()``, ``closed``, and use as a context manager.
    ``named=True`` makes the writer's segment a /dev/shm file instead of an anonymous memfd (transport/shm.py says
    when that is needed); readers follow the handle.
    """

    def __new__(
        cls,
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
    ) -> Any:
        # The writer is a registered (virtual) subclass, so type.__call__ does not run __init__ on it again.
        return RingWriter(n_reader, max_chunk_bytes, max_chunks, spin_us, max_message_bytes, spin_yield=spin_yield,
                          spin_adaptive=spin_adaptive, named=named, _fences=_fences)

    @classmethod
    def create_from_handle(cls, handle: Handle, reader_rank: int, *, zero_copy: bool = False,
                           _fences: str = "auto") -> Any:
        """Attach to a queue as reader ``reader_rank`` (0-based), in any process (spawn, forkserver or fork).

        ``zero_copy=True``: big arrays and tensors come back as views straight into the ring instead of copies;
        each such message keeps its slot from being reused until its arrays are dropped (see
        transport/zero_copy.py for the rules)."""
        return (ZeroCopyReader if zero_copy else RingReader)(handle, reader_rank, _fences=_fences)

    # the calls both ends answer, for readers of this file and for type checkers
    def enqueue(self, obj: Any, timeout: float | None = None) -> None: ...

    def dequeue(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Any: ...

    def wait_until_ready(self, timeout: float | None = None) -> None: ...


MessageQueue.register(Ring)
