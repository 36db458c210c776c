#!/usr/bin/env python
"""Signals to the whole process group, at random instants of start-up and run (issue 24, major 2).

A terminal's Ctrl-C reaches every process of the foreground group; ``timeout``, ``kill -- -PGID``, systemd and
Kubernetes signal whole groups too. Each round starts ``python -m supervisor parallel.tp=2`` (a long tp_mlp run) in a
session and process group of its own, waits until the command has installed its signal handlers (before that,
Python's own defaults apply to any program), then a random instant more, sends the signal to the whole group with
``os.killpg``, and checks what a person would see:

* the exit code is 128+N (130 for SIGINT, 143 for SIGTERM),
* every rank was stopped by the supervisor ("exit 0" in events.jsonl's ``stopped``): the group signal did not reach
  a rank, nor the forkserver that reports the ranks' exit statuses (dead, it made every one "exit 255"),
* stderr holds a few lines at most, no traceback and no "stopping at once" (one signal, read as one),
* nothing the command started is left: this script is a child subreaper, so whatever the command started and left
  behind (forkserver, resource tracker, a worker, its children) comes back to it as a child.

``--timeout`` rounds run the command under ``timeout --preserve-status -s SIG D`` instead, which delivers the signal
twice (to the command, then to its whole group): it must still read as one signal. ``--launcher`` runs
``rankvisor-run --nproc-per-node=2 --no-python sleep 600`` instead of ``python -m supervisor``.

    python scripts/group_signals.py                      # 20 instants each for SIGINT and SIGTERM, seed printed
    python scripts/group_signals.py --instants 5 --spawn 5 --timeout 5 --seed 7
    python scripts/group_signals.py --launcher --instants 5
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from supervisor.backends.local.escalation import become_subreaper  # noqa: E402

MAX_STDERR_LINES = 8  # the run's own INFO lines (starting, READY, stopped, exit N) and nothing more
HANDLERS_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 60.0
HUMAN_WORDS = ("Traceback", "stopping at once", "Error executing job", "KeyboardInterrupt", "nan ms")


@dataclass
class Round:
    sig: str
    at_s: float  # the instant: seconds after the command's handlers were in place (--timeout: after its start)
    via: str  # "killpg", "killpg after spawn" / "after READY" (at_s counts from the first spawn / READY), "timeout"
    phase: str = ""  # how far the tree had got when the signal went out (from events.jsonl)
    reasons: list[str] = field(default_factory=list)  # how each rank ended (events.jsonl: stopped)
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    left: list[int] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return 128 + signal.Signals[self.sig].value

    @property
    def problems(self) -> list[str]:
        out = [] if self.code == self.expected else [f"exit {self.code}, expected {self.expected}"]
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        if len(lines) > MAX_STDERR_LINES:
            out.append(f"{len(lines)} lines on stderr")
        out += [f"{word!r} on stderr" for word in HUMAN_WORDS if word in self.stderr]
        if " nan" in self.stdout:
            out.append("'nan' in the summary")
        if any(why != "exit 0" for why in self.reasons):
            out.append(f"ranks ended {self.reasons}")
        if self.left:
            out.append(f"left behind: pids {self.left}")
        return out


def descendants() -> set[int]:
    """Our live descendants. Adopted orphans' zombies are reaped on the way (we are a child subreaper)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                if p.ppid() == os.getpid():
                    os.waitpid(p.pid, os.WNOHANG)
            else:
                out.add(p.pid)
        except (psutil.Error, ChildProcessError):
            pass
    return out


def catches_sigterm(pid: int) -> bool:
    """The command has installed its handlers: SIGTERM is caught (Python itself catches only SIGINT)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def events(round_dir: str) -> list[dict]:
    """The round's events.jsonl (hydra.run.dir, or rankvisor-run's outputs/DATE/TIME below the round's folder)."""
    paths = glob.glob(os.path.join(round_dir, "**", "events.jsonl"), recursive=True)
    if not paths:
        return []
    with open(paths[0]) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # a line being written is skipped


def phase_at(run_dir: str, when: float) -> str:
    """"config" (no worker spawned yet), "starting" (spawned, not READY) or "running", at unix time ``when``."""
    kinds = {e["kind"] for e in events(run_dir) if e["time"] <= when}
    return "running" if "group_ready" in kinds else "starting" if "started" in kinds else "config"


def command(round_dir: str, tp: int, launcher: bool) -> list[str]:
    if launcher:  # its run folder: outputs/DATE/TIME below the working directory, the round's folder
        return [sys.executable, "-m", "supervisor.launch.cli", f"--nproc-per-node={tp}", "--no-python", "sleep", "600"]
    return [sys.executable, "-m", "supervisor", f"parallel.tp={tp}", "workload.steps=100000000",
            f"hydra.run.dir={os.path.join(round_dir, 'run')}"]


def one_round(sig: str, at_s: float, work_dir: str, tp: int = 2, via: str = "killpg",
              launcher: bool = False) -> Round:
    """Start the command in a new session, signal its whole group ``at_s`` after its handlers are in place (after
    the first worker's spawn, or READY, with via="killpg after spawn" / "killpg after READY"; by timeout(1), ``at_s``
    after its start, with via="timeout")."""
    r = Round(sig, at_s, via)
    become_subreaper()  # what the command leaves behind comes back to us, however far below it was
    before = descendants()
    run_dir = os.path.join(work_dir, uuid.uuid4().hex)
    os.makedirs(run_dir)
    env = {**os.environ, "PYTHONPATH": ROOT}
    argv = command(run_dir, tp, launcher)
    if via == "timeout":
        argv = ["timeout", "--preserve-status", "-s", sig, f"{at_s:.3f}", *argv]
    proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # under timeout(1) the signal goes out at_s after its start (give or take the exec of the command)
        sent_at = time.time() + at_s if via == "timeout" else _signal(proc, r, run_dir)
        r.stdout, r.stderr = proc.communicate(timeout=EXIT_TIMEOUT_S)
        r.code = proc.returncode
        r.phase = phase_at(run_dir, sent_at)
        r.reasons = [why for e in events(run_dir) if e["kind"] == "stopped" for why in e["reasons"]]
    finally:
        if proc.poll() is None:  # a hang: the round fails, and nothing of it may outlive us
            os.killpg(proc.pid, signal.SIGKILL)
            r.stdout, r.stderr = proc.communicate()
            r.code = None
    r.left = sorted(descendants() - before)
    for pid in r.left:  # report them, then do not leave them to the next round
        _kill(pid)
    return r


def _signal(proc: subprocess.Popen, r: Round, run_dir: str) -> float:
    deadline = time.monotonic() + HANDLERS_TIMEOUT_S
    while not (catches_sigterm(proc.pid) and _reached(run_dir, r.via)):
        if proc.poll() is not None:
            return time.time()  # it ended before the instant came: its exit code tells the round what happened
        if time.monotonic() > deadline:
            raise RuntimeError(f"the command did not get that far in {HANDLERS_TIMEOUT_S} s")
        time.sleep(0.002)
    time.sleep(r.at_s)
    sent_at = time.time()
    os.killpg(proc.pid, signal.Signals[r.sig])
    return sent_at


_AFTER = {"spawn": ("starting", "running"), "READY": ("running",)}  # via "killpg after ..." waits for these phases


def _reached(run_dir: str, via: str) -> bool:
    phases = next((phases for word, phases in _AFTER.items() if word in via), None)
    return phases is None or phase_at(run_dir, time.time()) in phases


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def instants(rng: random.Random, n: int, span_s: float) -> list[float]:
    """``n`` instants in [0, span_s), one in each of n equal slices (stratified: the early start-up is covered as
    surely as the run), in random order."""
    out = [(i + rng.random()) * span_s / n for i in range(n)]
    rng.shuffle(out)
    return out


def table(rounds: list[Round]) -> str:
    head = f"{'signal':<8} {'via':<18} {'at s':>6} {'phase':<9} {'exit':>5} {'stderr':>6}  result"
    rows = [head]
    for r in sorted(rounds, key=lambda r: (r.via, r.sig, r.at_s)):
        lines = len([ln for ln in r.stderr.splitlines() if ln.strip()])
        rows.append(f"{r.sig:<8} {r.via:<18} {r.at_s:>6.3f} {r.phase:<9} {str(r.code):>5} {lines:>6}  "
                    f"{'ok' if not r.problems else '; '.join(r.problems)}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instants", type=int, default=20, help="instants per signal (sent with os.killpg)")
    ap.add_argument("--spawn", type=int, default=0, help="rounds per signal 0-0.25 s after the first spawn")
    ap.add_argument("--timeout", type=int, default=0, help="rounds per signal under timeout(1)")
    ap.add_argument("--span", type=float, default=5.0, help="instants fall in [0, span) seconds")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--launcher", action="store_true", help="rankvisor-run instead of python -m supervisor")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"seed {seed}", flush=True)
    rng = random.Random(seed)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="rv-group-signals-") as work:
        for sig in ("SIGINT", "SIGTERM"):
            for at in instants(rng, args.instants, args.span):
                rounds.append(one_round(sig, at, work, args.tp, launcher=args.launcher))
            for at in instants(rng, args.spawn, 0.25):
                rounds.append(one_round(sig, at, work, args.tp, via="killpg after spawn", launcher=args.launcher))
            for at in instants(rng, args.timeout, args.span):
                rounds.append(one_round(sig, 0.5 + at, work, args.tp, via="timeout", launcher=args.launcher))
    print(table(rounds))
    bad = [r for r in rounds if r.problems]
    for r in bad:
        print(f"\n--- {r.sig} via {r.via} at {r.at_s:.3f} s: stderr ---\n{r.stderr[-3000:]}")
    print(f"\n{len(rounds) - len(bad)} of {len(rounds)} rounds read as one signal (seed {seed})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
