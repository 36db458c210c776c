"""The Worker interface: what a user subclasses to run code in a supervised rank.

Lifecycle, called by worker/main.py in this order inside the child process:

    __init__(spec) -> init_device() -> load_model() -> [READY] -> execute_model / check_health / any RPC ...
                                                              -> shutdown()

Any public method (and any callable sent through ``collective_rpc``, which receives the worker as its first
argument) may be called between READY and shutdown. The base class owns torch.distributed: ``init_device``
selects the device and joins the group's world through a private rendezvous (gloo on CPU, NCCL on CUDA), and
builds the TP and PP sub-groups. torch is imported lazily so that a worker class that does not need it stays light.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from worker.spec import WorkerSpec


EAGER_NCCL_ENV = "RV_EAGER_NCCL"  # set (runtime.env) to init NCCL eagerly in a world of one too, for comparison


class Worker:
    """Base worker: device + torch.distributed set-up and tear-down. Subclasses add the model."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.topology = spec.topology
        self.rank = spec.topology.rank
        self.device: Any = None
        self.tp_group: Any = None  # this rank's tensor-parallel process group
        self.pp_ranks: list[int] = []  # the global ranks of this rank's pipeline (same tp_rank, every stage)
        self._dist_ready = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def init_device(self) -> None:
        import torch
        import torch.distributed as dist

        topo = self.topology
        if self.spec.device == "cuda":
            torch.cuda.set_device(self.spec.local_rank)
            self.device = torch.device("cuda", self.spec.local_rank)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        kwargs: dict[str, Any] = {}
        if backend == "nccl" and (topo.world_size > 1 or os.environ.get(EAGER_NCCL_ENV)):
            # Eager NCCL init: a bad GPU fails here, not in the first call. A world of one never runs a collective,
            # so it builds no communicator at all -- NCCL's init would only add to every restart (tp=1 serving).
            kwargs["device_id"] = self.device
        dist.init_process_group(
            backend=backend,
            init_method=self.spec.rendezvous,
            rank=topo.rank,
            world_size=topo.world_size,
            timeout=timedelta(seconds=max(30.0, self.spec.worker.heartbeat_timeout_s * 4)),
            **kwargs,
        )
        self._dist_ready = True
        tp_lists = [[pp * topo.tp + t for t in range(topo.tp)] for pp in range(topo.pp)]
        if topo.world_size == 1:
            self.tp_group = None
        elif topo.pp == 1:
            self.tp_group = dist.group.WORLD  # the TP group is the world: no second communicator to build
        else:
            # new_subgroups_by_enumeration is collective over the world: every rank builds every sub-group.
            self.tp_group, _ = dist.new_subgroups_by_enumeration(tp_lists, backend=backend)
        self.pp_ranks = [pp * topo.tp + topo.tp_rank for pp in range(topo.pp)]

    def load_model(self) -> None:
        """Build the model. The base worker has none."""

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no execute_model")

    def ping(self) -> int:
        """The cheapest round trip: the rank, nothing else (for latency measurements and liveness probes)."""
        return self.rank

    def check_health(self) -> dict[str, Any]:
        """Raise if this rank is unhealthy; return a small report otherwise."""
        return {"rank": self.rank, "device": str(self.device)}

    def shutdown(self) -> None:
        """Release the process group. Only called on a graceful stop: never on a broken collective."""
        if self._dist_ready:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._dist_ready = False
