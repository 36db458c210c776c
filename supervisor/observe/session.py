"""What the CLI shows and serves for one run, started and stopped as one (``supervisor.observe.watch``).

    watch = observe.watch(sup, t0)     # before sup.start(): the story, the start-up display, control.sock, HTTP
    watch.ready(ready_s)               # the READY line (every case); the start-up display goes
    watch.close(code, summary)         # the summary and why it stopped into supervisor.log; sockets closed

Every part is best effort: a control socket that cannot be bound or a port in use is one WARNING line, and the run
goes on without it.
"""
from __future__ import annotations

import signal
import time
from typing import Any

from loguru import logger

from supervisor.observe import story
from supervisor.observe.progress import StartupProgress
from supervisor.observe.snapshot import history, snapshot


class Watch:
    def __init__(self, sup: Any, t0: float) -> None:
        self.sup, self.t0 = sup, t0
        self.started_unix = time.time() - max(0.0, time.monotonic() - t0)
        self.run_dir = sup.cfg.logging.run_dir
        sup.events.subscribe(story.tell)
        self.progress = StartupProgress.on_terminal()
        if self.progress is not None:
            sup.events.subscribe(self.progress.on_event)
        self.control = self._start_control()
        self.metrics, self.http = self._start_http()

    # -- parts -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return snapshot(self.sup, self.started_unix)

    def state(self) -> dict[str, Any]:
        return {"status": self.status(), "history": history(self.sup)}

    def _start_control(self):
        if not self.run_dir:
            return None
        from supervisor.observe.control import Commands, ControlServer

        try:
            return ControlServer(self.run_dir, Commands(self.sup, self.status))
        except OSError as exc:
            logger.warning(f"no control socket ({exc}); `python -m supervisor status` will not reach this run")
            return None

    def _start_http(self):
        settings = self.sup.cfg.http
        if not http_enabled(self.sup.cfg):
            return None, None
        from supervisor.observe.http import HttpServer, Routes
        from supervisor.observe.metrics import Metrics
        from supervisor.observe.page import PAGE

        metrics = Metrics(self.sup)
        self.sup.events.subscribe(metrics.on_event)
        self.sup.calls.add_sink(metrics.on_call)
        try:
            server = HttpServer(settings.port, Routes(self.sup, metrics, self.state, PAGE), self.run_dir)
        except OSError as exc:
            logger.warning(f"http.port={settings.port}: cannot listen on 127.0.0.1 ({exc.strerror or exc}); "
                           "no /metrics, probes or page for this run")
            return metrics, None
        logger.info(f"metrics, probes and the live page on {server.url} (/metrics /healthz /readyz)")
        return metrics, server

    # -- the CLI's moments -----------------------------------------------------------------------------------
    def ready(self, ready_s: float) -> None:
        self._end_progress()
        cfg = self.sup.cfg
        where = f"; status: python -m supervisor status {self.run_dir}" if self.control is not None else ""
        page = f"; page: {self.http.url}" if self.http is not None else ""
        logger.info(f"READY in {ready_s:.3f} s from the command's start: {cfg.parallel.total} ranks in "
                    f"{cfg.parallel.dp} group(s){where}{page}")

    def close(self, code: int, summary: str = "", failure: str = "") -> None:
        """After the tree has stopped: the summary and why it stopped, into supervisor.log; everything released."""
        self._end_progress()
        if summary:
            logger.debug(f"summary\n{summary}")
        logger.info(f"exit {code}: {self._why(code, failure)}")
        for part in (self.http, self.control):
            if part is not None:
                part.close()
        if self.metrics is not None:
            self.sup.calls.remove_sink(self.metrics.on_call)
            self.sup.events.unsubscribe(self.metrics.on_event)
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


def http_enabled(cfg: Any) -> bool:
    """http.when: serve (only in workload=serve, the long-running one) | always | never."""
    when = str(cfg.http.when)
    return when == "always" or (when == "serve" and str(cfg.workload.name) == "serve")
