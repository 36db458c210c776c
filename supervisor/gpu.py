"""GPU memory as the driver sees it (NVML through ctypes): no torch, no CUDA context in the supervisor.

Used for the status view and for measuring that a killed worker gave its memory back. Returns None / empty
results where there is no NVIDIA driver, so callers need no special case on CPU machines.
"""
from __future__ import annotations

import ctypes
import functools


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessInfo(ctypes.Structure):  # nvmlProcessInfo_v2_t / nvmlProcessInfo_t
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


@functools.lru_cache(maxsize=1)
def _nvml():
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    return lib


def _handle(index: int):
    lib = _nvml()
    if lib is None:
        return None
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    return handle


def device_count() -> int:
    lib = _nvml()
    if lib is None:
        return 0
    n = ctypes.c_uint()
    return n.value if lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) == 0 else 0


def used_bytes(index: int = 0) -> int | None:
    """Memory in use on GPU ``index`` (all processes), or None without NVML."""
    handle = _handle(index)
    if handle is None:
        return None
    mem = _Memory()
    return mem.used if _nvml().nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) == 0 else None


def processes(index: int = 0) -> dict[int, int]:
    """pid -> bytes for the compute processes on GPU ``index`` (empty without NVML)."""
    handle = _handle(index)
    if handle is None:
        return {}
    lib = _nvml()
    fn = getattr(lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) or lib.nvmlDeviceGetComputeRunningProcesses_v2
    count = ctypes.c_uint(64)
    infos = (_ProcessInfo * 64)()
    if fn(handle, ctypes.byref(count), infos) != 0:
        return {}
    return {infos[i].pid: infos[i].usedGpuMemory for i in range(count.value)}


def memory_by_pid() -> dict[int, int]:
    """pid -> bytes over every visible GPU."""
    out: dict[int, int] = {}
    for i in range(device_count()):
        for pid, used in processes(i).items():
            out[pid] = out.get(pid, 0) + used
    return out
