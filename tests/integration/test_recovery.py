"""The weight keeper and the warm standby on real trees (CPU): ranks map the keeper's weights, a standby takes a dead
group's place, the keeper's or a standby's death (FAULTS rows 52, 53), and their failures named in one line."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from supervisor.api import Supervisor
from supervisor.errors import StartupError
from tests.integration.helpers import TreeInChild, config, gone_within, greedy_tokens

pytestmark = pytest.mark.timeout(180)

TOY = ("worker.cls=tests.integration.kept_workers:KeptToy",)
NEW_TOKENS = 6


def _toy(*extra: str):
    return config(*TOY, "restart=one_for_one", "recovery.standby_backoff_s=0.05", *extra)


def _llm(tmp_path, *extra: str):
    return config("workload=llm", "device=cpu", f"llm.cache_dir={tmp_path}", "llm.batch=2", "llm.prompt_len=5",
                  f"llm.max_new_tokens={NEW_TOKENS}", "restart=one_for_one", *extra)


def _ready_standbys(sup, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = sup.reserve_status()["standbys"]
        if len(st) == len(sup.live_groups) and all(s["ready"] for s in st.values()):
            return st
        time.sleep(0.01)
    raise AssertionError(f"standbys not ready: {sup.reserve_status()}")


def _generate(sup, prompts) -> list[list[int]]:
    return greedy_tokens(sup, prompts, NEW_TOKENS)


def _kill_and_wait(sup, pid: int) -> None:
    before = sup.pids()
    os.kill(pid, signal.SIGKILL)
    assert _serving_new(sup, before)


def _serving_new(sup, before: list[int], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sup.pids() != before and sup.serving():
            return True
        time.sleep(0.01)
    return False


PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82]]


def test_ranks_map_kept_weights_and_a_standby_takes_a_dead_groups_place(tmp_path):
    with Supervisor(_llm(tmp_path, "parallel.tp=2", "recovery.keeper=off", "recovery.standby=off")) as sup:
        plain = _generate(sup, PROMPTS)
        assert {i["weights"] for i in sup.collective_rpc("model_info", timeout=30)} == {"loaded"}
    with Supervisor(_llm(tmp_path, "parallel.tp=2")) as sup:  # workload=llm under one_for_one: both on (auto)
        assert {i["weights"] for i in sup.collective_rpc("model_info", timeout=30)} == {"kept"}
        assert _generate(sup, PROMPTS) == plain
        for _ in range(2):
            spares = _ready_standbys(sup)[0]["pids"]
            t_kill = time.time()
            os.kill(sup.pids()[1], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not (sup.pids() == spares and sup.serving()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sup.pids() == spares  # the standby's processes took the group's place
            assert _generate(sup, PROMPTS) == plain
            phases = sup.collective_rpc("phase_timings", timeout=30)
            assert all(p["weights_kept"] == 1.0 and p["created_at"] < t_kill for p in phases)
        promoted = sup.events.of_kind("standby_promoted")
        assert len(promoted) == 2 and all(e["ready"] for e in promoted)
        assert [e["backoff_s"] for e in sup.events.of_kind("restarting")][:1] == [0.0]  # first restart: at once
        keeper = sup.reserve_status()["keeper"]
        assert keeper["alive"] and keeper["held_bytes"]["cpu"] > 0
        assert len(sup.events.of_kind("keeper_started")) == 1  # loaded once, for every incarnation


def test_dp_replicas_map_one_copy_of_their_shard():
    with Supervisor(_toy("parallel.dp=2", "parallel.tp=2", "recovery.standby=off")) as sup:
        where = sup.collective_rpc("where", timeout=30)
        assert sup.collective_rpc("total", timeout=30) == [64 * 64 * 1.0, 64 * 64 * 2.0] * 2
        # ranks 0 and 2 (tp_rank 0 of each replica) share one memfd, ranks 1 and 3 another
        assert where[0]["memfd"] == where[2]["memfd"] != where[1]["memfd"] == where[3]["memfd"]
        assert sup.reserve_status()["keeper"]["held_bytes"] == {"cpu": 2 * 64 * 64 * 4}


def test_keeper_killed_idle_and_mid_call_ranks_keep_serving_then_one_reload(tmp_path):
    """Row 52: the keeper's death takes nothing from the ranks (their mappings hold the memory); the next restart
    starts a new keeper, which loads again; every answer stays the same."""
    with Supervisor(_llm(tmp_path, "parallel.tp=1")) as sup:
        want = _generate(sup, PROMPTS)
        _ready_standbys(sup)
        first = sup.reserve_status()["keeper"]["pid"]
        answers, stop = [], threading.Event()

        def keep_calling():
            while not stop.is_set():
                answers.append(_generate(sup, PROMPTS))

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            time.sleep(0.2)
            os.kill(first, signal.SIGKILL)  # mid-call
            assert gone_within([first], 5) == []
            time.sleep(0.3)
        finally:
            stop.set()
            caller.join(60)
        assert answers and all(a == want for a in answers)
        (lost,) = sup.events.of_kind("keeper_exited")
        assert lost["pid"] == first and lost["reason"] == "SIGKILL" and lost["action"] == "reload_later"
        assert _generate(sup, PROMPTS) == want  # idle, after the death
        assert sup.reserve_status()["keeper"] is None and sup.serving()
        _kill_and_wait(sup, sup.pids()[0])  # the standby (mapping the old memory) takes over ...
        assert _generate(sup, PROMPTS) == want
        _ready_standbys(sup)  # ... and the standby behind it needed a new keeper
        second = sup.reserve_status()["keeper"]["pid"]
        assert second != first and len(sup.events.of_kind("keeper_started")) == 2
        _kill_and_wait(sup, sup.pids()[0])
        assert _generate(sup, PROMPTS) == want
        assert sup.outcome.restarts == (2,)


def test_a_standby_killed_while_waiting_is_replaced_and_the_group_is_untouched():
    with Supervisor(_toy("parallel.tp=2")) as sup:
        serving = sup.pids()
        spares = _ready_standbys(sup)[0]["pids"]
        os.kill(spares[1], signal.SIGKILL)
        assert gone_within(spares, 5) == []  # its sibling is stopped with it
        new = _ready_standbys(sup)[0]["pids"]
        assert not set(new) & set(spares)
        (exited,) = sup.events.of_kind("standby_exited")
        assert exited["group"] == 0 and "SIGKILL" in exited["reasons"]
        assert sup.pids() == serving and sup.outcome.restarts == (0,)
        assert sup.collective_rpc("total", timeout=30) == [64 * 64 * 1.0, 64 * 64 * 2.0]


def test_a_shard_that_cannot_be_built_fails_start_up_naming_the_rank():
    with pytest.raises(StartupError) as err:
        Supervisor(config("worker.cls=tests.integration.kept_workers:UnbuildableOnRank1", "parallel.tp=2",
                          "restart=one_for_one", "restart.startup_intensity=0"))
    assert err.value.rank == 1
    msg = str(err.value)
    assert "the weight keeper could not load rank 1's weights: FileNotFoundError: no shard 1" in msg
    assert "build_weights" in err.value.remote_traceback


def test_recovery_on_where_it_cannot_work_is_one_line():
    from supervisor.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"^recovery.keeper: the worker class keeps no weights"):
        validate(config("worker=echo", "recovery.keeper=on"))
    with pytest.raises(ConfigError, match=r"^recovery.standby: needs backend=local"):
        validate(config("worker=echo", "backend=ray", "recovery.standby=on"))


@pytest.mark.parametrize("calls", [False, True])
def test_supervisor_kill9_with_keeper_and_standby_leaves_nothing(calls):
    """Row 53 on CPU: kill -9 of the supervisor, idle and mid-call: workers, keeper and standbys all gone."""
    args = [*TOY, "parallel.tp=2", "restart=one_for_one", "--reserve", *(["--calls"] if calls else [])]
    tree = TreeInChild(*args)
    try:
        everyone = tree.pids + tree.info["reserve"]
        assert len(everyone) == 5  # 2 ranks, the keeper, a 2-rank standby
        assert all(psutil.pid_exists(p) for p in everyone)
        tree.kill(signal.SIGKILL)
        assert gone_within(everyone, 1.0) == []
    finally:
        tree.close()
