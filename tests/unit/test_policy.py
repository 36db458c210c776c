"""Table tests (fake clock) and a reference-model property test for supervisor/policy.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from supervisor.core.policy import (
    Action,
    Budget,
    ChildExit,
    Decision,
    Phase,
    PolicySpec,
    PolicyState,
    RestartType,
    Strategy,
    decide,
    decide_many,
)
from supervisor.settings import RestartSettings

R, S = Phase.RUNTIME, Phase.STARTUP


def spec(strategy="one_for_one", restart_type="permanent", **kw) -> PolicySpec:
    return PolicySpec.from_settings(RestartSettings(strategy=strategy, restart_type=restart_type, **kw))


def crash(child, t=0.0, phase=R, clean=False, reason=None) -> ChildExit:
    return ChildExit(child, t, phase, clean, reason or ("exit code 0" if clean else "SIGKILL"))


@dataclass
class Sim:
    """The mechanism in miniature: a fake clock, live groups, and the state folded after each decision."""

    spec: PolicySpec
    children: list[int] = field(default_factory=lambda: [0, 1, 2])
    state: PolicyState = field(default_factory=PolicyState)
    now: float = 0.0
    log: list[Decision] = field(default_factory=list)

    def fail(self, *childs, after=0.0, phase=R, clean=False, stopping=False) -> Decision:
        self.now += after
        exits = [crash(c, self.now, phase, clean) for c in childs]
        d = decide_many(self.spec, self.children, self.state, exits, self.now, stopping)
        self.state = self.state.record(d, self.now)
        self.children = [c for c in self.children if c not in d.remove]
        self.log.append(d)
        return d

    def restarts(self) -> int:
        return sum(d.action is Action.RESTART for d in self.log)


# --- strategy x restart type x clean/abnormal (rows 8, 10) -----------------------------------------------------------

RESTART_SET = {"one_for_one": (1,), "one_for_all": (0, 1, 2), "rest_for_one": (1, 2)}
# (restart type, clean) -> what happens to group 1 of [0, 1, 2]: "restart", "remove" or, under never, "give_up"
TABLE = {
    ("permanent", True): ("restart", "give_up"),
    ("permanent", False): ("restart", "give_up"),
    ("transient", True): ("remove", "remove"),
    ("transient", False): ("restart", "give_up"),
    ("temporary", True): ("remove", "remove"),
    ("temporary", False): ("remove", "give_up"),
}
CASES = [(strategy, rtype, clean) for strategy in ("never", *RESTART_SET) for (rtype, clean) in TABLE]


@pytest.mark.parametrize("strategy,rtype,clean", CASES)
def test_strategy_by_type_by_exit(strategy, rtype, clean):
    d = decide(spec(strategy, rtype), [0, 1, 2], PolicyState(), crash(1, clean=clean), now=5.0)
    expected = TABLE[(rtype, clean)][strategy == "never"]
    assert d.action is Action(expected)
    if expected == "restart":
        assert (d.restart, d.remove, d.restarts_in_window) == (RESTART_SET[strategy], (), 1)
    elif expected == "remove":
        assert (d.restart, d.remove, d.finished) == ((), (1,), False)
    else:
        assert d.restart == d.remove == ()
    assert "group 1" in d.reason and "\n" not in d.reason


def test_never_gives_up_on_first_failure():
    d = Sim(spec("never")).fail(2)
    assert d.action is Action.GIVE_UP and d.restarts_in_window == 0
    assert d.reason == "group 2 failed (SIGKILL): strategy never restarts"


def test_rest_for_one_restarts_from_the_earliest_failure():
    d = decide_many(spec("rest_for_one"), [0, 1, 2, 3], PolicyState(), [crash(3), crash(1)], now=0)
    assert d.restart == (1, 2, 3)


# --- removal ----------------------------------------------------------------------------------------------------------

def test_temporary_children_are_removed_then_the_supervisor_finishes():
    sim = Sim(spec("one_for_all", "temporary"))
    assert [sim.fail(c, clean=c == 1).action for c in (0, 1)] == [Action.REMOVE] * 2
    last = sim.fail(2)
    assert (last.action, last.remove, last.finished) == (Action.REMOVE, (2,), True)
    assert sim.children == [] and sim.state == PolicyState()


def test_transient_clean_exit_removed_abnormal_restarted():
    sim = Sim(spec("one_for_all", "transient"))
    assert sim.fail(0, clean=True).remove == (0,)
    d = sim.fail(1)
    assert (d.action, d.restart) == (Action.RESTART, (1, 2))  # the removed group stays removed


def test_transient_mixed_batch_restarts_the_abnormal_and_removes_the_clean():
    exits = [crash(0, clean=True), crash(2)]
    d = decide_many(spec("one_for_all", "transient"), [0, 1, 2], PolicyState(), exits, now=1)
    assert (d.action, d.restart, d.remove, d.finished) == (Action.RESTART, (1, 2), (0,), False)


def test_exit_of_a_child_no_longer_live_is_ignored():
    d = decide(spec(), [0, 2], PolicyState(), crash(1), now=0)
    assert d.action is Action.IGNORE


def test_a_duplicate_report_for_one_child_counts_as_abnormal():
    exits = [crash(0, clean=True), crash(0, reason="exit code 3")]
    d = decide_many(spec(restart_type="transient"), [0], PolicyState(), exits, now=0)
    assert d.action is Action.RESTART and "exit code 3" in d.reason


# --- stopping (row 30) ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,rtype,clean", CASES)
def test_nothing_restarts_while_stopping(strategy, rtype, clean):
    sim = Sim(spec(strategy, rtype))
    d = sim.fail(0, 1, clean=clean, stopping=True)
    assert d.action is Action.IGNORE and d.restart == d.remove == ()
    assert sim.state == PolicyState() and sim.children == [0, 1, 2]


# --- several ranks at once (row 22) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,expected", [("one_for_one", (0, 2)), ("one_for_all", (0, 1, 2)),
                                               ("rest_for_one", (0, 1, 2))])
def test_several_failures_at_once_are_one_restart(strategy, expected):
    sim = Sim(spec(strategy, intensity=1))
    d = sim.fail(2, 0)
    assert (d.action, d.restart, d.restarts_in_window) == (Action.RESTART, expected, 1)
    assert sim.state.runtime == (0.0,)
    assert sim.fail(1, after=1).action is Action.GIVE_UP  # the budget of 1 was charged once, not twice


# --- intensity (rows 26, 27, 31) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("intensity,period,interval", [(4, 10.0, 2.5), (3, 10.0, 3.34), (1, 1.0, 1.0)])
def test_crashes_at_the_limit_spread_over_the_period_never_give_up(intensity, period, interval):
    sim = Sim(spec("one_for_all", intensity=intensity, period_s=period))
    for _ in range(1000):
        assert sim.fail(1, after=interval).action is Action.RESTART
    assert max(d.restarts_in_window for d in sim.log) == intensity
    assert len(sim.state.runtime) <= intensity  # the history stays bounded


@pytest.mark.parametrize("intensity", [0, 1, 3, 5])
def test_crashes_above_the_intensity_give_up_with_restarts_at_the_maximum(intensity):
    sim = Sim(spec("one_for_one", intensity=intensity, period_s=10.0))
    while sim.fail(sim.log.__len__() % 3, after=1.0).action is Action.RESTART:
        pass
    last = sim.log[-1]
    assert last.action is Action.GIVE_UP and sim.restarts() == last.restarts_in_window == intensity
    assert f"exceed intensity {intensity}" in last.reason and last.phase is R


def test_give_up_message():
    sim = Sim(spec(intensity=1, period_s=10.0))
    sim.fail(1)
    assert sim.fail(1, after=2).reason == (
        "group 1 failed (SIGKILL): 2 run-time restarts in 10.0 s would exceed intensity 1")


def test_a_budget_without_a_window_says_so_not_a_billion_seconds():
    """rankvisor-run's --max-restarts is a budget for the whole run (period_s=inf)."""
    sim = Sim(spec(intensity=1, period_s=math.inf))
    assert sim.fail(1).reason.endswith("(run-time restart 1/1 in all)")
    assert sim.fail(1, after=1e9).reason.endswith("2 run-time restarts in all would exceed intensity 1")


def test_the_window_passing_resets_the_counter_and_the_backoff():
    sim = Sim(spec(intensity=3, period_s=10.0, backoff_initial_s=1.0, backoff_factor=2.0, backoff_max_s=60.0))
    burst = [sim.fail(0, after=1.0) for _ in range(3)]  # at 1, 2, 3 s
    # a run-time failure is restarted at once the first time in a window; later ones back off
    assert [(d.restarts_in_window, d.delay_s) for d in burst] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    d = sim.fail(0, after=9.5)  # at 12.5 s the restarts at 1 and 2 s have left the window, the one at 3 s has not
    assert (d.action, d.restarts_in_window, d.delay_s) == (Action.RESTART, 2, 1.0)
    d = sim.fail(0, after=10.0)  # at 22.5 s the one at 12.5 s is exactly period_s old: outside
    assert (d.action, d.restarts_in_window, d.delay_s) == (Action.RESTART, 1, 0.0)


# --- start-up (row 28) -----------------------------------------------------------------------------------------------

def test_startup_crash_loop_backs_off_as_configured_then_gives_up():
    sim = Sim(spec("one_for_all", intensity=0, startup_intensity=5, startup_period_s=60.0,
                   backoff_initial_s=0.5, backoff_factor=2.0, backoff_max_s=3.0))
    delay = 0.0
    while (d := sim.fail(1, after=delay + 0.2, phase=S)).action is Action.RESTART:
        delay = d.delay_s
    assert [d.delay_s for d in sim.log[:-1]] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert (d.action, d.phase, d.restarts_in_window) == (Action.GIVE_UP, S, 5)
    assert "start-up restarts" in d.reason and sim.state.runtime == ()


def test_startup_and_runtime_budgets_are_separate():
    sim = Sim(spec(intensity=1, startup_intensity=1))
    assert sim.fail(0, phase=S).phase is S
    assert sim.fail(0, phase=R).action is Action.RESTART  # the start-up failure did not use the run-time budget
    assert sim.fail(0, phase=S).action is Action.GIVE_UP


def test_a_batch_with_any_runtime_failure_is_charged_to_runtime():
    d = decide_many(spec(), [0, 1], PolicyState(), [crash(0, phase=S), crash(1, phase=R)], now=0)
    assert d.phase is R


# --- backoff and settings -------------------------------------------------------------------------------------------

def test_backoff():
    assert [spec().backoff(k) for k in (1, 2, 50)] == [0.1, 0.2, 5.0]  # the default: 0.1 s, doubling to 5 s
    assert [spec(backoff_initial_s=0.0).backoff(k) for k in (1, 2, 50)] == [0.0, 0.0, 0.0]
    assert spec().backoff(0) == 0.0  # a run-time failure's first restart in a window
    s = spec(backoff_initial_s=0.1, backoff_factor=3.0, backoff_max_s=1.0)
    assert [round(s.backoff(k), 9) for k in (1, 2, 3, 4)] == [0.1, 0.3, 0.9, 1.0]
    assert s.backoff(100_000) == 1.0  # no float overflow however long the window


def test_from_settings_defaults():
    s = PolicySpec.from_settings(RestartSettings())
    assert (s.strategy, s.restart_type) == (Strategy.NEVER, RestartType.PERMANENT)
    assert (s.runtime, s.startup) == (Budget(3, 10.0), Budget(3, 60.0))


@pytest.mark.parametrize("kw,key", [({"strategy": "one_for_none"}, "restart.strategy"),
                                    ({"restart_type": "sometimes"}, "restart.restart_type"),
                                    ({"intensity": -1}, "restart.intensity"),
                                    ({"period_s": 0.0}, "restart.period_s"),
                                    ({"backoff_factor": 0.5}, "restart.backoff_factor")])
def test_from_settings_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        PolicySpec.from_settings(RestartSettings(**kw))


# --- property: decide vs a reference model over random histories ----------------------------------------------------

class Reference:
    """OTP semantics simulated the long way: every restart ever made is kept and counted from scratch."""

    def __init__(self, s: PolicySpec, dp: int):
        self.s, self.children, self.log = s, list(range(dp)), []  # log: (time, phase) of every restart

    def step(self, exits, now, stopping):
        live = {e.child: e for e in exits if e.child in self.children}
        if stopping or not live:
            return ("ignore",)
        rtype = self.s.restart_type
        wants = sorted(c for c, e in live.items()
                       if rtype is RestartType.PERMANENT or (rtype is RestartType.TRANSIENT and not e.clean))
        drops = sorted(set(live) - set(wants))
        if self.s.strategy is Strategy.NEVER and (wants or any(not e.clean for e in live.values())):
            return ("give_up", 0)
        if self.s.strategy is Strategy.NEVER or not wants:
            self.children = [c for c in self.children if c not in drops]
            return ("remove", tuple(drops), not self.children)
        return self.restart(live, wants, drops, now)

    def restart(self, live, wants, drops, now):
        phase = S if all(live[c].phase is S for c in wants) else R
        limit = self.s.startup if phase is S else self.s.runtime
        recent = [t for t, p in self.log if p is phase and t > now - limit.period_s]
        if len(recent) >= limit.intensity:
            return ("give_up", len(recent))
        self.log.append((now, phase))
        steps = len(recent) + (1 if phase is S else 0)  # a run-time failure's first restart waits no backoff
        delay = min(self.s.backoff_initial_s * self.s.backoff_factor ** (steps - 1), self.s.backoff_max_s) \
            if steps else 0.0
        first = self.children.index(wants[0])
        pick = {Strategy.ONE_FOR_ONE: wants, Strategy.ONE_FOR_ALL: self.children,
                Strategy.REST_FOR_ONE: self.children[first:]}[self.s.strategy]
        self.children = [c for c in self.children if c not in drops]
        return ("restart", tuple(c for c in pick if c not in drops), tuple(drops), len(recent) + 1, delay)


def observe(d: Decision):
    """What the reference predicts, read off a Decision."""
    if d.action is Action.RESTART:
        return ("restart", d.restart, d.remove, d.restarts_in_window, d.delay_s)
    if d.action is Action.GIVE_UP:
        return ("give_up", d.restarts_in_window)
    if d.action is Action.REMOVE:
        return ("remove", d.remove, d.finished)
    return ("ignore",)


HEADER_BYTES, EVENT_BYTES = 8, 4
# A history is raw bytes decoded below: one hypothesis draw per example instead of ~200 keeps 10,000 examples fast,
# and shrinking bytes towards zero still shrinks towards short, simple histories.
histories = st.binary(min_size=HEADER_BYTES + 5 * EVENT_BYTES, max_size=HEADER_BYTES + 25 * EVENT_BYTES)


def decode_spec(h: bytes) -> tuple[PolicySpec, int]:
    """A spec with dyadic periods (window arithmetic exact in both models) and the number of groups (1..4)."""
    backoff = h[6]
    return PolicySpec(
        strategy=list(Strategy)[h[0] % 4], restart_type=list(RestartType)[h[1] % 3],
        runtime=Budget(h[2] % 5, (1 + h[3] % 40) / 4), startup=Budget(h[4] % 5, (1 + h[5] % 80) / 4),
        backoff_initial_s=(0.0, 0.25, 0.5, 1.0)[backoff % 4], backoff_factor=(1.0, 1.5, 2.0, 3.0)[backoff // 4 % 4],
        backoff_max_s=(0.0, 0.5, 1.0, 5.0)[backoff // 16 % 4],
    ), 1 + h[7] % 4


def decode(raw: bytes) -> list[tuple[float, list[tuple[int, bool, Phase]], bool]]:
    """Events (gap in s, exits as (group 0..4, clean, phase), stopping), 4 bytes each."""
    events = []
    for i in range(0, len(raw) - EVENT_BYTES + 1, EVENT_BYTES):
        gap, flags, packed = raw[i], raw[i + 1], int.from_bytes(raw[i + 2:i + 4], "little")
        exits = {}
        for _ in range(1 + flags % 3):
            packed, code = divmod(packed, 30)
            exits.setdefault(code % 5, (code % 5, code // 5 % 2 == 1, S if code // 10 == 2 else R))
        events.append(((gap % 49) / 4, list(exits.values()), flags >= 243))  # stopping in ~5% of events
    return events


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=histories)
def test_decide_matches_the_reference_model(raw):
    (s, dp), history = decode_spec(raw[:HEADER_BYTES]), decode(raw[HEADER_BYTES:])
    note(f"spec: {s}, dp: {dp}, history: {history}")
    ref, children, state, now = Reference(s, dp), list(range(dp)), PolicyState(), 0.0
    for gap, batch_, stopping in history:
        now += gap
        exits = [ChildExit(c, now, ph, clean, "exit code 0" if clean else "exit code 1") for c, clean, ph in batch_]
        d = decide_many(s, children, state, exits, now, stopping)
        got, want = observe(d), ref.step(exits, now, stopping)
        assert got[:-1] == want[:-1] if got[0] == "restart" else got == want
        if got[0] == "restart":
            assert math.isclose(got[-1], want[-1], rel_tol=1e-12)
        if d.action is Action.GIVE_UP:
            return
        state, children = state.record(d, now), [c for c in children if c not in d.remove]
        if d.finished:
            return
