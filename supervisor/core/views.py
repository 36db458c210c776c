"""Read-only snapshots of the tree for callers (tests, scripts, status tables): plain frozen records, so nobody
needs to reach into the manager's own objects, and holding one keeps nothing alive."""
from __future__ import annotations

from dataclasses import dataclass

from supervisor.core.gate import Closed
from supervisor.core.states import GroupState, WorkerState


@dataclass(frozen=True)
class WorkerView:
    rank: int  # global rank
    local_rank: int  # rank inside its group's torch.distributed world
    pid: int
    create_time: float | None  # with the pid, identifies the process (a pid can be reused)
    state: WorkerState
    alive: bool


@dataclass(frozen=True)
class GroupView:
    index: int
    state: GroupState | None  # None: never started
    serving: bool  # its gate is open: calls pass
    closed: Closed | None  # why its gate is closed (None while serving)
    live: bool  # still one of the restart policy's children
    attempts: int  # start attempts so far (the current incarnation is attempt - 1)
    restarts: int
    workers: tuple[WorkerView, ...]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive]


@dataclass(frozen=True)
class PolicyWindow:
    """Failures the restart policy counts against its budget right now."""

    startup: int
    runtime: int


def group_view(life, i: int) -> GroupView:
    g = life.groups.get(i)
    gate = life.gates[i]
    workers = () if g is None else tuple(
        WorkerView(g.rank_offset + w.rank, w.rank, w.pid, getattr(w, "create_time", None), w.state, w.is_alive())
        for w in list(g.workers))
    return GroupView(i, None if g is None else g.state, gate.is_open, gate.closed_reason, i in life.live,
                     life.attempts[i], life.restarts[i], workers)
