"""`python -m supervisor status [RUN_DIR|latest] [--json] [--watch [SECONDS]] [--restart GROUP|all] [--stop] [--list]`

Asks a running supervisor, through RUN_DIR/control.sock, for its live table: one row per rank with group, pid,
state, restarts, RSS, CPU%, GPU MiB, its GPU's health (ok, ECC N, reset pending, a throttle reason), heartbeat age and the call in progress with its age. ``latest`` (the default)
is the newest of this user's live trees that answers, wherever it runs: those in the registry of live trees
(live.py; the command's runs and trees embedded in programs) and any run folder under ./outputs or ./multirun.
When several answer, they are listed on stderr (newest first) and the newest is named; ``--list`` lists them
only. ``--restart G`` restarts group G between calls, ``--restart all`` every group one at a time (a rolling
restart), ``--stop`` stops the tree as SIGTERM does.

Exit codes: 0 answered; 1 no supervisor answers there (not running any more); 2 bad arguments (one line).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import sys
import time
from typing import Any

from supervisor.observe import control, live

USAGE = ("usage: python -m supervisor status [RUN_DIR|latest] [--json] [--watch [SECONDS]] "
         "[--restart GROUP|all] [--stop] [--list]")
DEFAULT_WATCH_S = 2.0
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: what `watch` does between frames


class _Usage(Exception):
    pass


def main(argv: list[str]) -> int:
    # A viewer, not a supervisor: Ctrl-C ends it (KeyboardInterrupt), SIGTERM as by default, whatever the CLI set up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        opts = _parse(argv)
        if opts["list"]:
            return _list(opts["json"])
        run_dir = _resolve(opts["where"])
    except _Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if opts["stop"] or opts["restart"] is not None:
            return _command(run_dir, opts)
        return _show(run_dir, opts)
    except BrokenPipeError:  # our reader went away (`status --watch | head`): not the supervisor's fault
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as exc:
        print(f"error: no supervisor answers in {run_dir} ({exc.strerror or exc}); it is not running any more",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _parse(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"where": "latest", "json": False, "watch": None, "restart": None, "stop": False,
                            "list": False}
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            raise _Usage(USAGE)
        if a == "--json":
            opts["json"] = True
        elif a in ("--stop", "--list"):
            opts[a[2:]] = True
        elif a == "--watch":
            opts["watch"] = _number(args.pop(0), "--watch") if args and _is_number(args[0]) else DEFAULT_WATCH_S
        elif a == "--restart":
            if not args or not (args[0].isdigit() or args[0] == "all"):
                raise _Usage("--restart: needs a group number or 'all' (a rolling restart), e.g. --restart 1")
            group = args.pop(0)
            opts["restart"] = group if group == "all" else int(group)
        elif a.startswith("-"):
            raise _Usage(f"{a}: no such option ({USAGE})")
        else:
            opts["where"] = a
    return opts


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _number(s: str, what: str) -> float:
    value = float(s)
    if value <= 0:
        raise _Usage(f"{what}: must be a number > 0, got {s}")
    return value


def _resolve(where: str) -> str:
    if where != "latest":
        if not os.path.isdir(where):
            raise _Usage(f"{where}: no such run folder")
        if not os.path.exists(os.path.join(where, control.SOCKET_NAME)):
            raise _Usage(f"{where}: no {control.SOCKET_NAME} there (not a run folder, or its supervisor has exited)")
        return where
    trees = _answering()
    if not trees:
        raise _Usage(f"latest: no running supervisor of yours (none registered in {live.runtime_dir()}/live, "
                     "none under ./outputs or ./multirun); give RUN_DIR")
    if len(trees) > 1:
        print(f"{len(trees)} live trees, newest first; showing the newest, {trees[0].run_dir} (give RUN_DIR for "
              f"another):\n" + "\n".join(f"  {t.describe()}" for t in trees), file=sys.stderr)
    return trees[0].run_dir


def _answering() -> list[live.LiveTree]:
    """This user's trees that answer on their control socket, newest first: the registered ones, and those under
    ./outputs and ./multirun (found by their socket, in case one could not register)."""
    trees = {os.path.realpath(t.run_dir): t for t in live.live_trees()}
    for sock in [*glob.glob(os.path.join("outputs", "*", "*", control.SOCKET_NAME)),  # Hydra's run folders
                 *glob.glob(os.path.join("multirun", "*", "*", "*", control.SOCKET_NAME))]:  # a sweep's jobs
        run_dir = os.path.realpath(os.path.dirname(sock))
        trees.setdefault(run_dir, live.LiveTree(run_dir, 0, os.path.getmtime(sock), False))
    answers = [(t, _pid_answering(t.run_dir)) for t in trees.values()]
    return sorted((dataclasses.replace(t, pid=pid) for t, pid in answers if pid), key=lambda t: t.started,
                  reverse=True)


def _pid_answering(run_dir: str) -> int:
    """The pid of the supervisor answering in ``run_dir``, 0 if none does."""
    try:
        reply = control.request(run_dir, {"cmd": "status"}, timeout_s=1.0)
        return int(reply["status"]["pid"]) if reply.get("ok") else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # a supervisor killed with -9 leaves its socket file: skip it


def _list(as_json: bool) -> int:
    trees = _answering()
    if as_json:
        print(json.dumps([dataclasses.asdict(t) for t in trees]))
    else:
        print("\n".join(t.describe() for t in trees) or "no live tree")
    return 0 if trees else 1


def _command(run_dir: str, opts: dict[str, Any]) -> int:
    req = {"cmd": "stop"} if opts["stop"] else {"cmd": "restart", "group": opts["restart"]}
    reply = control.request(run_dir, req)
    if not reply.get("ok"):
        print(f"error: {reply.get('error')}", file=sys.stderr)
        return 2
    what = "stopping" if opts["stop"] else f"restarting group {opts['restart']}"
    print(json.dumps(reply) if opts["json"] else what)
    return 0


def _show(run_dir: str, opts: dict[str, Any]) -> int:
    while True:
        reply = control.request(run_dir, {"cmd": "status"})
        if not reply.get("ok"):
            print(f"error: {reply.get('error')}", file=sys.stderr)
            return 1
        out = json.dumps(reply["status"]) if opts["json"] else format_status(reply["status"])
        if opts["watch"] is None:
            print(out)
            return 0
        print((_CLEAR if sys.stdout.isatty() and not opts["json"] else "") + out, flush=True)
        time.sleep(opts["watch"])


_COLUMNS = [("group", 5), ("rank", 4), ("pid", 7), ("state", 9), ("restarts", 8), ("rss MiB", 8), ("cpu%", 6),
            ("gpu MiB", 8), ("gpu", 13), ("beat s", 7), ("call", 24)]
_LEFT = ("state", "gpu", "call")  # words, left-aligned; numbers are right-aligned


def format_status(st: dict[str, Any]) -> str:
    groups = ", ".join(f"{g['group']}: {'serving' if g['serving'] else (g['closed'] or g['state'])}"
                       for g in st["groups"])
    head = (f"run {st['run']}  {st['run_dir']}  supervisor pid {st['pid']}  {st['state']}"
            f"{'  serving' if st['serving'] else ''}  up {st['uptime_s']:.0f} s\ngroups  {groups}")
    lines = [head, *([format_job(st["job"])] if st.get("job") else []),
             " ".join(f"{name:<{w}}" if name in _LEFT else f"{name:>{w}}" for name, w in _COLUMNS)]
    for r in st["workers"]:
        call = f"{r['call']} {r['call_s']:.1f}s" if r.get("call") else "-"
        cells = [r["group"], r["rank"], r["pid"], r["state"], r["restarts"], _num(r.get("rss_mib")),
                 _num(r.get("cpu_pct")), _num(r.get("gpu_mib")), _num(r.get("gpu_health")),
                 _num(r.get("heartbeat_age_s")), call]
        lines.append(" ".join(f"{str(c):<{w}}" if name in _LEFT else f"{str(c):>{w}}"
                              for c, (name, w) in zip(cells, _COLUMNS)))
    return "\n".join(lines)


def format_job(j: dict[str, Any]) -> str:
    """A multi-node job's line: this node's place, the round, the job's restart count, the store."""
    first = j["rank_offset"]
    return (f"job    {j['node']}, group rank {j['group_rank']} of {len(j['nodes'])} (--nnodes={j['nnodes']}), "
            f"global ranks {first}..{first + j['local_ranks'] - 1} of {j['world_size']}, round {j['round']}, "
            f"restarts {j['restart_count']} of {j['max_restarts']}, store {j['store']} ({j['store_health']}"
            f"{', here' if j['store_here'] else ''})")


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
