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
