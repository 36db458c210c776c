"""Make ``/proc/<pid>/environ`` show this process's environment as it is now, tree marker included.

Why: the supervisor recognises the descendants of a dead worker (re-parented to it, a child subreaper) by the
tree marker in their environment (``RANKVISOR_TREE``, supervisor/backends/local/escalation.py). The kernel's view
of a process's environment is the block its ``exec`` was handed, not ``os.environ``: a worker is a fork of the
forkserver (or of the supervisor), or a spawn whose interpreter started before the marker was set, so its block
lacks the marker. A child made by ``exec`` (subprocess) gets ``os.environ`` and carries the marker; a child made
by ``fork`` alone (a ``multiprocessing`` fork-context Process, a DataLoader worker, a daemon that forks and
setsids) inherits the block of the worker's memory, and so did not -- it outlived the supervisor once its worker
was killed. Pointing the kernel at a fresh block that holds ``os.environ`` makes every later fork carry it too.

How: ``prctl(PR_SET_MM, PR_SET_MM_MAP)`` replaces the addresses the kernel reports (unprivileged where the kernel
has CONFIG_CHECKPOINT_RESTORE, as distribution kernels do; PR_SET_MM_ENV_START alone needs CAP_SYS_RESOURCE).
The map also sets the heap's end (``brk``), so it is read and written back with no other thread running: a
thread growing the heap in between would have its growth forgotten. Where the call is refused, nothing changes
and the supervisor still knows a worker's descendants by their session and by having seen them (escalation.py).
"""
from __future__ import annotations

import ctypes
import os
import threading

from transport import _proc

_PR_SET_MM, _PR_SET_MM_MAP = 35, 14  # linux/prctl.h
# /proc/self/stat fields (1-based, see proc(5)) for struct prctl_mm_map's members, in the struct's order; brk
# (the heap's current end) is not in /proc and comes from sbrk(0).
_STAT_FIELDS = {"start_code": 26, "end_code": 27, "start_data": 45, "end_data": 46, "start_brk": 47,
                "start_stack": 28, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51}
_block = None  # the new environment block: must live as long as the process (the kernel reads it from /proc)


class _MmMap(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("start_code", "end_code", "start_data", "end_data",
                                                     "start_brk", "brk", "start_stack", "arg_start", "arg_end",
                                                     "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_int32)]


def apply(env) -> bool:
    """``env`` (key, value pairs) into ``os.environ``, then publish(): the kernel's view shows them too. Call with
    no other thread running."""
    for key, value in env:
        os.environ[key] = value
    return publish()


def publish() -> bool:
    """Point the kernel's view of our environment at ``os.environ``. Call with no other thread running (see the
    module's docstring); True if the kernel took it."""
    global _block
    if threading.active_count() > 1:
        return False
    block = ctypes.create_string_buffer(b"".join(k + b"=" + v + b"\0" for k, v in os.environb.items()))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mm = _current_map(libc)
    except (OSError, AttributeError, ValueError, IndexError, TypeError):
        return False
    start = ctypes.addressof(block)
    mm.env_start, mm.env_end = start, start + len(block.raw) - 1  # the trailing buffer NUL is not part of it
    if libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        return False
    _block = block
    return True


def _current_map(libc) -> _MmMap:
    """The process's memory map as the kernel has it now (exe_fd -1: keep the executable; no auxv: keep it)."""
    after_name = _proc.stat_fields(os.getpid())
    fields = {name: int(after_name[n - 3]) for name, n in _STAT_FIELDS.items()}  # field 3 is after_name[0]
    libc.sbrk.restype = ctypes.c_void_p
    brk = libc.sbrk(0)
    if not brk or not all(fields.values()):  # zeros: /proc hid them from us
        raise ValueError("the memory map is not readable")
    return _MmMap(brk=brk, auxv=0, auxv_size=0, exe_fd=-1, **fields)
