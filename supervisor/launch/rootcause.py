"""torchrun's failure summary, from the supervisor's events and the ranks' ``@record`` error files.

The same text torch.distributed.elastic prints (ChildFailedError.format_msg), built here without importing torch
(the supervisor stays light): for each rank that failed in the last attempt, its exit code or signal, and the
traceback its error file holds; the first failure in time is the root cause, whichever death the supervisor
happened to see first.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

from worker.protocol import EXIT_STOP_OVERDUE
from worker.script import ERROR_FILE, rank_dir

_NA = "<N/A>"
_MAX_WIDTH = 60
_NO_TRACEBACK = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"


@dataclass(frozen=True)
class RankFailure:
    rank: int
    exitcode: int  # torchrun's convention too: negative = the signal
    pid: int
    time: float  # unix seconds
    error_file: str  # "" when the script wrote none (no @record, or killed by a signal)
    local_rank: int | None = None  # its rank on its node, when that differs from ``rank`` (multi-node)

    def message(self) -> str:
        data = _read(self.error_file)
        msg = data.get("message") if data else None
        if isinstance(msg, dict):
            return str(msg.get("extraInfo", {}).get("py_callstack", msg.get("message", _NA))).replace("\n", "\n  ")
        if isinstance(msg, str):
            return msg
        if self.exitcode < 0:
            return f"Signal {-self.exitcode} ({_signal_name(self.exitcode)}) received by PID {self.pid}"
        return _NO_TRACEBACK


# How a stop ends a rank: a graceful exit, our SIGTERM or SIGKILL, or leaving by itself when the grace ran out. A
# stopped rank with any other code had ended by itself just before the stop: a failure of its own. So had one
# killed by a signal the stop did not send (the stopped event's by_stop, where the backend tells).
_STOP_CODES = (0, -signal.SIGTERM, -signal.SIGKILL, EXIT_STOP_OVERDUE)
_STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)


@dataclass(frozen=True)
class _End:
    """How one rank process ended, as the supervisor's events tell."""

    rank: int
    pid: int
    code: int
    time: float  # unix seconds: when the exit was seen
    by_itself: bool  # not by the supervisor's stop


def failures(events: list[dict], log_dir: str, attempt: int | None = None, rank_offset: int = 0) -> list[RankFailure]:
    """Every rank of the last attempt that failed by itself, the first failure first. Failed: an exit the monitor
    reported with a non-zero code, a rank found ended by itself when its group was stopped, or a rank whose script
    wrote its error file (``@record``: it raised) however its process ended afterwards (the supervisor may have
    stopped it while it was still leaving, if a peer's death was seen first). When: the error file's time where
    there is one (when the exception was raised, as torchrun orders by its error files), else when the exit was
    seen. ``events`` are the supervisor's (started, exited, stopped). A multi-node round names its log folder
    (``attempt``) and the global rank of its local rank 0 (``rank_offset``)."""
    started = {e["pid"]: e for e in events if e["kind"] == "started"}
    found = []
    for end in _ends(events):
        tried = started.get(end.pid, {}).get("attempt", 0)
        folder = rank_dir(log_dir, tried if attempt is None else attempt, end.rank) if log_dir else ""
        failure = _failure(end, started.get(end.pid, {}), folder, rank_offset)
        if failure is not None:
            found.append((tried, failure))
    if not found:
        return []
    last = max(tried for tried, _ in found)
    return sorted((f for tried, f in found if tried == last), key=lambda f: f.time)


def _ends(events: list[dict]) -> list[_End]:
    """One end per rank process: the monitor's report (``exited``), else what its group's stop found."""
    ends = {e["pid"]: _End(e["rank"], e["pid"], e["code"], e["time"], e["code"] != 0)
            for e in events if e["kind"] == "exited" and e.get("code") is not None}
    for e in events:
        if e["kind"] != "stopped":
            continue
        by_stop = e.get("by_stop") or [None] * len(e["ranks"])
        for rank, pid, code, ours in zip(e["ranks"], e.get("pids", ()), e.get("codes", ()), by_stop):
            if pid not in ends and code is not None:
                ends[pid] = _End(rank, pid, code, e["time"], _by_itself(code, ours))
    return list(ends.values())


def _by_itself(code: int, by_stop: bool | None) -> bool:
    """A stopped rank's code is a failure of its own? ``by_stop``: whether the stop signalled it (None: unknown)."""
    if by_stop is None or code not in _STOP_SIGNALS:
        return code not in _STOP_CODES
    return not by_stop


def _failure(end: _End, started: dict, folder: str, rank_offset: int) -> RankFailure | None:
    """``end`` as a failure, or None if the supervisor's stop ended a rank that had not failed. ``folder``: the
    rank's log folder ("" without one). An error file older than the rank's start is a previous run's (a reused
    --log-dir), not this rank's."""
    path = os.path.join(folder, ERROR_FILE) if folder else ""
    raised_at = _mtime(path) if path else None
    if raised_at is not None and raised_at < started.get("time", 0.0):
        raised_at = None
    if raised_at is None and not end.by_itself:
        return None
    return RankFailure(rank_offset + end.rank, end.code, end.pid, raised_at or end.time,
                       path if raised_at is not None else "", end.rank if rank_offset else None)


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def format_failures(name: str, found: list[RankFailure]) -> str:
    """ChildFailedError.format_msg's layout: title, other failures, root cause (the first observed failure)."""
    blocks = [_format_one(i, f) for i, f in enumerate(found)]
    title = f"{name} FAILED"
    width = min(max([len(title), *(len(line) for b in blocks for line in b.splitlines())]), _MAX_WIDTH)
    others = blocks[1:] or ["  <NO_OTHER_FAILURES>"]
    return "\n".join(["", "=" * width, title, "-" * width, "Failures:", *others, "-" * width,
                      "Root Cause (first observed failure):", blocks[0] if blocks else _NA, "=" * width])


def _format_one(idx: int, f: RankFailure) -> str:
    sig = _signal_name(f.exitcode)
    when = datetime.fromtimestamp(f.time, tz=timezone.utc).strftime("%Y-%m-%d_%H:%M:%S")
    return "\n".join([
        f"[{idx}]:",
        f"  time      : {when}",
        f"  host      : {socket.gethostname()}",
        f"  rank      : {f.rank} (local_rank: {f.rank if f.local_rank is None else f.local_rank})",
        f"  exitcode  : {f.exitcode} (pid: {f.pid}){f' ({sig})' if sig != _NA else ''}",
        f"  error_file: {f.error_file or _NA}",
        f"  traceback : {f.message()}",
    ])


def _signal_name(exitcode: int) -> str:
    if exitcode >= 0:
        return _NA
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return _NA


def _read(path: str) -> dict:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
