"""Worker classes for the weight keeper's tests: the smallest class that keeps weights (the contract of
worker/base.py, apart from the Llama decoder), and one whose weights cannot be built."""
from __future__ import annotations

import os
from typing import Any

from worker.base import Worker

ROWS = 64


class KeptToy(Worker):
    """Each rank's weights: a ROWS x ROWS float32 matrix filled with the rank's tp_rank + 1, in the keeper."""

    @classmethod
    def weights_key(cls, spec: Any) -> tuple:
        return ("toy", spec.topology.tp_rank)

    @classmethod
    def build_weights(cls, spec: Any, alloc: Any, fill: bool) -> None:
        import torch

        w = alloc.empty((ROWS, ROWS), torch.float32)
        if fill:
            w.fill_(spec.topology.tp_rank + 1)

    def init_device(self) -> None:
        self.device = "cpu"  # no world: these tests are about the weights

    def load_model(self) -> None:
        import torch

        from worker import weights

        handle = self.spec.weights
        assert handle is not None, "started without its kept weights"
        self.arena = weights.Arena(weights.open_buffer(handle), handle.slots)
        self.w = self.arena.empty((ROWS, ROWS), torch.float32)
        self.arena.check_complete()

    def total(self) -> float:
        return float(self.w.sum())

    def where(self) -> dict[str, Any]:
        """Which keeper memory this rank maps, and this process's pid."""
        return {"pid": os.getpid(), "memfd": self.spec.weights.memfd, "keeper": self.spec.weights.owner_pid}

    def sleep(self, seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds


class UnbuildableOnRank1(KeptToy):
    @classmethod
    def build_weights(cls, spec: Any, alloc: Any, fill: bool) -> None:
        if fill and spec.topology.tp_rank == 1:
            raise FileNotFoundError("no shard 1 in this checkpoint")
        super().build_weights(spec, alloc, fill)
