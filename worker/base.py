"""The Worker interface: what a user subclasses to run code in a supervised rank.

Lifecycle, called by worker/main.py in this order inside the child process:

    __init__(spec) -> init_device() -> load_model() -> [READY] -> execute_model / check_health / any RPC ...
                                                              -> shutdown()

A warm standby (``recovery.standby``) runs ``__init__`` and ``warm_up()`` ahead of time, before its group's world
exists, and waits; when it takes a failed rank's place it gets the real spec (``adopt``) and goes on with
``init_device()`` and ``load_model()``, which then do only what ``warm_up`` could not.

A worker class whose weights can be kept by the weight keeper (``recovery.keeper``) says what a rank's weights are
(``weights_key``) and how to build them (``build_weights``); a rank then finds the keeper's handle in
``spec.weights`` and maps it instead of loading.

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

    # -- the weight keeper's side (worker/keeper.py runs these in the keeper process) ---------------------------
    @classmethod
    def weights_key(cls, spec: WorkerSpec) -> tuple | None:
        """What this rank's weights are: ranks with equal keys share one kept copy. None (the default): this
        class keeps nothing, and ``recovery.keeper=auto`` leaves the keeper off."""
        return None

    @classmethod
    def build_weights(cls, spec: WorkerSpec, alloc: Any, fill: bool) -> None:
        """Build this rank's weights with every parameter taken from ``alloc.empty(dims, dtype)`` (worker/weights.py)
        in the order ``load_model`` will ask for them, and fill them from the checkpoint when ``fill``."""
        raise NotImplementedError(f"{cls.__name__} defines weights_key but not build_weights")

    # -- lifecycle -------------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """A warm standby's preparation, before its group's world exists: what needs neither torch.distributed
        nor the rendezvous. The base worker selects its device (the CUDA context)."""
        self.select_device()

    def adopt(self, spec: WorkerSpec) -> None:
        """A standby taking a rank's place: the rank's real spec (the attempt's rendezvous), same topology."""
        assert spec.topology == self.topology, "a standby only replaces the rank it was started for"
        self.spec = spec

    def init_device(self) -> None:
        self.select_device()
        self.join_world()

    def select_device(self) -> None:
        """The device, and on CUDA its context (idempotent: a standby did it already)."""
        if self.device is not None:
            return
        import torch

        if self.spec.device == "cuda":
            torch.cuda.set_device(self.spec.local_rank)
            self.device = torch.device("cuda", self.spec.local_rank)
        else:
            self.device = torch.device("cpu")

    def join_world(self) -> None:
        """torch.distributed: the group's world through its private rendezvous (gloo on CPU, NCCL on CUDA), and
        the TP and PP sub-groups."""
        import torch.distributed as dist

        topo = self.topology
        backend = "nccl" if self.device.type == "cuda" else "gloo"
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
        """The cheapest round trip: this rank's global rank, nothing else (for latency measurements and liveness
        probes). Global, not the torch.distributed rank within the dp group: it is the number the API orders
        results by and ``unique_reply_rank`` addresses, so ``collective_rpc("ping")`` reads ``[0, 1, ..., N-1]``
        and an answer names the one rank of the whole tree that gave it."""
        return self.topology.global_rank

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
