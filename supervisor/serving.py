"""Serving generation requests over the dp replicas, each request answered once even when its replica dies.

A generation is not one call: it is a prefill and then decode steps that read the KV cache their group built, so
a decode step cannot move to another replica (that replica holds another request's cache, or none). The unit that
is retried is therefore the request:

::

    generate(prompts, n) ── lease a serving, idle group g ──> prefill(prompts) ──> decode ... decode ──> tokens
                                    ▲                                   │ WorkerFailed (a rank of g died)
                                    │                                   ▼
                                    └── lease another serving group (or g's next incarnation), prefill(prompts +
                                        the tokens produced so far, n - produced) and continue; a "retry" event

Continue, not restart: greedy decoding is a function of the tokens so far, so prefill(prompt + produced) yields the
same next tokens that the dead group would have produced -- the answer is identical to a fault-free run (the bench
checks every answer against a single-process reference) -- and the tokens already paid for are not recomputed
one decode step at a time: one prefill replaces them. The worker API (worker/llm/worker.py: execute_model({"op":
"prefill", "prompts", "max_new_tokens"}) then {"op": "decode", "tokens"}) needs nothing new for it: a prefill
resets the group's cache and takes prompts of any length.

One request at a time per group (a lease): the group's cache holds one batch. Leases wait for a serving, idle group
within the request's deadline; the retry policy (which errors, how many attempts) is supervisor/core/retry.py's.
A lease is also an admitted request (supervisor/core/requests.py): a rolling restart or a shutdown's drain window
waits for the requests in flight on a group to finish before it stops the group, and admits no new one there.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Collection

from supervisor.core.retry import RetryPolicy, group_failure, next_request_id, wait_for
from supervisor.errors import RemoteError, WorkerFailed

STEP_TIMEOUT_S = 120.0  # one prefill or decode step without a deadline of its own (the first CUDA decode captures a graph)


class GroupLeases:
    """Which dp groups are busy with a request. A lease is taken only on a serving group, never on the incarnation
    of a group that just failed this request."""

    def __init__(self, view: Any, requests: Any) -> None:
        self._view, self._requests = view, requests  # requests: core/requests.py, what planned stops wait for
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._turn = 0

    def claim(self, avoid: tuple[int, Any] | None = None, prefer: int | None = None) -> int | None:
        """An idle serving group, now leased to the caller (``prefer`` first, if it is one); None if there is none
        at the moment."""
        with self._lock:
            live = self._view.live()
            order = [live[(self._turn + k) % len(live)] for k in range(len(live))]
            if prefer in order:
                order.remove(prefer)
                order.insert(0, prefer)
            for g in order:
                if g in self._busy or not self._view.serving(g):
                    continue
                if avoid is not None and g == avoid[0] and self._view.incarnation(g) is avoid[1]:
                    continue
                if not self._requests.admit(g):  # a rolling restart or a drain is waiting for this group
                    continue
                self._busy.add(g)
                self._turn += 1
                return g
            return None

    def release(self, group: int) -> None:
        with self._lock:
            self._busy.discard(group)
            self._requests.finish(group)


class Generator:
    """Greedy generation through a Supervisor running ``workload=llm``, a request at a time per dp group.

    ``retry`` (default: on unless ``rpc.retry_execute_model=never``): a request whose group fails is continued on
    another serving group, or on its own group once that serves again, up to ``rpc.retry_attempts`` in all."""

    def __init__(self, sup: Any, retry: bool | None = None) -> None:
        self.sup = sup
        self.retry = sup.cfg.rpc.retry_execute_model != "never" if retry is None else retry
        self.policy = RetryPolicy(sup.cfg.rpc.retry_attempts)
        self.leases = GroupLeases(sup.serving_view, sup.requests)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, timeout: float | None = None,
                 group: int | None = None, on_step: Callable[[str, int, float], None] | None = None,
                 stop: threading.Event | None = None, stop_ids: Collection[int] = ()) -> list[list[int]]:
        """The ``max_new_tokens`` greedy tokens after each prompt. One answer, or the last attempt's error.

        ``group``: the dp group to start on when it is serving and idle (a retry may still move the request).
        ``on_step(op, group, seconds)`` is called after every prefill and decode step (the CLI's figures).
        ``stop`` set: return the tokens produced so far after the current step.
        ``stop_ids`` (end-of-sequence ids): end the request once every row has produced one; the rows are
        returned as produced, each as long as the others (a row may go on past its own stop id: cut it there)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        view = self.sup.serving_view
        rid, rows, attempt = next_request_id(), [[] for _ in prompts], 1
        group = self._lease(deadline, None, WorkerFailed("generate: no dp group is serving"), group)
        try:
            while True:
                incarnation = view.incarnation(group)
                try:
                    try:
                        self._run(group, prompts, rows, max_new_tokens, deadline, on_step, stop, stop_ids)
                        return rows
                    except RemoteError as exc:  # a survivor's collective broke because a peer died: that is the
                        # group's failure, retried or not (the caller hears of the dead rank, not of a reset socket)
                        raise group_failure(exc, view, group, incarnation) or exc
                except WorkerFailed as exc:
                    if not self.retry or attempt >= self.policy.attempts or _passed(deadline):
                        raise
                    failed, group = group, None
                    self.leases.release(failed)
                    group = self._lease(deadline, (failed, incarnation), exc)
                    attempt += 1
                    self.sup.retry_stats.add(failed)
                    self.sup.events.emit("retry", call=rid, method="generate", from_group=failed, to_group=group,
                                         attempt=attempt, tokens_done=len(rows[0]),
                                         error=str(exc).splitlines()[0][:200])
        finally:
            if group is not None:
                self.leases.release(group)

    def _lease(self, deadline: float | None, avoid: tuple[int, Any] | None, exc: WorkerFailed,
               prefer: int | None = None) -> int:
        view = self.sup.serving_view
        return wait_for(view, "generate", lambda: self.leases.claim(avoid, prefer), lambda: bool(view.live()),
                        deadline, exc)

    def _run(self, group: int, prompts: list[list[int]], rows: list[list[int]], n: int, deadline: float | None,
             on_step: Callable[[str, int, float], None] | None, stop: threading.Event | None,
             stop_ids: Collection[int]) -> None:
        """Prefill (the prompts plus what is already produced) and decode to ``n`` tokens on ``group``, or until
        every row has produced one of ``stop_ids``."""
        first = self._step(group, {"op": "prefill", "prompts": [p + r for p, r in zip(prompts, rows)],
                                   "max_new_tokens": n - len(rows[0])}, deadline, on_step)
        for row, tok in zip(rows, first):
            row.append(tok)
        ended = [any(t in stop_ids for t in row) for row in rows]  # a retry's rows may have ended already
        while len(rows[0]) < n and not all(ended) and not (stop is not None and stop.is_set()):
            nxt = self._step(group, {"op": "decode", "tokens": [r[-1] for r in rows]}, deadline, on_step)
            for i, (row, tok) in enumerate(zip(rows, nxt)):
                row.append(tok)
                ended[i] = ended[i] or tok in stop_ids

    def _step(self, group: int, step: dict, deadline: float | None,
              on_step: Callable[[str, int, float], None] | None = None) -> Any:
        timeout = STEP_TIMEOUT_S if deadline is None else max(0.0, deadline - time.monotonic())
        t0 = time.perf_counter()
        out = self.sup.execute_model(step, group=group, timeout=timeout, retry=False)
        if on_step is not None:
            on_step(step["op"], group, time.perf_counter() - t0)
        return out


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
