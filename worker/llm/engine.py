"""Prefill and greedy decode on one rank's stage: the pipeline hand-off, the KV-cache position, the CUDA graph.

Used by the worker (one rank of a TP × PP world) and, at tp = pp = 1, directly by tests in one process.

    prefill(prompts)  left-pad to one length T, run T positions, return each row's first new token
    decode(tokens)    one position per row: feed back the previous tokens, return the next ones

A stage that is not the first receives its input (the hidden state) from the same TP rank of the previous stage, and
one that is not the last sends its output on: every TP rank holds the full hidden state after the all-reduce, so
each feeds its own peer and no gather is needed. Only the last stage returns tokens.

On CUDA the decode step of each batch size is captured once in a CUDA graph (static inputs: the tokens or hidden
state and the cache slot; the KV cache and the padding live at fixed addresses), so a step is one graph launch
instead of some fifteen kernel launches per layer from Python: the Python overhead that keeps an eager decoder far
below the memory-bandwidth bound at batch 1.
"""
from __future__ import annotations



from typing import Any

import torch
import torch.distributed as dist

from worker.llm.model import Stage

PAD_TOKEN = 0  # left-padding token id: its slots are masked, so any valid id will do
GRAPH_WARMUP_STEPS = 2  # eager runs on a side stream before capture (cuBLAS / NCCL lazy init must not be captured)


class DecodeGraph:
    """One batch size's decode step captured in a CUDA graph. The warm-up and capture runs execute the real step
    (the current token at the current slot), so what they write into the KV cache is what the replay writes."""

    def __init__(self, stage: Stage, x: torch.Tensor, pos: torch.Tensor) -> None:
        self.x, self.pos = x.clone(), pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(GRAPH_WARMUP_STEPS):
                stage(self.x, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = stage(self.x, self.pos)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.out


class Engine:
    def __init__(self, stage: Stage, dtype: torch.dtype, device: torch.device, prev_rank: int | None = None,
                 next_rank: int | None = None, use_graphs: bool = False) -> None:
        self.stage, self.dtype, self.device = stage, dtype, device
        self.prev_rank, self.next_rank = prev_rank, next_rank  # pipeline peers (global ranks), None at the ends
        self.use_graphs = use_graphs and device.type == "cuda"
        self.graphs: dict[int, DecodeGraph] = {}
        self.batch = 0  # rows of the current sequence batch
        self.pos = 0  # next cache slot to write
        self.cache_batch = 0

    def allocate(self, batch: int, max_seq: int) -> None:
        self.stage.allocate_cache(batch, max_seq, self.dtype, self.device)
        self.cache_batch = batch
        self.graphs.clear()  # captured against the old cache's addresses

    @property
    def max_seq(self) -> int:
        return self.stage.max_seq

    # -- steps ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int) -> list[int] | None:
        b, t = len(prompts), max(len(p) for p in prompts)
        if b > self.cache_batch or t + max_new_tokens > self.max_seq:
            self.allocate(max(b, self.cache_batch), t + max_new_tokens)
        tokens = torch.tensor([[PAD_TOKEN] * (t - len(p)) + list(p) for p in prompts], dtype=torch.long)
        self.stage.pad[:b].copy_(torch.tensor([t - len(p) for p in prompts]))
        self.batch, self.pos = b, t
        x = tokens.to(self.device) if self.prev_rank is None else self._recv((b, t))
        out = self.stage(x, torch.arange(t, device=self.device))
        return self._finish(out)

    @torch.no_grad()
    def decode(self, tokens: list[int] | None) -> list[int] | None:
        if self.pos >= self.max_seq:
            raise RuntimeError(f"KV cache full: {self.max_seq} positions (raise llm.max_seq_len)")
        b = self.batch
        if self.prev_rank is None:
            if tokens is None or len(tokens) != b:
                raise ValueError(f"decode needs {b} tokens (one per row), got {tokens!r}")
            x = torch.tensor(tokens, dtype=torch.long).view(b, 1).to(self.device)
        else:
            x = self._recv((b, 1))
        pos = torch.full((1,), self.pos, dtype=torch.long, device=self.device)
        out = self._decode_step(x, pos)
        self.pos += 1
        return self._finish(out)

    def _decode_step(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.use_graphs:
            return self.stage(x, pos)
        graph = self.graphs.get(x.shape[0])
        if graph is None:
            graph = self.graphs[x.shape[0]] = DecodeGraph(self.stage, x, pos)
        return graph(x, pos)

    # -- pipeline hand-off ----------------------------------------------------------------------------------------
    def _recv(self, bt: tuple[int, int]) -> torch.Tensor:
        buf = torch.empty(*bt, self.stage.shape.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=self.prev_rank)
        return buf

    def _finish(self, out: torch.Tensor) -> list[int] | None:
        if self.next_rank is not None:
            dist.send(out.contiguous(), dst=self.next_rank)
            return None
        return out.tolist()


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy generation in one process (tp = pp = 1): the tokens after each prompt, ``max_new_tokens`` per row."""
    out = [[t] for t in engine.prefill(prompts, max_new_tokens)]
    for _ in range(max_new_tokens - 1):
        for row, t in zip(out, engine.decode([r[-1] for r in out])):
            row.append(t)
    return out


__all__ = ["Engine", "DecodeGraph", "generate", "PAD_TOKEN"]


def local_engine(path: Any, dtype: str = "float32", device: str = "cpu", batch: int = 1, max_seq: int = 64,
                 use_graphs: bool = False) -> Engine:
    """The whole model in this process (tp = pp = 1), loaded from the checkpoint folder ``path``."""
    from worker.llm.checkpoint import SliceReader
    from worker.llm.model import Parallel, load_stage
    from worker.llm.shape import read_shape

    shape = read_shape(str(path))
    torch_dtype, dev = getattr(torch, dtype), torch.device(device)
    reader = SliceReader(path)
    try:
        stage = load_stage(reader, shape, Parallel(), range(shape.num_hidden_layers), torch_dtype, dev)
    finally:
        reader.close()
    engine = Engine(stage, torch_dtype, dev, use_graphs=use_graphs)
    engine.allocate(batch, max_seq)
    return engine
