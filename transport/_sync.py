"""Kernel waits and memory fences for words that live in a shared-memory segment.

Python has no atomics, so the two things a lock-free ring needs come from the C runtime through ctypes:

* ``futex_wait`` / ``futex_wake`` (the Linux ``futex(2)`` system call on a 32-bit word of a MAP_SHARED
  mapping, so it works across processes). A waiter passes the value it last saw; the kernel compares it
  atomically with the word and only sleeps if they are equal, so a wake that happens between the user-space
  check and the system call is never lost.
* ``full_fence`` (``atomic_thread_fence(memory_order_seq_cst)`` from libatomic) for the one place where
  store->load order matters: "publish, then look whether anyone sleeps" on one side and "announce that I
  sleep, then look whether there is news" on the other (Dekker's pattern). Without it both sides could miss
  each other and a waiter would sleep through a message.

Asymmetric fences (``membarrier(2)``): the store->load fence is paid on every message, and it is not cheap (it
drains the store buffer, which still holds the payload just copied: ~0.7 us per message here). Yet only the
side that is about to sleep needs it to be reliable. With ``MEMBARRIER_CMD_GLOBAL_EXPEDITED`` the sleeper forces
a full barrier on every CPU that runs a registered process, so the hot paths (publish, release) of registered
processes need no fence at all::

    hot path (registered):  store pub       ; compiler barrier ; load sleepers
    sleeper:                store sleepers  ; heavy_fence()    ; load pub

``register_asymmetric()`` registers this process (once per pid, so forked children register again);
``heavy_fence()`` is the sleeper's side. Without membarrier both sides use ``full_fence``.

``release_fence`` / ``acquire_fence`` order payload bytes against the flag byte that publishes them. On x86-64
(TSO: stores are not reordered with stores, loads not with loads) they are compiler barriers only, and every
ctypes/C call from the interpreter already is one, so they cost nothing; on weakly ordered CPUs (ARM) they are
real fences. Where libatomic is missing, ``HAVE_FENCE`` is False and the ring falls back to waking waiters
unconditionally (a system call per message: slower, still correct, because the futex call is itself a full
barrier in the kernel).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import errno
import os
import platform

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98, "ppc64le": 221, "s390x": 238}
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "arm64": 283, "ppc64le": 365, "s390x": 356}
_MB_QUERY, _MB_GLOBAL_EXPEDITED, _MB_REGISTER_GLOBAL_EXPEDITED = 0, 1 << 1, 1 << 2
_FUTEX_WAIT = 0  # not FUTEX_PRIVATE: the word is shared between processes
_FUTEX_WAKE = 1
WAKE_ALL = 0x7FFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYSNO = _SYS_FUTEX.get(platform.machine())
if _SYSNO is None:  # pragma: no cover - only on exotic architectures
    raise ImportError(f"transport: no futex syscall number known for {platform.machine()}")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def address(addr: int) -> ctypes.c_void_p:
    """A pointer argument built once: the hot path passes it to the functions below without re-wrapping."""
    return ctypes.c_void_p(addr)


def _ptr(addr) -> ctypes.c_void_p:
    return addr if isinstance(addr, ctypes.c_void_p) else ctypes.c_void_p(addr)


def futex_wait(addr, expected: int, timeout_s: float | None) -> bool:
    """Sleep while the u32 at ``addr`` (an int or an ``address()``) equals ``expected``, at most ``timeout_s``.
    False on timeout.

    Returns True on a wake-up, a value mismatch or EINTR (the caller re-checks its condition in every case;
    returning on EINTR lets Python run signal handlers, e.g. the worker's SIGTERM handler).
    """
    ts = None
    if timeout_s is not None:
        timeout_s = max(timeout_s, 0.0)
        sec = int(timeout_s)
        ts = ctypes.byref(_Timespec(sec, int((timeout_s - sec) * 1e9)))
    rc = _syscall(_SYSNO, _ptr(addr), _FUTEX_WAIT, ctypes.c_uint32(expected), ts, None, 0)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, f"futex wait failed: {os.strerror(err)}")


def futex_wake(addr, count: int = WAKE_ALL) -> None:
    """Wake up to ``count`` waiters sleeping on the u32 at ``addr`` (in any process)."""
    _syscall(_SYSNO, _ptr(addr), _FUTEX_WAKE, count, None, None, 0)


def _load_libatomic():
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
        fence = lib.atomic_thread_fence
        fence.restype = None
        add = lib.__atomic_fetch_add_4
        add.restype = ctypes.c_uint32
        add.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int)
        return fence, add
    except (OSError, AttributeError):
        return None, None


_fence_fn, _fetch_add_fn = _load_libatomic()
HAVE_FENCE = _fence_fn is not None
_SEQ_CST = 5
_STRONG_MODEL = platform.machine() in ("x86_64", "AMD64", "i686")


def _no_fence() -> None:
    """Without libatomic there is no fence; callers never rely on one then (see HAVE_FENCE)."""


# Sequentially consistent fence (store->load ordering). A C-level partial: no Python frame on the hot path.
full_fence = functools.partial(_fence_fn, _SEQ_CST) if _fence_fn is not None else _no_fence


# True where acquire/release fences are real instructions (not x86-64): the hot path skips the call otherwise.
NEED_ORDER_FENCES = not _STRONG_MODEL

if _STRONG_MODEL:

    def release_fence() -> None:
        """x86-64 TSO: stores stay in program order; the ctypes call boundary stops compiler reordering."""

    def acquire_fence() -> None:
        """x86-64 TSO: loads stay in program order."""

else:  # pragma: no cover - exercised on ARM only
    release_fence = full_fence
    acquire_fence = full_fence


def fetch_add(addr, value: int = 1) -> int:
    """Atomically add ``value`` (may be negative) to the u32 at ``addr``; return the previous value. With
    libatomic this is a sequentially consistent read-modify-write: also a full fence."""
    value &= 0xFFFFFFFF
    if _fetch_add_fn is not None:
        return _fetch_add_fn(_ptr(addr), value, _SEQ_CST)
    # Without libatomic: a racy add. Then HAVE_FENCE is False and the ring wakes unconditionally, so the words
    # this is used on (futex words that must merely change, the sleepers count) need not be exact.
    word = ctypes.c_uint32.from_address(_ptr(addr).value)
    old = word.value
    word.value = (old + value) & 0xFFFFFFFF
    return old


# -- asymmetric fences ---------------------------------------------------------------------------------------------
_MB_NR = _SYS_MEMBARRIER.get(platform.machine())


def _membarrier(cmd: int) -> int:
    if _MB_NR is None:
        return -1
    return _syscall(_MB_NR, cmd, 0, 0)


_mb_mask = _membarrier(_MB_QUERY)
HAVE_HEAVY_FENCE = _mb_mask > 0 and _mb_mask & (_MB_GLOBAL_EXPEDITED | _MB_REGISTER_GLOBAL_EXPEDITED) == (
    _MB_GLOBAL_EXPEDITED | _MB_REGISTER_GLOBAL_EXPEDITED)
_registered_pid = 0


def register_asymmetric() -> bool:
    """Make this process's hot paths covered by other processes' ``heavy_fence()``. True if it worked (then this
    process may skip the store->load fence on its hot paths)."""
    global _registered_pid
    pid = os.getpid()
    if _registered_pid == pid:
        return True
    if not HAVE_HEAVY_FENCE or _membarrier(_MB_REGISTER_GLOBAL_EXPEDITED) != 0:
        return False
    _registered_pid = pid
    return True


def heavy_fence() -> None:
    """The sleeper's side of an asymmetric fence: a full barrier on every CPU running a registered process (and
    on this one). Falls back to a local full fence if the call fails, which leaves peers' fence-less hot paths
    uncovered: the sliced sleeps then bound a missed wake-up to one slice."""
    if _membarrier(_MB_GLOBAL_EXPEDITED) != 0:
        full_fence()
