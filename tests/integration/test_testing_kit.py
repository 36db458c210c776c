"""The testing kit users get (supervisor.testing, a pytest11 plugin): a user-style test of a worker, written only
with the plugin's fixtures and injectors. The plugin is loaded by its entry point, as in a user's project."""
from __future__ import annotations

import pytest

from supervisor.testing import (hang, ignore_sigterm, kill, raise_in, spawn_grandchild, stop, wait_for_event,
                                wait_until_serving)
from tests.integration.helpers import gone_within

pytestmark = pytest.mark.timeout(120)
ECHO = ("worker.cls=worker.tp_mlp:EchoWorker", "parallel.tp=2")


def test_the_plugin_is_loaded_by_its_entry_point(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("rankvisor")


def test_a_user_style_test_of_a_worker_with_the_kit(rankvisor_leak_check, rankvisor_tree):
    sup = rankvisor_tree(*ECHO, "parallel.dp=2", "restart=one_for_one", "worker.heartbeat_timeout_s=1.0")
    assert sup.collective_rpc("echo", args=(1,)) == [1] * 4
    old = sup.pids()
    kill(sup, rank=3)
    assert wait_for_event(sup, "restarting", group=1)
    assert wait_until_serving(sup, group=1, after_pids=old[2:])
    assert "injected on rank 2" in str(raise_in(sup, rank=2))
    group0 = sup.pids()[:2]
    with pytest.raises(Exception, match=r"ranks \[0\] missed the call deadline"):
        hang(sup, rank=0, deadline=0.5).result(timeout=30)
    assert wait_for_event(sup, "hung", rank=0)
    assert wait_until_serving(sup, group=0, after_pids=group0)
    stop(sup, rank=1)  # frozen: group 0 is declared hung by its heartbeat and restarted
    assert wait_for_event(sup, "hung", rank=1, why="missed its heartbeat deadline")
    assert wait_until_serving(sup, group=0)
    ignore_sigterm(sup, rank=2)
    child = spawn_grandchild(sup, rank=3, detach=True)
    sup.shutdown()  # rank 2 only stops at the SIGKILL; the detached grandchild goes with its worker's tree
    assert gone_within([child], 5.0) == []


def test_the_leak_check_knows_a_semaphore_another_process_holds(tmp_path):
    """A named semaphore (sem.mp-*, multiprocessing's) that another process holds is that process's, not a leak:
    the machine is shared, and another run's semaphores come and go in /dev/shm. glibc maps it under a temporary
    name, so only its inode tells whose it is. Here this process holds one, and a child runs the check."""
    import multiprocessing
    import os
    import subprocess
    import sys

    from supervisor.testing.leaks import SHM_DIR
    from tests.integration.helpers import REPO

    lock = multiprocessing.get_context("spawn").Lock()
    name = "sem." + lock._semlock.name.lstrip("/")  # glibc's file for the POSIX name /mp-...
    assert os.path.exists(os.path.join(SHM_DIR, name))
    check = f"from supervisor.testing.leaks import _held_by_others; print(sorted(_held_by_others({{{name!r}}})))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": REPO})
    del lock
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"[{name!r}]"]
