"""Pure tests of the pickle-5 framing: round trips, out-of-band buffers copied once, bounds checks on every
length a header announces."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transport import codec
from transport.errors import CorruptMessage


def _join(pieces) -> bytearray:
    out = bytearray()
    for p in pieces:
        out += memoryview(p).cast("B")
    return out


def _roundtrip(obj):
    pieces, total = codec.encode(obj)
    frame = _join(pieces)
    assert len(frame) == total
    return codec.decode(frame), frame


@pytest.mark.parametrize("obj", [None, 0, b"", "", (), {"a": [1, 2, 3]}, b"x" * 100_000, list(range(1000))])
def test_plain_objects_round_trip(obj):
    out, _ = _roundtrip(obj)
    assert out == obj


@pytest.mark.parametrize("dtype", ["uint8", "int32", "float64", "complex64", "bool"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (2, 3, 4), (1000,)])
def test_arrays_travel_out_of_band_and_aligned(dtype, shape):
    arr = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    pieces, total = codec.encode({"x": arr, "tag": 1})
    main_len = len(pieces[1])
    assert main_len < 400, "array bytes must not be pickled in-band"
    frame = _join(pieces)
    out = codec.decode(frame)
    np.testing.assert_array_equal(out["x"], arr)
    assert out["x"].dtype == arr.dtype
    if arr.nbytes:
        # the array points into the frame (the reader's one copy), 64-byte aligned
        addr = out["x"].__array_interface__["data"][0]
        base = np.frombuffer(frame, np.uint8).__array_interface__["data"][0]
        assert base <= addr < base + len(frame)
        assert (addr - base) % codec.ALIGN == 0


def test_non_contiguous_array_round_trips():
    arr = np.arange(100, dtype=np.int64).reshape(10, 10)[:, ::3]
    out, _ = _roundtrip(arr)
    np.testing.assert_array_equal(out, arr)


def test_several_buffers_keep_their_order():
    arrs = [np.full(n, n % 251, dtype=np.uint8) for n in (0, 1, 63, 64, 65, 4096)]
    out, _ = _roundtrip(arrs)
    for a, b in zip(arrs, out):
        np.testing.assert_array_equal(a, b)


def test_frame_length_matches_encode():
    pieces, total = codec.encode([np.zeros(100), b"abc"])
    assert codec.frame_length(pieces[0], 1 << 30) == total


def test_unpicklable_raises_in_encode():
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        codec.encode(lambda: 0)


def test_alloc_is_writable_and_sized():
    for n in (0, 1, 4096):
        buf = codec.alloc(n)
        mv = memoryview(buf).cast("B")
        assert len(mv) == n
        mv[:] = b"\x01" * n


# -- bounds checks: a corrupt header is an error, never a huge allocation -----------------------------------------
def _header(magic=codec.MAGIC, nbuf=0, main_len=0, lens=()):
    return codec.HEAD.pack(magic, nbuf, main_len) + struct.pack(f"<{len(lens)}Q", *lens)


@pytest.mark.parametrize("prefix,match", [
    (b"", "shorter"),
    (_header(magic=0xDEADBEEF), "magic"),
    (_header(nbuf=codec.MAX_BUFFERS + 1), "buffers"),
    (_header(nbuf=2, lens=(1,)), "header needs"),
    (_header(main_len=1 << 62), "over the limit"),
    (_header(nbuf=1, main_len=10, lens=(1 << 40,)), "over"),
])
def test_frame_length_rejects(prefix, match):
    with pytest.raises(CorruptMessage, match=match):
        codec.frame_length(prefix, 1 << 20)


def test_decode_rejects_length_mismatch_and_garbage():
    pieces, _ = codec.encode({"k": 1})
    frame = _join(pieces)
    with pytest.raises(CorruptMessage):
        codec.decode(frame + b"\x00")
    bad = bytearray(frame)
    bad[codec.HEAD.size:] = b"\xff" * (len(bad) - codec.HEAD.size)
    with pytest.raises(CorruptMessage, match="pickle"):
        codec.decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=96))
def test_frame_length_never_crashes_or_over_allocates(prefix):
    limit = 1 << 16
    try:
        total = codec.frame_length(prefix, limit)
    except CorruptMessage:
        return
    assert 0 <= total <= limit


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_decode_of_random_bytes_is_an_error_or_a_value(data):
    try:
        codec.decode(bytearray(data))
    except CorruptMessage:
        pass


def test_torch_tensor_goes_out_of_band():
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    pieces, _ = codec.encode({"t": t})
    assert len(pieces[1]) < 400
    out, _ = _roundtrip({"t": t, "empty": torch.empty(0, 5)})
    assert torch.equal(out["t"], t) and out["t"].dtype == torch.bfloat16
    assert out["empty"].shape == (0, 5)


def test_a_message_sent_while_another_thread_imports_torch(monkeypatch):
    """torch half imported (in sys.modules, no Tensor yet): the message still goes. The CLI's manager thread sends
    the STOP request while the main thread imports torch for the workload; that send raised AttributeError."""
    import sys
    import types

    from worker.protocol import STOP_METHOD, Request

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # what a partial import looks like
    stop = Request(0, STOP_METHOD, (), {}, -1)
    assert _roundtrip(stop)[0] == stop
