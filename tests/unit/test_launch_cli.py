"""rankvisor-run's flag mapping, torchrun's failure summary and a node's root-cause candidate (pure: no
processes)."""
from __future__ import annotations

import json
import os

import pytest

from supervisor.launch import cli
from supervisor.launch.noderound import own_failure
from supervisor.launch.rendezvous import NodeInfo, Round
from supervisor.launch.rootcause import RankFailure, failures, format_failures
from worker.script import rank_dir
from worker.spec import ScriptSettings


def _ns(*args: str):
    return cli.parser().parse_args([*args, "train.py", "--epochs", "3"])


def test_max_restarts_is_one_for_all_with_a_total_budget():
    out = cli.overrides(_ns("--max-restarts=3", "--nproc-per-node=4"))
    assert "parallel.tp=4" in out and "restart=one_for_all" in out
    assert "restart.intensity=3" in out and "restart.startup_intensity=3" in out
    assert "restart=one_for_all" not in cli.overrides(_ns())  # torchrun's default: no restarts


def test_max_restarts_budget_has_no_time_window():
    assert "restart.period_s=inf" in cli.overrides(_ns("--max-restarts=1"))


@pytest.mark.parametrize("flags, config, named", [
    (["--nproc-per-node=2"], "parallel.tp=4", "--nproc-per-node, which sets parallel.tp=2"),
    ([], "parallel.tp=4", "--nproc-per-node, which sets parallel.tp=1"),
    (["--max-restarts=3"], "restart.intensity=5", "--max-restarts, which sets restart.intensity=3"),
    (["--shutdown-timeout=2"], "shutdown.grace_s=9", "--shutdown-timeout, which sets shutdown.grace_s=2.0"),
])
def test_a_config_key_that_a_flag_sets_too_is_refused_naming_both(flags, config, named):
    with pytest.raises(cli.UsageError) as err:
        cli.overrides(_ns(*flags, "-c", config))
    assert str(err.value) == f"-c {config}: conflicts with {named}; give only one of them"


def test_config_keys_no_flag_sets_pass():
    assert "shutdown.grace_s=9" in cli.overrides(_ns("-c", "shutdown.grace_s=9"))  # the README's own example


def test_flags_after_the_script_belong_to_the_script_and_torchrun_spellings_both_work():
    ns = _ns("--nproc_per_node=2", "--max_restarts=1", "--rdzv-id=abc", "-r", "3", "--tee=1",
             "--local-ranks-filter=0,1")
    s = cli.launch_settings(ns, ScriptSettings())
    assert (ns.script, s.args) == ("train.py", ("--epochs", "3"))
    assert (s.run_id, s.redirects, s.tee, s.local_ranks_filter) == ("abc", 3, 1, (0, 1))


def test_one_node_is_node_zero():
    with pytest.raises(cli.UsageError, match="--node-rank=1"):
        cli.check_node_rank(_ns("--node-rank=1"))


def test_bad_stream_masks_and_nproc_name_the_flag():
    with pytest.raises(cli.UsageError, match="--redirects"):
        cli.launch_settings(_ns("--redirects=0:1,1:2"), ScriptSettings())
    with pytest.raises(cli.UsageError, match="--nproc-per-node"):
        cli.nproc("zero")


def test_root_cause_reads_the_record_error_file_and_names_the_first_failure(tmp_path):
    path = rank_dir(str(tmp_path), 1, 3) + "/error.json"
    os.makedirs(rank_dir(str(tmp_path), 1, 3))
    with open(path, "w") as f:
        json.dump({"message": {"message": "ValueError: x", "extraInfo": {"py_callstack": "Traceback...\nValueError: x",
                                                                          "timestamp": "0"}}}, f)
    os.utime(path, (1.5, 1.5))  # raised at 1.5: before rank 2's exit, seen at 3.0
    events = [{"kind": "started", "pid": 10, "attempt": 0}, {"kind": "started", "pid": 11, "attempt": 1},
              {"kind": "started", "pid": 12, "attempt": 1},
              {"kind": "exited", "pid": 10, "rank": 3, "code": -9, "time": 1.0},  # an earlier attempt: not listed
              {"kind": "exited", "pid": 12, "rank": 2, "code": -9, "time": 3.0},
              {"kind": "exited", "pid": 11, "rank": 3, "code": 1, "time": 2.0}]
    found = failures(events, str(tmp_path))
    assert [(f.rank, f.exitcode) for f in found] == [(3, 1), (2, -9)]
    text = format_failures("train.py", found)
    root = text.split("Root Cause (first observed failure):")[1]
    assert "rank      : 3 (local_rank: 3)" in root and f"error_file: {path}" in root
    assert "Traceback...\n  ValueError: x" in root
    assert "Signal 9 (SIGKILL) received by PID 12" in text.split("Root Cause")[0]
    assert RankFailure(0, 2, 5, 0.0, "").message().startswith("To enable traceback")


def _error_file(log_dir, attempt: int, rank: int, raised_at: float) -> str:
    os.makedirs(rank_dir(str(log_dir), attempt, rank), exist_ok=True)
    path = rank_dir(str(log_dir), attempt, rank) + "/error.json"
    with open(path, "w") as f:
        json.dump({"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": "ValueError: boom"}}}, f)
    os.utime(path, (raised_at, raised_at))
    return path


def test_every_rank_that_failed_by_itself_is_listed_first_failure_first(tmp_path):
    """The monitor saw rank 0's abort first and the group's stop found the rest: rank 1 raised earlier (its error
    file says when) and was killed by the stop while it was leaving; rank 2 had exited 1 by itself just before
    the stop; rank 3 was running and was killed by the stop: no failure of its own."""
    raised = _error_file(tmp_path, 0, 1, raised_at=100.0)
    events = [*({"kind": "started", "pid": 10 + r, "attempt": 0, "time": 50.0} for r in range(4)),
              {"kind": "exited", "pid": 10, "rank": 0, "code": -6, "time": 101.0},
              {"kind": "stopped", "time": 101.2, "ranks": [0, 1, 2, 3], "pids": [10, 11, 12, 13],
               "codes": [-6, -9, 1, -9], "reasons": ["SIGABRT", "SIGKILL", "exit 1", "SIGKILL"]}]
    found = failures(events, str(tmp_path))
    assert [(f.rank, f.exitcode, f.time) for f in found] == [(1, -9, 100.0), (0, -6, 101.0), (2, 1, 101.2)]
    assert found[0].error_file == raised


def test_an_error_file_older_than_the_rank_is_a_previous_runs(tmp_path):
    _error_file(tmp_path, 0, 1, raised_at=10.0)  # a reused --log-dir: written by a run before this one
    events = [{"kind": "started", "pid": 11, "attempt": 0, "time": 50.0},
              {"kind": "stopped", "time": 60.0, "ranks": [1], "pids": [11], "codes": [-9], "reasons": ["SIGKILL"]}]
    assert failures(events, str(tmp_path)) == []


def test_a_signal_the_stop_did_not_send_is_the_ranks_own_failure():
    """by_stop (where the backend tells): rank 1 was killed a moment before the stop (SIGKILL, not the stop's: a
    failure of its own); rank 0 was running and the stop killed it; rank 2's exit 1 is its own either way."""
    events = [*({"kind": "started", "pid": 10 + r, "attempt": 0, "time": 50.0} for r in range(3)),
              {"kind": "stopped", "time": 60.0, "ranks": [0, 1, 2], "pids": [10, 11, 12], "codes": [-9, -9, 1],
               "reasons": ["SIGKILL", "SIGKILL", "exit 1"], "by_stop": [True, False, True]}]
    assert [(f.rank, f.exitcode) for f in failures(events, "")] == [(1, -9), (2, 1)]


def test_a_nodes_root_cause_candidate_is_its_earliest_signal_death_in_global_ranks():
    """What a node tells the others after a rank failed (launch/noderound.py): a peer's broken collective raised
    first (exit 1 at 60.0), the killed rank is the cause (SIGKILL at 60.2)."""
    me = NodeInfo(1, "k1", "localhost:7", "localhost", 2, "", False)
    rnd = Round(0, "r", me, (NodeInfo(0, "k0", "localhost:6", "localhost", 2, "", True), me), "localhost", 1, 0)
    events = [{"kind": "started", "pid": 20, "attempt": 0, "time": 50.0},
              {"kind": "started", "pid": 21, "attempt": 0, "time": 50.0},
              {"kind": "exited", "pid": 20, "rank": 0, "code": 1, "time": 60.0},
              {"kind": "stopped", "time": 60.2, "ranks": [0, 1], "pids": [20, 21], "codes": [1, -9],
               "reasons": ["exit 1", "SIGKILL"], "by_stop": [False, False]}]
    got = own_failure(events, rnd)
    assert (got["node"], got["signal"], got["time"]) == (1, True, 60.2)
    assert got["detail"].startswith("node 1 (localhost:7) (global ranks 2..3): rank 3 (pid 21) SIGKILL")
    assert own_failure(events[:2], rnd) is None
