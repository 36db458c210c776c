"""Memory layout of one ring segment, and the protocol its words carry.

::

    offset 0   line 0, written once by the writer at creation (``closed`` by any party, 0 -> 1 only)
               0 magic "RVRING02"   8 version u32   12 n_readers u32   16 n_slots u32   20 slot_bytes u32
               24 writer_pid u32    28 closed u32   32 max_message_bytes u64   40 writer_start u64
               48 asym u32 (1: sleepers use heavy_fence, hot paths of registered processes skip the fence)
    offset 64  line 1, the writer's words
               64 pub u32             chunks published so far (mod 2**32); a reader's "is there news" check
               68 rwake u32           futex word the readers sleep on; bumped (atomic add) to wake them
               72 writer_sleeping u32 1 while the writer is (about to be) asleep on ``wwake``
               76 wake_target u32     the chunk count a reader must reach to wake the sleeping writer
    offset 128 line 2, the readers' shared words
               128 sleepers u32       readers (about to be) asleep on ``rwake``; atomic add / sub
               132 wwake u32          futex word the writer sleeps on; bumped (atomic add) to wake it
    offset 192 reader records, one 64-byte line per reader (no false sharing between readers):
               +0 consumed u32        chunks this reader has released (mod 2**32)
               +4 pid u32   +8 start_time u64 (clock ticks after boot: tells a reused pid apart)
               +16 attached u32       1 once the reader has mapped the segment
               +20 lends u32          1 if the reader lends slots out (transport/zero_copy.py): a slot may stay
                                      pinned, so a writer on a full ring waits for one free slot, not half
    META       (64-aligned) n_slots chunk records of 16 bytes:  seq u32, length u32, kind u32, 0 u32
    DATA       (page-aligned) n_slots payloads of slot_bytes bytes

Chunk ``c`` (the c-th chunk ever published, counting from 0) lives in slot ``c % n_slots``; its record says
``seq = c`` (mod 2**32), the payload bytes used, and ``kind``:

    kind                  payload
    --------------------  ----------------------------------------------------------------------------------
    FIRST|LAST|PICKLE (7) a whole message that is a bare pickle (no out-of-band buffers): unpickled in place
    FIRST|LAST (3)        a whole message as a codec frame (header, pickle, out-of-band buffers)
    FIRST (1)             the first chunk of a codec frame larger than a slot (holds the whole frame header)
    0                     a middle chunk of such a frame
    LAST (2)              its last chunk
    anything else         corrupt

Counters are compared modulo 2**32, so they may wrap.

Protocol (one writer W, readers r = 0..n-1; ``pub`` and ``consumed[r]`` only ever grow):

    condition                               reader r (at chunk c = consumed[r])   writer (at chunk w = pub)
    --------------------------------------  ------------------------------------  --------------------------
    pub == c                                nothing new: spin, then sleep          -
    1 <= pub - c <= n_slots                 chunk c is readable: copy it out,      -
                                            then store consumed[r] = c + 1
    w - consumed[r] < n_slots for every r   -                                      slot w % n_slots is free:
                                                                                   write payload + record,
                                                                                   then store pub = w + 1
    w - consumed[r] == n_slots for some r   -                                      ring full: wait for r
    pub - c > n_slots, seq != c, bad kind,  CorruptMessage                         (writer: CorruptMessage
    length > slot_bytes                                                            if w - consumed[r] > n_slots)

Memory ordering (``transport/_sync.py``): the writer stores payload and record, then (release) ``pub``; a
reader loads ``pub`` and then (acquire) the record and payload. A reader finishes its copy, then (release)
stores ``consumed[r]``; the writer loads every ``consumed[r]`` before (acquire) it overwrites a slot. So a
reader never sees a slot being rewritten, and the writer never rewrites a slot someone is still copying.

Sleeping (Dekker's pattern, so that no wake-up is lost):

    reader:  s = rwake; sleepers += 1 (atomic, a full fence); if pub != c: go; else futex_wait(rwake, s)
    writer:  store pub; full fence; if sleepers: rwake += 1 (atomic); futex_wake(rwake, all)
    writer:  wake_target = t; s = wwake; writer_sleeping = 1; full fence; reload consumed[*];
             if some consumed[r] < t: futex_wait(wwake, s)
    reader:  store consumed[r] = c; full fence; if writer_sleeping and c >= wake_target:
             wwake += 1 (atomic); futex_wake(wwake)

When ``asym`` is set (the writer registered for ``membarrier``, transport/_sync.py), "full fence" above means
``heavy_fence()`` on the sleeper's side, and nothing at all on the hot paths of registered processes: the
sleeper's membarrier puts a full barrier on their CPUs at that moment, which is what Dekker needs.

Either the sleeper sees the news, or the publisher sees the sleeper and changes the futex word, which makes a
``futex_wait`` that has not started yet return at once. A writer that has to sleep on a full ring sets
``wake_target`` so that it is woken when half the ring is free, not after every slot: one sleep per half ring
instead of one per message while readers lag (it may spin-poll for a single slot before that). If a reader
lends slots out, half the ring may never come free while that reader waits for news: then the writer waits for
one slot. ``close()``
(any party) stores ``closed = 1``, fences, and bumps and wakes both futex words: every sleeper in every process
wakes up and sees ``closed``.

A message larger than one slot spans consecutive chunks: the first has FIRST, the last LAST, every chunk but
the last is full. A reader that finds FIRST where it expected a continuation drops the partial message (the
writer died or gave up in the middle), and a chunk without FIRST where a message should start is skipped, so a
torn message is never delivered. Each chunk is released as soon as it is copied, so the writer streams a
message of any size through a small ring at the pace of the slowest reader, and no reader can block another.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"RVRING02"
VERSION = 2
MASK = 0xFFFFFFFF

# line 0
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_NREADERS = 12
OFF_NSLOTS = 16
OFF_SLOT_BYTES = 20
OFF_WRITER_PID = 24
OFF_CLOSED = 28
OFF_MAX_MESSAGE = 32
OFF_WRITER_START = 40
OFF_ASYM = 48
# line 1
OFF_PUB = 64
OFF_RWAKE = 68
OFF_WRITER_SLEEPING = 72
OFF_WAKE_TARGET = 76
# line 2
OFF_SLEEPERS = 128
OFF_WWAKE = 132
# reader records
OFF_READERS = 192
READER_STRIDE = 64
R_CONSUMED = 0
R_PID = 4
R_START = 8
R_ATTACHED = 16
R_LENDS = 20
# chunk records
META_STRIDE = 16
M_SEQ = 0
M_LENGTH = 4
M_KIND = 8

FIRST = 1
LAST = 2
PICKLE = 4
WHOLE = FIRST | LAST
PICKLED = FIRST | LAST | PICKLE
VALID_KINDS = frozenset((0, FIRST, LAST, WHOLE, PICKLED))

MAX_READERS = 1024
MAX_SLOTS = 1 << 16
MIN_SLOT_BYTES = 4096
MESSAGE_LIMIT = 1 << 48  # max_message_bytes stays below it: a larger header is corrupt

_GEOMETRY = struct.Struct("<8sIIII")  # magic, version, n_readers, n_slots, slot_bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Byte offsets of every field for a given geometry."""

    n_readers: int
    n_slots: int
    slot_bytes: int

    def reader(self, r: int) -> int:
        return OFF_READERS + r * READER_STRIDE

    @property
    def meta(self) -> int:
        return _align(OFF_READERS + self.n_readers * READER_STRIDE, 64)

    @property
    def data(self) -> int:
        return _align(self.meta + self.n_slots * META_STRIDE, 4096)

    @property
    def size(self) -> int:
        return self.data + self.n_slots * self.slot_bytes

    def slot_meta(self, i: int) -> int:
        return self.meta + i * META_STRIDE

    def slot_data(self, i: int) -> int:
        return self.data + i * self.slot_bytes

    def check(self) -> None:
        """Bounds that a header must satisfy before anything is derived from it."""
        if not 1 <= self.n_readers <= MAX_READERS:
            raise ValueError(f"n_readers must be in 1..{MAX_READERS}, got {self.n_readers}")
        if not 2 <= self.n_slots <= MAX_SLOTS:
            raise ValueError(f"max_chunks (slots) must be in 2..{MAX_SLOTS}, got {self.n_slots}")
        if not MIN_SLOT_BYTES <= self.slot_bytes < (1 << 32) or self.slot_bytes % 64:
            raise ValueError(f"max_chunk_bytes must be a multiple of 64 in {MIN_SLOT_BYTES}..4 GiB, "
                             f"got {self.slot_bytes}")


def write_geometry(buf, layout: Layout, writer_pid: int, writer_start: int, max_message: int) -> None:
    _GEOMETRY.pack_into(buf, 0, MAGIC, VERSION, layout.n_readers, layout.n_slots, layout.slot_bytes)
    _U32.pack_into(buf, OFF_WRITER_PID, writer_pid)
    _U64.pack_into(buf, OFF_MAX_MESSAGE, max_message)
    _U64.pack_into(buf, OFF_WRITER_START, writer_start)


@dataclass(frozen=True)
class Header:
    layout: Layout
    writer_pid: int
    writer_start: int
    max_message: int


def read_geometry(buf, size: int) -> Header:
    """Parse and bounds-check a segment header before anything is derived from it."""
    from transport.errors import CorruptMessage

    if size < OFF_READERS:
        raise CorruptMessage(f"segment of {size} bytes is too small for a ring header")
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
    (pid,) = _U32.unpack_from(buf, OFF_WRITER_PID)
    (max_message,) = _U64.unpack_from(buf, OFF_MAX_MESSAGE)
    (start,) = _U64.unpack_from(buf, OFF_WRITER_START)
    if not 0 < max_message < MESSAGE_LIMIT:
        raise CorruptMessage(f"corrupt ring header: max_message_bytes {max_message}")
    return Header(layout, pid, start, max_message)


def check_chunk(seq: int, length: int, kind: int, expected_seq: int, slot_bytes: int) -> None:
    """Raise CorruptMessage unless a chunk record is plausible (called only when the fast check fails)."""
    from transport.errors import CorruptMessage

    if seq != expected_seq:
        raise CorruptMessage(f"chunk record says seq {seq}, reader expected {expected_seq}")
    if kind not in VALID_KINDS:
        raise CorruptMessage(f"chunk {seq} has unknown kind flags 0x{kind:x}")
    if length > slot_bytes:
        raise CorruptMessage(f"chunk {seq} claims {length} bytes (slot size {slot_bytes})")
    if not kind & LAST and length != slot_bytes:
        raise CorruptMessage(f"chunk {seq} is not the last of its message but holds {length} of {slot_bytes} bytes")
