"""The backend contract: what the manager core (``supervisor.core``) may ask of a backend, and nothing more.

The core decides (policy), a backend does (mechanism). Written as ``typing.Protocol`` classes, in the spirit of
torch elastic's ``PContext``: a backend provides five kinds of objects, and the core only ever touches the members
listed here. ``tests/unit/test_backend_contract.py`` holds every backend's classes against these Protocols (the
Ray classes included, without a Ray cluster), so the two implementations cannot drift apart unseen.

::

    Backend ──new_group(i, specs)──> Group ──start()──> READY: .workers (WorkerHandle…), .channel (Channel)
       │                               └──stop(graceful) / finish_stop()──> STOPPED
       ├──new_monitor(on_exit, on_hung)──> Monitor ──watch(group, workers)──> on_exit(group, [dead…]) / on_hung(…)
       └──stop_workers(workers, grace_s, reap_s): one escalation over many workers, one deadline

Rules every backend keeps:

- ``Group.start`` either returns with every rank READY and ``channel`` set, or raises ``StartupError`` naming the
  first rank that failed, having stopped every process it started (nothing is left for the core to clean up).
  It returns promptly (within a poll interval) once ``abort`` is set.
- ``Monitor`` callbacks run on the monitor's thread and must not block; ``on_exit`` is called once per death, with
  the exit status already confirmed (``WorkerHandle.exit_info()`` no longer says "still running").
- ``Channel.fail(error)`` makes every pending and future call on the channel raise ``error`` at once.
- ``stop_workers`` and ``Group.stop`` are idempotent, bounded by ``grace_s + reap_s``, and signal only processes
  the backend itself started.
- States move only along the tables of ``supervisor.core.states`` (``WorkerState``, ``GroupState``).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from supervisor.core.exits import ExitInfo
from supervisor.core.states import GroupState, WorkerState
from supervisor.errors import WorkerFailed
from worker.spec import WorkerSpec


@runtime_checkable
class WorkerHandle(Protocol):
    """One rank as the supervisor sees it. ``pid`` is 0 until known (a remote actor)."""

    spec: WorkerSpec
    rank: int  # rank inside its group's world
    pid: int
    state: WorkerState
    hung: bool  # declared hung (heartbeat or call deadline): its exit is reported as a hang

    def transition(self, new: WorkerState) -> None: ...

    def settle(self) -> None:
        """The process is gone: STOPPED or FAILED by how it ended."""

    def is_alive(self) -> bool: ...

    def exit_info(self) -> ExitInfo: ...

    def kill(self) -> None:
        """Kill it now (its death is then reported by the monitor)."""

    def dump_stack(self) -> None:
        """Have its Python stacks written where its logs go, if the backend can."""

    def psutil_process(self) -> Any:
        """The live local process (verified by create time), or None (gone, or not on this host)."""


@runtime_checkable
class Channel(Protocol):
    """Calls to one group: a broadcast request, replies in order per rank. A sent call is decided by the channel
    by itself (values by rank, or the error) and has the Future methods (``result``, ``exception``, ``done``,
    ``add_done_callback``), ``outcome`` ((ok, value) once decided) and ``drive(timeout)``: wait at most ``timeout``
    (CallTimeout, the ranks untouched). A call deadline that passes
    fails the call with RpcTimeout and hands the silent ranks to ``on_deadline`` (set by the lifecycle)."""

    failure: WorkerFailed | None  # set by fail(): every call raises it
    over_budget: bool  # a worker reported crossing max_rss / max_calls: recycle its group

    def send(self, method: Any, args: tuple, kwargs: dict | None, reply_rank: int | None,
             timeout: float | None, method_name: str, deadline_s: float | None = None,
             detached: bool = False) -> Any:
        """Send one request to every rank of the group; returns the call's Future. ``timeout`` bounds the
        sending; ``deadline_s`` is the call deadline; ``detached``: nobody will wait, complete it anyway."""

    def wait(self, call: Any, timeout: float | None) -> list[Any]:
        """Results of ``call`` ordered by rank (only ``reply_rank``'s if one was given). CallTimeout after
        ``timeout``, the call then abandoned (see ``abandon``)."""

    def abandon(self, call: Any) -> None:
        """The caller stopped waiting: its late answer is dropped; a call with a deadline stays watched."""

    def settle(self, timeout: float) -> bool:
        """Collect the replies of every call in flight so that a planned stop loses none; False on timeout."""

    def send_stop(self) -> None: ...

    def fail(self, error: WorkerFailed) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Group(Protocol):
    """The ranks of one TP×PP world, started, served and stopped as a unit."""

    index: int
    world: int  # ranks in the group
    rank_offset: int  # global rank of its rank 0
    state: GroupState
    workers: list  # list[WorkerHandle], in start order
    channel: Any  # Channel once READY, else None
    ready_at: float | None  # time.monotonic() when it became READY

    def transition(self, new: GroupState) -> None: ...

    def start(self, timeout_s: float, abort: threading.Event | None = None) -> None: ...

    def stop(self, graceful: bool = True) -> None: ...

    def finish_stop(self) -> None:
        """Bookkeeping once every process of the group is gone."""


@runtime_checkable
class Monitor(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def watch(self, group: Group, workers: Sequence[WorkerHandle]) -> None: ...

    def unwatch(self, workers: Sequence[WorkerHandle]) -> None: ...


OnExit = Callable[[Group, list], None]  # (group, the workers that died)
OnHung = Callable[[Group, list], None]  # (group, the workers declared hung)


@runtime_checkable
class Backend(Protocol):
    name: str  # "local", "ray"
    tree_marker: str  # the value of TREE_ENV in the environment of every process of this tree ("" if none)

    def describe(self) -> str:
        """What it runs on, for the summary ("start method forkserver", "2 Ray node(s)…")."""

    def rendezvous(self, tmp_dir: str, group: int, attempt: int) -> str:
        """torch.distributed's init_method for one group attempt ("" if chosen at start)."""

    def new_group(self, index: int, specs: Sequence[WorkerSpec]) -> Group: ...

    def new_monitor(self, on_exit: OnExit, on_hung: OnHung) -> Monitor: ...

    def stop_workers(self, workers: Sequence[WorkerHandle], grace_s: float, reap_s: float) -> None: ...

    def close(self) -> None: ...


CONTRACT: tuple[type, ...] = (Backend, Group, WorkerHandle, Channel, Monitor)
