"""One JSON-able picture of the running tree, shared by the control socket, the live page and the metrics."""
from __future__ import annotations

import os
import time
from typing import Any

RESTART_KINDS = ("exited", "hung", "restarting", "recycled", "rolling_restart", "gave_up", "group_ready", "forced_stop")
HISTORY_EVENTS = 200  # restart-history events sent to the page
LATENCY_BUCKET_S = 1.0  # the page's latency chart: one point (p50, p99) per second
LATENCY_WINDOW_S = 300.0


def snapshot(sup: Any, started_unix: float, run_dir: str) -> dict[str, Any]:
    """Supervisor, groups and workers as plain data. Cheap enough to take a few times a second."""
    return {
        "run": sup.events.run_id,
        "run_dir": run_dir,
        "pid": os.getpid(),
        "state": sup.state.value,
        "serving": sup.serving(),
        "uptime_s": round(time.time() - started_unix, 3),
        "time": time.time(),
        "groups": [group_row(g) for g in sup.groups()],
        "workers": sup.status(),
    }


def group_row(g: Any) -> dict[str, Any]:
    return {"group": g.index, "state": g.state.value if g.state is not None else "not started",
            "serving": g.serving, "closed": g.closed.value if g.closed is not None else None,
            "live": g.live, "attempts": g.attempts, "restarts": g.restarts}


def history(sup: Any) -> dict[str, Any]:
    """What the page draws over time: restart-related events, and RPC latency per second (p50 / p99 / count)."""
    events = [e for e in list(sup.events.recent) if e["kind"] in RESTART_KINDS][-HISTORY_EVENTS:]
    return {"events": events, "latency": latency_series(list(sup.calls.history))}


def latency_series(calls: list[tuple[float, str, float, str | None]], now: float | None = None) -> list[dict]:
    now = time.time() if now is None else now
    buckets: dict[int, list[float]] = {}
    for t, _method, seconds, _kind in calls:
        if now - t <= LATENCY_WINDOW_S:
            buckets.setdefault(int(t // LATENCY_BUCKET_S), []).append(seconds)
    out = []
    for b in sorted(buckets):
        s = sorted(buckets[b])
        out.append({"t": b * LATENCY_BUCKET_S, "n": len(s), "p50": s[len(s) // 2],
                    "p99": s[min(len(s) - 1, int(0.99 * len(s)))]})
    return out
