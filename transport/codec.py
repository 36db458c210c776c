"""Message framing: pickle protocol 5 with out-of-band buffers.

A frame is::

    +-------------------- header (16 + 8*nbuf bytes) ---------------------+------------+-----+---------+-----+
    | magic u32 | nbuf u32 | main_len u64 | buf_len[0] u64 ... buf_len[k] | main pickle | pad | buffer0 | ... |
    +----------------------------------------------------------------------+------------+-----+---------+-----+

Out-of-band buffers (numpy arrays, CPU torch tensors) start 64-byte aligned inside the frame. The writer never
builds the frame as one bytes object: ``encode`` returns the pieces and the ring copies each piece straight into
its slots, so an array's bytes are copied exactly once on the way in. ``decode`` takes one contiguous copy of the
frame (the reader's only copy) and hands pickle memoryviews into it, so arrays come back without another copy.

A small message without out-of-band buffers skips the frame: the ring stores the bare pickle in one slot and
marks the chunk PICKLE (see transport/layout.py), which saves packing and checking a header per message.

Every length is bounds-checked before anything is allocated: a corrupt header raises ``CorruptMessage``.
Callables are not this layer's business (collective_rpc cloudpickles them before they get here).
"""
from __future__ import annotations

import io
import mmap
import pickle
import struct
import sys
from typing import Any

from transport.errors import CorruptMessage

MAGIC = 0x52564631  # "RVF1"
HEAD = _HEAD = struct.Struct("<IIQ")  # magic, nbuf, main_len
ALIGN = 64
MAX_BUFFERS = 1 << 16
_BIG_FRAME = 32 << 20


PLAIN = _PLAIN = (str, bytes, int, float, bool, type(None))  # never hold a tensor: skip the tensor pickler


def _pad(n: int) -> int:
    return (-n) % ALIGN


class _TensorPickler(pickle.Pickler):
    """Sends CPU torch tensors as one out-of-band buffer instead of torch's in-band storage bytes."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None:
            return NotImplemented
        # Another thread may be importing torch this instant: in sys.modules without its Tensor yet (and then
        # nothing here is a tensor). torch.Tensor raised AttributeError there, and the message was not sent.
        tensor = getattr(torch, "Tensor", None)
        if tensor is not None and type(obj) is tensor and obj.device.type == "cpu" and not obj.requires_grad:
            t = obj.detach().contiguous()
            raw = t.reshape(-1).view(torch.uint8)  # bytes of any dtype, numpy can hold them (bf16 too)
            return _rebuild_tensor, (pickle.PickleBuffer(raw.numpy()), str(t.dtype), tuple(t.shape))
        return NotImplemented


def _rebuild_tensor(buf: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    dt = getattr(torch, dtype.split(".")[-1])
    if len(memoryview(buf)) == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(shape)


def dumps(obj: Any) -> tuple[bytes | memoryview, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` (protocol 5): the main pickle and its out-of-band buffers. Raises if it cannot be pickled."""
    bufs: list[pickle.PickleBuffer] = []
    if "torch" in sys.modules and not isinstance(obj, _PLAIN):
        f = io.BytesIO()
        _TensorPickler(f, protocol=5, buffer_callback=bufs.append).dump(obj)
        return f.getbuffer(), bufs
    return pickle.dumps(obj, protocol=5, buffer_callback=bufs.append), bufs


def frame(main: bytes | memoryview, bufs: list[pickle.PickleBuffer]) -> tuple[list[memoryview | bytes], int]:
    """The pieces of one frame (header, main pickle, padding, buffers) and its total length."""
    if not bufs:
        return [_HEAD.pack(MAGIC, 0, len(main)), main], _HEAD.size + len(main)
    raws = [b.raw() for b in bufs]
    if len(raws) > MAX_BUFFERS:
        raise ValueError(f"{len(raws)} out-of-band buffers in one message (max {MAX_BUFFERS})")
    head = _HEAD.pack(MAGIC, len(raws), len(main)) + struct.pack(f"<{len(raws)}Q", *(len(r) for r in raws))
    pieces: list[memoryview | bytes] = [head, main]
    total = len(head) + len(main)
    for raw in raws:
        pad = _pad(total)
        if pad:
            pieces.append(bytes(pad))
            total += pad
        pieces.append(raw)
        total += len(raw)
    return pieces, total


def encode(obj: Any) -> tuple[list[memoryview | bytes], int]:
    """Serialise ``obj`` into frame pieces and the total frame length. Raises if ``obj`` cannot be pickled."""
    return frame(*dumps(obj))


def alloc(n: int):
    """A writable buffer of ``n`` bytes for a frame that is about to be overwritten in full.

    ``bytearray(n)`` zero-fills first, a wasted pass over memory that costs as much as the copy itself for big
    frames. numpy's ``empty`` does not (and asks for huge pages above a few MiB), so use it when numpy is loaded
    (a frame with arrays in it is about to need it anyway); else an anonymous huge-page mapping for big frames."""
    np = sys.modules.get("numpy")
    if np is not None:
        return np.empty(n, dtype=np.uint8)
    if n >= _BIG_FRAME:
        mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError, ValueError):
            pass
        return mm
    return bytearray(n)


def frame_length(prefix: memoryview | bytes, limit: int) -> int:
    """Total frame length announced by a frame's first bytes, checked against ``limit`` and the header's own
    consistency. ``prefix`` must hold the whole header (at least 16 + 8*nbuf bytes, or as much as exists)."""
    if len(prefix) < _HEAD.size:
        raise CorruptMessage(f"frame shorter than its header ({len(prefix)} bytes)")
    magic, nbuf, main_len = _HEAD.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise CorruptMessage(f"bad frame magic 0x{magic:08x}")
    if nbuf > MAX_BUFFERS:
        raise CorruptMessage(f"frame announces {nbuf} buffers (max {MAX_BUFFERS})")
    head_len = _HEAD.size + 8 * nbuf
    if len(prefix) < head_len:
        raise CorruptMessage(f"frame header needs {head_len} bytes, got {len(prefix)}")
    total = head_len + main_len
    if total > limit:
        raise CorruptMessage(f"frame announces {total} bytes, over the limit of {limit}")
    for (n,) in struct.iter_unpack("<Q", prefix[_HEAD.size:head_len]):
        total += _pad(total) + n
        if total > limit:
            raise CorruptMessage(f"frame buffers announce over {limit} bytes")
    return total


def check_pickle(view: memoryview | bytes) -> None:
    """A pickle written here starts with PROTO 5 and ends with STOP. A view that does not was cut at the wrong
    place (a corrupt length or offset): refuse it rather than feed pickle a shifted stream of stray bytes."""
    n = len(view)
    if n < 3 or view[0] != 0x80 or view[1] != 5 or view[n - 1] != 0x2E:
        raise CorruptMessage(f"payload of {n} bytes is not one whole pickle (corrupt length or offset)")


def decode(frame: bytearray | memoryview) -> Any:
    """Rebuild the object from one contiguous frame; out-of-band buffers are views into ``frame``."""
    mv = memoryview(frame)
    total = frame_length(mv, len(mv))
    if total != len(mv):
        raise CorruptMessage(f"frame length {len(mv)} does not match its header ({total})")
    _, nbuf, main_len = _HEAD.unpack_from(mv, 0)
    off = _HEAD.size + 8 * nbuf
    main = mv[off:off + main_len]
    check_pickle(main)
    off += main_len
    buffers = []
    for (n,) in struct.iter_unpack("<Q", mv[_HEAD.size:_HEAD.size + 8 * nbuf]):
        off += _pad(off)
        buffers.append(mv[off:off + n])
        off += n
    try:
        return pickle.loads(main, buffers=buffers)
    except Exception as exc:  # a frame that passed the checks but does not unpickle is corrupt or foreign
        raise CorruptMessage(f"cannot unpickle message: {type(exc).__name__}: {exc}") from exc
