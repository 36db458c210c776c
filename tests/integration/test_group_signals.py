"""A signal sent to the caller's whole process group reads as one signal (issue 24, major 2).

The loop lives in scripts/group_signals.py (``python scripts/group_signals.py`` is 20 instants per signal); here a
few seeded instants of SIGINT and SIGTERM sent with os.killpg to ``python -m supervisor parallel.tp=2`` started in a
session of its own, one run under ``timeout`` (which delivers the signal twice), and the structure that makes it so:
every process the command starts lives outside the caller's group, or cannot be stopped by a group signal.
"""
from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.helpers import ECHO, REPO, config
from supervisor.api import Supervisor

pytestmark = pytest.mark.timeout(300)

SEED = 20241224


def _load_script():
    name = "rankvisor_group_signals"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", "group_signals.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_group_signal_at_random_instants_reads_as_one(tmp_path, sig):
    """Seeded instants: one in the start-up (config, forkserver boot), one while the ranks start (after the first
    spawn), one in the run (after READY)."""
    gs = _load_script()
    rng = random.Random(f"{SEED}-{sig}")
    rounds = [gs.one_round(sig, rng.uniform(0.0, 1.5), str(tmp_path)),
              gs.one_round(sig, rng.uniform(0.0, 0.2), str(tmp_path), via="killpg after spawn"),
              gs.one_round(sig, rng.uniform(0.0, 1.0), str(tmp_path), via="killpg after READY")]
    assert all(not r.problems for r in rounds), gs.table(rounds) + "\n" + rounds[-1].stderr[-3000:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_rankvisor_run_too(tmp_path, sig):
    gs = _load_script()
    r = gs.one_round(sig, random.Random(f"{SEED}-run-{sig}").uniform(0.0, 1.0), str(tmp_path),
                     via="killpg after READY", launcher=True)
    assert not r.problems, gs.table([r]) + "\n" + r.stderr[-3000:]


def test_timeout_delivers_it_twice_and_it_still_reads_as_one(tmp_path):
    """timeout(1) signals the command, then its whole group: the second delivery is the first one, not a second
    Ctrl-C that forces the stop ("stopping at once")."""
    gs = _load_script()
    r = gs.one_round("SIGTERM", 3.0, str(tmp_path), via="timeout")
    assert not r.problems, gs.table([r]) + "\n" + r.stderr[-3000:]


def test_the_tree_lives_outside_the_callers_group(tmp_path):
    """While the command runs: the forkserver and every worker are in sessions of their own; the resource tracker,
    left in the caller's group, ignores SIGINT and SIGTERM and holds SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 blocked."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "workload=serve", *ECHO, "parallel.tp=2",
                             f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        tree = _wait_for_tree(proc, tmp_path / "run", size=5)  # command, tracker, forkserver, 2 workers
        group = os.getpgid(proc.pid)
        in_group = {p.pid for p in tree if _pgid(p.pid) == group}
        tracker = in_group - {proc.pid}
        assert len(tracker) == 1, [(p.pid, p.cmdline()[-1][:60]) for p in tree]
        assert "resource_tracker" in " ".join(psutil.Process(*tracker).cmdline())
        blocked, ignored = _masks(*tracker)
        assert {signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2} <= blocked
        assert {signal.SIGINT, signal.SIGTERM} <= ignored
        others = [p.pid for p in tree if p.pid not in in_group]
        assert all(os.getsid(pid) == pid for pid in others), [(pid, os.getsid(pid)) for pid in others]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()


def _wait_for_tree(proc: subprocess.Popen, run_dir, size: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 60
    events = run_dir / "events.jsonl"
    while True:
        if events.exists() and "group_ready" in events.read_text():
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
            if len(tree) >= size:
                return tree
        assert proc.poll() is None and time.monotonic() < deadline, f"no READY tree (exit {proc.poll()})"
        time.sleep(0.05)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _masks(pid: int) -> tuple[set[int], set[int]]:
    """(blocked, ignored) signals of ``pid``, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = int(value.strip(), 16) if key in ("SigBlk", "SigIgn") else None
    as_set = lambda bits: {n for n in range(1, 65) if bits & (1 << (n - 1))}  # noqa: E731
    return as_set(fields["SigBlk"]), as_set(fields["SigIgn"])


def test_a_rank_stopped_by_an_outsiders_sigterm_says_so():
    """`kill PID` of a rank (or systemd's SIGTERM to every process of a unit) is not a clean stop the supervisor
    asked for: the rank stops gracefully, then leaves by SIGTERM, and that is the cause the supervisor reports."""
    with Supervisor(config(*ECHO, "parallel.tp=2", "restart=one_for_one")) as sup:
        victim = sup.pids()[1]
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not [e for e in sup.events.of_kind("exited") if e["pid"] == victim]:
            assert time.monotonic() < deadline, "the rank never exited"
            time.sleep(0.02)
        (exited,) = [e for e in sup.events.of_kind("exited") if e["pid"] == victim]
        assert (exited["reason"], exited["code"]) == ("SIGTERM", -signal.SIGTERM)
        assert sup.wait_until_serving(timeout=30) and sup.collective_rpc("echo", args=(1,), timeout=10) == [1, 1]
    assert [e["reasons"] for e in sup.events.of_kind("stopped")][-1] == ["exit 0", "exit 0"]  # ours: clean
