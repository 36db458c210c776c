"""``python -m supervisor``: a Hydra application, on Hydra's own argument parser and run/multirun machinery.

::

    argv ─ Hydra's parser (+ --version) ─▶ --help / --hydra-help / --cfg / --info / --shell-completion  (Hydra prints)
                                      └──▶ run or -m: preflight (compose + validate every job, GPU facts included)
                                               ─▶ Hydra's run / multirun (run dir, .hydra/, numbered sweep jobs)
                                               ─▶ task(): record what is used, start the tree, run the workload
    any Hydra / OmegaConf / config error ─▶ one line "error: <key or flag>: <problem>", exit 2

It mirrors ``hydra._internal.utils._run_hydra`` (what ``hydra.main`` calls) on Hydra's internal classes, hence the
pin ``hydra-core<1.4`` in pyproject.toml. What ``hydra.main`` would not give: errors stay one line (Hydra prints a multi-line report and exits 1), every job of
a sweep is validated before the first one starts, a signal stops a sweep between jobs, and the forkserver is started
by ``__main__`` before this module composes anything, so the two overlap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Iterator

from supervisor.signals import SignalState

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
USED_RECORD = "used.yaml"  # beside Hydra's config.yaml (what was asked) in the run folder's .hydra/


class _Refused(Exception):
    """A flag or key this app refuses, in one line."""


class _JobCrashed(Exception):
    """A bug while a job ran (not bad input): ``main`` re-raises the original, traceback and all."""


class _SweepStopped(BaseException):
    """A signal arrived before a job started: not an Exception, so Hydra's job runner lets it through and no later
    job of a sweep starts (a failed job, by contrast, does not stop a sweep)."""


def main(argv: list[str], signals: SignalState, on_exit: Callable[[], None]) -> int:
    """Run the command; ``on_exit`` stops what ``__main__`` prestarted when no tree will use it."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args, parser, signals)
    except _Refused as exc:
        return _fail(str(exc))
    except _JobCrashed as exc:
        raise exc.__cause__ from None  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - configuration errors of any layer become one line
        from supervisor.config import ConfigError, _translate

        err = exc if isinstance(exc, ConfigError) else _translate(exc) if _is_config_error(exc) else None
        if err is None:
            raise
        return _fail(str(err))
    finally:
        on_exit()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (HydraException, OmegaConfBaseException, ValueError))


# -- Hydra's parser, one line per error ----------------------------------------------------------------------------


def _parser() -> Any:
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "python -m supervisor"
    for action in parser._actions:  # Hydra's --version names only Hydra
        if "--version" in action.option_strings:
            action.version = _version_line()
    parser.error = lambda message: sys.exit(_fail(message))  # argparse would print the usage too
    return parser


def _version_line() -> str:
    from importlib import metadata

    import hydra

    try:
        ours = metadata.version("rankvisor")
    except metadata.PackageNotFoundError:
        ours = "(not installed)"
    return f"rankvisor {ours} (Hydra {hydra.__version__}, Python {sys.version.split()[0]})"


# -- dispatch: what _run_hydra does, with our search path and one-line errors --------------------------------------


def _dispatch(args: Any, parser: Any, signals: SignalState) -> int:
    from hydra.core.global_hydra import GlobalHydra

    from supervisor import config

    if args.experimental_rerun is not None:
        raise _Refused("--experimental-rerun: not supported; run again with the overrides in .hydra/overrides.yaml")
    if args.resolve and args.cfg is None and not args.help:
        raise _Refused("--resolve: only with --cfg or --help")
    commands = [args.run, args.multirun, args.cfg is not None, args.shell_completion, args.info is not None]
    if sum(map(bool, commands)) > 1:
        raise _Refused("--run, --multirun, --cfg, --info and --shell-completion exclude each other")
    _refuse_keys(args.overrides)
    name = args.config_name or config.CONFIG_NAME
    primary = os.path.abspath(args.config_path) if args.config_path else None
    for flag, folder in (("--config-dir", args.config_dir), ("--config-path", primary)):
        if folder and not os.path.isdir(folder):
            raise _Refused(f"{flag}: {os.path.abspath(folder)} is not a directory")
    config._register_schema()
    path = config.search_path(args.config_dir, primary)
    hydra = _create_hydra(path)
    try:
        return _command(hydra, args, parser, name, signals)
    except _SweepStopped:  # a signal between the preflight and the (next) job: nothing more starts
        return signals.code  # type: ignore[return-value]
    finally:
        GlobalHydra.instance().clear()


def _create_hydra(path: Any) -> Any:
    from hydra import version
    from hydra._internal.hydra import Hydra

    version.setbase(None)
    return Hydra.create_main_hydra2(task_name="supervisor", config_search_path=path)


def _command(hydra: Any, args: Any, parser: Any, name: str, signals: SignalState) -> int:
    from supervisor.config import lists_of_one

    overrides = lists_of_one(args.overrides)  # as compose_node takes them: the preflight checks what Hydra runs
    if args.help:
        hydra.app_help(config_name=name, args_parser=parser, args=args)
    elif args.hydra_help:
        hydra.hydra_help(config_name=name, args_parser=parser, args=args)
    elif args.cfg:
        hydra.show_cfg(config_name=name, overrides=overrides, cfg_type=args.cfg, package=args.package,
                       resolve=args.resolve)
    elif args.shell_completion:  # rankvisor and python -m supervisor in bash (supervisor/shell_completion.py)
        from supervisor.shell_completion import shell_completion

        shell_completion(hydra, name, overrides)
    elif args.info:
        hydra.show_info(args.info, config_name=name, overrides=overrides)
    elif args.multirun or _mode_is_multirun(overrides):
        return _multirun(hydra, name, overrides, signals)
    else:
        return _run(hydra, name, overrides, signals)
    return EXIT_OK


def _refuse_keys(overrides: list[str]) -> None:
    """Keys the command line sets itself."""
    for line in overrides:
        key = line.split("=", 1)[0].lstrip("+~")
        if key == "logging.run_dir":
            raise _Refused("logging.run_dir: the command's run folder is hydra.run.dir (hydra.sweep.dir with -m); "
                           "set that instead")


def _mode_is_multirun(overrides: list[str]) -> bool:
    return any(line.replace(" ", "") == "hydra.mode=MULTIRUN" for line in overrides)


# -- run and multirun ------------------------------------------------------------------------------------------------


def _run(hydra: Any, name: str, overrides: list[str], signals: SignalState) -> int:
    _preflight(name, [overrides])
    if signals.stop.is_set():
        return signals.code  # type: ignore[return-value]
    mode = [] if any(o.startswith("hydra.mode=") for o in overrides) else ["hydra.mode=RUN"]
    with _run_folder("hydra.run.dir"):
        ret = hydra.run(config_name=name, task_function=_task(signals), overrides=[*overrides, *mode])
    return ret.return_value


def _multirun(hydra: Any, name: str, overrides: list[str], signals: SignalState) -> int:
    from supervisor.config import expand_sweep

    plain = [line for line in overrides if not _mode_is_multirun([line])]
    _preflight(name, expand_sweep([line for line in plain if not line.startswith("hydra.")]))
    if signals.stop.is_set():
        return signals.code  # type: ignore[return-value]
    with _run_folder("hydra.sweep.dir"):
        returns = hydra.multirun(config_name=name, task_function=_task(signals),
                                 overrides=[*plain, "hydra.mode=MULTIRUN"])
    codes = [job.return_value for batch in returns for job in batch]
    return max(codes, default=EXIT_OK)


@contextlib.contextmanager
def _run_folder(key: str) -> Iterator[None]:
    """Hydra makes the run folder, writes .hydra/ and opens its log there before the task starts: an OSError out of
    it (the task wraps its own errors in _JobCrashed) is a folder that cannot be written, named in one line."""
    try:
        yield
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise _Refused(f"{key}: cannot write the run folder{where}: {exc.strerror or exc}") from None


def _preflight(name: str, jobs: list[list[str]]) -> None:
    """Compose and validate every job, with what this machine has, before the first one starts."""
    from supervisor import config, workloads
    from supervisor.backends.local.startmethod import cuda_initialized
    from supervisor.gpu import usable_gpus

    for job in jobs:
        cfg = config.from_node(config.compose_node([o for o in job if not o.startswith("hydra")], name))
        gpus = len(usable_gpus()) if cfg.device == "cuda" else None
        config.validate(cfg, visible_gpus=gpus, cuda_initialized=cuda_initialized())
        if cfg.backend == "local":  # the rings must fit /dev/shm (named segments): checked before any job starts
            from supervisor.backends.local.backend import preflight_shm

            preflight_shm(cfg)
        problem = workloads.check(cfg)  # a driver that cannot drive worker.cls is bad input too: exit 2, not 1
        if problem:
            raise config.ConfigError(*problem.split(": ", 1))


def _task(signals: SignalState) -> Callable[[Any], int]:
    jobs = []

    def task(node: Any) -> int:
        from hydra.core.hydra_config import HydraConfig

        from supervisor.config import from_node

        if signals.stop.is_set():
            raise _SweepStopped
        run_dir = HydraConfig.get().runtime.output_dir
        t0 = command_start() if not jobs else time.monotonic()  # a sweep's later jobs count from their own start
        jobs.append(run_dir)
        cfg = from_node(node)  # validated in the preflight: a ConfigError here is still bad input
        try:
            return run_one(cfg, run_dir, signals, t0)
        except Exception as exc:
            raise _JobCrashed from exc

    return task


def run_one(cfg: Any, run_dir: str, signals: SignalState, t0: float | None = None) -> int:
    """Run one tree in ``run_dir`` (made by Hydra here; by rankvisor-run's own launcher otherwise); the exit code.
    ``t0``: when start-up began, for the READY figure (default: this process's start)."""
    from loguru import logger

    from supervisor import observe, workloads
    from supervisor.api import Supervisor
    from supervisor.errors import SupervisorError

    t0 = command_start() if t0 is None else t0
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=run_dir))
    setup_logging(cfg, run_dir)
    p = cfg.parallel
    logger.info(f"starting tp={p.tp} pp={p.pp} dp={p.dp} device={cfg.device} restart={cfg.restart.strategy} "
                f"(run dir {run_dir})")
    sup = Supervisor(cfg, start=False, endpoints=False)  # the command serves its own (observe.watch)
    _record_used(cfg, sup, run_dir)
    if not signals.attach(sup):
        sup.shutdown()
        return signals.code  # type: ignore[return-value]
    watch = observe.watch(sup, t0)  # story in supervisor.log, start-up display, control socket, metrics/probes
    try:
        sup.start()
    except SupervisorError as exc:
        sup.shutdown()
        code = signals.code or EXIT_FAILED
        watch.close(code, failure=str(exc).splitlines()[0])
        if not signals.signum:
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            logger.error(str(exc))
        return code
    if signals.stop.is_set():  # stopped while starting: no READY time to report
        sup.shutdown()
        watch.close(signals.code, failure="stopped by a signal during start-up")
        return signals.code  # type: ignore[return-value]
    ready_s = time.monotonic() - t0
    watch.ready(ready_s)  # the READY line
    report = workloads.run(sup, signals.stop)
    t1 = time.monotonic()
    sup.shutdown()
    shutdown_s = time.monotonic() - t1
    code = _finish(cfg, sup, report, ready_s, shutdown_s, signals)
    watch.close(code, summary=getattr(sup, "summary", ""), failure=report.failure)  # why it stopped, in the log
    return code


def _finish(cfg: Any, sup: Any, report: Any, ready_s: float, shutdown_s: float, signals: SignalState) -> int:
    from supervisor.workloads import format_report

    p = cfg.parallel
    outcome = sup.outcome
    items = [("world", f"tp={p.tp} pp={p.pp} dp={p.dp} ({p.total} workers, device {sup.device}, "
                       f"{sup.describe_backend()})"),
             ("start-up to READY (from the command's start)", f"{ready_s:.3f} s"), *report.lines,
             ("restarts", _restarts_line(outcome.restarts, sup.retry_stats.total())),
             ("shutdown", f"{shutdown_s:.3f} s")]
    sup.summary = f"{cfg.workload.name} summary\n" + format_report(items)  # also into supervisor.log (observe)
    # workload.stdin: stdout carries one answer per prompt line, for the next program in the pipe; not the summary
    print("\n" + sup.summary, flush=True, file=sys.stderr if cfg.workload.stdin else sys.stdout)
    if signals.signum:
        return outcome.exit_code(signals.signum)
    if outcome.gave_up:
        print(f"error: {str(outcome.error).splitlines()[0]}", file=sys.stderr)
        return outcome.exit_code()
    if not report.ok:
        print(f"error: {report.failure}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _restarts_line(restarts: tuple[int, ...], retried: int) -> str:
    """The restarts the run rode through, per dp group where there are several, and the calls sent again."""
    per_group = f" (by group: {', '.join(map(str, restarts))})" if len(restarts) > 1 and any(restarts) else ""
    return f"{sum(restarts)}{per_group}" + (f"; calls sent again: {retried}" if retried else "")


# -- the run folder: what was used, beside what was asked ----------------------------------------------------------


def _record_used(cfg: Any, sup: Any, run_dir: str) -> None:
    """.hydra/used.yaml: what the run really used where the config left a choice (Hydra's config.yaml beside it
    keeps what was asked, unresolved: a ``${oc.env:TOKEN}`` stays an interpolation on disk). No config values
    here, so no secret either."""
    from omegaconf import OmegaConf

    from supervisor.backends.local.startmethod import resolve
    from supervisor.gpu import usable_gpus

    used = {
        "device": {"asked": str(cfg.device), "used": str(sup.device)},
        "gpus": list(usable_gpus()) if sup.device == "cuda" else [],
        "backend": str(cfg.backend),
        "start_method": {"asked": str(cfg.runtime.start_method),
                         "used": resolve(cfg.runtime.start_method) if cfg.backend == "local" else "ray"},
        "world": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": cfg.parallel.dp, "ranks": cfg.parallel.total},
        "versions": _versions(),
        "host": os.uname().nodename,
        "supervisor_pid": os.getpid(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    folder = os.path.join(run_dir, ".hydra")
    os.makedirs(folder, exist_ok=True)
    OmegaConf.save(OmegaConf.create(used), os.path.join(folder, USED_RECORD))


def _versions() -> dict[str, str]:
    """From the installed distributions' metadata: importing torch here would cost seconds."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("rankvisor", "torch", "hydra-core", "omegaconf", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def command_start() -> float:
    """time.monotonic() at which this process was created (start-up figures count from the command's start)."""
    from transport import _proc

    return time.monotonic() - _proc.age_s()


def setup_logging(cfg: Any, run_dir: str) -> None:
    from loguru import logger

    logger.remove()
    # sys.stderr looked up at each write: the start-up display (rich) swaps it to print lines above itself
    logger.add(lambda message: sys.stderr.write(message), level=cfg.logging.level, colorize=sys.stderr.isatty(),
               format="{time:HH:mm:ss.SSS} | {level: <7} | supervisor | {message}")
    logger.add(os.path.join(run_dir, "supervisor.log"), level="DEBUG", enqueue=False)
