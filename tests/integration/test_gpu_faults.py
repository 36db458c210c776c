"""The GPU rows of the fault matrix (/work/shared/FAULTS.md rows 48-51, and a segfault mid-call) with real processes,
and GPU health (NVML) through the API. The `cuda` tests skip without a GPU; each has a CPU analog here where one
exists. On a GPU: python -m pytest -m cuda tests/integration/test_cuda.py tests/integration/test_gpu_faults.py
(and scripts/gpu_faults.py times each row).

Row -> test:
  48  sticky CUDA error    test_fatal_device_error_in_a_call[assert|illegal_address] (cuda),
                           test_retryable_calls_hitting_a_device_error_are_answered_by_the_replacement (cuda),
                           test_a_cuda_error_that_leaves_the_context_working_keeps_the_process (cuda);
                           CPU analog: test_fatal_device_error_cpu_analog (torch's AcceleratorError raised by hand:
                           the worker treats it as it treats a real one when it has no CUDA context to ask)
  49  CUDA out of memory   test_cuda_oom_same_process_serves_and_memory_back (cuda);
                           CPU analog: test_allocation_failure_same_process_serves (+ tests/unit/test_device_faults.py)
  50  a kernel that never  test_kernel_that_never_ends_deadline_kills_and_frees (cuda); CPU analog: test_faults.py
      ends                 row 12 (a rank frozen mid-call meets the same call deadline)
  51  the OOM killer       test_oom_killer_is_named_in_the_exit (CPU: a memory cgroup of 96 MiB makes the kernel's
                           OOM killer fire; the records' parser: tests/unit/test_oomkill.py)
  --  segfault mid-call    test_segfault_mid_call_is_named_and_replaced (CPU), test_segfault_mid_call_on_the_gpu (cuda)
  G   the cuda tests check GPU memory with nvidia-smi (not our NVML reading): back to its level before the fault.
"""
from __future__ import annotations

import os
import re
import time

import pytest

from supervisor.api import Supervisor
from supervisor.errors import GpuUnhealthy, RemoteError, RpcTimeout, WorkerFailed
from supervisor.gpu_health import SLOWED
from supervisor.observe.metrics import gpu_families
from tests.fake_nvml import FakeGpu, FakeNVML
from tests.integration.helpers import FAULTY, config, limited_memory_cgroup, smi_pids, smi_used_mib
from tests.integration.test_faults import METHODS, exits_of, wait_until
from worker import faults

pytestmark = pytest.mark.timeout(180)
ONE_FOR_ONE = ("restart=one_for_one", "restart.intensity=10")
GIB = 1 << 30
TOLERANCE_MIB = 256  # "back to its level": a fresh context of the replacement may differ from the old by this much
# The error of a call on a rank whose device failed: the rank's own answer (DeviceFailed), or, where the monitor saw
# the rank's exit before the answer was read, the exit (73), which names the same cause.
DEVICE_LOST = r"rank {rank} (hit a fatal device error|\(.*\) exit code 73 \(a fatal device error)"
# check_health right after the error (with restart.calls_during_restart=fail, so that it never waits for the
# replacement): refused by the failed channel with that error, or by the gate once the monitor has closed it. Either
# way no health report comes from the dying process.
IN_THE_WINDOW = DEVICE_LOST + r"|groups \[0\] are not serving|group 0 is restarting"
REFUSE_DURING_RESTART = "restart.calls_during_restart=fail"
CAUSES = {"assert": "device-side assert triggered", "illegal_address": "an illegal memory access was encountered"}


# -- helpers -------------------------------------------------------------------------------------------------------
def one_line_naming(err: BaseException, rank: int, cause: str) -> None:
    """The caller's error is one line that names the rank and the cause."""
    text = str(err)
    assert "\n" not in text, f"not one line: {text!r}"
    assert f"rank {rank}" in text and cause in text, text


def serving_again(sup: Supervisor, old_pids: list[int], timeout: float = 120) -> float:
    """Until every group serves with none of ``old_pids`` left; returns the seconds it took."""
    t0 = time.monotonic()
    wait_until(lambda: sup.serving() and not set(old_pids) & set(sup.pids()), timeout, "the replacement to serve")
    return time.monotonic() - t0


def pid_of(w) -> tuple[int, int]:
    return os.getpid(), w.spec.attempt


def device_error_on(rank: int):
    """A collective_rpc callable: group-local ``rank`` hits a sticky device error; the others answer."""
    def fn(w):
        if w.rank == rank:
            faults.device_error(w.device)
        return os.getpid()
    return fn


def device_error_in_attempt(w, attempt: int):
    """Rank 0 of the group's start number ``attempt`` hits a sticky device error; any later start answers."""
    if w.rank == 0 and w.spec.attempt == attempt:
        faults.device_error(w.device)
    return pid_of(w)


# -- row 48: a sticky device error in a call ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_fatal_device_error_cpu_analog(method):
    """One error naming the rank and the cause, for the failing call and for a health check right after it (the
    rank never answers again); the exit names the cause; a retryable call hitting it is answered by the replacement."""
    with Supervisor(config(*FAULTY, "parallel.tp=2", *ONE_FOR_ONE, REFUSE_DURING_RESTART, method=method)) as sup:
        old = sup.pids()
        with pytest.raises(WorkerFailed) as err:
            sup.collective_rpc(device_error_on(1), timeout=60)
        one_line_naming(err.value, 1, "CUDA error: device-side assert triggered")
        with pytest.raises(WorkerFailed, match=IN_THE_WINDOW.format(rank=1)):  # never a healthy report from it
            sup.check_health()
        serving_again(sup, old)
        (exited,) = [e for e in sup.events.of_kind("exited") if e["pid"] == old[1]]
        assert (exited["code"], exited["reason"]) == (73, "exit 73")
        assert exited["meaning"].endswith("(AcceleratorError: CUDA error: device-side assert triggered)")
        attempt = sup.groups()[0].attempts - 1
        answers = sup.collective_rpc(device_error_in_attempt, args=(attempt,), retry=True, timeout=60)
        assert [a for _, a in answers] == [attempt + 1] * 2  # answered by the replacement, once
        (retry,) = sup.events.of_kind("retry")
        assert re.match(DEVICE_LOST.format(rank=0), retry["error"]), retry["error"]


@pytest.fixture(scope="module")
def gpu():
    """Skip without CUDA. Otherwise: the nvidia-smi name of the GPU the tp=1 tests use, and NVML opened once before
    the per-test leak baseline (its descriptors are the measuring tool's)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from supervisor import gpu as nvml_ctypes
    from supervisor.gpu_health import GpuHealth

    nvml_ctypes.memory_by_pid()
    GpuHealth().readings()
    return nvml_ctypes.usable_gpus()[0]


def hold_then(kind: str):
    """A callable: 1 GiB held by the worker, then ``kind`` of fault."""
    def fn(w):
        import torch

        w._ballast = torch.empty(GIB, dtype=torch.uint8, device=w.device)
        torch.cuda.synchronize()
        {"assert": faults.device_error, "illegal_address": faults.illegal_address, "spin": faults.spin_forever,
         "segv": lambda _d: faults.segfault()}[kind](w.device)
        return "the fault did not strike"
    return fn


def warm(sup: Supervisor) -> None:
    from worker.tp_mlp import make_input

    assert sup.execute_model(make_input(sup.cfg.workload, 0), timeout=120) is not None


def memory_back(gpu: str, before: int, pids: list[int], timeout: float = 10.0) -> None:
    wait_until(lambda: not set(pids) & smi_pids(gpu), timeout, "the old process to leave the GPU")
    wait_until(lambda: smi_used_mib(gpu) <= before + TOLERANCE_MIB, timeout, "GPU memory back to its level")


@pytest.mark.cuda
@pytest.mark.parametrize("fault", ["assert", "illegal_address"])
def test_fatal_device_error_in_a_call(gpu, fault):
    if fault == "illegal_address":
        pytest.importorskip("cupy")
    with Supervisor(config("device=cuda", *ONE_FOR_ONE, REFUSE_DURING_RESTART)) as sup:
        warm(sup)
        before, old = smi_used_mib(gpu), sup.pids()
        with pytest.raises(WorkerFailed) as err:
            sup.collective_rpc(hold_then(fault), timeout=60)
        one_line_naming(err.value, 0, CAUSES[fault])
        with pytest.raises(WorkerFailed, match=IN_THE_WINDOW.format(rank=0)):
            sup.check_health()
        serving_again(sup, old)
        assert exits_of(sup.events, old[0]) == [(0, "exit 73", 73)]
        warm(sup)
        memory_back(gpu, before, old)


@pytest.mark.cuda
def test_retryable_calls_hitting_a_device_error_are_answered_by_the_replacement(gpu):
    from worker.tp_mlp import make_input, reference_forward

    cfg = config("device=cuda", "worker.cls=worker.faults:FaultyTPWorker", "+runtime.env.RV_FAULT=device_error",
                 "+runtime.env.RV_FAULT_ATTEMPTS=0", "rpc.retry_execute_model=always", *ONE_FOR_ONE)
    with Supervisor(cfg) as sup:
        old = sup.pids()
        x = make_input(cfg.workload, 0)
        out = sup.execute_model(x, timeout=120)  # the first start asserts in execute_model; its replacement answers
        assert float((out - reference_forward(cfg.workload, x)).abs().max()) < 1e-3
        assert old[0] not in sup.pids() and len(sup.events.of_kind("retry")) == 1
        attempt = sup.groups()[0].attempts - 1
        ((pid, answered_in),) = sup.collective_rpc(device_error_in_attempt, args=(attempt,), retry=True, timeout=120)
        assert answered_in == attempt + 1 and pid in sup.pids()


def invalid_device(w):
    """A CUDA error that leaves the context working (cudaSetDevice to a GPU that is not there)."""
    import torch

    torch.cuda.set_device(torch.cuda.device_count() + 7)


@pytest.mark.cuda
def test_a_cuda_error_that_leaves_the_context_working_keeps_the_process(gpu):
    with Supervisor(config("device=cuda", *ONE_FOR_ONE)) as sup:
        warm(sup)
        pids = sup.pids()
        with pytest.raises(RemoteError) as err:
            sup.collective_rpc(invalid_device, timeout=60)
        if "CUDA error" not in err.value.remote_message:
            pytest.skip(f"this torch refuses the device before CUDA does: {err.value.remote_message}")
        assert [p for p, _ in sup.collective_rpc(pid_of, timeout=60)] == pids  # not replaced: it serves on
        warm(sup)


# -- row 49: out of memory -------------------------------------------------------------------------------------------
def too_big(w):
    """2 GiB held by the call, then an allocation that cannot succeed (1 TiB on a GPU; 1 EiB on a CPU)."""
    import torch

    held = torch.empty(2 * GIB if w.device.type == "cuda" else 1, dtype=torch.uint8, device=w.device)
    torch.empty(1 << (40 if w.device.type == "cuda" else 60), dtype=torch.uint8, device=w.device)
    return held.numel()


def test_allocation_failure_same_process_serves():
    with Supervisor(config("parallel.tp=2", "workload.hidden=64")) as sup:
        pids = sup.pids()
        with pytest.raises(RemoteError) as err:
            sup.collective_rpc(too_big, timeout=60)
        first = str(err.value).splitlines()[0]
        assert first.startswith("rank 0 raised RuntimeError") and "1152921504606846976 bytes" in first, first
        assert [p for p, _ in sup.collective_rpc(pid_of, timeout=60)] == pids


@pytest.mark.cuda
def test_cuda_oom_same_process_serves_and_memory_back(gpu):
    with Supervisor(config("device=cuda")) as sup:
        warm(sup)
        before, pids = smi_used_mib(gpu), sup.pids()
        with pytest.raises(RemoteError) as err:
            sup.collective_rpc(too_big, timeout=60)
        first = str(err.value).splitlines()[0]
        assert re.match(r"rank 0 raised OutOfMemoryError: CUDA out of memory\. Tried to allocate 1024\.00 GiB", first)
        assert [p for p, _ in sup.collective_rpc(pid_of, timeout=60)] == pids  # the same process serves the next call
        wait_until(lambda: smi_used_mib(gpu) <= before + TOLERANCE_MIB, 10, "the failed call's 2 GiB to be returned")
        warm(sup)


# -- row 50: a kernel that never ends ----------------------------------------------------------------------------------
@pytest.mark.cuda
def test_kernel_that_never_ends_deadline_kills_and_frees(gpu):
    with Supervisor(config("device=cuda", *ONE_FOR_ONE)) as sup:
        warm(sup)
        before, old = smi_used_mib(gpu), sup.pids()
        with pytest.raises(RpcTimeout, match=r"ranks \[0\] missed the call deadline of 5 s") as err:
            sup.collective_rpc(hold_then("spin"), timeout=120, deadline=5)
        assert err.value.ranks == (0,)
        memory_back(gpu, before, old)  # killed, and its memory freed (scripts/gpu_faults.py times it against 1 s)
        serving_again(sup, old)
        assert exits_of(sup.events, old[0]) == [(0, "hung", -9)]
        warm(sup)


# -- a segfault in a call -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_segfault_mid_call_is_named_and_replaced(method):
    with Supervisor(config(*FAULTY, "parallel.tp=2", *ONE_FOR_ONE, method=method)) as sup:
        old = sup.pids()
        with pytest.raises(WorkerFailed, match=r"rank 1 \(.*\) SIGSEGV \(segmentation fault"):
            sup.collective_rpc(lambda w: faults.crash("segv") if w.rank == 1 else 0, timeout=60)
        serving_again(sup, old)
        assert exits_of(sup.events, old[1]) == [(1, "SIGSEGV", -11)]
        assert sup.collective_rpc("ping", timeout=60) == [0, 1]


@pytest.mark.cuda
def test_segfault_mid_call_on_the_gpu(gpu):
    with Supervisor(config("device=cuda", *ONE_FOR_ONE)) as sup:
        warm(sup)
        before, old = smi_used_mib(gpu), sup.pids()
        with pytest.raises(WorkerFailed, match=r"rank 0 \(.*\) SIGSEGV"):
            sup.collective_rpc(hold_then("segv"), timeout=60)
        serving_again(sup, old)
        assert exits_of(sup.events, old[0]) == [(0, "SIGSEGV", -11)]
        warm(sup)
        memory_back(gpu, before, old)


# -- row 51: the kernel's OOM killer -----------------------------------------------------------------------------------
CGROUP_LIMIT = 96 << 20


@pytest.fixture
def memory_cgroup():
    with limited_memory_cgroup(CGROUP_LIMIT) as path:
        if path is None:
            pytest.skip("no memory cgroup can be made here")
        yield path


def test_oom_killer_is_named_in_the_exit(memory_cgroup):
    """Rank 0 of the first start joins the 96 MiB cgroup while it starts, then allocates up to 4x that in a call:
    the OOM killer ends it. The caller's error and the exit say "OOM killer", from the kernel's record."""
    cfg = config(*FAULTY, "+runtime.env.RV_FAULT=join_cgroup", f"+runtime.env.RV_FAULT_CGROUP={memory_cgroup}",
                 "+runtime.env.RV_FAULT_RANK=0", "+runtime.env.RV_FAULT_ATTEMPTS=0", *ONE_FOR_ONE)
    with Supervisor(cfg) as sup:
        old = sup.pids()
        with pytest.raises(WorkerFailed, match=r"rank 0 \(.*\) SIGKILL \(killed by the kernel's OOM killer: ") as err:
            sup.collective_rpc(lambda w, n: faults.grow_memory(n), args=(4 * CGROUP_LIMIT,), timeout=60)
        assert "\n" not in str(err.value)
        serving_again(sup, old)
        (exited,) = [e for e in sup.events.of_kind("exited") if e["pid"] == old[0]]
        assert (exited["code"], exited["reason"]) == (-9, "SIGKILL (OOM killer)")
        assert "OOM killer" in exited["meaning"] and (str(old[0]) in exited["meaning"] or "oom_kill" in exited["meaning"])
        assert sup.collective_rpc("ping", timeout=60) == [0]


def test_a_plain_sigkill_is_not_taken_for_the_oom_killer():
    import signal

    with Supervisor(config(*FAULTY, *ONE_FOR_ONE)) as sup:
        old = sup.pids()
        os.kill(old[0], signal.SIGKILL)
        serving_again(sup, old)
        assert exits_of(sup.events, old[0]) == [(0, "SIGKILL", -9)]


# -- GPU health (NVML) through the API ---------------------------------------------------------------------------------
def test_an_unhealthy_gpu_fails_check_health_and_shows_in_status_and_metrics(monkeypatch):
    """A fake NVML puts both ranks of a CPU tree on GPU 1, which reports 2 volatile uncorrectable ECC errors."""
    from supervisor import gpu_health

    nvml = FakeNVML(FakeGpu("GPU-healthy"), FakeGpu("GPU-bad", ecc={0: 2, 1: 2}, rows=(0, 2, 1, 0)))
    monkeypatch.setattr(gpu_health, "load_nvml", lambda: nvml)
    with Supervisor(config(*FAULTY, "parallel.tp=2", "gpu.health_ttl_s=0")) as sup:
        nvml.gpus[1].pids = tuple(sup.pids())
        with pytest.raises(GpuUnhealthy) as err:
            sup.check_health()
        assert str(err.value) == ("unhealthy GPU: GPU 1 (GPU-bad) of ranks [0, 1]: 2 uncorrectable ECC error(s) since "
                                  "the driver loaded (volatile); a row remap is pending (needs a GPU reset)")
        assert err.value.ranks == (0, 1)
        assert [r["gpu_health"] for r in sup.status()] == ["ECC 2", "ECC 2"]
        metrics = _scrape(sup)
        assert 'rankvisor_gpu_healthy{gpu="1",uuid="GPU-bad"} 0.0' in metrics
        assert 'rankvisor_gpu_ecc_uncorrectable_total{counter="volatile",gpu="1"} 2.0' in metrics
        assert 'rankvisor_gpu_row_remap_pending{gpu="1"} 1.0' in metrics
        assert 'gpu="0"' not in metrics  # no rank of the tree runs on GPU 0
        nvml.gpus[1].ecc, nvml.gpus[1].rows = {0: 0, 1: 2}, (0, 2, 0, 0)  # reset: only the lifetime count stays
        assert sup.check_health() and [r["gpu_health"] for r in sup.status()] == ["ok", "ok"]


def test_gpu_health_off_reads_nothing(monkeypatch):
    from supervisor import gpu_health

    monkeypatch.setattr(gpu_health, "load_nvml", lambda: pytest.fail("NVML was read with gpu.health=false"))
    with Supervisor(config(*FAULTY, "gpu.health=false")) as sup:
        assert sup.check_health() and sup.status()[0]["gpu_health"] is None and sup.gpus() == []


def _scrape(sup: Supervisor) -> str:
    from supervisor.observe.metrics import Metrics

    return Metrics(sup).exposition().decode()


@pytest.mark.cuda
def test_real_nvml_health_of_the_gpu_under_a_rank(gpu):
    """On a real GPU: every counter read (or None where unsupported), the rank's GPU found, check_health passes on a
    healthy card, status and /metrics carry it. Needs nvidia-ml-py (the `gpu` extra)."""
    pytest.importorskip("pynvml")
    with Supervisor(config("device=cuda")) as sup:
        warm(sup)
        (reading,) = sup.gpus()
        assert sup.pids()[0] in reading.pids and reading.uuid.startswith("GPU-")
        assert reading.ecc_volatile in (None, 0), f"{reading.name} reports uncorrectable errors: {reading}"
        assert not reading.problems() and sup.check_health()
        assert sup.status()[0]["gpu_health"] in ("ok", *SLOWED)  # a throttle reason may come or go between reads
        names = {s.name for fam in gpu_families([reading]) for s in fam.samples}
        assert {"rankvisor_gpu_healthy", "rankvisor_gpu_throttle_reasons"} <= names
