"""Every lifecycle's table, walked edge by edge: each allowed transition is taken, each forbidden one raises."""
from __future__ import annotations

import itertools

import pytest

from supervisor.core.states import ALL_LIFECYCLES, GroupState, IllegalTransition, SupervisorState, WorkerState


@pytest.mark.parametrize("enum_cls", ALL_LIFECYCLES, ids=lambda c: c.__name__)
def test_every_edge_allowed_or_forbidden_as_the_table_says(enum_cls):
    table = enum_cls.edges()
    assert set(table) == set(enum_cls), "every state has a row"
    for a, b in itertools.product(enum_cls, repeat=2):
        if b in table[a]:
            assert a.to(b, "x") is b
        else:
            with pytest.raises(IllegalTransition, match=f"x: illegal transition {a.name} -> {b.name}"):
                a.to(b, "x")


@pytest.mark.parametrize("enum_cls", ALL_LIFECYCLES, ids=lambda c: c.__name__)
def test_towards_is_idempotent_and_otherwise_a_transition(enum_cls):
    for a, b in itertools.product(enum_cls, repeat=2):
        if a is b:
            assert a.towards(b) is a
        elif b in enum_cls.edges()[a]:
            assert a.towards(b) is b
        else:
            with pytest.raises(IllegalTransition):
                a.towards(b)


@pytest.mark.parametrize("enum_cls", ALL_LIFECYCLES, ids=lambda c: c.__name__)
def test_every_state_is_reachable_from_the_first_and_a_terminal_state_is_reachable_from_each(enum_cls):
    assert _reachable(next(iter(enum_cls))) == set(enum_cls)
    for s in enum_cls:
        assert any(r.terminal for r in _reachable(s)), f"{s.name} can never end"


def _reachable(start):
    table, seen, todo = start.edges(), {start}, [start]
    while todo:
        for b in table[todo.pop()]:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def test_a_worker_that_exits_by_itself_settles_from_any_live_state():
    for s in (WorkerState.STARTING, WorkerState.READY, WorkerState.RUNNING, WorkerState.STOPPING):
        assert s.settle(clean=True) is WorkerState.STOPPED
        assert s.settle(clean=False) is WorkerState.FAILED
    assert WorkerState.FAILED.settle(clean=True) is WorkerState.FAILED  # the first verdict is kept
    assert WorkerState.STOPPED.settle(clean=False) is WorkerState.STOPPED


def test_only_the_last_states_are_terminal():
    assert {s for s in SupervisorState if s.terminal} == {SupervisorState.STOPPED}
    assert {s for s in GroupState if s.terminal} == {GroupState.STOPPED}
    assert {s for s in WorkerState if s.terminal} == {WorkerState.STOPPED, WorkerState.FAILED}
