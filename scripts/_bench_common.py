"""Shared helpers of scripts/bench_startup.py and scripts/bench_recovery.py (not a benchmark itself).

    stats        median / p99 (nearest rank) / max, paired ratios, table printing
    Reaper       every process a benchmark starts is recorded by pid + create time and killed by pid (children
                 first) in a finally block; never by name, never by process group of someone else
    run_command  a subprocess with a hard timeout, in its own session, its whole tree killed on timeout
    Watchdog     a hard deadline for the whole script: dump stacks, kill what we started, exit 3
    wait_until   polling with a hard timeout (every wait in these scripts is bounded)

Run as a script (``python scripts/_bench_common.py``, normally under torchrun) it is the torchrun peer's worker:
import torch, ``init_process_group("gloo")``, record a READY timestamp per rank in $BENCH_DIR, then either exit
(BENCH_MODE=exit) or idle until killed (BENCH_MODE=serve). BENCH_DEAF_RANK=r makes rank r ignore SIGTERM and
SIGINT (the peer of worker.faults' ignore_sigterm).
"""
from __future__ import annotations

import faulthandler
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PY = sys.executable


# ---------------------------------------------------------------------------------------------------------------
# statistics and tables
def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): with fewer than 100 samples p99 is the max."""
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    if not xs:
        return float("nan")
    return xs[max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))]


def vmax(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return max(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios (samples paired by round: drift of a noisy machine cancels out)."""
    return median([ratio(a, b) for a, b in zip(num, den) if a is not None and b is not None])


def f_s(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f} s"


def f_ms(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.{digits}f} ms"


def f_x(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}x"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def le(value: float, bound: float) -> bool | None:
    return None if value is None or math.isnan(value) else value <= bound


def ge(value: float, bound: float) -> bool | None:
    return None if value is None or math.isnan(value) else value >= bound


def format_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    out = [f"== {title}", "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    for r in rows:
        out.append("  ".join((c.rjust(w) if _numeric(c) else c.ljust(w)) for c, w in zip(r, widths)))
    out += [f"   {n}" for n in notes]
    return "\n".join(out)


def _numeric(c: str) -> bool:
    return bool(re.match(r"^[<>≤≥]?\s*-?[\d.]+( ?(s|ms|x|%))?$|^n/a$", c))


def log(msg: str) -> None:
    """Progress goes to stderr; the tables go to stdout, last."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotate(seq: Sequence[Any], r: int) -> list[Any]:
    """Round r of an interleaved schedule: A B C, B C A, C A B, ... so no peer always goes first."""
    r %= max(1, len(seq))
    return list(seq[r:]) + list(seq[:r])


# ---------------------------------------------------------------------------------------------------------------
# waiting, processes
def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.005) -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes (returns None)."""
    deadline = time.monotonic() + timeout
    while True:
        out = pred()
        if out:
            return out
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def alive(pid: int, create_time: float | None = None) -> bool:
    """Alive and not a zombie (a zombie child of ours is reaped here). With create_time: that very process."""
    import psutil

    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.05:
            return False
        if p.status() == psutil.STATUS_ZOMBIE:
            _reap_if_child(pid)
            return False
        return True
    except psutil.Error:
        return False


def _reap_if_child(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class Reaper:
    """Every process we start (and every worker we learn about) by pid + create time; kill_all() kills those
    still alive, their descendants first, with SIGKILL, then reaps the ones that are our children."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, float | None] = {}

    def track(self, *pids: int) -> None:
        with self._lock:
            for pid in pids:
                if pid and pid not in self._procs:
                    self._procs[pid] = create_time(pid)

    def track_tree(self, pid: int) -> list[int]:
        """``pid`` and its current descendants."""
        import psutil

        found = [pid]
        try:
            found += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            pass
        self.track(*found)
        return found

    def kill(self, pids: Iterable[int]) -> list[int]:
        """SIGKILL those of ``pids`` that are still the processes we recorded (descendants first); returns the
        ones that were alive."""
        import psutil

        targets: list[psutil.Process] = []
        for pid in pids:
            ct = self._procs.get(pid)
            if not alive(pid, ct):
                continue
            try:
                p = psutil.Process(pid)
                targets += [c for c in p.children(recursive=True) if c not in targets]
                targets.append(p)
            except psutil.Error:
                continue
        for p in targets:
            try:
                p.send_signal(signal.SIGCONT)  # a SIGSTOPped process dies from SIGKILL too; harmless otherwise
                p.kill()
            except psutil.Error:
                pass
        try:
            psutil.wait_procs(targets, timeout=2.0)
        except psutil.Error:
            pass
        for p in targets:
            _reap_if_child(p.pid)
        return [p.pid for p in targets]

    def kill_all(self) -> list[int]:
        with self._lock:
            pids = list(self._procs)
        killed = self.kill(reversed(pids))  # later ones first: workers before their launchers
        self.reap_children()
        return killed

    @staticmethod
    def reap_children() -> None:
        """Reap zombie children of ours (orphans re-parented to us when we are a child subreaper)."""
        import psutil

        try:
            kids = psutil.Process().children()
        except psutil.Error:
            return
        for c in kids:
            try:
                if c.status() == psutil.STATUS_ZOMBIE:
                    _reap_if_child(c.pid)
            except psutil.Error:
                pass


REAPER = Reaper()


@dataclass
class CmdResult:
    args: list[str]
    rc: int | None
    out: str
    err: str
    t0_unix: float  # time.time() just before Popen
    wall_s: float  # Popen -> exit (or -> the timeout)
    timed_out: bool

    def tail(self, n: int = 1500) -> str:
        return (self.out[-n:] + "\n" + self.err[-n:]).strip()


def run_command(args: list[str], timeout: float, cwd: str | None = None, env: dict[str, str] | None = None,
                reaper: Reaper = REAPER) -> CmdResult:
    """Run ``args`` in its own session with a hard timeout; on timeout its whole tree is killed by pid."""
    t0u, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    reaper.track(proc.pid)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        reaper.track_tree(proc.pid)
        reaper.kill([proc.pid])
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            out, err = "", ""
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt, watchdog): the tree goes, by pid
            reaper.track_tree(proc.pid)
            reaper.kill([proc.pid])
    return CmdResult(args, proc.returncode, out or "", err or "", t0u, time.monotonic() - t0, timed_out)


def spawn(args: list[str], cwd: str | None = None, env: dict[str, str] | None = None, stdout=None, stderr=None,
          reaper: Reaper = REAPER) -> subprocess.Popen:
    """A long-lived child in its own session (so it can be signalled alone), recorded for cleanup."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout or subprocess.DEVNULL,
                            stderr=stderr or subprocess.DEVNULL, start_new_session=True)
    reaper.track(proc.pid)
    return proc


def stop_process(proc: subprocess.Popen, reaper: Reaper = REAPER) -> None:
    """Kill a child we started (and its descendants, by pid) and reap it. Idempotent."""
    if proc.poll() is None:
        reaper.track_tree(proc.pid)
        reaper.kill([proc.pid])
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


class Watchdog:
    """A hard deadline for a whole benchmark script: on expiry, dump every thread's stack, kill everything we
    started (by pid) and leave with exit code 3. SIGTERM to the script is turned into KeyboardInterrupt so that
    the finally blocks run."""

    def __init__(self, seconds: float, reaper: Reaper = REAPER, cleanup: Callable[[], Any] | None = None) -> None:
        self.reaper = reaper
        self.cleanup = cleanup
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True
        self.seconds = seconds

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()

    def _expire(self) -> None:
        print(f"\nwatchdog: the benchmark ran past {self.seconds:.0f} s; stacks follow, then cleanup", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(all_threads=True)
        try:
            self.reaper.kill_all()
            if self.cleanup is not None:
                self.cleanup()
        finally:
            os._exit(3)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


class TempDir:
    """A scratch directory (run dirs of the CLI, torchrun READY files, TMPDIR of children), removed at exit."""

    def __init__(self, prefix: str) -> None:
        self.path = tempfile.mkdtemp(prefix=prefix)

    def sub(self, name: str) -> str:
        path = os.path.join(self.path, name)
        os.makedirs(path, exist_ok=True)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the supervisor CLI
_READY_RE = re.compile(r"start-up to READY \(from the command's start\)\s+([\d.]+) s")
_SHUTDOWN_RE = re.compile(r"^\s+shutdown\s+([\d.]+) s", re.M)
_RUN_DIR_RE = re.compile(r"\(run dir ([^)]+)\)")


def parse_summary(out: str) -> dict[str, float]:
    got: dict[str, float] = {}
    m = _READY_RE.search(out)
    if m:
        got["ready_s"] = float(m.group(1))
    m = _SHUTDOWN_RE.search(out)
    if m:
        got["shutdown_s"] = float(m.group(1))
    return got


def run_dir_of(stderr_text: str, cwd: str) -> str | None:
    m = _RUN_DIR_RE.search(stderr_text)
    if not m:
        return None
    path = m.group(1).strip()
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def read_events(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "events.jsonl")
    events = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        events.append(json.loads(line))
                    except json.JSONDecodeError:  # a line being written
                        pass
    except OSError:
        pass
    return events


def supervisor_config(*overrides: str):
    """An in-process Config: quiet logs, no run-directory files (events stay in memory)."""
    from supervisor.config import load_config

    quiet_loguru()

    return load_config(["logging.events=false", "logging.level=WARNING", *overrides])


def quiet_loguru(level: str = "ERROR") -> None:
    """In process, nobody applies logging.level to loguru (the CLI does): keep the supervisor's DEBUG lines (one
    per event) off stderr."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level, format="{time:HH:mm:ss.SSS} | {level: <7} | supervisor | {message}")


def stop_forkserver() -> None:
    """Stop the multiprocessing forkserver that an in-process Supervisor started in this process (by its pid)."""
    try:
        from multiprocessing import forkserver

        fs = forkserver._forkserver  # type: ignore[attr-defined]
        pid = fs._forkserver_pid
    except Exception:
        return
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError, OSError):
        pass
    try:  # let multiprocessing forget it, as its own _stop() would after the server exits
        os.close(fs._forkserver_alive_fd)
        address = fs._forkserver_address
        fs._forkserver_alive_fd = fs._forkserver_pid = fs._forkserver_address = None
        if address and not address.startswith("\0"):
            os.unlink(address)
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------------
# the torchrun peer
def torchrun_args(nproc: int, *extra: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
            os.path.abspath(__file__)]


def torchrun_ready(bench_dir: str, attempt: int = 0) -> dict[int, dict[str, Any]]:
    """rank -> {"pid", "t_ready", "t_start"} for the READY files of one torchrun attempt (restart count)."""
    got = {}
    prefix = f"ready-a{attempt}-r"
    try:
        names = os.listdir(bench_dir)
    except OSError:
        return got
    for name in names:
        if name.startswith(prefix) and name.endswith(".json"):
            try:
                with open(os.path.join(bench_dir, name)) as f:
                    got[int(name[len(prefix):-5])] = json.load(f)
            except (OSError, ValueError):
                pass
    return got


def torchrun_done(bench_dir: str) -> dict[int, float]:
    got = {}
    for name in os.listdir(bench_dir):
        if name.startswith("done-r") and name.endswith(".json"):
            try:
                with open(os.path.join(bench_dir, name)) as f:
                    got[int(name[6:-5])] = json.load(f)["t_done"]
            except (OSError, ValueError, KeyError):
                pass
    return got


def _write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # readers never see a half-written file


def _torchrun_worker() -> int:
    t_start = time.time()
    bench_dir = os.environ["BENCH_DIR"]
    mode = os.environ.get("BENCH_MODE", "exit")
    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("BENCH_DEAF_RANK", "") == str(rank):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    _write_json(os.path.join(bench_dir, f"ready-a{attempt}-r{rank}.json"),
                {"pid": os.getpid(), "t_ready": time.time(), "t_start": t_start})
    if mode == "serve":
        while True:  # until torchrun (or the benchmark) stops us
            time.sleep(1)
    dist.destroy_process_group()
    _write_json(os.path.join(bench_dir, f"done-r{rank}.json"), {"t_done": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun_worker())


def cleanup(tmp) -> None:
    """End of a benchmark run: our forkserver, every process we recorded, the scratch folder."""
    stop_forkserver()
    killed = REAPER.kill_all()
    if killed:
        log(f"cleanup: killed leftover processes {killed}")
    tmp.remove()
