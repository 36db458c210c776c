"""A short chaos soak as a test (issue: reliability suite and chaos soak), plus the faults it found.

The soak lives in scripts/chaos.py (``python scripts/chaos.py --cycles 1000`` is the full run); here 30 cycles
with a fixed seed, drawn from a shuffled deck of (kind, phase) pairs so that every kind of fault (SIGKILL, SIGSEGV,
SIGSTOP, SIGTERM, os._exit, a raising call, a hung call, a grandchild left behind) and every phase (starting, idle,
mid-call, restarting, stopping) occurs, and two SIGKILLs of a supervisor running in a child process. After every
cycle the tree must be healthy again, no call may hang, and nothing may leak. The last two tests pin product bugs
the soak found (a zombie grandchild never reaped; a call deadline blaming ranks that had answered), now fixed.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.helpers import REPO, gone_within

pytestmark = pytest.mark.timeout(300)

SEED = 20251125


def _load_chaos():
    name = "rankvisor_chaos"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", "chaos.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: its callables are shipped to workers by value
    spec.loader.exec_module(module)
    return module


def test_short_soak_recovers_every_cycle_without_hangs_or_leaks():
    chaos = _load_chaos()
    opts = chaos.SoakOptions(seed=SEED, cycles=30, supervisor_every=15)
    summary = chaos.Soak(opts).run()
    print(summary.table())
    assert len(summary.faults) == 30
    assert summary.calls_hung == 0, summary.violations
    assert summary.calls_ok > 0
    assert not summary.unclear and not summary.wrong, summary.unclear + summary.wrong
    assert summary.leaks == 0, summary.violations
    assert not summary.not_recovered, summary.violations
    assert summary.violations == []
    kinds = {f.kind for f in summary.faults if f.target == "rank"}
    phases = {f.phase for f in summary.faults if f.target == "rank"}
    assert kinds == set(chaos.KINDS) and phases == set(chaos.PHASES)
    assert any(f.target == "supervisor" for f in summary.faults)


def test_segments_of_a_supervisor_sigkilled_during_startup_are_swept_when_a_tree_starts_again(tmp_path):
    """Killed before every reader attached, the broadcast segment is still linked: nobody is left to unlink it, so
    the next supervisor's start-up sweep must (the soak found this leak before the sweep existed). Only named
    segments can be left behind: the child asks for them (RV_SHM_NAMED=1, the mode kept for where a descriptor
    cannot travel); the default anonymous ones have no name to leave (tests/integration/test_transport_shm.py)."""
    from supervisor.api import Supervisor
    from tests.integration.helpers import ECHO, config, fault_env
    from transport import shm

    # rank 1 never becomes READY, so the broadcast segment cannot have been unlinked yet when the kill lands
    args = [sys.executable, "-m", "supervisor", "workload=serve", *fault_env("hang_init", rank=1), "worker=echo",
            "parallel.tp=2", "runtime.preload=[]", "logging.events=false"]
    before = {p.pid for p in psutil.Process().children()}
    env = dict(os.environ, PYTHONPATH=REPO, RV_SHM_NAMED="1")
    child = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    left = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not shm.list_segments(owner=child.pid):
            time.sleep(0.02)
        assert shm.list_segments(owner=child.pid), "the child never created its broadcast segment"
        workers = psutil.Process(child.pid).children(recursive=True)
        child.kill()
        child.wait(10)
        assert gone_within([p.pid for p in workers], 2.0) == []
        assert shm.list_segments(owner=child.pid), "nothing left to sweep: the test did not hit its window"
        with Supervisor(config(*ECHO)) as sup:  # start again: dead owners' segments should be swept
            sup.check_health(timeout=30)
        left = shm.list_segments(owner=child.pid)
        assert left == [], f"segments of the dead supervisor {child.pid} still in /dev/shm: {left}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for name in shm.list_segments(owner=child.pid):  # clean up what the product left, by name
            shm.unlink(name)
        _reap_orphans(before, child.pid)


def _reap_orphans(before: set[int], dead: int, timeout: float = 10.0) -> None:
    """The killed child's processes are re-parented to us (a subreaper): wait for them to exit (its forkserver
    does once it notices), then collect their exit status."""
    orphans = [p for p in psutil.Process().children() if p.pid not in before and p.pid != dead]
    psutil.wait_procs(orphans, timeout=timeout)


def test_a_call_hung_on_one_rank_names_only_that_rank():
    from supervisor.api import Supervisor
    from supervisor.errors import RpcTimeout
    from tests.integration.helpers import ECHO, config

    chaos = _load_chaos()
    with Supervisor(config(*ECHO, "parallel.tp=2", "restart=one_for_one")) as sup:
        with pytest.raises(RpcTimeout) as err:
            sup.collective_rpc(chaos._fault_hang, args=(0, 600.0), deadline=1.0)  # rank 0 sleeps, rank 1 answers
        hung = [e["rank"] for e in sup.events.of_kind("hung")]
        assert err.value.ranks == (0,) and hung == [0], (err.value.ranks, hung)


def _spawn_sleeper(w, detach: bool = False):
    import subprocess as sp

    return sp.Popen(["sleep", "600"], stdin=sp.DEVNULL, start_new_session=detach).pid


def test_a_grandchild_that_died_before_its_worker_is_reaped():
    from supervisor.api import Supervisor
    from tests.integration.helpers import ECHO, config

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    gc = None
    try:
        with Supervisor(config(*ECHO, "restart=one_for_one")) as sup:
            gc = sup.collective_rpc(_spawn_sleeper, timeout=30)[0]
            worker = psutil.Process(sup.pids()[0])
            psutil.Process(gc).kill()  # the grandchild dies first: a zombie under its worker...
            time.sleep(0.2)
            worker.kill()  # ...the worker dies: the zombie is re-parented to us, the supervisor
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (sup.pids() or [worker.pid])[0] == worker.pid:
                time.sleep(0.05)
            sup.collective_rpc("ping", timeout=30)  # waits for the restart: its orphans are reaped by now
            assert not _our_zombie(gc), f"grandchild {gc} is an unreaped zombie child of the supervisor"
        assert not _our_zombie(gc), f"grandchild {gc} is still an unreaped zombie after shutdown"
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if gc is not None and _our_zombie(gc):
            os.waitpid(gc, 0)  # clean up after the product


def test_a_detached_grandchild_stopped_with_its_killed_worker_is_reaped():
    """The soak's grandchild/stopping cycle: the worker is SIGKILLed and shutdown starts at once, while the kernel
    still tears the worker down; shutdown SIGTERMs the grandchild (it opened its own session), which dies a zombie
    under its worker and comes back to us when the worker is gone. Its session is not a worker's, so only the
    supervisor's memory of having seen it below a worker identifies it."""
    from supervisor.api import Supervisor
    from tests.integration.helpers import ECHO, config

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    gc = None
    try:
        with Supervisor(config(*ECHO)) as sup:
            gc = sup.collective_rpc(_spawn_sleeper, args=(True,), timeout=30)[0]
            os.kill(sup.pids()[0], signal.SIGKILL)
        assert not _our_zombie(gc), f"detached grandchild {gc} is an unreaped zombie after shutdown"
        assert not psutil.pid_exists(gc) or psutil.Process(gc).ppid() != os.getpid()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if gc is not None and _our_zombie(gc):
            os.waitpid(gc, 0)  # clean up after the product


def test_a_reply_queue_gone_before_the_supervisor_opens_it_is_a_startup_failure(monkeypatch):
    """The 1000-cycle soak (SIGTERM during a restart): a rank sent READY and was stopped at once, closing its reply
    queue, so opening that queue raised FileNotFoundError in the supervisor's manager thread, which died; the tree
    gave up. Now it is that rank's start-up failure: the policy restarts the group and the tree serves again."""
    from supervisor.api import Supervisor
    from tests.integration.helpers import ECHO, config
    from transport import MessageQueue

    real = MessageQueue.create_from_handle.__func__
    armed = {"left": 0}

    def vanished(cls, handle, reader_rank, **kw):
        if armed["left"] > 0:
            armed["left"] -= 1
            raise FileNotFoundError(2, "No such file or directory", f"/dev/shm/{handle.name}")
        return real(cls, handle, reader_rank, **kw)

    monkeypatch.setattr(MessageQueue, "create_from_handle", classmethod(vanished))
    with Supervisor(config(*ECHO, "parallel.tp=2", "restart=one_for_one")) as sup:
        old = sup.pids()
        armed["left"] = 1  # the restart's first reply queue is gone
        os.kill(old[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (set(old) & set(sup.pids()) or not sup.serving(0)) and not sup.gave_up:
            assert time.monotonic() < deadline, "the group did not come back"
            time.sleep(0.05)
        assert not sup.gave_up, sup.error
        assert sup.collective_rpc("ping", timeout=30) == [0, 1]
        assert armed["left"] == 0


def _our_zombie(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() == psutil.STATUS_ZOMBIE and p.ppid() == os.getpid()
    except psutil.Error:
        return False
