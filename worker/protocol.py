"""Messages between the supervisor and a worker, and their states.

Two channels per worker besides the shared-memory queues:

* the status pipe (worker -> supervisor): framed pickles ``Ready`` / ``StartupFailed`` during start-up, then
  empty frames as heartbeats. It is a pipe, not the data queue, so the supervisor can wait on it together with
  the process sentinels (``multiprocessing.connection.wait``) and a wedged worker simply stops beating.
* the death pipe (supervisor -> worker): never written. Its EOF means "the supervisor is gone or wants you gone".

Requests travel on the group's broadcast MessageQueue as ``Request`` tuples; replies on the worker's own reply
MessageQueue as ``Reply`` tuples (plain tuples: they are on the hot path and pickle fastest).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple


class WorkerState(enum.Enum):
    """A worker process's lifecycle, as the supervisor tracks it.

    Allowed transitions (anything else is a bug)::

        STARTING -> READY -> RUNNING -> STOPPING -> STOPPED
            |          |        |           |
            +----------+--------+-----------+------> FAILED
    """

    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


ALLOWED_WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.STOPPING, WorkerState.FAILED}),
    WorkerState.READY: frozenset({WorkerState.RUNNING, WorkerState.STOPPING, WorkerState.FAILED}),
    WorkerState.RUNNING: frozenset({WorkerState.STOPPING, WorkerState.FAILED}),
    WorkerState.STOPPING: frozenset({WorkerState.STOPPED, WorkerState.FAILED}),
    WorkerState.STOPPED: frozenset(),
    WorkerState.FAILED: frozenset(),
}


@dataclass(frozen=True)
class Ready:
    """Start-up succeeded: the worker's reply queue is ready for the supervisor to attach."""

    rank: int
    pid: int
    reply_handle: Any  # transport.Handle
    device: str
    startup_s: float  # seconds from process entry to READY, as the worker measured it


@dataclass(frozen=True)
class StartupFailed:
    rank: int
    exc_type: str
    message: str
    traceback: str


class Request(NamedTuple):
    call_id: int
    method: Any  # a method name (str) or cloudpickled bytes of a callable taking the worker first
    args: tuple
    kwargs: dict
    reply_rank: int | None  # None: every rank replies; else only this rank (unique_reply_rank)


class Reply(NamedTuple):
    call_id: int
    ok: bool
    value: Any  # the result, or a RemoteFailure when ok is False
    over_budget: bool = False  # the worker crossed max_rss / max_calls: recycle it between calls


class RemoteFailure(NamedTuple):
    rank: int
    exc_type: str
    message: str
    traceback: str


STOP_METHOD = "__stop__"  # a Request with this method makes every worker stop gracefully, no reply
EXIT_ORPHANED = 70  # the worker exited because its supervisor vanished
EXIT_STARTUP_FAILED = 71
EXIT_STOP_OVERDUE = 72  # a deliberate stop ran past the supervisor's grace: the worker left by itself
EXIT_DEVICE_ERROR = 73  # a call hit a sticky device error (the CUDA context is unusable): restart this rank
