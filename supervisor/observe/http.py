"""HTTP on 127.0.0.1 only (standard library server, one thread per request, HTTP/1.0: no kept-alive threads):

    /metrics     Prometheus text format (metrics.py)
    /healthz     200 while the supervisor runs (its manager has not finished); 503 after — a liveness probe
    /readyz      200 while every live group serves; 503 while one is starting, restarting, or the tree stops,
                 with the groups that are not serving in the body — a readiness probe
    /api/state   the snapshot and its history as JSON (what the page polls)
    /            the live page (page.py)
    POST /v1/completions   a tree of the Llama decoder answers prompts (supervisor/completions_http.py)

Every GET path answers HEAD as it answers GET (status and headers, no body): ``curl -I``, probes that send HEAD.

The bound port (``http.port=0`` picks a free one) is written to RUN_DIR/http.json and logged.
"""
from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST

HOST = "127.0.0.1"  # loopback only: nothing of the tree is reachable from the network
IO_TIMEOUT_S = 5.0


class Routes:
    """What each path answers: (status, content type, body)."""

    def __init__(self, sup: Any, metrics: Any, state: Callable[[], dict], page: str) -> None:
        self.sup, self.metrics, self.state, self.page = sup, metrics, state, page

    def get(self, path: str) -> tuple[int, str, bytes]:
        route = {"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz,
                 "/api/state": self._state, "/": self._page}.get(path.split("?", 1)[0])
        if route is None:
            return 404, "text/plain; charset=utf-8", b"not found: try / /metrics /healthz /readyz /api/state\n"
        return route()

    def post(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        from supervisor import completions_http  # the serving layer, imported only when a prompt comes

        if path.split("?", 1)[0] != completions_http.PATH:
            return 404, "text/plain; charset=utf-8", f"not found: POST {completions_http.PATH}\n".encode()
        return completions_http.answer(self.sup, body)

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()

    def _healthz(self) -> tuple[int, str, bytes]:
        alive = not self.sup.finished.is_set()
        return (200 if alive else 503), "text/plain; charset=utf-8", b"ok\n" if alive else b"stopped\n"

    def _readyz(self) -> tuple[int, str, bytes]:
        if self.sup.serving():
            return 200, "text/plain; charset=utf-8", b"ready\n"
        down = [f"group {g.index}: {g.closed.value if g.closed is not None else 'not started'}"
                for g in self.sup.groups() if g.live and not g.serving]
        why = "; ".join(down) or f"supervisor {self.sup.state.value}"
        return 503, "text/plain; charset=utf-8", f"not ready: {why}\n".encode()

    def _state(self) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(self.state(), default=str).encode()

    def _page(self) -> tuple[int, str, bytes]:
        return 200, "text/html; charset=utf-8", self.page.encode()


class _Handler(BaseHTTPRequestHandler):
    timeout = IO_TIMEOUT_S
    server_version = "rankvisor"

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self._answer(lambda: self.server.routes.get(self.path))

    def do_HEAD(self) -> None:  # noqa: N802 -- every GET path answers HEAD: its status and headers, no body
        self._answer(lambda: self.server.routes.get(self.path), send_body=False)

    def _answer(self, route, send_body: bool = True) -> None:
        """``route()``'s answer; a failing route answers 500, it does not kill the server."""
        try:
            status, ctype, body = route()
        except Exception as exc:
            status, ctype, body = 500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode()
        self._reply(status, ctype, body, send_body)

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        from supervisor.completions_http import MAX_BODY_BYTES

        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:  # refused unread: the handler's thread never holds a huge body
            self.close_connection = True
            return self._reply(413, "text/plain; charset=utf-8",
                               f"Content-Length must be 0..{MAX_BODY_BYTES}\n".encode())
        self._answer(lambda: self.server.routes.post(self.path, self.rfile.read(length)))

    def _reply(self, status: int, ctype: str, body: bytes, send_body: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's signature)
        pass  # probes every second would flood the log


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # close() joins the request threads: none outlives the supervisor
    routes: Routes


class HttpServer:
    def __init__(self, port: int, routes: Routes, run_dir: str = "") -> None:
        self._server = _Server((HOST, port), _Handler)
        self._server.routes = routes
        self.port = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}/"
        self._info = os.path.join(run_dir, "http.json") if run_dir else ""
        if self._info:
            with open(self._info, "w") as f:
                json.dump({"url": self.url, "host": HOST, "port": self.port, "pid": os.getpid()}, f)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="supervisor-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(IO_TIMEOUT_S)
