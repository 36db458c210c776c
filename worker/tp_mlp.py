"""The built-in workloads: a real tensor-parallel MLP stack (``tp_mlp``) and a torch-free ``echo`` worker.

Model: ``layers`` residual blocks, each ``x + W2 · gelu(W1 · x + b1) + b2`` with W1: hidden -> 4*hidden and
W2: 4*hidden -> hidden. Under tensor parallelism W1/b1 are split by output rows (column-parallel) and W2 by input
columns (row-parallel), so each TP rank computes a partial W2 product over its slice of the 4*hidden features and
the partials are summed with one all-reduce per block. Under pipeline parallelism the blocks are split into
``pp`` contiguous stages and activations travel stage to stage with point-to-point send/recv.

Weights are generated at full size on CPU from (seed, layer) and then sliced, so every (tp, pp) layout computes
the same function as ``reference_forward`` up to float32 summation order.

torch is imported inside functions: ``EchoWorker`` lives in this module and must start without it.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from worker.base import Worker
from worker.spec import WorkloadSettings

if TYPE_CHECKING:
    import torch

EXPANSION = 4  # MLP inner width = EXPANSION * hidden
GELU_APPROX = "tanh"  # one choice everywhere: the reference and the sharded paths must use the same GELU
_NS_WEIGHTS, _NS_INPUT = 1, 2  # seed namespaces, so weights of layer k never equal the input of step k
_MASK64 = (1 << 64) - 1


# -- deterministic data ----------------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    """A stable seed from a tuple of ints (FNV-1a style), without collisions like (0, 1) vs (1, 0)."""
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (p & _MASK64)) * 0x100000001B3) & _MASK64
    return h >> 1  # manual_seed wants a value that fits in a signed 64-bit int


def _generator(*parts: int) -> "torch.Generator":
    import torch

    return torch.Generator(device="cpu").manual_seed(_seed(*parts))


def make_input(settings: WorkloadSettings, step: int) -> "torch.Tensor":
    """The deterministic input batch of one step: [batch, hidden] float32 on CPU, ~N(0, 1)."""
    import torch

    g = _generator(_NS_INPUT, settings.seed, step)
    return torch.randn(settings.batch, settings.hidden, generator=g, dtype=torch.float32)


def layer_weights(settings: WorkloadSettings, layer: int) -> dict[str, "torch.Tensor"]:
    """Full-size weights of one block (nn.Linear layout: [out, in]), deterministic from (seed, layer)."""
    import torch

    h, inner = settings.hidden, EXPANSION * settings.hidden
    g = _generator(_NS_WEIGHTS, settings.seed, layer)
    # randn / sqrt(fan_in) keeps each matmul variance-preserving; the residual branch is further scaled by
    # 1/sqrt(layers) so that the residual sum stays O(1) however deep the stack is (else var grows ~1.4x/layer).
    branch = 1.0 / settings.layers**0.5
    return {
        "w1": torch.randn(inner, h, generator=g) / h**0.5,
        "b1": torch.randn(inner, generator=g) * 0.02,
        "w2": torch.randn(h, inner, generator=g) * (branch / inner**0.5),
        "b2": torch.randn(h, generator=g) * (0.02 * branch),
    }


# -- sharding math (shared by the worker and the single-process simulation) -----------------------------------
def validate(settings: WorkloadSettings, tp: int, pp: int) -> None:
    """Raise ValueError when the layout cannot shard this model evenly."""
    if (EXPANSION * settings.hidden) % tp:
        raise ValueError(f"inner width {EXPANSION * settings.hidden} is not divisible by tp={tp}")
    if settings.layers % pp:
        raise ValueError(f"layers={settings.layers} is not divisible by pp={pp}")


def stage_layers(layers: int, pp: int, pp_rank: int) -> range:
    """The contiguous block indices owned by one pipeline stage."""
    per = layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def shard_layer(full: dict[str, "torch.Tensor"], tp: int, tp_rank: int) -> dict[str, "torch.Tensor"]:
    """One TP rank's slice of a block: W1/b1 by output rows, W2 by input columns; b2 is replicated."""
    inner = full["w1"].shape[0]
    lo, hi = tp_rank * inner // tp, (tp_rank + 1) * inner // tp
    # .contiguous(): a column slice of W2 is a strided view; copy so each shard owns compact memory.
    return {
        "w1": full["w1"][lo:hi].contiguous(),
        "b1": full["b1"][lo:hi].contiguous(),
        "w2": full["w2"][:, lo:hi].contiguous(),
        "b2": full["b2"].clone(),
    }


def block_partial(shard: dict[str, "torch.Tensor"], x: "torch.Tensor") -> "torch.Tensor":
    """This TP rank's contribution to a block's MLP output; the sum over TP ranks is the full W2 product."""
    import torch.nn.functional as F

    return F.linear(F.gelu(F.linear(x, shard["w1"], shard["b1"]), approximate=GELU_APPROX), shard["w2"])


def finish_block(x: "torch.Tensor", summed: "torch.Tensor", b2: "torch.Tensor") -> "torch.Tensor":
    """Residual add once the partials are summed; b2 is added after the sum so it counts once, not tp times."""
    return x + (summed + b2)


def simulate_parallel_forward(settings: WorkloadSettings, x: "torch.Tensor", tp: int, pp: int) -> "torch.Tensor":
    """The distributed forward computed in one process: stage by stage, summing the TP partials by hand."""
    validate(settings, tp, pp)
    for stage in range(pp):
        for layer in stage_layers(settings.layers, pp, stage):
            full = layer_weights(settings, layer)
            shards = [shard_layer(full, tp, r) for r in range(tp)]
            x = finish_block(x, sum(block_partial(s, x) for s in shards), shards[0]["b2"])
    return x


def reference_forward(settings: WorkloadSettings, x: "torch.Tensor") -> "torch.Tensor":
    """The full model in one process, from the full-size weights, with no sharding at all."""
    import torch
    import torch.nn.functional as F

    x = x.to(dtype=torch.float32)
    for layer in range(settings.layers):
        w = layer_weights(settings, layer)
        hidden = F.gelu(F.linear(x, w["w1"], w["b1"]), approximate=GELU_APPROX)
        x = x + F.linear(hidden, w["w2"], w["b2"])
    return x


# -- the workers ------------------------------------------------------------------------------------------------
class TPMLPWorker(Worker):
    """One rank of the tensor/pipeline-parallel MLP: holds this stage's blocks, sharded for this TP rank."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.blocks: list[dict[str, torch.Tensor]] = []

    def load_model(self) -> None:
        s, t = self.spec.workload, self.topology
        validate(s, t.tp, t.pp)
        self.blocks = [
            {k: v.to(self.device) for k, v in shard_layer(layer_weights(s, i), t.tp, t.tp_rank).items()}
            for i in stage_layers(s.layers, t.pp, t.pp_rank)
        ]

    def execute_model(self, x: "torch.Tensor") -> "torch.Tensor | None":
        import torch
        import torch.distributed as dist

        t = self.topology
        # no_grad, not inference_mode: an inference tensor handed back to the caller breaks later in-place ops.
        with torch.no_grad():
            x = self._stage_input(x)
            for shard in self.blocks:
                partial = block_partial(shard, x)
                if t.tp > 1:
                    dist.all_reduce(partial, group=self.tp_group)
                x = finish_block(x, partial, shard["b2"])
            if t.pp_rank < t.pp - 1:
                # Every TP rank holds the full activation after the all-reduce: each feeds its own peer.
                dist.send(x, dst=self.pp_ranks[t.pp_rank + 1])
                return None
            return x.cpu() if t.is_output_rank else None

    def _stage_input(self, x: "torch.Tensor") -> "torch.Tensor":
        """Stage 0 uses the call's tensor; later stages receive the previous stage's activation instead."""
        import torch
        import torch.distributed as dist

        t = self.topology
        x = torch.as_tensor(x, dtype=torch.float32)
        if t.pp_rank == 0:
            return x.to(self.device).contiguous()
        # The call is broadcast to every rank, so the ignored tensor still carries the batch's shape.
        buf = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        dist.recv(buf, src=self.pp_ranks[t.pp_rank - 1])
        return buf

    def check_health(self) -> dict[str, Any]:
        import torch

        report = super().check_health()
        params = [p for shard in self.blocks for p in shard.values()]
        bad = [i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())]
        if bad:
            raise RuntimeError(f"rank {self.rank}: {len(bad)} parameter tensors hold NaN/inf")
        report.update(
            layers=len(self.blocks),
            params=sum(p.numel() for p in params),
            topology=self.topology.name,
        )
        return report


class EchoWorker(Worker):
    """A torch-free worker for transport and RPC tests: starts in milliseconds and echoes what it is sent."""

    def init_device(self) -> None:
        # Deliberately no torch.distributed: nothing here communicates, and importing torch costs seconds.
        self.device = "cpu"

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        return (self.rank, args, kwargs) if self.topology.is_output_rank else None

    def echo(self, x: Any) -> Any:
        return x

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def pid(self) -> int:
        return os.getpid()
