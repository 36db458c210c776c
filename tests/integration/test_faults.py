"""The fault matrix (/work/shared/FAULTS.md) with real processes: every row is a test here, or a table entry.

Each process test runs under both start methods (``method``). The autouse leak check (tests/conftest.py) gives
every test P, S, F and E; the tests add what a row names beyond it: the pids of a tree that died (including ones a
CLI child started, which are not our children), a CLI child's stderr, and GPU memory (G, in the `cuda` tests at
the end, which skip without a GPU). Workers are the torch-free echo/faulty workers (they start in ~0.2 s) except
where torch.distributed matters: row 7 and the gloo group restart.

Row -> test (``[...]`` = a table entry):
   1  test_startup_crash_names_rank_and_stops_siblings[1-raise]       (+ cuda: test_cuda_memory_back[1-raise])
   2  test_startup_crash_names_rank_and_stops_siblings[2-exit3|2-segv]  (+ cuda: [2-exit3])
   3  test_tree.py::test_startup_timeout_kills_the_hung_rank            (+ cuda: [3-hang])
   4  test_spawn_of_kth_process_fails_stops_the_started_ones
   5  test_cli_sigint_during_startup_exits_130
   6  test_cli_invalid_config_exits_2_with_one_line
   7  test_dist_init_failure_is_a_bounded_startup_failure
   8  test_sigkill_one_rank_restarts_by_strategy
   9  test_exit_reason_recorded_exactly
  10  test_clean_exit_by_restart_type
  11  test_sigstopped_rank_is_declared_hung_killed_and_restarted
  12  test_sigstop_during_rpc_deadline_names_rank, test_rpc_deadline_dumps_the_busy_ranks_stack
  13  test_tree.py::test_supervisor_sigkill_takes_every_worker_and_grandchild_within_1s (idle);
      test_supervisor_sigkill_mid_call_takes_every_worker (mid-call)   (+ test_cuda.py: sigkill, GPU)
  14  test_cli_signal_stops_gracefully_with_128_plus_signal
  15  test_tree.py::test_remote_exception_carries_rank_and_traceback_and_next_call_works
  16  test_sigkill_mid_call_fails_every_pending_call (test_tree.py has the one-call, never-restart case)
  17  test_rank_dies_while_pickling
  18  test_unpicklable_arguments_fail_only_their_calls
  19-21, 37  tests/integration/test_transport.py (the transport ring)
  22  test_several_ranks_killed_at_once_one_recovery
  23  test_cuda_device_error_fails_fast_and_restarts (cuda)
  24  test_recycled_gracefully_no_call_lost
  25  test_failure_callback_raises_supervisor_keeps_working
  26  test_crashes_just_below_intensity_never_give_up
  27  test_crashes_above_intensity_give_up, test_cli_gives_up_exit_1   (+ cuda: [27-give-up])
  28  test_startup_crash_loop_backs_off_then_gives_up
  29  test_restart_of_one_group_fails_under_one_for_all
  30  test_shutdown_during_backoff_or_restart_returns_promptly
  31  test_restart_window_passes_counter_resets
  32  test_tree.py::test_sigterm_ignoring_worker_is_killed_at_the_grace_deadline
  33  test_tree.py::test_slow_worker_within_grace_is_not_killed
  34  test_ranks_exiting_during_shutdown_keep_their_reasons
  35  test_no_grandchild_survives (test_tree.py has a shorter forkserver-only version)
  36  test_call_during_shutdown_raises_clearly, test_garbage_collected_supervisor_stops_its_tree,
      test_interpreter_exit_without_shutdown_leaves_stderr_clean (test_tree.py: double shutdown, call after)
  also: test_group0_serves_while_group1_restarts (dp=2), test_group_restart_reinitialises_gloo
"""
from __future__ import annotations

import gc
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from supervisor.api import Supervisor
from supervisor.errors import RemoteError, RpcTimeout, ShutdownInProgress, StartupError, WorkerFailed
from supervisor.core.events import EventLog
from supervisor.core.states import SupervisorState
from supervisor.core.views import PolicyWindow
from tests.integration.helpers import ECHO, REPO, TreeInChild, config, fault_env, gone_within, reap_adopted
from worker.faults import crash

pytestmark = pytest.mark.timeout(120)
METHODS = ["forkserver", "spawn"]
ONE_FOR_ONE = "restart=one_for_one"


# -- helpers -----------------------------------------------------------------------------------------------------------
def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def n_ready(sup: Supervisor) -> int:
    return len(sup.events.of_kind("ready"))


def serving(sup: Supervisor) -> bool:
    return sup.serving()


def wait_recovered(sup: Supervisor, ready_before: int, ranks: int, timeout: float = 30) -> None:
    """Until ``ranks`` more ranks became READY and every live group serves again."""
    wait_until(lambda: n_ready(sup) >= ready_before + ranks and serving(sup), timeout, f"{ranks} ranks to restart")


def group_pids(sup: Supervisor, group: int) -> list[int]:
    return [row["pid"] for row in sup.status() if row["group"] == group]


def exits_of(events, pid: int) -> list[tuple]:
    return [(e["rank"], e["reason"], e["code"]) for e in events.of_kind("exited") if e["pid"] == pid]


def crash_rank(kind: str, rank: int):
    """A collective_rpc callable: group-local ``rank`` crashes the given way (every rank of a group runs a call)."""
    def fn(w):
        if w.rank == rank:
            crash(kind)
        return w.rank
    return fn


_ENV = {**os.environ, "PYTHONPATH": REPO}  # child interpreters import this checkout


class Cli:
    """`python -m supervisor overrides...` in a child process, run in ``tmp_path`` (its run dir lands there)."""

    def __init__(self, tmp_path, *overrides: str) -> None:
        self.dir = tmp_path
        self._out = open(tmp_path / "stdout.txt", "w")
        self._err = open(tmp_path / "stderr.txt", "w")
        args = [sys.executable, "-m", "supervisor", "logging.level=WARNING", *overrides]
        self.proc = subprocess.Popen(args, cwd=tmp_path, env=_ENV, stdout=self._out, stderr=self._err)
        self._seen: dict[int, psutil.Process] = {}

    def events(self, kind: str) -> list[dict]:
        out = []
        for path in glob.glob(str(self.dir / "outputs" / "*" / "*" / "events.jsonl")):
            with open(path) as f:
                out += [e for e in map(json.loads, filter(str.strip, f)) if e["kind"] == kind]
        return out

    def ready_pids(self, n: int, timeout: float = 60) -> list[int]:
        wait_until(lambda: len(self.events("ready")) >= n or self.proc.poll() is not None, timeout, f"{n} READY")
        assert self.proc.poll() is None, self.stderr()
        return [e["pid"] for e in self.events("ready")]

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        self._seen.update((p.pid, p) for p in found)
        return found

    def wait(self, timeout: float = 30) -> int:
        self.descendants()
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def stderr(self) -> str:
        return (self.dir / "stderr.txt").read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        reap_adopted(self._seen.values())
        self._out.close()
        self._err.close()


# -- start-up: rows 1, 2, 4, 7 -----------------------------------------------------------------------------------------
STARTUP_CRASHES = [  # fault on rank 1 at start-up, what the StartupError must say
    pytest.param("raise_init", "failed during start-up: RuntimeError: injected failure in init on rank 1",
                 id="1-raise"),
    pytest.param("exit_init", "exited during start-up: exit code 3", id="2-exit3"),
    pytest.param("segv_init", "exited during start-up: SIGSEGV", id="2-segv"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fault,says", STARTUP_CRASHES)
def test_startup_crash_names_rank_and_stops_siblings(fault, says, method):
    events = EventLog()
    with pytest.raises(StartupError) as err:
        Supervisor(config(*fault_env(fault, rank=1), "parallel.tp=2", method=method), events=events)
    assert err.value.rank == 1 and f"rank 1 (Worker_TP1) {says}" in str(err.value)
    if fault == "raise_init":
        assert "Traceback" in err.value.remote_traceback and "raise_init" not in err.value.remote_traceback
    started = [e["pid"] for e in events.of_kind("started")]
    assert len(started) == 2 and gone_within(started, 2.0) == []  # the healthy sibling was stopped too


def test_startup_crash_traceback_wins_when_the_exit_is_seen_first(monkeypatch):
    """Row 1's race, ordered: the supervisor sees rank 1's exit (code 71) before its StartupFailed message. Here it
    is made to, every time: the start-up wait is shown the process sentinels only, never the status pipes."""
    from supervisor.backends.local import group as group_module

    real_wait = group_module.mp_wait
    monkeypatch.setattr(group_module, "mp_wait",
                        lambda objs, timeout=None: real_wait([o for o in objs if isinstance(o, int)], timeout))
    with pytest.raises(StartupError) as err:
        Supervisor(config(*fault_env("raise_init", rank=1), "parallel.tp=2"))
    assert "rank 1 (Worker_TP1) failed during start-up: RuntimeError: injected failure in init on rank 1" \
        in str(err.value)
    assert err.value.rank == 1 and "Traceback" in err.value.remote_traceback


@pytest.mark.parametrize("method", METHODS)
def test_spawn_of_kth_process_fails_stops_the_started_ones(monkeypatch, method):
    from supervisor.backends.local import group as group_module

    real, made = group_module.WorkerProcess, []

    def third_spawn_fails(*args, **kwargs):
        if len(made) == 2:
            raise OSError(11, "injected: cannot fork the third worker")
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(group_module, "WorkerProcess", third_spawn_fails)
    with pytest.raises(OSError, match="injected: cannot fork the third worker"):
        Supervisor(config(*ECHO, "parallel.tp=4", method=method))
    assert len(made) == 2 and gone_within([w.pid for w in made], 2.0) == []


@pytest.mark.parametrize("method", METHODS)
def test_dist_init_failure_is_a_bounded_startup_failure(method):
    """Rank 0's first attempt joins a rendezvous nobody answers (2 s timeout); the retry builds a real gloo world."""
    from worker.tp_mlp import make_input, reference_forward

    cfg = config("worker.cls=worker.faults:FaultyTPWorker", "+runtime.env.RV_FAULT=dist_fail_init",
                 "+runtime.env.RV_FAULT_RANK=0", "+runtime.env.RV_FAULT_ATTEMPTS=0", "parallel.tp=2",
                 "workload.hidden=64", ONE_FOR_ONE, method=method)
    t = time.monotonic()
    with Supervisor(cfg) as sup:
        assert time.monotonic() - t < 45  # bounded: the 2 s rendezvous timeout plus two start-ups
        (restart,) = sup.events.of_kind("restarting")
        assert "rank 0 (Worker_TP0) failed during start-up" in restart["reason"]
        assert "start-up restart 1/3" in restart["reason"]  # counted in the start-up budget ...
        assert sup.policy_window() == PolicyWindow(startup=1, runtime=0)  # ... not the run-time one
        x = make_input(cfg.workload, 3)
        assert float((sup.execute_model(x, timeout=60) - reference_forward(cfg.workload, x)).abs().max()) < 1e-4


# -- the CLI: rows 5, 6, 14, 27 ----------------------------------------------------------------------------------------
def _workers_of(cli: Cli) -> list[psutil.Process]:
    out = []
    for p in cli.descendants():
        try:
            if "Worker_" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("method", METHODS)
def test_cli_sigint_during_startup_exits_130(tmp_path, method):
    cli = Cli(tmp_path, *fault_env("hang_init", rank=1), "workload=serve", "parallel.tp=2",
              f"runtime.start_method={method}")
    try:
        wait_until(lambda: len(_workers_of(cli)) == 2, 60, "both workers to start")
        everyone = cli.descendants()
        cli.proc.send_signal(signal.SIGINT)
        assert cli.wait(20) == 130, cli.stderr()[-3000:]
    finally:
        cli.close()
    assert gone_within([p.pid for p in everyone], 2.0) == []
    assert "leaked" not in cli.stderr() and "Traceback" not in cli.stderr(), cli.stderr()[-3000:]


@pytest.mark.parametrize("override,key", [("parallel.tp=0", "parallel.tp"), ("restart=sometimes", "restart"),
                                          ("worker.cls=nowhere:Nothing", "worker.cls")])
def test_cli_invalid_config_exits_2_with_one_line(tmp_path, override, key):
    cli = Cli(tmp_path, override)
    assert cli.wait(60) == 2
    lines = cli.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), lines
    assert not (tmp_path / "outputs").exists()  # the run dir comes before anything is spawned: nothing was


# Each signal once, and one under both methods: a CLI under forkserver pays for its own torch-preloading server.
SIGNALS = [pytest.param(signal.SIGTERM, 143, "forkserver", id="SIGTERM-forkserver"),
           pytest.param(signal.SIGTERM, 143, "spawn", id="SIGTERM-spawn"),
           pytest.param(signal.SIGINT, 130, "spawn", id="SIGINT-spawn"),
           pytest.param(signal.SIGHUP, 129, "spawn", id="SIGHUP-spawn")]


@pytest.mark.parametrize("sig,code,method", SIGNALS)
def test_cli_signal_stops_gracefully_with_128_plus_signal(tmp_path, sig, code, method):
    cli = Cli(tmp_path, "workload=serve", "worker=echo", "parallel.tp=2", f"runtime.start_method={method}")
    try:
        pids = cli.ready_pids(2)
        cli.proc.send_signal(sig)
        assert cli.wait(30) == code, cli.stderr()[-3000:]
    finally:
        cli.close()
    assert gone_within(pids, 2.0) == []
    assert [e["reasons"] for e in cli.events("stopped")] == [["exit 0", "exit 0"]]  # graceful: nobody killed
    assert "leaked" not in cli.stderr() and "Traceback" not in cli.stderr(), cli.stderr()[-3000:]


def test_cli_gives_up_exit_1(tmp_path, method="spawn"):
    """The exit code only (test_crashes_above_intensity_give_up covers the give-up under both methods)."""
    cli = Cli(tmp_path, "workload=serve", "worker=echo", "workload.status_interval_s=0.2", ONE_FOR_ONE,
              "restart.intensity=1", f"runtime.start_method={method}")
    try:
        first = cli.ready_pids(1)
        os.kill(first[0], signal.SIGKILL)
        second = cli.ready_pids(2)
        os.kill(second[1], signal.SIGKILL)  # the second crash in the window: over intensity 1
        assert cli.wait(30) == 1, cli.stderr()[-3000:]
    finally:
        cli.close()
    assert gone_within(second, 2.0) == []
    assert [e["restarts"] for e in cli.events("gave_up")] == [1]
    assert re.search(r"^error: group 0 failed \(.*SIGKILL", cli.stderr(), re.M), cli.stderr()[-2000:]


# -- idle: rows 8-11 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all"])
def test_sigkill_one_rank_restarts_by_strategy(strategy, method):
    cfg = config(*ECHO, "parallel.dp=2", "parallel.tp=2", f"restart={strategy}", method=method)
    with Supervisor(cfg) as sup:
        before = {g: group_pids(sup, g) for g in (0, 1)}
        ready, victim = n_ready(sup), before[1][1]  # global rank 3
        os.kill(victim, signal.SIGKILL)
        wait_recovered(sup, ready, 2 if strategy == "one_for_one" else 4)
        after = {g: group_pids(sup, g) for g in (0, 1)}
        assert not set(after[1]) & set(before[1])
        if strategy == "one_for_one":
            assert after[0] == before[0]  # the other replica was not touched
        else:
            assert not set(after[0]) & set(before[0])
        assert exits_of(sup.events, victim) == [(3, "SIGKILL", -9)]
        assert sup.collective_rpc("echo", args=(8,), timeout=10) == [8] * 4
        assert gone_within([p for g in before.values() for p in g if p not in after[0]], 2.0) == []


EXITS = [  # how rank 1 ends, the exited event's reason and code (multiprocessing's convention: -signal)
    pytest.param("segv", "SIGSEGV", -11, id="SIGSEGV"),
    pytest.param("abort", "SIGABRT", -6, id="SIGABRT"),
    pytest.param("exit0", "exit 0", 0, id="exit0"),
    pytest.param("exit42", "exit 42", 42, id="exit42"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,reason,code", EXITS)
def test_exit_reason_recorded_exactly(kind, reason, code, method):
    with Supervisor(config(*ECHO, "parallel.tp=2", method=method)) as sup:  # restart=never: the run stops
        victim = sup.pids()[1]
        with pytest.raises(WorkerFailed, match=f"rank 1 .*pid {victim}") as err:
            sup.collective_rpc(crash_rank(kind, 1), timeout=10)
        assert err.value.ranks == (1,)
        assert sup.wait(10) and sup.gave_up
    assert exits_of(sup.events, victim) == [(1, reason, code)]


RESTART_TYPES = [  # restart_type, how group 1 ends, what the policy does with it
    pytest.param("permanent", "exit0", "restarted", id="permanent-clean"),
    pytest.param("transient", "exit0", "not restarted", id="transient-clean"),
    pytest.param("transient", "exit42", "restarted", id="transient-abnormal"),
    pytest.param("temporary", "exit0", "removed", id="temporary-clean"),
    pytest.param("temporary", "exit42", "removed", id="temporary-abnormal"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("restart_type,kind,expect", RESTART_TYPES)
def test_clean_exit_by_restart_type(restart_type, kind, expect, method):
    """dp=2, so the tree keeps serving from group 0 whatever happens to group 1. In this product a transient
    child that is not restarted and a removed temporary one look the same: both leave the live groups."""
    cfg = config(*ECHO, "parallel.dp=2", ONE_FOR_ONE, f"restart.restart_type={restart_type}", method=method)
    with Supervisor(cfg) as sup:
        ready, victim = n_ready(sup), group_pids(sup, 1)[0]
        with pytest.raises(WorkerFailed):
            sup.collective_rpc(crash_rank(kind, 0), group=1, timeout=10)
        if expect == "restarted":
            wait_recovered(sup, ready, 1)
            assert sup.live_groups == [0, 1] and group_pids(sup, 1) != [victim]
        else:
            wait_until(lambda: sup.live_groups == [0], 10, "group 1 to leave the live groups")
            assert n_ready(sup) == ready and not sup.events.of_kind("restarting")
        assert sup.collective_rpc("echo", args=(1,), timeout=10) == [1] * len(sup.live_groups)
        assert sup.state is SupervisorState.RUNNING
    assert exits_of(sup.events, victim) == [(1, "exit 0" if kind == "exit0" else "exit 42", int(kind[4:]))]


@pytest.mark.parametrize("method", METHODS)
def test_sigstopped_rank_is_declared_hung_killed_and_restarted(method):
    timeout_s = 1.0
    cfg = config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, "worker.heartbeat_interval_s=0.1",
                 f"worker.heartbeat_timeout_s={timeout_s}", method=method)
    with Supervisor(cfg) as sup:
        ready, victim = n_ready(sup), sup.pids()[1]
        t = time.monotonic()
        os.kill(victim, signal.SIGSTOP)  # alive, but frozen: only the heartbeat can tell
        wait_until(lambda: sup.events.of_kind("hung"), 10, "the hung event")
        assert 0.9 * timeout_s <= time.monotonic() - t <= 3 * timeout_s + 1.0
        assert [(e["rank"], e["pid"]) for e in sup.events.of_kind("hung")][0] == (1, victim)
        wait_recovered(sup, ready, 2)
        assert exits_of(sup.events, victim) == [(1, "hung", -9)]
        assert sup.collective_rpc("echo", args=(2,), timeout=10) == [2, 2]


# -- mid-call: rows 12, 13, 16, 17, 18, 22, 25 -------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_sigstop_during_rpc_deadline_names_rank(method):
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, method=method)) as sup:
        ready, victim = n_ready(sup), sup.pids()[1]
        pending = sup.collective_rpc("sleep", args=(0.2,), deadline=1.5, non_block=True)
        os.kill(victim, signal.SIGSTOP)
        with pytest.raises(RpcTimeout, match=r"ranks \[1\] missed the call deadline of 1.5 s") as err:
            pending.result()
        assert err.value.ranks == (1,)
        wait_recovered(sup, ready, 2)  # declared hung, killed, restarted by the policy
        assert (1, victim) in [(e["rank"], e["pid"]) for e in sup.events.of_kind("hung")]
        assert exits_of(sup.events, victim) == [(1, "hung", -9)]
        assert sup.collective_rpc("echo", args=(3,), timeout=10) == [3, 3]


def test_rpc_deadline_dumps_the_busy_ranks_stack(capfd):
    """A rank that is busy (not stopped) can dump its stack before it is killed. Under spawn its stderr is ours."""
    def busy_rank_1(w):
        if w.rank == 1:
            time.sleep(60)
        return w.rank

    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, method="spawn")) as sup:
        ready = n_ready(sup)
        with pytest.raises(RpcTimeout, match=r"\[1\]"):
            sup.collective_rpc(busy_rank_1, deadline=1.0)
        wait_recovered(sup, ready, 2)
    err = capfd.readouterr().err
    assert "most recent call first" in err and "busy_rank_1" in err, err[-3000:]


@pytest.mark.parametrize("method", METHODS)
def test_supervisor_sigkill_mid_call_takes_every_worker(method):
    tree = TreeInChild(*ECHO, "parallel.tp=2", f"runtime.start_method={method}", calls=True)
    try:
        time.sleep(0.3)  # calls are flowing
        tree.kill(signal.SIGKILL)
        assert gone_within(tree.pids, 1.0) == []
    finally:
        tree.wait()


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_call_fails_every_pending_call(method):
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, method=method)) as sup:
        ready, victim = n_ready(sup), sup.pids()[1]
        pending = [sup.collective_rpc("sleep", args=(0.5,), non_block=True) for _ in range(4)]
        time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        for fut in pending:
            with pytest.raises(WorkerFailed, match=rf"rank 1 .*pid {victim}.* SIGKILL"):
                fut.result(timeout=10)
        assert time.monotonic() - t < 5  # failed at once, not at a deadline
        wait_recovered(sup, ready, 2)
        assert sup.collective_rpc("echo", args=(4,), timeout=10) == [4, 4]


def _killed_in_a_collective(rank: int):
    """A collective_rpc callable: ``rank`` is SIGKILLed on entry; the others all_reduce with it over gloo and
    get the collective's own error ("Connection reset by peer", "Connection closed by peer")."""
    def fn(w):
        import torch
        import torch.distributed as dist

        if w.rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        t = torch.ones(1)
        dist.all_reduce(t)
        return float(t)
    return fn


@pytest.fixture
def late_monitor(monkeypatch):
    """The monitor reports every exit 1 s late: whatever else tells of a death (a survivor's error, the transport's
    own liveness check) comes first. The error a caller gets must still be the monitor's: which rank, how it ended."""
    from supervisor.backends.local import monitor as monitor_module

    real, delay = monitor_module.Monitor._report_exits, {"s": 1.0}  # a test may ask for longer

    def late(self, exited, watched):
        if exited:
            time.sleep(delay["s"])
        real(self, exited, watched)

    monkeypatch.setattr(monitor_module.Monitor, "_report_exits", late)
    return delay


def test_a_rank_killed_in_a_collective_is_named_not_the_survivors_error(late_monitor):
    """restart=never, gloo: rank 1 dies inside a call while rank 0, the rank that answers, is in an all_reduce
    with it. Rank 0 answers with gloo's error ("Connection reset by peer") before the death is confirmed; the
    caller is told that rank 1 died, and how, with rank 0's error as the cause."""
    with Supervisor(config("parallel.tp=2", "workload.hidden=64")) as sup:
        victim = sup.pids()[1]
        with pytest.raises(WorkerFailed, match=rf"rank 1 .*pid {victim}.* SIGKILL") as err:
            sup.collective_rpc(_killed_in_a_collective(1), unique_reply_rank=0, timeout=60)
        assert err.value.ranks == (1,)
        assert isinstance(err.value.__cause__, RemoteError) and err.value.__cause__.rank == 0
        assert sup.wait(20) and sup.gave_up


def test_a_rank_that_dies_in_a_call_is_named_with_its_exit_not_its_closed_queue(late_monitor):
    """The reply ring of a dead rank reports its writer gone (the transport checks 4 times a second) before the
    monitor has confirmed the death: the call still fails with the monitor's words, the rank, pid and signal."""
    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        victim = sup.pids()[1]
        with pytest.raises(WorkerFailed, match=rf"rank 1 .*pid {victim}.* SIGSEGV") as err:
            sup.collective_rpc(crash_rank("segv", 1), timeout=30)
        assert err.value.ranks == (1,)
        assert sup.wait(20) and sup.gave_up


def _own_error_then(rank: int, others_s: float):
    """``rank`` raises at once; the others answer after ``others_s``."""
    def fn(w):
        if w.rank == rank:
            raise ValueError(f"rank {w.rank}'s own error")
        time.sleep(others_s)
        return w.rank
    return fn


def test_a_rank_that_answers_its_own_error_and_then_leaves_is_answered_by_its_error(late_monitor):
    """Rank 0 answers the first call with its own error and leaves in the second (exit 3), queued right behind it;
    the first call is decided when rank 1 answers it, 1 s later, with rank 0 gone and its exit not yet reported
    (3 s late). Rank 0 is not its own peer: the first call's answer is its error, the second's its exit."""
    late_monitor["s"] = 3.0
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE)) as sup:
        first = sup.collective_rpc(_own_error_then(0, 1.0), timeout=30, non_block=True)
        second = sup.collective_rpc(crash_rank("exit", 0), timeout=30, non_block=True)
        with pytest.raises(RemoteError, match="rank 0's own error") as err:
            first.result()
        assert err.value.rank == 0
        with pytest.raises(WorkerFailed, match=r"rank 0 .* exit code 3"):
            second.result()


class _ExitWhenUnpickled:
    """An argument whose unpickling, in the worker, ends the process (exit code 9)."""

    def __reduce__(self):
        return os._exit, (9,)


def _result_that_exits_when_pickled(rank: int):
    def fn(w):
        class Bomb:
            def __reduce__(self):
                os._exit(8)
        return Bomb() if w.rank == rank else w.rank
    return fn


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("when", ["arguments", "result"])
def test_rank_dies_while_pickling(when, method):
    with Supervisor(config(*ECHO, "parallel.tp=2", method=method)) as sup:
        pids = sup.pids()
        if when == "arguments":  # every rank unpickles the broadcast request: both die
            with pytest.raises(WorkerFailed, match="exit code 9"):
                sup.collective_rpc("echo", args=(_ExitWhenUnpickled(),), timeout=10)
        else:
            with pytest.raises(WorkerFailed, match=f"rank 1 .*pid {pids[1]}.* exit code 8"):
                sup.collective_rpc(_result_that_exits_when_pickled(1), timeout=10)
        assert sup.wait(10)
    assert gone_within(pids, 1.0) == []


@pytest.mark.parametrize("method", METHODS)
def test_unpicklable_arguments_fail_only_their_calls(method):
    lock = threading.Lock()
    with Supervisor(config(*ECHO, "parallel.tp=2", method=method)) as sup:
        for _ in range(100):
            with pytest.raises(TypeError):
                sup.collective_rpc("echo", args=(lock,), timeout=10)
        for i in range(100):
            assert sup.collective_rpc("echo", args=(i,), timeout=10) == [i, i]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all"])
def test_several_ranks_killed_at_once_one_recovery(strategy, method):
    cfg = config(*ECHO, "parallel.dp=2", "parallel.tp=2", f"restart={strategy}", method=method)
    with Supervisor(cfg) as sup:
        ready, pids = n_ready(sup), sup.pids()
        pending = sup.collective_rpc("sleep", args=(5,), non_block=True)
        time.sleep(0.1)
        for pid in pids[1:]:  # ranks 1, 2, 3: both groups broken at once
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerFailed):
            pending.result(timeout=10)
        wait_recovered(sup, ready, 4)
        time.sleep(0.3)  # a late, second recovery would show up here
        restarting = sup.events.of_kind("restarting")
        assert sorted(e["group"] for e in restarting) == [0, 1]  # each group restarted once ...
        assert [e["restarts"] for e in restarting] == [1, 1]  # ... by one decision, charged once
        assert sup.policy_window().runtime == 1 and n_ready(sup) == ready + 4
        assert sup.collective_rpc("echo", args=(5,), timeout=10) == [5] * 4


@pytest.mark.parametrize("method", METHODS)
def test_failure_callback_raises_supervisor_keeps_working(method):
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, method=method)) as sup:
        seen = []
        sup.register_failure_callback(lambda: 1 / 0)
        sup.register_failure_callback(seen.append)  # takes the ChildExit list
        ready = n_ready(sup)
        pending = sup.collective_rpc("sleep", args=(5,), non_block=True)
        os.kill(sup.pids()[0], signal.SIGKILL)
        with pytest.raises(WorkerFailed):
            pending.result(timeout=10)
        wait_recovered(sup, ready, 2)
        assert [e["error"] for e in sup.events.of_kind("callback_failed")] == ["ZeroDivisionError: division by zero"]
        assert [[e.child for e in exits] for exits in seen] == [[0]]  # the next callback still ran
        assert sup.collective_rpc("echo", args=(6,), timeout=10) == [6, 6]


# -- recycling: row 24 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cap", ["worker.max_calls=3", "worker.max_rss_mb=16"])
def test_recycled_gracefully_no_call_lost(cap, method):
    """Two callers call until a recycle has happened under them (the manager takes the over-budget report when it
    gets to it: after how many calls is the machine's business) and each has had a call answered by the new
    workers. Every call is answered once, by its own value; the recycle is not a failure (no `exited` event)."""
    with Supervisor(config(*ECHO, "parallel.tp=2", cap, method=method)) as sup:
        first, results, errors = sup.pids(), [], []

        def caller(k: int) -> None:
            deadline, i, after_recycle = time.monotonic() + 60, 0, False
            while i < 6 or not after_recycle:
                if time.monotonic() > deadline:
                    errors.append("no recycle within 60 s")
                    return
                recycled = bool(sup.events.of_kind("recycled"))  # ... before this call was sent
                try:
                    results.append(((k, i), sup.collective_rpc("echo", args=((k, i),), timeout=30)))
                except Exception as exc:  # a lost call
                    errors.append(repr(exc))
                    return
                i, after_recycle = i + 1, recycled

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert all(value == [key] * 2 for key, value in results)
        calls = [sum(key[0] == k for key, _ in results) for k in range(2)]
        assert sorted(key for key, _ in results) == [(k, i) for k in range(2) for i in range(calls[k])]
        assert sup.events.of_kind("recycled") and not set(sup.pids()) & set(first)
        assert not sup.events.of_kind("exited") and sup.state is SupervisorState.RUNNING


# -- the restart budget: rows 26-31 ------------------------------------------------------------------------------------
def _kill_and_recover(sup: Supervisor) -> None:
    ready = n_ready(sup)
    os.kill(sup.pids()[0], signal.SIGKILL)
    wait_recovered(sup, ready, 1)


@pytest.mark.parametrize("method", METHODS)
def test_crashes_just_below_intensity_never_give_up(method):
    """Bursts of exactly `intensity` crashes, each burst once the last one has left the window."""
    period = 1.5
    cfg = config(*ECHO, ONE_FOR_ONE, "restart.intensity=2", f"restart.period_s={period}", method=method)
    with Supervisor(cfg) as sup:
        for _ in range(3):
            for _ in range(2):
                _kill_and_recover(sup)
            last = sup.events.of_kind("restarting")[-1]["time"]
            time.sleep(max(0.0, last + period + 0.2 - time.time()))
        restarts = [e["restarts"] for e in sup.events.of_kind("restarting")]
        assert len(restarts) == 6 and max(restarts) <= 2 and 2 in restarts
        assert not sup.gave_up and sup.state is SupervisorState.RUNNING


@pytest.mark.parametrize("method", METHODS)
def test_crashes_above_intensity_give_up(method):
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, "restart.intensity=2", method=method)) as sup:
        for _ in range(2):
            _kill_and_recover(sup)
        os.kill(sup.pids()[0], signal.SIGKILL)
        assert sup.wait(20) and sup.gave_up
        assert [e["restarts"] for e in sup.events.of_kind("restarting")] == [1, 2]
        (gave_up,) = sup.events.of_kind("gave_up")
        assert gave_up["restarts"] == 2 and "would exceed intensity 2" in gave_up["reason"]
        with pytest.raises(WorkerFailed, match="gave up"):
            sup.collective_rpc("echo", args=(1,), timeout=5)
    assert gone_within([e["pid"] for e in sup.events.of_kind("ready")], 2.0) == []


@pytest.mark.parametrize("method", METHODS)
def test_startup_crash_loop_backs_off_then_gives_up(method):
    events = EventLog()
    cfg = config(*fault_env("exit_init"), ONE_FOR_ONE, "restart.startup_intensity=3", "restart.backoff_initial_s=0.1",
                 "restart.backoff_factor=2", "restart.backoff_max_s=0.3", method=method)
    with pytest.raises(StartupError, match="exit code 3"):
        Supervisor(cfg, events=events)
    assert [e["backoff_s"] for e in events.of_kind("restarting")] == [0.1, 0.2, 0.3]
    starts = [e["time"] for e in events.of_kind("started")]  # emitted as each attempt ends
    assert len(starts) == 4
    for gap, backoff in zip([b - a for a, b in zip(starts, starts[1:])], [0.1, 0.2, 0.3]):
        assert gap >= backoff * 0.9
    (gave_up,) = events.of_kind("gave_up")
    assert gave_up["restarts"] == 3 and "start-up restarts" in gave_up["reason"]
    assert gone_within([e["pid"] for e in events.of_kind("started")], 1.0) == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("startup_intensity,outcome", [(3, "retried"), (1, "gave up")])
def test_restart_of_one_group_fails_under_one_for_all(startup_intensity, outcome, method):
    """Every group's second start fails: group 0 fails first (a start-up restart of all), then restarts fine,
    then group 1 fails, so the freshly restarted group 0 must be stopped again (retry) or the run ends."""
    cfg = config(*fault_env("exit_init", attempts="1"), "parallel.dp=2", "restart=one_for_all",
                 f"restart.startup_intensity={startup_intensity}", method=method)
    sup = Supervisor(cfg)
    try:
        os.kill(sup.pids()[0], signal.SIGKILL)
        if outcome == "retried":
            wait_until(lambda: [g.attempts for g in sup.groups()] == [4, 3] and serving(sup), 30, "the third restart of group 0")
        else:
            assert sup.wait(30) and sup.gave_up
        restarted = [e["pid"] for e in sup.events.of_kind("ready") if e["group"] == 0 and e["attempt"] == 2]
        assert len(restarted) == 1 and gone_within(restarted, 1.0) == []  # already-restarted sibling stopped
        startup = [e for e in sup.events.of_kind("restarting") if "start-up restart" in e["reason"]]
        assert len(startup) == (4 if outcome == "retried" else 2)  # two decisions x two groups
    finally:
        sup.shutdown()
    assert (sup.error is None) == (outcome == "retried")  # a recovered start-up failure is not an error


def _kill_then_wait(sup: Supervisor, event: str) -> None:
    os.kill(sup.pids()[0], signal.SIGKILL)
    wait_until(lambda: sup.events.of_kind(event), 10, f"a {event} event")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("when", ["backoff", "restart"])
def test_shutdown_during_backoff_or_restart_returns_promptly(when, method):
    if when == "backoff":
        extra = (*ECHO, "restart.backoff_initial_s=30", "restart.backoff_max_s=30")
    else:  # the restart hangs in init until the 30 s start-up timeout
        extra = (*fault_env("hang_init", attempts="1"), "runtime.startup_timeout_s=30")
    sup = Supervisor(config(*extra, ONE_FOR_ONE, method=method))
    try:
        _kill_then_wait(sup, "restarting")
        if when == "restart":
            wait_until(lambda: sup.groups()[0].attempts == 2, 10, "the restart to begin")
            time.sleep(0.3)  # well inside the hanging start-up
    finally:
        t = time.monotonic()
        sup.shutdown()
    assert time.monotonic() - t < 3.0  # nominal: well under a second
    spawned = len(sup.events.of_kind("started"))
    time.sleep(0.3)
    assert len(sup.events.of_kind("started")) == spawned and sup.state is SupervisorState.STOPPED
    assert gone_within([e["pid"] for e in sup.events.of_kind("started")], 1.0) == []


@pytest.mark.parametrize("method", METHODS)
def test_restart_window_passes_counter_resets(method):
    period = 1.0
    cfg = config(*ECHO, ONE_FOR_ONE, "restart.intensity=1", f"restart.period_s={period}", method=method)
    with Supervisor(cfg) as sup:
        _kill_and_recover(sup)
        time.sleep(period + 0.2)
        _kill_and_recover(sup)  # a second crash in one window would exceed intensity 1
        assert [e["restarts"] for e in sup.events.of_kind("restarting")] == [1, 1]
        assert not sup.gave_up


# -- shutdown: rows 30, 34, 35, 36 -------------------------------------------------------------------------------------
def _exit_by_itself_during_shutdown(code: int, after_s: float):
    """Rank 1 stops listening to SIGTERM and will exit with ``code`` ``after_s`` seconds from now."""
    def fn(w):
        if w.rank == 1:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(target=lambda: (time.sleep(after_s), os._exit(code)), daemon=True).start()
        return w.rank
    return fn


def _busy(rank: int, seconds: float):
    def fn(w):
        if w.rank == rank:
            time.sleep(seconds)
        return w.rank
    return fn


@pytest.mark.parametrize("method", METHODS)
def test_ranks_exiting_during_shutdown_keep_their_reasons(method):
    cfg = config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, "shutdown.grace_s=5", method=method)
    sup = Supervisor(cfg)
    try:
        sup.collective_rpc(_exit_by_itself_during_shutdown(42, 0.5), timeout=10)
        sup.collective_rpc(_busy(1, 30), non_block=True)  # rank 1 will not see the stop request
        time.sleep(0.1)
    finally:
        t = time.monotonic()
        sup.shutdown()
    assert time.monotonic() - t < 3.0  # done when rank 1 exits (~0.5 s), long before the 5 s grace
    assert [e["reasons"] for e in sup.events.of_kind("stopped")] == [["exit 0", "exit 42"]]
    assert not sup.events.of_kind("restarting") and n_ready(sup) == 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("when", ["shutdown", "rank killed"])
def test_no_grandchild_survives(when, method):
    cfg = config(*fault_env("grandchild", rank=0), "parallel.tp=2", ONE_FOR_ONE, method=method)
    with Supervisor(cfg) as sup:
        worker = sup.pids()[0]
        kids = sup.collective_rpc("children", unique_reply_rank=0, timeout=10)
        assert len(kids) == 2 and os.getsid(kids[1]) != os.getsid(worker)  # one of them detached (setsid)
        if when == "rank killed":
            ready = n_ready(sup)
            os.kill(worker, signal.SIGKILL)  # orphans its grandchildren
            assert gone_within(kids, 3.0) == []
            wait_recovered(sup, ready, 2)
            kids = sup.collective_rpc("children", unique_reply_rank=0, timeout=10)
    assert gone_within(kids, 1.0) == []


@pytest.mark.parametrize("method", METHODS)
def test_call_during_shutdown_raises_clearly(method):
    sup = Supervisor(config(*fault_env("slow_stop", arg="1.0"), "parallel.tp=2", method=method))
    pending = sup.collective_rpc(_busy(0, 30), non_block=True)
    stoppers = [threading.Thread(target=sup.shutdown) for _ in range(2)]  # two at once: idempotent
    for t in stoppers:
        t.start()
    try:
        wait_until(lambda: sup.stopping, 5, "the shutdown to begin")
        t0 = time.monotonic()
        with pytest.raises(ShutdownInProgress, match="echo: the supervisor is shutting down"):
            sup.collective_rpc("echo", args=(1,), timeout=10)
        with pytest.raises(WorkerFailed, match="shutting down"):
            pending.result(timeout=10)
        assert time.monotonic() - t0 < 1.0  # both at once, not at the end of the slow stop
    finally:
        for t in stoppers:
            t.join(20)
    assert not any(t.is_alive() for t in stoppers) and sup.state is SupervisorState.STOPPED
    with pytest.raises(ShutdownInProgress, match="echo: the supervisor has shut down"):  # no longer "shutting down"
        sup.collective_rpc("echo", args=(1,), timeout=10)
    sup.shutdown()


@pytest.mark.parametrize("method", METHODS)
def test_garbage_collected_supervisor_stops_its_tree(method):
    sup = Supervisor(config(*ECHO, "parallel.tp=2", method=method))
    pids, finished = sup.pids(), sup.finished
    del sup
    gc.collect()
    assert finished.wait(10)
    assert gone_within(pids, 1.0) == []


_WITHOUT_SHUTDOWN = """
import sys
from loguru import logger
from supervisor.api import Supervisor
from tests.integration.helpers import ECHO, config
if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    sup = Supervisor(config(*ECHO, "parallel.tp=2", method={method!r}))
    print(*sup.pids(), flush=True)
    {drop}
"""


@pytest.mark.parametrize("drop,method", [("kept", "spawn"), ("dropped", "spawn"), ("dropped", "forkserver")])
def test_interpreter_exit_without_shutdown_leaves_stderr_clean(tmp_path, drop, method):
    script = tmp_path / "no_shutdown.py"
    script.write_text(_WITHOUT_SHUTDOWN.format(method=method, drop="del sup" if drop == "dropped" else ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert gone_within([int(p) for p in proc.stdout.split()], 2.0) == []
    assert proc.stderr == "", proc.stderr[-3000:]


# -- dp groups and gloo ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_group0_serves_while_group1_restarts(method):
    cfg = config(*ECHO, "parallel.dp=2", "parallel.tp=2", ONE_FOR_ONE, "restart.backoff_initial_s=0.5",
                 method=method)
    with Supervisor(cfg) as sup:
        ready = n_ready(sup)
        os.kill(group_pids(sup, 1)[0], signal.SIGKILL)
        wait_until(lambda: not sup.serving(1), 5, "group 1 to go down")
        n = 0
        while not (n_ready(sup) >= ready + 2 and serving(sup)):
            assert sup.execute_model(n, group=0, timeout=5) == (0, (n,), {})
            assert sup.collective_rpc("echo", args=(n,), group=0, timeout=5) == [n, n]
            n += 1
        assert n >= 5  # the calls really overlapped the restart (0.5 s of backoff alone)


def test_group_restart_reinitialises_gloo(method="forkserver"):
    """forkserver only: spawn changes nothing in the restart but the seconds to import torch (row 7 has spawn)."""
    from worker.tp_mlp import make_input, reference_forward

    cfg = config("parallel.tp=2", "workload.hidden=64", ONE_FOR_ONE, method=method)
    with Supervisor(cfg) as sup:
        x = make_input(cfg.workload, 1)
        ready = n_ready(sup)
        os.kill(sup.pids()[1], signal.SIGKILL)
        wait_recovered(sup, ready, 2, timeout=60)
        assert float((sup.execute_model(x, timeout=60) - reference_forward(cfg.workload, x)).abs().max()) < 1e-4


# -- GPU: rows 23 and the G checks -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu():
    """Skip without CUDA (asked at run time, not import). Module scope: the driver and NVML open descriptors once,
    before the per-test leak baseline; they are the measuring tool's, not the product's."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from supervisor import gpu
    from supervisor.gpu_health import GpuHealth

    gpu.used_bytes(0), gpu.memory_by_pid()  # opens NVML and the device node
    GpuHealth().readings()  # the health counters' reads (nvidia-ml-py, where installed), which status() makes
    return gpu


def _gpu_freed(gpu, pids, baseline: int, timeout: float = 10.0) -> None:
    """G: none of ``pids`` holds GPU memory, and the device's memory in use is back near ``baseline``."""
    wait_until(lambda: not set(pids) & set(gpu.memory_by_pid()), timeout, "the workers to leave the GPU")
    wait_until(lambda: gpu.used_bytes(0) <= baseline + (256 << 20), timeout, "GPU memory back to baseline")


def _device_error(w):
    """A sticky CUDA error: a device-side assert (out-of-bounds index) leaves this rank's context unusable."""
    import torch

    x = torch.zeros(4, device=w.device)
    return x[torch.tensor([1 << 20], device=w.device)].sum().item()


@pytest.mark.cuda
def test_cuda_device_error_fails_fast_and_restarts(gpu):
    from supervisor.errors import RemoteError

    baseline = gpu.used_bytes(0)
    cfg = config("device=cuda", "worker.cls=worker.faults:FaultyTPWorker", ONE_FOR_ONE, method="spawn")
    with Supervisor(cfg) as sup:
        ready, victim = n_ready(sup), sup.pids()[0]
        t = time.monotonic()
        bad = sup.collective_rpc(_device_error, timeout=60, non_block=True)
        queued = sup.collective_rpc("check_health", timeout=60, non_block=True)
        for call in (bad, queued):  # the error itself, or the exit that follows it, whichever is seen first
            with pytest.raises((RemoteError, WorkerFailed), match=r"rank 0"):
                call.result()
        assert time.monotonic() - t < 30  # fast: not at the calls' 60 s deadline
        wait_recovered(sup, ready, 1, timeout=120)  # the policy restarted the rank with a fresh context
        assert exits_of(sup.events, victim) == [(0, "exit 73", 73)]
        from worker.tp_mlp import make_input

        assert sup.execute_model(make_input(cfg.workload, 0), timeout=60) is not None
    _gpu_freed(gpu, [victim], baseline)


CUDA_FAULTS = [  # (row, overrides, what happens) with a CUDA context and the model on the GPU when it strikes
    pytest.param(("+runtime.env.RV_FAULT=raise_init",), "startup", id="1-raise"),
    pytest.param(("+runtime.env.RV_FAULT=exit_init",), "startup", id="2-exit3"),
    pytest.param(("+runtime.env.RV_FAULT=hang_init", "runtime.startup_timeout_s=20"), "startup", id="3-hang"),
    pytest.param((ONE_FOR_ONE, "restart.intensity=0"), "give up", id="27-give-up"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("overrides,what", CUDA_FAULTS)
def test_cuda_memory_back(gpu, overrides, what):
    baseline, events = gpu.used_bytes(0), EventLog()
    cfg = config("device=cuda", "worker.cls=worker.faults:FaultyTPWorker", *overrides, method="spawn")
    if what == "startup":
        with pytest.raises(StartupError):
            Supervisor(cfg, events=events)
    else:
        with Supervisor(cfg, events=events) as sup:
            os.kill(sup.pids()[0], signal.SIGKILL)
            assert sup.wait(30) and sup.gave_up
    pids = [e["pid"] for e in events.of_kind("started")]
    assert pids and gone_within(pids, 2.0) == []
    _gpu_freed(gpu, pids, baseline)
