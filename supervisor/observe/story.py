"""The run's story in supervisor.log: every event, in words, as it happens.

INFO for what a person reading the terminal wants (a group READY, a group stopped, a recycle, a rolling restart),
WARNING for failures (a rank that died on its own, a forced stop), DEBUG for the detail (each rank's spawn, phases,
READY, a clean exit). The file sink takes DEBUG, so the file has all of it; ``logging.level`` decides what the
terminal gets.
The lifecycle logs its own decisions (restarting, giving up, hangs); they are not repeated here.
"""
from __future__ import annotations

from typing import Any, Callable

from loguru import logger


def _started(e: dict) -> tuple[str, str]:
    return "DEBUG", f"rank {e['rank']} spawned: pid {e['pid']} (group {e['group']}, attempt {e['attempt']})"


def _phase(e: dict) -> tuple[str, str]:
    return "DEBUG", f"rank {e['rank']} entered {e['phase']} ({e['elapsed_s']:.3f} s after it started)"


def _ready(e: dict) -> tuple[str, str]:
    return "DEBUG", f"rank {e['rank']} READY (pid {e['pid']})"


def _group_ready(e: dict) -> tuple[str, str]:
    ranks = e["ranks"]
    span = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    return "INFO", f"group {e['group']} READY: ranks {span} in {e['startup_s']:.3f} s (attempt {e['attempt']})"


def _exited(e: dict) -> tuple[str, str]:
    level = "DEBUG" if e.get("code") == 0 else "WARNING"
    meaning = f": {e['meaning']}" if e.get("meaning") else ""
    return level, f"rank {e['rank']} (pid {e['pid']}, group {e['group']}) exited with {e['reason']}{meaning}"


def _stopped(e: dict) -> tuple[str, str]:
    pairs = ", ".join(f"rank {r} {why}" for r, why in zip(e["ranks"], e["reasons"]))
    return "INFO", f"group {e['group']} stopped: {pairs}"


def _forced(e: dict) -> tuple[str, str]:
    return "WARNING", f"forced stop: every worker SIGKILLed at once (pids {e.get('pids')})"


def _recycled(e: dict) -> tuple[str, str]:
    return "INFO", f"group {e['group']} recycled (a worker crossed worker.max_rss_mb / max_calls)"


def _rolling(e: dict) -> tuple[str, str]:
    return "INFO", f"group {e['group']} restarted by a rolling restart (asked for: SIGUSR2, status --restart)"


_WORDS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "started": _started, "phase": _phase, "ready": _ready, "group_ready": _group_ready, "exited": _exited,
    "stopped": _stopped, "forced_stop": _forced, "recycled": _recycled, "rolling_restart": _rolling,
}


def tell(event: dict[str, Any]) -> None:
    """An EventLog subscriber."""
    words = _WORDS.get(event["kind"])
    if words is not None and event.get("phase") != "ready":  # a rank's READY is told once, by its "ready" event
        level, text = words(event)
        logger.log(level, text)
