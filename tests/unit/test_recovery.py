"""The recovery decisions (supervisor/core/recovery.py) as tables, and the weight arena (worker/weights.py) in one
process: offsets the keeper and a rank agree on, drift caught, the CPU handle's round trip."""
from __future__ import annotations

import os

import pytest
import torch

from supervisor.core import recovery
from supervisor.core.recovery import KeeperLoss
from supervisor.settings import Backend, RecoverySettings, Strategy, Toggle
from worker import weights

ON, OFF, AUTO = Toggle.on, Toggle.off, Toggle.auto
LOCAL, RAY = Backend.local, Backend.ray
NEVER, ONE = Strategy.never, Strategy.one_for_one


@pytest.mark.parametrize(("keeper", "keeps", "strategy", "backend", "want"), [
    (OFF, True, ONE, LOCAL, False),
    (ON, True, NEVER, LOCAL, True),
    (ON, False, ONE, LOCAL, True),  # refused by the config check instead (recovery_problem)
    (AUTO, True, ONE, LOCAL, True),
    (AUTO, True, NEVER, LOCAL, False),  # fail-stop: no restart to make faster
    (AUTO, False, ONE, LOCAL, False),  # nothing to keep
    (AUTO, True, ONE, RAY, False),
])
def test_keeper_wanted(keeper, keeps, strategy, backend, want):
    assert recovery.keeper_wanted(RecoverySettings(keeper=keeper), keeps, strategy, backend) is want


@pytest.mark.parametrize(("standby", "keeper", "backend", "want"), [
    (OFF, True, LOCAL, False), (ON, False, LOCAL, True), (AUTO, True, LOCAL, True), (AUTO, False, LOCAL, False),
    (AUTO, True, RAY, False),
])
def test_standby_wanted(standby, keeper, backend, want):
    assert recovery.standby_wanted(RecoverySettings(standby=standby), keeper, backend) is want


@pytest.mark.parametrize(("settings", "keeps", "backend", "key"), [
    (RecoverySettings(keeper=ON), False, LOCAL, "recovery.keeper"),
    (RecoverySettings(keeper=ON), True, RAY, "recovery.keeper"),
    (RecoverySettings(standby=ON), True, RAY, "recovery.standby"),
    (RecoverySettings(), False, RAY, None),  # auto never asks for what cannot work
    (RecoverySettings(keeper=ON, standby=ON), True, LOCAL, None),
])
def test_recovery_problem(settings, keeps, backend, key):
    problem = recovery.recovery_problem(settings, keeps, backend)
    assert (problem[0] if problem else None) == key


def test_keeper_loss_and_standby_backoff():
    assert recovery.on_keeper_loss(True) is KeeperLoss.RELOAD_LATER
    assert recovery.on_keeper_loss(False) is KeeperLoss.STOP_RANKS
    assert [recovery.standby_backoff_s(1.0, n) for n in (0, 1, 2, 3, 10)] == [0.0, 1.0, 2.0, 4.0, 30.0]


# -- the arena ------------------------------------------------------------------------------------------------------
def _model(alloc) -> list[torch.Tensor]:
    """Three parameters of odd sizes and two dtypes, asked for in a fixed order (as a model's constructor does)."""
    return [alloc.empty((3, 5), torch.float32), alloc.empty((7,), torch.bfloat16), alloc.empty((2, 2), torch.int64)]


def test_plan_and_arena_agree_on_aligned_offsets():
    plan = weights.Plan()
    metas = _model(plan)
    assert all(t.device.type == "meta" for t in metas)
    assert [s.offset for s in plan.slots] == [0, 256, 512] and plan.nbytes == 768
    buf = torch.zeros(plan.nbytes, dtype=torch.uint8)
    arena = weights.Arena(buf, tuple(plan.slots))
    params = _model(arena)
    arena.check_complete()
    assert [(p.shape, p.dtype) for p in params] == [(m.shape, m.dtype) for m in metas]
    assert [p.data_ptr() - buf.data_ptr() for p in params] == [0, 256, 512]


def test_a_model_that_drifts_from_the_keepers_is_refused():
    plan = weights.Plan()
    _model(plan)
    arena = weights.Arena(torch.zeros(plan.nbytes, dtype=torch.uint8), tuple(plan.slots))
    arena.empty((3, 5), torch.float32)
    with pytest.raises(weights.ArenaMismatch, match="parameter 1"):
        arena.empty((8,), torch.bfloat16)  # the keeper holds (7,) there
    short = weights.Arena(torch.zeros(plan.nbytes, dtype=torch.uint8), tuple(plan.slots))
    short.empty((3, 5), torch.float32)
    with pytest.raises(weights.ArenaMismatch, match="took 1 parameters"):
        short.check_complete()


def test_cpu_handle_maps_the_keepers_bytes_without_a_copy():
    plan = weights.Plan()
    _model(plan)
    alloc = weights.allocate(plan.nbytes, "cpu")
    try:
        arena = weights.Arena(alloc.buffer)
        for i, p in enumerate(_model(arena)):
            p.fill_(i + 1)
        handle = weights.export(("toy",), alloc, arena.slots, "cpu")
        mapped = weights.open_buffer(handle)
        assert torch.equal(mapped, alloc.buffer)
        alloc.buffer[100] = 99  # (padding after the first parameter) the keeper's writes are seen: one set of
        assert int(mapped[100]) == 99  # pages, not a copy
        view = weights.Arena(mapped, handle.slots)
        assert [float(p.float().sum()) for p in _model(view)] == [15.0, 14.0, 12.0]
    finally:
        os.close(alloc.fd)
    with pytest.raises(weights.KeeperGone):  # its descriptor closed: nothing left to map
        weights.open_buffer(handle)


def test_ipc_leftovers_are_the_exporters_own_names(tmp_path):
    for name in ("torch_774_667816789_0", "torch_7745_1_0", "cuda.shm.0.306.1", "cuda.shm.1.306.2",
                 "cuda.shm.0.3061.1", "rvq-774-aa", "torch_77_4_0"):
        (tmp_path / name).touch()
    assert sorted(weights.ipc_leftovers(774, str(tmp_path))) == ["cuda.shm.0.306.1", "cuda.shm.1.306.2",
                                                                  "torch_774_667816789_0"]
    weights.remove_ipc_leftovers(774, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["cuda.shm.0.3061.1", "rvq-774-aa", "torch_7745_1_0", "torch_77_4_0"]


@pytest.mark.parametrize(("how", "want"), [("exit", 3), ("kill", -9)])
def test_exit_status_is_read_from_the_kernel_before_the_reap(how, want):
    """transport/_proc.exit_status: what the monitor acts on as soon as a worker has begun to exit (its zombie here,
    not yet reaped); None while it runs and once it is reaped."""
    import signal
    import time

    from transport import _proc

    pid = os.fork()
    if pid == 0:  # the child: exit 3, or wait to be killed
        if how == "exit":
            os._exit(3)
        time.sleep(60)
        os._exit(0)
    try:
        if how == "kill":
            assert _proc.exit_status(pid, _proc.start_time(pid)) is None  # running
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (status := _proc.exit_status(pid)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert status is not None and os.waitstatus_to_exitcode(status) == want
        assert _proc.exit_status(pid, start=1) is None  # another process's start time: not this one
    finally:
        os.waitpid(pid, 0)
    assert _proc.exit_status(pid) is None  # reaped: gone
