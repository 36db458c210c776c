"""The ring's two cursors (transport/cursor.py): the compiled one (transport/_ringfast.c) and the Python one must be
the same protocol, so every pairing of writer and reader implementations is run here: mixed traffic that wraps a
small ring many times, several threads on one reader end, corrupt pickles on the fast path, close, and a process
whose cursor is the other kind. The rest of the transport suite runs with whichever cursor the install built.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import random
import shutil
import sys
import threading
import time

import numpy as np
import pytest

from transport import MessageQueue, QueueClosed, cursor
from transport.errors import CorruptMessage

pytestmark = pytest.mark.timeout(120)

IMPLS = ["compiled", "python"]


def _use(monkeypatch, impl: str) -> None:
    if impl == "compiled" and cursor._ringfast is None:
        if not (shutil.which("cc") or shutil.which("gcc")):
            pytest.skip("no C compiler on this machine, so no compiled cursor: the Python one is in use")
        pytest.fail("transport/_ringfast.c was not built (setup.py builds it wherever a C compiler is there)")
    monkeypatch.setenv("RV_TRANSPORT_PURE", "1" if impl == "python" else "0")


def _pair(monkeypatch, w_impl: str, r_impl: str, slot_bytes: int = 4096, slots: int = 4, zero_copy: bool = False):
    _use(monkeypatch, w_impl)
    w = MessageQueue(1, slot_bytes, slots, spin_us=50)
    _use(monkeypatch, r_impl)
    r = MessageQueue.create_from_handle(w.export_handle(), 0, zero_copy=zero_copy)
    w.wait_until_ready(timeout=5)
    return w, r


def test_compiled_cursor_is_built_where_a_compiler_is():
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine: the Python cursor is the one in use")
    assert cursor._ringfast is not None, "setup.py did not build transport/_ringfast.c although a compiler is here"


@pytest.mark.parametrize("w_impl", IMPLS)
@pytest.mark.parametrize("r_impl", IMPLS)
def test_mixed_traffic_wraps_a_small_ring_in_order(monkeypatch, w_impl, r_impl):
    """Small pickles (the fast path), frames with arrays, streams over several slots, None: 3000 messages through
    4 slots of 4 KiB, the reader in a thread, in order and exact."""
    w, r = _pair(monkeypatch, w_impl, r_impl)
    assert type(w._cur).__module__.endswith("_ringfast") == (w_impl == "compiled")
    assert type(r._cur).__module__.endswith("_ringfast") == (r_impl == "compiled")
    rng = random.Random(7)
    msgs = []
    for i in range(3000):
        pick = rng.random()
        if pick < 0.6:
            msgs.append((i, "x" * rng.randrange(0, 3000)))
        elif pick < 0.75:
            msgs.append((i, np.arange(rng.randrange(1, 900), dtype=np.int32)))
        elif pick < 0.9:
            msgs.append((i, bytes(rng.randrange(5000, 20000))))
        else:
            msgs.append((i, None))
    got: list = []
    t = threading.Thread(target=lambda: got.extend(r.dequeue(timeout=20) for _ in msgs))
    t.start()
    try:
        for m in msgs:
            w.enqueue(m, timeout=20)
        t.join(60)
        assert not t.is_alive()
    finally:
        w.close()
        r.close()
    assert len(got) == len(msgs)
    for (i, want), (j, have) in zip(msgs, got):
        assert i == j
        if isinstance(want, np.ndarray):
            assert np.array_equal(want, have)
        else:
            assert want == have


@pytest.mark.parametrize("impl", IMPLS)
def test_threads_sharing_one_reader_end_get_every_message_once(monkeypatch, impl):
    """Two threads dequeue from one reader end while the writer streams small messages and, now and then, big ones
    (slow path: the cursor is busy while a thread sleeps in it): every message once, each thread's in order."""
    w, r = _pair(monkeypatch, impl, impl, slots=8)
    n = 4000
    seen: list[list[int]] = [[], []]

    def drain(k: int) -> None:
        while True:
            try:
                m = r.dequeue(timeout=20)
            except QueueClosed:
                return
            if m is None:
                return
            seen[k].append(m[0])

    threads = [threading.Thread(target=drain, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(n):
            w.enqueue((i, b"z" * (9000 if i % 97 == 0 else 8)), timeout=20)
        w.enqueue(None, timeout=20)
        w.enqueue(None, timeout=20)
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        w.close()
        r.close()
    assert sorted(seen[0] + seen[1]) == list(range(n))
    assert all(s == sorted(s) for s in seen)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_timeout_part_way_through_a_long_message_loses_nothing(monkeypatch, impl):
    """A 5-slot message through 2 slots from a writer that pauses before each slot it waits for: the reader's
    first dequeue times out part-way; the next one delivers the message whole, then the one after it."""
    from transport import QueueTimeout

    w, r = _pair(monkeypatch, impl, impl, slots=2)
    real = w._await_space
    monkeypatch.setattr(w, "_await_space", lambda *a: (time.sleep(0.3), real(*a))[1])
    big = bytes(random.Random(3).randbytes(18000))
    t = threading.Thread(target=lambda: (w.enqueue(big, timeout=20), w.enqueue("next", timeout=20)))
    t.start()
    try:
        with pytest.raises(QueueTimeout):
            r.dequeue(timeout=0.1)
        assert r._partial is not None  # some of it was gathered before the wait timed out
        assert r.dequeue(timeout=20) == big
        assert r.dequeue(timeout=20) == "next"
        t.join(20)
        assert not t.is_alive()
    finally:
        w.close()
        r.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pickle_that_does_not_load_is_corrupt_and_the_next_message_arrives(monkeypatch, impl):
    w, r = _pair(monkeypatch, impl, impl)
    try:
        bad = b"\x80\x05\x95\xff\xff\xff\xff\x00\x00\x00\x00." # PROTO ... STOP, a frame length that lies
        assert w._cur.put(bad)
        with pytest.raises(CorruptMessage, match="cannot unpickle"):
            r.dequeue(timeout=5)
        w.enqueue("after", timeout=5)
        assert r.dequeue(timeout=5) == "after"
    finally:
        w.close()
        r.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_full_ring_is_refused_by_put_and_waited_for_by_enqueue(monkeypatch, impl):
    w, r = _pair(monkeypatch, impl, impl)
    try:
        for i in range(4):
            assert w._cur.put(pickle.dumps(i, 5))
        assert not w._cur.put(pickle.dumps(4, 5))  # full: the Python path waits
        assert [r.dequeue(timeout=5) for _ in range(2)] == [0, 1]
        w.enqueue(4, timeout=5)  # the cursor reads the readers' counters again
        assert [r.dequeue(timeout=5) for _ in range(3)] == [2, 3, 4]
        assert r._cur.take() is cursor.EMPTY
    finally:
        w.close()
        r.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_closed_end_refuses_fast_calls(monkeypatch, impl):
    w, r = _pair(monkeypatch, impl, impl)
    w.enqueue("kept", timeout=5)
    assert r._cur.spin(1_000_000, False, 0) == 1  # news
    r.close()
    assert r._cur.take() is cursor.SLOW
    with pytest.raises(QueueClosed):
        r.dequeue(timeout=1)
    w.close()
    assert not w._cur.put(pickle.dumps(1, 5))
    with pytest.raises(QueueClosed):
        w.enqueue(1, timeout=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_spin_ends_on_news_on_its_window_and_on_close(monkeypatch, impl):
    w, r = _pair(monkeypatch, impl, impl)
    try:
        assert r._cur.spin(2_000_000, False, 0) == 0
        assert r._cur.spin(2_000_000, True, 0) == 0
        threading.Timer(0.01, lambda: w.enqueue(1)).start()
        assert r._cur.spin(2_000_000_000, False, 0) == 1
        assert r.dequeue(timeout=1) == 1
        threading.Timer(0.01, w.cancel_all).start()
        assert r._cur.spin(2_000_000_000, True, 0) == 3
    finally:
        w.close()
        r.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_closing_a_reader_end_while_another_thread_spins_on_it(monkeypatch, impl):
    """The compiled spin polls the mapping without the GIL: close() from another thread must not unmap under it
    (it would crash the process). The spinning dequeue ends with QueueClosed; 20 rounds, closes at random points."""
    rng = random.Random(11)
    for _ in range(20):
        _use(monkeypatch, impl)
        w = MessageQueue(1, 4096, 4, spin_us=100_000, spin_yield=False, spin_adaptive=False)
        r = MessageQueue.create_from_handle(w.export_handle(), 0)
        w.wait_until_ready(timeout=5)
        got: list = []

        def wait() -> None:
            try:
                got.append(r.dequeue(timeout=5))
            except QueueClosed as exc:
                got.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(rng.uniform(0.0, 0.02))
        r.close()
        t.join(10)
        assert not t.is_alive() and len(got) == 1 and isinstance(got[0], QueueClosed)
        w.close()


def test_cancel_all_from_another_thread_while_the_queue_closes():
    """cancel_all is safe from any thread, and its futex calls run without the GIL: a close() in another thread
    must not unmap the ring under them (it crashed the process 1 run in 8 of this file before the fix)."""
    for _ in range(300):
        w = MessageQueue(1, 4096, 2)
        r = MessageQueue.create_from_handle(w.export_handle(), 0)
        threads = [threading.Thread(target=q.cancel_all) for q in (w, r, w)]
        for t in threads:
            t.start()
        w.close()
        r.close()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)


def _echo_with(impl: str, handle, back_handle_conn) -> None:
    import os

    os.environ["RV_TRANSPORT_PURE"] = "1" if impl == "python" else "0"
    q = MessageQueue.create_from_handle(handle, 0)
    back = MessageQueue(1, 4096, 8)
    back_handle_conn.send((back.export_handle(), type(q._cur).__name__))
    back.wait_until_ready(timeout=30)
    try:
        while (m := q.dequeue(timeout=30)) is not None:
            back.enqueue(m)
    finally:
        q.close()
        back.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_process_with_the_other_cursor_speaks_the_same_protocol(monkeypatch, impl):
    """This process on one cursor, a spawned echo process on the other: 5000 round trips of mixed sizes."""
    other = "python" if impl == "compiled" else "compiled"
    if "compiled" in (impl, other) and cursor._ringfast is None:
        _use(monkeypatch, "compiled")  # fails with the reason where a compiler is there
    _use(monkeypatch, impl)
    ctx = mp.get_context("spawn")
    q = MessageQueue(1, 4096, 8)
    rd, wr = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_echo_with, args=(other, q.export_handle(), wr), daemon=True)
    p.start()
    back = None
    try:
        handle, kind = rd.recv() if rd.poll(60) else pytest.fail("the echo process did not start")
        assert kind == ("Reader" if other == "compiled" else "PyReaderCursor")
        back = MessageQueue.create_from_handle(handle, 0)
        q.wait_until_ready(timeout=30)
        for i in range(5000):
            m = (i, "y" * (i % 300)) if i % 50 else (i, np.full(700, i, dtype=np.int64))
            q.enqueue(m, timeout=10)
            got = back.dequeue(timeout=10)
            assert got[0] == i and (np.array_equal(got[1], m[1]) if i % 50 == 0 else got[1] == m[1])
        q.enqueue(None, timeout=10)
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        p.close()
        rd.close()
        wr.close()
        if back is not None:
            back.close()
        q.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
