"""Structured events: one JSON object per line in <run dir>/events.jsonl, and in memory for status views.

Kinds: started, ready, exited, hung, restarting, gave_up, stopped, recycled, callback_failed, timeout.
Each carries time (unix seconds), kind, and where it applies group, rank, pid, plus kind-specific fields.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from typing import Any

from loguru import logger


class EventLog:
    def __init__(self, run_dir: str = "", keep: int = 1000) -> None:
        self._lock = threading.Lock()
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._file = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            self.path = os.path.join(run_dir, "events.jsonl")
            self._file = open(self.path, "a", buffering=1)
        else:
            self.path = ""

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": round(time.time(), 6), "kind": kind, **fields}
        with self._lock:
            self.recent.append(event)
            if self._file is not None and not self._file.closed:
                self._file.write(json.dumps(event, default=str) + "\n")
        logger.trace(f"event {event}")  # below loguru's default level: an embedding app sees no noise
        return event

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.recent if e["kind"] == kind]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
