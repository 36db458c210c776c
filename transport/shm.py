"""Shared-memory segments: create, attach, unlink, sweep.

Segments are files in /dev/shm opened directly (not through multiprocessing.shared_memory, whose resource
tracker would unlink segments it does not own and print "leaked" warnings). Names are
``rvq-<owner pid>-<16 random hex digits>``: unguessable, and the pid lets ``sweep_dead()`` remove the segments
of an owner that died before it could unlink them. Files are created O_EXCL with mode 0600. The owner unlinks
its segment as soon as every party has attached, so afterwards even ``kill -9`` of everyone leaves nothing.
"""
from __future__ import annotations

import errno
import mmap
import os
import secrets
from dataclasses import dataclass

from transport import _proc

SHM_DIR = "/dev/shm"
PREFIX = "rvq-"
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


@dataclass
class Segment:
    name: str
    map: mmap.mmap
    size: int

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)


def new_name(owner_pid: int | None = None) -> str:
    return f"{PREFIX}{owner_pid or os.getpid()}-{secrets.token_hex(8)}"


def create(size: int) -> Segment:
    """Create a zero-filled segment of ``size`` bytes, mode 0600, pages populated up front."""
    name = new_name()
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit about the contract
        os.ftruncate(fd, size)
        reserve(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)
    _populate(mm)
    return Segment(name, mm, size)


def reserve(fd: int, size: int) -> None:
    """Allocate every page of the segment now. A tmpfs (/dev/shm) hands pages out at first touch, and a full one
    answers that touch with SIGBUS, which kills the process wherever it is; reserving them here turns a full
    /dev/shm into an exception at creation, naming the cause."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ShmFull(size, free_bytes()) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: touch-fault
            raise


class ShmFull(OSError):
    """No room in /dev/shm for a segment (found at creation, not by a SIGBUS later)."""

    def __init__(self, need: int, free: int) -> None:
        super().__init__(errno.ENOSPC, f"no room in {SHM_DIR} for a {mib(need)} ring ({mib(free)} free): "
                                       f"lower transport.slots / transport.slot_bytes, or give the container more "
                                       f"(docker run --shm-size=..., or --ipc=host)")
        self.need, self.free = need, free

    def __str__(self) -> str:
        return self.strerror  # one line, without OSError's "[Errno 28]" prefix


def free_bytes(path: str = SHM_DIR) -> int:
    """Bytes an unprivileged process may still allocate in ``path`` (0 if it does not exist)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def attach(name: str, size: int) -> Segment:
    """Map an existing segment. Raises FileNotFoundError if it is gone (owner died or already unlinked)."""
    if "/" in name or not name.startswith(PREFIX):
        raise ValueError(f"not a transport segment name: {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"segment {name} has {actual} bytes, the handle says {size}")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return Segment(name, mm, size)


def unlink(name: str) -> bool:
    """Remove the name (mappings stay valid). Idempotent: False if it was already gone."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return True
    except FileNotFoundError:
        return False


def _populate(mm: mmap.mmap) -> None:
    """Fault the pages in now, so the first messages do not pay for page faults."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError, AttributeError):  # kernels before 5.14
        for off in range(0, len(mm), mmap.PAGESIZE):
            mm[off] = 0


def owner_pid(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def list_segments(owner: int | None = None) -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return [n for n in names if owner_pid(n) is not None and (owner is None or owner_pid(n) == owner)]


def sweep_dead() -> list[str]:
    """Remove segments whose owner process no longer exists. Returns the names removed."""
    removed = []
    for name in list_segments():
        pid = owner_pid(name)
        if pid is not None and not _proc.alive(pid) and unlink(name):  # a zombie owner counts as dead
            removed.append(name)
    return removed


def sweep_owner(pid: int) -> list[str]:
    """Remove every segment created by ``pid`` (called after reaping a worker we started)."""
    return [n for n in list_segments(owner=pid) if unlink(n)]
