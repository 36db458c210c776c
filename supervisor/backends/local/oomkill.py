"""Was a worker that died of SIGKILL killed by the kernel's OOM killer? Asked of the kernel's own records.

A SIGKILL alone does not say who sent it: us (a hung rank, the end of a grace), a person with ``kill -9``, or the
kernel's OOM killer. The kernel keeps two records of its own kills, both written *before* it sends the SIGKILL
(mm/oom_kill.c: the memcg OOM_KILL event and the ``oom-kill:`` summary line precede ``do_send_sig_info``; the
``Killed process`` line follows it at once), so one look when the exit is confirmed finds them, with no waiting:

* the kernel log (``/dev/kmsg``, what ``dmesg`` shows)::

      oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),...,task=python3,pid=31485,uid=0
      Memory cgroup out of memory: Killed process 31485 (python3) total-vm:82120kB, anon-rss:72308kB, ...

  It names the pid: exact. Reading it needs CAP_SYSLOG where ``kernel.dmesg_restrict=1`` (root has it), and its
  pids are the host's, so inside a pid namespace of its own it never matches (the cgroup still does).
* the memory cgroup the worker was in: the ``oom_kill`` counter of cgroup v2's ``memory.events`` (cgroup v1:
  ``memory.oom_control``), against its value when the worker became READY. It counts kills in that cgroup, not a
  pid: a SIGKILL exit while it went up is taken as the OOM killer's.

Only the kernel log records that appear after the reader was opened (at the first spawn) are read, a few at a time.
"""
from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass

KMSG = "/dev/kmsg"
_RECORD_BYTES = 8192  # /dev/kmsg hands out one record per read(); a buffer shorter than it fails with EINVAL
_REMEMBERED_KILLS = 1024  # OOM kills kept from the log: far more than the ranks that can die between two looks
_KILLED = re.compile(r"Killed process (\d+) \(([^)]*)\)(?:\s+total-vm:\S+\s+anon-rss:\S+)?")
_SUMMARY = re.compile(r"oom-kill:.*,pid=(\d+)\b")


# -- the kernel log --------------------------------------------------------------------------------------------------
def parse_kernel_record(line: str) -> tuple[int, str] | None:
    """(pid, the record's words) for a record of an OOM kill, else None. Takes /dev/kmsg's ``PRI,SEQ,TIME,FLAGS;text``
    and dmesg's ``[  762.891389] text`` lines alike."""
    text = line.split(";", 1)[1] if ";" in line.split(" ", 1)[0] else line
    text = re.sub(r"^\s*\[[\s\d.]+\]\s*", "", text).strip()
    killed = _KILLED.search(text)
    if killed:
        return int(killed.group(1)), text[:killed.end()].rstrip(",")
    summary = _SUMMARY.search(text)
    if summary:
        return int(summary.group(1)), text
    return None


class KernelLog:
    """The kernel log's OOM kills since it was opened, read without blocking. Every method is thread-safe."""

    def __init__(self, path: str = KMSG) -> None:
        self.path = path
        self._fd: int | None = None
        self._opened = False
        self._kills: dict[int, str] = {}  # pid -> its record; the "Killed process" line wins over the summary
        self._lock = threading.Lock()

    def open(self) -> None:
        """Start reading at the log's end: only kills from now on matter. Does nothing where it cannot be read."""
        with self._lock:
            if self._opened:
                return
            self._opened = True
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.lseek(self._fd, 0, os.SEEK_END)
            except OSError:
                self._close_fd()

    @property
    def readable(self) -> bool:
        return self._fd is not None

    def killed(self, pid: int) -> str:
        """The record of the OOM killer's kill of ``pid`` ("" if the log has none, or cannot be read)."""
        with self._lock:
            self._read_new()
            return self._kills.get(pid, "")

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def _read_new(self) -> None:
        while self._fd is not None:
            try:
                record = os.read(self._fd, _RECORD_BYTES)
            except BlockingIOError:
                return  # read up to the end
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records were overwritten before we read them: go on with the oldest left
                self._close_fd()
                return
            if not record:
                return
            for line in record.decode("utf-8", "replace").splitlines():  # a record, then its " KEY=value" lines
                self._note(line)

    def _note(self, line: str) -> None:
        found = parse_kernel_record(line)
        if found is None:
            return
        pid, text = found
        if pid not in self._kills or "Killed process" in text:
            self._kills[pid] = text
        while len(self._kills) > _REMEMBERED_KILLS:
            self._kills.pop(next(iter(self._kills)))

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None


# -- the memory cgroup -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    """A cgroup hierarchy's mount: where it is, which part of the hierarchy it shows, and the counter file."""

    point: str
    root: str
    counters: str  # "memory.events" (v2) or "memory.oom_control" (v1): both have an "oom_kill N" line


def parse_mountinfo(text: str) -> dict[str, Mount]:
    """The cgroup v2 mount ("v2") and cgroup v1's memory controller mount ("memory") from /proc/self/mountinfo."""
    mounts: dict[str, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = fields[3], fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.setdefault("v2", Mount(point, root, "memory.events"))
        elif fstype == "cgroup" and "memory" in options:
            mounts.setdefault("memory", Mount(point, root, "memory.oom_control"))
    return mounts


def counter_files(proc_cgroup: str, mounts: dict[str, Mount]) -> list[str]:
    """The oom_kill counter files of the cgroups named by a /proc/PID/cgroup text (``ID:CONTROLLERS:PATH`` lines)."""
    files = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        mount = mounts.get("v2") if controllers == "" else \
            mounts.get("memory") if "memory" in controllers.split(",") else None
        if mount is None:
            continue
        if mount.root != "/" and path.startswith(mount.root):
            path = path[len(mount.root):]  # a mount that shows part of the hierarchy (a container's)
        files.append(os.path.join(mount.point, path.lstrip("/"), mount.counters))
    return files


def read_oom_kill(path: str) -> int | None:
    """The ``oom_kill`` count in a memory.events / memory.oom_control file (None: no such file or line)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


# -- the witness -------------------------------------------------------------------------------------------------------
class OomWitness:
    """Asks both records about one worker: ``baseline(pid)`` while it lives (at spawn and at READY), then
    ``evidence(pid, baseline)`` once its SIGKILL exit is confirmed."""

    def __init__(self, kmsg: str = KMSG, proc: str = "/proc", mountinfo: str = "/proc/self/mountinfo") -> None:
        self.log = KernelLog(kmsg)
        self.proc = proc
        self._mountinfo = mountinfo
        self._mounts: dict[str, Mount] | None = None

    def baseline(self, pid: int) -> dict[str, int]:
        """The oom_kill counters of ``pid``'s memory cgroups now (the kernel log starts being read, if it can be)."""
        self.log.open()
        try:
            with open(os.path.join(self.proc, str(pid), "cgroup"), encoding="utf-8") as f:
                files = counter_files(f.read(), self._cgroup_mounts())
        except OSError:  # already gone, or no /proc
            return {}
        counts = {path: read_oom_kill(path) for path in files}
        return {path: n for path, n in counts.items() if n is not None}

    def evidence(self, pid: int, baseline: dict[str, int]) -> str:
        """What says the OOM killer killed ``pid`` ("" when nothing does): its kernel log record, else the counter of
        a cgroup it was in that went up since ``baseline``."""
        record = self.log.killed(pid)
        if record:
            return f"kernel log: {record}"
        for path, before in baseline.items():
            now = read_oom_kill(path)
            if now is not None and now > before:
                return f"{path}: oom_kill {before} -> {now}"
        return ""

    def close(self) -> None:
        self.log.close()

    def _cgroup_mounts(self) -> dict[str, Mount]:
        if self._mounts is None:
            try:
                with open(self._mountinfo, encoding="utf-8") as f:
                    self._mounts = parse_mountinfo(f.read())
            except OSError:
                self._mounts = {}
        return self._mounts
