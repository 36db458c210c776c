"""Start-up progress on a terminal: a live table of ranks by phase (rich), from ``started`` to READY.

::

    group  rank  pid    phase        since start
    0      0     4242   load_model   3.2 s
    0      1     4243   READY        0.9 s

It listens to the event log (``started`` / ``phase`` / ``ready``) and stops at READY, at a failure, or when asked.
Off a terminal it shows nothing: the story (story.py) already writes one plain line per group at READY and one per
failure, and the CLI its READY line, in every case.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from worker.protocol import StartupPhase

_REFRESH_PER_S = 8
_PHASE_STYLE = {StartupPhase.SPAWNED.value: "dim", StartupPhase.IMPORTED.value: "cyan",
                StartupPhase.INIT_DEVICE.value: "yellow", StartupPhase.LOAD_MODEL.value: "magenta",
                StartupPhase.READY.value: "bold green", "exited": "bold red"}


@dataclass
class _Rank:
    group: int
    pid: int
    phase: str
    started: float  # monotonic, when we saw it spawn


class StartupProgress:
    """Use ``StartupProgress.on_terminal()``: None when stderr is not a terminal."""

    def __init__(self, console: Any) -> None:
        from rich.live import Live

        self._lock = threading.Lock()
        self._ranks: dict[int, _Rank] = {}
        self._t0 = time.monotonic()
        self._live = Live(get_renderable=self._render, console=console, refresh_per_second=_REFRESH_PER_S,
                          transient=True, redirect_stdout=True, redirect_stderr=True)
        self._stopped = False
        self._live.start()

    @classmethod
    def on_terminal(cls) -> "StartupProgress | None":
        if not sys.stderr.isatty():
            return None
        from rich.console import Console

        return cls(Console(file=sys.stderr))

    def on_event(self, e: dict[str, Any]) -> None:
        """An EventLog subscriber."""
        kind = e["kind"]
        with self._lock:
            if kind == "started":
                self._ranks[e["rank"]] = _Rank(e["group"], e["pid"], StartupPhase.SPAWNED.value, time.monotonic())
            elif kind == "phase" and e["rank"] in self._ranks:
                self._ranks[e["rank"]].phase = e["phase"]
            elif kind == "exited" and e["rank"] in self._ranks:
                self._ranks[e["rank"]].phase = "exited"

    def stop(self) -> None:
        """READY, a failure, or the end: the display goes; the log lines stay. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._live.stop()

    def _render(self):
        from rich.table import Table

        now = time.monotonic()
        table = Table(title=f"starting… {now - self._t0:.1f} s", title_justify="left", box=None)
        for column in ("group", "rank", "pid", "phase", "since spawn"):
            table.add_column(column)
        with self._lock:
            ranks = sorted(self._ranks.items())
        for rank, r in ranks:
            style = _PHASE_STYLE.get(r.phase, "")
            table.add_row(str(r.group), str(rank), str(r.pid), f"[{style}]{r.phase}[/]", f"{now - r.started:.1f} s")
        return table
