"""The part of a queue both ends share: the mapped segment, its cached views, the spin policy and the sleep.

::

    transport/ring.py        Ring: mapping, cached offsets, spin policy, futex sleep, peer liveness, close
      ├─ transport/writer.py   RingWriter(Ring): creates the segment; enqueue (hot path + frames + streams)
      └─ transport/reader.py   RingReader(Ring): attaches; dequeue (hot path + frames + streams), release
           └─ transport/zero_copy.py  ZeroCopyReader(RingReader): lends one-slot frames out as views
    transport/message_queue.py  MessageQueue: the public face (constructor -> writer, create_from_handle -> reader)
    transport/cursor.py      each end's position and hot path (put / take / spin): _ringfast.c compiled, or Python

Imports only go down this tree: no module imports one below it, so there is no cycle.

Waiting is adaptive: poll the counter for up to ``spin_us`` (default 200 us), yielding the CPU
(``os.sched_yield``) between polls, then announce "I sleep", fence, re-check, and sleep in the kernel on a futex
word. The other side, after publishing, fences and wakes only if someone announced sleep, so the common case
costs no system call and an idle reader costs no CPU. One FUTEX_WAKE reaches every sleeping reader. A sleeper
also wakes every ``_LIVENESS_POLL_S`` to check that its peer process still exists (``PeerDied``), and every
``_CANCEL_POLL_S`` while it has a ``threading.Event`` cancel to look at; ``close()`` / ``cancel_all()`` from any
thread or process wakes every sleeper at once through the futex words.

The spin policy, measured on 2 cores with 1..8 readers (scripts/bench_transport.py):

* Yield between polls. A pure busy-poll holds a core for its whole window while the very process it waits for
  sits in the run queue: with more processes than cores it measured 2-3x slower than the pipe it should beat.
  A yielding poll hands the core to whoever is runnable and costs one cheap system call when nobody is.
* Do spin, even with more readers than cores: a futex wake-up costs tens of microseconds here (an idle vCPU
  has to be woken), and "spin 0" lost to every spinning variant at every N.
* Spin only while it pays off: each end keeps an EWMA of "the last spins ended before the window did"; once
  it falls under ``_SPIN_KEEP`` (the other side is consistently slower than the window, e.g. requests that
  come every few milliseconds) it sleeps at once and probes with a spin one wait in eight.
* Back off when a yield loses the CPU for longer than ``_YIELD_LOST_S`` (the score is halved): a CPU-bound
  process outside the queue holds the cores, every yield then waits out its time slice (4 ms medians with two
  hogs on two cores), and a woken futex sleeper is scheduled sooner than a yielder.
* A writer that finds the ring full sleeps until half the ring is free (``wake_target``), not one slot.

``spin_us=0`` never spins, ``spin_yield=False`` busy-polls, ``spin_adaptive=False`` always spins the window.
By default (``spin_yield=None``) the poll yields only where the ring's parties (writer + readers) outnumber the
cores this process may run on: with a core each, busy-polling never takes a core someone else needs. On a 16-core
H200 host (scripts/gpu_transport.sh) busy-polling met every round-trip target where yielding missed the p99 at 2, 4
and 8 readers, and against the yielding transport in the same run it used less CPU per call (15.6 vs 34.2 us at
one reader) at the same median. On this project's 2-core machines it yields, as before.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from dataclasses import dataclass

from transport import _proc, _sync, layout as L, shm
from transport.defaults import SPIN_US
from transport.errors import PeerDied, QueueClosed, QueueTimeout

_UNMAP_WAIT_S = 0.1  # close(): how long to wait for another thread's spin to notice and leave the mapping
_CANCEL_POLL_S = 0.005  # a threading.Event cannot wake a futex: poll it this often while asleep
_LIVENESS_POLL_S = 0.25  # how often a sleeper checks that its peer process still exists
_SPIN_KEEP = 0.3  # adaptive spinning: keep spinning while the success EWMA stays above this
_SPIN_EWMA = 0.125  # weight of the latest wait in that EWMA (a few unlucky waits do not stop the spinning)
# A yield that keeps us off the CPU this long means something outside the queue holds the cores (a CPU-bound
# process): a yielder then waits a whole time slice behind it each time (4 ms medians measured with two hogs on
# two cores), while a woken futex sleeper gets to run soon. Longer than a round of our own peers, about a slice.
_YIELD_LOST_S = 0.001
_perf = time.perf_counter
_mono = time.monotonic
_yield = os.sched_yield


@dataclass(frozen=True)
class Handle:
    """What a reader needs to attach: small and picklable (sent in the READY handshake, or to children)."""

    name: str
    size: int
    n_reader: int
    writer_pid: int
    spin_us: float | None
    spin_yield: bool | None = None
    spin_adaptive: bool = True
    fd: int = -1  # an anonymous segment: the writer's descriptor of it (transport/shm.py); -1: named


class Ring:
    """State and waiting shared by both ends. Subclasses set ``_seg``, ``layout``, the spin settings and the
    writer's identity, then call ``_bind()``; they provide ``_check_peer(pending)``.

    Two knobs for the slow path only (a wait that went to sleep), used by faces such as transport/compat/vllm.py:
    ``cancel_event`` (a threading.Event every sleep of this end also watches, the writer's included) and
    ``on_long_wait(what, waited_s)``, called every ``long_wait_s`` seconds while a wait stays asleep."""

    is_writer: bool
    cancel_event: threading.Event | None = None
    long_wait_s: float | None = None
    on_long_wait = None

    def _init_common(self, fences: str) -> None:
        self._lock = threading.Lock()
        self._map_lock = threading.Lock()  # cancel_all (any thread) against _unmap: never touch a mapping that went
        self._closed_here = False
        self._pid = os.getpid()  # a forked copy of this object must not close or unlink the owner's queue
        self._fences = fences  # "auto": asymmetric fences where membarrier works; "full": always full fences
        self.late_wakeups = 0  # sleeps that ended by timeout although the news was there (must stay 0)
        self._watches: dict[int, _proc.Watch] = {}  # liveness of the peers this end has waited for

    def _bind(self) -> None:
        """Cache views, offsets and addresses: the hot path must not recompute them."""
        lay = self.layout
        self._mv = memoryview(self._seg.map)
        self._W = self._mv.cast("I")  # the segment as u32 words: one index op per load or store
        probe = ctypes.c_char.from_buffer(self._seg.map)
        self._base = ctypes.addressof(probe)
        del probe  # an exported buffer would stop mmap.close()
        self._n = lay.n_readers
        self._nslots = lay.n_slots
        self._slot_bytes = lay.slot_bytes
        self._metas = [lay.slot_meta(i) // 4 for i in range(lay.n_slots)]  # word index of each chunk record
        self._datas = [lay.slot_data(i) for i in range(lay.n_slots)]
        self._consumed_words = [lay.reader(r) // 4 for r in range(lay.n_readers)]
        self._rwake = _sync.address(self._base + L.OFF_RWAKE)
        self._wwake = _sync.address(self._base + L.OFF_WWAKE)
        self._sleepers = _sync.address(self._base + L.OFF_SLEEPERS)
        self._always_wake = not _sync.HAVE_FENCE
        self._heavy = bool(self._W[L.OFF_ASYM // 4])  # sleepers must fence the other CPUs too
        self._light = self._heavy and self._fences == "auto" and _sync.register_asymmetric()  # hot paths skip it
        self._spin_s = max(0.0, SPIN_US if self.spin_us is None else self.spin_us) * 1e-6
        self._spin_ns = int(self._spin_s * 1e9)
        self._spin_yields = _yield_by_default(lay.n_readers) if self.spin_yield is None else bool(self.spin_yield)
        self._adaptive = self.spin_adaptive
        self._spin_score = 1.0  # EWMA of "the last spins succeeded"
        self._probe = 0

    # The cursor (transport/cursor.py) holds where this end is; the Python paths move it only while they hold it.
    @property
    def _slot(self) -> int:
        return self._cur.slot

    @_slot.setter
    def _slot(self, s: int) -> None:
        self._cur.slot = s

    def _make_hold(self) -> None:
        """Once the subclass made its cursor: ``with self._hold:`` is the ring's lock, and the cursor marked busy so
        that no fast call (another thread's, while this one sleeps with the GIL released) moves it meanwhile. One
        object per end, made once: every slow path (each frame with arrays in it) enters it."""
        self._hold = _Holding(self._lock, self._cur)

    @property
    def name(self) -> str:
        return self._seg.name

    def export_handle(self) -> Handle:
        return Handle(self._seg.name, self._seg.size, self._n, self.writer_pid, self.spin_us, self.spin_yield,
                      self.spin_adaptive, self._seg.fd)

    def _attached(self) -> list[bool]:
        W, lay = self._W, self.layout
        return [bool(W[(lay.reader(r) + L.R_ATTACHED) // 4]) for r in range(self._n)]

    def _unattached(self) -> tuple[int, ...]:
        return tuple(r for r, ok in enumerate(self._attached()) if not ok)

    # -- spinning ----------------------------------------------------------------------------------------------
    def _should_spin(self) -> bool:
        """Spin only while it pays off: while most recent spins ended before the window did. Once they mostly
        fail (the other side takes longer than the window, as when readers outnumber cores and wait for their
        turn) spinning is CPU thrown away, so sleep at once, and probe with a spin one wait in eight."""
        if not self._adaptive or self._spin_score >= _SPIN_KEEP:
            return True
        self._probe = (self._probe + 1) & 7
        return not self._probe

    def _spun(self, ok: bool) -> None:
        self._spin_score = self._spin_score * (1 - _SPIN_EWMA) + (_SPIN_EWMA if ok else 0.0)

    def _spin(self, ready) -> bool:
        """Poll ``ready()`` for up to the spin window, yielding the CPU between polls (or not)."""
        t = _perf()
        end = t + self._spin_s
        if self._spin_yields:
            while True:
                _yield()
                now = _perf()
                if _YIELD_LOST_S and now - t > _YIELD_LOST_S:
                    # That yield gave our CPU away for a whole time slice: something outside this queue keeps the
                    # cores busy, and a yielder queues behind it each time, while a futex sleeper that is woken
                    # gets to run first. Stop spinning until a probe says otherwise.
                    self._spin_score *= 0.5  # a few of these in a row and the spinning stops
                    return ready()
                if ready():
                    return True
                if now >= end:
                    return False
                t = now
        while _perf() < end:
            if ready():
                return True
        return False

    # -- waiting -----------------------------------------------------------------------------------------------
    def _sleep_until(self, ready, futex, deadline, cancel, pending, what, announce) -> None:
        """Sleep on ``futex`` until ``ready()``; see the protocol in transport/layout.py.

        ``announce(True)`` publishes "I sleep" with a full fence, so a party that publishes news after our
        check sees it and changes the futex word (which makes the kernel refuse to put us to sleep)."""
        W = self._W
        word = (futex.value - self._base) // 4
        cancel = cancel if cancel is not None else self.cancel_event
        started = _mono()
        next_liveness = started + _LIVENESS_POLL_S
        nap_max = _CANCEL_POLL_S if cancel is not None else _LIVENESS_POLL_S
        every = self.long_wait_s if self.on_long_wait is not None else None
        next_report = started + every if every else None
        while True:
            seq = W[word]
            announce(True)
            try:
                if ready():
                    return
                self._check_cancelled(cancel)
                now = _mono()
                if deadline is not None and now >= deadline:
                    p = pending()
                    raise QueueTimeout(f"{what} timed out" + (f": readers {list(p)} have not read" if p else ""), p)
                if now >= next_liveness:
                    self._check_peer(pending)
                    next_liveness = now + _LIVENESS_POLL_S
                if next_report is not None and now >= next_report:
                    self.on_long_wait(what, now - started)
                    next_report += every
                nap = nap_max if deadline is None else min(nap_max, deadline - now)
                if next_report is not None:
                    nap = min(nap, max(0.0, next_report - now))
                if not _sync.futex_wait(futex, seq, nap) and ready():
                    self.late_wakeups += 1  # news that came without a wake-up: a protocol bug (tests assert 0)
                    return
            finally:
                announce(False)

    def _check_cancelled(self, cancel) -> None:
        if self._W[L.OFF_CLOSED // 4]:
            raise QueueClosed("queue closed")
        if cancel is not None and cancel.is_set():
            raise QueueClosed("wait cancelled")

    def _check_peer(self, pending) -> None:
        raise NotImplementedError

    def _watch(self, key: int, pid: int, start: int) -> _proc.Watch:
        w = self._watches.get(key)
        if w is None or (w.pid, w.start) != (pid, start):
            if w is not None:
                w.close()
            w = self._watches[key] = _proc.Watch(pid, start)
        return w

    def _peer_died(self, pid: int, start: int, key: int, message: str, reader: int | None = None) -> None:
        if pid and not self._watch(key, pid, start).alive():
            raise PeerDied(message, pid, reader)

    def _reader_identity(self, r: int) -> tuple[int, int]:
        return struct.unpack_from("<IQ", self._mv, self.layout.reader(r) + L.R_PID)

    # -- closing -----------------------------------------------------------------------------------------------
    def cancel_all(self) -> None:
        """Mark the queue closed and wake every waiter, in every process. Safe from any thread."""
        if os.getpid() != self._pid:
            return
        with self._map_lock:
            if self._seg.map.closed:
                return
            self._W[L.OFF_CLOSED // 4] = 1
        _sync.full_fence()
        self._wake(self._rwake)
        self._wake(self._wwake)

    def _wake(self, futex) -> None:
        """Bump a futex word of the mapping (so that a waiter about to sleep returns at once) and wake its
        sleepers. The two calls release the GIL: under ``_map_lock``, so that no other thread unmaps meanwhile, and
        not at all once the mapping is gone (every path that wakes from outside the ring's lock comes here)."""
        with self._map_lock:
            if self._seg.map.closed:
                return
            _sync.fetch_add(futex)
            _sync.futex_wake(futex)

    def close(self) -> None:
        """Wake every waiter, remove the name if still there, and release this process's mapping. Idempotent.
        Messages already published stay readable by readers that have not closed."""
        if self._closed_here:
            return
        self._closed_here = True
        self._stop_cursor()
        if os.getpid() != self._pid:  # a forked copy: drop our mapping, leave the queue alone
            self._unmap()
            return
        self.cancel_all()
        self._on_close()
        # A thread of this process inside enqueue/dequeue holds the lock: wait for it to leave the mapping.
        if not self._lock.acquire(timeout=0.1):
            return  # still inside: leave the mapping to garbage collection rather than crash that thread
        try:
            self._unmap()
        finally:
            self._lock.release()

    def _on_close(self) -> None:
        """What this end does when it closes, after waking everyone and before unmapping."""

    def _stop_cursor(self) -> None:
        """No fast call touches the mapping from now on (the compiled cursor holds raw addresses into it)."""
        cur = getattr(self, "_cur", None)
        if cur is not None:
            cur.closed = 1

    def _unmap(self) -> None:
        self._stop_cursor()
        cur = getattr(self, "_cur", None)
        waited = _mono() + _UNMAP_WAIT_S
        while cur is not None and getattr(cur, "spinning", 0) and _mono() < waited:
            time.sleep(0.0002)  # another thread spins without the GIL: it sees ``closed`` and leaves within a poll
        if cur is not None and getattr(cur, "spinning", 0):
            return  # still inside: leave the mapping to garbage collection rather than crash that thread
        for w in self._watches.values():
            w.close()
        self._watches.clear()
        with self._map_lock:
            try:
                self._W.release()
                self._mv.release()
                self._seg.close()
            except BufferError:  # a view is still exported somewhere: garbage collection unmaps it later
                pass

    @property
    def closed(self) -> bool:
        return self._closed_here or bool(self._W[L.OFF_CLOSED // 4])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "writer" if self.is_writer else f"reader {self.reader_rank}"
        return f"<MessageQueue {self._seg.name} {role} of {self._n} readers, {self._nslots}x{self._slot_bytes} B>"


class _Holding:
    """The ring's lock plus the cursor's ``busy`` mark (a class, not a generator: slow paths take it often)."""

    __slots__ = ("_lock", "_cur")

    def __init__(self, lock: threading.Lock, cur) -> None:
        self._lock, self._cur = lock, cur

    def __enter__(self):
        self._lock.acquire()
        self._cur.busy = 1
        return self._cur

    def __exit__(self, *exc) -> None:
        self._cur.busy = 0
        self._lock.release()


def _release_view(view: memoryview) -> None:
    """Release a view lent to a caller; one the caller still slices is left to garbage collection."""
    try:
        view.release()
    except BufferError:
        pass


def _yield_by_default(n_readers: int) -> bool:
    """Yield while polling unless every party of the ring (the writer and its readers) can have a core of its own."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores <= n_readers + 1
