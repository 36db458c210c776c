"""ProbedLLMWorker: the Llama worker with its weight load split in two, for scripts/bench_restart.py.

LLMWorker records ``weight_load_s`` as one phase: reading each slice out of the safetensors files (page cache ->
a CPU tensor) and copying it into the parameter on the device (host -> device on CUDA) are interleaved. This
subclass times the reads (every SliceReader call) so that ``weight_read_s`` + ``weight_copy_s`` = ``weight_load_s``:
which of the two a restart pays for decides what to cut (keep the bytes closer, or keep them on the device).
On CUDA the weights go through worker/llm/fastload.py, where reads and copies overlap: there ``weight_read_s`` is
the time spent waiting on file reads (the copies run meanwhile), and ``weight_copy_s`` the rest of the load
(allocation, pinning the staging buffers, ``weight_stage_s``, and the copies not hidden behind reads).

    worker.cls=worker.restart_probe:ProbedLLMWorker
"""
from __future__ import annotations

import time
from typing import Any

from worker.llm.worker import LLMWorker


class ProbedLLMWorker(LLMWorker):
    def load_model(self) -> None:
        from worker.llm import checkpoint, fastload

        plain, fast = checkpoint.SliceReader, fastload.fill
        timer = {"read_s": 0.0, "stage_s": float("nan")}
        checkpoint.SliceReader = _timed_reader(plain, timer)  # only for this load, in this process
        fastload.fill = _timed_fill(fast, timer)
        try:
            super().load_model()
        finally:
            checkpoint.SliceReader, fastload.fill = plain, fast
        self.phases["weight_read_s"] = timer["read_s"]
        self.phases["weight_stage_s"] = timer["stage_s"]
        self.phases["weight_copy_s"] = max(0.0, self.phases["weight_load_s"] - timer["read_s"])


def _timed_fill(fill: Any, timer: dict[str, float]) -> Any:
    def call(*args: Any, **kwargs: Any) -> dict[str, float]:
        stats = fill(*args, **kwargs)
        timer["read_s"] += stats["read_s"]  # the plain-path slices in it are timed by the reader already
        timer["stage_s"] = stats["stage_s"]
        return stats

    return call


def _timed_reader(base: type, timer: dict[str, float]) -> type:
    def timed(name: str):
        method = getattr(base, name)

        def call(self: Any, *args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                timer["read_s"] += time.perf_counter() - t0

        return call

    return type("TimedSliceReader", (base,), {name: timed(name) for name in ("full", "rows", "cols")})
