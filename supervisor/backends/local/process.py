"""One worker process as the supervisor sees it: spec (frozen), handle (pid, create time, state), channels.

The handle owns the parent's ends of the two pipes: the death pipe (closing it tells the worker to go) and the
status pipe (READY, start-up failures, heartbeats). Only processes recorded here, identified by pid *and*
create time, are ever signalled.
"""
from __future__ import annotations

import multiprocessing.process as mp_process
import os
import pickle
import signal
import time

import psutil

from supervisor.backends.local import startmethod
from supervisor.core.exits import ExitInfo
from worker.main import entry
from supervisor.core.states import WorkerState
from worker.spec import WorkerSpec

# Process-wide on purpose, as descriptors are: a worker started with fork inherits every descriptor of this
# process, so it must close the parent-only pipe ends of every live worker, whichever supervisor owns it.
_OPEN: set["WorkerProcess"] = set()


def parent_fds() -> tuple[int, ...]:
    """The parent-only pipe ends of every live worker: a child started with fork must close them, or it would
    keep another worker's death pipe open."""
    return tuple(fd for w in _OPEN for fd in w.parent_fds)


class WorkerProcess:
    def __init__(self, spec: WorkerSpec, ctx, bcast_handle, parent_fds: tuple[int, ...] = (), output=None) -> None:
        self.spec = spec
        self.rank = spec.topology.rank
        self.state = WorkerState.STARTING
        self.hung = False
        death_r, self.death_w = ctx.Pipe(duplex=False)
        self.status_r, status_w = ctx.Pipe(duplex=False)
        close_fds = parent_fds if ctx.get_start_method() == "fork" else ()
        # stdout/stderr pipes for RankOutput (None: the worker inherits ours, unprefixed)
        pipes = [ctx.Pipe(duplex=False) for _ in range(2)] if output is not None else []
        self.proc = ctx.Process(target=entry, name=spec.topology.name,
                                args=(spec, bcast_handle, death_r, status_w, close_fds, tuple(w for _, w in pipes)))
        try:
            with startmethod.without_main():  # the user's script must not run again in the worker
                self.proc.start()
        except BaseException:
            for r, _ in pipes:
                r.close()
            raise
        finally:
            for _, w in pipes:
                w.close()
        if output is not None:
            output.add(self.global_rank, self.proc.pid, spec.attempt, *(r for r, _ in pipes))
        # We stop our workers ourselves (with escalation); multiprocessing's atexit join could hang on one.
        mp_process._children.discard(self.proc)
        death_r.close()
        status_w.close()
        self.pid: int = self.proc.pid
        self.sentinel = self.proc.sentinel
        self.started_at = time.monotonic()
        self.last_beat = self.started_at
        self.create_time = _create_time(self.pid)
        self._ps: psutil.Process | None = None
        self._exitcode: int | None = None
        self._closed = False
        _OPEN.add(self)

    @property
    def global_rank(self) -> int:
        return self.spec.topology.dp_rank * self.spec.topology.world_size + self.rank

    def transition(self, new: WorkerState) -> None:
        self.state = self.state.to(new, f"rank {self.rank}")

    def settle(self) -> None:
        """The process is gone: STOPPED or FAILED by how it ended (a verdict already given is kept)."""
        self.state = self.state.settle(self.exit_info().clean, f"rank {self.rank}")

    @property
    def parent_fds(self) -> tuple[int, ...]:
        return tuple(c.fileno() for c in (self.death_w, self.status_r) if not c.closed)

    @property
    def exitcode(self) -> int | None:
        """multiprocessing's exit code (negative: the signal), kept after the process object is closed."""
        if self._exitcode is None and not self._closed:
            try:
                self._exitcode = self.proc.exitcode
            except ValueError:  # closed by another thread after it cached the status
                pass
        return self._exitcode

    def reap(self, timeout: float) -> None:
        """Collect the exit status (bounded)."""
        if self._exitcode is None and not self._closed:
            try:
                self.proc.join(timeout)
            except ValueError:  # closed by another thread (shutdown) meanwhile: its status was kept
                pass

    def is_alive(self) -> bool:
        return self.exitcode is None

    def exit_info(self) -> ExitInfo:
        return ExitInfo(self.exitcode, hung=self.hung, hung_why=getattr(self, "hung_why", ""))

    def read_status(self):
        """One frame from the status pipe: None for a heartbeat, else the unpickled message. EOFError at EOF."""
        data = self.status_r.recv_bytes()
        self.last_beat = time.monotonic()
        return pickle.loads(data) if data else None

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
            self.death_w.send_bytes(b"stop:%.3f" % grace_s)
        except OSError:
            pass
        self.death_w.close()

    def close(self) -> None:
        """Release the parent's descriptors once the process is gone (reaped)."""
        _OPEN.discard(self)
        self.reap(0.5)
        for conn in (self.death_w, self.status_r):
            if not conn.closed:
                conn.close()
        if not self._closed and self.exitcode is not None:
            self._closed = True
            self.proc.close()

    def kill(self) -> None:
        """SIGKILL this worker (verified by create time); its death is then reported by the monitor."""
        p = self.psutil_process()
        if p is not None:
            try:
                p.kill()
            except psutil.Error:
                pass

    def dump_stack(self) -> None:
        """Ask the worker for its Python stacks (faulthandler on SIGUSR1, into its stderr)."""
        p = self.psutil_process()
        if p is not None:
            try:
                p.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def own_pid() -> int:
    return os.getpid()
