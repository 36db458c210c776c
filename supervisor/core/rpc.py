"""Calls to one group of workers: broadcast a Request, gather Replies in order, turn failures into errors.

::

    caller ──enqueue(Request)──> broadcast queue ──> rank 0..n-1 ──enqueue(Reply)──> reply queue[r] ──┐
      ▲                                                                                              │
      └────────────── PendingCall.results[r] <── drain (in order, under one lock) <──────────────────┘

Each rank answers requests in the order it received them, so the replies on one rank's queue are in call order:
draining a rank's queue until a call's reply appears resolves every earlier call on the way. No reply thread is
needed and a blocking call costs one enqueue and one dequeue per replying rank. ``fail()`` (called by the monitor
when a worker dies) cancels every queue, so every waiter wakes at once with an error naming the rank and reason.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from supervisor.errors import RemoteError, RpcTimeout, WorkerFailed
from transport import MessageQueue, PeerDied, QueueClosed, QueueTimeout
from worker.protocol import RemoteFailure, Reply, Request


class PendingCall:
    __slots__ = ("call_id", "method_name", "expected", "results", "abandoned")

    def __init__(self, call_id: int, method_name: str, expected: tuple[int, ...]) -> None:
        self.call_id = call_id
        self.method_name = method_name
        self.expected = expected
        self.results: dict[int, Reply] = {}
        self.abandoned = False

    def missing(self) -> tuple[int, ...]:
        return tuple(r for r in self.expected if r not in self.results)


class RpcChannel:
    def __init__(self, bcast: MessageQueue, replies: Sequence[MessageQueue], rank_offset: int = 0) -> None:
        self.bcast = bcast
        self.replies = list(replies)
        self.rank_offset = rank_offset  # global rank of this group's rank 0, for error messages
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._pending: dict[int, PendingCall] = {}
        self._fifo: list[deque[int]] = [deque() for _ in self.replies]
        self.failure: WorkerFailed | None = None
        self.over_budget = False  # a worker reported that it crossed max_rss / max_calls

    # -- sending ---------------------------------------------------------------------------------------------
    def send(self, method: Any, args: tuple, kwargs: dict | None, reply_rank: int | None,
             timeout: float | None, method_name: str) -> PendingCall:
        if self.failure is not None:
            raise self.failure
        expected = tuple(range(len(self.replies))) if reply_rank is None else (reply_rank,)
        with self._send_lock:
            call = PendingCall(next(self._ids), method_name, expected)
            self._pending[call.call_id] = call
            for r in expected:
                self._fifo[r].append(call.call_id)
            try:
                self.bcast.enqueue(Request(call.call_id, method, args, kwargs or {}, reply_rank), timeout=timeout)
            except BaseException as exc:
                self._forget(call)
                if isinstance(exc, (QueueClosed, PeerDied)):
                    raise self.failure or WorkerFailed(f"group stopped while sending {method_name}") from None
                if isinstance(exc, QueueTimeout):
                    raise RpcTimeout(f"{method_name}: request not taken within {timeout} s by ranks "
                                     f"{self._global(exc.pending)}", self._global(exc.pending)) from None
                raise
        return call

    def send_stop(self) -> None:
        from worker.protocol import STOP_METHOD

        try:
            with self._send_lock:
                self.bcast.enqueue(Request(0, STOP_METHOD, (), {}, -1), timeout=0.05)
        except Exception:
            pass  # best effort: the death pipe and signals follow

    def _forget(self, call: PendingCall) -> None:
        self._pending.pop(call.call_id, None)
        for r in call.expected:
            try:
                self._fifo[r].remove(call.call_id)
            except ValueError:
                pass

    # -- receiving -------------------------------------------------------------------------------------------
    def wait(self, call: PendingCall, timeout: float | None) -> list[Any]:
        """Block until every expected rank answered ``call``; return results ordered by rank."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in call.expected:
            while r not in call.results:
                self._drain_one(r, call, deadline)
        self._pending.pop(call.call_id, None)
        return self._unwrap(call)

    def _drain_one(self, r: int, call: PendingCall, deadline: float | None) -> None:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._drain_lock.acquire(timeout=-1 if remaining is None else remaining):
            self._timeout(call, remaining)
        try:
            if r in call.results:
                return
            if self.failure is not None:
                raise self.failure
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = self.replies[r].dequeue(timeout=remaining)
            except QueueTimeout:
                self._collect_ready(call)  # name only the ranks that really did not answer
                self._timeout(call, remaining)
            except (QueueClosed, PeerDied):
                raise self.failure or WorkerFailed(
                    f"rank {r + self.rank_offset}: reply queue closed during {call.method_name}",
                    (r + self.rank_offset,)) from None
            self._route(r, reply)
        finally:
            self._drain_lock.release()

    def settle(self, timeout: float) -> bool:
        """Collect the replies of every call in flight into its PendingCall, so a planned stop (a recycle),
        which closes the queues, loses none: their waiters then find the results already there. False if some
        reply did not come within ``timeout``."""
        deadline = time.monotonic() + timeout
        for call in list(self._pending.values()):
            for r in call.expected:
                while r not in call.results and call.call_id in self._pending:
                    if not self._settle_one(r, call, deadline - time.monotonic()):
                        return False
        return True

    def _settle_one(self, r: int, call: PendingCall, remaining: float) -> bool:
        if remaining <= 0 or not self._drain_lock.acquire(timeout=remaining):
            return False
        try:
            if r not in call.results:  # a waiter may have routed it while we waited for the lock
                self._route(r, self.replies[r].dequeue(timeout=remaining))
            return True
        except (QueueTimeout, QueueClosed, PeerDied):
            return False
        finally:
            self._drain_lock.release()

    def _route(self, r: int, reply: Reply) -> None:
        fifo = self._fifo[r]
        while fifo and fifo[0] != reply.call_id:
            fifo.popleft()  # calls abandoned after a timeout never get their late replies routed
        if fifo:
            fifo.popleft()
        target = self._pending.get(reply.call_id)
        if target is not None:
            target.results[r] = reply
        if reply.over_budget:
            self.over_budget = True

    def _collect_ready(self, call: PendingCall) -> None:
        """Route the replies that already arrived from the other ranks (drain lock held; never blocks)."""
        for r in call.missing():
            while r not in call.results:
                try:
                    self._route(r, self.replies[r].dequeue(timeout=0))
                except (QueueTimeout, QueueClosed, PeerDied):
                    break

    def _timeout(self, call: PendingCall, waited: float | None) -> None:
        call.abandoned = True
        self._forget(call)
        missing = self._global(call.missing())
        raise RpcTimeout(f"{call.method_name}: no answer from ranks {list(missing)} within its deadline", missing)

    def _unwrap(self, call: PendingCall) -> list[Any]:
        out = []
        for r in call.expected:
            reply = call.results[r]
            if not reply.ok:
                f: RemoteFailure = reply.value
                raise RemoteError(f.rank + 0, f.exc_type, f.message, f.traceback)
            out.append(reply.value)
        return out

    def _global(self, ranks) -> tuple[int, ...]:
        return tuple(r + self.rank_offset for r in ranks)

    # -- failure ---------------------------------------------------------------------------------------------
    def fail(self, error: WorkerFailed) -> None:
        """Make every pending and future call fail with ``error``; wake everyone blocked on our queues."""
        if self.failure is None:
            self.failure = error
        for q in (self.bcast, *self.replies):
            try:
                q.cancel_all()
            except Exception:
                pass

    def close(self) -> None:
        for q in (self.bcast, *self.replies):
            q.close()


class RpcFuture(concurrent.futures.Future):
    """A non-blocking call: ``result(timeout)`` drains replies on demand (in-order), like vLLM's FutureWrapper."""

    def __init__(self, resolve: Callable[[float | None], Any]) -> None:
        super().__init__()
        self._resolve = resolve
        self._lock = threading.Lock()

    def result(self, timeout: float | None = None) -> Any:
        with self._lock:
            if not self.done():
                try:
                    self.set_result(self._resolve(timeout))
                except RpcTimeout:
                    raise
                except BaseException as exc:
                    self.set_exception(exc)
        return super().result(0)
