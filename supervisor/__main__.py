"""`python -m supervisor [-m] key=value ...`: configure, start the tree, run the workload, stop cleanly.

Exit codes: 0 done; 1 workers failed beyond the restart policy (or the workload failed its check); 2 bad
configuration; 128+signal when stopped by SIGINT / SIGTERM / SIGHUP. A fatal child death is never reported as 0.
Ctrl-C once stops gracefully; a second Ctrl-C kills every worker at once. SIGTERM first drains: new calls are
refused, calls in flight get up to shutdown.drain_s to finish; a second SIGTERM (or a Ctrl-C) cuts the drain short.
SIGUSR2 restarts the dp groups one at a time (a rolling restart), losing no call.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

USAGE = """usage: python -m supervisor [-m] [key=value ...]

  parallel.tp=8 parallel.pp=2 parallel.dp=2   topology        restart=one_for_all|one_for_one|rest_for_one|never
  device=auto|cpu|cuda                         devices         workload=tp_mlp|echo|serve|bench
  runtime.start_method=auto|forkserver|spawn|fork               shutdown.grace_s=3
  -m parallel.tp=1,2,4,8                       a sweep (one run after the other)
Configuration lives in conf/ (Hydra); any key can be overridden here."""


class SignalState:
    """First SIGINT/SIGTERM/SIGHUP: graceful stop (SIGTERM drains calls in flight first). A later signal cuts a drain
    short; a second SIGINT kills everything now. SIGUSR2: rolling restart."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self.supervisor = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGUSR2, self._rolling_restart)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self._kill_now()
        drain = self.signum is None and signum == signal.SIGTERM  # a first SIGTERM drains; any later one skips it
        self.signum = self.signum or signum
        self.stop.set()
        sup = self.supervisor
        if sup is not None:
            sup.request_shutdown(drain=drain)  # non-blocking: the main thread finishes the stop

    def _rolling_restart(self, _signum: int, _frame) -> None:
        sup = self.supervisor
        if sup is not None and self.signum is None:
            sup.rolling_restart(wait=False)  # the manager thread does it; progress is in the events

    def _kill_now(self) -> None:
        sup = self.supervisor
        if sup is not None:
            sup.force_stop()
        os._exit(128 + signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "status":  # `python -m supervisor status [RUN_DIR]`: another shell's view of a run
        from supervisor.observe import status_cli

        return status_cli.main(args[1:])
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    signals = SignalState()
    signals.install()
    from supervisor.backends.local import startmethod

    forkserver_pid = startmethod.prestart(args)
    try:
        configs = _load_all(overrides, multirun)
    except _BadConfig as exc:
        startmethod.stop_prestarted(forkserver_pid)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = 0
    for cfg in configs:
        if signals.stop.is_set():
            break
        code = max(code, run_one(cfg, signals))
    return code


class _BadConfig(Exception):
    pass


def _load_all(overrides: list[str], multirun: bool):
    from supervisor.config import ConfigError, expand_sweep, load_config, validate
    from supervisor.backends.local.startmethod import cuda_initialized
    from supervisor.core.topology import visible_gpus

    try:
        runs = expand_sweep(overrides) if multirun else [overrides]
        configs = [load_config(o) for o in runs]
        for cfg in configs:
            gpus = visible_gpus() if cfg.device == "cuda" else None
            validate(cfg, visible_gpus=gpus, cuda_initialized=cuda_initialized())
        return configs
    except ConfigError as exc:
        raise _BadConfig(str(exc)) from None


def run_one(cfg, signals: SignalState) -> int:
    from loguru import logger

    from supervisor import observe, workloads
    from supervisor.api import Supervisor
    from supervisor.config import make_run_dir, save_config
    from supervisor.errors import SupervisorError

    t0 = _command_start()
    run_dir = make_run_dir()
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=run_dir))
    save_config(cfg, run_dir)
    _setup_logging(cfg, run_dir)
    p = cfg.parallel
    logger.info(f"starting tp={p.tp} pp={p.pp} dp={p.dp} device={cfg.device} restart={cfg.restart.strategy} "
                f"(run dir {run_dir})")
    sup = Supervisor(cfg, start=False)
    signals.supervisor = sup
    watch = observe.watch(sup, t0)  # story in supervisor.log, start-up display, control socket, metrics/probes
    try:
        sup.start()
    except SupervisorError as exc:
        sup.shutdown()
        watch.close(128 + signals.signum if signals.signum else 1, failure=str(exc).splitlines()[0])
        if signals.signum:
            return 128 + signals.signum
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        logger.error(str(exc))
        return 1
    ready_s = time.monotonic() - t0
    watch.ready(ready_s)  # the READY line
    report = workloads.run(sup, signals.stop)
    t1 = time.monotonic()
    sup.shutdown()
    shutdown_s = time.monotonic() - t1
    code = _finish(cfg, sup, report, ready_s, shutdown_s, signals)
    watch.close(code, summary=getattr(sup, "summary", ""), failure=report.failure)  # why it stopped, in the log
    return code


def _finish(cfg, sup, report, ready_s: float, shutdown_s: float, signals: SignalState) -> int:
    from supervisor.workloads import format_report

    p = cfg.parallel
    outcome = sup.outcome
    items = [("world", f"tp={p.tp} pp={p.pp} dp={p.dp} ({p.total} workers, device {sup.device}, "
                       f"{sup.describe_backend()})"),
             ("start-up to READY (from the command's start)", f"{ready_s:.3f} s"), *report.lines, ("shutdown", f"{shutdown_s:.3f} s")]
    sup.summary = f"{cfg.workload.name} summary\n" + format_report(items)  # also into supervisor.log (observe)
    print("\n" + sup.summary, flush=True)
    if signals.signum:
        return outcome.exit_code(signals.signum)
    if outcome.gave_up:
        print(f"error: {str(outcome.error).splitlines()[0]}", file=sys.stderr)
        return outcome.exit_code()
    if not report.ok:
        print(f"error: {report.failure}", file=sys.stderr)
        return 1
    return 0


def _command_start() -> float:
    """time.monotonic() at which this process was created (start-up figures count from the command's start).
    The process's start time in clock ticks since boot (/proc/self/stat) against CLOCK_BOOTTIME: exact to a tick,
    where psutil's create_time is off by up to a second (it rounds the boot time)."""
    from transport import _proc

    return time.monotonic() - _proc.age_s()


def _setup_logging(cfg, run_dir: str) -> None:
    from loguru import logger

    logger.remove()
    # sys.stderr looked up at each write: the start-up display (rich) swaps it to print lines above itself
    logger.add(lambda message: sys.stderr.write(message), level=cfg.logging.level, colorize=sys.stderr.isatty(),
               format="{time:HH:mm:ss.SSS} | {level: <7} | supervisor | {message}")
    logger.add(os.path.join(run_dir, "supervisor.log"), level="DEBUG", enqueue=False)


if __name__ == "__main__":
    sys.exit(main())
