"""vLLM's ``MessageQueue`` (``vllm/distributed/device_communicators/shm_broadcast.py``), on our rings.

Swap the import and nothing else::

    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue   # before
    from transport.compat.vllm import MessageQueue                                  # after

What matches vLLM (its signatures and documented behaviour):

* ``MessageQueue(n_reader, n_local_reader, local_reader_ranks=None, max_chunk_bytes=..., max_chunks=...,
  connect_ip=None)``; ``export_handle()`` -> ``Handle`` (a picklable dataclass with vLLM's field names);
  ``create_from_handle(handle, rank)`` where ``rank`` is the process's rank in the group (found in
  ``local_reader_ranks``, not a 0-based reader index).
* ``wait_until_ready()`` is collective: every party calls it, and it returns once every reader is attached.
* ``enqueue(obj, timeout=None)``, ``dequeue(timeout=None, indefinite=False)``; ``acquire_write(timeout)`` and
  ``acquire_read(timeout, indefinite)`` are context managers lending one chunk as a writable memoryview;
  ``broadcast_object(obj=None)``; ``create_from_process_group(pg, max_chunk_bytes, max_chunks, writer_rank=0,
  external_writer_handle=None, blocking=True)`` for a torch ``ProcessGroup`` or a vLLM-style stateless group.
* ``shutdown()`` sets ``shutting_down`` and wakes this process's waiting reader (and writer), which raise
  ``RuntimeError("cancelled")``; a timeout raises ``TimeoutError``. Every error is a RuntimeError or a
  TimeoutError, as vLLM callers catch them.
* While a wait stays blocked, "No available shared memory broadcast block found in 60 seconds..." is logged every
  ``VLLM_RINGBUFFER_WARNING_INTERVAL`` seconds (environment, or the ``warning_interval_s`` attribute); a reader
  waiting with ``indefinite=True`` stays quiet, as in vLLM.

Where it differs, and why:

* Remote (other-node) readers (``n_local_reader < n_reader``, or a rank not in ``local_reader_ranks``) raise
  ``RemoteReadersUnsupported`` at once: these rings are one host's shared memory; the Ray backend
  (``backend=ray``) is how this project spans nodes. ``connect_ip`` is accepted and unused.
* Objects larger than a chunk stream through the ring (no ZeroMQ side socket), so the default chunk is ours
  (1 MiB x 8, transport/defaults.py) rather than vLLM's 24 MiB x 10, which alone would not fit a container's
  64 MiB /dev/shm. ``max_chunks=1`` gets two slots (the ring needs one it may write while another is read); a
  chunk size is rounded up to the ring's granularity (64 bytes, at least 4096).
* ``close()`` (also a context manager) releases the ring at once instead of waiting for garbage collection.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from transport import layout as L
from transport.defaults import SLOT_BYTES, SLOTS
from transport.errors import CorruptMessage, PeerDied, QueueClosed
from transport.reader import RingReader
from transport.ring import Handle as RingHandle
from transport.writer import RingWriter

logger = logging.getLogger(__name__)

WARNING_INTERVAL_S = float(os.environ.get("VLLM_RINGBUFFER_WARNING_INTERVAL", "60"))
LONG_WAIT_MESSAGE = ("No available shared memory broadcast block found in %g seconds. This typically happens "
                     "when some processes are hanging or doing some time-consuming work (e.g. compilation, "
                     "weight/kv cache quantization).")
_GRAIN = 64  # a slot's size is a multiple of this (transport/layout.py)


class ShmBroadcastError(RuntimeError):
    """A transport failure, as the RuntimeError vLLM callers catch (writer gone, corrupt ring, queue closed)."""


class Cancelled(ShmBroadcastError):
    """The wait was cancelled by ``shutdown()`` or the queue was closed: ``RuntimeError("cancelled")``."""


class RemoteReadersUnsupported(ShmBroadcastError, NotImplementedError):
    """A reader on another node: shared-memory rings cannot reach it."""


def _remote(what: str) -> RemoteReadersUnsupported:
    return RemoteReadersUnsupported(f"{what}: these rings are one host's shared memory; for readers on other nodes "
                                    f"use the Ray backend (backend=ray)")


@dataclass
class Handle:
    """What readers need to attach; vLLM's field names (the remote ones stay None here)."""

    local_reader_ranks: list[int] = field(default_factory=list)
    buffer_handle: RingHandle | None = None
    local_subscribe_addr: str | None = None
    remote_subscribe_addr: str | None = None
    remote_addr_ipv6: bool = False


@contextlib.contextmanager
def _vllm_errors():
    """Our transport errors as the exceptions vLLM callers catch (TimeoutError passes through: QueueTimeout is one)."""
    try:
        yield
    except QueueClosed as exc:
        raise Cancelled("cancelled") from exc
    except (PeerDied, CorruptMessage) as exc:
        raise ShmBroadcastError(str(exc)) from exc


class MessageQueue:
    """One writer, ``n_reader`` readers on this host; see the module docstring."""

    def __init__(self, n_reader: int, n_local_reader: int, local_reader_ranks: list[int] | None = None,
                 max_chunk_bytes: int = SLOT_BYTES, max_chunks: int = SLOTS, connect_ip: str | None = None) -> None:
        if n_local_reader < n_reader:
            raise _remote(f"{n_reader - n_local_reader} of {n_reader} readers are remote")
        if local_reader_ranks is None:
            local_reader_ranks = list(range(n_local_reader))
        elif len(local_reader_ranks) != n_local_reader:
            raise ValueError(f"local_reader_ranks has {len(local_reader_ranks)} ranks, n_local_reader is "
                             f"{n_local_reader}")
        slot_bytes = max(L.MIN_SLOT_BYTES, -(-max_chunk_bytes // _GRAIN) * _GRAIN)
        self._end = RingWriter(n_local_reader, slot_bytes, max(2, max_chunks))
        self._is_writer, self._is_local_reader = True, False
        self.n_reader = self.n_local_reader = n_local_reader
        self.local_reader_rank = -1
        self.handle = Handle(list(local_reader_ranks), self._end.export_handle())
        self._setup()

    def _setup(self) -> None:
        self.shutting_down = False
        self.warning_interval_s = WARNING_INTERVAL_S
        self._cancel = threading.Event()
        self._end.cancel_event = self._cancel
        self._end.on_long_wait = self._warn

    @staticmethod
    def create_from_handle(handle: Handle, rank: int) -> "MessageQueue":
        """Attach as the reader whose group rank is ``rank``."""
        if rank not in handle.local_reader_ranks:
            raise _remote(f"rank {rank} is not among the local reader ranks {handle.local_reader_ranks}")
        self = MessageQueue.__new__(MessageQueue)
        self.handle = handle
        self.local_reader_rank = handle.local_reader_ranks.index(rank)
        self._end = RingReader(handle.buffer_handle, self.local_reader_rank)
        self._is_writer, self._is_local_reader = False, True
        self.n_reader = self.n_local_reader = len(handle.local_reader_ranks)
        self._setup()
        return self

    def export_handle(self) -> Handle:
        return self.handle

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Collective: returns in every party once every reader has attached."""
        with _vllm_errors():
            if self._is_writer:
                self._end.wait_until_ready(timeout)
            else:
                self._end.wait_all_attached(timeout)

    # -- messages ------------------------------------------------------------------------------------------------
    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        if not self._is_writer:
            raise ShmBroadcastError("Only writers can enqueue")
        self._arm(warn=True)
        with _vllm_errors():
            self._end.enqueue(obj, timeout)

    def dequeue(self, timeout: float | None = None, indefinite: bool = False) -> Any:
        if self._is_writer:
            raise ShmBroadcastError("Only readers can dequeue")
        self._arm(warn=not indefinite)
        with _vllm_errors():
            return self._end.dequeue(timeout)

    def broadcast_object(self, obj: Any = None) -> Any:
        """The writer sends ``obj`` and returns it; a reader returns what the writer sent."""
        if self._is_writer:
            self.enqueue(obj)
            return obj
        return self.dequeue()

    @contextlib.contextmanager
    def acquire_write(self, timeout: float | None = None):
        """The next chunk as a writable memoryview (``max_chunk_bytes`` long); published when the block exits."""
        if not self._is_writer:
            raise ShmBroadcastError("Only writers can acquire write")
        self._arm(warn=True)
        with _vllm_errors(), self._end.reserve(timeout) as buf:
            yield buf

    @contextlib.contextmanager
    def acquire_read(self, timeout: float | None = None, indefinite: bool = False):
        """The next chunk as a memoryview (read it inside the block); the slot is handed back when it exits."""
        if self._is_writer:
            raise ShmBroadcastError("Only readers can acquire read")
        self._arm(warn=not indefinite)
        with _vllm_errors(), self._end.borrow(timeout) as buf:
            yield buf

    # -- waking, warning, closing --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Wake this process's waiting reader or writer so it can clean up: its wait raises RuntimeError."""
        self.shutting_down = True
        self._cancel.set()

    def _arm(self, warn: bool) -> None:
        if self.shutting_down:
            raise Cancelled("cancelled")
        self._end.long_wait_s = self.warning_interval_s if warn else None

    def _warn(self, what: str, waited_s: float) -> None:
        if self._end.long_wait_s:
            logger.warning(LONG_WAIT_MESSAGE, round(waited_s, 1))

    def close(self) -> None:
        self._end.close()

    def __enter__(self) -> "MessageQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- process groups ------------------------------------------------------------------------------------------
    @staticmethod
    def create_from_process_group(pg: Any, max_chunk_bytes: int = SLOT_BYTES, max_chunks: int = SLOTS,
                                  writer_rank: int = 0, external_writer_handle: Handle | None = None,
                                  blocking: bool = True) -> "MessageQueue":
        """One writer (``writer_rank``) and every other rank of ``pg`` a reader: the writer creates the queue and
        broadcasts its handle over ``pg``. ``pg`` is a torch ``ProcessGroup`` or has ``rank``, ``world_size``,
        ``broadcast_obj(obj, src)`` and ``all_gather_obj(obj)`` (vLLM's StatelessProcessGroup)."""
        group = _Group(pg)
        hosts = group.all_gather(socket.gethostname())
        away = [r for r, h in enumerate(hosts) if h != hosts[writer_rank]]
        if away:
            raise _remote(f"ranks {away} are on another node than writer rank {writer_rank}")
        if group.rank == writer_rank:
            if external_writer_handle is not None:
                queue = MessageQueue.create_from_handle(external_writer_handle, group.rank)
            else:
                readers = [r for r in range(group.world_size) if r != writer_rank]
                queue = MessageQueue(len(readers), len(readers), readers, max_chunk_bytes, max_chunks)
            group.broadcast(queue.export_handle(), writer_rank)
        else:
            queue = MessageQueue.create_from_handle(group.broadcast(None, writer_rank), group.rank)
        if blocking:
            queue.wait_until_ready()
        return queue


class _Group:
    """The three collectives create_from_process_group needs, over torch.distributed or a stateless group."""

    def __init__(self, pg: Any) -> None:
        self.pg = pg
        self.torch = not hasattr(pg, "broadcast_obj")
        if self.torch:
            import torch.distributed as dist

            self.dist = dist
            self.rank, self.world_size = dist.get_rank(pg), dist.get_world_size(pg)
            self.ranks = dist.get_process_group_ranks(pg)
        else:
            self.rank, self.world_size = pg.rank, pg.world_size

    def broadcast(self, obj: Any, src: int) -> Any:
        if not self.torch:
            return self.pg.broadcast_obj(obj, src)
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.ranks[src], group=self.pg)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if not self.torch:
            return self.pg.all_gather_obj(obj)
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.pg)
        return out
