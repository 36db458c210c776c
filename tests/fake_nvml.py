"""A stand-in for pynvml (nvidia-ml-py) with GPUs whose counters a test sets: the calls supervisor/gpu_health.py
makes, with pynvml's names, constants and ways to fail (tests/unit/test_gpu_health.py checks them against the real
module where it is installed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED

# Everything gpu_health.py reads from the module, for the check against the real pynvml.
API = ("NVMLError", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC", "NVML_AGGREGATE_ECC", "nvmlInit",
       "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetComputeRunningProcesses",
       "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus",
       "nvmlDeviceGetRemappedRows", "nvmlDeviceGetCurrentClocksEventReasons")
CONSTANTS = {"NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1, "NVML_VOLATILE_ECC": 0, "NVML_AGGREGATE_ECC": 1}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


@dataclass
class FakeGpu:
    """None for a counter = the GPU does not support it (NVML raises Not Supported)."""

    uuid: str
    pids: tuple[int, ...] = ()
    ecc: dict = field(default_factory=lambda: {0: 0, 1: 0})  # counter type (volatile 0, aggregate 1) -> count
    retired: dict | None = None  # cause (0 multiple single-bit, 1 double-bit) -> page addresses
    retirement_pending: int | None = None
    rows: tuple | None = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    reasons: int = 0x1  # clocks-event reason bits (idle)


class FakeNVML:
    NVMLError = NVMLError

    def __init__(self, *gpus: FakeGpu) -> None:
        self.gpus = list(gpus)
        self.reads = 0  # handles asked for: how often NVML was really read
        for name, value in CONSTANTS.items():
            setattr(self, name, value)

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self.reads += 1
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list:
        return [SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in h.pids]

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, error_type: int, counter_type: int) -> int:
        assert error_type == self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return _supported(h.ecc and h.ecc.get(counter_type))

    def nvmlDeviceGetRetiredPages(self, h: FakeGpu, cause: int) -> list:
        return _supported(None if h.retired is None else h.retired.get(cause, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: FakeGpu) -> int:
        return _supported(h.retirement_pending)

    def nvmlDeviceGetRemappedRows(self, h: FakeGpu) -> tuple:
        return _supported(h.rows)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeGpu) -> int:
        return h.reasons


def _supported(value):
    if value is None:
        raise NVMLError(NOT_SUPPORTED)
    return value
