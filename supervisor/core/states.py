"""Every lifecycle of the tree, one enum each, with its allowed transitions written next to it.

One helper moves them all: ``state.to(new, who)`` returns ``new`` or raises ``IllegalTransition``; ``towards`` is
the idempotent form for "be in this state" (a no-op if already there); ``settle(clean)`` ends a worker or group as
STOPPED or FAILED from wherever it is. Owners keep the value in a plain ``state`` attribute and assign the result::

    group.state = group.state.to(GroupState.READY, f"group {i}")

The tables describe what the code really does (tests/unit/test_states.py walks every allowed and forbidden edge):

    supervisor  STARTING ─> RUNNING ─> STOPPING ─> STOPPED
                   │           │          ^
                   └───────────┴─> GAVE_UP┘            (the policy's budget spent)

    group       STARTING ─> READY ─> STOPPING ─> STOPPED
                   │          │         ^          ^
                   │          └─> FAILED ──────────┤    (a rank died; FAILED -> STOPPED once its processes are gone)
                   └───────────────────────────────┘    (start-up failed or aborted: torn down at once)

    worker      STARTING ─> READY ─> RUNNING ─> STOPPING ─> STOPPED | FAILED
                   └──────────┴─────────┴──────────────────> STOPPED | FAILED   (exited by itself, clean or not)

    standby     WARMING ─> READY ─> PROMOTED                (a group's warm standby: its processes then belong to the
                   │         │                                group, whose worker lifecycle they follow)
                   └─────────┴─> FAILED | STOPPED           (died or too slow to warm up; the tree stopping)
"""
from __future__ import annotations

import enum
from typing import TypeVar

S = TypeVar("S", bound="LifecycleState")


class IllegalTransition(RuntimeError):
    """A lifecycle was asked to take an edge its table does not have: a bug in the caller."""


class LifecycleState(enum.Enum):
    """Base of every lifecycle enum: the table lives in ``_edges`` (set below each enum)."""

    @classmethod
    def edges(cls) -> dict:
        return cls._edges  # type: ignore[attr-defined]

    @property
    def terminal(self) -> bool:
        return not self.edges()[self]

    def can(self, new: "LifecycleState") -> bool:
        return new in self.edges()[self]

    def to(self: S, new: S, who: str = "") -> S:
        if not self.can(new):
            raise IllegalTransition(f"{who or type(self).__name__}: illegal transition {self.name} -> {new.name}")
        return new

    def towards(self: S, new: S, who: str = "") -> S:
        """``new`` if already there (idempotent), else the transition to it."""
        return self if self is new else self.to(new, who)


class SupervisorState(LifecycleState):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    GAVE_UP = "gave_up"


SupervisorState._edges = {
    SupervisorState.STARTING: frozenset({SupervisorState.RUNNING, SupervisorState.STOPPING, SupervisorState.GAVE_UP}),
    SupervisorState.RUNNING: frozenset({SupervisorState.STOPPING, SupervisorState.GAVE_UP}),
    SupervisorState.GAVE_UP: frozenset({SupervisorState.STOPPING}),
    SupervisorState.STOPPING: frozenset({SupervisorState.STOPPED}),
    SupervisorState.STOPPED: frozenset(),
}


class GroupState(LifecycleState):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


GroupState._edges = {
    GroupState.STARTING: frozenset({GroupState.READY, GroupState.FAILED, GroupState.STOPPING, GroupState.STOPPED}),
    GroupState.READY: frozenset({GroupState.FAILED, GroupState.STOPPING}),
    GroupState.FAILED: frozenset({GroupState.STOPPING, GroupState.STOPPED}),
    GroupState.STOPPING: frozenset({GroupState.STOPPED}),
    GroupState.STOPPED: frozenset(),
}


class WorkerState(LifecycleState):
    """A worker process's lifecycle, as the supervisor tracks it."""

    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    def settle(self, clean: bool, who: str = "") -> "WorkerState":
        """The process is gone: STOPPED if it ended cleanly, else FAILED; a terminal state is kept (the first
        verdict, e.g. FAILED by the monitor, wins over a later sweep)."""
        if self.terminal:
            return self
        return self.to(WorkerState.STOPPED if clean else WorkerState.FAILED, who)


_ENDED = frozenset({WorkerState.STOPPED, WorkerState.FAILED})
WorkerState._edges = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.STOPPING}) | _ENDED,
    WorkerState.READY: frozenset({WorkerState.RUNNING, WorkerState.STOPPING}) | _ENDED,
    WorkerState.RUNNING: frozenset({WorkerState.STOPPING}) | _ENDED,
    WorkerState.STOPPING: _ENDED,
    WorkerState.STOPPED: frozenset(),
    WorkerState.FAILED: frozenset(),
}

class StandbyState(LifecycleState):
    WARMING = "warming"  # its processes import, map the weights, warm up
    READY = "ready"  # every rank reported STANDBY: waiting to be promoted
    PROMOTED = "promoted"  # taken by its group's start in place of a spawn
    FAILED = "failed"  # a process died, or it did not warm up in time: stopped, replaced after a backoff
    STOPPED = "stopped"  # the tree stopped


_STANDBY_ENDED = frozenset({StandbyState.FAILED, StandbyState.STOPPED})
StandbyState._edges = {
    StandbyState.WARMING: frozenset({StandbyState.READY, StandbyState.PROMOTED}) | _STANDBY_ENDED,
    StandbyState.READY: frozenset({StandbyState.PROMOTED}) | _STANDBY_ENDED,
    StandbyState.PROMOTED: frozenset(),
    StandbyState.FAILED: frozenset(),
    StandbyState.STOPPED: frozenset(),
}

ALL_LIFECYCLES: tuple[type[LifecycleState], ...] = (SupervisorState, GroupState, WorkerState, StandbyState)
