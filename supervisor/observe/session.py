"""What the CLI shows and serves for one run, started and stopped as one (``supervisor.observe.watch``).

    watch = observe.watch(sup, t0)     # before sup.start(): the story, the start-up display, control.sock, HTTP
    watch.ready(ready_s)               # the READY line (every case); the start-up display goes
    watch.close(code, summary)         # the summary and why it stopped into supervisor.log; sockets closed

The control socket, HTTP and the live registry entry are endpoints.py's (shared with a tree embedded in a program);
every part is best effort: one that cannot start is one WARNING line, and the run goes on without it.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from loguru import logger

from supervisor.observe import story
from supervisor.observe.endpoints import Endpoints
from supervisor.observe.progress import StartupProgress


class Watch:
    def __init__(self, sup: Any, t0: float, job: Any = None) -> None:
        self.sup, self.t0 = sup, t0
        self.started_unix = time.time() - max(0.0, time.monotonic() - t0)
        self.run_dir = sup.cfg.logging.run_dir
        sup.events.subscribe(story.tell)
        self.progress = StartupProgress.on_terminal()
        if self.progress is not None:
            sup.events.subscribe(self.progress.on_event)
        # `status --stop` stops the command as SIGTERM does: the CLI's own graceful path, exit code and all
        self.endpoints = Endpoints(sup, self.run_dir, self.started_unix, stop=_sigterm_self, job=job)

    # -- the CLI's moments -----------------------------------------------------------------------------------
    def ready(self, ready_s: float) -> None:
        self._end_progress()
        cfg = self.sup.cfg
        where = f"; status: python -m supervisor status {self.run_dir}" if self.endpoints.control is not None else ""
        page = f"; page: {self.endpoints.http.url}" if self.endpoints.http is not None else ""
        logger.info(f"READY in {ready_s:.3f} s from the command's start: {cfg.parallel.total} ranks in "
                    f"{cfg.parallel.dp} group(s){where}{page}")

    def close(self, code: int, summary: str = "", failure: str = "") -> None:
        """After the tree has stopped: the summary and why it stopped, into supervisor.log; everything released."""
        self._end_progress()
        if summary:
            logger.debug(f"summary\n{summary}")
        logger.info(f"exit {code}: {self._why(code, failure)}")
        self.release()

    def release(self) -> None:
        """Sockets closed, subscriptions ended (a multi-node round's tree ends here, not the command)."""
        self._end_progress()
        self.endpoints.close()
        self.sup.events.unsubscribe(story.tell)

    def _why(self, code: int, failure: str) -> str:
        if code >= 128:
            try:
                return f"stopped by {signal.Signals(code - 128).name} (graceful)"
            except ValueError:
                return f"stopped by signal {code - 128}"
        outcome = self.sup.outcome
        if outcome.gave_up:
            return f"gave up: {str(outcome.error).splitlines()[0] if outcome.error else 'the restart budget is spent'}"
        if code != 0:
            return f"the workload failed: {failure}" if failure else "failed"
        return "the workload finished; stopped cleanly"

    def _end_progress(self) -> None:
        if self.progress is not None:
            self.sup.events.unsubscribe(self.progress.on_event)
            self.progress.stop()
            self.progress = None


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
