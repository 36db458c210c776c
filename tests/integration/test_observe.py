"""Seeing the tree (issue 15): rank-prefixed output and per-rank logs, stacks of a hung rank in its log, the story
in supervisor.log and events.jsonl, `python -m supervisor status` from another process, Prometheus metrics parsed
with prometheus_client's own parser, /healthz and /readyz while a group restarts, and the live page in a real
headless Chromium. No fixed ports: http.port=0 and the bound port read back from RUN_DIR/http.json."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from multiprocessing.connection import Connection

import psutil
import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from supervisor.api import Supervisor
from supervisor.errors import ShutdownInProgress
from supervisor.backends.local.output import RankOutput
from supervisor.core.exits import ExitInfo
from supervisor.observe.live import RUNTIME_ENV
from supervisor.settings import ShutdownSettings
from tests.integration.helpers import ECHO, REPO, config, fault_env, gone_within, reap_adopted

ENV = {**os.environ, "PYTHONPATH": REPO}
ONE_FOR_ONE = "restart=one_for_one"


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.02)


# -- output: whole lines, prefixed, copied into rank logs ---------------------------------------------------------
def test_output_lines_of_two_ranks_never_mix(tmp_path, capfd):
    """Fragments of two ranks' lines arriving interleaved come out as whole lines, one rank each."""
    out = RankOutput(str(tmp_path))
    writers = {}
    for rank in (0, 1):
        (r_out, w_out), (r_err, w_err) = os.pipe(), os.pipe()
        out.add(rank, 1000 + rank, 0, Connection(r_out, writable=False), Connection(r_err, writable=False))
        writers[rank] = (w_out, w_err)
    for i in range(50):
        for rank in (0, 1):  # half a line from each rank, then the other halves
            os.write(writers[rank][0], f"rank{rank}-line{i}-".encode() + b"x" * 300)
        for rank in (0, 1):
            os.write(writers[rank][0], f"-end{i}\n".encode())
    os.write(writers[1][1], b"an error\nlast words without a newline")
    for fds in writers.values():
        for fd in fds:
            os.close(fd)
    out.close(timeout_s=5)
    lines = capfd.readouterr()
    for rank in (0, 1):
        mine = [ln for ln in lines.out.splitlines() if ln.startswith(f"[rank{rank}]: ")]
        assert mine == [f"[rank{rank}]: rank{rank}-line{i}-{'x' * 300}-end{i}" for i in range(50)]
    assert lines.err.splitlines() == ["[rank1]: an error", "[rank1]: last words without a newline"]
    log1 = (tmp_path / "ranks" / "rank1.log").read_text().splitlines()
    assert log1[0].startswith("==> rank 1 pid 1001 attempt 0 started ")
    assert log1[-2:] == ["an error", "last words without a newline"] and len(log1) == 53


def test_output_keeps_a_rank_prefix_already_there_and_stacks_go_to_the_log_only(tmp_path, capfd):
    """torch.distributed's excepthook and C++ logger write "[rank1]: ..." themselves: not "[rank1]: [rank1]: ...".
    What comes on the stacks pipe (faulthandler on SIGUSR1) goes into the rank log, not onto the console."""
    out = RankOutput(str(tmp_path))
    pipes = [os.pipe() for _ in range(3)]
    out.add(1, 1001, 0, *(Connection(r, writable=False) for r, _ in pipes))
    os.write(pipes[1][1], b"[rank1]: Traceback (most recent call last):\n[rank1]:[W ProcessGroup] x\n[rank10]: y\n")
    os.write(pipes[2][1], b"Current thread 0x01 (most recent call first):\n  File \"a.py\", line 1 in f\n")
    for _, w in pipes:
        os.close(w)
    out.close(timeout_s=5)
    lines = capfd.readouterr()
    assert lines.err.splitlines() == ["[rank1]: Traceback (most recent call last):", "[rank1]:[W ProcessGroup] x",
                                      "[rank1]: [rank10]: y"] and lines.out == ""
    assert "most recent call first" in (tmp_path / "ranks" / "rank1.log").read_text()


def test_without_a_run_folder_stacks_come_out_on_stderr(capfd):
    out = RankOutput("")
    pipes = [os.pipe() for _ in range(3)]
    out.add(0, 1000, 0, *(Connection(r, writable=False) for r, _ in pipes))
    os.write(pipes[2][1], b"Current thread 0x01 (most recent call first):\n")
    for _, w in pipes:
        os.close(w)
    out.close(timeout_s=5)
    assert capfd.readouterr().err == "[rank0]: Current thread 0x01 (most recent call first):\n"


def hang_holding_the_gil(w):
    """Catastrophic regex backtracking: minutes in C with the GIL held, so the heartbeat thread cannot beat (a
    wedged rank), while faulthandler (a C signal handler) can still dump the stacks."""
    if w.rank == 1:
        re.match(r"(a+)+$", "a" * 40 + "b")
    return w.rank


def test_rank_output_prefixed_logged_and_hang_stacks_in_its_log(tmp_path, capfd):
    run_dir = str(tmp_path / "run")
    cfg = config(*ECHO, "parallel.tp=2", ONE_FOR_ONE, "logging.events=true", f"logging.run_dir={run_dir}",
                 "worker.heartbeat_interval_s=0.1", "worker.heartbeat_timeout_s=1")
    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(str(m)), level="ERROR")
    try:
        with Supervisor(cfg) as sup:
            long = "y" * 5000  # far beyond PIPE_BUF: the kernel may split it, our lines may not
            sup.collective_rpc(lambda w, s: [print(f"from {w.rank} {i} {s}") for i in range(200)] and None,
                               args=(long,), timeout=30)
            sup.collective_rpc(lambda w: print(f"to stderr from {w.rank}", file=sys.stderr), timeout=30)
            hung_pid = sup.pids()[1]
            fut = sup.collective_rpc(hang_holding_the_gil, non_block=True)
            wait_until(lambda: sup.events.of_kind("hung"), 30, "rank 1 to be declared hung")
            with pytest.raises(Exception):
                fut.result(timeout=30)
            wait_until(lambda: sup.serving() and hung_pid not in sup.pids(), 30, "group 0 to serve again")
    finally:
        logger.remove(sink)
    out, err = capfd.readouterr()
    for rank in (0, 1):
        got = [ln for ln in out.splitlines() if ln.startswith(f"[rank{rank}]: from ")]
        assert got == [f"[rank{rank}]: from {rank} {i} {long}" for i in range(200)], "a line was cut or mixed"
        assert f"[rank{rank}]: to stderr from {rank}" in err.splitlines()
    stray = [ln for ln in out.splitlines() if "from " in ln and not ln.startswith("[rank")]
    assert stray == []
    log1 = os.path.join(run_dir, "ranks", "rank1.log")
    text = open(log1).read()
    assert "Most recent call first" in text or "most recent call first" in text, text[-2000:]
    assert "hang_holding_the_gil" in text and f"from 1 199 {long}" in text
    assert "hang_holding_the_gil" not in err + out  # the stacks are in the log; the console says where (below)
    assert "attempt 1 started" in text  # the restarted rank appends to the same file, under a header
    hung = sup.events.of_kind("hung")[0]
    assert hung["rank"] == 1 and hung["stack_log"] == log1
    assert any(f"stacks dumped to {log1}" in m for m in errors), errors


def test_status_shows_the_call_in_progress_and_metrics_time_every_call():
    from supervisor.observe.metrics import Metrics

    with Supervisor(config(*ECHO, "parallel.tp=2")) as sup:
        metrics = Metrics(sup)
        sup.calls.add_sink(metrics.on_call)
        for i in range(20):
            sup.collective_rpc("echo", args=(i,), timeout=30)
        with pytest.raises(Exception):
            sup.collective_rpc(lambda w: 1 / 0, timeout=30)
        fut = sup.collective_rpc("sleep", args=(1.0,), non_block=True)
        rows = wait_until(lambda: [r for r in sup.status() if r["call"] == "sleep" and r["call_s"] > 0.1], 30,
                          "the sleep call to show in status")
        assert sorted(r["rank"] for r in rows) == [0, 1]
        fut.result(timeout=30)
        wait_until(lambda: all(r["call"] is None for r in sup.status()), 30, "the call to end")
        families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
        counts = {s.labels["method"]: s.value for s in families["rankvisor_rpc_latency_seconds"].samples
                  if s.name.endswith("_count")}
        assert counts["echo"] == 20 and counts["sleep"] == 1
        sleep_sum = [s.value for s in families["rankvisor_rpc_latency_seconds"].samples
                     if s.name.endswith("_sum") and s.labels["method"] == "sleep"]
        assert sleep_sum[0] >= 1.0
        failures = [(s.labels["kind"], s.value) for s in families["rankvisor_rpc_failures"].samples
                    if s.name.endswith("_total")]
        assert failures == [("RemoteError", 1.0)]
        sup.calls.remove_sink(metrics.on_call)


def test_every_get_path_answers_head_too():
    """``HEAD /healthz`` was 501: every path answers HEAD with GET's status and headers, and no body."""
    import http.client
    from types import SimpleNamespace

    from supervisor.observe.http import HttpServer, Routes

    sup = SimpleNamespace(finished=threading.Event(), serving=lambda: True)
    metrics = SimpleNamespace(exposition=lambda: b"rankvisor_give_ups_total 0.0\n")
    server = HttpServer(0, Routes(sup, metrics, lambda: {"status": {}}, "<html>page</html>"))
    try:
        for path in ("/metrics", "/healthz", "/readyz", "/api/state", "/", "/nowhere"):
            answers = {}
            for method in ("GET", "HEAD"):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                try:
                    conn.request(method, path)
                    r = conn.getresponse()
                    answers[method] = (r.status, r.getheader("Content-Type"), r.getheader("Content-Length"), r.read())
                finally:
                    conn.close()
            get, head = answers["GET"], answers["HEAD"]
            assert head[:3] == get[:3] and head[3] == b"" and int(get[2]) == len(get[3]) > 0, (path, answers)
            assert get[0] == (404 if path == "/nowhere" else 200), (path, get)
    finally:
        server.close()


# -- the CLI: story, events, status from another process, metrics, probes -----------------------------------------
class ServeCli:
    """`python -m supervisor workload=serve ...` in tmp_path, with HTTP on a free port."""

    def __init__(self, tmp_path, *overrides: str) -> None:
        self.dir = tmp_path
        self._err = open(tmp_path / "stderr.txt", "w")
        self._out = open(tmp_path / "stdout.txt", "w")
        args = [sys.executable, "-m", "supervisor", "workload=serve", *ECHO, "http.when=always", "http.port=0",
                "workload.status_interval_s=60", *overrides]
        self.env = {**ENV, RUNTIME_ENV: os.environ[RUNTIME_ENV]}  # a test may have given it a registry of its own
        self.proc = subprocess.Popen(args, cwd=tmp_path, env=self.env, stdout=self._out, stderr=self._err)
        wait_until(lambda: "READY in" in self.stderr() or self.proc.poll() is not None, 60, "the READY line")
        assert self.proc.poll() is None, self.stderr()
        self.run_dir = glob.glob(str(tmp_path / "outputs" / "*" / "*"))[0]
        self.port = json.load(open(os.path.join(self.run_dir, "http.json")))["port"]
        self._tree = psutil.Process(self.proc.pid).children(recursive=True)  # its forkserver may come back to us

    def stderr(self) -> str:
        return (self.dir / "stderr.txt").read_text()

    def status(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor", "status", *args], cwd=self.dir, env=self.env,
                              capture_output=True, text=True, timeout=60)

    def status_json(self) -> dict:
        res = self.status(self.run_dir, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, text = self.get("/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def close(self, timeout: float = 30) -> int | None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            reap_adopted(self._tree)
            self._err.close()
            self._out.close()


def _events(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pid_of(st: dict, rank: int) -> int:
    return next(w["pid"] for w in st["workers"] if w["rank"] == rank)


def test_cli_status_metrics_probes_and_story_through_a_restart(tmp_path):
    # backoff 0.5 s: the unready window is at least that long, however loaded the machine is
    cli = ServeCli(tmp_path, "parallel.tp=2", "parallel.dp=2", ONE_FOR_ONE, "restart.backoff_initial_s=0.5")
    code = None
    try:
        sock = os.path.join(cli.run_dir, "control.sock")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        st = cli.status_json()  # another process, through the control socket
        assert [(w["group"], w["rank"], w["state"]) for w in st["workers"]] == \
            [(0, 0, "running"), (0, 1, "running"), (1, 2, "running"), (1, 3, "running")]
        assert all(isinstance(w["heartbeat_age_s"], float) and w["rss_mib"] for w in st["workers"])
        table = cli.status()  # "latest" from the run's own folder
        assert table.returncode == 0 and table.stderr == "" and "beat s" in table.stdout, table
        m = cli.metrics()
        assert m[("rankvisor_workers", (("state", "running"),))] == 4
        assert m[("rankvisor_group_serving", (("group", "1"),))] == 1
        assert len([k for k in m if k[0] == "rankvisor_worker_heartbeat_age_seconds"]) == 4
        assert cli.get("/readyz")[0] == 200 and cli.get("/healthz") == (200, "ok\n")

        victim = _pid_of(st, 3)
        probes = _probe_while(cli, lambda: os.kill(victim, signal.SIGKILL))
        readyz = [code for code, _ in probes]
        first_down = readyz.index(503)  # readyz went unready ...
        assert 200 in readyz[first_down:], readyz  # ... then ready again
        assert all(h == 200 for _, h in probes)  # the supervisor stayed alive throughout
        m = cli.metrics()
        assert m[("rankvisor_restarts_total", (("cause", "SIGKILL"), ("group", "1")))] == 1
        assert m[("rankvisor_worker_exits_total", (("reason", "SIGKILL"),))] >= 1
        st = cli.status_json()
        assert [g["restarts"] for g in st["groups"]] == [0, 1] and _pid_of(st, 3) != victim

        res = cli.status(cli.run_dir, "--restart", "0")  # a graceful restart of group 0 from the shell
        assert res.returncode == 0, res.stderr
        wait_until(lambda: any(e["kind"] == "rolling_restart" for e in _events(cli.run_dir)), 30, "group 0 restarted")
        wait_until(lambda: cli.get("/readyz")[0] == 200, 30, "group 0 back")
        m = cli.metrics()  # asked for, so a rolling restart: not a recycle (a worker over its budget)
        assert m[("rankvisor_restarts_total", (("cause", "rolling_restart"), ("group", "0")))] == 1
        assert not [k for k in m if k[0] == "rankvisor_restarts_total" and ("cause", "recycle") in k[1]]
        assert not [e for e in _events(cli.run_dir) if e["kind"] == "recycled"]
        watch = subprocess.Popen([sys.executable, "-m", "supervisor", "status", "--watch", "0.2"], cwd=cli.dir,
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert watch.stdout.readline().startswith("run ")  # a frame came
            watch.send_signal(signal.SIGINT)  # Ctrl-C ends a viewer
            assert watch.wait(30) == 0, watch.stderr.read()
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(5)
            watch.stdout.close()
            watch.stderr.close()
        res = cli.status(cli.run_dir, "--stop")
        assert res.returncode == 0, res.stderr
        code = cli.proc.wait(30)
    finally:
        cli.close()
    assert code == 143, cli.stderr()[-3000:]
    _check_story(cli.run_dir, cli.stderr())


def _probe_while(cli: ServeCli, act) -> list[tuple[int, int]]:
    """(readyz, healthz) status codes, polled from before ``act`` until readyz has been unready and ready again."""
    probes: list[tuple[int, int]] = []
    act()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probes.append((cli.get("/readyz")[0], cli.get("/healthz")[0]))
        codes = [c for c, _ in probes]
        if 503 in codes and codes[-1] == 200:
            break
        time.sleep(0.01)
    return probes


def _check_story(run_dir: str, stderr: str) -> None:
    log = open(os.path.join(run_dir, "supervisor.log")).read()
    for needle in ("starting tp=2", "group 0 READY", "group 1 READY", "READY in", "exited with SIGKILL: killed",
                   "restarting groups [1]", "group 0 restarted by a rolling restart", "serve summary",
                   "group 1 stopped",
                   "exit 143: stopped by SIGTERM"):
        assert needle in log, f"{needle!r} not in supervisor.log:\n{log[-3000:]}"
    events = _events(run_dir)
    assert len({e["run"] for e in events}) == 1 and all(re.match(r"\d{4}-\d\d-\d\dT.*Z$", e["iso"]) for e in events)
    for pid in {e["pid"] for e in events if e["kind"] == "ready"}:
        kinds = [e["kind"] if e["kind"] != "phase" else e["phase"] for e in events if e.get("pid") == pid]
        assert kinds[:5] == ["started", "imported", "init_device", "load_model", "ready"], kinds
    exited = [e for e in events if e["kind"] == "exited" and e["reason"] == "SIGKILL"]
    assert exited and exited[0]["meaning"].startswith("killed")
    for e in (e for e in events if e["kind"] == "started"):  # each incarnation under its own header in its rank log
        log = open(os.path.join(run_dir, "ranks", f"rank{e['rank']}.log")).read()
        assert f"==> rank {e['rank']} pid {e['pid']} attempt {e['attempt']} started " in log
    worker_lines = [ln for ln in stderr.splitlines() if "| Worker_" in ln]  # whatever the workers logged, if any
    assert all(re.match(r"\[rank\d\]: ", ln) for ln in worker_lines), worker_lines[:5]


def test_a_forced_stop_leaves_an_event_and_a_log_line(tmp_path):
    """Ctrl-C, then Ctrl-C again while the graceful stop is still waiting on a slow shutdown(). Again means as a
    person presses it: after shutdown.signal_window_s, within which the same signal is one signal sent twice."""
    cli = ServeCli(tmp_path, "parallel.tp=2", *fault_env("slow_stop", arg="30"), "shutdown.grace_s=60")
    try:
        pids = [w["pid"] for w in cli.status_json()["workers"]]
        cli.proc.send_signal(signal.SIGINT)
        wait_until(lambda: cli.status_json()["state"] == "stopping", 30, "the graceful stop to begin")
        time.sleep(ShutdownSettings().signal_window_s)  # the first one was handled before "stopping": a person's pace
        cli.proc.send_signal(signal.SIGINT)  # while shutdown() takes its 30 s
        code = cli.proc.wait(30)
    finally:
        cli.close()
    assert code == 130, cli.stderr()[-3000:]
    assert gone_within(pids, 5.0) == []
    forced = [e for e in _events(cli.run_dir) if e["kind"] == "forced_stop"]
    assert len(forced) == 1 and sorted(forced[0]["pids"]) == sorted(pids)
    assert "forced stop: every worker SIGKILLed" in open(os.path.join(cli.run_dir, "supervisor.log")).read()


def test_status_cli_bad_input_is_one_line(tmp_path):
    def status(*args):
        return subprocess.run([sys.executable, "-m", "supervisor", "status", *args], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=60)

    for args, code, text in [(("nowhere",), 2, "nowhere: no such run folder"),
                             ((), 2, "latest: no running supervisor"),
                             (("--watch", "0", str(tmp_path)), 2, "--watch: must be a number > 0"),
                             (("--bogus",), 2, "--bogus: no such option")]:
        res = status(*args)
        assert (res.returncode, res.stderr.count("\n")) == (code, 1) and text in res.stderr, (args, res.stderr)
    stale = tmp_path / "outputs" / "2026-01-01" / "00-00-00"
    stale.mkdir(parents=True)
    (stale / "control.sock").write_text("")  # a supervisor killed with -9 leaves its socket file behind
    res = status(str(stale))
    assert res.returncode == 1 and res.stderr.startswith("error: no supervisor answers") and res.stderr.count("\n") == 1


# -- a tree embedded in a program; this user's live trees found from any folder ----------------------------------
def _status_from(folder, *args: str) -> subprocess.CompletedProcess:
    """`python -m supervisor status ...` run in ``folder`` (made if missing), with this test's registry."""
    folder.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "supervisor", "status", *args], cwd=folder,
                          env={**ENV, RUNTIME_ENV: os.environ[RUNTIME_ENV]}, capture_output=True, text=True,
                          timeout=60)


def test_an_embedded_tree_serves_metrics_probes_and_status_as_the_command_does(tmp_path, monkeypatch):
    """Supervisor(cfg) with http.when=always started no HTTP server and no control.sock. Now: both, in a private
    run folder under the runtime dir; `status` from any folder finds it; `status --stop` stops the tree (not the
    program); shutdown() removes the folder and the registry entry."""
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "runtime"))
    sup = Supervisor(config(*ECHO, "parallel.tp=2", "http.when=always", "http.port=0"))
    try:
        made = glob.glob(str(tmp_path / "runtime" / "runs" / "*"))
        assert len(made) == 1, made
        run_dir = made[0]
        assert sup.endpoints.run_dir == run_dir
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(run_dir, "control.sock")).st_mode) == 0o600
        port = json.load(open(os.path.join(run_dir, "http.json")))["port"]
        assert sup.endpoints.url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(sup.endpoints.url + "metrics", timeout=10) as r:
            families = text_string_to_metric_families(r.read().decode())
            workers = {s.labels["state"]: s.value for f in families if f.name == "rankvisor_workers" for s in f.samples}
        assert workers["running"] == 2
        with urllib.request.urlopen(sup.endpoints.url + "readyz", timeout=10) as r:
            assert r.status == 200
        res = _status_from(tmp_path / "elsewhere", "--json")
        assert res.returncode == 0 and res.stderr == "", res.stderr
        st = json.loads(res.stdout)
        assert (st["pid"], st["run_dir"], [w["rank"] for w in st["workers"]]) == (os.getpid(), run_dir, [0, 1])
        res = _status_from(tmp_path / "elsewhere", "--stop")
        assert res.returncode == 0, res.stderr
        assert sup.wait(30)  # the tree stopped; this program runs on, and its calls are refused
        with pytest.raises(ShutdownInProgress):
            sup.collective_rpc("echo", args=(1,), timeout=5)
    finally:
        sup.shutdown()
    assert sup.endpoints is None and not os.path.exists(run_dir)
    assert os.listdir(tmp_path / "runtime" / "live") == []


def _stale_entries(folder) -> list:
    """Registry entries a kill -9 leaves: a process that is gone, and a pid now another program's."""
    dead = subprocess.Popen(["true"])
    dead.wait(10)  # reaped: its pid names no process (or, reused, one started later)
    paths = []
    for name, pid, start in (("dead", dead.pid, 1.0), ("reused", os.getpid(), 1.0)):
        path = folder / f"{pid}-{name}.json"
        path.write_text(json.dumps({"run_dir": str(folder / name), "pid": pid, "started": time.time() + 60,
                                    "embedded": False, "command": [], "process_start": start}))
        paths.append(path)
    return paths


def test_status_finds_this_users_live_trees_from_any_folder_and_names_the_newest(tmp_path, monkeypatch):
    """`status` without a folder looked only under ./outputs and ./multirun of the current folder. Now: every live
    tree in the registry, wherever it runs; with several, they are listed and the newest is shown and named;
    entries whose process is gone (or whose pid another program now has) are ignored and swept."""
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "runtime"))
    (tmp_path / "cli").mkdir()
    cli = ServeCli(tmp_path / "cli", "parallel.tp=1")
    try:
        res = _status_from(tmp_path / "elsewhere")  # the one live tree, run from another folder
        assert res.returncode == 0 and res.stderr == "" and f"supervisor pid {cli.proc.pid}" in res.stdout, res
        stale = _stale_entries(tmp_path / "runtime" / "live")
        with Supervisor(config(*ECHO, "parallel.tp=1", "http.when=always", "http.port=0")) as sup:  # the newest
            res = _status_from(tmp_path / "elsewhere")
            assert res.returncode == 0 and f"supervisor pid {os.getpid()}" in res.stdout, res
            head, *listed = res.stderr.splitlines()
            assert head.startswith(f"2 live trees, newest first; showing the newest, {sup.endpoints.run_dir}"), head
            assert [ln.split()[:3] for ln in listed] == [[sup.endpoints.run_dir, "pid", str(os.getpid())],
                                                         [cli.run_dir, "pid", str(cli.proc.pid)]], listed
            assert "embedded in" in listed[0] and "workload=serve" in listed[1]
            res = _status_from(tmp_path / "elsewhere", "--list", "--json")
            assert [t["pid"] for t in json.loads(res.stdout)] == [os.getpid(), cli.proc.pid], res
        assert not any(p.exists() for p in stale)
        res = _status_from(tmp_path / "elsewhere", "--list")
        assert res.returncode == 0 and res.stdout.splitlines()[0].split()[:3] == [cli.run_dir, "pid",
                                                                                str(cli.proc.pid)]
    finally:
        cli.close()
    assert _status_from(tmp_path / "elsewhere", "--list").returncode == 1  # none left


def test_exit_codes_of_ours_have_words():
    from worker.protocol import EXIT_MEANINGS

    for code in (70, 71, 72, 73):
        assert EXIT_MEANINGS[code] and EXIT_MEANINGS[code] in ExitInfo(code).reason
    assert "grace" in ExitInfo(72).meaning and ExitInfo(-9).meaning.startswith("killed")
    assert "shutdown()" in ExitInfo(1).reason
    script = ExitInfo(1, script=True)  # rankvisor-run: the rank leaves with its script's own exit code
    assert "the script failed" in script.reason and "shutdown()" not in script.reason + script.meaning
    assert ExitInfo(3, script=True).reason == "exit code 3 (the script's own exit code)"
    assert ExitInfo(0, script=True).meaning == "stopped cleanly" and "grace" in ExitInfo(72, script=True).meaning
    readme = open(os.path.join(REPO, "README.md")).read()
    for code in (70, 71, 72, 73):
        assert re.search(rf"^\| {code} \|", readme, re.M), f"exit code {code} missing from README's table"


# -- the live page in a real browser ------------------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Ranks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ranks: dict[int, dict[str, str]] = {}
        self.events: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-rank" in a:
            self.ranks[int(a["data-rank"])] = a
        if a.get("class") == "event":
            self.events.append(a.get("data-kind", ""))


def _page(browser: str, port: int, tmp_path, shot: str) -> _Ranks:
    """The page's DOM after its script ran (headless Chromium), and a screenshot kept under tmp_path."""
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000"]
    url = f"http://127.0.0.1:{port}/"
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    subprocess.run([*base, f"--screenshot={tmp_path / shot}", "--window-size=1000,900", url], capture_output=True,
                   timeout=90)
    parsed = _Ranks()
    parsed.feed(dom.stdout)
    return parsed


def test_live_page_in_headless_chromium_shows_every_rank_and_a_kill(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it with apt-get)")
    cli = ServeCli(tmp_path, "parallel.tp=2", "parallel.dp=2", ONE_FOR_ONE)
    try:
        before = _page(browser, cli.port, tmp_path, "before.png")
        assert sorted(before.ranks) == [0, 1, 2, 3]
        assert {r["data-state"] for r in before.ranks.values()} == {"running"}
        victim = int(before.ranks[2]["data-pid"])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: cli.get("/readyz")[0] == 200 and victim not in
                   [w["pid"] for w in cli.status_json()["workers"]], 30, "group 1 to restart")
        after = _page(browser, cli.port, tmp_path, "after.png")
        assert sorted(after.ranks) == [0, 1, 2, 3]
        assert int(after.ranks[2]["data-pid"]) != victim and after.ranks[2]["data-restarts"] == "1"
        assert after.ranks[0]["data-pid"] == before.ranks[0]["data-pid"]  # one_for_one: group 0 untouched
        assert "exited" in after.events and "restarting" in after.events and "exited" not in before.events
        assert (tmp_path / "after.png").stat().st_size > 0
    finally:
        code = cli.close()
    assert code == 143
