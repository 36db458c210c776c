"""The Python API keeps its promises (issue 12; fault rows 38, 39, 40): Futures that complete by themselves,
every call ends, the caller's timeout apart from the call deadline, validation, and what workers see."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import threading
import time

import pytest

from supervisor.api import Supervisor
from supervisor.errors import CallTimeout, RemoteError, RpcTimeout, ShutdownInProgress, WorkerFailed
from tests.integration.helpers import ECHO, config

pytestmark = pytest.mark.timeout(120)
ONE_FOR_ONE = "restart=one_for_one"
BOUND_S = 15.0  # "ends": far above any answer here, far below forever


@pytest.fixture(scope="module")
def _tree_cfg():
    return config(*ECHO, "parallel.tp=2", "parallel.dp=2", ONE_FOR_ONE)


# -- row 40: Futures complete by themselves ------------------------------------------------------------------
def test_a_future_completes_without_anyone_calling_result():
    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        fut = sup.collective_rpc("sleep", args=(0.3,), non_block=True)
        fired = threading.Event()
        fut.add_done_callback(lambda f: fired.set())
        done, not_done = cf.wait([fut], timeout=BOUND_S)
        assert done == {fut} and not not_done and fut.done()
        assert fired.wait(BOUND_S)
        futs = [sup.collective_rpc("echo", args=(i,), non_block=True) for i in range(4)]
        assert sorted(f.result() for f in cf.as_completed(futs, timeout=BOUND_S)) == [[i, i] for i in range(4)]
        assert fut.cancel() is False and not fut.cancelled()  # a sent call runs: cannot be un-sent


def test_a_done_callback_may_read_results_and_send_calls():
    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        other = sup.collective_rpc("sleep", args=(0.2,), non_block=True)
        seen: list = []

        def callback(f):  # runs in the reply reader's thread, holding none of the channel's locks
            seen.append((f.result(), other.result(timeout=BOUND_S), sup.collective_rpc("echo", args=(9,))))

        fut = sup.collective_rpc("sleep", args=(0.1,), non_block=True)
        fut.add_done_callback(callback)
        assert fut.result(timeout=BOUND_S) == [0.1, 0.1]
        cf.wait([other], timeout=BOUND_S)
        deadline = time.monotonic() + BOUND_S
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [([0.1, 0.1], [0.2, 0.2], [9, 9])]


def test_exception_of_a_failed_call_and_remote_error_names_the_global_rank_at_dp2(_tree_cfg):
    with Supervisor(_tree_cfg) as sup:
        fut = sup.collective_rpc(lambda w: 1 / 0 if w.rank == 1 else w.rank, group=1, non_block=True)
        exc = fut.exception(timeout=BOUND_S)
        assert isinstance(exc, RemoteError) and exc.rank == 3 and exc.exc_type == "ZeroDivisionError"
        with pytest.raises(RemoteError) as err:  # issue 11 item 3: group 1's rank 1 is global rank 3
            sup.collective_rpc(lambda w: 1 / 0 if w.topology.dp_rank == 1 and w.rank == 0 else 0)
        assert err.value.rank == 2 and "rank 2 raised ZeroDivisionError" in str(err.value)


def test_asyncio_awaits_concurrent_calls_inside_a_running_loop():
    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        async def main():
            calls = [asyncio.wrap_future(sup.collective_rpc("echo", args=(i,), non_block=True)) for i in range(8)]
            slow = asyncio.wrap_future(sup.collective_rpc("sleep", args=(0.2,), non_block=True))
            return await asyncio.gather(*calls, slow)

        out = asyncio.run(asyncio.wait_for(main(), BOUND_S))
        assert out == [[i, i] for i in range(8)] + [[0.2, 0.2]]


# -- row 39: the caller's wait is "wait at most" -------------------------------------------------------------
def test_a_callers_timeout_leaves_the_ranks_alone_and_drops_the_late_answer():
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE)) as sup:
        pids = sup.pids()
        with pytest.raises(CallTimeout, match="caller's timeout") as err:
            sup.collective_rpc("sleep", args=(1.0,), timeout=0.2)
        assert isinstance(err.value, TimeoutError) and not isinstance(err.value, RpcTimeout)
        assert err.value.ranks == (0, 1)
        assert sup.collective_rpc("echo", args=("next",), timeout=BOUND_S) == ["next", "next"]  # not the sleep's
        fut = sup.collective_rpc("sleep", args=(0.5,), non_block=True)
        with pytest.raises(CallTimeout):
            fut.result(timeout=0.05)
        assert fut.result(timeout=BOUND_S) == [0.5, 0.5]  # the Future is still running, then completes
        assert sup.pids() == pids and not sup.events.of_kind("hung") and not sup.events.of_kind("exited")


def test_a_call_deadline_declares_the_silent_ranks_hung_and_says_which_deadline():
    with Supervisor(config(*ECHO, "parallel.tp=2", ONE_FOR_ONE)) as sup:
        slow_rank_1 = lambda w, s: time.sleep(s) if w.rank == 1 else w.rank  # noqa: E731
        with pytest.raises(RpcTimeout, match=r"ranks \[1\] missed the call deadline of 0.5 s") as err:
            sup.collective_rpc(slow_rank_1, args=(30,), deadline=0.5)
        assert err.value.ranks == (1,)
        hung = sup.events.of_kind("hung")  # declared before the caller heard of it
        _wait_for(lambda: sup.groups()[0].restarts == 1)
        assert sup.wait_until_serving(0, timeout=BOUND_S)
        assert [(e["rank"], e["why"]) for e in hung] == [(1, "missed the call deadline of 0.5 s (<lambda>)")]
        assert "heartbeat" not in str(err.value)
        assert sup.collective_rpc("echo", args=(1,), timeout=BOUND_S) == [1, 1]


# -- validation ------------------------------------------------------------------------------------------------
def test_bad_arguments_get_one_clear_error(_tree_cfg):
    with Supervisor(_tree_cfg) as sup:
        for kwargs, words in [({"unique_reply_rank": 4}, "unique_reply_rank=4 is outside the world: 0..3"),
                              ({"unique_reply_rank": -1}, "unique_reply_rank=-1 is outside the world"),
                              ({"group": 2}, "group=2 is outside the world: 0..1"),
                              ({"timeout": -1}, "timeout=-1"), ({"timeout": float("nan")}, "timeout=nan"),
                              ({"deadline": -1.0}, "deadline=-1.0")]:
            with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
                sup.collective_rpc("echo", args=(1,), **kwargs)
        with pytest.raises(ValueError, match="not a public method"):
            sup.collective_rpc("_start")
        assert sup.collective_rpc(lambda w, f: f(w.rank), args=(lambda r: r * 10,), group=1) == [0, 10]
        with pytest.raises(TypeError, match=r"argument kwargs\['x'\] cannot be pickled"):
            sup.collective_rpc("echo", kwargs={"x": threading.Lock()})
        assert sup.collective_rpc("echo", args=(3,), timeout=BOUND_S) == [3] * 4


# -- row 38 (one order; test_api_stateful.py drives random ones): a call right after a death ----------------
def test_under_restart_never_a_call_after_a_death_fails_at_once():
    sup = Supervisor(config(*ECHO, "parallel.tp=2"))
    try:
        with pytest.raises(WorkerFailed):
            sup.collective_rpc(lambda w: os._exit(3), unique_reply_rank=1)
        result: list = []
        t = threading.Thread(target=lambda: result.append(_outcome(lambda: sup.collective_rpc("ping"))))
        t.start()
        t.join(BOUND_S)
        assert not t.is_alive(), "a call after the death is still waiting"
        assert result and isinstance(result[0], (WorkerFailed, ShutdownInProgress)), result
    finally:
        sup.shutdown()


def _wait_for(predicate) -> None:
    deadline = time.monotonic() + BOUND_S
    while not predicate():
        assert time.monotonic() < deadline, "the condition did not come"
        time.sleep(0.01)


def _outcome(fn):
    try:
        return fn()
    except BaseException as exc:
        return exc


# -- what a worker sees ------------------------------------------------------------------------------------------
def test_workers_see_torchruns_variables_and_the_env_as_written():
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FLAG", "NUM")
    cfg = config(*ECHO, "parallel.tp=2", "parallel.dp=2", "+runtime.env.FLAG=false", "+runtime.env.NUM=1e3")
    with Supervisor(cfg) as sup:
        envs = sup.collective_rpc(lambda w, keys: {k: os.environ.get(k) for k in keys}, args=(keys,))
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in envs] == [("0", "2", "0"), ("1", "2", "1")] * 2
    assert {(e["FLAG"], e["NUM"]) for e in envs} == {("false", "1e3")}
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] and envs[0]["MASTER_ADDR"] == "127.0.0.1"


def test_status_cpu_percent_is_measured_since_the_last_call():
    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        sup.status()
        burn = lambda w: w.rank if w.rank == 1 else sum(i * i for i in range(3_000_000))  # noqa: E731
        sup.collective_rpc(burn, timeout=60)
        rows = sup.status()
        assert rows[0]["cpu_pct"] > 0.0, rows  # rank 0 burned CPU since the previous status()


# -- "just run my worker" ------------------------------------------------------------------------------------------
def drive_echo(sup, stop):
    """A user's own driver (workload.driver=tests.integration.test_api:drive_echo)."""
    return {"echo": sup.collective_rpc("echo", args=(2,), timeout=BOUND_S)}


def test_a_user_driver_and_serve_drive_any_worker_and_builtin_drivers_refuse_foreign_ones():
    from supervisor import workloads

    cfg = config(*ECHO, "parallel.tp=2", "workload.driver=tests.integration.test_api:drive_echo",
                 "workload.status_interval_s=0.1")
    assert workloads.check(config(*ECHO)).startswith("worker.cls: workload=tp_mlp drives the tensor-parallel MLP")
    with Supervisor(cfg) as sup:
        report = workloads.run(sup, threading.Event())
        assert report.ok and report.lines == [("echo", "[2, 2]")]
        stop = threading.Event()
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        served = workloads.run_serve(sup, stop)  # any worker.cls: status rows only
        timer.join()
    assert served.ok and ("served until", "signal") in served.lines


# -- the README's example pasted without `if __name__ == "__main__":` ---------------------------------------------
UNGUARDED = '''
import sys
from supervisor.api import Supervisor
from supervisor.config import load_config

cfg = load_config(["worker=echo", "parallel.tp=2", "logging.events=false", "runtime.start_method=" + sys.argv[1]])


class Point:  # defined in __main__: reaches the workers by value
    def __init__(self, x):
        self.x = x


with Supervisor(cfg) as sup:
    print(sup.collective_rpc("ping"), sup.collective_rpc(lambda w, p: p.x * 2, args=(Point(21),)), flush=True)
'''


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_script_without_the_main_guard_works(tmp_path, method):
    import subprocess
    import sys

    from tests.integration.helpers import reap_adopted

    script = tmp_path / "script.py"
    script.write_text(UNGUARDED)
    proc = subprocess.Popen([sys.executable, str(script), method], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    reap_adopted([])
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == "[0, 1] [42, 42]" and "Traceback" not in err, (out, err[-3000:])


# -- the asyncio face ----------------------------------------------------------------------------------------------
def test_async_supervisor_serves_concurrent_calls_from_a_running_loop():
    from supervisor.aio import AsyncSupervisor

    async def main():
        async with AsyncSupervisor(config(*ECHO, "parallel.tp=2", "parallel.dp=2")) as sup:
            ticks = 0

            async def ticker():  # the loop keeps running while calls are in flight
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tick = asyncio.create_task(ticker())
            many = await asyncio.gather(*(sup.collective_rpc("echo", args=(i,)) for i in range(20)),
                                        sup.collective_rpc("sleep", args=(0.3,), group=1),
                                        sup.execute_model("x"))
            with pytest.raises(CallTimeout):
                await sup.collective_rpc("sleep", args=(1.0,), timeout=0.1)
            after = await sup.collective_rpc("echo", args=("after",), unique_reply_rank=3)
            tick.cancel()
            return many, after, ticks, sup.sync.events.of_kind("hung")

    many, after, ticks, hung = asyncio.run(asyncio.wait_for(main(), 60))
    assert many[:20] == [[i] * 4 for i in range(20)] and many[20] == [0.3, 0.3]
    assert many[21] == (0, ("x",), {}) and after == "after" and hung == []
    assert ticks > 1  # the loop ran while the calls were in flight


def test_a_call_on_a_supervisor_never_started_fails_at_once():
    sup = Supervisor(config(*ECHO), start=False)
    try:
        with pytest.raises(ShutdownInProgress, match="not started"):
            sup.collective_rpc("ping")
    finally:
        sup.shutdown()


# -- vLLM V1's execute_model(scheduler_output, non_block=False); what ping answers ----------------------------------
def test_execute_model_non_block_returns_a_future_in_both_faces_and_ping_names_the_global_rank(_tree_cfg):
    """non_block is the API's, as in vLLM's executor: a Future of the output, never a keyword for the worker (the
    echo worker returns the keywords it got). ping answers the global rank, the order results come in."""
    from supervisor.aio import AsyncSupervisor

    with Supervisor(_tree_cfg) as sup:
        fut = sup.execute_model("a", group=1, non_block=True)
        retried = sup.execute_model("b", group=0, retry=True, non_block=True)
        assert isinstance(fut, cf.Future) and isinstance(retried, cf.Future)
        assert fut.result(timeout=BOUND_S) == (0, ("a",), {}) and retried.result(BOUND_S) == (0, ("b",), {})
        assert sup.execute_model("c", group=0, k=1) == (0, ("c",), {"k": 1})  # a worker's own keywords pass
        assert sup.collective_rpc("ping") == [0, 1, 2, 3]
        assert sup.collective_rpc("ping", group=1) == [2, 3] and sup.collective_rpc("ping", unique_reply_rank=3) == 3

    async def main():
        async with AsyncSupervisor(_tree_cfg) as asup:
            first = await asup.execute_model("x", non_block=True)  # sent; the loop goes on
            second = await asup.execute_model("y", group=1, non_block=True)
            pings = await asup.collective_rpc("ping", non_block=True)
            assert isinstance(first, asyncio.Future) and isinstance(pings, asyncio.Future)
            return await second, await first, await pings

    assert asyncio.run(asyncio.wait_for(main(), 60)) == ((0, ("y",), {}), (0, ("x",), {}), [0, 1, 2, 3])
