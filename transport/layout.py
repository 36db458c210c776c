"""Memory layout of one ring segment and the meaning of its flags.

::

    offset 0     header (64 bytes)
                 0  magic "RVRING01"        8  version u32        12 n_readers u32
                 16 n_slots u32             20 slot_bytes u32     24 writer_pid u32
                 28 closed u32              32 write_seq u32 (futex: readers sleep on it)
                 36 ack_seq u32 (futex: the writer sleeps on it; readers bump it after attaching or freeing)
                 40 writer_waiting u8       48 max_message_bytes u64
    64           reader_pid[n_readers] u32       each reader writes its own entry when it attaches
                 attached[n_readers] u8          1 once reader r has mapped the segment
                 waiting[n_readers] u8           1 while reader r is (about to be) asleep in the kernel
    META (64-aligned)  n_slots slot records of STRIDE bytes:
                 0 written u8   1 kind u8 (FIRST=1 | LAST=2)   4 length u32 (payload bytes used)
                 8 read[n_readers] u8
    DATA (page-aligned) n_slots payloads of slot_bytes bytes

Slot flag states (one writer, readers r = 0..n-1):

    written  read[r]        reader r                              writer
    -------  -------------  ------------------------------------  -----------------------------------
    0        any            nothing to read here yet: wait         free (never used, or being rewritten)
    1        0              unread: copy out, then set read[r]=1   busy: wait
    1        1 (all r)      already read: wait for the next round  free: clear written, then read[*], write

The writer clears ``written`` before it clears the read flags, so a reader never sees "written, unread" over
stale bytes; it sets ``written`` only after the payload and length (release order). A reader checks the flags
before it reads the payload (acquire order) and sets its read flag only after its copy is complete.

A message that does not fit one slot spans consecutive slots: the first carries FIRST, the last LAST. A reader
that finds FIRST where it expected a continuation drops the partial message (the writer died or gave up in the
middle), so a torn message is never delivered.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"RVRING01"
VERSION = 1
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_NREADERS = 12
OFF_NSLOTS = 16
OFF_SLOT_BYTES = 20
OFF_WRITER_PID = 24
OFF_CLOSED = 28
OFF_WRITE_SEQ = 32
OFF_ACK_SEQ = 36
OFF_WRITER_WAITING = 40
OFF_MAX_MESSAGE = 48
OFF_READERS = 64

FIRST = 1
LAST = 2

MAX_READERS = 1024
MAX_SLOTS = 1 << 16
MIN_SLOT_BYTES = 4096

_GEOMETRY = struct.Struct("<8sIIII")  # magic, version, n_readers, n_slots, slot_bytes


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Byte offsets of every field for a given geometry."""

    n_readers: int
    n_slots: int
    slot_bytes: int

    @property
    def reader_pids(self) -> int:
        return OFF_READERS

    @property
    def attached(self) -> int:
        return OFF_READERS + 4 * self.n_readers

    @property
    def waiting(self) -> int:
        return self.attached + self.n_readers

    @property
    def meta(self) -> int:
        return _align(self.waiting + self.n_readers, 64)

    @property
    def stride(self) -> int:
        return _align(8 + self.n_readers, 8)

    @property
    def data(self) -> int:
        return _align(self.meta + self.n_slots * self.stride, 4096)

    @property
    def size(self) -> int:
        return self.data + self.n_slots * self.slot_bytes

    def slot_meta(self, i: int) -> int:
        return self.meta + i * self.stride

    def slot_data(self, i: int) -> int:
        return self.data + i * self.slot_bytes

    def check(self) -> None:
        """Bounds that a header must satisfy before anything is derived from it."""
        if not 1 <= self.n_readers <= MAX_READERS:
            raise ValueError(f"n_readers must be in 1..{MAX_READERS}, got {self.n_readers}")
        if not 2 <= self.n_slots <= MAX_SLOTS:
            raise ValueError(f"max_chunks (slots) must be in 2..{MAX_SLOTS}, got {self.n_slots}")
        if not MIN_SLOT_BYTES <= self.slot_bytes < (1 << 32) or self.slot_bytes % 64:
            raise ValueError(f"max_chunk_bytes must be a multiple of 64 in {MIN_SLOT_BYTES}..4 GiB, got {self.slot_bytes}")


def write_geometry(buf, layout: Layout, writer_pid: int, max_message: int) -> None:
    _GEOMETRY.pack_into(buf, 0, MAGIC, VERSION, layout.n_readers, layout.n_slots, layout.slot_bytes)
    struct.pack_into("<I", buf, OFF_WRITER_PID, writer_pid)
    struct.pack_into("<Q", buf, OFF_MAX_MESSAGE, max_message)


def read_geometry(buf, size: int) -> tuple[Layout, int, int]:
    """Parse and bounds-check a segment header: (layout, writer_pid, max_message_bytes)."""
    from transport.errors import CorruptMessage

    magic, version, n_readers, n_slots, slot_bytes = _GEOMETRY.unpack_from(buf, 0)
    if magic != MAGIC or version != VERSION:
        raise CorruptMessage(f"not a ring segment (magic {magic!r}, version {version})")
    layout = Layout(n_readers, n_slots, slot_bytes)
    try:
        layout.check()
    except ValueError as exc:
        raise CorruptMessage(f"corrupt ring header: {exc}") from None
    if layout.size != size:
        raise CorruptMessage(f"ring header describes {layout.size} bytes, segment has {size}")
    (pid,) = struct.unpack_from("<I", buf, OFF_WRITER_PID)
    (max_message,) = struct.unpack_from("<Q", buf, OFF_MAX_MESSAGE)
    return layout, pid, max_message
