"""The retry policy of supervisor/core/retry.py against a fake tree: where a failed call goes next, how many times,
what is final, and that it never answers from the incarnation that failed. No processes."""
from __future__ import annotations

import threading
import time

import pytest

from supervisor.core import retry
from supervisor.core.retry import RetryingCall, RetryPolicy, RetryStats
from supervisor.errors import RemoteError, ShutdownInProgress, WorkerFailed


class FakeTree:
    """ServingView: groups with a gate (open or not) and an incarnation that changes on restart."""

    def __init__(self, groups: int) -> None:
        self.live_ = list(range(groups))
        self.inc = {g: object() for g in range(groups)}
        self.open = {g: True for g in range(groups)}
        self.final: BaseException | None = None

    def live(self) -> list[int]:
        return list(self.live_)

    def serving(self, group: int) -> bool:
        return self.open[group]

    def incarnation(self, group: int):
        return self.inc[group]

    def final_error(self, name: str):
        return self.final

    def fail(self, group: int) -> WorkerFailed:
        self.open[group] = False
        return WorkerFailed(f"rank 0 of group {group} died", (0,), restarting=True)

    def restart(self, group: int) -> None:
        self.inc[group] = object()
        self.open[group] = True


class Calls:
    """send/wait for RetryingCall: each attempt's outcome comes from ``script(group, attempt)`` (a value, or an
    exception to raise); records which (group, incarnation) every attempt went to."""

    def __init__(self, tree: FakeTree, script) -> None:
        self.tree, self.script, self.sent, self.events = tree, script, [], []

    def send(self, group: int, deadline):
        self.sent.append((group, self.tree.inc[group]))
        return self.tree.inc[group], (group, len(self.sent))

    def wait(self, incarnation, handle, deadline):
        out = self.script(*handle)
        if isinstance(out, BaseException):
            raise out
        return [out]

    def emit(self, kind: str, **fields) -> None:
        self.events.append(fields)

    def call(self, group: int, movable: bool, attempts: int = 3, deadline: float | None = None) -> RetryingCall:
        return RetryingCall("step", group, movable=movable, policy=RetryPolicy(attempts), deadline=deadline,
                            send=self.send, wait=self.wait, view=self.tree, emit=self.emit, stats=RetryStats()).start()


def test_movable_call_goes_to_another_serving_group_at_once():
    tree = FakeTree(2)
    calls = Calls(tree, lambda g, n: tree.fail(0) if g == 0 else ("answer", g))
    c = calls.call(0, movable=True)
    assert c.result(None) == [("answer", 1)]
    assert [g for g, _ in calls.sent] == [0, 1]
    assert [(e["from_group"], e["to_group"], e["attempt"]) for e in calls.events] == [(0, 1, 2)]
    assert c._stats.away_from[0] == 1


def test_pinned_call_waits_for_the_next_incarnation_never_the_dead_one():
    tree = FakeTree(1)
    first = tree.inc[0]

    def script(g, n):
        if n == 1:
            err = tree.fail(0)
            tree.open[0] = True  # the gate still shows open for a moment, with the dead incarnation
            threading.Timer(0.05, tree.restart, (0,)).start()
            return err
        return "answer"

    calls = Calls(tree, script)
    assert calls.call(0, movable=False).result(None) == ["answer"]
    assert calls.sent[0][1] is first and calls.sent[1][1] is not first


def test_attempts_are_bounded_and_the_last_error_is_the_answer():
    tree = FakeTree(2)

    def script(g, n):
        err = tree.fail(g)
        tree.restart(g)
        return err

    calls = Calls(tree, script)
    with pytest.raises(WorkerFailed, match="died"):
        calls.call(0, movable=True, attempts=3).result(None)
    assert len(calls.sent) == 3 and [e["attempt"] for e in calls.events] == [2, 3]


@pytest.mark.parametrize("why", ["stopping", "deadline", "removed"])
def test_final_conditions_end_the_wait(why):
    tree = FakeTree(1)
    calls = Calls(tree, lambda g, n: tree.fail(0))  # the group never comes back
    deadline = time.monotonic() + 0.2 if why == "deadline" else None
    if why == "stopping":
        threading.Timer(0.05, setattr, (tree, "final", ShutdownInProgress("step: shutting down"))).start()
    if why == "removed":
        threading.Timer(0.05, tree.live_.clear).start()
    expected = ShutdownInProgress if why == "stopping" else WorkerFailed
    with pytest.raises(expected):
        calls.call(0, movable=False, deadline=deadline).result(deadline)
    assert len(calls.sent) == 1


def test_a_remote_error_is_retried_only_if_its_group_goes_down(monkeypatch):
    monkeypatch.setattr(retry, "PEER_DEATH_GRACE_S", 0.1)
    tree = FakeTree(2)
    own = RemoteError(0, "ValueError", "bad input", "tb")
    calls = Calls(tree, lambda g, n: own)  # the method itself raised: the group keeps serving
    with pytest.raises(RemoteError):
        calls.call(0, movable=True).result(None)
    assert len(calls.sent) == 1

    def peer_died(g, n):
        if g == 0:
            threading.Timer(0.02, tree.fail, (0,)).start()  # the monitor sees the death a moment later
            return RemoteError(0, "RuntimeError", "Connection reset by peer", "tb")
        return "answer"

    calls = Calls(tree, peer_died)
    assert calls.call(0, movable=True).result(None) == ["answer"]
    assert [g for g, _ in calls.sent] == [0, 1]


def test_a_remote_error_that_was_a_peers_death_names_the_rank_that_died(monkeypatch):
    """Rank 0's collective broke because rank 1 died: once its group is down, the call's error is the group's
    failure, naming rank 1 (as the channel was failed with), with rank 0's error as the cause."""
    monkeypatch.setattr(retry, "PEER_DEATH_GRACE_S", 0.5)
    tree = FakeTree(1)
    tree.inc[0] = type("Group", (), {"channel": type("Channel", (), {"failure": None})()})()
    symptom = RemoteError(0, "RuntimeError", "Connection reset by peer", "tb")

    def peer_died(g, n):
        tree.inc[0].channel.failure = WorkerFailed("rank 1 (Worker_TP1, pid 7) SIGKILL", (1,))
        tree.open[0] = False
        return symptom

    with pytest.raises(WorkerFailed, match="rank 1 .* SIGKILL") as err:
        Calls(tree, peer_died).call(0, movable=False, attempts=1).result(None)
    assert err.value.ranks == (1,) and err.value.__cause__ is symptom
