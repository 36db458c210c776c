"""`python -m supervisor` as a Hydra user expects it (issue 13), FAULTS rows 43 and 44.

Flags and bad input run in-process through ``cli.main`` (no interpreter start, nothing spawned: a run that got past the
preflight would fail the test). Runs, sweeps, signals and shadowing run the real command in a child process, each
tagged with a marker in its environment so that the test can tell that nothing it started -- forkserver and resource
tracker included -- outlives the command.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import cli, config
from supervisor.signals import SignalState

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ECHO = ("workload=echo", "workload.steps=2", "parallel.tp=2", "logging.level=WARNING")
SERVE = ("workload=serve", "worker=echo", "parallel.tp=2", "logging.level=WARNING")
MARK = "RV_CLI_TEST_MARK"


# -- in-process: flags and one-line errors ---------------------------------------------------------------------------


@pytest.fixture
def run_main(monkeypatch, capfd):
    """``cli.main(argv)`` in this process -> (exit code, stdout, stderr); a tree it would start fails the test."""
    def refuse(*_a, **_k):
        raise AssertionError("the preflight let a bad configuration through to a run")

    monkeypatch.setattr(cli, "run_one", refuse)

    def call(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv), SignalState(), on_exit=lambda: None)
        except SystemExit as exc:  # argparse's --version and errors
            code = exc.code
        out, err = capfd.readouterr()
        return code, out, err

    return call


def user_conf(tmp_path: Path) -> Path:
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "big.yaml").write_text("tp: 2\ndp: 2\n")
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nparallel:\n  tp: 4\n")
    (tmp_path / "parallel" / "broken.yaml").write_text("tp: [1, 2\npp: 1\n")
    return tmp_path


FLAGS = [  # argv, what stdout must contain
    (["--cfg", "job"], ["parallel:", "tp: 1", "restart:", "strategy: never"]),
    (["--cfg", "job", "--package", "parallel"], ["# @package parallel", "tp: 1"]),
    (["--cfg", "hydra"], ["run:", "sweep:", "subdir: ${hydra.job.num}"]),
    (["--cfg", "all", "--resolve", "+runtime.env.X=${oc.env:RV_CLI_UNSET,fallback}"], ["X: fallback", "hydra:"]),
    (["--cfg", "job", "parallel.tp=4", "restart=one_for_all"], ["tp: 4", "strategy: one_for_all"]),
    (["--cfg", "job", "llm.prompt_text=Hello"], ["prompt_text:\n  - Hello"]),  # one prompt, what Hydra composes
    (["--cfg", "hydra", "hydra/job_logging=default", "hydra.run.dir=/tmp/x"], ["logging.FileHandler", "dir: /tmp/x"]),
    (["--info", "searchpath"], [config.DEFAULT_CONFIG_DIR]),
    (["--info", "defaults"], ["restart/never", "workload/tp_mlp"]),
    (["--help"], ["restart: never, one_for_all, one_for_one, rest_for_one", "Exit codes", "heartbeat_timeout_s: 5.0",
                  "--config-dir", "SIGUSR1"]),
    (["--hydra-help"], ["hydra/job_logging"]),
    (["--shell-completion", "install=bash"], ["complete"]),
    (["--version"], ["rankvisor"]),
]


@pytest.mark.parametrize("argv,expected", FLAGS, ids=[" ".join(a)[:40] for a, _ in FLAGS])
def test_flag(run_main, argv, expected):
    code, out, err = run_main(*argv)
    assert code == 0, err
    for text in expected:
        assert text in out, out[-2000:]


def test_config_dir_adds_a_users_options(run_main, tmp_path):
    code, out, err = run_main("-cd", str(user_conf(tmp_path)), "--cfg", "job", "parallel=big")
    assert code == 0 and "tp: 2" in out and "dp: 2" in out, err
    code, out, err = run_main("-cd", str(tmp_path), "-cn", "mine", "--cfg", "job")
    assert code == 0 and "tp: 4" in out, err


def test_config_path_replaces_the_primary_folder(run_main, tmp_path):
    (tmp_path / "config.yaml").write_text("defaults:\n  - base_config\n  - _self_\nparallel:\n  dp: 3\n")
    code, out, err = run_main("-cp", str(tmp_path), "--cfg", "job")
    assert code == 0 and "dp: 3" in out, err


BAD = [  # argv, the key or flag the one line must name -- each former escape of issue 13 among them
    (["--bogus"], "unrecognized arguments"),
    (["--resolve"], "--resolve"),
    (["--cfg", "job", "--info", "all"], "--run, --multirun"),
    (["-cn", "nope"], "--config-name"),
    (["-cd", "/nonexistent/conf"], "--config-dir"),
    (["--experimental-rerun", "x"], "--experimental-rerun"),
    (["logging.run_dir=/tmp/x"], "logging.run_dir"),
    (["hydra.nonsense.key=1"], "hydra.nonsense"),
    (["parallel.tp=0"], "parallel.tp"),
    (["restart=sometimes"], "restart"),
    (["transport.slots=70000"], "transport.slots"),
    (["transport.slot_bytes=8589934592"], "transport.slot_bytes"),
    (["parallel.tp=100000", "parallel.dp=1000"], "parallel.tp"),
    (["parallel.tp=64", "parallel.dp=64", "workload.hidden=1024"], "parallel"),
    (["worker.max_rss_mb=1"], "worker.max_rss_mb"),
    (["runtime.preload=[nosuchmodule]"], "runtime.preload"),
    (["+runtime.env.CUDA_VISIBLE_DEVICES=0,1"], "runtime.env.CUDA_VISIBLE_DEVICES"),
    (["-m", "parallel.tp=1,0"], "parallel.tp"),  # every job of a sweep is checked before the first starts
    (["-m", "restart=never,bogus"], "restart"),
    # round 3: these started the workers (exit 1) or were a traceback
    (["transport.max_message_bytes=100"], "transport.max_message_bytes"),
    (["worker=echo", "workload.driver=no_such_module_xyz:drive"], "workload.driver: cannot import"),
    (["worker=echo", "workload.driver=supervisor.workloads:no_such_driver"], "workload.driver: no function"),
    (["hydra.run.dir=/proc/rankvisor-x"], "hydra.run.dir: cannot write the run folder /proc/rankvisor-x"),
    (["-m", "hydra.sweep.dir=/proc/rankvisor-x", "parallel.tp=1,2"], "hydra.sweep.dir"),
]


@pytest.mark.parametrize("argv,names", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(run_main, argv, names):
    code, out, err = run_main(*argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], (code, err)


def test_yaml_syntax_error_is_one_line(run_main, tmp_path):
    code, _, err = run_main("-cd", str(user_conf(tmp_path)), "parallel=broken")
    assert code == 2 and err.count("\n") == 1 and "YAML syntax error at line" in err, err


def test_backend_ray_without_ray_is_one_line(run_main, monkeypatch):
    monkeypatch.setattr(config, "_importable", lambda name: name != "ray")
    code, _, err = run_main("backend=ray")
    assert code == 2 and err.startswith("error: backend: ray is not installed") and err.count("\n") == 1, err


def test_device_cuda_without_a_usable_gpu_is_one_line(run_main, monkeypatch):
    import supervisor.gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(supervisor.gpu, "usable_gpus", lambda: ())
    code, _, err = run_main("device=cuda")
    assert code == 2 and err.startswith("error: device: cuda requested but no GPU is usable") and err.count("\n") == 1


def test_cuda_visible_devices_naming_no_gpu_is_no_gpu(monkeypatch):
    """device=auto decides from what torch and the driver can use: an id the driver does not have is no GPU."""
    from supervisor import gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(gpu, "device_count", lambda: 0)
    monkeypatch.setattr("glob.glob", lambda _p: [])
    assert gpu.usable_gpus() == ()
    monkeypatch.setattr(gpu, "device_count", lambda: 2)
    monkeypatch.setattr(gpu, "torch_has_cuda", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,0")  # CUDA stops at the first id that names no device
    assert gpu.usable_gpus() == ("1",)
    monkeypatch.setattr(gpu, "torch_has_cuda", lambda: False)  # a CPU build of torch can use none of them
    assert gpu.usable_gpus() == ()


# -- the real command ------------------------------------------------------------------------------------------------


def command(cwd: Path, *args: str, env: dict | None = None, preexec=None) -> tuple[subprocess.Popen, str]:
    mark = uuid.uuid4().hex
    full_env = {**os.environ, "PYTHONPATH": REPO, MARK: mark, **(env or {})}
    # default signal dispositions, as from a terminal: tests/conftest.py undoes an inherited nohup or background job
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    return proc, mark


def marked(mark: str) -> list[int]:
    """Every live process started by the command tagged ``mark`` (workers, forkserver, resource tracker...)."""
    found = []
    for p in psutil.process_iter(["pid", "environ"]):
        try:
            if (p.info["environ"] or {}).get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def finish(proc: subprocess.Popen, mark: str, timeout: float = 60) -> tuple[int, str, str]:
    """Wait for the command; nothing it started may still run once it returned."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert marked(mark) == [], f"still running after the command returned: {marked(mark)}\n{err[-2000:]}"
    return proc.returncode, out, err


def run_cmd(cwd: Path, *args: str, env: dict | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc, mark = command(cwd, *args, env=env)
    return finish(proc, mark, timeout)


def test_run_folder_records_what_was_asked_and_used_and_no_secret(tmp_path):
    from supervisor.gpu import usable_gpus

    secret = "s3cr3t-" + uuid.uuid4().hex
    code, out, err = run_cmd(tmp_path, *ECHO, "hydra.run.dir=run", "+runtime.env.RV_TOKEN=${oc.env:RV_SECRET}",
                             env={"RV_SECRET": secret, "CUDA_VISIBLE_DEVICES": "0"})
    assert code == 0, err[-3000:]
    hydra_dir = tmp_path / "run" / ".hydra"
    assert {p.name for p in hydra_dir.iterdir()} >= {"config.yaml", "overrides.yaml", "hydra.yaml", "used.yaml"}
    assert "${oc.env:RV_SECRET}" in (hydra_dir / "config.yaml").read_text()
    leaked = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]
    assert leaked == []
    used = (hydra_dir / "used.yaml").read_text()
    device = "cuda" if usable_gpus() else "cpu"  # CUDA_VISIBLE_DEVICES=0 names no usable GPU on a CPU host
    assert f"asked: auto\n  used: {device}" in used and "used: forkserver" in used and "torch:" in used, used


def test_multirun_numbered_jobs_with_hydras_header(tmp_path):
    code, out, err = run_cmd(tmp_path, "-m", *ECHO[:2], "parallel.tp=1,2", "logging.level=WARNING",
                             "hydra.sweep.dir=sweep")
    assert code == 0, err[-3000:]
    assert "#0 : " in out and "#1 : " in out and "parallel.tp=2" in out, out
    for job, tp in (("0", 1), ("1", 2)):
        assert f"parallel.tp={tp}" in (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").read_text()
        assert (tmp_path / "sweep" / job / "events.jsonl").exists()


def test_job_chdir_runs_in_the_run_folder(tmp_path):
    code, _, err = run_cmd(tmp_path, *ECHO, "hydra.job.chdir=true", "hydra.run.dir=there")
    assert code == 0, err[-3000:]
    assert (tmp_path / "there" / "supervisor.log").exists() and (tmp_path / "there" / ".hydra").is_dir()


def test_row44_our_package_names_in_the_current_folder(tmp_path):
    """FAULTS 44: a worker.py and a transport/ in the current folder do not shadow ours (forkserver included), and
    the user's own modules there stay importable."""
    (tmp_path / "worker.py").write_text("raise SystemExit('the user worker.py was imported')\n")
    (tmp_path / "transport").mkdir()
    (tmp_path / "transport" / "__init__.py").write_text("raise SystemExit('the user transport was imported')\n")
    (tmp_path / "my_workers.py").write_text("from worker.tp_mlp import EchoWorker\n\nclass Mine(EchoWorker):\n"
                                            "    pass\n")
    code, _, err = run_cmd(tmp_path, *ECHO, "worker.cls=my_workers:Mine", "hydra.run.dir=run")
    assert code == 0 and "was imported" not in err, err[-3000:]


def test_row44_what_cannot_be_put_right_is_one_line(monkeypatch, tmp_path):
    from supervisor import paths

    monkeypatch.setattr(sys, "path", list(sys.path))  # ours_first reorders it
    monkeypatch.setattr(paths, "_is_ours", lambda name, home: False)
    monkeypatch.setattr(paths, "_origin", lambda name: f"/somewhere/{name}.py")
    problem = paths.ours_first()
    assert problem.startswith("/somewhere/worker.py shadows rankvisor's 'worker' package") and "\n" not in problem
    monkeypatch.setattr(paths, "_is_ours", lambda name, home: True)
    monkeypatch.setattr(paths, "root", lambda: str(tmp_path))
    (tmp_path / "supervisor").mkdir()
    (tmp_path / "supervisor" / "supervisord.py").write_text("")
    assert "supervisord is installed over rankvisor" in paths.ours_first()


# -- signals ---------------------------------------------------------------------------------------------------------


def ready_events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, filter(str.strip, path.read_text().splitlines())) if e["kind"] == "ready"]


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


STOPS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGQUIT: 131}


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(sig=st.sampled_from(sorted(STOPS)), delay=st.floats(0.0, 3.0), twice=st.booleans())
def test_row43_signal_at_a_random_instant_of_start_up(tmp_path_factory, sig, delay, twice):
    """FAULTS 43: a stop at any instant of start-up -- config loading, forkserver preload, spawn, READY, the run --
    ends the command with 128+N (the first signal's), at once, leaving nothing; a second signal forces it (a second
    SIGINT 50 ms after a first is one Ctrl-C sent twice: graceful, tests/unit/test_signals.py)."""
    cwd = tmp_path_factory.mktemp("sig")
    proc, mark = command(cwd, *SERVE, "hydra.run.dir=run")
    time.sleep(delay)
    proc.send_signal(sig)
    if twice:
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, mark, timeout=30)
    before_handlers = code == -sig or (sig == signal.SIGINT and "KeyboardInterrupt" in err)
    assert code == STOPS[sig] or (delay < 0.5 and before_handlers), (code, delay, err[-2000:])
    if code == STOPS[sig]:
        assert "Traceback" not in err and "leaked" not in err, err[-3000:]


def _nohup_in_background() -> None:  # what `nohup cmd &` in a script leaves the command with
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)


def test_signals_inherited_as_ignored_stay_ignored(tmp_path):
    """nohup in a background job: SIGHUP, SIGINT and SIGQUIT ignored when the command starts stay ignored (the tree
    outlives the terminal, as any Unix tool would); SIGTERM still stops it gracefully."""
    proc, mark = command(tmp_path, *SERVE, "hydra.run.dir=run", preexec=_nohup_in_background)
    try:
        wait_until(lambda: len(ready_events(tmp_path / "run")) >= 2, 60, "2 ranks READY")
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
            proc.send_signal(sig)
        time.sleep(1.0)
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGTERM)
    finally:
        code, _, err = finish(proc, mark)
    assert code == 143, err[-3000:]


def test_sigusr1_dumps_every_ranks_stack_into_the_logs_and_keeps_running(tmp_path):
    """The stacks (a hundred lines per process) go into supervisor.log and the rank logs; the console gets one line
    saying where."""
    proc, mark = command(tmp_path, *SERVE, "hydra.run.dir=run")
    run = tmp_path / "run"
    try:
        wait_until(lambda: len(ready_events(run)) >= 2, 60, "2 ranks READY")
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: all("most recent call first" in (run / "ranks" / f"rank{r}.log").read_text()
                               for r in (0, 1)), 20, "both ranks' stacks in their logs")
        assert proc.poll() is None  # still running
        proc.send_signal(signal.SIGTERM)
    finally:
        code, _, err = finish(proc, mark)
    assert code == 143, err[-3000:]
    log = (run / "supervisor.log").read_text()
    assert "the supervisor's Python stacks" in log and "most recent call first" in log, log[-3000:]
    said = [ln for ln in err.splitlines() if "SIGUSR1" in ln]
    assert len(said) == 1 and f"in {run}/supervisor.log, of 2 rank(s) in {run}/ranks/rank<N>.log" in said[0], err
    assert "most recent call first" not in err and "Current thread" not in err, err[-3000:]


def test_sigusr2_restarts_the_groups_one_by_one_and_keeps_running(tmp_path):
    proc, mark = command(tmp_path, *SERVE, "parallel.dp=2", "parallel.tp=1", "hydra.run.dir=run")
    try:
        wait_until(lambda: len(ready_events(tmp_path / "run")) >= 2, 60, "2 groups READY")
        first = {e["pid"] for e in ready_events(tmp_path / "run")}
        proc.send_signal(signal.SIGUSR2)
        wait_until(lambda: len(ready_events(tmp_path / "run")) >= 4, 60, "both groups READY again")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
    finally:
        code, _, err = finish(proc, mark)
    assert code == 130, err[-3000:]
    assert not first & {e["pid"] for e in ready_events(tmp_path / "run")[2:]}


def test_a_builtin_driver_given_a_foreign_worker_is_bad_input_before_anything_starts(tmp_path):
    """tp_mlp checks its own worker's answers: an echo worker under it is refused in one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "supervisor", "worker=echo", f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: worker.cls: workload=tp_mlp drives the tensor-parallel MLP"), proc.stderr
    assert not (tmp_path / "run" / "events.jsonl").exists()


# -- the built-in drivers ride through a restart their policy allows -------------------------------------------------

# Rank 1 SIGKILLs itself on its 4th step (or echo) of the first incarnation only: a kill mid-run, at the same point
# of every run whatever the machine's load (worker/faults.py).
KILL_MID_RUN = ("parallel.tp=2", "logging.level=WARNING", "hydra.run.dir=run", "+runtime.env.RV_FAULT=kill_at_call",
                "+runtime.env.RV_FAULT_ARG=4", "+runtime.env.RV_FAULT_RANK=1", "+runtime.env.RV_FAULT_ATTEMPTS=0")
FAULTY_FOR = {"tp_mlp": "worker.faults:FaultyTPWorker", "bench": "worker.faults:FaultyTPWorker",
              "echo": "worker.faults:FaultyWorker"}


def summary_value(out: str, key: str) -> str:
    line = next((ln for ln in out.splitlines() if ln.strip().startswith(key + "  ")), None)
    assert line is not None, f"no {key!r} line in the summary:\n{out}"
    return line.strip()[len(key):].strip()


@pytest.mark.parametrize("workload", sorted(FAULTY_FOR))
def test_a_builtin_driver_rides_through_a_restart_its_policy_allows(tmp_path, workload):
    """restart=one_for_all: the step a killed rank took down is sent again once the group serves again; the run
    finishes (exit 0, its check passing) and the summary counts the restart."""
    code, out, err = run_cmd(tmp_path, f"workload={workload}", f"worker.cls={FAULTY_FOR[workload]}",
                             "workload.steps=12", "restart=one_for_all", *KILL_MID_RUN)
    assert code == 0, err[-3000:]
    assert summary_value(out, "restarts") == "1; calls sent again: 1", out
    assert "PASS" in summary_value(out, "check vs reference" if workload != "echo" else "echo check"), out
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["rank"], e["reason"]) for e in events if e["kind"] == "exited" and e["reason"] == "SIGKILL"] == \
        [(1, "SIGKILL")]  # the one kill: the step was not the rest of the group's undoing twice
    assert [e["attempt"] for e in events if e["kind"] == "retry"] == [2]


def test_under_restart_never_the_kill_fails_the_run_naming_the_rank(tmp_path):
    """Fail-stop: exit 1, one error line naming the killed rank (not rank 0, whose all-reduce broke under it and
    which often answers first)."""
    code, out, err = run_cmd(tmp_path, f"worker.cls={FAULTY_FOR['tp_mlp']}", "workload.steps=12", *KILL_MID_RUN)
    assert code == 1, err[-3000:]
    last = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(last) == 1 and "rank 1 (Worker_TP1, pid" in last[0] and "SIGKILL" in last[0], err[-3000:]
    assert "rank 0" not in last[0] and last[0].endswith("strategy never restarts"), last
    assert summary_value(out, "restarts") == "0"


# -- tab completion --------------------------------------------------------------------------------------------------

QUERIES = [  # the command line up to the cursor; choices that must come
    ("rankvisor ", {"status", "parallel.", "restart=", "workload=", "hydra."}),
    ("rankvisor st", {"status"}),
    ("rankvisor restart=one", {"restart=one_for_all", "restart=one_for_one"}),
    ("rankvisor status ", {"--json", "--watch", "--restart", "--stop", "--list"}),
    ("rankvisor status --w", {"--watch"}),
    ("rankvisor --cf", {"--cfg"}),
    ("rankvisor --cfg job parallel.p", {"parallel.pp="}),
    ("python -m supervisor parallel.t", {"parallel.tp="}),
    ("/usr/bin/python3.11 -m supervisor -m parallel.tp=2 workload=e", {"workload=echo"}),
]


@pytest.mark.parametrize("line,expected", QUERIES, ids=[q for q, _ in QUERIES])
def test_completion_query_after_rankvisor_or_python_m_supervisor(run_main, monkeypatch, line, expected):
    """The query behind <TAB>: Hydra's took `-m supervisor` for overrides (a one-line error, no choice)."""
    monkeypatch.setenv("COMP_LINE", line)
    code, out, err = run_main("--shell-completion", "query=bash")
    assert (code, err) == (0, "") and expected <= set(out.split()), (out, err)


def test_completion_query_of_a_half_typed_line_is_quiet(run_main, monkeypatch):
    for line in ("rankvisor status", "rankvisor parallel.tp=2 =", "rankvisor 'x"):
        monkeypatch.setenv("COMP_LINE", line)
        code, out, err = run_main("--shell-completion", "query=bash")
        assert (code, err) == (0, ""), (line, out, err)


BASH_CASES = [  # COMP_WORDS as bash splits the line (at "=" too), the last one being completed; what must come
    (["rankvisor", "restart", "=", "one"], {"one_for_all", "one_for_one"}),
    (["python", "-m", "supervisor", "parallel.t"], {"parallel.tp="}),
    (["python3", "-m", "supervisor", "workload", "="], {"=echo", "=tp_mlp"}),  # the cursor right after "="
    (["python", "train.py", "--ep"], {"from-pythons-own-completion"}),  # not ours: python's from before
]


def _bash_line(words: list[str]) -> str:
    """The command line bash split into ``words`` (no space around a "=")."""
    line = words[0]
    for prev, w in zip(words, words[1:]):
        line += w if "=" in (prev, w) else " " + w
    return line


def test_bash_completion_completes_rankvisor_and_python_m_supervisor(tmp_path):
    """`eval "$(rankvisor --shell-completion install=bash)"` completed neither command (Hydra's script knows only
    `python app.py` and the app's own name, and its query took `-m supervisor` for overrides). bash runs the
    installed function with COMP_WORDS / COMP_LINE as it would on <TAB>; uninstall gives python its completion
    back."""
    import shlex

    (tmp_path / "bin").mkdir()
    for name in ("python", "python3"):
        os.symlink(sys.executable, tmp_path / "bin" / name)
    (tmp_path / "bin" / "rankvisor").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m supervisor \"$@\"\n")
    (tmp_path / "bin" / "rankvisor").chmod(0o755)
    cases = "".join(
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={shlex.quote(_bash_line(words))}; COMP_POINT=${{#COMP_LINE}}; COMPREPLY=()\n"
        f"_rankvisor_complete {shlex.quote(words[0])} {shlex.quote(words[-1])} {shlex.quote(words[-2])}\n"
        'echo "reply: ${COMPREPLY[*]}"\n' for words, _ in BASH_CASES)
    script = ("_pythons_own() { COMPREPLY=(from-pythons-own-completion); }\ncomplete -F _pythons_own python\n"
              'eval "$(rankvisor --shell-completion install=bash)"\ncomplete -p rankvisor python python3\n'
              f"{cases}"
              'eval "$(rankvisor --shell-completion uninstall=bash)"\ncomplete -p python\n'
              "complete -p rankvisor 2>/dev/null || echo rankvisor: none\n")
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO,
                                            "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    out = res.stdout.splitlines()
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert [ln.split()[-2:] for ln in out[:3]] == [["_rankvisor_complete", c] for c in ("rankvisor", "python",
                                                                                      "python3")], out
    replies = [set(ln.split()[1:]) for ln in out if ln.startswith("reply:")]
    assert len(replies) == len(BASH_CASES), out
    for (words, expected), got in zip(BASH_CASES, replies):
        assert expected <= got, (words, got)
    assert out[-2:] == ["complete -o default -F _pythons_own python", "rankvisor: none"], out
