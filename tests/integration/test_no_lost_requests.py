"""No lost requests (issue 17): retryable calls survive a rank's death, shutdown drains calls in flight, a rolling
restart fails no call. Fault matrix rows 45 and 46 (/work/shared/FAULTS.md), with real processes.

Row -> test:
  45  test_retryable_step_moves_to_the_live_replica_dp2 (dp=2: answered by the other replica),
      test_retryable_call_waits_for_its_group_dp1 (dp=1: answered by the restarted group),
      test_retry_gives_one_clear_error_when_attempts_run_out
  46  test_drain_completes_calls_in_flight_and_refuses_new_ones (API: shutdown(drain=...)),
      test_cli_sigterm_drains_then_exits_143 (the CLI: first SIGTERM drains)
  also: test_rolling_restart_under_load_fails_no_call

Workers are the torch-free faulty echo worker; ``slow_execute`` makes each step take a while, so a kill or a SIGTERM
lands mid-call. Each test runs the same load with retries off (or no drain) beside it where that shows the
difference, so a test that cannot fail would be seen failing there.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from supervisor.api import Supervisor
from supervisor.errors import ShutdownInProgress, WorkerFailed
from tests.integration.helpers import ECHO, config, fault_env
from tests.integration.test_faults import Cli

pytestmark = pytest.mark.timeout(120)
STEP_S = 0.3  # one slow step: long enough that a kill lands inside it
DP2 = ("parallel.dp=2", "parallel.tp=2", "restart=one_for_one")


def slow_steps(step_s: float = STEP_S) -> tuple[str, ...]:
    return fault_env("slow_execute", arg=str(step_s))


def group_pids(sup: Supervisor, group: int) -> list[int]:
    return [row["pid"] for row in sup.status() if row["group"] == group]


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.01)


class Load:
    """Client threads sending execute_model(i) back to back; every outcome recorded by request number."""

    def __init__(self, sup: Supervisor, clients: int, **call_kw) -> None:
        self.sup, self.call_kw = sup, call_kw
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: dict[tuple[int, int], object] = {}
        self.errors: dict[tuple[int, int], BaseException] = {}
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]

    def _client(self, c: int) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                out = self.sup.execute_model(c, i, timeout=30, **self.call_kw)
                with self.lock:
                    assert (c, i) not in self.answers
                    self.answers[(c, i)] = out
            except BaseException as exc:  # noqa: BLE001 -- every failure is a finding
                with self.lock:
                    self.errors[(c, i)] = exc
                if isinstance(exc, ShutdownInProgress):
                    return
            i += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wrong(self) -> dict:
        """Answers that differ from the fault-free one: EchoWorker's output rank returns (rank 0, args, kwargs)."""
        return {k: v for k, v in self.answers.items() if v != (0, k, {})}


# -- row 45: a rank killed during a retryable call -------------------------------------------------------------------
@pytest.mark.parametrize("retry", [True, False], ids=["retry", "no-retry"])
def test_retryable_step_moves_to_the_live_replica_dp2(retry):
    """dp=2: group 0's output rank is killed while steps are in flight on both replicas. With retry every step is
    answered once, correctly, the retried ones by group 1; without it the steps in flight on group 0 fail."""
    cfg = config(*DP2, *slow_steps(), "restart.backoff_initial_s=1.0")  # group 0 stays down long enough to see it
    with Supervisor(cfg) as sup:
        with Load(sup, clients=4, retry=retry) as load:
            wait_until(lambda: len(load.answers) >= 8, 30, "steps to flow on both replicas")
            os.kill(group_pids(sup, 0)[0], signal.SIGKILL)
            sent_before = len(load.answers) + 4
            wait_until(lambda: len(load.answers) + len(load.errors) >= sent_before + 8, 30, "steps after the kill")
        retries = sup.events.of_kind("retry")
        if retry:
            assert load.errors == {}
            assert retries and all(e["from_group"] == 0 and e["to_group"] == 1 and e["attempt"] == 2
                                   for e in retries)
            assert sum(row.get("retried", 0) for row in sup.status() if row["group"] == 0) >= len(retries)
        else:
            assert load.errors and all(isinstance(e, WorkerFailed) for e in load.errors.values())
            assert retries == []
        assert load.wrong() == {}


def test_retryable_call_waits_for_its_group_dp1():
    """dp=1 with restarts: the call is sent again to the same group once it serves again, and its answer comes
    from the new incarnation (the pids that answer are the restarted ones), not the dead one."""
    cfg = config(*ECHO, "parallel.tp=2", "restart=one_for_one")
    with Supervisor(cfg) as sup:
        before = sup.pids()
        slow_pid = lambda w, s: (time.sleep(s), os.getpid())[1]  # noqa: E731
        fut = sup.collective_rpc(slow_pid, args=(1.0,), timeout=60, non_block=True, retry=True)
        time.sleep(0.3)
        os.kill(before[1], signal.SIGKILL)
        answered = fut.result()
        after = sup.pids()
        assert set(answered) == set(after) and not set(after) & set(before)
        (event,) = sup.events.of_kind("retry")
        assert (event["from_group"], event["to_group"], event["attempt"]) == (0, 0, 2)
        # without retry the same call fails at once, naming the rank
        fut = sup.collective_rpc(slow_pid, args=(1.0,), timeout=60, non_block=True)
        time.sleep(0.3)
        os.kill(after[0], signal.SIGKILL)
        with pytest.raises(WorkerFailed, match="rank 0"):
            fut.result()


@pytest.mark.parametrize("retry", [True, False], ids=["retry", "no-retry"])
def test_peer_killed_under_a_collective_is_a_group_failure(retry):
    """tp=2 gloo: rank 1 is killed while rank 0 waits for it in an all-reduce. Rank 0 answers first, with gloo's
    own error, a moment before the monitor sees the death: it is the group's failure, naming rank 1. A retryable
    call is answered by the restarted group, equal to the reference; without retry that failure is the answer."""
    from worker.tp_mlp import make_input, reference_forward

    cfg = config("worker.cls=worker.faults:FaultyTPWorker", *slow_steps(1.0)[1:], "+runtime.env.RV_FAULT_RANK=1",
                 "parallel.tp=2",
                 "workload.hidden=64", "restart=one_for_one")
    with Supervisor(cfg) as sup:
        x = make_input(cfg.workload, 1)
        pids, out = sup.pids(), {}

        def step() -> None:
            try:
                out["y"] = sup.execute_model(x, group=0, timeout=60, retry=retry)
            except Exception as exc:  # noqa: BLE001
                out["error"] = exc

        t = threading.Thread(target=step)
        t.start()
        time.sleep(0.5)  # rank 1 sleeps before the all-reduce that rank 0 is already blocked in
        os.kill(pids[1], signal.SIGKILL)
        t.join(60)
        if retry:
            assert "error" not in out, out.get("error")
            assert float((out["y"] - reference_forward(cfg.workload, x)).abs().max()) < 1e-4
            assert [e["attempt"] for e in sup.events.of_kind("retry")] == [2]
        else:
            assert isinstance(out.get("error"), WorkerFailed) and out["error"].ranks == (1,), out


def test_retry_gives_one_clear_error_when_attempts_run_out():
    """A call that kills its group every time: retried up to rpc.retry_attempts, then the last WorkerFailed."""
    cfg = config(*ECHO, "parallel.tp=1", "restart=one_for_one", "rpc.retry_attempts=2", "restart.intensity=10")
    with Supervisor(cfg) as sup:
        with pytest.raises(WorkerFailed):
            sup.collective_rpc(lambda w: os.kill(os.getpid(), signal.SIGKILL), timeout=60, retry=True)
        assert [e["attempt"] for e in sup.events.of_kind("retry")] == [2]
        sup.wait_until_serving(timeout=30)
        assert sup.collective_rpc("echo", args=(1,), timeout=30) == [1]


# -- row 46: SIGTERM (shutdown with a drain window) under load ---------------------------------------------------------
def test_drain_completes_calls_in_flight_and_refuses_new_ones():
    cfg = config(*DP2, *slow_steps(1.0))
    sup = Supervisor(cfg)
    try:
        with Load(sup, clients=4) as load:
            wait_until(lambda: len(load.answers) >= 4, 30, "steps to flow")
            time.sleep(0.3)  # every client is inside a 1 s step now
            answered = len(load.answers)
            t0 = time.monotonic()
            sup.shutdown(drain=10.0)
            took = time.monotonic() - t0
            with pytest.raises(ShutdownInProgress, match="has shut down"):  # shutdown() has returned
                sup.execute_model(0, timeout=5)
        assert len(load.answers) >= answered + 4  # the four steps in flight completed
        assert all(isinstance(e, ShutdownInProgress) for e in load.errors.values())
        assert load.wrong() == {}
        (drained,) = sup.events.of_kind("drained")
        assert drained["complete"] and took < 10.0
    finally:
        sup.shutdown()


@pytest.mark.parametrize("drain_s", [10, 0], ids=["drain", "no-drain"])
def test_cli_sigterm_drains_then_exits_143(tmp_path, drain_s):
    """`python -m supervisor` running 1 s steps: SIGTERM lands mid-step. With a drain window the step in flight
    completes (the driver then sees the stop, sends no more and reports its figures); with none (drain_s=0) the
    step in flight is cut, and the driver (which rides through what the tree decides, supervisor/ride.py) reports
    the stop, not a failed workload. Either way the workers stop gracefully and the command exits 143."""
    cli = Cli(tmp_path, "worker.cls=worker.faults:FaultyTPWorker", "+runtime.env.RV_FAULT=slow_execute",
              "+runtime.env.RV_FAULT_ARG=1.0", "parallel.tp=2", "workload=bench", "workload.hidden=64",
              f"shutdown.drain_s={drain_s}", "logging.level=INFO")
    try:
        cli.ready_pids(2)
        wait_until(lambda: step_in_progress(cli), 60, "a step in progress")  # then steps run back to back
        t0 = time.monotonic()
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 143, cli.stderr()[-3000:]
        took = time.monotonic() - t0
    finally:
        cli.close()
    err, out = cli.stderr(), (tmp_path / "stdout.txt").read_text()
    assert [e["reasons"] for e in cli.events("stopped")] == [["exit 0", "exit 0"]], err[-3000:]
    if drain_s:  # the step in flight answered: the driver ends its loop and reports its figures
        (drained,) = cli.events("drained")
        assert drained["complete"] and not drained["skipped"]
        assert "workload failed" not in err and "by signal" not in out and "steps/s" in out, out + err[-3000:]
        assert took < drain_s
    else:  # the step in flight was cut by the stop that was asked for: said as the stop, once
        assert cli.events("drained") == [] and "workload failed" not in err, out + err[-3000:]
        assert "exit 143: stopped by SIGTERM" in err, err[-3000:]


def step_in_progress(cli: Cli) -> bool:
    """`python -m supervisor status RUN_DIR --json` (the control socket) shows an execute_model in progress."""
    run_dirs = glob.glob(str(cli.dir / "outputs" / "*" / "*"))
    if not run_dirs:
        return False
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", run_dirs[0], "--json"], capture_output=True,
                         text=True, timeout=30)
    try:
        return any(w.get("call") == "execute_model" for w in json.loads(out.stdout)["workers"])
    except (ValueError, KeyError):
        return False


# -- rolling restart ---------------------------------------------------------------------------------------------------
def test_rolling_restart_under_load_fails_no_call():
    cfg = config(*DP2, *slow_steps(0.1))
    with Supervisor(cfg) as sup:
        first = {g: group_pids(sup, g) for g in (0, 1)}
        with Load(sup, clients=3) as load:
            wait_until(lambda: len(load.answers) >= 6, 30, "steps to flow")
            times = sup.rolling_restart(timeout=60)
            n = len(load.answers)
            wait_until(lambda: len(load.answers) >= n + 6, 30, "steps after the rolling restart")
        assert load.errors == {} and load.wrong() == {}
        assert sorted(times) == [0, 1] and all(t > 0 for t in times.values())
        for g in (0, 1):
            assert not set(group_pids(sup, g)) & set(first[g])
        assert [e["group"] for e in sup.events.of_kind("rolling_restart")] == [0, 1]
        assert not sup.events.of_kind("exited")
