"""The weight keeper as the supervisor sees it: the process (worker/keeper.py) and the one call it answers.

``keep(specs)`` asks for every rank's handle (worker/weights.py KeptWeights) and waits, bounded by the caller's
deadline, for the answer, the keeper's death, or an abort (a shutdown during start-up). A failure names the rank
whose shard could not be loaded, with the keeper's traceback, as a rank's own start-up failure would.
"""
from __future__ import annotations

import itertools
import pickle
import threading
import time
from multiprocessing.connection import wait as mp_wait
from typing import Any

from supervisor.backends.local.process import TreeProcess
from supervisor.core.exits import ExitInfo
from worker import keeper

_ABORT_POLL_S = 0.05  # a shutdown while the keeper loads is noticed this fast


class KeeperError(RuntimeError):
    """The keeper could not give a rank its weights: ``rank`` names it (-1: not one rank's fault)."""

    def __init__(self, message: str, rank: int = -1, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank, self.remote_traceback = rank, remote_traceback


class KeeperProcess(TreeProcess):
    label = "keeper"

    def __init__(self, ctx, env: tuple, output=None) -> None:
        cmd_r, self.cmd_w = ctx.Pipe(duplex=False)
        try:
            self._launch(ctx, keeper.entry, (), "-", output, (cmd_r, env))
        finally:
            cmd_r.close()
        self._calls = itertools.count()
        self._lock = threading.Lock()  # one request at a time: the manager's starts and the standbys' share it
        self.held_bytes: dict[str, int] = {}  # device -> bytes held, as of the last answer
        self.load_s = 0.0  # seconds spent loading, all requests together
        self.hung = False

    def exit_info(self) -> ExitInfo:
        return ExitInfo(self.exitcode)

    def keep(self, specs: list, deadline: float, abort: threading.Event | None = None) -> dict[int, Any]:
        """Handles by global rank (None where the worker class keeps nothing). Raises KeeperError."""
        with self._lock:
            call_id = next(self._calls)
            try:
                self.cmd_w.send(keeper.KeepRequest(call_id, tuple(specs)))
            except OSError:
                raise self._died() from None
            answer = self._await(call_id, deadline, abort)
        if isinstance(answer, keeper.KeepFailed):
            who = f"rank {answer.rank}'s weights" if answer.rank >= 0 else "the weights"
            raise KeeperError(f"the weight keeper could not load {who}: {answer.exc_type}: {answer.message}",
                              answer.rank, answer.traceback)
        self.held_bytes = dict(answer.held_bytes)
        self.load_s += answer.load_s
        return answer.handles

    def _await(self, call_id: int, deadline: float, abort: threading.Event | None) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KeeperError("the weight keeper did not answer within the start-up timeout "
                                  "(runtime.startup_timeout_s)")
            if abort is not None and abort.is_set():
                raise KeeperError("start-up aborted: the supervisor is shutting down")
            ready = mp_wait([self.status_r, self.exit_fd], timeout=min(remaining, _ABORT_POLL_S))
            if self.status_r in ready:
                try:
                    answer = pickle.loads(self.status_r.recv_bytes())
                except (EOFError, OSError):
                    raise self._died() from None
                if getattr(answer, "call_id", None) == call_id:
                    return answer
            elif ready:
                raise self._died()

    def _died(self) -> KeeperError:
        self.reap(1.0)
        return KeeperError(f"the weight keeper (pid {self.pid}) exited: {self.exit_info().reason}")

    def close(self) -> None:
        if not self.cmd_w.closed:
            self.cmd_w.close()
        super().close()
