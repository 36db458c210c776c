"""LLMWorker: one rank of the Llama decoder (``workload=llm``, ``worker.cls=worker.llm.worker:LLMWorker``).

Steps arrive through ``execute_model`` once per step, broadcast to every rank (the vLLM way):

    execute_model({"op": "prefill", "prompts": [[ids], ...]})  -> first new token of each row   (output rank only)
    execute_model({"op": "decode", "tokens": [id, ...]})       -> next token of each row        (output rank only)

The worker records how long each start-up phase took (``phase_timings``): after a kill -9, that is what the time to
serving again is made of (process start, CUDA init, torch.distributed init, weight load, first step).
"""
from __future__ import annotations

import os
import time
from typing import Any

from worker.base import Worker
from worker.llm.shape import check_layout, read_shape, stage_layers

AUTO_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
TEXT_PROMPT_BOUND = 256  # cache length planned for text prompts before they are seen (prefill grows it if needed)


def resolve_dtype(dtype: str, device: str) -> str:
    return AUTO_DTYPE[device] if dtype == "auto" else dtype


def planned_prompt_len(llm: Any) -> int:
    """The longest prompt the run is configured for, known before any prompt is seen."""
    if llm.prompt_ids:
        return len(llm.prompt_ids)
    return TEXT_PROMPT_BOUND if llm.prompt_text else llm.prompt_len


def process_created_wall() -> float:
    """Wall-clock time at which this process was created (from /proc, exact to a clock tick)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = 0.0
    return time.time() - max(0.0, age)


class LLMWorker(Worker):
    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        now = time.time()
        created = process_created_wall()
        # Wall-clock stamps so a driver can line them up with the moment it killed the previous incarnation.
        self.phases: dict[str, float] = {"created_at": created, "process_start_s": now - created}
        self.engine: Any = None
        self.checkpoint = ""
        self._steps = 0

    # -- start-up -----------------------------------------------------------------------------------------------
    def init_device(self) -> None:
        t0 = time.perf_counter()
        if self.spec.device == "cuda":
            import torch

            torch.cuda.set_device(self.spec.local_rank)
            torch.zeros(1, device="cuda")  # creates the CUDA context now, so its cost is not billed to NCCL
        t1 = time.perf_counter()
        super().init_device()
        t2 = time.perf_counter()
        self.phases.update(cuda_init_s=t1 - t0, dist_init_s=t2 - t1)

    def load_model(self) -> None:
        import torch

        from worker.llm import checkpoint
        from worker.llm.engine import Engine
        from worker.llm.model import Parallel, load_stage

        llm, topo = self.spec.llm, self.topology
        dtype = resolve_dtype(llm.dtype, self.spec.device)
        t0 = time.perf_counter()
        path = checkpoint.resolve(llm.checkpoint, llm.preset, llm.cache_dir, llm.seed, dtype,
                                  device=str(self.device))
        t1 = time.perf_counter()
        shape = read_shape(str(path))
        check_layout(shape, topo.tp, topo.pp)
        par = Parallel(tp=topo.tp, tp_rank=topo.tp_rank, group=self.tp_group, first_stage=topo.pp_rank == 0,
                       last_stage=topo.pp_rank == topo.pp - 1)
        reader = checkpoint.SliceReader(path)
        try:
            stage = load_stage(reader, shape, par, stage_layers(shape.num_hidden_layers, topo.pp, topo.pp_rank),
                               getattr(torch, dtype), self.device)
        finally:
            reader.close()
        prev_rank = self.pp_ranks[topo.pp_rank - 1] if topo.pp_rank > 0 else None
        next_rank = self.pp_ranks[topo.pp_rank + 1] if topo.pp_rank < topo.pp - 1 else None
        self.engine = Engine(stage, getattr(torch, dtype), self.device, prev_rank, next_rank,
                             use_graphs=llm.cuda_graphs)
        self.engine.allocate(llm.batch, llm.max_seq_len or planned_prompt_len(llm) + llm.max_new_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.checkpoint = str(path)
        self.phases.update(checkpoint_write_s=t1 - t0, weight_load_s=time.perf_counter() - t1)

    # -- steps ----------------------------------------------------------------------------------------------------
    def execute_model(self, step: dict[str, Any]) -> list[int] | None:
        t0 = time.perf_counter()
        op = step.get("op")
        if op == "prefill":
            out = self.engine.prefill(step["prompts"], step.get("max_new_tokens", self.spec.llm.max_new_tokens))
        elif op == "decode":
            out = self.engine.decode(step.get("tokens"))
        else:
            raise ValueError(f"unknown step op {op!r} (prefill | decode)")
        self._steps += 1
        if self._steps <= 2:  # the first prefill and the first decode (which captures the CUDA graph)
            self.phases[f"first_{op}_s"] = time.perf_counter() - t0
        return out if self.topology.is_output_rank else None

    def phase_timings(self) -> dict[str, float]:
        return dict(self.phases)

    def model_info(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "dtype": str(self.engine.dtype).replace("torch.", ""),
                "max_seq": self.engine.max_seq, "cuda_graphs": self.engine.use_graphs}

    def check_health(self) -> dict[str, Any]:
        report = super().check_health()
        report.update(model_loaded=self.engine is not None, steps=self._steps)
        return report
