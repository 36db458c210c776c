"""torchrun's failure summary, from the supervisor's events and the ranks' ``@record`` error files.

The same text torch.distributed.elastic prints (ChildFailedError.format_msg), built here without importing torch
(the supervisor stays light): for each rank that failed in the last attempt, its exit code or signal, and the
traceback its error file holds; the first failure is the root cause.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

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


def failures(events: list[dict], log_dir: str, attempt: int | None = None, rank_offset: int = 0) -> list[RankFailure]:
    """Failed ranks of the last attempt, first failure first. ``events`` are the supervisor's (started/exited).
    A multi-node round names its log folder (``attempt``) and the global rank of its local rank 0 (``rank_offset``)."""
    attempt_of = {e["pid"]: e.get("attempt", 0) for e in events if e["kind"] == "started"}
    exits = [e for e in events if e["kind"] == "exited" and e.get("code") not in (0, None)]
    if not exits:
        return []
    last = max(attempt_of.get(e["pid"], 0) for e in exits)
    out = []
    for e in sorted(exits, key=lambda e: e["time"]):
        tried = attempt_of.get(e["pid"], 0)
        if tried != last:
            continue
        folder = rank_dir(log_dir, tried if attempt is None else attempt, e["rank"])
        path = os.path.join(folder, ERROR_FILE) if log_dir else ""
        out.append(RankFailure(rank_offset + e["rank"], e["code"], e["pid"], e["time"],
                               path if os.path.isfile(path) else "", e["rank"] if rank_offset else None))
    return out


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
