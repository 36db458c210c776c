"""Multi-node, pure: what a round's end leads to (budget.py), the flags (jobspec.py), a rank's variables (NodePlace)."""
from __future__ import annotations

import pytest

from supervisor.launch import cli, jobspec
from supervisor.launch.budget import End, RoundEnd, Standing, Verdict, decide, ending, quorum
from worker.script import log_attempt, script_env
from worker.spec import NodePlace, ScriptSettings, Topology, WorkerSpec


# -- budget ------------------------------------------------------------------------------------------------------
def _next(kind, restarts_before=0, max_restarts=3, survivors=2, nodes=2, tie_ok=True, min_nodes=1):
    end = ending(kind, "what happened", restarts_before)
    return decide(end, Standing(survivors, nodes, tie_ok), min_nodes, max_restarts)


@pytest.mark.parametrize("kind, restarts_before, max_restarts, verdict", [
    (End.DONE, 3, 3, Verdict.DONE),
    (End.RANK_FAILED, 2, 3, Verdict.NEXT_ROUND),
    (End.RANK_FAILED, 3, 3, Verdict.FAIL),  # the 4th restart of --max-restarts=3
    (End.NODE_LOST, 3, 3, Verdict.FAIL),
    (End.STORE_LOST, 3, 3, Verdict.FAIL),
    (End.NODES_JOINING, 3, 3, Verdict.NEXT_ROUND),  # membership changes are not retries (torchrun)
    (End.STOPPED, 0, 3, Verdict.FAIL),  # a node stopped by a signal stops the job (torchrun)
])
def test_one_budget_for_the_job(kind, restarts_before, max_restarts, verdict):
    assert _next(kind, restarts_before, max_restarts).verdict is verdict


def test_the_count_after_an_end_counts_failures_and_losses_only():
    assert [ending(k, "", 2).restarts for k in End] == [2, 3, 3, 3, 2, 2]


def test_a_lost_node_below_min_fails_naming_what_happened():
    step = _next(End.NODE_LOST, survivors=1, nodes=2, min_nodes=2)
    assert step.verdict is Verdict.FAIL and step.why.startswith("what happened; 1 node(s) left")


@pytest.mark.parametrize("survivors, nodes, tie_ok, ok", [
    (2, 3, False, True),  # a majority: always
    (1, 3, True, False),  # a minority: never, store or not
    (1, 2, True, True),  # half, with the store on this side (or its host known dead)
    (1, 2, False, False),  # half, the store silent: it may live on the other side
    (2, 4, False, False),
    (3, 4, False, True),
])
def test_quorum(survivors, nodes, tie_ok, ok):
    assert quorum(Standing(survivors, nodes, tie_ok)) is ok
    step = _next(End.STORE_LOST, survivors=survivors, nodes=nodes, tie_ok=tie_ok)
    assert (step.verdict is Verdict.NEXT_ROUND) is ok
    if not ok:
        assert "not a majority" in step.why


def test_a_round_end_travels_through_the_store_unchanged():
    end = RoundEnd(End.NODE_LOST, "lost node 1 (h:1)", (1, 2), 4)
    assert RoundEnd.decode(end.encode().encode()) == end


# -- flags ---------------------------------------------------------------------------------------------------------
def _spec(*flags: str) -> jobspec.JobSpec:
    return jobspec.parse(cli.parser().parse_args([*flags, "train.py"]), nproc=2)


def test_static_is_torchruns_default_on_the_masters_address():
    s = _spec("--nnodes=3", "--node-rank=2", "--master-addr=10.0.0.1", "--master-port=1234", "--max-restarts=2")
    assert (s.backend, s.host, s.port, s.node_rank, s.min_nodes, s.max_nodes) == ("static", "10.0.0.1", 1234, 2, 3, 3)
    assert s.is_host is False and s.standby is False and s.max_restarts == 2  # node 0 hosts; no standby


def test_c10d_takes_torchs_rdzv_conf_with_faster_defaults():
    s = _spec("--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=h0",
              "--rdzv-conf=join_timeout=30,keep_alive_interval=2,is_host=1")
    assert (s.host, s.port, s.min_nodes, s.max_nodes, s.elastic) == ("h0", 29400, 1, 4, True)
    assert (s.timings.join_s, s.timings.keep_alive_interval_s, s.timings.lost_after_s) == (30, 2, 6.0)
    assert s.is_host is True and s.standby is True and s.timings.last_call_s == 1
    assert _spec("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-conf=standby=false").standby is False


@pytest.mark.parametrize("flags, message", [
    (["--nnodes=2:1"], "--nnodes=2:1: needs 0 < MIN <= MAX"),
    (["--nnodes=a"], "--nnodes=a: must be N or MIN:MAX"),
    (["--nnodes=1:2"], "--nnodes=1:2: --rdzv-backend=static runs a fixed number of nodes"),
    (["--nnodes=2", "--node-rank=2"], "--node-rank=2: must be in [0, 2)"),
    (["--nnodes=2", "--rdzv-backend=etcd"], "--rdzv-backend=etcd"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-conf=colour=red"], "--rdzv-conf: unknown key 'colour'"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-conf=join_timeout=0"], "join_timeout=0 must be a positive"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-conf=is_host=maybe"], "is_host=maybe is not a boolean"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-conf=store_type=file"], "store_type=file"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h:0"], "--rdzv-endpoint=h:0: needs a port"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h:x"], "--rdzv-endpoint=h:x"),
    (["--nnodes=2", "--standalone"], "--standalone"),
])
def test_bad_flags_are_one_line_naming_the_flag(flags, message):
    with pytest.raises(jobspec.UsageError) as info:
        _spec(*flags)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_one_node_keeps_the_single_node_path():
    assert not jobspec.is_multi_node("1") and not jobspec.is_multi_node("1:1")
    assert jobspec.is_multi_node("2") and jobspec.is_multi_node("1:2")
    ns = cli.parser().parse_args(["--nnodes=2", "--max-restarts=3", "--master-port=99", "train.py"])
    assert not any(o.startswith(("restart", "+runtime.env.MASTER_PORT")) for o in cli.overrides(ns, multi_node=True))


# -- a rank's variables --------------------------------------------------------------------------------------------
def _rank_spec(place: NodePlace, rank: int = 1, attempt: int = 5) -> WorkerSpec:
    return WorkerSpec(topology=Topology(0, 0, rank, 2, 1, 1), device="cpu", local_rank=0, rendezvous="",
                      script=ScriptSettings(run_id="j", max_restarts=9, node=place), attempt=attempt,
                      env=(("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"), ("RANK", "1"), ("WORLD_SIZE", "2")))


def test_a_multi_node_rank_sees_its_place_in_the_jobs_world():
    place = NodePlace(group_rank=2, group_world_size=3, rank_offset=4, world_size=6, restart_count=1,
                      max_restarts=3, master_addr="h0", master_port=777, round=4)
    env = script_env(_rank_spec(place), "/e")
    assert (env["RANK"], env["ROLE_RANK"], env["WORLD_SIZE"], env["ROLE_WORLD_SIZE"]) == ("5", "5", "6", "6")
    assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == ("2", "3")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("h0", "777")
    assert (env["TORCHELASTIC_RESTART_COUNT"], env["TORCHELASTIC_MAX_RESTARTS"]) == ("1", "3")
    assert log_attempt(_rank_spec(place)) == 4


def test_one_node_is_unchanged():
    env = script_env(_rank_spec(NodePlace()), "/e")
    assert (env["RANK"], env["WORLD_SIZE"], env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == ("1", "2", "0", "1")
    assert (env["TORCHELASTIC_RESTART_COUNT"], env["TORCHELASTIC_MAX_RESTARTS"], env["MASTER_PORT"]) == ("5", "9", "1")
    assert log_attempt(_rank_spec(NodePlace())) == 5


@pytest.mark.parametrize("override, key, words", [
    ("backend=ray", "backend", "rankvisor-run --nnodes"),  # scripts past one machine: the launcher, not Ray
    ("launch.node.group_rank=1", "launch.node", "set by rankvisor-run --nnodes"),
])
def test_the_config_form_refuses_what_only_the_multi_node_launcher_sets(override, key, words):
    from supervisor.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(["workload=script", f"launch.script={__file__}", override])
    assert info.value.key == key and words in str(info.value)
