"""Calls to one group of workers: broadcast a Request, gather Replies, complete the call's Future.

::

    caller ──send(Request)──> broadcast ring ──> rank 0..n-1 ──enqueue(Reply)──> reply ring[r] ──┐
      ▲                                                                                         │
      └── PendingCall (a concurrent.futures.Future) <── route by call id <── the drainer ────────┘

Each rank answers requests in the order it received them, so the replies on one rank's ring are in call order and
draining a ring for one call routes every earlier call's reply on the way. One thread at a time drains (the
*drainer*, a role handed over under ``_cond``), and whoever drains completes the calls it routed — with no lock
held, so a done-callback may call ``result()`` of another call, or send one.

Who drains:

* a blocking call drains in its own thread (no thread hop): it becomes the drainer if nobody is, else it waits on
  ``_cond`` until its Future is done or the role is free;
* a Future nobody waits on (``non_block``, or a call whose caller stopped waiting but whose deadline still runs)
  is *detached*: the channel's reply reader, a thread started on demand that leaves once no detached call has
  been pending for ``_READER_LINGER_S``, drains for it. So ``done()``, callbacks, ``concurrent.futures.wait``
  and ``asyncio.wrap_future`` work without anyone calling ``result()``.

Two kinds of waiting, kept apart: the caller's own wait (``wait(call, timeout)``) raises CallTimeout and leaves the
ranks alone — the call stays pending if it has a deadline (detached), else it is abandoned and its late replies
are dropped when they come. A call *deadline* (``deadline_s``) is enforced by whoever drains; when it passes, the
ranks that did not answer are handed to ``on_deadline`` (the lifecycle declares them hung) and the call fails with
RpcTimeout naming them. ``fail()`` (a worker died) cancels the rings; every waiter wakes and the first to run
completes every pending call with the failure. A reply marked ``fatal`` (the rank's device is unusable: it exits
right after sending it) does the same at once, before the monitor has seen the exit: every call on the group, and
every later send, fails with one DeviceFailed naming the rank and the cause.
What a death looks like before the monitor has confirmed it (a survivor's error from a collective the dead rank
left, a reply ring whose writer is gone) is not given to callers as such: once the group says another rank is
leaving, the drainer waits (bounded) for ``fail()``, so a caller always hears which rank died and how.

One limit, from the transport: a dequeue that times out part-way through a multi-slot reply drops that reply. A
drainer only times out at a caller's timeout or a call deadline, so this needs a large reply to be mid-flight at
that instant.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import pickle
import threading
import time
from typing import Any, Callable, Sequence

from loguru import logger

from supervisor.errors import CallTimeout, DeviceFailed, RemoteError, RpcTimeout, SupervisorError, WorkerFailed
from transport import MessageQueue, PeerDied, QueueClosed, QueueTimeout
from worker.protocol import RemoteFailure, Reply, Request

_READER_LINGER_S = 1.0  # a serving loop's next non-blocking call usually comes sooner: keep the reader that long
_FOLLOWER_RECHECK_S = 0.05  # a follower past its deadline while the drainer handles it: look again this often
_CLOSE_JOIN_S = 1.0  # close(): how long to wait for the reply reader to leave the rings before unmapping them
# A rank's error while a peer of its group lies dead: how long to wait for the death's verdict (the monitor's, which
# comes within milliseconds unless the machine is very busy) before the error is given as it is.
_VERDICT_WAIT_S = 5.0


class PendingCall:
    """One call to one group, decided by the channel: the values by rank once every expected rank answered, or
    the error (RemoteError naming the global rank, WorkerFailed, RpcTimeout, CallTimeout if abandoned).

    It has the methods of a Future that the API and observers use (``result``, ``exception``, ``done``,
    ``add_done_callback``, ``cancel``, ``cancelled``) but no lock of its own: waiting is the channel's (the
    drainer role), so a blocking call pays for no Condition. What callers get from ``non_block`` is a real
    ``concurrent.futures.Future`` (CallFuture) over these parts. ``result(timeout)`` / ``exception(timeout)``
    drain in the calling thread when nobody else is (no thread hop) and raise CallTimeout when ``timeout``
    passes, leaving the call running. A sent call cannot be un-sent: ``cancel()`` returns False."""

    __slots__ = ("channel", "call_id", "method_name", "expected", "results", "deadline_s", "expires_at", "detached",
                 "outcome", "hung", "_settled", "_callbacks")

    def __init__(self, channel: "RpcChannel", call_id: int, method_name: str, expected: tuple[int, ...],
                 deadline_s: float | None) -> None:
        self.channel = channel
        self.call_id = call_id
        self.method_name = method_name
        self.expected = expected
        self.results: dict[int, Reply] = {}
        self.deadline_s = deadline_s
        self.expires_at = None if deadline_s is None else time.monotonic() + deadline_s
        self.detached = False  # no thread waits for it: the reply reader drains for it
        self.outcome: tuple[bool, Any] | None = None  # (ok, value or error), decided under the channel's lock
        self.hung: tuple[tuple[int, ...], str] | None = None  # missed its deadline: (global ranks, why)
        self._settled = False  # the outcome is out: callbacks ran
        self._callbacks: list[Callable[["PendingCall"], Any]] = []

    def missing(self) -> tuple[int, ...]:
        results = self.results
        return tuple([r for r in self.expected if r not in results])

    def next_missing(self) -> int | None:
        """The first rank that has not answered (the drainer reads its ring next); None when all have."""
        results = self.results
        for r in self.expected:
            if r not in results:
                return r
        return None

    # -- the Future face -----------------------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        self.drive(timeout)
        ok, value = self.outcome
        if ok:
            return value
        raise value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.drive(timeout)
        ok, value = self.outcome
        return None if ok else value

    def done(self) -> bool:
        return self._settled

    def running(self) -> bool:
        return not self._settled

    def cancel(self) -> bool:
        return False  # sent: it runs

    def cancelled(self) -> bool:
        return False

    def add_done_callback(self, fn: Callable[["PendingCall"], Any]) -> None:
        with self.channel._cond:
            if not self._settled:
                self._callbacks.append(fn)
                return
        _run_callback(fn, self)

    def drive(self, timeout: float | None) -> None:
        """Wait at most ``timeout`` for the outcome, draining here if nobody else is. CallTimeout if it passes."""
        if self.outcome is not None:
            self.settle()
            return
        until = None if timeout is None else time.monotonic() + timeout
        if not self.channel.await_call(self, until):
            missing = self.channel.global_ranks(self.missing())
            raise CallTimeout(f"{self.method_name}: no answer within the caller's timeout of {timeout:.3g} s "
                              f"(ranks {list(missing)} still working; they are left alone)", missing)
        self.settle()

    def settle(self) -> None:
        """The decided outcome is out: run the callbacks (here, holding no lock). Whoever comes first does it."""
        if self.outcome is None or self._settled:
            return
        with self.channel._cond:
            if self._settled:
                return
            self._settled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _run_callback(fn, self)


def _run_callback(fn: Callable[[Any], Any], call: Any) -> None:
    try:
        fn(call)
    except Exception:  # as concurrent.futures does: a failing callback is logged, the others still run
        logger.exception(f"a done-callback of {call.method_name} raised")


class CallFuture(concurrent.futures.Future):
    """What ``collective_rpc(non_block=True)`` returns: the parts (one PendingCall per dp group) shaped for the
    caller — the list by global rank, or the one value of ``unique_reply_rank``. Done when every part is, or at
    the first part that failed. ``result()`` with no timeout waits at most the call's own ``timeout``."""

    def __init__(self, parts: list[PendingCall], single: bool, until: float | None = None) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()  # sent: cannot be cancelled
        self.parts = parts
        self._single = single
        self._until = until
        for part in parts:
            part.add_done_callback(self._part_done)

    def abandon(self) -> None:
        """The caller stopped waiting: every part's late answer is dropped (one with a deadline stays watched)."""
        for part in self.parts:
            if part.outcome is None:
                part.channel.abandon(part)

    def _part_done(self, _part: PendingCall) -> None:
        self._finish()

    def _finish(self) -> None:
        """Done at the first part that failed, or when every part answered (parts decide; we only read)."""
        outcomes = [p.outcome for p in self.parts]
        error = next((value for o in outcomes if o is not None and not o[0] for value in (o[1],)), None)
        try:
            if error is not None:
                self.set_exception(error)
            elif all(o is not None for o in outcomes):
                out = [v for o in outcomes for v in o[1]]
                self.set_result(out[0] if self._single else out)
        except concurrent.futures.InvalidStateError:
            pass  # finished by another thread meanwhile

    def result(self, timeout: float | None = None) -> Any:
        self._drive(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._drive(timeout)
        return super().exception(0)

    def _drive(self, timeout: float | None) -> None:
        """Drain for the parts in this thread, in order, stopping at the first that failed."""
        if self.done():
            return
        until = self._until if timeout is None else time.monotonic() + timeout
        for part in self.parts:
            part.drive(None if until is None else max(0.0, until - time.monotonic()))
            if not part.outcome[0]:
                break
        self._finish()


class RpcChannel:
    def __init__(self, bcast: MessageQueue, replies: Sequence[MessageQueue], rank_offset: int = 0,
                 on_deadline: Callable[[tuple[int, ...], str], None] | None = None,
                 peer_leaving: Callable[[int], bool] | None = None) -> None:
        self.bcast = bcast
        self.replies = list(replies)
        self.rank_offset = rank_offset  # global rank of this group's rank 0
        self.on_deadline = on_deadline  # (global ranks, why): the lifecycle declares them hung
        self.peer_leaving = peer_leaving  # (rank) is another rank of the group exiting or gone? None: unknown
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._drainer: int | None = None  # ident of the thread draining the reply rings
        self._drain_bound: float | None = None  # when the drainer wakes at the latest (None: only for a reply)
        self._pending: dict[int, PendingCall] = {}  # undecided calls by id, oldest first
        self._reader: threading.Thread | None = None
        self._closed = False
        self.failure: WorkerFailed | None = None
        self.over_budget = False  # a worker reported that it crossed max_rss / max_calls

    # -- sending ---------------------------------------------------------------------------------------------
    def send(self, method: Any, args: tuple, kwargs: dict | None, reply_rank: int | None,
             timeout: float | None, method_name: str, deadline_s: float | None = None,
             detached: bool = False) -> PendingCall:
        """Broadcast one call. ``timeout`` bounds taking the request (CallTimeout); ``deadline_s`` is the call
        deadline; ``detached``: a Future that the reply reader completes."""
        if self.failure is not None:
            raise self.failure
        expected = tuple(range(len(self.replies))) if reply_rank is None else (reply_rank,)
        with self._send_lock:
            call = PendingCall(self, next(self._ids), method_name, expected, deadline_s)
            with self._cond:
                self._pending[call.call_id] = call
            try:
                self.bcast.enqueue(Request(call.call_id, method, args, kwargs or {}, reply_rank), timeout=timeout)
            except BaseException as exc:
                self._forget(call)
                if isinstance(exc, (QueueClosed, PeerDied)):
                    raise self.failure or WorkerFailed(f"group stopped while sending {method_name}") from None
                if isinstance(exc, QueueTimeout):
                    ranks = self.global_ranks(exc.pending)
                    raise CallTimeout(f"{method_name}: the request was not taken within {timeout} s by ranks "
                                      f"{list(ranks)}", ranks) from None
                raise
        if detached:
            self.detach(call)
        return call

    def send_stop(self) -> None:
        from worker.protocol import STOP_METHOD

        try:
            with self._send_lock:
                self.bcast.enqueue(Request(0, STOP_METHOD, (), {}, -1), timeout=0.05)
        except Exception:
            pass  # best effort: the death pipe and signals follow

    def detach(self, call: PendingCall) -> None:
        """Nobody waits for ``call`` any more: the reply reader completes it."""
        with self._cond:
            if call.call_id not in self._pending:
                return
            call.detached = True
            if self._reader is None and not self._closed:
                self._reader = threading.Thread(target=self._read_replies, name="rpc-replies", daemon=True)
                self._reader.start()
            self._cond.notify_all()

    def _forget(self, call: PendingCall) -> None:
        with self._cond:
            self._pending.pop(call.call_id, None)  # a late reply then finds no call and is dropped

    # -- waiting ---------------------------------------------------------------------------------------------
    def wait(self, call: PendingCall, timeout: float | None) -> list[Any]:
        """A blocking call: its values by rank. After ``timeout``, CallTimeout and the call is left to run: kept
        (detached) while its deadline runs, else forgotten and its late replies dropped."""
        try:
            return call.result(timeout)
        except CallTimeout:
            self.abandon(call)
            raise

    def abandon(self, call: PendingCall) -> None:
        """The caller stopped waiting: keep a call with a deadline running (detached); any other is decided now
        (CallTimeout, so its Future ends too) and its late replies are dropped when they come."""
        if call.expires_at is not None:
            self.detach(call)
            return
        with self._cond:
            if self._pending.pop(call.call_id, None) is None:
                return
            missing = self.global_ranks(call.missing())
            call.outcome = (False, CallTimeout(f"{call.method_name}: abandoned by its caller (ranks {list(missing)} "
                                               "had not answered); the answer is dropped", missing))
        call.settle()

    def settle(self, timeout: float) -> bool:
        """Complete every call in flight, so a planned stop (a recycle), which closes the rings, loses none.
        False if some reply did not come within ``timeout``."""
        until = time.monotonic() + timeout
        with self._cond:
            calls = list(self._pending.values())
        ok = all(self.await_call(call, until) for call in calls)
        for call in calls:
            call.settle()
        return ok

    def await_call(self, call: PendingCall, until: float | None) -> bool:
        """Drain (or let the drainer drain) until ``call``'s outcome is decided. False if ``until`` passed first."""
        while call.outcome is None:
            decided, role = self._take_drainer(call, until)
            self._settle_all(decided)
            if not role:
                if call.outcome is None and self._timed_out(until):
                    return False
                continue
            try:
                decided = self._drain_until_decided(call, until)
            finally:
                self._release_drainer()
            self._settle_all(decided)
            if call.outcome is None and self._timed_out(until):
                return False
        return True

    def _take_drainer(self, call: PendingCall, until: float | None) -> tuple[list[PendingCall], bool]:
        """Become the drainer (True), or return (False) when ``call`` is decided, ``until`` passed, or the call's
        deadline passed while another thread drains (then it is decided here: the first list)."""
        with self._cond:
            while self._drainer is not None:
                if call.outcome is not None or self._timed_out(until):
                    return [], False
                expiry = call.expires_at
                if expiry is not None and expiry <= time.monotonic():
                    if self._drain_bound is None or self._drain_bound > expiry:
                        return self._decide_due([call]), False  # the drainer would not wake for it: decide here
                    expiry = time.monotonic() + _FOLLOWER_RECHECK_S  # it will, and name only the silent ranks
                wake = min((t for t in (until, expiry) if t is not None), default=None)
                self._cond.wait(self._wait_s(wake))
            if call.outcome is not None:
                return [], False
            self._drainer = threading.get_ident()
            self._drain_bound = self._bound_locked(until)
            return [], True

    def _release_drainer(self) -> None:
        with self._cond:
            self._drainer = None
            self._drain_bound = None
            self._cond.notify_all()

    def _drain_until_decided(self, call: PendingCall, until: float | None) -> list[PendingCall]:
        """As the drainer, keeping the role (the hot path takes the lock once per call, not per reply): drain
        until some call is decided (ours, usually) or the bound passes. The decided are settled by the caller,
        after giving the role back."""
        bound = self._drain_bound
        decided: list[PendingCall] = []
        while call.outcome is None and not decided:
            decided = self._drain_for(call, bound)
            if bound is not None and time.monotonic() >= bound:
                break
        return decided

    def _drain_for(self, call: PendingCall, bound: float | None) -> list[PendingCall]:
        """As the drainer: one reply for ``call`` (routing whatever comes first on its ring), or a failure, or a
        timeout at ``bound``. Returns the calls it decided, to be settled with no lock held."""
        if self.failure is not None:
            return self._sweep()
        r = call.next_missing()
        if r is None:
            return []
        try:
            reply = self.replies[r].dequeue(timeout=None if bound is None else max(0.0, bound - time.monotonic()))
        except QueueTimeout:
            return self._expire_due()
        except (QueueClosed, PeerDied):  # the ring's writer is gone or leaving: how it ended is the monitor's word
            if self._await_failure() is None:
                rank = r + self.rank_offset
                self.failure = WorkerFailed(f"rank {rank}: reply queue closed during {call.method_name}", (rank,))
            return self._sweep()
        return self._route(r, reply)

    def _route(self, r: int, reply: Reply) -> list[PendingCall]:
        if reply.over_budget:
            self.over_budget = True
        target = self._pending.get(reply.call_id)  # only the drainer writes results: no lock until deciding
        if target is None:
            return []  # a call its caller abandoned: the late reply is dropped
        target.results[r] = reply
        if not reply.ok and reply.value.fatal:
            return self._device_lost(target, reply.value)
        if len(target.results) < len(target.expected):
            return []
        error = self._remote_error(target)
        if error is not None and self.peer_leaving is not None and self.peer_leaving(error.rank - self.rank_offset):
            error = self._verdict(error)
        with self._cond:
            if self._pending.pop(reply.call_id, None) is None:
                return []  # decided meanwhile (abandoned, failed, past its deadline)
            target.outcome = (False, error) if error is not None else \
                (True, [target.results[x].value for x in target.expected])
            return [target]

    def _verdict(self, symptom: RemoteError) -> SupervisorError:
        """A rank raised while a peer of its group is exiting: the error is the death's symptom (gloo's "Connection
        reset by peer" in the survivor of a SIGKILL), and the survivor's answer can come before the monitor has
        confirmed the death. The call fails with the death, worded by the monitor (which rank, how it ended), once
        it is. The rank's own error is kept as the cause. (A rank that answered with an error and then leaves is not
        its own peer: its error is the answer.)"""
        failure = self._await_failure()
        if failure is None:
            return symptom
        death = WorkerFailed(str(failure), failure.ranks, failure.restarting)
        death.__cause__ = symptom
        return death

    def _await_failure(self) -> WorkerFailed | None:
        """As the drainer, once a rank is known to be leaving: the failure the monitor sets when it has confirmed
        how the rank ended (``fail``), or the group's stop (``close``). Bounded by the drainer's bound and
        _VERDICT_WAIT_S; None if neither came."""
        with self._cond:
            bound = self._drain_bound
            wait_s = _VERDICT_WAIT_S if bound is None else min(_VERDICT_WAIT_S, max(0.0, bound - time.monotonic()))
            self._cond.wait_for(lambda: self.failure is not None, wait_s)
            return self.failure

    def _remote_error(self, call: PendingCall) -> RemoteError | None:
        for r in call.expected:
            reply = call.results[r]
            if not reply.ok:
                f: RemoteFailure = reply.value
                return RemoteError(self.rank_offset + f.rank, f.exc_type, f.message, f.traceback)
        return None

    def _device_lost(self, call: PendingCall, f: RemoteFailure) -> list[PendingCall]:
        """As the drainer: rank f.rank answered ``call`` with a fatal device error and exits right after it. No call
        on this group can be answered any more (the others wait on the rank, or on a collective with it): each fails
        now with one error naming the rank and the cause, as does every later send, before the monitor has even
        seen the exit. The lifecycle's failure, when it comes, keeps this one (fail() does not overwrite it)."""
        if self.failure is None:
            self.failure = DeviceFailed(self.rank_offset + f.rank, f.exc_type, f.cause, call.method_name, f.traceback)
        return self._sweep()

    def _settle_all(self, calls: list[PendingCall]) -> None:
        for call in calls:
            if call.hung is not None and self.on_deadline is not None:
                self.on_deadline(*call.hung)  # the ranks are declared hung before the caller hears of it
            call.settle()  # callbacks run here, holding no lock of ours

    # -- deadlines -------------------------------------------------------------------------------------------
    def _bound_locked(self, until: float | None) -> float | None:
        """Under ``_cond``: when the drainer must wake: the caller's limit or the earliest call deadline."""
        times = [c.expires_at for c in self._pending.values() if c.expires_at is not None]
        if until is not None:
            times.append(until)
        return min(times) if times else None

    def _expire_due(self) -> list[PendingCall]:
        """As the drainer: decide the calls whose deadline passed, naming only ranks that really did not answer."""
        now = time.monotonic()
        with self._cond:
            due = [c for c in self._pending.values() if c.expires_at is not None and c.expires_at <= now]
        decided = [d for call in due for d in self._collect_ready(call)]
        with self._cond:
            decided += self._decide_due(due)
        return decided

    def _decide_due(self, due: list[PendingCall]) -> list[PendingCall]:
        """Under ``_cond``: those calls missed their deadline. The ranks that did not answer are handed to
        ``on_deadline`` when the call is settled, with no lock held (it kills processes)."""
        out = []
        for call in due:
            if self._pending.pop(call.call_id, None) is None:
                continue
            missing = self.global_ranks(call.missing())
            why = f"missed the call deadline of {call.deadline_s:g} s ({call.method_name})"
            call.outcome = (False, RpcTimeout(f"{call.method_name}: ranks {list(missing)} {why}; declared hung",
                                              missing))
            call.hung = (missing, why) if missing else None
            out.append(call)
        return out

    def _collect_ready(self, call: PendingCall) -> list[PendingCall]:
        """Route the replies already there from the missing ranks (drainer only; never blocks)."""
        decided = []
        for r in call.missing():
            while r not in call.results:
                try:
                    reply = self.replies[r].dequeue(timeout=0)
                except (QueueTimeout, QueueClosed, PeerDied):
                    break
                decided += self._route(r, reply)
        return decided

    @staticmethod
    def _timed_out(until: float | None) -> bool:
        return until is not None and time.monotonic() >= until

    @staticmethod
    def _wait_s(until: float | None) -> float | None:
        return None if until is None else max(0.0, until - time.monotonic())

    # -- the reply reader --------------------------------------------------------------------------------------
    def _read_replies(self) -> None:
        """Drain for detached calls, oldest first, while any is pending; leave after an idle linger or on close."""
        while True:
            call = self._next_detached()
            if call is None:
                return
            self.await_call(call, None)

    def _next_detached(self) -> PendingCall | None:
        idle_until = time.monotonic() + _READER_LINGER_S
        with self._cond:
            while not (self._closed and not self._pending):
                call = next((c for c in self._pending.values() if c.detached), None)
                if call is not None:
                    return call
                if time.monotonic() >= idle_until:
                    break
                self._cond.wait(max(0.0, idle_until - time.monotonic()))
            self._reader = None
            return None

    # -- failure ---------------------------------------------------------------------------------------------
    def fail(self, error: WorkerFailed) -> None:
        """Make every pending and future call fail with ``error``; wake everyone blocked on our rings. The calls
        are settled by their waiters or the reply reader — in this (the monitor's) thread only if nobody is
        there to do it."""
        if self.failure is None:
            self.failure = error
        self._cancel_rings()
        self._sweep_if_unattended()

    def _cancel_rings(self) -> None:
        for q in (self.bcast, *self.replies):
            try:
                q.cancel_all()
            except Exception:
                pass
        with self._cond:
            self._cond.notify_all()

    def _sweep_if_unattended(self) -> None:
        with self._cond:
            if self._drainer is not None or self._reader is not None:
                return
        self._settle_all(self._sweep())

    def _sweep(self) -> list[PendingCall]:
        with self._cond:
            calls = list(self._pending.values())
            self._pending.clear()
            for call in calls:
                call.outcome = (False, self.failure)
        return calls

    def close(self) -> None:
        """The group stopped: every call still pending fails, the reply reader leaves, the rings are closed."""
        if self.failure is None:
            self.failure = WorkerFailed("the group stopped before answering")
        with self._cond:
            self._closed = True
            reader = self._reader
        self._cancel_rings()
        if reader is not None and reader is not threading.current_thread():
            reader.join(_CLOSE_JOIN_S)
        self._sweep_if_unattended()
        for q in (self.bcast, *self.replies):
            q.close()

    def global_ranks(self, ranks) -> tuple[int, ...]:
        return tuple(r + self.rank_offset for r in ranks)


# -- arguments -------------------------------------------------------------------------------------------------
_PICKLE_ERRORS = (pickle.PicklingError, TypeError, AttributeError)


class _ByValue:
    """An argument plain pickle cannot take (a lambda, an instance of a local class): it travels cloudpickled,
    the way callables do, and the worker's unpickler rebuilds it with ``cloudpickle.loads``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        import cloudpickle

        return cloudpickle.loads, (self.data,)


def from_main(value: Any) -> bool:
    """Defined in the parent's __main__ (a script's class, function or their instance): plain pickle would send a
    reference to ``__main__.name``, which a worker cannot resolve (workers do not re-run the user's script)."""
    return getattr(value, "__module__", None) == "__main__" or getattr(type(value), "__module__", None) == "__main__"


def any_from_main(args: tuple, kwargs: dict | None) -> bool:
    return any(map(from_main, args)) or bool(kwargs) and any(map(from_main, kwargs.values()))


def by_value(method_name: str, args: tuple, kwargs: dict | None) -> tuple[tuple, dict]:
    """After the request failed to pickle: the arguments plain pickle refuses, cloudpickled; TypeError naming
    the argument when cloudpickle cannot take it either. Only runs on that error path: the hot path pickles once."""
    import cloudpickle

    def fix(label: str, value: Any) -> Any:
        if not from_main(value):
            try:
                pickle.dumps(value, protocol=5)
                return value
            except Exception:
                pass
        try:
            return _ByValue(cloudpickle.dumps(value))
        except Exception as exc:
            raise TypeError(f"collective_rpc({method_name}): argument {label} cannot be pickled: "
                            f"{type(exc).__name__}: {exc}") from None

    new_args = tuple(fix(f"args[{i}]", a) for i, a in enumerate(args))
    new_kwargs = {k: fix(f"kwargs[{k!r}]", v) for k, v in (kwargs or {}).items()}
    return new_args, new_kwargs
