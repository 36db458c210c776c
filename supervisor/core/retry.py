"""Retryable calls: a call whose group fails before it answered is sent again, and its caller sees one answer.

::

    caller ── RetryingCall.start() ── send(group g, attempt 1) ─────────────> group g ──X (a rank dies)
                   │                                                               │
                   │  result(deadline): wait(attempt 1) raises WorkerFailed <──────┘  (the channel fails every
                   │                                                                   pending call at once)
                   ├─ retryable? (a group failure; attempts left; deadline not passed; not stopping / gave up)
                   ├─ next group: another serving dp replica at once if the call may move, else g once it serves again
                   ├─ event "retry" {call, from_group, to_group, attempt, error}; count per from_group
                   └─ send(next group, attempt 2) ──> wait ──> the answer (or the last attempt's error)

Exactly once: each attempt is a new request on the channel of the group incarnation that serves it. An attempt that
failed is never looked at again, so a reply a dead group might still produce (none can: its channel is failed, its
queues cancelled) has no path to the caller; only the attempt that answers is returned, once.

What is retried: ``WorkerFailed`` (the group died or was declared hung before it answered; a rank's device failed
for good in the call, ``DeviceFailed``, so the call goes to the replacement; or, under
``restart.calls_during_restart=fail``, it was not serving), and a ``RemoteError`` after which the group goes down
within PEER_DEATH_GRACE_S (a surviving rank's collective failed because its peer died). What is final: ``RemoteError`` (the method itself
raised: it would raise again), ``RpcTimeout`` (the call's deadline passed), ``ShutdownInProgress``, a supervisor that
gave up. A retried method runs again from the start on the new group, so only calls that are safe to repeat
(idempotent, or deterministic like greedy generation) should be marked retryable.

Policy (which errors, how many attempts, where next) is here; the mechanism of one attempt (gate, channel) is the
API's, passed in as ``send`` and ``wait``.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from supervisor.errors import RemoteError, ShutdownInProgress, WorkerFailed

_SERVING_POLL_S = 0.005  # while waiting for a group to serve again: recoveries take ~0.1-1 s, so 5 ms costs nothing
# A rank whose peer was killed mid-collective answers first, with the collective's own error (gloo: "Connection
# reset by peer"), a moment before the monitor has seen the death. A RemoteError of a retryable call is therefore
# checked against this long a wait for its group to go down: if it does, the error was the group's failure.
PEER_DEATH_GRACE_S = 0.5
_ids = itertools.count(1)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # the first included

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")


class ServingView(Protocol):
    """What the retry loop needs to know about the tree (the API implements it over the lifecycle)."""

    def live(self) -> list[int]: ...

    def serving(self, group: int) -> bool: ...

    def incarnation(self, group: int) -> Any:
        """An object that changes each time the group is started again."""

    def final_error(self, name: str) -> BaseException | None:
        """The error every call gets now (stopping, gave up), or None while the tree may still answer."""


class RetryStats:
    """Retries counted per group they moved away from, for the status view. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.away_from: Counter[int] = Counter()

    def add(self, group: int) -> None:
        with self._lock:
            self.away_from[group] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.away_from.values())


class RetryingCall:
    """One logical call to one target (a group, or a rank of it), sent up to ``policy.attempts`` times.

    ``movable``: the call may be answered by any serving dp replica (``execute_model`` without ``group=``); else it
    is retried on the same group once that serves again (a rank's or a group's own call).
    ``send(group, deadline)`` sends one attempt and returns (incarnation, handle): the group's current start (any
    object that changes when the group restarts) and what ``wait(incarnation, handle, deadline)`` waits on."""

    def __init__(self, name: str, group: int, *, movable: bool, policy: RetryPolicy, deadline: float | None,
                 send: Callable[[int, float | None], tuple[Any, Any]], wait: Callable[[Any, Any, float | None], Any],
                 view: ServingView, emit: Callable[..., Any], stats: RetryStats) -> None:
        self.call_id = next_request_id()
        self.name, self.group, self.movable = name, group, movable
        self.policy, self.deadline = policy, deadline
        self._send, self._wait, self._view, self._emit, self._stats = send, wait, view, emit, stats
        self.attempt = 0
        self._incarnation: Any = None  # the group object (one start of the group) the attempt went to
        self._handle: Any = None
        self._error: WorkerFailed | None = None  # the last attempt failed to send: retry it on result()

    def start(self) -> "RetryingCall":
        """Send the first attempt now (so a non-blocking call is on its way before the caller waits)."""
        self.attempt = 1
        self._send_attempt()
        return self

    def result(self, deadline: float | None) -> Any:
        """Wait for the answer, sending the call again while its group fails and attempts and time remain."""
        while True:
            try:
                if self._error is not None:
                    raise self._error
                try:
                    return self._wait(self._incarnation, self._handle, deadline)
                except RemoteError as exc:
                    raise group_failure(exc, self._view, self.group, self._incarnation) or exc
            except WorkerFailed as exc:
                self._error = None
                self._retry_or_raise(exc, deadline)

    def _send_attempt(self) -> None:
        try:
            self._incarnation, self._handle = self._send(self.group, self.deadline)
        except WorkerFailed as exc:  # not serving after all (e.g. calls_during_restart=fail): counts as an attempt
            self._incarnation, self._error = self._view.incarnation(self.group), exc

    def _retry_or_raise(self, exc: WorkerFailed, deadline: float | None) -> None:
        final = self._view.final_error(self.name)
        if final is not None:
            raise final from exc
        if self.attempt >= self.policy.attempts or _passed(deadline):
            raise exc
        failed = self.group
        self.group = self._next_group(failed, exc, deadline)
        self.attempt += 1
        self._stats.add(failed)
        self._emit("retry", call=self.call_id, method=self.name, from_group=failed, to_group=self.group,
                   attempt=self.attempt, error=str(exc).splitlines()[0][:200])
        self._send_attempt()

    def _next_group(self, failed: int, exc: WorkerFailed, deadline: float | None) -> int:
        """Another serving replica at once if the call may move; else (or if none serves) a group once it
        serves again -- for the failed group, a new incarnation of it, never the one that just failed."""
        if self.movable:
            others = [g for g in self._view.live() if g != failed and self._view.serving(g)]
            if others:
                return others[self.call_id % len(others)]  # spread retries over the serving replicas
        candidates = self._view.live() if self.movable else [failed]
        return self._wait_serving(candidates, failed, exc, deadline)

    def _wait_serving(self, candidates: list[int], failed: int, exc: WorkerFailed, deadline: float | None) -> int:
        dead = self._incarnation  # the incarnation of ``failed`` that this call saw fail
        view = self._view

        def ready() -> int | None:
            live = set(view.live())
            found = [g for g in candidates if g in live and view.serving(g)
                     and (g != failed or view.incarnation(g) is not dead)]
            return found[0] if found else None

        return wait_for(view, self.name, ready, lambda: bool(set(view.live()) & set(candidates)), deadline, exc)


def wait_for(view: ServingView, name: str, claim: Callable[[], int | None], possible: Callable[[], bool],
             deadline: float | None, exc: BaseException) -> int:
    """Poll ``claim`` until it names a group. Raises the tree's final error (stopping, gave up) if there is one, or
    ``exc`` once it is no longer ``possible`` (the candidates left the tree) or the deadline passed."""
    while True:
        final = view.final_error(name)
        if final is not None:
            raise final from exc
        group = claim()
        if group is not None:
            return group
        if not possible() or _passed(deadline):
            raise exc
        time.sleep(_SERVING_POLL_S)


def group_failure(exc: RemoteError, view: ServingView, group: int, incarnation: Any) -> WorkerFailed | None:
    """The WorkerFailed that ``exc`` really was, if ``group``'s incarnation goes down within PEER_DEATH_GRACE_S
    (a rank raised because a peer died under it); None if the group keeps serving (the method itself raised). It
    names the rank that died, as the group's channel was failed with, when that is known; else ``exc``'s rank."""
    deadline = time.monotonic() + PEER_DEATH_GRACE_S
    while view.serving(group) and view.incarnation(group) is incarnation:
        if time.monotonic() >= deadline:
            return None
        time.sleep(_SERVING_POLL_S)
    death = getattr(getattr(incarnation, "channel", None), "failure", None)
    if isinstance(death, WorkerFailed):
        failed = WorkerFailed(str(death), death.ranks, True)
    else:
        first = str(exc).splitlines()[0]
        failed = WorkerFailed(f"{first} -- and group {group} failed (a peer died under the call)", (exc.rank,), True)
    failed.__cause__ = exc
    return failed


def next_request_id() -> int:
    """A supervisor-wide id for a logical call or request, the same across its retries (events: ``call``)."""
    return next(_ids)


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class LifecycleView:
    """The tree as retries and request serving see it (``Supervisor.serving_view``): a read-only adaptor over the
    manager's lifecycle, inside the core, so neither needs the Supervisor itself."""

    def __init__(self, life: Any, gave_up: Callable[[], bool]) -> None:
        self._life, self._gave_up = life, gave_up

    def live(self) -> list[int]:
        return list(self._life.live)

    def serving(self, group: int) -> bool:
        return self._life.gates[group].is_open

    def incarnation(self, group: int) -> Any:
        return self._life.groups.get(group)

    def final_error(self, name: str) -> BaseException | None:
        if self._gave_up():
            return WorkerFailed(f"{name}: the supervisor gave up: {self._life.error}")
        if self._life.stop_requested.is_set():
            return ShutdownInProgress(f"{name}: the supervisor {self._life.stop_words()}")
        return None
