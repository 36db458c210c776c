"""transport.compat.vllm: vLLM's MessageQueue signatures and behaviour (as its shm_broadcast.py documents them), on
our rings, with real processes under spawn and forkserver: many readers, byte-exact random arrays, readers slower
than the writer, objects larger than a chunk, cancel/shutdown waking everyone, tensors unchanged after the ring
wraps, collective readiness, the long-wait warning, process groups."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

from tests.integration.test_transport import START_METHODS, Procs, _seed, digest, random_array
from transport.compat.vllm import Cancelled, MessageQueue, RemoteReadersUnsupported

pytestmark = pytest.mark.timeout(120)
CHUNK = 1 << 16
WAKE_BOUND_S = 0.5  # shutdown/close reach a blocked wait well within this (the cancel poll is 5 ms)


@pytest.fixture(params=START_METHODS)
def procs(request):
    p = Procs(mp.get_context(request.param))
    yield p
    p.close()


# -- children --------------------------------------------------------------------------------------------------
def reader_digests(handle, rank, n, slow_prob, out):
    rng = np.random.default_rng(rank)
    q = MessageQueue.create_from_handle(handle, rank)
    q.wait_until_ready()
    got = []
    for _ in range(n):
        got.append(digest(q.dequeue(timeout=60)))
        if rng.random() < slow_prob:
            time.sleep(rng.random() * 0.004)  # slower than the writer: the ring fills and the writer waits
    out.send(got)
    q.close()


def reader_keeps_tensors(handle, rank, n, out):
    import torch

    q = MessageQueue.create_from_handle(handle, rank)
    q.wait_until_ready()
    kept = [q.broadcast_object() for _ in range(n)]  # every tensor stays alive while the ring wraps many times
    out.send([(tuple(t.shape), str(t.dtype), t.double().sum().item(), torch.equal(t, t.clone())) for t in kept])
    q.close()


def reader_ready_then_report(handle, rank, out):
    q = MessageQueue.create_from_handle(handle, rank)
    q.wait_until_ready()
    out.send("ready")
    out.send(q.dequeue(timeout=30))
    q.close()


def reader_blocks_until_cancelled(handle, rank, out):
    q = MessageQueue.create_from_handle(handle, rank)
    q.wait_until_ready()
    out.send("waiting")
    try:
        q.dequeue()
        out.send("returned")
    except RuntimeError as exc:
        out.send(f"{type(exc).__name__}: {exc}")
    q.close()


def group_member(init_file, rank, world, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = MessageQueue.create_from_process_group(dist.group.WORLD, 1 << 12, 2, writer_rank=1)
        got = [q.broadcast_object({"step": i, "x": np.arange(i * 1000)} if rank == 1 else None) for i in range(12)]
        out.send([(g["step"], int(g["x"].sum())) for g in got])
        q.close()
    finally:
        dist.destroy_process_group()


def _writer(n_readers, **kw):
    ranks = list(range(1, n_readers + 1))  # rank 0 writes, as in create_from_process_group's default
    q = MessageQueue(n_readers, n_readers, ranks, **kw)
    return q, q.export_handle(), ranks


# -- tests -----------------------------------------------------------------------------------------------------
def test_many_slow_readers_get_random_arrays_larger_than_a_chunk_byte_exact(procs):
    rng = np.random.default_rng(_seed())
    sizes = [int(s) for s in rng.choice([0, 100, CHUNK - 200, CHUNK, 3 * CHUNK + 7], size=300)]
    arrays = [random_array(rng, s) for s in sizes]
    q, handle, ranks = _writer(4, max_chunk_bytes=CHUNK, max_chunks=4)
    try:
        outs = []
        for rank in ranks:
            r, w = procs.pipe()
            procs.start(reader_digests, handle, rank, len(arrays), 0.2, w)
            outs.append(r)
        q.wait_until_ready(timeout=60)
        for a in arrays:
            q.enqueue(a, timeout=60)
        want = [digest(a) for a in arrays]
        for r in outs:
            assert procs.result(r) == want
    finally:
        q.close()


def test_tensors_are_unchanged_after_the_ring_wraps(procs):
    import torch

    q, handle, ranks = _writer(2, max_chunk_bytes=1 << 13, max_chunks=2)
    gen = torch.Generator().manual_seed(_seed())
    tensors = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 6000, (40,), generator=gen)]
    try:
        outs = []
        for rank in ranks:
            r, w = procs.pipe()
            procs.start(reader_keeps_tensors, handle, rank, len(tensors), w)
            outs.append(r)
        q.wait_until_ready(timeout=60)
        for t in tensors:
            assert q.broadcast_object(t) is t
        want = [(tuple(t.shape), str(t.dtype), t.double().sum().item(), True) for t in tensors]
        for r in outs:
            assert procs.result(r) == want
    finally:
        q.close()


def test_wait_until_ready_is_collective(procs):
    q, handle, ranks = _writer(2)
    try:
        r1, w1 = procs.pipe()
        procs.start(reader_ready_then_report, handle, ranks[0], w1)
        assert not r1.poll(1.0), "a reader was ready before every reader had attached"
        r2, w2 = procs.pipe()
        procs.start(reader_ready_then_report, handle, ranks[1], w2)
        q.wait_until_ready(timeout=60)
        assert procs.result(r1) == procs.result(r2) == "ready"
        q.enqueue("after ready")
        assert procs.result(r1) == procs.result(r2) == "after ready"
    finally:
        q.close()


def test_closing_the_writer_wakes_every_reader_process_with_runtime_error(procs):
    q, handle, ranks = _writer(3)
    try:
        outs = []
        for rank in ranks:
            r, w = procs.pipe()
            procs.start(reader_blocks_until_cancelled, handle, rank, w)
            outs.append(r)
        q.wait_until_ready(timeout=60)
        assert [procs.result(r) for r in outs] == ["waiting"] * 3
        time.sleep(0.1)
    finally:
        q.close()
    assert [procs.result(r, 10) for r in outs] == ["Cancelled: cancelled"] * 3


def _blocked(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc
        box["t"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_shutdown_wakes_a_blocked_reader_and_a_writer_on_a_full_ring():
    q, handle, ranks = _writer(1, max_chunk_bytes=4096, max_chunks=2)
    r = MessageQueue.create_from_handle(handle, ranks[0])
    try:
        t, box = _blocked(r.dequeue)
        time.sleep(0.2)
        t0 = time.monotonic()
        r.shutdown()
        t.join(5)
        assert isinstance(box.get("error"), RuntimeError) and str(box["error"]) == "cancelled"
        assert box["t"] - t0 < WAKE_BOUND_S and r.shutting_down
        q.enqueue(1)
        q.enqueue(2)  # the ring (2 slots) is full: the next enqueue waits
        t, box = _blocked(lambda: q.enqueue(3))
        time.sleep(0.2)
        t0 = time.monotonic()
        q.shutdown()
        t.join(5)
        assert isinstance(box.get("error"), Cancelled) and box["t"] - t0 < WAKE_BOUND_S
        with pytest.raises(RuntimeError, match="cancelled"):
            q.enqueue(4)  # after shutdown every call raises at once
    finally:
        r.close()
        q.close()


def test_timeouts_raise_timeout_error_and_long_waits_warn_unless_indefinite(caplog):
    q, handle, ranks = _writer(1, max_chunk_bytes=4096, max_chunks=2)
    r = MessageQueue.create_from_handle(handle, ranks[0])
    caplog.set_level(logging.WARNING, logger="transport.compat.vllm")
    try:
        r.warning_interval_s = q.warning_interval_s = 0.1
        with pytest.raises(TimeoutError):
            r.dequeue(timeout=0.45)
        warned = [m for m in caplog.messages if m.startswith("No available shared memory broadcast block found in")]
        assert len(warned) >= 2, caplog.messages
        caplog.clear()
        with pytest.raises(TimeoutError):
            r.dequeue(timeout=0.45, indefinite=True)
        assert not caplog.messages
        q.enqueue("a")
        q.enqueue("b")
        with pytest.raises(TimeoutError):
            q.enqueue("c", timeout=0.35)  # full ring: the writer warns too
        assert any("broadcast block found in" in m for m in caplog.messages), caplog.messages
        with pytest.raises(TimeoutError):
            with q.acquire_write(timeout=0.05):
                pass
    finally:
        r.close()
        q.close()


def test_acquire_write_and_acquire_read_lend_a_writable_chunk():
    q, handle, ranks = _writer(2, max_chunk_bytes=5000, max_chunks=1)  # vLLM allows one chunk; we keep two slots
    readers = [MessageQueue.create_from_handle(handle, rank) for rank in ranks]
    try:
        for i in range(5):  # more chunks than slots: the ring wraps
            with q.acquire_write(timeout=5) as buf:
                assert len(buf) >= 5000 and not buf.readonly
                buf[:6] = b"chunk%d" % i
            for r in readers:
                with r.acquire_read(timeout=5) as got:
                    assert bytes(got[:6]) == b"chunk%d" % i
        with q.acquire_write(timeout=5) as buf:
            buf[0] = 1
        with pytest.raises(RuntimeError, match="Only writers"):
            with readers[0].acquire_write():
                pass
        with pytest.raises(RuntimeError, match="Only readers"):
            q.dequeue()
    finally:
        for r in readers:
            r.close()
        q.close()


def test_remote_readers_are_refused_in_one_line_naming_the_ray_backend():
    with pytest.raises(RemoteReadersUnsupported, match="Ray backend") as info:
        MessageQueue(4, 2)
    assert isinstance(info.value, RuntimeError) and "\n" not in str(info.value)
    q, handle, _ = _writer(1)
    try:
        with pytest.raises(RuntimeError, match=r"rank 7 is not among the local reader ranks \[1\].*backend=ray"):
            MessageQueue.create_from_handle(handle, 7)
        with pytest.raises(ValueError, match="local_reader_ranks"):
            MessageQueue(2, 2, [1])
    finally:
        q.close()


def test_create_from_process_group_over_torch_distributed(procs, tmp_path):
    world = 3
    outs = []
    for rank in range(world):
        r, w = procs.pipe()
        procs.start(group_member, str(tmp_path / "rdv"), rank, world, w)
        outs.append(r)
    want = [(i, i * 1000 * (i * 1000 - 1) // 2) for i in range(12)]
    assert [procs.result(r, 90) for r in outs] == [want] * world
