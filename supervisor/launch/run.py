"""The launcher's loop: every rank runs the script; done when every rank's script exited 0.

::

    join (RPC, every rank) ──▶ all returned 0 ─────────────────────────────▶ done (exit 0)
        │ a rank failed: its process left with the script's exit; the Lifecycle applies the policy
        ├──▶ restarting (one_for_all, fresh MASTER_PORT, TORCHELASTIC_RESTART_COUNT+1) ─ wait until serving ─▶ join
        ├──▶ gave up (budget spent) ─▶ torchrun's failure summary from the error files ─▶ exit 1
        └──▶ stopped by a signal ─▶ every rank stopped gracefully ─▶ exit 128+signal

A rank whose script exited 0 stays up (idle) until the end: ranks finish at different times, and torchrun counts a
run as done only when every rank is. Nothing here polls: ``join`` blocks in each rank, and a failure ends the call
at once (the monitor fails pending calls the moment a rank dies).
"""
from __future__ import annotations

import os
import sys
import threading

from loguru import logger

from supervisor.api import Supervisor
from supervisor.errors import RemoteError, ShutdownInProgress, WorkerFailed
from supervisor.launch.rootcause import failures, format_failures
from supervisor.report import Report

JOIN = "join"  # worker.script.ScriptWorker.join


def drive(sup: Supervisor, stop: threading.Event) -> Report:
    report = Report()
    failures_seen = 0
    while True:
        try:
            sup.collective_rpc(JOIN)
            report.add("every rank's script", "exited 0")
            report.add("rank failures recovered from", failures_seen)
            return report
        except ShutdownInProgress:
            return _stopped(report)
        except (WorkerFailed, RemoteError) as exc:
            if stop.is_set():
                return _stopped(report)
            failures_seen += 1
            logger.warning(f"{str(exc).splitlines()[0]}")
            if isinstance(exc, RemoteError) or not sup.wait_until_serving():
                return _failed(sup, report)


def _stopped(report: Report) -> Report:
    report.add("stopped", "by signal")
    return report


def _failed(sup: Supervisor, report: Report) -> Report:
    """The policy gave up: once the tree is down, print torchrun's summary of the last attempt's failures."""
    cfg = sup.cfg
    sup.wait(timeout=cfg.shutdown.grace_s + cfg.shutdown.reap_s * 3 + 10)
    log_dir = os.path.abspath(cfg.launch.log_dir or cfg.logging.run_dir)  # as the ranks resolved it
    found = failures(list(sup.events.recent), log_dir)
    name = os.path.basename(cfg.launch.script) if not cfg.launch.module else cfg.launch.script
    if found:
        print(format_failures(name, found), file=sys.stderr, flush=True)
    report.ok = False
    report.failure = str(sup.error or "a rank failed").splitlines()[0]
    return report
