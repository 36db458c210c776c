"""Weights kept outside a rank: one flat arena per shard, filled once by the weight keeper, mapped by every
incarnation of the rank (and by its warm standby) without a copy.

::

    keeper (worker/keeper.py)                               rank / standby (any incarnation)
    Plan: build the model on "meta", count the bytes         open(handle) -> the same flat buffer, mapped
    allocate(nbytes, device) -> flat uint8 buffer            Arena(buffer, handle.slots): build the model again;
    Arena(buffer): build the model, parameters = views       each parameter is the next view, checked against
    fill them from the checkpoint                            the keeper's slot (shape, dtype, offset): no fill
    export(...) -> KeptWeights (picklable handle)  ──spec──▶

The model's constructor asks its allocator for every parameter in a fixed order (``alloc.empty(dims)``), so the
keeper and the rank lay the same parameters at the same offsets; the slots the keeper recorded make any drift an
error, never a rank silently computing with the wrong bytes.

Where the bytes live, and what a keeper's death does to them:

* CPU: an anonymous memfd (no name anywhere; nothing in /dev/shm to leak). The keeper holds the descriptor for its
  whole life; a rank reopens it through ``/proc/<keeper>/fd/<n>`` (checked by the link's name) and maps it
  read-only and shared: every rank and standby of the host reads the same page-cache pages, and a rank that writes
  into its weights faults instead of corrupting its siblings'. The kernel frees the pages with the last mapping, so
  ranks keep serving correct weights if the keeper dies.
* CUDA: one device allocation per shard, exported through torch's CUDA IPC (``reduce_tensor`` /
  ``rebuild_cuda_tensor``). The keeper allocates with expandable segments, whose memory is the driver's shareable
  VMM handles: an importer holds its own reference to the physical pages (``pidfd_getfd`` of the keeper's handle),
  so the weights outlive a keeper's death as on CPU. Where that path is off (``RV_KEEPER_LEGACY_IPC=1``), the
  legacy cudaIpc handles are used and ``outlives_keeper`` is False: the supervisor then stops the ranks that map a
  dead keeper's memory before they run another call.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

ALIGN = 256  # every view starts on a 256-byte boundary (what cudaMalloc gives a tensor of its own)
MEMFD_PREFIX = "rvw-"  # the memfd's name: /memfd:rvw-<keeper pid>-<token> in /proc/<pid>/fd links
LEGACY_IPC_ENV = "RV_KEEPER_LEGACY_IPC"  # "1": legacy cudaIpc handles (memory dies with the keeper)


class ArenaMismatch(RuntimeError):
    """A rank asked for a parameter that is not the keeper's next one: the model or its settings differ."""


@dataclass(frozen=True)
class Slot:
    """One parameter in the arena: where it starts and what it is."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    offset: int

    @property
    def nbytes(self) -> int:
        import torch

        n = 1
        for d in self.shape:
            n *= d
        return n * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class KeptWeights:
    """The handle a rank receives (in its WorkerSpec): enough to map the shard, and to check what it maps."""

    key: tuple  # what the shard is (the worker class's weights_key): equal keys share one arena
    nbytes: int
    slots: tuple[Slot, ...]
    device: str  # "cpu" or "cuda:N"
    owner_pid: int  # the keeper
    memfd: str = ""  # CPU: the memfd's name, checked against /proc/<owner>/fd/<fd>
    fd: int = -1  # CPU: the keeper's descriptor number
    cuda_ipc: tuple = ()  # CUDA: torch's rebuild_cuda_tensor arguments
    outlives_keeper: bool = True  # a mapping holds the memory itself (memfd, VMM); False: legacy cudaIpc


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


class Plan:
    """The allocator of a dry run: parameters on the meta device, their slots recorded, nothing allocated."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self.nbytes = 0

    def empty(self, dims: tuple[int, ...], dtype: Any) -> Any:
        import torch

        slot = Slot(tuple(int(d) for d in dims), _dtype_name(dtype), self.nbytes)
        self.slots.append(slot)
        self.nbytes = _align(self.nbytes + slot.nbytes)
        return torch.empty(dims, dtype=dtype, device="meta")


class Arena:
    """Hands out consecutive aligned views of one flat uint8 buffer. With ``slots`` (the rank's side) every request
    must be the keeper's next slot."""

    def __init__(self, buffer: Any, slots: tuple[Slot, ...] | None = None) -> None:
        self.buffer = buffer
        self.expected = slots
        self.slots: list[Slot] = []
        self.offset = 0

    @property
    def device(self) -> Any:
        return self.buffer.device

    def empty(self, dims: tuple[int, ...], dtype: Any) -> Any:
        slot = Slot(tuple(int(d) for d in dims), _dtype_name(dtype), self.offset)
        if self.expected is not None:
            i = len(self.slots)
            want = self.expected[i] if i < len(self.expected) else None
            if want != slot:
                raise ArenaMismatch(f"parameter {i}: the model asks for {slot}, the weight keeper holds {want}")
        end = slot.offset + slot.nbytes
        if end > self.buffer.numel():
            raise ArenaMismatch(f"parameter {len(self.slots)} ends at byte {end}, past the arena's "
                                f"{self.buffer.numel()} bytes")
        self.slots.append(slot)
        self.offset = _align(end)
        return self.buffer[slot.offset:end].view(dtype).view(dims)

    def check_complete(self) -> None:
        if self.expected is not None and len(self.slots) != len(self.expected):
            raise ArenaMismatch(f"the model took {len(self.slots)} parameters, the weight keeper holds "
                                f"{len(self.expected)}")


# -- the keeper's side -------------------------------------------------------------------------------------------
@dataclass
class Allocation:
    """A shard's buffer in the keeper, with what keeps it alive (the CPU mapping and descriptor)."""

    buffer: Any
    memfd: str = ""
    fd: int = -1
    map: Any = None


def allocate(nbytes: int, device: str) -> Allocation:
    """A zeroed flat buffer of ``nbytes`` for one shard: a memfd mapping on CPU, a device allocation on CUDA."""
    import torch

    size = max(nbytes, ALIGN)
    if device == "cpu":
        name = f"{MEMFD_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return Allocation(torch.frombuffer(mm, dtype=torch.uint8), name, fd, mm)
    return Allocation(torch.empty(size, dtype=torch.uint8, device=device))


def export(key: tuple, alloc: Allocation, slots: list[Slot], device: str) -> KeptWeights:
    common = dict(key=key, nbytes=alloc.buffer.numel(), slots=tuple(slots), device=device, owner_pid=os.getpid())
    if device == "cpu":
        return KeptWeights(**common, memfd=alloc.memfd, fd=alloc.fd)
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(alloc.buffer)
    return KeptWeights(**common, cuda_ipc=tuple(args), outlives_keeper=not legacy_ipc())


def legacy_ipc() -> bool:
    return os.environ.get(LEGACY_IPC_ENV, "").lower() in ("1", "true", "yes")


def ipc_leftovers(pid: int, shm_dir: str = "/dev/shm") -> list[str]:
    """The /dev/shm names a CUDA IPC exporter leaves when it exits without its destructors (os._exit, a kill):
    torch's reference counter of shared storages (``torch_<pid>_<n>_<n>``) and the driver's IPC segment
    (``cuda.shm.<device>.<pid in hex>.<n>``). Mappings of them live on; only the names go."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    def ours(name: str) -> bool:
        if name.startswith(f"torch_{pid}_"):
            return True
        parts = name.split(".")
        return name.startswith("cuda.shm.") and len(parts) == 5 and parts[3] == f"{pid:x}"

    return [n for n in names if ours(n)]


def remove_ipc_leftovers(pid: int, shm_dir: str = "/dev/shm") -> None:
    for name in ipc_leftovers(pid, shm_dir):
        with contextlib.suppress(OSError):  # gone already (its exporter, or another sweep)
            os.unlink(os.path.join(shm_dir, name))


# -- the rank's side ----------------------------------------------------------------------------------------------
class KeeperGone(RuntimeError):
    """The weight keeper that holds this shard is gone: its memory cannot be mapped any more."""


def open_buffer(handle: KeptWeights) -> Any:
    """The shard's flat buffer, mapped without a copy (read-only on CPU)."""
    if handle.device == "cpu":
        return _open_memfd(handle)
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*handle.cuda_ipc)


def _open_memfd(handle: KeptWeights) -> Any:
    import torch

    path = f"/proc/{handle.owner_pid}/fd/{handle.fd}"
    try:
        ok = os.readlink(path) == f"/memfd:{handle.memfd} (deleted)"
    except OSError:
        ok = False
    if not ok:
        raise KeeperGone(f"the weight keeper (pid {handle.owner_pid}) no longer holds shard {handle.key}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # page tables now, not a fault per page later
        mm = mmap.mmap(fd, handle.nbytes, flags, mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():  # read-only on purpose: a write into the weights faults
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mm, dtype=torch.uint8)
