"""``workload=serve worker=llm``: the Llama decoder loaded and answering prompts until a signal.

::

    READY ─▶ Completer.open (the checkpoint's tokenizer, one Generator for the tree)
          ├─▶ POST /v1/completions on the loopback HTTP server (completions_http.py), any number of clients
          └─▶ workload.stdin=true: prompts line by line from stdin (completions_stdin.py); end of input ends the run
          every completion ─▶ RUN_DIR/completions.jsonl

A request runs on one dp group at a time; a group that fails mid-request (a rank killed) is continued on another
serving group, or on its own once restarted, with the same tokens (serving.Generator), so a client sees one answer.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

from loguru import logger

from supervisor.completions import Completer
from supervisor.llm_checks import runs_llm
from supervisor.completions_http import PATH
from supervisor.report import Report


def check(cfg: Any) -> str | None:
    """One line if ``workload.stdin`` is asked where no prompt can be answered, else None."""
    if cfg.workload.stdin and not (str(cfg.workload.name) == "serve" and runs_llm(cfg)):
        return ("workload.stdin: prompts from stdin are answered by workload=serve with worker=llm, not "
                f"workload={cfg.workload.name} with worker.cls={cfg.worker.cls}")
    return None


def serve(sup: Any, stop: threading.Event, keep_serving: Callable[[Any, threading.Event], Report]) -> Report:
    """Answer prompts until ``stop`` (``keep_serving`` runs meanwhile), or until the end of stdin."""
    from supervisor.completions_stdin import answer_lines

    completer = Completer.open(sup)
    try:
        _announce(sup, completer)
        if sup.cfg.workload.stdin:
            answered, refused = answer_lines(completer, stop, timeout=sup.cfg.workload.request_timeout_s)
            report = Report(ok=not refused, failure=f"{refused} stdin line(s) refused (see their error lines)"
                            if refused else "")
            report.add("served until", "signal" if stop.is_set() else "the end of stdin")
            report.add("stdin lines", f"{answered} answered, {refused} refused")
        else:
            report = keep_serving(sup, stop)
    finally:
        completer.close()
    where = f"; {completer.log.path}" if completer.log.path else ""
    report.add("completions", f"{completer.log.count}{where}")
    return report


def _announce(sup: Any, completer: Completer) -> None:
    url = _http_url(sup.cfg.logging.run_dir)
    words = "text or token ids" if completer.tokenizer is not None else "token ids (no tokenizer in the checkpoint)"
    if url:
        logger.info(f"completions: POST {url.rstrip('/')}{PATH} (OpenAI's Completions API, greedy), prompts as {words}")
    if sup.cfg.workload.stdin:
        logger.info(f"completions: reading prompts from stdin, one a line ({words}); end of input ends the run")


def _http_url(run_dir: str) -> str:
    """The HTTP server's URL (RUN_DIR/http.json), or "" when this run has none."""
    try:
        with open(os.path.join(run_dir, "http.json"), encoding="utf-8") as f:
            return json.load(f)["url"]
    except (OSError, ValueError, KeyError):
        return ""
