"""Loading a rank's weights onto a CUDA device: the checkpoint's bytes read straight into pinned staging buffers and
copied asynchronously, the reading of one buffer overlapped with the copy of the one before.

Why: the plain path (SliceReader.fill) makes every slice a fresh pageable CPU tensor and copies it synchronously;
on an H200 that ran at ~2.2 GB/s, 7.4 s of an 8B restart. Here::

    file ──pread, READ_THREADS threads (no GIL)──▶ pinned buffer i ──cudaMemcpyAsync, side stream──▶ parameter
                                        buffer i+1 filled meanwhile; buffer i refilled only after its copies' event

What is read where: a safetensors file is an 8-byte little-endian header length, a JSON header ({name: dtype,
shape, data_offsets}), then the tensors' bytes. A row range of a row-major matrix is one contiguous byte range
(pread); a column range (tp > 1, row-parallel layers) is one segment per row, copied out of a memory map. Every
destination is written in place, e.g. the q, k and v rows straight into their rows of the fused wqkv. A slice whose
dtype differs from its parameter's (a conversion) takes the plain path. The bytes are SliceReader's, exactly
(tests/unit/test_fastload.py). Set RV_SLOW_LOAD=1 (runtime.env) to load through the plain path, for comparison.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

SLOW_LOAD_ENV = "RV_SLOW_LOAD"  # set (runtime.env) to load through the plain path on CUDA too, for comparison
BUFFERS = 3  # pinned staging buffers: one being filled while the copies of the others are in flight
BUFFER_BYTES = 128 << 20  # each: 384 MiB pinned in all, only while loading (pinning costs time per byte too)
READ_THREADS = 8  # preadv releases the GIL: page cache -> pinned memory runs on this many cores at once
READ_JOB_BYTES = 8 << 20  # a buffer's reads are split into jobs of at most this size, spread over the threads
HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header: a larger length is not a safetensors file
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}


def wanted(device: Any) -> bool:
    """The pinned, overlapped path is for CUDA devices (a CPU parameter is filled by the plain path)."""
    return torch.device(device).type == "cuda" and not os.environ.get(SLOW_LOAD_ENV)


# -- where the bytes are ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its dtype name, shape and absolute byte range in the file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> dict[str, Entry]:
    with open(path, "rb") as f:
        raw = f.read(8)
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
        if not 0 < n <= HEADER_LIMIT:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    base = 8 + n
    return {name: Entry(str(path), v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                        base + v["data_offsets"][1])
            for name, v in header.items() if name != "__metadata__"}


@dataclass(frozen=True)
class Span:
    """The bytes of a slice in a file: ``rows`` segments of ``width`` bytes, ``stride`` bytes apart. A contiguous
    range is kept as one row (rows == 1), so that it can be cut anywhere."""

    file: str
    offset: int
    rows: int
    width: int
    stride: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.width

    def take(self, budget: int) -> tuple[Span | None, Span | None]:
        """The first at most ``budget`` bytes (whole rows of a strided span; None if not one fits), and the rest."""
        if self.rows == 1:
            n = min(budget, self.width)
            if n <= 0 and self.width:
                return None, self
            rest = span(self.file, self.offset + n, 1, self.width - n, self.width - n) if n < self.width else None
            return replace(self, width=n, stride=n), rest
        k = min(self.rows, budget // self.width)
        if k == 0:
            return None, self
        rest = replace(self, offset=self.offset + k * self.stride, rows=self.rows - k) if k < self.rows else None
        return span(self.file, self.offset, k, self.width, self.stride), rest


def span(file: str, offset: int, rows: int, width: int, stride: int) -> Span:
    """A Span, with rows that follow each other without a gap merged into one contiguous row."""
    if rows == 1 or stride == width:
        return Span(file, offset, 1, rows * width, rows * width)
    return Span(file, offset, rows, width, stride)


def slice_span(e: Entry, kind: str, part: int, parts: int) -> Span:
    """Where SliceReader's full / rows / cols slice of ``e`` lies, with its bounds (part * n // parts)."""
    if kind == "full":
        return span(e.file, e.begin, 1, e.nbytes, e.nbytes)
    rows, cols = e.shape
    row_bytes = e.nbytes // rows
    if kind == "rows":
        a, b = part * rows // parts, (part + 1) * rows // parts
        return span(e.file, e.begin + a * row_bytes, b - a, row_bytes, row_bytes)
    if kind == "cols":
        item = row_bytes // cols
        a, b = part * cols // parts, (part + 1) * cols // parts
        return span(e.file, e.begin + a * item, rows, (b - a) * item, row_bytes)
    raise ValueError(f"unknown slice kind {kind!r} (full | rows | cols)")


# -- which bytes go through which buffer -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Bytes of one slice staged at ``at`` in a buffer, bound for ``dst`` (a flat uint8 view of the destination)."""

    src: Span
    dst: torch.Tensor
    at: int


def pack(slices: list[tuple[Span, torch.Tensor]], capacity: int) -> Iterator[list[Piece]]:
    """Cut the slices into buffer loads of at most ``capacity`` bytes, in order; a contiguous slice is cut to fill
    each buffer to the brim, a strided one at row boundaries."""
    batch: list[Piece] = []
    used = 0
    for src, dst in slices:
        done = 0
        rest: Span | None = src
        while rest is not None:
            head, tail = rest.take(capacity - used)
            if head is None:
                if not batch:
                    raise ValueError(f"{src.file}: a row of {src.width} bytes is larger than a staging buffer")
                yield batch
                batch, used = [], 0
                continue
            batch.append(Piece(head, dst[done:done + head.nbytes], used))
            used, done, rest = used + head.nbytes, done + head.nbytes, tail
            if used == capacity:
                yield batch
                batch, used = [], 0
    if batch:
        yield batch


def read_jobs(batch: list[Piece], job_bytes: int) -> Iterator[tuple[Span, int]]:
    """A buffer load's reads, cut into jobs of at most ``job_bytes`` (one row at least): (bytes, place in buffer)."""
    for piece in batch:
        at, rest = piece.at, piece.src
        while rest is not None:
            head, rest = rest.take(job_bytes)
            if head is None:  # a strided row wider than a job: one row then
                head, rest = rest.take(rest.width)
            yield head, at
            at += head.nbytes


# -- the files, open for reading -------------------------------------------------------------------------------------
class OpenFiles:
    """A descriptor per file for pread, and a memory map per file for strided (column) slices."""

    def __init__(self, files: list[str]) -> None:
        self.fds = {f: os.open(f, os.O_RDONLY) for f in files}
        self._maps: dict[str, mmap.mmap] = {}
        self._bytes: dict[str, torch.Tensor] = {}

    def read(self, src: Span, out: memoryview, out_tensor: torch.Tensor) -> None:
        """``src``'s bytes into ``out`` (== ``out_tensor``, the same bytes as a tensor). Runs in the reader threads."""
        if src.rows == 1:
            got = 0
            while got < src.nbytes:  # preadv may return fewer bytes than asked (at most 2 GiB a call on Linux)
                n = os.preadv(self.fds[src.file], [out[got:]], src.offset + got)
                if n <= 0:
                    raise EOFError(f"{src.file}: ends before byte {src.offset + got}")
                got += n
            return
        whole = self._bytes[src.file]
        rows = whole.as_strided((src.rows, src.width), (src.stride, 1), src.offset)
        out_tensor.view(src.rows, src.width).copy_(rows)  # one strided memcpy; torch lets go of the GIL

    def map_strided(self, files: set[str]) -> None:
        """Map the files that strided slices come from (in the main thread, before the readers start)."""
        for f in files - self._maps.keys():
            # ACCESS_COPY: a private writable mapping, so torch.frombuffer gets a writable buffer; nothing is written.
            self._maps[f] = mmap.mmap(self.fds[f], 0, access=mmap.ACCESS_COPY)
            self._bytes[f] = torch.frombuffer(self._maps[f], dtype=torch.uint8)

    def close(self) -> None:
        self._bytes.clear()  # the tensors export the maps' buffers: they go first
        for m in self._maps.values():
            m.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self._maps.clear()


# -- staging: the buffers and the device copies ----------------------------------------------------------------------
class Staging(Protocol):
    buffers: list[torch.Tensor]  # flat uint8 host buffers

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None: ...  # queue dst <- src (src: a buffer's bytes)

    def mark(self, i: int) -> None: ...  # the copies queued so far are buffer i's last use until it is refilled

    def wait(self, i: int) -> None: ...  # block until buffer i's marked copies are done

    def finish(self) -> None: ...  # every copy done (the device's work queue too); buffers released


class CudaStaging:
    """Pinned buffers; copies on a side stream, an event per buffer load."""

    def __init__(self, device: torch.device, count: int, nbytes: int) -> None:
        self.device = device
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the parameters were allocated on that stream
        self.events: list[Any] = [None] * count

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def mark(self, i: int) -> None:
        self.events[i] = self.stream.record_event()

    def wait(self, i: int) -> None:
        if self.events[i] is not None:
            self.events[i].synchronize()

    def finish(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.buffers.clear()
        self.events.clear()
        # torch keeps freed pinned blocks cached for reuse: give the page-locked memory back (either name torch used)
        empty_host_cache = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
                            or getattr(torch._C, "_host_emptyCache", None))
        if empty_host_cache is not None:
            empty_host_cache()


# -- the load ------------------------------------------------------------------------------------------------------
def fill(reader: Any, fills: list[Any], device: torch.device, staging: Staging | None = None,
         buffers: int = BUFFERS, buffer_bytes: int = BUFFER_BYTES, threads: int = READ_THREADS,
         job_bytes: int = READ_JOB_BYTES) -> dict[str, float]:
    """Fill every ``fills`` destination (checkpoint.Fill) from ``reader``'s files; returns where the time went:
    plain_s (headers, and the slices that took the plain path), stage_s (pinning the buffers), read_s (waiting on
    file reads; the copies of the load before run meanwhile), total_s."""
    t0 = time.perf_counter()
    entries: dict[str, Entry] = {}
    for f in reader.files:
        entries.update(read_header(f))
    staged, plain = split(fills, entries)
    reader.fill(plain)
    t1 = time.perf_counter()
    stats = {"plain_s": t1 - t0, "stage_s": 0.0, "read_s": 0.0, "bytes": float(sum(s.nbytes for s, _ in staged))}
    batches = list(pack(staged, buffer_bytes))
    if batches:
        if staging is None:  # no larger than the largest load: a small model pins only what it needs
            need = max(p.at + p.src.nbytes for b in batches for p in b)
            staging = CudaStaging(torch.device(device), min(buffers, len(batches)), need)
        stats["stage_s"] = time.perf_counter() - t1
        stats["read_s"] = stream(batches, staging, sorted({s.file for s, _ in staged}), threads, job_bytes)
    stats["total_s"] = time.perf_counter() - t0
    return stats


def split(fills: list[Any], entries: dict[str, Entry]) -> tuple[list[tuple[Span, torch.Tensor]], list[Any]]:
    """The fills whose bytes can be staged as they are, as (bytes in the file, flat uint8 view of the destination);
    and the rest (another dtype, a destination that is not contiguous), for the plain path."""
    staged, plain = [], []
    for f in fills:
        e = entries.get(f.name)
        if e is None:
            raise KeyError(f"checkpoint has no tensor {f.name!r}")
        if DTYPE_NAMES.get(f.dst.dtype) != e.dtype or not f.dst.is_contiguous():
            plain.append(f)
            continue
        src = slice_span(e, f.kind, f.part, f.parts)
        dst = f.dst.reshape(-1).view(torch.uint8)
        if src.nbytes != dst.numel():
            want = f"{f.kind} {f.part}/{f.parts} of {list(e.shape)}" if f.kind != "full" else str(list(e.shape))
            raise ValueError(f"checkpoint tensor {f.name!r}: {want} does not fit a parameter of {list(f.dst.shape)}")
        staged.append((src, dst))
    return staged, plain


def stream(batches: list[list[Piece]], staging: Staging, files: list[str], threads: int, job_bytes: int) -> float:
    """Read each buffer load (threads), queue its copies, go on with the next buffer; returns the seconds spent
    waiting on reads."""
    views = [_memoryview(b) for b in staging.buffers]
    opened = OpenFiles(files)
    read_s = 0.0
    try:
        opened.map_strided({p.src.file for b in batches for p in b if p.src.rows > 1})
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rv-load") as pool:
            for k, batch in enumerate(batches):
                i = k % len(staging.buffers)
                staging.wait(i)  # its previous load's copies must be done before it is overwritten
                buf, view = staging.buffers[i], views[i]
                t = time.perf_counter()
                jobs = [pool.submit(opened.read, src, view[at:at + src.nbytes], buf[at:at + src.nbytes])
                        for src, at in read_jobs(batch, job_bytes)]
                for job in jobs:
                    job.result()
                read_s += time.perf_counter() - t
                for p in batch:
                    staging.copy(p.dst, buf[p.at:p.at + p.src.nbytes])
                staging.mark(i)
        staging.finish()
    finally:
        del views
        opened.close()
    return read_s


def _memoryview(buf: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous uint8 CPU tensor's bytes (for preadv), without numpy."""
    return memoryview((ctypes.c_char * buf.numel()).from_address(buf.data_ptr())).cast("B")


__all__ = ["wanted", "fill", "read_header", "slice_span", "pack", "read_jobs", "CudaStaging", "Staging",
           "SLOW_LOAD_ENV"]
