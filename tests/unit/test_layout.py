"""Pure tests of the ring layout, and the header fuzz target shared with scripts/fuzz_headers.py.

``corrupt_and_read`` builds a small ring in this process, publishes a few messages of every kind (bare pickle,
one-slot frame with an array, a frame streamed over several slots), overwrites header words with arbitrary
values, then reads and writes with zero timeouts. Whatever the values, the ring must answer with a value or a
transport error: never a crash, a hang, another exception type, or an allocation beyond max_message_bytes.
"""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from transport import MessageQueue, codec, layout as L
from transport.errors import CorruptMessage, QueueClosed, QueueTimeout, TransportError

# -- layout -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,slots,size", [(1, 2, 4096), (3, 8, 65536), (8, 16, 1 << 20), (1024, 2, 4096)])
def test_offsets_are_aligned_and_disjoint(n, slots, size):
    lay = L.Layout(n, slots, size)
    lay.check()
    assert lay.reader(n - 1) + L.READER_STRIDE <= lay.meta
    assert lay.meta % 64 == 0 and lay.data % 4096 == 0
    assert lay.slot_meta(slots - 1) + L.META_STRIDE <= lay.data
    assert lay.size == lay.data + slots * size
    # hot words sit on separate cache lines: the writer's, the readers' shared ones, and each reader's own
    assert L.OFF_PUB // 64 != L.OFF_SLEEPERS // 64 != L.OFF_READERS // 64
    for off in (L.OFF_PUB, L.OFF_RWAKE, L.OFF_WRITER_SLEEPING, L.OFF_WAKE_TARGET, L.OFF_SLEEPERS, L.OFF_WWAKE,
                L.OFF_CLOSED, L.OFF_ASYM):
        assert off % 4 == 0  # futex words and u32 counters must be naturally aligned


@pytest.mark.parametrize("n,slots,size,match", [
    (0, 4, 4096, "n_readers"), (L.MAX_READERS + 1, 4, 4096, "n_readers"), (1, 1, 4096, "slots"),
    (1, L.MAX_SLOTS + 1, 4096, "slots"), (1, 4, 4095, "max_chunk_bytes"), (1, 4, 4096 + 1, "max_chunk_bytes"),
    (1, 4, 1 << 32, "max_chunk_bytes"),
])
def test_geometry_bounds(n, slots, size, match):
    with pytest.raises(ValueError, match=match):
        L.Layout(n, slots, size).check()


def _header(lay: L.Layout, **override) -> bytearray:
    buf = bytearray(lay.size)
    L.write_geometry(buf, lay, 1234, 99, 1 << 20)
    for off, fmt, value in override.values():
        struct.pack_into(fmt, buf, off, value)
    return buf


@pytest.mark.parametrize("field", [
    {"magic": (0, "<8s", b"RVRING01")}, {"version": (L.OFF_VERSION, "<I", 1)},
    {"n": (L.OFF_NREADERS, "<I", 0)}, {"n": (L.OFF_NREADERS, "<I", 5000)},
    {"slots": (L.OFF_NSLOTS, "<I", 1 << 30)}, {"size": (L.OFF_SLOT_BYTES, "<I", 0xFFFFFFFF)},
    {"geometry": (L.OFF_NSLOTS, "<I", 3)}, {"max": (L.OFF_MAX_MESSAGE, "<Q", 0)},
    {"max": (L.OFF_MAX_MESSAGE, "<Q", 1 << 60)},
])
def test_read_geometry_rejects_corrupt_headers(field):
    lay = L.Layout(2, 4, 4096)
    with pytest.raises(CorruptMessage):
        L.read_geometry(_header(lay, **field), lay.size)


def test_read_geometry_round_trip():
    lay = L.Layout(2, 4, 4096)
    head = L.read_geometry(_header(lay), lay.size)
    assert (head.layout, head.writer_pid, head.writer_start, head.max_message) == (lay, 1234, 99, 1 << 20)


@pytest.mark.parametrize("seq,length,kind,match", [
    (5, 10, L.WHOLE, "seq"), (0, 10, 4, "kind"), (0, 10, 0x10, "kind"), (0, 5000, L.WHOLE, "claims"),
    (0, 100, L.FIRST, "not the last"),
])
def test_check_chunk(seq, length, kind, match):
    with pytest.raises(CorruptMessage, match=match):
        L.check_chunk(seq, length, kind, 0, 4096)


# -- the fuzz target ----------------------------------------------------------------------------------------------
SLOT = 4096
SLOTS = 8
MAX_MESSAGE = 1 << 16
OK_ERRORS = (CorruptMessage, QueueTimeout, QueueClosed)


def fields(lay: L.Layout) -> list[tuple[str, int, str]]:
    """(name, offset, struct format) of every header word a corruption may hit."""
    out = [("pub", L.OFF_PUB, "<I"), ("rwake", L.OFF_RWAKE, "<I"), ("sleepers", L.OFF_SLEEPERS, "<I"),
           ("wwake", L.OFF_WWAKE, "<I"), ("writer_sleeping", L.OFF_WRITER_SLEEPING, "<I"),
           ("closed", L.OFF_CLOSED, "<I"), ("consumed0", lay.reader(0) + L.R_CONSUMED, "<I")]
    for s in range(5):  # the chunk records of the five chunks the messages below occupy
        m = lay.slot_meta(s)
        out += [(f"seq{s}", m + L.M_SEQ, "<I"), (f"length{s}", m + L.M_LENGTH, "<I"), (f"kind{s}", m + L.M_KIND, "<I")]
    for s in (1, 2):  # the frame headers (slot 0 is a bare pickle; 3 and 4 continue slot 2's frame)
        d = lay.slot_data(s)
        out += [(f"frame_magic{s}", d, "<I"), (f"frame_nbuf{s}", d + 4, "<I"), (f"frame_main{s}", d + 8, "<Q")]
    return out + [("frame_buf0_1", lay.slot_data(1) + 16, "<Q")]  # the array's length (slot 2's frame has none)


GEOMETRY = [("magic", 0, "<Q"), ("version", L.OFF_VERSION, "<I"), ("n_readers", L.OFF_NREADERS, "<I"),
            ("n_slots", L.OFF_NSLOTS, "<I"), ("slot_bytes", L.OFF_SLOT_BYTES, "<I"),
            ("max_message", L.OFF_MAX_MESSAGE, "<Q")]
_FIELDS = fields(L.Layout(1, SLOTS, SLOT))
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, SLOTS, SLOTS + 1, SLOT - 1, SLOT, SLOT + 1, MAX_MESSAGE,
               MAX_MESSAGE + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 64) - 1]


def _fit(fmt: str, value: int) -> int:
    return value & (0xFFFFFFFF if fmt == "<I" else 0xFFFFFFFFFFFFFFFF)


def _messages():
    return [{"small": list(range(5))}, np.arange(300, dtype=np.float64), b"z" * (2 * SLOT + 100)]


class Rig:
    """A ring holding three messages, and a snapshot of its bytes, so that each fuzz input starts from the same
    state without creating a segment (the fuzz script runs 100,000 inputs)."""

    def __init__(self) -> None:
        self.q = MessageQueue(1, SLOT, SLOTS, spin_us=0, max_message_bytes=MAX_MESSAGE)
        self.r = MessageQueue.create_from_handle(self.q.export_handle(), 0)
        for m in _messages():
            self.q.enqueue(m, timeout=0)
        self.snapshot = bytes(self.q._mv)
        self.writer_state = (self.q._w, self.q._limit, self.q._slot)

    def reset(self) -> None:
        self.q._mv[:] = self.snapshot
        self.q._w, self.q._limit, self.q._slot = self.writer_state
        self.r._c = self.r._slot = 0

    def run(self, mutations: list[tuple[int, int]], geometry: list[tuple[int, int]] = ()) -> list[str]:
        """Apply ``mutations`` ((index into fields, value)); read and write with zero timeouts. Returns what
        happened; raises AssertionError on a breach of the contract."""
        self.reset()
        q, r = self.q, self.r
        outcomes = []
        real_alloc = codec.alloc

        def bounded_alloc(n):
            assert n <= MAX_MESSAGE, f"allocation of {n} bytes from a corrupt header"
            return real_alloc(n)

        codec.alloc = bounded_alloc
        try:
            for idx, value in mutations:
                name, off, fmt = _FIELDS[idx % len(_FIELDS)]
                struct.pack_into(fmt, q._mv, off, _fit(fmt, value))
            for _ in range(4):
                outcomes.append(_attempt("dequeue", lambda: r.dequeue(timeout=0)))
            outcomes.append(_attempt("enqueue", lambda: q.enqueue({"after": 1}, timeout=0)))
            outcomes.append(_attempt("dequeue", lambda: r.dequeue(timeout=0)))
        finally:
            codec.alloc = real_alloc
        if geometry:
            outcomes.append(_attach_corrupt(geometry))
        return outcomes

    def close(self) -> None:
        self.r.close()
        self.q.close()


def corrupt_and_read(mutations, geometry=()) -> list[str]:
    rig = Rig()
    try:
        return rig.run(mutations, geometry)
    finally:
        rig.close()


def _attempt(what: str, fn) -> str:
    t0 = time.monotonic()
    try:
        out = fn()
        result = f"{what} -> {type(out).__name__}" if what == "dequeue" else f"{what} ok"
    except OK_ERRORS as exc:
        result = f"{what} {type(exc).__name__}"
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"a zero-timeout call took {elapsed:.2f} s"
    return result


def _attach_corrupt(geometry) -> str:
    """A reader attaching to a segment with a corrupt geometry gets a clear error, never a bad mapping."""
    q = MessageQueue(2, SLOT, SLOTS, spin_us=0, max_message_bytes=MAX_MESSAGE)
    try:
        for idx, value in geometry:
            name, off, fmt = GEOMETRY[idx % len(GEOMETRY)]
            struct.pack_into(fmt, q._mv, off, _fit(fmt, value))
        try:
            r = MessageQueue.create_from_handle(q.export_handle(), 0)
        except (CorruptMessage, ValueError) as exc:
            return f"attach {type(exc).__name__}"
        r.close()
        return "attach ok"
    finally:
        q.close()


def test_uncorrupted_ring_delivers_everything():
    out = corrupt_and_read([])
    assert out == ["dequeue -> dict", "dequeue -> ndarray", "dequeue -> bytes", "dequeue QueueTimeout", "enqueue ok",
                   "dequeue -> dict"]


@pytest.mark.parametrize("name,value,expect", [
    ("pub", 100, "CorruptMessage"), ("seq0", 7, "CorruptMessage"), ("kind0", 9, "CorruptMessage"),
    ("length0", SLOT + 1, "CorruptMessage"), ("frame_magic1", 0, "CorruptMessage"),
    ("frame_main1", 1 << 40, "CorruptMessage"), ("frame_nbuf2", 1 << 20, "CorruptMessage"),
    ("frame_main2", 1 << 40, "CorruptMessage"), ("closed", 1, "dequeue -> dict"),
])
def test_named_corruptions(name, value, expect):
    idx = [f[0] for f in _FIELDS].index(name)
    out = corrupt_and_read([(idx, value)])
    assert any(expect in o for o in out), out


def test_corrupt_consumed_counter_is_reported_to_the_writer():
    idx = [f[0] for f in _FIELDS].index("consumed0")
    q = MessageQueue(1, SLOT, SLOTS, spin_us=0)
    r = MessageQueue.create_from_handle(q.export_handle(), 0)
    try:
        struct.pack_into("<I", q._mv, _FIELDS[idx][1], 0x80000000)
        with pytest.raises(CorruptMessage, match="behind"):
            for _ in range(SLOTS + 1):
                q.enqueue(1, timeout=0)
    finally:
        r.close()
        q.close()


_values = st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1), st.integers(0, 64))
_mutation = st.tuples(st.integers(0, len(_FIELDS) - 1), _values)
_geometry = st.tuples(st.integers(0, len(GEOMETRY) - 1), _values)


def test_fuzzed_headers_never_crash_hang_or_over_allocate():
    rig = Rig()

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(st.lists(_mutation, min_size=1, max_size=4), st.lists(_geometry, max_size=2))
    def one(mutations, geometry):
        rig.run(mutations, geometry)

    try:
        one()
    finally:
        rig.close()


def test_transport_errors_share_a_base():
    for exc in OK_ERRORS:
        assert issubclass(exc, TransportError)
    assert issubclass(QueueTimeout, TimeoutError)
