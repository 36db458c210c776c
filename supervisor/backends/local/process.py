"""The processes of the tree as the supervisor sees them: a worker's spec (frozen), handle (pid, create time,
state) and channels; the weight keeper (backends/local/keeper.py) is built on the same ``TreeProcess``.

The handle owns the parent's ends of the two pipes: the death pipe (closing it tells the process to go; a warm
standby also receives its promotion there) and the status pipe (READY, start-up failures, heartbeats). Only
processes recorded here, identified by pid *and* create time, are ever signalled.
"""
from __future__ import annotations

import multiprocessing.process as mp_process
import os
import pickle
import signal
import threading
import time

import psutil

from supervisor.backends.local import startmethod
from supervisor.backends.local.oomkill import OomWitness
from supervisor.core.exits import ExitInfo
from supervisor.core.states import WorkerState
from transport import _proc
from worker.main import entry
from worker.protocol import PROMOTE_PREFIX, STOP_PREFIX, DeviceLost, Promotion
from worker.spec import WorkerSpec

# Process-wide on purpose, as descriptors are: a worker started with fork inherits every descriptor of this
# process, so it must close the parent-only pipe ends of every live worker, whichever supervisor owns it.
_OPEN: set["TreeProcess"] = set()
# Processes closed while the kernel was still tearing them down (their end read early, see ``note_exit``): their
# multiprocessing objects are closed once the status is in, by the next close() or settle_lingering().
_LINGERING: set["TreeProcess"] = set()
_LINGERING_LOCK = threading.Lock()


def held_pids() -> set[int]:
    """The pids whose multiprocessing object is still held: open, or lingering until its exit status is in.
    multiprocessing reaps these and keeps their status; nothing else may (``escalation.reap_orphans``)."""
    with _LINGERING_LOCK:
        lingering = [p.pid for p in _LINGERING]
    return {*(p.pid for p in tuple(_OPEN)), *lingering}


def parent_fds() -> tuple[int, ...]:
    """The parent-only pipe ends of every live worker: a child started with fork must close them, or it would
    keep another worker's death pipe open."""
    return tuple(fd for w in _OPEN for fd in w.parent_fds)


class TreeProcess:
    """A process of the tree that the supervisor started: its handle (pid + create time), the death pipe, the
    status pipe and its output pipes. Workers, warm standbys and the weight keeper are all of this kind."""

    label: str | int = ""  # its name in the output and the logs: the global rank, or "keeper"
    device_lost = ""  # what it said before leaving for a fatal device error (worker/protocol.py's DeviceLost)

    def _launch(self, ctx, target, args: tuple, attempt: int | str, output, extra_conns: tuple = ()) -> None:
        """Start ``target(*args, death_r, status_w, *extra_conns, close_fds?, output ends)`` (see the callers)."""
        death_r, self.death_w = ctx.Pipe(duplex=False)
        self.status_r, status_w = ctx.Pipe(duplex=False)
        # stdout, stderr and stacks pipes for RankOutput (None: the child inherits ours, unprefixed)
        pipes = [ctx.Pipe(duplex=False) for _ in range(3)] if output is not None else []
        self.proc = ctx.Process(target=target, name=str(self.label),
                                args=(*args, death_r, status_w, *extra_conns, tuple(w for _, w in pipes)))
        try:
            # the user's script must not run again in the worker; a group signal must not reach it while it starts
            with startmethod.without_main(), startmethod.shielded(ctx.get_start_method()):
                self.proc.start()
        except BaseException:
            for r, _ in pipes:
                r.close()
            raise
        finally:
            for _, w in pipes:
                w.close()
        if output is not None:
            output.add(self.label, self.proc.pid, attempt, *(r for r, _ in pipes))
        # We stop our workers ourselves (with escalation); multiprocessing's atexit join could hang on one.
        mp_process._children.discard(self.proc)
        death_r.close()
        status_w.close()
        self.pid: int = self.proc.pid
        self.sentinel = self.proc.sentinel
        self.started_at = time.monotonic()
        self.last_beat = self.started_at
        self.create_time = _create_time(self.pid)
        self.start_ticks = _proc.start_time(self.pid)
        self.pidfd = _pidfd_open(self.pid)  # readable at the exit itself, without the forkserver's relay
        self._ps: psutil.Process | None = None
        self._exitcode: int | None = None  # multiprocessing's, once it has the status
        self._early_exitcode: int | None = None  # read from the kernel while the process was still exiting
        self._closed = False
        _OPEN.add(self)

    @property
    def exit_fd(self):
        """What to wait on for the process's exit: its pidfd, else multiprocessing's sentinel. Under fork and spawn
        the sentinel is a pipe that every process it forks holds too (inherited): a worker killed while such a
        child lives would never be seen to die through it."""
        return self.pidfd if self.pidfd is not None else self.sentinel

    @property
    def parent_fds(self) -> tuple[int, ...]:
        return tuple(c.fileno() for c in (self.death_w, self.status_r) if not c.closed)

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: the signal), from multiprocessing or read from the kernel as the process
        began to exit (``note_exit``); kept after the process object is closed."""
        if self._exitcode is None and not self._closed:
            try:
                self._exitcode = self.proc.exitcode
            except ValueError:  # closed by another thread after it cached the status
                pass
        return self._exitcode if self._exitcode is not None else self._early_exitcode

    def note_exit(self) -> bool:
        """If the process has begun to exit, take its exit status from the kernel now (transport/_proc.py
        exit_status): its end is certain, and acting on it need not wait for the teardown. True if it has."""
        if self.exitcode is not None:
            return True
        status = _proc.exit_status(self.pid, self.start_ticks)
        if status is None:
            return False
        self._early_exitcode = os.waitstatus_to_exitcode(status)  # multiprocessing's convention: -signal
        return True

    def reap(self, timeout: float) -> None:
        """Collect the exit status (bounded)."""
        if self._exitcode is None and not self._closed:
            try:
                self.proc.join(timeout)
            except ValueError:  # closed by another thread (shutdown) meanwhile: its status was kept
                pass

    def is_alive(self) -> bool:
        return self.exitcode is None

    def leaving(self) -> bool:
        """Exiting, a zombie or gone, read from /proc without reaping it: safe from any thread (the monitor reaps
        the process and reports how it ended)."""
        return self._exitcode is not None or self._early_exitcode is not None or self._closed \
            or _proc.leaving(self.pid, self.start_ticks)

    def read_status(self):
        """One frame from the status pipe: None for a heartbeat, else the unpickled message. EOFError at EOF."""
        data = self.status_r.recv_bytes()
        self.last_beat = time.monotonic()
        msg = pickle.loads(data) if data else None
        if isinstance(msg, DeviceLost):  # it is leaving: its exit reason will name the cause
            self.device_lost = f"{msg.exc_type}: {msg.cause}"
        return msg

    def psutil_process(self) -> psutil.Process | None:
        """The live process, verified by create time so a recycled pid is never signalled."""
        try:
            p = self._ps
            if p is None or not p.is_running():  # is_running() compares create times: a reused pid is not ours
                p = psutil.Process(self.pid)
                if self.create_time is not None and abs(p.create_time() - self.create_time) > 0.01:
                    return None
                self._ps = p  # kept: cpu_percent() measures from the previous call on the same object
            return p
        except psutil.Error:
            return None

    def request_stop(self, grace_s: float) -> None:
        """Tell the worker to stop gracefully: a stop message, then EOF on its death pipe."""
        if self.death_w.closed:
            return
        try:
            self.death_w.send_bytes(STOP_PREFIX + b"%.3f" % grace_s)
        except OSError:
            pass
        self.death_w.close()

    def close(self) -> None:
        """Release the parent's descriptors once the process is gone. One whose end was read early is not waited
        for here (the kernel may still be tearing it down): it lingers until its status is in."""
        _OPEN.discard(self)
        self.reap(0.0 if self._early_exitcode is not None else 0.5)
        for conn in (self.death_w, self.status_r):
            if not conn.closed:
                conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        with _LINGERING_LOCK:
            _LINGERING.add(self)
        settle_lingering(0.0)

    def _release(self, timeout: float) -> bool:
        """Close the multiprocessing object once it has the exit status (waiting up to ``timeout``)."""
        if self._closed:
            return True
        self.reap(timeout)
        if self.exitcode is None or self._exitcode is None:  # (the property takes multiprocessing's status in)
            return False
        self._closed = True
        self.proc.close()
        return True

    def kill(self) -> None:
        """SIGKILL this worker (verified by create time); its death is then reported by the monitor."""
        p = self.psutil_process()
        if p is not None:
            try:
                p.kill()
            except psutil.Error:
                pass

    def dump_stack(self) -> None:
        """Ask the worker for its Python stacks (faulthandler on SIGUSR1, into its rank log: worker/output.py)."""
        p = self.psutil_process()
        if p is not None:
            try:
                p.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass


class WorkerProcess(TreeProcess):
    """One rank (or a warm standby for it): spec (frozen), handle (state, hang verdict), channels."""

    def __init__(self, spec: WorkerSpec, ctx, bcast_handle, parent_fds: tuple[int, ...] = (), output=None) -> None:
        self.spec = spec
        self.rank = spec.topology.rank
        self.label = self.global_rank
        self.state = WorkerState.STARTING
        self.hung = False
        self.stop_signal: int | None = None  # the last signal a stop sent it while it ran (escalation)
        self.output = output
        self._oom_witness: OomWitness | None = None
        self._oom_baseline: dict[str, int] = {}
        self._oom: str | None = None  # the OOM killer's record of a SIGKILL exit, once looked for
        close_fds = parent_fds if ctx.get_start_method() == "fork" else ()
        self._launch(ctx, entry, (spec, bcast_handle), "standby" if spec.standby else spec.attempt, output,
                     (close_fds,))

    @property
    def global_rank(self) -> int:
        return self.spec.topology.global_rank

    def transition(self, new: WorkerState) -> None:
        self.state = self.state.to(new, f"rank {self.rank}")

    def settle(self) -> None:
        """The process is gone: STOPPED or FAILED by how it ended (a verdict already given is kept)."""
        self.state = self.state.settle(self.exit_info().clean, f"rank {self.rank}")

    def exit_info(self) -> ExitInfo:
        code = self.exitcode
        why = getattr(self, "killed_why", "") if code is not None and code < 0 else ""
        return ExitInfo(code, hung=self.hung, hung_why=getattr(self, "hung_why", ""),
                        detail=f"{ExitInfo(code).reason.split(' (')[0]} ({why})" if why else "",
                        oom=self._oom_record(), cause=self.device_lost, script=bool(self.spec.script.script),
                        by_stop=self.stop_signal is not None)

    def note_memory_cgroup(self, witness: OomWitness | None) -> None:
        """Remember the OOM-kill counters of the memory cgroup the worker is in now (at spawn or promotion, again
        at READY: a worker may join a cgroup of its own while it starts), for telling an OOM kill from another
        SIGKILL."""
        if witness is not None:
            self._oom_witness = witness
            self._oom_baseline = witness.baseline(self.pid)

    def _oom_record(self) -> str:
        """Looked up once, when a SIGKILL exit that was not ours (hung, or killed for a reason) is first described:
        the kernel's records are written before its SIGKILL is sent, so they are there once the exit is confirmed."""
        ours = self.hung or getattr(self, "killed_why", "")
        if self._oom is None and self.exitcode == -signal.SIGKILL and not ours:
            witness = self._oom_witness
            self._oom = witness.evidence(self.pid, self._oom_baseline) if witness is not None else ""
        return self._oom or ""

    def promote(self, spec: WorkerSpec, bcast_handle) -> None:
        """A warm standby takes a rank's place: it gets the attempt's spec and the group's broadcast queue, then
        goes on like a freshly spawned worker (phases, READY on its status pipe)."""
        try:
            self.death_w.send_bytes(PROMOTE_PREFIX + pickle.dumps(Promotion(spec, bcast_handle)))
        except OSError:
            pass  # it died meanwhile: the start-up handshake finds its sentinel and names how it ended
        self.spec = spec
        self.last_beat = time.monotonic()
        if self.output is not None:
            self.output.note(self.label, f"rank {self.label} pid {self.pid} promoted from standby, attempt "
                                         f"{spec.attempt}")


def settle_lingering(timeout: float) -> bool:
    """Close the processes whose status was still on its way when they were closed, waiting up to ``timeout``
    in all (0: only those whose status is in). True if some still linger."""
    deadline = time.monotonic() + timeout
    with _LINGERING_LOCK:
        for p in list(_LINGERING):
            if p._release(max(0.0, deadline - time.monotonic())):
                _LINGERING.discard(p)
        return bool(_LINGERING)


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or gone already: the sentinel alone
        return None


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def own_pid() -> int:
    return os.getpid()
