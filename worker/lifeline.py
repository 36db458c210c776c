"""A worker dies with its supervisor: the death pipe, PR_SET_PDEATHSIG, and reaping our own descendants.

The supervisor holds the only write end of each worker's death pipe. A thread here blocks on the read end; EOF
means the supervisor closed it (shutdown) or died (even by SIGKILL: the kernel closes its descriptors). On EOF
the worker gets ``grace`` seconds to stop through its normal path, then its descendants are killed and the
process leaves with ``os._exit`` — an exit, not a flag, so it happens even while the main thread is blocked in a
kernel wait. PR_SET_PDEATHSIG is the second line for the case where the parent (the supervisor, or the forkserver
that dies with it) goes away: it delivers SIGTERM, whose handler runs the same path.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import threading
import time

from worker.protocol import PROMOTE_PREFIX, STOP_PREFIX

_PR_SET_PDEATHSIG = 1
_SIG_DFL = 0
_orphan_lock = threading.Lock()


def arm_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when our parent exits, then re-check: it may already be gone."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the death pipe alone has to do
        return
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)


def kill_descendants(timeout: float = 0.2) -> None:
    """SIGKILL every process below this one (children first is irrelevant for SIGKILL), then reap them."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for p in kids:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(kids, timeout=timeout)


def die_like(code: int) -> None:
    """Leave with exit code ``code``, or by signal ``-code`` (so that the parent reads that signal, as it would
    had the signal's default action ended us). Descendants go first. Safe from any thread: the default disposition
    is restored with libc, as Python's signal.signal works only in the main thread."""
    kill_descendants()
    if code >= 0:
        os._exit(code & 0xFF)
    sig = -code
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(sig, _SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        time.sleep(1.0)  # a signal whose default is not to terminate: fall through to the shell's convention
    except (OSError, AttributeError):
        pass
    os._exit(128 + sig)


def exit_now(code: int) -> None:
    """Leave at once, taking our descendants with us. Safe to call from any thread, any number of times."""
    with _orphan_lock:
        kill_descendants()
        os._exit(code)


_watch: "DeathWatch | None" = None  # this worker process's (one per process), for told_to_stop()


def told_to_stop() -> bool:
    """Whether our supervisor has asked this worker to stop, or is gone (False before the death watch exists)."""
    return _watch is not None and _watch.told()


class DeathWatch(threading.Thread):
    """Waits for EOF on the death pipe; then stops the worker within ``grace`` seconds, whatever it is doing."""

    def __init__(self, conn, grace_s: float, on_eof, exit_code: int, overdue_code: int) -> None:
        global _watch
        _watch = self
        super().__init__(name="death-watch", daemon=True)
        self.conn = conn
        self.grace_s = grace_s
        self.on_eof = on_eof  # asks the main thread to stop (e.g. by signalling it)
        self.exit_code = exit_code  # the supervisor vanished
        self.overdue_code = overdue_code  # a deliberate stop took longer than its grace
        self.fired = threading.Event()
        self.deliberate = False  # a "stop:" frame came before the EOF: asked to stop, not orphaned
        self.promotions: "queue.Queue[object]" = queue.Queue()  # a warm standby's promotion (worker/main.py)

    def told(self) -> bool:
        """Whether the supervisor asked us to stop (or is gone): its stop message or EOF is on the pipe, or was
        read. The supervisor writes and closes before it signals anything, so a SIGTERM of its own finds this true."""
        try:
            return self.fired.is_set() or self.deliberate or self.conn.poll(0)  # EOF stays readable once closed
        except (OSError, ValueError):  # closed: only after it fired
            return True

    def run(self) -> None:
        grace, code = self.grace_s, self.exit_code  # the supervisor vanished: stop quickly
        try:
            while True:
                msg = self.conn.recv_bytes()  # "go:<Promotion>" (a standby), "stop:<grace seconds>", then EOF
                if msg.startswith(STOP_PREFIX):
                    # a deliberate shutdown: the supervisor's own grace applies
                    grace, code = float(msg[len(STOP_PREFIX):]), self.overdue_code
                    self.deliberate = True
                elif msg.startswith(PROMOTE_PREFIX):
                    self.promotions.put(pickle.loads(msg[len(PROMOTE_PREFIX):]))
        except (EOFError, OSError, ValueError, pickle.UnpicklingError):
            pass
        self.fired.set()
        self.on_eof()
        time.sleep(grace)
        exit_now(code)

    def wait_promotion(self, poll_s: float = 0.5) -> object:
        """Block until the supervisor promotes this standby. A stop meanwhile (SIGTERM, EOF) interrupts it with the
        signal handler's exception: the wait is sliced so that the main thread keeps running handlers."""
        while True:
            try:
                return self.promotions.get(timeout=poll_s)
            except queue.Empty:
                continue
