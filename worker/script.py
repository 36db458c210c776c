"""A torchrun-style script as one supervised rank: ``ScriptWorker`` (``worker.cls=worker.script:ScriptWorker``).

The rank process is an ordinary worker (worker/main.py: death pipe, PDEATHSIG, heartbeats, READY handshake), so the
supervisor watches, restarts and stops it like any RPC worker. What it runs is the user's script, two ways:

fresh (torchrun's way, the default)::

    rank process (forkserver child) ── Popen, own session ──▶ python -u script.py args   (or -m mod / a command)
        │  load_model: start the script (before READY), pump its output (console + torchrun's log files; the
        │              supervisor prefixes each console line with [rankN]:, as for every worker)
        │  watcher thread: script exit 0  -> ``join`` returns 0; the rank stays up until the supervisor stops it
        │                  script failed  -> kill its descendants, then die the same way (code or signal), so the
        │                                    monitor sees the script's own exit and the policy acts on it
        └  shutdown / death pipe: SIGTERM to the script's process group, then SIGKILL of everything below us

fast (opt-in): ``join`` runs the script in this very process with runpy as ``__main__``; torch is already imported
(the forkserver preloaded it), so a rank reaches ``main()`` without an interpreter start or a torch import. The
script's exit is the rank's exit: ``sys.exit(n)`` / an exception (exit 1, traceback on stderr) / a signal.

Either way the script sees torchrun's environment (``script_env``) and torch's ``@record`` writes its error file
to ``TORCHELASTIC_ERROR_FILE``, which the launcher reads for the root cause. A clean exit does not end the rank:
ranks finish at different times, and only when every rank's script exited 0 is the run done (torchrun's rule).
"""
from __future__ import annotations

import atexit
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from worker import lifeline
from worker.base import Worker
from worker.rank_output import OutputPlan, start_pumps
from worker.spec import WorkerSpec

_PUMP_DRAIN_S = 0.5  # after the script exits, how long its last output may take to reach the console and files
ERROR_FILE = "error.json"


def rank_dir(log_dir: str, attempt: int, rank: int) -> str:
    """torchrun's layout: <log dir>/attempt_<restart count>/<local rank>/{stdout.log, stderr.log, error.json}."""
    return os.path.join(log_dir, f"attempt_{attempt}", str(rank))


def command(spec: WorkerSpec) -> list[str]:
    """What torchrun would exec for this script: ``python -u script args``, ``python -u -m mod args``, or the
    command itself with --no-python."""
    s = spec.script
    if s.no_python:
        return [s.script, *s.args]
    return [sys.executable, "-u", *(["-m"] if s.module else []), s.script, *s.args]


def script_env(spec: WorkerSpec, error_file: str) -> dict[str, str]:
    """torchrun's per-rank variables beyond the ones every worker already has (RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS: supervisor.core.topology). One node, one role:
    GROUP_RANK 0 of GROUP_WORLD_SIZE 1, ROLE_RANK = RANK. In a multi-node round (``spec.script.node``) the node's
    place in the job's world replaces them: RANK = the node's offset + LOCAL_RANK, WORLD_SIZE over every node, the
    round's MASTER_ADDR / MASTER_PORT, the job's restart count. No agent store runs here, so init_process_group's
    global rank 0 hosts the TCPStore on MASTER_PORT itself (TORCHELASTIC_USE_AGENT_STORE=False)."""
    topo, s, node = spec.topology, spec.script, spec.script.node
    env = dict(spec.env)
    rank, world = topo.rank, topo.world_size
    if node.multi_node:
        rank, world = node.rank_offset + topo.rank, node.world_size
        env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": node.master_addr,
                    "MASTER_PORT": str(node.master_port)})
    env.update({
        "GROUP_RANK": str(node.group_rank),
        "GROUP_WORLD_SIZE": str(node.group_world_size),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": s.role,
        "ROLE_WORLD_SIZE": str(world),
        "TORCHELASTIC_RUN_ID": s.run_id,
        "TORCHELASTIC_RESTART_COUNT": str(node.restart_count if node.restart_count >= 0 else spec.attempt),
        "TORCHELASTIC_MAX_RESTARTS": str(node.max_restarts if node.max_restarts >= 0 else s.max_restarts),
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "TORCHELASTIC_ERROR_FILE": error_file,
    })
    return env


def log_attempt(spec: WorkerSpec) -> int:
    """The attempt that names a rank's log folder: the tree's own restart attempt, or the node's round."""
    return spec.script.node.round if spec.script.node.round >= 0 else spec.attempt


class ScriptWorker(Worker):
    def init_device(self) -> None:
        """torch.distributed is the script's business: the rank process itself joins no world."""
        self.device = self.spec.device

    def load_model(self) -> None:
        s = self.spec.script
        log_dir = os.path.abspath(s.log_dir or _scratch_dir(self.spec.rendezvous))  # a script may chdir
        self.dir = rank_dir(log_dir, log_attempt(self.spec), self.rank)
        os.makedirs(self.dir, exist_ok=True)
        self.env = script_env(self.spec, os.path.join(self.dir, ERROR_FILE))
        shown = not s.local_ranks_filter or self.rank in s.local_ranks_filter
        self.plan = OutputPlan.torchrun(self.dir if s.log_dir else "", s.redirects, s.tee, shown)
        self.stopping = threading.Event()
        self.run = _InProcess(self) if s.mode == "fast" else _Subprocess(self)
        self.run.start()

    def join(self) -> int:
        """Block until this rank's script exited 0 (fresh) / run the script here (fast). A failed script never
        returns here: the rank process leaves with the script's exit, and the caller sees the rank fail."""
        return self.run.join()

    def script_pid(self) -> int:
        return self.run.pid

    def shutdown(self) -> None:
        self.stopping.set()
        self.run.stop(self.spec.stop_grace_s)


class _Subprocess:
    """fresh: the script in its own interpreter, child of this rank process, in its own session."""

    def __init__(self, worker: ScriptWorker) -> None:
        self.w = worker
        self.ended = threading.Event()
        self.code: int | None = None

    def start(self) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        env = {**os.environ, **self.w.env}
        try:
            self.proc = subprocess.Popen(command(self.w.spec), env=env, stdout=out_w, stderr=err_w,
                                         start_new_session=True)
        finally:
            os.close(out_w)
            os.close(err_w)
        self.pid = self.proc.pid
        self.pumps = start_pumps(self.w.plan, out_r, err_r)
        threading.Thread(target=self._watch, name="script-watch", daemon=True).start()

    def _watch(self) -> None:
        code = self.proc.wait()
        # Not a failure when we are being stopped: the supervisor signals our descendants (the script) before us,
        # and a rank mirroring that SIGTERM would report it as its own cause of death.
        failed = code != 0 and not self.w.stopping.is_set() and not lifeline.told_to_stop()
        if failed:  # its leftover children may hold the output pipes open: they go first, so the pumps see EOF now
            _kill_group(self.proc.pid)  # orphaned, they are no longer below us, but still in the script's group
            lifeline.kill_descendants()
        for p in self.pumps:
            p.join(_PUMP_DRAIN_S)
        self.code = code
        self.ended.set()
        if failed:
            lifeline.die_like(code)  # the same code or signal: the supervisor reports the script's own exit

    def join(self) -> int:
        self.ended.wait()
        if self.code != 0:
            time.sleep(_PUMP_DRAIN_S * 4)  # the watcher is taking this process down with the script's exit
        return int(self.code or 0)

    def stop(self, grace_s: float) -> None:
        """SIGTERM to the script's process group, up to ``grace_s`` for it to go, then SIGKILL below us."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        lifeline.kill_descendants()
        self.ended.wait(_PUMP_DRAIN_S)


class _InProcess:
    """fast: the script runs in this process (already holding torch) as ``__main__``, output through the pumps."""

    def __init__(self, worker: ScriptWorker) -> None:
        self.w = worker
        self.pid = os.getpid()

    def start(self) -> None:
        self.console = (os.dup(1), os.dup(2))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for src, dst in ((out_w, 1), (err_w, 2)):
            os.dup2(src, dst)
            os.close(src)
        self.pumps = start_pumps(self.w.plan, out_r, err_r, console=self.console)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True)  # torchrun runs python -u: output is not held back
            except (AttributeError, ValueError):
                pass

    def join(self) -> int:
        from worker.main import GracefulStop

        s = self.w.spec.script
        os.environ.update(self.w.env)
        sys.argv = [s.script, *s.args]
        try:
            if s.module:
                sys.path.insert(0, os.getcwd())  # python -m puts the working directory first
                runpy.run_module(s.script, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(s.script)))  # as python script.py does
                runpy.run_path(s.script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _system_exit_code(exc.code)
        except GracefulStop:
            raise
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception, then exit 1
            code = 1
        _run_atexit()
        if code != 0:
            self._leave(code)
        return 0

    def _leave(self, code: int) -> None:
        self._flush()
        lifeline.exit_now(code & 0xFF)

    def _flush(self) -> None:
        """Everything the script wrote reaches the console and the files: EOF on the pumps' pipes, then wait."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for console, fd in zip(self.console, (1, 2)):
            os.dup2(console, fd)
        for p in self.pumps:
            p.join(_PUMP_DRAIN_S)

    def stop(self, grace_s: float) -> None:
        lifeline.kill_descendants()
        self._flush()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _system_exit_code(code: Any) -> int:
    """sys.exit()'s rules: None is 0, an int is itself, anything else is printed and means 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_atexit() -> None:
    """The script's atexit handlers run as they would at interpreter exit (this process leaves with os._exit)."""
    try:
        atexit._run_exitfuncs()
    except BaseException:  # an atexit handler's error is printed by the interpreter and ignored; likewise here
        traceback.print_exc()


def _scratch_dir(rendezvous: str) -> str:
    """No log directory configured (the Python API without a run dir): error files go to the group's private
    rendezvous folder, removed with the supervisor."""
    path = rendezvous[len("file://"):] if rendezvous.startswith("file://") else ""
    return os.path.dirname(path) or os.path.join("/tmp", f"rankvisor-script-{os.getppid()}")
