"""Structured events: one JSON object per line in <run dir>/events.jsonl, in memory for status views, and handed to
subscribers (the start-up display, the metrics, the story in supervisor.log).

Every event carries ``run`` (this run's id), ``time`` (unix seconds), ``iso`` (the same instant, ISO 8601 UTC),
``kind``, and where it applies ``group``, ``rank``, ``pid``, plus kind-specific fields. Kinds:

    started        at spawn (pid, attempt)                       phase     a rank entered a start-up phase
    ready          the rank answered READY (startup_s)           group_ready  every rank of a group is READY
    exited         code, reason ("exit 72", "SIGKILL"), meaning (what that code or signal means, in words)
    hung           why (heartbeat or call deadline), stack_log (where its stacks were dumped)
    restarting     attempt, backoff_s, restarts, reason          gave_up   reason, restarts
    stopped        ranks, reasons, pids, codes, by_stop (which ranks the stop itself signalled)
    recycled       group: restarted between calls, a worker over worker.max_rss_mb / max_calls
    rolling_restart  group: restarted between calls as asked (rolling_restart(), SIGUSR2, status --restart)
    forced_stop    pids (a second Ctrl-C: every worker SIGKILLed)
    callback_failed, timeout

A multi-node job (rankvisor-run --nnodes, supervisor/launch/job.py) adds, per node: job_started (store, hosting,
standby), round_started (round, nodes, world_size, rank_offset, restart_count, master), round_ended (end, detail,
nodes, restarts: the job's count after it, verdict), node_lost (found lost while joining, or absent from the round
that formed), store_failover (to, survivors), job_ended (verdict, why).
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from loguru import logger

Subscriber = Callable[[dict[str, Any]], None]


def new_run_id() -> str:
    """Short, unique enough to tell runs apart in merged logs and dashboards."""
    return uuid.uuid4().hex[:12]


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    def __init__(self, run_dir: str = "", keep: int = 1000, run_id: str = "") -> None:
        self._lock = threading.Lock()
        self.run_id = run_id or new_run_id()
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._subscribers: list[Subscriber] = []
        self._file = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            self.path = os.path.join(run_dir, "events.jsonl")
            self._file = open(self.path, "a", buffering=1)
        else:
            self.path = ""

    def subscribe(self, fn: Subscriber) -> None:
        """``fn(event)`` is called for every later event, in the emitting thread, after it is written. It must be
        quick and must not emit events itself; what it raises is logged and swallowed."""
        with self._lock:
            self._subscribers = [*self._subscribers, fn]

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not fn]

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        event = {"run": self.run_id, "time": round(now, 6), "iso": iso_time(now), "kind": kind, **fields}
        with self._lock:
            self.recent.append(event)
            if self._file is not None and not self._file.closed:
                self._file.write(json.dumps(event, default=str) + "\n")
            subscribers = self._subscribers
        logger.trace(f"event {event}")  # below loguru's default level: an embedding app sees no noise
        for fn in subscribers:
            try:
                fn(event)
            except Exception:  # an observer must never break the supervisor
                logger.opt(exception=True).debug(f"event subscriber {fn!r} failed")
        return event

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.recent if e["kind"] == kind]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
