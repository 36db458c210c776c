"""Shared-memory segments: create, attach, release, sweep.

Two kinds, one interface (``Segment``):

* Anonymous (the default, Linux): ``memfd_create``. The segment has no name anywhere, so no crash at any instant
  can leave one behind: the kernel frees it with the last descriptor or mapping. A reader attaches by reopening
  the writer's descriptor through ``/proc/<writer pid>/fd/<n>`` (what ``pidfd_getfd`` does, but needing only the
  read access to the writer's /proc that a same-user process has); the writer closes that descriptor once every
  reader has attached, and from then on only the mappings keep it. The descriptor's link names the segment
  (``/memfd:rvq-<pid>-<token>``), so a reused pid or descriptor number is never mistaken for it.
* Named: a file in /dev/shm, for where a descriptor cannot be reached: no ``memfd_create``, or a reader that may
  not open the writer's /proc entry (another user, ``hidepid`` /proc, a non-dumpable writer, another pid
  namespace such as a second container sharing only ``--ipc``). Set ``RV_SHM_NAMED=1`` (or pass ``named=True``)
  for them. Names are ``rvq-<owner pid>-<16 random hex digits>``: unguessable, and the pid lets ``sweep_dead()``
  remove the segments of an owner that died before it could unlink them. Files are created O_EXCL with mode
  0600 (not through multiprocessing.shared_memory, whose resource tracker would unlink segments it does not own
  and print "leaked" warnings). The owner unlinks its segment as soon as every party has attached.

Either way ``Segment.unlink()`` is the moment after which no one else can attach (name removed, or the owner's
descriptor closed), and the pages are reserved at creation (``reserve``): a full tmpfs is an exception then,
never a SIGBUS at first touch.
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


NAMED_ENV = "RV_SHM_NAMED"  # "1": named segments in /dev/shm instead of anonymous ones


@dataclass
class Segment:
    name: str
    map: mmap.mmap
    size: int
    fd: int = -1  # anonymous: the owner's descriptor number, as written in handles (-1: a named segment)
    _fd_open: bool = False  # this process still holds ``fd`` open (the owner, until every reader attached)

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @property
    def anonymous(self) -> bool:
        return self.fd >= 0

    def unlink(self) -> bool:
        """From now on no one else can attach: remove the name, or close the owner's descriptor. Idempotent."""
        if not self.anonymous:
            return unlink(self.name)
        if not self._fd_open:
            return False
        self._fd_open = False
        os.close(self.fd)
        return True

    def close(self) -> None:
        """Unmap (a forked copy closes its inherited descriptor too, leaving the owner's alone)."""
        if self._fd_open:
            self._fd_open = False
            os.close(self.fd)
        self.map.close()


def anonymous_default() -> bool:
    """Anonymous segments unless RV_SHM_NAMED asks for names or this system cannot make them."""
    return os.environ.get(NAMED_ENV, "").lower() not in ("1", "true", "yes") and _memfd_works()


_MEMFD_WORKS: list[bool] = []


def _memfd_works() -> bool:
    if not _MEMFD_WORKS:
        ok = False
        try:
            fd = os.memfd_create("rvq-probe", os.MFD_CLOEXEC)
            try:
                ok = os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:rvq-probe")
            finally:
                os.close(fd)
        except (AttributeError, OSError):
            pass
        _MEMFD_WORKS.append(ok)
    return _MEMFD_WORKS[0]


def new_name(owner_pid: int | None = None) -> str:
    return f"{PREFIX}{owner_pid or os.getpid()}-{secrets.token_hex(8)}"


def create(size: int, named: bool | None = None) -> Segment:
    """Create a zero-filled segment of ``size`` bytes, pages reserved and populated up front; anonymous unless
    ``named`` (default: ``anonymous_default()``)."""
    if named is None:
        named = not anonymous_default()
    return _create_named(size) if named else _create_anonymous(size)


def _create_anonymous(size: int) -> Segment:
    name = new_name()
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)  # a memfd is born 0777; /proc's access check already limits it to our user, and this
        # keeps the reopen through /proc/<pid>/fd to the owner's uid however that check is configured
        os.ftruncate(fd, size)
        reserve(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    _populate(mm)
    return Segment(name, mm, size, fd, True)


def _create_named(size: int) -> Segment:
    """A file in /dev/shm, mode 0600."""
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


def attach(name: str, size: int, owner_pid: int = 0, fd: int = -1) -> Segment:
    """Map an existing segment: anonymous if ``fd`` >= 0 (the owner's descriptor), else named. Raises
    FileNotFoundError if it is gone (owner died, or every reader had already attached)."""
    if "/" in name or not name.startswith(PREFIX):
        raise ValueError(f"not a transport segment name: {name!r}")
    if fd >= 0:
        seg = _map(_open_anonymous(name, owner_pid, fd), name, size)
        seg.fd = fd  # anonymous; this process holds no descriptor of it (``_fd_open`` stays False)
        return seg
    return _map(os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC), name, size)


def _open_anonymous(name: str, owner_pid: int, fd: int) -> int:
    """Reopen the owner's descriptor ``fd`` of segment ``name`` through /proc, checking it is that segment."""
    path = f"/proc/{owner_pid}/fd/{fd}"
    try:
        ok = os.readlink(path) == f"/memfd:{name} (deleted)"
    except FileNotFoundError:
        ok = False
    except PermissionError as exc:
        raise _no_access(name, path, exc) from None
    if not ok:
        raise FileNotFoundError(errno.ENOENT, f"ring {name} is gone: its writer (pid {owner_pid}) exited or "
                                              f"closed it once every reader had attached", path)
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError as exc:
        raise _no_access(name, path, exc) from None


def _no_access(name: str, path: str, exc: OSError) -> PermissionError:
    return PermissionError(errno.EACCES, f"cannot attach ring {name} through {path} ({exc.strerror}): a reader "
                                         f"must be able to read its writer's /proc entry (same user, no hidepid, "
                                         f"same pid namespace); else set {NAMED_ENV}=1 for /dev/shm names", path)


def _map(fd: int, name: str, size: int) -> Segment:
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
