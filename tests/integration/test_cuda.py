"""CUDA workers on a real GPU (marked `cuda`; skipped where no GPU is visible, so CI stays green).
scripts/gpu_check.py runs these and the GPU measurements on the device machine in one call."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from supervisor import gpu
from supervisor.api import Supervisor
from supervisor.core.topology import visible_gpus
from supervisor.gpu_health import GpuHealth
from tests.integration.helpers import TreeInChild, config, gone_within

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(300)]
GIB = 1 << 30


@pytest.fixture(scope="module", autouse=True)
def _need_gpu():
    """Skip without a GPU; otherwise open NVML once, before the per-test leak baseline (its descriptors stay
    open for the whole session and are the measuring tool's, not the product's)."""
    if visible_gpus() == 0:
        pytest.skip("no NVIDIA GPU visible")
    gpu.memory_by_pid()  # NVML opens each device node on first use: do it for every GPU now
    GpuHealth().readings()  # and the health counters' reads (nvidia-ml-py, where installed), which status() makes


def _hold(nbytes: int):
    def hold(w):
        import torch

        w._ballast = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
        torch.cuda.synchronize()
        return os.getpid()
    return hold


def _wait_gone_from_gpu(pids, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not set(pids) & set(gpu.memory_by_pid()):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def test_cuda_tp1_matches_reference_and_parent_stays_cuda_free():
    from worker.tp_mlp import make_input, reference_forward

    with Supervisor(config("device=cuda", "parallel.tp=1")) as sup:
        assert sup.device == "cuda"
        x = make_input(sup.cfg.workload, 0)
        out = sup.execute_model(x, timeout=60)
        assert float((out - reference_forward(sup.cfg.workload, x)).abs().max()) < 1e-3
        assert sup.collective_rpc(lambda w: str(w.device), timeout=30) == ["cuda:0"]
    import torch

    assert not torch.cuda.is_initialized(), "the supervisor process must never initialise CUDA"


def test_device_auto_picks_cuda():
    with Supervisor(config("device=auto", "worker=echo")) as sup:
        assert sup.device == "cuda"


def test_two_replicas_share_one_gpu():
    cfg = config("device=cuda", "parallel.dp=2", "parallel.share_gpus=true")
    with Supervisor(cfg) as sup:
        devices = sup.collective_rpc(lambda w: str(w.device), timeout=60)
        if visible_gpus() == 1:  # (scripts/gpu_check.py runs this with CUDA_VISIBLE_DEVICES=0)
            assert devices == ["cuda:0", "cuda:0"]
        for g in (0, 1):
            assert sup.execute_model(__import__("worker.tp_mlp").tp_mlp.make_input(cfg.workload, 1),
                                     group=g, timeout=60) is not None


def test_killed_cuda_worker_restarts_and_gives_memory_back():
    cfg = config("device=cuda", "parallel.tp=1", "restart=one_for_one", "restart.intensity=5")
    with Supervisor(cfg) as sup:
        victim = sup.collective_rpc(_hold(2 * GIB), timeout=60)[0]
        assert gpu.memory_by_pid().get(victim, 0) >= 2 * GIB
        os.kill(victim, signal.SIGKILL)
        freed = _wait_gone_from_gpu([victim], 5.0)
        assert freed is not None, "the killed worker still holds GPU memory after 5 s"
        deadline = time.monotonic() + 60
        while not sup.serving(0) or victim in sup.pids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert sup.execute_model(__import__("worker.tp_mlp").tp_mlp.make_input(cfg.workload, 0), timeout=60) is not None


def test_supervisor_sigkill_leaves_no_process_on_the_gpu():
    tree = TreeInChild("device=cuda", "parallel.tp=1")
    try:
        pids = tree.pids
        assert set(pids) & set(gpu.memory_by_pid())
        tree.kill(signal.SIGKILL)
        assert _wait_gone_from_gpu(pids, 5.0) is not None
        assert gone_within(pids, 2.0) == []
    finally:
        tree.wait()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_nccl_across_gpus_matches_reference(tp, pp):
    if visible_gpus() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs")
    from worker.tp_mlp import make_input, reference_forward

    with Supervisor(config("device=cuda", f"parallel.tp={tp}", f"parallel.pp={pp}")) as sup:
        x = make_input(sup.cfg.workload, 0)
        assert float((sup.execute_model(x, timeout=60) - reference_forward(sup.cfg.workload, x)).abs().max()) < 1e-3


def test_nccl_group_restart_after_kill():
    if visible_gpus() < 2:
        pytest.skip("needs 2 GPUs")
    cfg = config("device=cuda", "parallel.tp=2", "restart=one_for_all", "restart.intensity=5")
    with Supervisor(cfg) as sup:
        old = sup.collective_rpc(_hold(GIB), timeout=60)
        os.kill(old[1], signal.SIGKILL)
        assert _wait_gone_from_gpu(old, 5.0) is not None, "a rank of the broken NCCL group kept its memory"
        deadline = time.monotonic() + 120
        while not sup.serving(0) or set(old) & set(sup.pids()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        from worker.tp_mlp import make_input, reference_forward

        x = make_input(cfg.workload, 2)
        assert float((sup.execute_model(x, timeout=60) - reference_forward(cfg.workload, x)).abs().max()) < 1e-3
