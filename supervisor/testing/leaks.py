"""Leak accounting for tests that start processes: P processes, S shared memory, F descriptors and threads,
E resource-tracker warnings on stderr. A snapshot before, a bounded wait for things to settle after, and a
readable failure naming what was left behind. (Our own tests use it through tests/conftest.py; users through the
``rankvisor_leak_check`` fixture of supervisor.testing.)"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import psutil

SHM_DIR = "/dev/shm"


def helper_pids() -> set[int]:
    """multiprocessing's long-lived helpers (forkserver, resource tracker): shared by every test, not leaks."""
    from multiprocessing import forkserver, resource_tracker

    found = (getattr(forkserver._forkserver, "_forkserver_pid", None),
             getattr(resource_tracker._resource_tracker, "_pid", None))
    return {pid for pid in found if pid}


def _children() -> dict[int, psutil.Process]:
    helpers = helper_pids()
    out = {}
    for p in psutil.Process().children(recursive=True):
        if p.pid in helpers:
            continue
        try:
            if p.ppid() in helpers and p.status() == psutil.STATUS_ZOMBIE:
                continue  # the forkserver reaps its own children a moment later
        except psutil.Error:
            continue
        out[p.pid] = p
    return out


def _shm() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def _held_by_others(names: set[str]) -> set[str]:
    """The entries among ``names`` that a live process outside this test's tree has mapped: another test run's
    (the machine is shared, e.g. benchmarks creating sem.mp-* or rvq-* entries), not ours to account for. An
    entry that nobody maps, or that one of our own processes maps, is still reported.

    Mappings are matched by file (device and inode), not by path: glibc builds a named semaphore under a temporary
    name, maps it, then links it to its real name, so a process's maps show /dev/shm/sem.XXXXXX (deleted) for
    another's sem.mp-*; and an entry unlinked and re-created under the same name is another file."""
    files = _files(names)
    try:
        ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    except psutil.Error:
        return set()
    held = set(names) - set(files.values())  # gone since the listing: nothing was left behind
    for pid in psutil.pids():
        if pid in ours:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        held |= {files[key] for key in map(_mapped_file, maps.splitlines()) if key in files}
    return held


def _files(names: set[str]) -> dict[tuple[int, int], str]:
    """(device, inode) -> name, for the entries among ``names`` that still exist."""
    out = {}
    for name in names:
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = name
    return out


def _mapped_file(line: str) -> tuple[int, int] | None:
    """(device, inode) of a /proc/PID/maps line that maps a file under /dev/shm; None for any other line."""
    fields = line.split(maxsplit=5)
    if len(fields) < 6 or not fields[5].startswith(SHM_DIR + "/"):
        return None
    major, _, minor = fields[3].partition(":")
    try:
        return os.makedev(int(major, 16), int(minor, 16)), int(fields[4])
    except ValueError:
        return None


def _fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


@dataclass
class Snapshot:
    children: set[int]
    shm: set[str]
    fds: set[int]
    threads: int

    @classmethod
    def take(cls) -> "Snapshot":
        return cls(set(_children()), _shm(), _fds(), threading.active_count())


def leftovers(before: Snapshot, settle_s: float = 3.0) -> list[str]:
    """What is still there that was not before, after waiting up to ``settle_s`` for it to go away."""
    deadline = time.monotonic() + settle_s
    while True:
        problems = _diff(before)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)


def _diff(before: Snapshot) -> list[str]:
    problems = []
    extra = {pid: p for pid, p in _children().items() if pid not in before.children}
    for pid, p in extra.items():
        try:
            problems.append(f"process {pid} ({p.name()}, {p.status()}) {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            pass
    shm = _shm() - before.shm
    shm -= _held_by_others(shm) if shm else set()
    if shm:
        problems.append(f"/dev/shm entries {sorted(shm)}")
    fds = _fds() - before.fds
    if fds:
        problems.append(f"file descriptors {sorted(fds)} -> " + ", ".join(_fd_target(fd) for fd in sorted(fds)))
    if threading.active_count() > before.threads:
        problems.append(f"threads {[t.name for t in threading.enumerate()]}")
    return problems


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def kill_extra(before: Snapshot) -> None:
    """After a failure: make sure the next test starts clean."""
    for pid, p in _children().items():
        if pid not in before.children:
            try:
                p.kill()
            except psutil.Error:
                pass
