"""This user's live trees, wherever they run: what ``python -m supervisor status`` without a folder looks through.

::

    RUNTIME/live/<pid>-<run id>.json     one entry per tree serving a control socket: written (0600) when the
                                         socket is up, removed when it closes; an entry whose process is gone
                                         (kill -9) is ignored and swept by the next reader
    RUNTIME/runs/<time>-<random>/        the run folder an embedded tree makes when it has none (control.sock,
                                         http.json), removed at its shutdown (supervisor/observe/embedded.py)

RUNTIME is ``$RANKVISOR_RUNTIME_DIR`` if set, else ``$XDG_RUNTIME_DIR/rankvisor`` (per user, mode 0700, a tmpfs
that the login session clears), else ``~/.cache/rankvisor``. An entry names its process by pid and start time, so
a pid reused by another program is not taken for the tree.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil

RUNTIME_ENV = "RANKVISOR_RUNTIME_DIR"
_SAME_START_S = 0.05  # psutil's create time of one process, read twice, agrees to well within this


def runtime_dir() -> str:
    explicit = os.environ.get(RUNTIME_ENV)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return os.path.join(xdg, "rankvisor")
    return os.path.join(os.path.expanduser("~"), ".cache", "rankvisor")


def private_dir(*parts: str) -> str:
    """RUNTIME/parts..., made (mode 0700) if missing."""
    path = os.path.join(runtime_dir(), *parts)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


@dataclass(frozen=True)
class LiveTree:
    run_dir: str
    pid: int
    started: float  # unix time the tree started
    embedded: bool  # in a program of the user's (Supervisor(cfg)), not the command
    command: list[str] = field(default_factory=list)  # the process's argv
    process_start: float = 0.0  # psutil's create time of ``pid``

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_start) < _SAME_START_S
        except psutil.Error:
            return False

    def describe(self) -> str:
        what = " ".join(self.command)[:100]
        return (f"{self.run_dir}  pid {self.pid}  started {time.strftime('%H:%M:%S', time.localtime(self.started))}"
                f"  {'embedded in ' if self.embedded else ''}{what}")


def register(run_dir: str, started: float, embedded: bool, run_id: str) -> str:
    """Write this process's entry for the tree in ``run_dir``; its path (for ``unregister``)."""
    me = os.getpid()
    entry = LiveTree(os.path.abspath(run_dir), me, started, embedded, list(sys.argv),
                     psutil.Process(me).create_time())
    path = os.path.join(private_dir("live"), f"{me}-{run_id}.json")
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(entry), f)
    os.replace(tmp, path)  # readers never see half an entry
    return path


def unregister(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def live_trees() -> list[LiveTree]:
    """The registered trees whose process still runs, newest first; entries of dead processes are removed."""
    folder = os.path.join(runtime_dir(), "live")
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".json")]
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(folder, name)
        tree = _read(path)
        if tree is not None and tree.alive():
            found.append(tree)
        elif tree is not None:
            unregister(path)  # its process is gone (kill -9): nobody else will remove it
    return sorted(found, key=lambda t: t.started, reverse=True)


def _read(path: str) -> LiveTree | None:
    try:
        with open(path) as f:
            return LiveTree(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None  # vanished meanwhile (its tree stopped), or not ours
