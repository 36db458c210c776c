"""The same tree on a Ray cluster: a real two-node local cluster (ray.cluster_utils), CPU only (marked `ray`)."""
from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from supervisor.api import Supervisor  # noqa: E402
from tests.integration.helpers import config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2)
    ray.init(address=c.address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def no_leaks(cluster):
    """Ray owns its processes (raylets, worker pool, /dev/shm object store), so the process-level leak check is
    replaced by Ray's view: after each test no actor of ours is alive and no placement group is left."""
    yield
    from ray._private import state  # the GCS tables (the state API would need the dashboard)

    deadline = time.monotonic() + 30
    while True:
        ours = [a["Name"] for a in state.actors().values()
                if a.get("State") == "ALIVE" and str(a.get("Name", "")).startswith("rankvisor-")]
        pgs = [pid for pid, p in ray.util.placement_group_table().items() if p.get("state") != "REMOVED"]
        if not ours and not pgs:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"left behind on the Ray cluster: actors {ours}, placement groups {pgs}", pytrace=False)
        time.sleep(0.2)


def test_tp_mlp_across_two_nodes_then_recovers_a_killed_actor():
    from worker.tp_mlp import make_input, reference_forward

    cfg = config("backend=ray", "parallel.tp=2", "ray.placement_strategy=STRICT_SPREAD", "restart=one_for_all",
                 "runtime.startup_timeout_s=180")
    with Supervisor(cfg) as sup:
        x = make_input(cfg.workload, 0)
        assert float((sup.execute_model(x, timeout=120) - reference_forward(cfg.workload, x)).abs().max()) < 1e-4
        nodes = sup.collective_rpc(lambda w: __import__("ray").get_runtime_context().get_node_id(), timeout=60)
        assert len(set(nodes)) == 2, "STRICT_SPREAD must put the two ranks on two nodes"
        old = sup.pids()
        os.kill(old[1], signal.SIGKILL)  # the cluster runs on this machine, so the actor's pid is ours to kill
        deadline = time.monotonic() + 180
        while set(old) & set(sup.pids()) or not sup.serving(0):
            assert time.monotonic() < deadline, "the group did not come back"
            time.sleep(0.1)
        assert [e["kind"] for e in sup.events.of_kind("restarting")] == ["restarting"]
        x = make_input(cfg.workload, 1)
        assert float((sup.execute_model(x, timeout=120) - reference_forward(cfg.workload, x)).abs().max()) < 1e-4


def test_startup_failure_on_ray_names_the_rank():
    from supervisor.errors import StartupError

    cfg = config("backend=ray", "worker.cls=worker.faults:FaultyWorker", "+runtime.env.RV_FAULT=raise_init",
                 "+runtime.env.RV_FAULT_RANK=1", "parallel.tp=2", "runtime.startup_timeout_s=180")
    with pytest.raises(StartupError, match="rank 1") as err:
        Supervisor(cfg)
    assert "injected failure in init on rank 1" in str(err.value)
