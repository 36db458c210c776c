"""rankvisor-run with scripts written the way torchrun users write them (tests/integration/launch_scripts/).

Each test runs the launcher as its own process (``python -m supervisor.launch.cli``, what the console script runs)
in a temporary folder, so its run directory, per-rank logs and error files land there.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.helpers import REPO, gone_within, reap_adopted

SCRIPTS = os.path.join(REPO, "tests", "integration", "launch_scripts")
RUN_TIMEOUT_S = 120


class Launch:
    """One ``rankvisor-run`` process; ``OUT_DIR`` (the scripts' output folder) is the test's tmp_path."""

    def __init__(self, tmp_path, *args: str, env: dict | None = None, command: str = "supervisor.launch.cli") -> None:
        self.out = str(tmp_path)
        full_env = {**os.environ, "OUT_DIR": self.out, "PYTHONPATH": REPO, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", command, *args], cwd=self.out,
                                     env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.tree: list[psutil.Process] = []

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.close()
        return self.proc.returncode, out, err

    def wait_for(self, pattern: str, count: int, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(glob.glob(os.path.join(self.out, pattern)))
            if len(found) >= count:
                self.tree = psutil.Process(self.proc.pid).children(recursive=True)
                return found
            assert self.proc.poll() is None, f"launcher exited early: {self.proc.communicate()}"
            time.sleep(0.05)
        raise AssertionError(f"{pattern}: fewer than {count} files within {timeout} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if not pipe.closed:
                pipe.close()
        reap_adopted(self.tree)

    def rank_file(self, attempt: int, rank: int, name: str) -> str:
        (run_dir,) = glob.glob(os.path.join(self.out, "outputs", "*", "*"))
        return os.path.join(run_dir, f"attempt_{attempt}", str(rank), name)


def script(name: str) -> str:
    return os.path.join(SCRIPTS, name)


def test_every_rank_gets_torchruns_environment_arguments_and_prefixed_output(tmp_path):
    launch = Launch(tmp_path, "--nproc-per-node=2", "--max-restarts=2", "--run-id=job7", script("env_dump.py"),
                    "--lr", "0.1", "a,b=[c]")
    code, out, err = launch.finish()
    assert code == 0, err[-3000:]
    envs = [json.load(open(os.path.join(launch.out, f"env.{r}.json"))) for r in range(2)]
    for rank, env in enumerate(envs):
        assert env["argv"] == ["--lr", "0.1", "a,b=[c]"]
        assert (env["RANK"], env["LOCAL_RANK"], env["ROLE_RANK"]) == (str(rank),) * 3
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["ROLE_WORLD_SIZE"]) == ("2", "2", "2")
        assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"], env["ROLE_NAME"]) == ("0", "1", "default")
        assert (env["TORCHELASTIC_RUN_ID"], env["TORCHELASTIC_RESTART_COUNT"]) == ("job7", "0")
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2" and env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert env["TORCHELASTIC_ERROR_FILE"] == launch.rank_file(0, rank, "error.json")
        assert env["OMP_NUM_THREADS"] and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        assert f"[rank{rank}]:hello from rank {rank}" in out.replace("]: ", "]:")
        assert f"stderr of rank {rank}" in err
        assert open(launch.rank_file(0, rank, "stdout.log")).read() == f"hello from rank {rank}\n"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


@pytest.mark.parametrize("mode", ["fresh", "fast"])
def test_ddp_steps_on_gloo_match_one_process(tmp_path, mode):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, SCRIPTS)
    try:
        import ddp_steps as ref
    finally:
        sys.path.remove(SCRIPTS)
    flags = ["--fast"] if mode == "fast" else []
    code, _, err = Launch(tmp_path, "--nproc-per-node=2", *flags, script("ddp_steps.py")).finish()
    assert code == 0, err[-3000:]
    m = ref.model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(ref.STEPS):  # one process, the whole batch: DDP's averaged gradients are the same
        opt.zero_grad()
        m(torch.cat([ref.batch(step, r, 2) for r in range(2)])).pow(2).mean().backward()
        opt.step()
    got = torch.load(os.path.join(str(tmp_path), "ddp.pt"))
    for name, value in m.state_dict().items():
        assert torch.allclose(got[name], value, atol=1e-6), name


def test_fault_row_47_a_killed_rank_restarts_all_they_resume_then_a_launcher_kill_leaves_nothing(tmp_path):
    launch = Launch(tmp_path, "--nproc-per-node=2", "--max-restarts=1", script("resume.py"),
                    env={"KILL_RANK": "0", "KILL_STEP": "1", "HOLD": "1"})
    try:
        held = launch.wait_for("held.[0-9]", 2)
        for rank in range(2):
            assert open(os.path.join(launch.out, f"resumed.{rank}.0")).read() == "0"
            assert int(open(os.path.join(launch.out, f"resumed.{rank}.1")).read()) > 0  # from the snapshot
            assert open(os.path.join(launch.out, f"done.{rank}")).read() == "1"  # finished in the restarted attempt
        events = [json.loads(line) for line in open(glob.glob(os.path.join(launch.out, "outputs/*/*/events.jsonl"))[0])]
        first = next(e for e in events if e["kind"] == "exited")  # its peer may fail a moment later in a collective
        assert (first["rank"], first["code"]) == (0, -signal.SIGKILL)
        assert len([e for e in events if e["kind"] == "restarting"]) == 1
        pids = [int(p) for f in held for p in open(f).read().split()]
        launch.proc.kill()
        assert gone_within(pids, 1.0) == []  # the scripts and their children
        assert gone_within([p.pid for p in launch.tree], 5.0) == []  # rank processes, the forkserver
    finally:
        launch.close()


@pytest.mark.parametrize("mode", ["fresh", "fast"])
def test_a_script_that_raises_reports_the_root_cause_like_torchrun(tmp_path, mode):
    flags = ["--fast"] if mode == "fast" else []
    launch = Launch(tmp_path, "--nproc-per-node=2", *flags, script("raises.py"), env={"FAIL_RANK": "1"})
    code, _, err = launch.finish()
    assert code == 1
    assert "ValueError: boom from a torchrun script" in err  # the script's own traceback, through its output
    root = err.split("Root Cause (first observed failure):", 1)[1]
    assert "raises.py FAILED" in err and "rank      : 1 (local_rank: 1)" in root
    assert f"error_file: {launch.rank_file(0, 1, 'error.json')}" in root
    assert "exitcode  : 1" in root and "boom from a torchrun script" in root  # read from @record's error file


@pytest.mark.parametrize("mode", ["fresh", "fast"])
def test_every_failed_rank_is_listed_and_the_first_failure_in_time_is_the_root_cause(tmp_path, mode):
    """Rank 1 raises first (its error file says when) but is slow to leave; rank 0 then aborts, and its death is
    the one the supervisor sees first (launch_scripts/raise_then_abort.py fixes that order). Both are listed; the
    root cause is rank 1, by its error file's time, not the first death seen."""
    flags = ["--fast"] if mode == "fast" else []
    launch = Launch(tmp_path, "--nproc-per-node=2", *flags, script("raise_then_abort.py"))
    code, _, err = launch.finish()
    assert code == 1
    assert "group 0 failed (rank 0 (Worker_TP0" in err  # the death seen first: rank 0's abort
    others, root = err.split("Failures:", 1)[1].split("Root Cause (first observed failure):", 1)
    assert "rank      : 1 (local_rank: 1)" in root and "boom from a torchrun script" in root
    assert f"error_file: {launch.rank_file(0, 1, 'error.json')}" in root
    assert "rank      : 0 (local_rank: 0)" in others and "(SIGABRT)" in others


def test_killing_the_launcher_takes_every_rank_and_its_dataloader_workers(tmp_path):
    launch = Launch(tmp_path, "--nproc-per-node=2", script("loaders.py"))
    try:
        files = launch.wait_for("tree.[0-9]", 2)
        pids = [int(p) for f in files for p in open(f).read().split()]
        assert len(pids) == 6  # two scripts, two DataLoader workers each
        launch.proc.kill()
        assert gone_within(pids, 5.0) == []
        assert gone_within([p.pid for p in launch.tree], 5.0) == []  # rank processes, the forkserver
    finally:
        launch.close()


@pytest.mark.parametrize("torchrun_codes", [False, True])
def test_sigterm_stops_ranks_that_ignore_it_within_the_grace(tmp_path, torchrun_codes):
    flags = ["--torchrun-exit-codes"] if torchrun_codes else []
    launch = Launch(tmp_path, "--nproc-per-node=2", "--shutdown-timeout=1", *flags, script("ignores_sigterm.py"))
    try:
        launch.wait_for("ready.[0-9]", 2)
        below = [p.pid for p in launch.tree]
        launch.proc.send_signal(signal.SIGTERM)
        code, _, err = launch.finish(timeout=30)
        assert code == (1 if torchrun_codes else 128 + signal.SIGTERM), err[-2000:]
        assert gone_within(below, 5.0) == []
    finally:
        launch.close()


def test_dash_m_runs_a_module_as_main(tmp_path):
    launch = Launch(tmp_path, "--nproc-per-node=2", "-m", "tests.integration.launch_scripts.pkg.entry")
    code, _, err = launch.finish()
    assert code == 0, err[-3000:]
    assert [open(os.path.join(launch.out, f"module.{r}")).read() for r in range(2)] == \
        ["tests.integration.launch_scripts.pkg.entry"] * 2


def test_no_python_runs_a_shell_command(tmp_path):
    launch = Launch(tmp_path, "--nproc-per-node=2", "--no-python", "sh", "-c",
                    'echo "$RANK of $WORLD_SIZE" > "$OUT_DIR/sh.$RANK"')
    code, _, err = launch.finish()
    assert code == 0, err[-3000:]
    assert [open(os.path.join(launch.out, f"sh.{r}")).read() for r in range(2)] == ["0 of 2\n", "1 of 2\n"]


def test_the_config_form_runs_the_same_script_workload(tmp_path):
    launch = Launch(tmp_path, "workload=script", "parallel.tp=2", f"launch.script={script('env_dump.py')}",
                    "launch.args=[--x,'1,2']", "restart=one_for_all", "restart.intensity=4", command="supervisor")
    code, _, err = launch.finish()
    assert code == 0, err[-3000:]
    envs = [json.load(open(os.path.join(launch.out, f"env.{r}.json"))) for r in range(2)]
    assert [e["argv"] for e in envs] == [["--x", "1,2"]] * 2
    assert {e["TORCHELASTIC_MAX_RESTARTS"] for e in envs} == {"4"}


@pytest.mark.parametrize("args, key", [
    (["--nnodes=2:1", script("env_dump.py")], "--nnodes=2:1"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-conf=join_timeout=soon", script("env_dump.py")], "join_timeout"),
    (["--nproc-per-node=zero", "x.py"], "--nproc-per-node"),
    (["no_such_script.py"], "launch.script"),
    (["--fast", "--no-python", "sh"], "launch.mode"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, key):
    code, out, err = Launch(tmp_path, *args).finish(timeout=60)
    assert code == 2
    assert err.count("\n") == 1 and key in err, err


def test_a_config_key_a_flag_sets_too_is_one_line_and_exit_2(tmp_path):
    """`-c parallel.tp=4` silently beat `--nproc-per-node=2`; now neither wins (tests/unit/test_launch_cli.py)."""
    launch = Launch(tmp_path, "--nproc-per-node=2", "-c", "parallel.tp=4", script("env_dump.py"))
    code, out, err = launch.finish()
    assert (code, out) == (2, "") and err.splitlines() == [
        "error: -c parallel.tp=4: conflicts with --nproc-per-node, which sets parallel.tp=2; give only one of them"]
