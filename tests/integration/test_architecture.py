"""Issue 11's promises with real processes: live objects hold to the backend contract, two supervisors in one
process run and stop independently (no shared registries), and how a run ended is one Outcome."""
from __future__ import annotations

import os
import signal
import time

import pytest

from supervisor.api import Supervisor
from supervisor.backends import base
from supervisor.core.lifecycle import Ending
from supervisor.core.states import GroupState, SupervisorState, WorkerState
from supervisor.errors import WorkerFailed
from tests.integration.helpers import ECHO, config, gone_within

pytestmark = pytest.mark.timeout(120)
METHODS = ["forkserver", "spawn"]


def test_live_local_objects_hold_to_the_backend_contract():
    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        life = sup._life  # the contract is about the manager's own objects: this test alone looks inside
        assert isinstance(life.backend, base.Backend)
        group = life.groups[0]
        assert isinstance(group, base.Group) and isinstance(group.channel, base.Channel)
        assert all(isinstance(w, base.WorkerHandle) for w in group.workers)
        assert isinstance(life.monitor, base.Monitor)
        view = sup.groups()[0]
        assert view.state is GroupState.READY and view.serving and view.attempts == 1 and view.restarts == 0
        assert [w.state for w in view.workers] == [WorkerState.RUNNING] * 2
        assert sup.outcome.ending is Ending.RUNNING and sup.outcome.exit_code() == 0
    assert sup.outcome.ending is Ending.STOPPED and not sup.gave_up and sup.state is SupervisorState.STOPPED


@pytest.mark.parametrize("method", METHODS)
def test_two_supervisors_in_one_process_run_and_stop_independently(method):
    a = Supervisor(config(*ECHO, "parallel.tp=2", "restart=never", method=method))
    b = Supervisor(config(*ECHO, "parallel.tp=2", "restart=one_for_one", method=method))
    try:
        marker_a, marker_b = a._life.backend.tree_marker, b._life.backend.tree_marker
        assert marker_a != marker_b and marker_a.split(":")[0] == marker_b.split(":")[0] == str(os.getpid())
        pids_a, pids_b = a.pids(), b.pids()
        os.kill(pids_a[1], signal.SIGKILL)  # A is fail-stop: it gives up and stops its tree ...
        assert a.wait(20) and a.gave_up and a.outcome.exit_code() == 1
        with pytest.raises(WorkerFailed):
            a.collective_rpc("echo", args=(1,), timeout=5)
        assert gone_within(pids_a, 5.0) == []
        assert b.collective_rpc("echo", args=(2,), timeout=10) == [2, 2]  # ... B serves on, untouched
        assert b.pids() == pids_b and b.outcome.ending is Ending.RUNNING
        os.kill(pids_b[0], signal.SIGKILL)  # B restarts its own group; A's give-up is not B's
        deadline = time.monotonic() + 20
        while b.groups()[0].attempts < 2 and time.monotonic() < deadline:  # the restart has begun ...
            time.sleep(0.01)
        assert b.wait_until_serving(timeout=20)  # ... and finished
        assert b.collective_rpc("echo", args=(3,), timeout=10) == [3, 3] and b.groups()[0].restarts == 1
    finally:
        a.shutdown()
        b.shutdown()
    assert b.outcome.ending is Ending.STOPPED and b.outcome.restarts == (1,)
    assert gone_within(pids_b, 5.0) == []


def test_wait_until_serving_returns_false_once_the_group_can_never_serve():
    with Supervisor(config(*ECHO, "parallel.tp=1", "restart=never")) as sup:
        os.kill(sup.pids()[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while sup.serving(0) and time.monotonic() < deadline:  # the death is noticed ...
            time.sleep(0.01)
        t0 = time.monotonic()
        assert sup.wait_until_serving(0, timeout=30) is False  # ... and the group will never serve again:
        assert time.monotonic() - t0 < 29  # answered when the gate closed for good, not at the timeout
        assert sup.wait(20) and sup.gave_up
