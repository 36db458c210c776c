"""A tree embedded in a program (``Supervisor(cfg)`` from Python) serves what the command serves, when
``http.when`` asks for HTTP (``always``; ``serve`` with workload=serve): /metrics, the probes and the page on
127.0.0.1, RUN_DIR/control.sock for ``python -m supervisor status`` (which finds it from any folder through the
registry of live trees), http.json with the port.

RUN_DIR is ``logging.run_dir`` when given (kept at shutdown, as the command's is), else a private folder made
under RUNTIME/runs/ (supervisor/observe/live.py: ``$RANKVISOR_RUNTIME_DIR``, ``$XDG_RUNTIME_DIR/rankvisor`` or
``~/.cache/rankvisor``) and removed at shutdown. ``status --stop`` asks the tree for a drained stop
(``Supervisor.request_shutdown(drain=True)``): the program embedding it keeps running, its calls are refused.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from loguru import logger

from supervisor.observe import live
from supervisor.observe.endpoints import Endpoints, http_enabled


class Embedded:
    def __init__(self, sup: Any) -> None:
        self.made = "" if sup.cfg.logging.run_dir else _make_run_dir()
        self.endpoints = Endpoints(sup, sup.cfg.logging.run_dir or self.made, time.time(),
                                   stop=lambda: sup.request_shutdown(drain=True), embedded=True)

    def close(self) -> None:
        self.endpoints.close()
        if self.made:
            shutil.rmtree(self.made, ignore_errors=True)


def embed(sup: Any) -> Embedded | None:
    """The endpoints of an embedded tree, or None when its configuration asks for none (http.when)."""
    return Embedded(sup) if http_enabled(sup.cfg) else None


def _make_run_dir() -> str:
    """A private (0700) run folder under RUNTIME/runs/, or "" (HTTP without control.sock) where none can be made."""
    try:
        return tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S-"), dir=live.private_dir("runs"))
    except OSError as exc:
        logger.warning(f"no run folder under {live.runtime_dir()} ({exc.strerror or exc}): no control.sock; "
                       "set logging.run_dir, or RANKVISOR_RUNTIME_DIR to a writable folder")
        return ""
