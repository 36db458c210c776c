"""A worker that misbehaves on purpose, for the fault matrix, the chaos soak and demos.

Configured through the worker environment (``+runtime.env.RV_FAULT=...`` on the command line):

    RV_FAULT           raise_init | exit_init | segv_init | hang_init | dist_fail_init
                       | ignore_sigterm | slow_stop | grandchild | slow_execute | kill_at_call
                       | device_error (execute_model hits a sticky device error: device_error() below)
                       | join_cgroup (init_device moves the rank into the cgroup folder RV_FAULT_CGROUP)
    RV_FAULT_RANK      comma-separated group-local ranks that misbehave (default: all)
    RV_FAULT_ATTEMPTS  comma-separated group restart attempts that misbehave (default: all), e.g. "0" = only the
                       first start, so a restart recovers
    RV_FAULT_ARG       a number for faults that take one (slow_stop, slow_execute: seconds; kill_at_call: the
                       rank SIGKILLs itself on its N-th execute_model or echo call, a kill mid-run of a driver)

Run-time faults (raise in a call, exit, a signal, a hang) need no class: send a callable through collective_rpc.
Descendants on demand, through collective_rpc: ``spawn_grandchildren`` (subprocesses, one in its own session),
``fork_children`` (multiprocessing children of the fork context, one in its own session).

``FaultyWorker`` is the torch-free echo worker with these faults (starts in ~0.2 s); ``FaultyTPWorker`` is the
tensor-parallel MLP (torch.distributed, CUDA with device=cuda) with the same faults, for the rows where the
process group or GPU memory matters (a fault in init then strikes with the device and the world already set up);
``FaultyLLMWorker`` is the Llama decoder (workload=llm) with them.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Any

from worker.llm.worker import LLMWorker
from worker.tp_mlp import EchoWorker, TPMLPWorker


def _selected(spec) -> str:
    env = dict(spec.env)
    kind = env.get("RV_FAULT", "")
    ranks = env.get("RV_FAULT_RANK", "")
    attempts = env.get("RV_FAULT_ATTEMPTS", "")
    if ranks and str(spec.topology.rank) not in ranks.split(","):
        return ""
    if attempts and str(spec.attempt) not in attempts.split(","):
        return ""
    return kind


class _Faults:
    """The injected faults, mixed in before a worker class."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.fault = _selected(spec)
        self.spec_env = dict(spec.env)
        self.arg = float(self.spec_env.get("RV_FAULT_ARG", "0") or 0)
        self.grandchildren: list[int] = []
        self.calls = 0  # execute_model and echo calls so far (kill_at_call)

    def adopt(self, spec) -> None:
        super().adopt(spec)
        self.fault = _selected(spec)  # a warm standby promoted: the faults of the attempt it now serves

    def init_device(self) -> None:
        if self.fault == "dist_fail_init":
            _unreachable_rendezvous()  # before our own init: it is joining the world that fails
        super().init_device()
        fault = self.fault
        if fault == "raise_init":
            raise RuntimeError(f"injected failure in init on rank {self.rank}")
        if fault == "exit_init":
            os._exit(3)
        if fault == "segv_init":
            segfault()
        if fault == "hang_init":
            while True:
                time.sleep(1)
        if fault == "ignore_sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if fault == "grandchild":
            self.spawn_grandchildren()
        if fault == "join_cgroup":
            join_cgroup(self.spec_env["RV_FAULT_CGROUP"])

    def spawn_grandchildren(self) -> list[int]:
        """One ordinary child and one that detaches into its own session (setsid)."""
        plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        self.grandchildren = [plain.pid, detached.pid]
        return self.grandchildren

    def fork_children(self) -> list[int]:
        """Two multiprocessing children of the fork context that sleep, the second in a session of its own: no
        exec, so they carry only what the worker's memory holds (a DataLoader worker is made the same way)."""
        ctx = multiprocessing.get_context("fork")
        kids = [ctx.Process(target=_sleep_in_session, args=(own,)) for own in (False, True)]
        for k in kids:
            k.start()
        self.grandchildren += [k.pid for k in kids]
        return [k.pid for k in kids]

    def children(self) -> list[int]:
        return list(self.grandchildren)

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        if self.fault == "slow_execute":  # a step that takes time, so a kill or a SIGTERM lands mid-call
            time.sleep(self.arg)
        self._count_call()
        if self.fault == "device_error":
            device_error(self.device)
        return super().execute_model(*args, **kwargs)

    def echo(self, x: Any) -> Any:
        self._count_call()
        return super().echo(x)  # type: ignore[misc]  # the echo worker's

    def _count_call(self) -> None:
        """kill_at_call: SIGKILL this rank on its N-th call, while the driver waits for the answer."""
        self.calls += 1
        if self.fault == "kill_at_call" and self.calls >= self.arg:
            os.kill(os.getpid(), signal.SIGKILL)

    def shutdown(self) -> None:
        if self.fault == "ignore_sigterm":
            while True:  # deaf to SIGTERM and never finishes stopping: only SIGKILL ends it
                time.sleep(1)
        if self.fault == "slow_stop":
            time.sleep(self.arg or 1.0)
        super().shutdown()


class FaultyWorker(_Faults, EchoWorker):
    """The torch-free echo worker, misbehaving as configured."""


class FaultyTPWorker(_Faults, TPMLPWorker):
    """The tensor-parallel MLP worker, misbehaving as configured."""


class FaultyLLMWorker(_Faults, LLMWorker):
    """The Llama decoder, misbehaving as configured."""


def _sleep_in_session(own_session: bool) -> None:
    if own_session:
        os.setsid()
    time.sleep(600)


def _unreachable_rendezvous() -> None:
    """torch.distributed init against a rendezvous nobody else joins: fails, bounded by its timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:9", rank=0, world_size=2,
                            timeout=timedelta(seconds=2))


def segfault() -> None:
    """A real SIGSEGV (not a raised signal): read address 0."""
    ctypes.string_at(0)


def crash(kind: str) -> Any:
    """For collective_rpc callables: crash this process in the given way."""
    if kind == "exit":
        os._exit(3)
    if kind == "exit0":
        os._exit(0)
    if kind == "exit42":
        os._exit(42)
    if kind == "segv":
        segfault()
    if kind == "abort":
        os.abort()
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError(f"unknown crash kind {kind!r}")


# -- device faults (the fault matrix's GPU rows; tests/integration/test_gpu_faults.py, scripts/gpu_faults.py) ------------
def device_error(device: Any = None) -> None:
    """A sticky device error in this process. On a CUDA device a real one: a device-side assert (an index out of
    range, then a synchronize), after which the process's CUDA context is unusable. Elsewhere the error torch raises
    for one (torch.AcceleratorError, in CUDA's words), which the worker treats the same way: the CPU analog."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.zeros(2, device=device)[torch.tensor([5], device=device)].sum().item()  # raises AcceleratorError
        torch.cuda.synchronize(device)
        raise RuntimeError("worker.faults.device_error: the device-side assert did not fire")
    raise torch.AcceleratorError("CUDA error: device-side assert triggered\n(raised by worker.faults.device_error)")


def illegal_address(device: Any) -> None:
    """A sticky CUDA error of the other kind: a kernel writes through a null pointer ("an illegal memory access was
    encountered"). torch has no way to launch a kernel on a bogus address, so CuPy does, on the same context."""
    import cupy
    import torch

    with cupy.cuda.Device(torch.device(device).index or 0):
        poke = cupy.RawKernel(r'extern "C" __global__ void poke(float* p) { p[threadIdx.x] = 1.0f; }', "poke")
        poke((1,), (1,), (cupy.uint64(0),))
    torch.cuda.synchronize(device)


def spin_forever(device: Any) -> None:
    """A kernel that never ends (it spins for 2**62 clock cycles: years), waited for: the call never returns."""
    import torch

    torch.cuda._sleep(1 << 62)
    torch.cuda.synchronize(device)


def join_cgroup(path: str) -> None:
    """Move this process into the cgroup folder ``path`` (cgroup v1 or v2): its memory limit applies from now on."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def grow_memory(at_most: int, chunk: int = 8 << 20) -> int:
    """Allocate (and touch) memory, ``chunk`` bytes at a time, up to ``at_most`` bytes: under a memory limit below
    that, the kernel's OOM killer ends the process on the way. Returns the bytes held if it was not killed."""
    held = []
    while len(held) * chunk < at_most:
        held.append(bytearray(chunk))  # zero-filled: every page is touched, so charged to the cgroup
    return len(held) * chunk
