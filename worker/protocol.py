"""Messages between the supervisor and a worker, and their states.

Two channels per worker besides the shared-memory queues:

* the status pipe (worker -> supervisor): framed pickles ``Ready`` / ``StartupFailed`` during start-up, then
  empty frames as heartbeats. It is a pipe, not the data queue, so the supervisor can wait on it together with
  the process sentinels (``multiprocessing.connection.wait``) and a wedged worker simply stops beating.
* the death pipe (supervisor -> worker): its EOF means "the supervisor is gone or wants you gone". Two frames may
  come before it: ``stop:<grace>`` (a deliberate stop) and, to a warm standby, ``go:<Promotion>``.

Requests travel on the group's broadcast MessageQueue as ``Request`` tuples; replies on the worker's own reply
MessageQueue as ``Reply`` tuples (plain tuples: they are on the hot path and pickle fastest).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Ready:
    """Start-up succeeded: the worker's reply queue is ready for the supervisor to attach."""

    rank: int
    pid: int
    reply_handle: Any  # transport.Handle
    device: str
    startup_s: float  # seconds from process entry to READY, as the worker measured it


class StartupPhase(enum.Enum):
    """Where a rank is in its start-up, in order. The supervisor marks SPAWNED; the worker reports the next three
    on the status pipe as it enters them (``PhaseReached``); ``Ready`` is READY."""

    SPAWNED = "spawned"  # the process exists (the supervisor's side)
    IMPORTED = "imported"  # interpreter, environment and the worker class imported; constructing it
    WARM_UP = "warm_up"  # a warm standby in Worker.warm_up (its CUDA context, weights, graphs)
    STANDBY = "standby"  # a warm standby, ready to take a rank's place: waiting for its promotion
    INIT_DEVICE = "init_device"  # in Worker.init_device (device, torch.distributed)
    LOAD_MODEL = "load_model"  # in Worker.load_model
    READY = "ready"


@dataclass(frozen=True)
class PhaseReached:
    """Start-up progress, sent as the worker enters ``phase``; ``elapsed_s`` counts from process entry."""

    rank: int
    phase: str  # a StartupPhase value
    elapsed_s: float


@dataclass(frozen=True)
class Promotion:
    """Supervisor -> a warm standby, on its death pipe: take this rank's place (its attempt's spec, whose
    rendezvous is the new world's) and serve on this broadcast queue."""

    spec: Any  # worker.spec.WorkerSpec
    bcast_handle: Any  # transport.Handle


PROMOTE_PREFIX = b"go:"  # a death-pipe frame carrying a pickled Promotion
STOP_PREFIX = b"stop:"  # a death-pipe frame: a deliberate stop, with the supervisor's grace in seconds


@dataclass(frozen=True)
class StartupFailed:
    rank: int
    exc_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class DeviceLost:
    """Sent on the status pipe by a rank that is leaving because a call left its device unusable (just before it
    exits with EXIT_DEVICE_ERROR): the exit reason then names the cause, whoever sees the exit first."""

    rank: int
    exc_type: str
    cause: str  # the error's first line, e.g. "CUDA error: device-side assert triggered"


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
    # The call left the rank's device unusable (a sticky CUDA error: worker/device_faults.py). The rank exits
    # (EXIT_DEVICE_ERROR) right after this reply and never answers again: the supervisor fails the group's calls now.
    fatal: bool = False

    @property
    def cause(self) -> str:
        """The error's first line, e.g. "CUDA error: device-side assert triggered" (its type if it has no words)."""
        return next((line.strip() for line in self.message.splitlines() if line.strip()), self.exc_type)


STOP_METHOD = "__stop__"  # a Request with this method makes every worker stop gracefully, no reply
EXIT_ORPHANED = 70  # the worker exited because its supervisor vanished
EXIT_STARTUP_FAILED = 71
EXIT_STOP_OVERDUE = 72  # a deliberate stop ran past the supervisor's grace: the worker left by itself
EXIT_DEVICE_ERROR = 73  # a call hit a sticky device error (the CUDA context is unusable): restart this rank
EXIT_SHUTDOWN_RAISED = 1  # Worker.shutdown() raised after a stop was asked for (its traceback is in the rank's log)

# What each exit code of ours means, in words for events, logs and the README's table.
EXIT_MEANINGS: dict[int, str] = {
    0: "stopped cleanly",
    EXIT_SHUTDOWN_RAISED: "shutdown() raised or an uncaught Python exception; see the rank's log",
    EXIT_ORPHANED: "its supervisor vanished: the death pipe closed without a stop request",
    EXIT_STARTUP_FAILED: "start-up failed: init_device or load_model raised",
    EXIT_STOP_OVERDUE: "did not finish stopping within the grace (shutdown.grace_s) and left by itself",
    EXIT_DEVICE_ERROR: "a fatal device error, e.g. a device-side assert: its CUDA context was unusable",
}
