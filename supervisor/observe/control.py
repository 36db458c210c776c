"""The control socket: RUN_DIR/control.sock, a Unix stream socket (mode 0600, and the peer's uid checked), so
``python -m supervisor status`` in another shell can see and steer the tree. Nothing listens on the network.

One request per connection, one JSON line each way::

    {"cmd": "status"}                 -> {"ok": true, "status": {...snapshot...}}
    {"cmd": "restart", "group": 1}    -> {"ok": true, "restarting": 1}     (a graceful restart between calls)
    {"cmd": "restart", "group": "all"} -> {"ok": true, "restarting": "all"} (a rolling restart, one group at a time)
    {"cmd": "stop"}                   -> {"ok": true, "stopping": true}    (the command: exactly as SIGTERM, exit
                                                                            143; an embedded tree: a drained stop)
    anything else                     -> {"ok": false, "error": "..."}

A Unix socket path is limited to 107 bytes; a deep run folder is reached through /proc/self/fd/N/ (the folder
opened by descriptor), so the socket stays in the run folder whatever its path.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import threading
from typing import Any, Callable, Iterator

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 4096
IO_TIMEOUT_S = 5.0  # a client that connects and says nothing is dropped after this
_SUN_PATH_MAX = 107


@contextlib.contextmanager
def reachable(path: str) -> Iterator[str]:
    """A path to ``path`` short enough for a Unix socket address (through its folder's descriptor if needed)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Commands:
    """What the socket can do to a Supervisor."""

    def __init__(self, sup: Any, status: Callable[[], dict], stop: Callable[[], None]) -> None:
        self.sup, self.status, self.stop = sup, status, stop

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "restart":
            return self._restart(req.get("group"))
        if cmd == "stop":
            self.stop()
            return {"ok": True, "stopping": True}
        return {"ok": False, "error": f"unknown command {cmd!r} (status | restart | stop)"}

    def _restart(self, group: Any) -> dict[str, Any]:
        if group == "all":
            self.sup.rolling_restart(wait=False)
            return {"ok": True, "restarting": "all"}
        live = self.sup.live_groups
        if not isinstance(group, int) or isinstance(group, bool) or group not in live:
            return {"ok": False, "error": f"group: {group!r} is not a live group (live: {live}) nor 'all'"}
        self.sup.restart_group(group)  # between calls, losing none
        return {"ok": True, "restarting": group}


class _Handler(socketserver.StreamRequestHandler):
    timeout = IO_TIMEOUT_S

    def handle(self) -> None:
        if peer_uid(self.connection) != os.getuid():
            self._reply({"ok": False, "error": "refused: another user"})
            return
        line = self.rfile.readline(MAX_REQUEST_BYTES)
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self._reply({"ok": False, "error": f"bad request: {exc}"})
            return
        try:
            self._reply(self.server.commands.handle(req))
        except Exception as exc:  # a failing view must not take the socket down
            self._reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _reply(self, obj: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(obj, default=str).encode() + b"\n")


class _Server(socketserver.UnixStreamServer):
    commands: Commands


class ControlServer:
    """Serve ``commands`` on RUN_DIR/control.sock in one thread until ``close()``."""

    def __init__(self, run_dir: str, commands: Commands) -> None:
        self.path = os.path.join(run_dir, SOCKET_NAME)
        with reachable(self.path) as addr:
            self._server = _Server(addr, _Handler, bind_and_activate=False)
            try:
                self._server.server_bind()
                os.chmod(addr, 0o600)  # before listen(): nobody else can have connected yet
                self._server.server_activate()
            except BaseException:
                self._server.server_close()
                raise
        self._server.commands = commands
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="supervisor-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(IO_TIMEOUT_S)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def request(run_dir: str, req: dict[str, Any], timeout_s: float = IO_TIMEOUT_S) -> dict[str, Any]:
    """The client side: one request, one reply. OSError when nobody answers."""
    path = os.path.join(run_dir, SOCKET_NAME)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, reachable(path) as addr:
        sock.settimeout(timeout_s)
        sock.connect(addr)
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
