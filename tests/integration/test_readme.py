"""Every code block of the README runs as written (issue 24: the Python API example failed as pasted).

- ```python blocks: each in a fresh interpreter, in an empty folder, with a timeout; nothing it started may outlive
  it. A block that defines pytest tests (the testing kit's) runs under pytest, beside a stand-in for the package it
  names (``mypkg.workers:MyWorker``: the user's own worker).
- ```bash blocks: every command line (``&&`` chains split) is listed in COMMANDS below, with what is done with it
  here: run as written (exit 0), run until READY and stopped with Ctrl-C (a server: exit 130), or why it cannot run
  on this machine and which test covers it instead. A command added to the README fails this test until it is listed;
  a listed command gone from the README fails it too.
- blocks with no language are not commands (the layout).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.integration.helpers import REPO
from tests.integration.test_cli import MARK, marked

README = Path(REPO) / "README.md"
OURS = ("python -m supervisor", "rankvisor", "rankvisor-run", "python -m pytest", "pip install", "curl", "echo")


@dataclass(frozen=True)
class Skip:
    why: str


RUN, SERVER = "run", "server"  # run: exit 0; server: READY, then SIGINT -> exit 130
LLM_TESTS = "tests/integration/test_llm.py and test_completions.py run it on a tiny checkpoint with a tokenizer"
COMMANDS: dict[str, str | Skip] = {
    "pip install torch==2.13.0": Skip("installs packages (this environment is set up)"),
    "pip install -e .": Skip("installs packages"),
    'pip install -e ".[test,bench]"': Skip("installs packages"),
    'pip install -e ".[ray]"': Skip("installs packages"),
    'pip install -e ".[llm]"': Skip("installs packages"),
    "python -m pytest -q": Skip("the test suite itself"),
    "python -m supervisor parallel.tp=8": RUN,
    "python -m supervisor parallel.tp=2 parallel.pp=2": RUN,
    "python -m supervisor parallel.dp=2 parallel.tp=4 restart=one_for_one": RUN,
    "python -m supervisor workload=serve restart=one_for_all": SERVER,
    "python -m supervisor -m parallel.tp=1,2,4,8 workload=bench": Skip(
        "four runs like the ones above, two minutes on a 2-core machine: tests/integration/test_cli.py runs a sweep"),
    "python -m supervisor device=cuda parallel.tp=2": Skip("needs two GPUs: tests/integration/test_cuda.py"),
    "rankvisor-run --nproc-per-node=4 --max-restarts=3 train.py --epochs 10": Skip(
        "your train.py: tests/integration/test_launch.py runs these flags on its own scripts"),
    "rankvisor-run --nproc-per-node=8 --fast train.py": Skip("your train.py: test_launch.py runs --fast"),
    "rankvisor-run --nproc-per-node=2 -c shutdown.grace_s=10 -c runtime.omp_num_threads=4 train.py": Skip(
        "your train.py: test_launch.py"),
    "rankvisor-run --nnodes=2 --node-rank=$NODE --master-addr=host0 --nproc-per-node=8 train.py": Skip(
        "several machines and your train.py: tests/integration/test_multinode.py runs N nodes on one host"),
    "rankvisor-run --nnodes=1:4 --nproc-per-node=8 --max-restarts=3 --rdzv-backend=c10d --rdzv-endpoint=host0:29400 "
    "train.py": Skip("several machines: test_multinode.py runs --nnodes=MIN:MAX with c10d on one host"),
    "python -m supervisor workload=script parallel.tp=4 launch.script=train.py 'launch.args=[--epochs,10]'": Skip(
        "your train.py: test_launch.py runs the config form"),
    "python -m supervisor backend=ray parallel.tp=2": Skip("starts a Ray instance: tests/integration/test_ray.py"),
    "python -m supervisor backend=ray ray.address=auto parallel.tp=8 parallel.pp=2": Skip("needs a Ray cluster"),
    "python -m supervisor workload=llm parallel.tp=2": RUN,
    "python -m supervisor workload=llm device=cuda llm.preset=llama-3.1-8b llm.batch=32": Skip(
        "needs a GPU with 16 GB: scripts/bench_llm.py on the lent H200"),
    "python -m supervisor workload=llm llm.checkpoint=/models/Llama-3.2-1B llm.prompt_text='[Hello]'": Skip(
        f"needs that checkpoint: {LLM_TESTS}"),
    "python -m supervisor workload=serve worker=llm": SERVER,
    "python -m supervisor workload=serve worker=llm llm.checkpoint=/models/Llama-3.2-1B parallel.dp=2 http.port=8000":
        Skip(f"needs that checkpoint: {LLM_TESTS}"),
    "curl -s 127.0.0.1:8000/v1/completions -d '{\"prompt\": \"The capital of France is\", \"max_tokens\": 16}'": Skip(
        f"needs the server above: {LLM_TESTS}"),
    "echo '{\"prompt\": [1, 2, 3], \"max_tokens\": 8}' | python -m supervisor workload=serve worker=llm "
    "workload.stdin=true": RUN,
}
# The testing kit's example names the user's worker; the test gives it one.
MYPKG = "from worker.base import Worker\n\n\nclass MyWorker(Worker):\n    pass\n"
BLOCK_TIMEOUT_S = 180
SERVER_READY_S = 90
HELPERS_EXIT_S = 10.0  # a plain script's forkserver and resource tracker exit 1-2 s after it (startmethod.py)


def blocks(lang: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), re.M | re.S)
            if m.group(1) == lang]


def command_lines() -> list[str]:
    """Each command of the bash blocks, comments stripped, ``&&`` chains split; in README order, once each."""
    out: list[str] = []
    for block in blocks("bash"):
        for line in block.splitlines():
            code = _strip_comment(line)
            for part in (p.strip() for p in code.split(" && ")):
                if part and part not in out:
                    out.append(part)
    return out


def _strip_comment(line: str) -> str:
    """The line up to a ``#`` comment outside quotes, whitespace collapsed (the command as the shell reads it)."""
    quoted, cut = None, len(line)
    for i, ch in enumerate(line):
        if quoted:
            quoted = None if ch == quoted else quoted
        elif ch in "'\"":
            quoted = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            cut = i
            break
    return " ".join(line[:cut].split())


# -- the bash blocks ---------------------------------------------------------------------------------------------------
def test_every_command_of_the_readme_is_listed_and_every_listed_one_is_there():
    found = command_lines()
    assert all(line.startswith(OURS) for line in found), [line for line in found if not line.startswith(OURS)]
    assert [c for c in found if c not in COMMANDS] == [], "README commands with no entry in COMMANDS"
    assert [c for c in COMMANDS if c not in found] == [], "COMMANDS no longer in the README"
    for block in blocks(""):  # no language: the layout, never a command
        assert not any(line.startswith(OURS) for line in block.splitlines()), block


def _shell(cwd: Path, line: str) -> tuple[subprocess.Popen, str]:
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": REPO, MARK: mark}
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, mark


def _finish(proc: subprocess.Popen, mark: str, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # The command's own processes: gone when it returns, except multiprocessing's helpers of a plain script (the
    # forkserver, the resource tracker), which leave when they see its end (the CLI stops them itself). Waited for
    # within a bound, and reaped should they have come back to this process (a child subreaper once it ran a tree).
    left = []
    for pid in marked(mark):
        try:
            left.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=HELPERS_EXIT_S)
    assert alive == [], f"still running {HELPERS_EXIT_S} s after the command returned: {alive}"
    return proc.returncode, out, err


def _wait_ready(cwd: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(cwd.glob("outputs/*/*/supervisor.log"))
        if logs and "READY in" in logs[0].read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"no READY within {SERVER_READY_S} s (exit {proc.poll()})")


RUNNABLE = [c for c, what in COMMANDS.items() if not isinstance(what, Skip)]


@pytest.mark.slow
@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("line", RUNNABLE, ids=[c[:60] for c in RUNNABLE])
def test_a_readme_command_runs_as_written(tmp_path, line):
    proc, mark = _shell(tmp_path, line)
    if COMMANDS[line] == SERVER:
        try:
            _wait_ready(tmp_path, proc)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole foreground job
        code, out, err = _finish(proc, mark, BLOCK_TIMEOUT_S)
        assert code == 130, err[-3000:]
        return
    code, out, err = _finish(proc, mark, BLOCK_TIMEOUT_S)
    assert code == 0, (out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]


# -- the python blocks -------------------------------------------------------------------------------------------------
PYTHON = blocks("python")


@pytest.mark.slow
@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", PYTHON, ids=[b.splitlines()[0][:50] for b in PYTHON])
def test_a_readme_python_block_runs_as_written(tmp_path, block):
    if "def test_" in block:
        (tmp_path / "mypkg").mkdir()
        (tmp_path / "mypkg" / "__init__.py").write_text("")
        (tmp_path / "mypkg" / "workers.py").write_text(MYPKG)
        (tmp_path / "test_readme_block.py").write_text(block)
        line = f"{shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider test_readme_block.py"
    else:
        (tmp_path / "readme_block.py").write_text(block)
        line = f"{shlex.quote(sys.executable)} readme_block.py"
    proc, mark = _shell(tmp_path, f"PYTHONPATH={shlex.quote(REPO)}:. {line}")
    code, out, err = _finish(proc, mark, BLOCK_TIMEOUT_S)
    assert code == 0, (out[-3000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    if "def test_" in block:
        assert "1 passed" in out, out
