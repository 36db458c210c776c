"""GPU health from NVML: ECC errors, retired pages, remapped rows and clock-event (throttle) reasons of the GPUs the
tree's ranks run on, for ``check_health``, ``status`` and ``/metrics``.

::

    NVML (nvidia-ml-py's pynvml, the `gpu` extra) ─ read_gpus() ─▶ GpuReading per GPU ─ cached gpu.health_ttl_s ─┐
        (each counter None where the GPU does not support it)                                                   │
    Supervisor.check_health ◀─ unhealthy(ranks) ─ problems(): uncorrectable ECC errors since the driver loaded,  │
    Supervisor.status       ◀─ of_ranks(ranks) ──  pending page retirement or row remap, a failed row remap ◀──┘
    /metrics                ◀─ readings()

A GPU with an uncorrectable memory error since the driver loaded (volatile count), or a page retirement or row remap
waiting for a reset, computes wrong or crashes its ranks until it is reset: its ranks are unhealthy. The aggregate
(lifetime) count and the throttle reasons are shown, not judged: an old error already remapped, or a card held at its
power cap, still computes right.

Why nvidia-ml-py here, while supervisor/gpu.py talks to NVML through ctypes: gpu.py reads two things (memory in use,
the processes) that the base install needs everywhere (``device=auto``, the status table's GPU MiB), with no
dependency; these counters take a dozen versioned calls, structs and enums that nvidia-ml-py, NVIDIA's own binding,
keeps right across drivers, so they are not written by hand a second time. Without the extra, health is simply not
reported (one debug line), never an error. Ranks are matched to GPUs by pid (NVML's process list), else, for
``device=cuda`` ranks whose pid NVML does not show (a container's own pid namespace), by their CUDA_VISIBLE_DEVICES
entry.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from loguru import logger

# NVML's clocks-event reason bits (nvml.h, nvmlClocksEventReason*): a stable ABI, named here once.
THROTTLE_REASONS = ((0x1, "gpu_idle"), (0x2, "applications_clocks"), (0x4, "sw_power_cap"), (0x8, "hw_slowdown"),
                    (0x10, "sync_boost"), (0x20, "sw_thermal"), (0x40, "hw_thermal"), (0x80, "hw_power_brake"),
                    (0x100, "display_clocks"))
# Reasons that mean the card is held back by heat or power, worth a glance in the status table (idle and settings
# are not news).
SLOWED = ("hw_thermal", "sw_thermal", "hw_slowdown", "hw_power_brake", "sw_power_cap")
RETIREMENT_CAUSES = ((0, "multiple_single_bit"), (1, "double_bit"))  # NVML_PAGE_RETIREMENT_CAUSE_*


@dataclass(frozen=True)
class GpuReading:
    """One GPU's counters at one instant. None: the GPU (or the driver) does not report that counter."""

    index: int  # NVML's index (nvidia-smi's)
    uuid: str
    pids: tuple[int, ...] = ()  # compute processes on it
    ecc_volatile: int | None = None  # uncorrectable ECC errors since the driver was loaded
    ecc_aggregate: int | None = None  # ... over the GPU's life
    retired_pages: dict[str, int] | None = None  # cause -> pages retired (GPUs before Ampere)
    retirement_pending: bool | None = None
    remapped_rows: dict[str, int] | None = None  # "correctable" / "uncorrectable" -> rows remapped (Ampere and later)
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    throttle: tuple[str, ...] = ()  # active clocks-event reasons

    def problems(self) -> list[str]:
        """What makes this GPU unhealthy, each naming the counter; empty when healthy."""
        out = []
        if self.ecc_volatile:
            out.append(f"{self.ecc_volatile} uncorrectable ECC error(s) since the driver loaded (volatile)")
        if self.retirement_pending:
            out.append("a page retirement is pending (needs a GPU reset)")
        if self.remap_pending:
            out.append("a row remap is pending (needs a GPU reset)")
        if self.remap_failed:
            out.append("a row remap failed")
        return out

    @property
    def short(self) -> str:
        """For the status table: "ok", "ECC 2", "remap pending", "hw_thermal", ..."""
        if self.ecc_volatile:
            return f"ECC {self.ecc_volatile}"
        if self.retirement_pending or self.remap_pending:
            return "reset pending"
        if self.remap_failed:
            return "remap failed"
        slowed = [r for r in SLOWED if r in self.throttle]
        return slowed[0] if slowed else "ok"

    @property
    def name(self) -> str:
        return f"GPU {self.index} ({self.uuid})"


# -- reading NVML ----------------------------------------------------------------------------------------------------
def read_gpus(nvml: Any) -> list[GpuReading]:
    """Every GPU NVML sees, through an initialised pynvml-like module ``nvml``."""
    return [read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]


def read_gpu(nvml: Any, index: int) -> GpuReading:
    h = nvml.nvmlDeviceGetHandleByIndex(index)

    def ask(fn: Callable[..., Any], *args: Any) -> Any:
        return _supported(nvml, fn, h, *args)

    uncorrected, volatile, aggregate = (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC,
                                        nvml.NVML_AGGREGATE_ECC)
    retired = {name: ask(nvml.nvmlDeviceGetRetiredPages, cause) for cause, name in RETIREMENT_CAUSES}
    rows = ask(nvml.nvmlDeviceGetRemappedRows)  # (correctable, uncorrectable, pending, failure)
    reasons = ask(_clocks_event_reasons(nvml))
    return GpuReading(
        index=index, uuid=_text(ask(nvml.nvmlDeviceGetUUID)) or f"index {index}",
        pids=tuple(p.pid for p in ask(nvml.nvmlDeviceGetComputeRunningProcesses) or ()),
        ecc_volatile=ask(nvml.nvmlDeviceGetTotalEccErrors, uncorrected, volatile),
        ecc_aggregate=ask(nvml.nvmlDeviceGetTotalEccErrors, uncorrected, aggregate),
        retired_pages=None if None in retired.values() else {k: len(v) for k, v in retired.items()},
        retirement_pending=_flag(ask(nvml.nvmlDeviceGetRetiredPagesPendingStatus)),
        remapped_rows=None if rows is None else {"correctable": rows[0], "uncorrectable": rows[1]},
        remap_pending=None if rows is None else bool(rows[2]),
        remap_failed=None if rows is None else bool(rows[3]),
        throttle=() if reasons is None else tuple(name for bit, name in THROTTLE_REASONS if reasons & bit))


def _clocks_event_reasons(nvml: Any) -> Callable[..., Any]:
    """nvmlDeviceGetCurrentClocksEventReasons (its older name: ...ClocksThrottleReasons)."""
    return getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons


def _supported(nvml: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None where the GPU or driver does not support it (NVML raises NVMLError for that)."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def load_nvml() -> Any:
    """pynvml (nvidia-ml-py), initialised; None where it is not installed or finds no driver."""
    try:
        import pynvml
    except ImportError:
        logger.debug("GPU health: nvidia-ml-py is not installed (pip install 'rankvisor[gpu]'); not reported")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug(f"GPU health: NVML is not available ({exc}); not reported")
        return None
    return pynvml


# -- the tree's view ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankPlace:
    """Where a rank runs, as the supervisor knows it: its pid, and for device=cuda its GPU's CUDA_VISIBLE_DEVICES
    entry (an index or a UUID)."""

    rank: int
    pid: int
    gpu_entry: str | None = None


class GpuHealth:
    """Readings of every GPU, cached ``ttl_s`` (a scrape, a status view and a health check a second apart read NVML
    once). Thread-safe. Disabled (``enabled=False``), or without NVML, it reads nothing and reports no GPU."""

    def __init__(self, enabled: bool = True, ttl_s: float = 1.0, loader: Callable[[], Any] | None = None) -> None:
        self.enabled, self.ttl_s, self._loader = enabled, ttl_s, loader
        self._nvml: Any = None
        self._loaded = False
        self._cache: tuple[float, list[GpuReading]] = (float("-inf"), [])
        self._lock = threading.Lock()

    def readings(self) -> list[GpuReading]:
        if not self.enabled:
            return []
        with self._lock:
            at, cached = self._cache
            if time.monotonic() - at < self.ttl_s:
                return cached
            if not self._loaded:  # NVML is initialised on first use only: a CPU tree that never asks pays nothing
                self._nvml, self._loaded = (self._loader or load_nvml)(), True
            fresh = read_gpus(self._nvml) if self._nvml is not None else []
            self._cache = (time.monotonic(), fresh)
            return fresh

    def of_ranks(self, places: list[RankPlace]) -> dict[int, GpuReading]:
        """rank -> the GPU it runs on (ranks on no GPU NVML knows are left out)."""
        gpus = self.readings()
        found = {place.rank: _gpu_of(place, gpus) for place in places}
        return {rank: gpu for rank, gpu in found.items() if gpu is not None}

    def unhealthy(self, places: list[RankPlace]) -> list[str]:
        """One line per unhealthy GPU under the tree: the GPU, its ranks and the counters that make it so."""
        ranks_of: dict[int, list[int]] = {}
        by_index: dict[int, GpuReading] = {}
        for rank, reading in sorted(self.of_ranks(places).items()):
            ranks_of.setdefault(reading.index, []).append(rank)
            by_index[reading.index] = reading
        lines = []
        for i, ranks in sorted(ranks_of.items()):
            problems = by_index[i].problems()
            if problems:
                lines.append(f"{by_index[i].name} of ranks {ranks}: {'; '.join(problems)}")
        return lines


def rank_place(rank: int, pid: int, spec: Any, device: str) -> RankPlace:
    """A rank's place from its spec: with device=cuda, its GPU is entry ``local_rank`` of the CUDA_VISIBLE_DEVICES it
    sees (runtime.env's, else ours; unset: that index)."""
    if device != "cuda":
        return RankPlace(rank, pid)
    visible = dict(spec.env).get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    entries = [e.strip() for e in visible.split(",")] if visible is not None else []
    entry = entries[spec.local_rank] if spec.local_rank < len(entries) else \
        (None if visible is not None else str(spec.local_rank))
    return RankPlace(rank, pid, entry)


def _gpu_of(place: RankPlace, gpus: list[GpuReading]) -> GpuReading | None:
    by_pid = next((g for g in gpus if place.pid in g.pids), None)
    if by_pid is not None or place.gpu_entry is None:
        return by_pid
    entry = place.gpu_entry
    return next((g for g in gpus if entry == str(g.index) or entry.startswith("GPU-") and g.uuid.startswith(entry)),
                None)
