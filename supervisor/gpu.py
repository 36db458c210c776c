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


def usable_gpus() -> tuple[str, ...]:
    """The CUDA_VISIBLE_DEVICES entries (or, unset, the indices) of the GPUs torch and the driver can really use here,
    found without importing torch or creating a CUDA context: torch must be a CUDA build and the driver must see the
    devices. CUDA's own rule applies: the list stops at the first entry that names no device. Empty on CPU hosts."""
    import os

    import glob

    count = device_count() or len(glob.glob("/proc/driver/nvidia/gpus/*"))  # the driver's own list without NVML
    if count == 0 or not torch_has_cuda():
        return ()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return tuple(str(i) for i in range(count))
    usable: list[str] = []
    for entry in (e.strip() for e in env.split(",")):
        known = entry.isdigit() and int(entry) < count or entry.startswith(("GPU-", "MIG-"))
        if not known:
            break
        usable.append(entry)
    return tuple(usable[:count])


@functools.lru_cache(maxsize=1)
def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from torch/version.py without importing torch."""
    import importlib.util
    import re
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.version.cuda is not None
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        with open(f"{spec.submodule_search_locations[0]}/version.py", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return False
    return re.search(r"^cuda(?::\s*\S+)?\s*=\s*['\"]", text, re.M) is not None
