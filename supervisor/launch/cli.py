"""``rankvisor-run``: torchrun's command line, run under the supervisor.

    rankvisor-run --nproc-per-node=4 --max-restarts=3 train.py --epochs 10
    rankvisor-run --nnodes=1:4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=host0:29400 train.py

More than one node (``--nnodes=N`` or ``MIN:MAX``): each node runs this command; the job's rounds go through torch's
own rendezvous and every node runs its ranks in its own supervised tree (supervisor/launch/job.py).

torchrun's flags, as torchrun spells them, become Hydra overrides of the same configuration ``python -m supervisor``
uses (``workload=script``), so every key of the tree still applies through ``-c key=value``. The script, its
arguments and the other string settings go into ``launch.*`` directly (no Hydra quoting of arbitrary arguments).

Where the exit differs from torchrun: stopped by SIGTERM/SIGINT/SIGHUP, the launcher stops every rank gracefully and
exits 128+signal (143 for SIGTERM), as every Unix tool does; torchrun exits 1. ``--torchrun-exit-codes`` gives 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import uuid

from supervisor.launch import jobspec
from supervisor.launch.jobspec import UsageError

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the flag, not argparse's usage block
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rankvisor-run", allow_abbrev=False,
                                description="torchrun's launcher, supervised (see README: rankvisor-run)")
    a = p.add_argument
    a("--nnodes", default="1", help="nodes: N, or MIN:MAX (elastic, --rdzv-backend=c10d)")
    a("--nproc-per-node", "--nproc_per_node", default="1", help="ranks on this node: N, cpu, gpu or auto")
    a("--standalone", action="store_true", help="one node, its own rendezvous (a run of one node always is)")
    a("--rdzv-backend", "--rdzv_backend", default="static", help="static (fixed nodes, --node-rank) or c10d")
    a("--rdzv-endpoint", "--rdzv_endpoint", default="", help="HOST:PORT of the rendezvous store (multi-node)")
    a("--rdzv-id", "--rdzv_id", default="none", help="the job's id (TORCHELASTIC_RUN_ID)")
    a("--rdzv-conf", "--rdzv_conf", default="", help="key=value,...: torch's rendezvous settings (multi-node)")
    a("--run-id", "--run_id", default=None, help="TORCHELASTIC_RUN_ID (same as --rdzv-id)")
    a("--max-restarts", "--max_restarts", type=int, default=0,
      help="restart every rank (one_for_all) at most this many times in all (multi-node: for the whole job)")
    a("--monitor-interval", "--monitor_interval", type=float, default=0.1,
      help="accepted and ignored: deaths are noticed at once, not polled")
    a("--start-method", "--start_method", default="spawn", choices=["spawn", "fork", "forkserver"],
      help="accepted: how torchrun starts Python workers; ranks here are forkserver children")
    a("--role", default="default", help="ROLE_NAME")
    a("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    a("--no-python", "--no_python", action="store_true", help="run the script as a command, not with python")
    a("--run-path", "--run_path", action="store_true", help="accepted: the script is run by path anyway")
    a("--log-dir", "--log_dir", default="", help="per-rank logs and error files (default: the run directory)")
    a("-r", "--redirects", default="0", help="0 none, 1 stdout, 2 stderr, 3 both: to the log files only")
    a("-t", "--tee", default="0", help="0 none, 1 stdout, 2 stderr, 3 both: to the log files and the console")
    a("--local-ranks-filter", "--local_ranks_filter", default="", help="console output only from these ranks: 0,2")
    a("--node-rank", "--node_rank", type=int, default=0, help="this node's rank (--rdzv-backend=static)")
    a("--master-addr", "--master_addr", default="127.0.0.1", help="static: the node hosting the store")
    a("--master-port", "--master_port", type=int, default=None,
      help="one node: the ranks' MASTER_PORT (default: a free one per attempt); static: the store's port (29500)")
    a("--local-addr", "--local_addr", default="", help="this node's address as the others reach it (multi-node)")
    # ours
    a("--fast", action="store_true", help="run the script with runpy inside a forkserver child that already "
                                          "imported torch (fast start) instead of a fresh interpreter")
    a("--shutdown-timeout", type=float, default=None, help="seconds between SIGTERM and SIGKILL of a rank")
    a("--torchrun-exit-codes", action="store_true", help="exit 1 when stopped by a signal, as torchrun does")
    a("-c", "--config", action="append", default=[], metavar="KEY=VALUE", help="any key of the tree (Hydra)")
    a("script", help="the training script (a module with -m, a command with --no-python)")
    a("args", nargs=argparse.REMAINDER, help="the script's arguments")
    return p


def overrides(ns: argparse.Namespace, multi_node: bool = False) -> list[str]:
    """The Hydra overrides for torchrun's flags (the launch.* strings are set afterwards, see launch_settings).
    Multi-node: no restart policy in the tree (restart=never): the job decides restarts, for every node."""
    out = ["workload=script", f"parallel.tp={nproc(ns.nproc_per_node)}", f"launch.script={_quote(ns.script)}",
           f"launch.module={str(ns.module).lower()}", f"launch.no_python={str(ns.no_python).lower()}",
           f"launch.mode={'fast' if ns.fast else 'fresh'}"]
    if ns.max_restarts < 0:
        raise UsageError(f"--max-restarts: must be >= 0, got {ns.max_restarts}")
    if ns.max_restarts and not multi_node:  # a total budget, as torchrun means it: no time window
        n = ns.max_restarts
        out += ["restart=one_for_all", f"restart.intensity={n}", f"restart.startup_intensity={n}",
                f"restart.period_s={_FOREVER_S}", f"restart.startup_period_s={_FOREVER_S}"]
    if not ns.fast:
        out.append("runtime.preload=[]")  # fresh interpreters import torch themselves: the forkserver stays light
    if ns.shutdown_timeout is not None:
        out.append(f"shutdown.grace_s={ns.shutdown_timeout}")
    if ns.master_port is not None and not multi_node:
        out.append(f"+runtime.env.MASTER_PORT={ns.master_port}")
    _refuse_clashes(out, ns.config)
    return out + list(ns.config)


# Which of our flags sets a key (the first prefix that matches), to name it when a -c sets the same key.
_FLAG_OF = (("parallel.tp", "--nproc-per-node"), ("restart", "--max-restarts"),
            ("shutdown.grace_s", "--shutdown-timeout"), ("runtime.env.MASTER_PORT", "--master-port"),
            ("runtime.preload", "the fresh mode (no --fast)"), ("launch", "the script's flags"))


def _refuse_clashes(ours: list[str], configs: list[str]) -> None:
    """A ``-c`` key that one of the flags sets too: one of the two would win silently, so neither does."""
    set_by_flags = {_key(o): o for o in ours}
    for item in configs:
        theirs = set_by_flags.get(_key(item))
        if theirs is not None:
            flag = next((f for prefix, f in _FLAG_OF if _key(item).startswith(prefix)), "rankvisor-run")
            raise UsageError(f"-c {item}: conflicts with {flag}, which sets {theirs.lstrip('+')}; "
                             "give only one of them")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


_FOREVER_S = float("inf")  # restart.period_s for a budget that never refills (said "in all", not in seconds)


def _quote(value: str) -> str:
    """A Hydra override value taken literally (a path may hold '=', ',' or brackets)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launch_settings(ns: argparse.Namespace, base):
    run_id = ns.run_id or (uuid.uuid4().hex if ns.standalone and ns.rdzv_id == "none" else ns.rdzv_id)
    return dataclasses.replace(
        base, script=ns.script, args=tuple(ns.args), module=ns.module, no_python=ns.no_python,
        mode="fast" if ns.fast else "fresh", run_id=run_id, role=ns.role,
        redirects=_stream_mask("--redirects", ns.redirects), tee=_stream_mask("--tee", ns.tee),
        local_ranks_filter=_ranks("--local-ranks-filter", ns.local_ranks_filter),
        log_dir=os.path.abspath(ns.log_dir) if ns.log_dir else "", torchrun_exit_codes=ns.torchrun_exit_codes)


def nproc(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value in ("gpu", "auto"):
        from supervisor.core.topology import visible_gpus

        gpus = visible_gpus()
        if gpus or value == "auto":
            return gpus or (os.cpu_count() or 1)
        raise UsageError("--nproc-per-node=gpu: no GPU is visible")
    if value == "cpu":
        return os.cpu_count() or 1
    raise UsageError(f"--nproc-per-node: must be a positive integer, cpu, gpu or auto, got {value!r}")


def check_node_rank(ns: argparse.Namespace) -> None:
    """One node: its rank is 0."""
    if ns.node_rank != 0:
        raise UsageError(f"--node-rank={ns.node_rank}: a run of one node (--nnodes={ns.nnodes}) is node 0")


def _stream_mask(flag: str, value: str) -> int:
    if value.isdigit() and int(value) in range(4):
        return int(value)
    raise UsageError(f"{flag}={value}: rankvisor-run takes one value for every rank: 0, 1, 2 or 3")


def _ranks(flag: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in value.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"{flag}={value}: must be ranks separated by commas, e.g. 0,2") from None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    signals = _signal_state()
    signals.install()
    from supervisor.backends.local import startmethod

    try:
        ns = parser().parse_args(args)
        if ns.fast:  # the forkserver's torch import (the fast way's long pole) overlaps loading the configuration
            startmethod.prestart(ns.config)  # a -c runtime.preload=[...] of the user's: no prestart, theirs is used
        cfg, job = load(ns)
    except UsageError as exc:
        startmethod.stop_helpers()
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        code = run(cfg, signals, job)
    finally:
        startmethod.stop_helpers()  # the forkserver and resource tracker go with the command, not seconds later
    if job is not None:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """The multi-node path ends here, without the interpreter's shutdown: torch's store threads (the store this
    node hosts, its standby, keep-alive timers, a call blocked on a lost store) cannot be joined, and destroying
    them at exit aborts the process ('terminate called without an active exception'). Every rank is gone by now."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def load(ns: argparse.Namespace):
    """The validated Config for parsed torchrun-style flags, and the multi-node JobSpec (None for one node);
    UsageError for a bad flag or key."""
    from supervisor.backends.local.startmethod import cuda_initialized
    from supervisor.config import ConfigError, load_config, validate

    multi = jobspec.is_multi_node(ns.nnodes)
    if not multi:
        check_node_rank(ns)
    try:
        cfg = load_config(overrides(ns, multi))
        cfg = dataclasses.replace(cfg, launch=launch_settings(ns, cfg.launch))
        validate(cfg, cuda_initialized=cuda_initialized())
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not multi:
        return cfg, None
    from supervisor.launch.rendezvous import quiet_torch

    quiet_torch()
    return cfg, jobspec.parse(ns, cfg.parallel.tp)


def _signal_state():
    """The CLI's own signal handling (first signal: graceful stop; a second: forced)."""
    from supervisor.signals import SignalState

    return SignalState()


def _run_one(cfg, signals) -> int:
    """``python -m supervisor``'s own runner: run directory, logging, Supervisor, workload, summary, exit code."""
    from supervisor.cli import run_one  # here, not at the top: --help and bad flags answer before Hydra is imported
    from supervisor.config import make_run_dir

    return run_one(cfg, make_run_dir(), signals)


def run(cfg, signals, job=None) -> int:
    if job is not None:
        from supervisor.launch.job import run_job

        code = signals.exiting(run_job(cfg, job, signals))  # a signal's exit code stays that signal's
    else:
        code = signals.exiting(_run_one(cfg, signals))  # from here on
    if signals.signum and cfg.launch.torchrun_exit_codes:
        return 1  # torchrun: a SignalException ends the agent with exit code 1
    return code


if __name__ == "__main__":
    sys.exit(main())
