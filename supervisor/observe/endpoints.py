"""What another process reaches one tree through, started and closed as one: RUN_DIR/control.sock (control.py),
HTTP on 127.0.0.1 when ``http.when`` asks for it (http.py, metrics.py, page.py), and the tree's entry in this
user's registry of live trees (live.py), so that ``python -m supervisor status`` finds it from any folder.

The command's run (session.py) and a tree embedded in a program (embedded.py) both serve them; they differ only
in the run folder and in what ``status --stop`` does. Every part is best effort: a control socket that cannot be
bound, a port in use or a registry that cannot be written is one WARNING line, and the tree runs on without it.
"""
from __future__ import annotations

from typing import Any, Callable

from loguru import logger

from supervisor.observe import live
from supervisor.observe.snapshot import history, snapshot


class Endpoints:
    def __init__(self, sup: Any, run_dir: str, started_unix: float, stop: Callable[[], None],
                 embedded: bool = False, job: Callable[[], dict] | None = None) -> None:
        self.sup, self.run_dir, self.started_unix, self.job = sup, run_dir, started_unix, job
        self.control = self._start_control(stop)
        self.metrics, self.http = self._start_http()
        self.entry = self._register(embedded) if self.control is not None else ""

    @property
    def url(self) -> str | None:
        """The HTTP endpoints' base URL, or None when none serve."""
        return self.http.url if self.http is not None else None

    def status(self) -> dict[str, Any]:
        out = snapshot(self.sup, self.started_unix, self.run_dir)
        if self.job is not None:  # a multi-node job's round: the job as this node sees it
            out["job"] = self.job()
        return out

    def state(self) -> dict[str, Any]:
        return {"status": self.status(), "history": history(self.sup)}

    def close(self) -> None:
        if self.entry:
            live.unregister(self.entry)
        for part in (self.http, self.control):
            if part is not None:
                part.close()
        if self.metrics is not None:
            self.sup.calls.remove_sink(self.metrics.on_call)
            self.sup.events.unsubscribe(self.metrics.on_event)

    # -- parts -----------------------------------------------------------------------------------------------
    def _start_control(self, stop: Callable[[], None]):
        if not self.run_dir:
            return None
        from supervisor.observe.control import Commands, ControlServer

        try:
            return ControlServer(self.run_dir, Commands(self.sup, self.status, stop))
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

    def _register(self, embedded: bool) -> str:
        try:
            return live.register(self.run_dir, self.started_unix, embedded, self.sup.events.run_id)
        except OSError as exc:
            logger.warning(f"cannot register this run in {live.runtime_dir()} ({exc.strerror or exc}); "
                           f"`python -m supervisor status` finds it only given {self.run_dir}")
            return ""


def http_enabled(cfg: Any) -> bool:
    """http.when: serve (only in workload=serve, the long-running one) | always | never."""
    when = str(cfg.http.when)
    return when == "always" or (when == "serve" and str(cfg.workload.name) == "serve")
