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
        self.par: Any = None  # the stage's Parallel: its TP group is set once this rank has joined its world
        self.checkpoint = ""
        self._steps = 0

    # -- the weight keeper's side ---------------------------------------------------------------------------------
    @classmethod
    def weights_key(cls, spec: Any) -> tuple:
        """The same checkpoint, dtype, TP slice, pipeline stage and device hold the same bytes: dp replicas on CPU
        (or sharing a GPU) map one copy."""
        llm, topo = spec.llm, spec.topology
        device = "cpu" if spec.device == "cpu" else f"cuda:{spec.local_rank}"
        return ("llm", llm.checkpoint, llm.preset, llm.cache_dir, llm.seed, resolve_dtype(llm.dtype, spec.device),
                topo.tp, topo.tp_rank, topo.pp, topo.pp_rank, device)

    @classmethod
    def build_weights(cls, spec: Any, alloc: Any, fill: bool) -> None:
        import torch

        from worker.llm.model import Parallel, kept_stage, load_stage

        path, shape, layers, dtype = _stage_source(spec)
        topo = spec.topology
        par = Parallel(tp=topo.tp, tp_rank=topo.tp_rank)
        if not fill:
            kept_stage(shape, par, layers, dtype, torch.device("meta"), alloc)
            return
        from worker.llm import checkpoint

        reader = checkpoint.SliceReader(path)
        try:
            load_stage(reader, shape, par, layers, dtype, alloc.device, alloc)
        finally:
            reader.close()

    # -- start-up -----------------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """A standby: CUDA context, weights mapped, model built, KV cache allocated and, in a world of one (no
        collective to wait for), the first prefill and the decode step's CUDA graph run once already."""
        self._init_cuda()
        self._build()
        if self.topology.world_size == 1:
            self._first_steps()

    def init_device(self) -> None:
        self._init_cuda()
        t1 = time.perf_counter()
        super().init_device()
        self.phases["dist_init_s"] = time.perf_counter() - t1

    def _init_cuda(self) -> None:
        if self.device is not None:
            return  # a standby did it
        t0 = time.perf_counter()
        self.select_device()
        if self.device.type == "cuda":
            import torch

            torch.zeros(1, device=self.device)  # creates the CUDA context now, so its cost is not billed to NCCL
        self.phases["cuda_init_s"] = time.perf_counter() - t0

    def load_model(self) -> None:
        if self.engine is None:
            self._build()
        self.par.group = self.tp_group  # the world exists now: the stage's all-reduces go through it

    def _build(self) -> None:
        """The stage (kept weights mapped, or the checkpoint's slices loaded), its engine and KV cache."""
        import torch

        from worker.llm.engine import Engine

        llm, topo = self.spec.llm, self.topology
        t0 = time.perf_counter()
        path, shape, layers, dtype = _stage_source(self.spec)
        t1 = time.perf_counter()
        check_layout(shape, topo.tp, topo.pp)
        self.par = _parallel(topo)
        stage = self._kept_stage(shape, layers, dtype) if self.spec.weights else self._loaded_stage(path, shape,
                                                                                                    layers, dtype)
        pp_ranks = [pp * topo.tp + topo.tp_rank for pp in range(topo.pp)]
        prev_rank = pp_ranks[topo.pp_rank - 1] if topo.pp_rank > 0 else None
        next_rank = pp_ranks[topo.pp_rank + 1] if topo.pp_rank < topo.pp - 1 else None
        self.engine = Engine(stage, dtype, self.device, prev_rank, next_rank, use_graphs=llm.cuda_graphs)
        self.engine.allocate(llm.batch, llm.max_seq_len or planned_prompt_len(llm) + llm.max_new_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.checkpoint = str(path)
        self.phases.update(checkpoint_write_s=t1 - t0, weight_load_s=time.perf_counter() - t1,
                           weights_kept=float(bool(self.spec.weights)))

    def _kept_stage(self, shape: Any, layers: range, dtype: Any) -> Any:
        """Every parameter a view of the weight keeper's arena: nothing read, nothing copied."""
        from worker import weights
        from worker.llm.model import kept_stage

        handle = self.spec.weights
        arena = weights.Arena(weights.open_buffer(handle), handle.slots)
        stage = kept_stage(shape, self.par, layers, dtype, self.device, arena)
        arena.check_complete()
        return stage

    def _loaded_stage(self, path: Any, shape: Any, layers: range, dtype: Any) -> Any:
        from worker.llm import checkpoint
        from worker.llm.model import load_stage

        reader = checkpoint.SliceReader(path)
        try:
            return load_stage(reader, shape, self.par, layers, dtype, self.device)
        finally:
            reader.close()

    def _first_steps(self) -> None:
        """One throw-away prefill and decode at the configured batch: kernels loaded, cuBLAS handles made, the
        decode step's CUDA graph captured. The KV cache slots they write are rewritten by the next prefill."""
        t0 = time.perf_counter()
        batch = self.spec.llm.batch
        first = self.engine.prefill([[1]] * batch, max_new_tokens=1)
        self.engine.decode(first if first is not None else [1] * batch)
        self.phases["warm_steps_s"] = time.perf_counter() - t0

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
                "max_seq": self.engine.max_seq, "cuda_graphs": self.engine.use_graphs,
                "weights": "kept" if self.spec.weights else "loaded"}

    def check_health(self) -> dict[str, Any]:
        report = super().check_health()
        report.update(model_loaded=self.engine is not None, steps=self._steps)
        return report


def _parallel(topo: Any) -> Any:
    from worker.llm.model import Parallel

    return Parallel(tp=topo.tp, tp_rank=topo.tp_rank, first_stage=topo.pp_rank == 0,
                    last_stage=topo.pp_rank == topo.pp - 1)


def _stage_source(spec: Any) -> tuple[Any, Any, range, Any]:
    """Where rank ``spec``'s stage comes from: the checkpoint folder (a preset's written once), its shape, the
    layers of this rank's pipeline stage, and the torch dtype."""
    import torch

    from worker.llm import checkpoint

    llm, topo = spec.llm, spec.topology
    dtype = resolve_dtype(llm.dtype, spec.device)
    device = "cpu" if spec.device == "cpu" else f"cuda:{spec.local_rank}"
    path = checkpoint.resolve(llm.checkpoint, llm.preset, llm.cache_dir, llm.seed, dtype, device=device)
    shape = read_shape(str(path))
    return path, shape, stage_layers(shape.num_hidden_layers, topo.pp, topo.pp_rank), getattr(torch, dtype)
