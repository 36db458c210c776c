"""The restart policy: a pure function from (spec, live children, restart history, exits, now) to a Decision.

No processes, no clocks, no I/O: the mechanism (monitor/escalation) observes exits, asks `decide_many`, acts on the
Decision, and folds it into an immutable `PolicyState`. Erlang/OTP supervisor semantics, with dp groups as the
children (each group is a TP×PP world that is always restarted as a unit).

What one exit asks for, by restart type (all children share one type here)::

    | exit of the child                 | permanent | transient | temporary |
    |-----------------------------------|-----------|-----------|-----------|
    | clean (exit code 0)               | restart   | REMOVE    | REMOVE    |
    | abnormal (code != 0, signal,      | restart   | restart   | REMOVE    |
    |   hung, start-up failure)         |           |           |           |
    | anything, while stopping          | IGNORE    | IGNORE    | IGNORE    |
    | a child that is not live (stale)  | IGNORE    | IGNORE    | IGNORE    |

Which groups a "restart" restarts, by strategy (F = failed groups that need a restart, in start order 0..n-1)::

    | strategy     | restarted groups                                   |
    |--------------|----------------------------------------------------|
    | one_for_one  | F                                                  |
    | one_for_all  | every live group                                   |
    | rest_for_one | every live group from the first one in F onwards   |
    | never        | none: a needed restart, or any abnormal exit       |
    |              | (even of a temporary child), is GIVE_UP (fail-stop)|

Groups removed by the same batch are never restarted. All exits passed in one `decide_many` call (e.g. several ranks
killed together) make ONE decision and are charged as ONE restart.

Budgets (intensity / period), as OTP's `add_restart`::

    | budget   | charged when                                 | limit                               |
    |----------|----------------------------------------------|-------------------------------------|
    | STARTUP  | every exit needing a restart was a start-up  | startup_intensity / startup_period_s|
    |          | failure (the group never became READY)       |                                     |
    | RUNTIME  | otherwise                                    | intensity / period_s                |

A restart at `now` is the k-th of its budget, where k = 1 + the earlier restarts of that budget with
`now - t < period` (a restart exactly `period` seconds old has left the window). k <= intensity: RESTART after
`backoff(n) = min(backoff_initial_s * backoff_factor**(n-1), backoff_max_s)` seconds (0 when backoff_initial_s == 0;
it resets with the window because k does), where n = k for a start-up failure and n = k - 1 for a run-time one: a
group that served and then failed is restarted at once the first time in a window (as Erlang/OTP and Kubernetes
do; a warm standby then answers within a step), and only a second failure within the window backs off. A start-up
failure backs off from the first, since it is the start of a crash loop. k > intensity: GIVE_UP (stop everything, the supervisor exits 1) with
`restarts_in_window == k - 1`, i.e. the maximum. intensity == 0 therefore never restarts.

When the last live child is removed, the Decision has `finished=True`: the supervisor finishes (exit 0).

History: `PolicyState` holds the timestamps of earlier RESTART decisions per budget (only those still inside the
window are kept). `now` must not go backwards between calls.

Usage by the mechanism::

    spec, state = PolicySpec.from_settings(cfg.restart), PolicyState()
    d = decide_many(spec, live_groups, state, exits, now=clock(), stopping=stopping)
    state = state.record(d, now)
    if d.action is Action.RESTART: sleep_unless_stopping(d.delay_s); restart(d.restart)
    elif d.action is Action.GIVE_UP: stop_all(); exit_code = 1
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

from supervisor.settings import RestartSettings, RestartType, Strategy  # the config's own Enums: one set of choices


class Phase(enum.Enum):
    STARTUP = "startup"  # the group failed before it became READY
    RUNTIME = "runtime"


class Action(enum.Enum):
    RESTART = "restart"  # stop then restart `Decision.restart` after `delay_s` (and drop `Decision.remove`)
    REMOVE = "remove"  # drop `Decision.remove` from the live children; nothing restarts
    IGNORE = "ignore"  # stopping, or exits of children that are no longer live
    GIVE_UP = "give_up"  # stop everything; the supervisor exits 1


def _parse(enum_type: type[enum.Enum], key: str, value: str) -> enum.Enum:
    """A member from a member (a loaded config) or its value (settings built in code)."""
    try:
        return enum_type(value)
    except ValueError:
        allowed = " | ".join(m.value for m in enum_type)
        raise ValueError(f"restart.{key}: {value!r} is not one of {allowed}") from None


@dataclass(frozen=True)
class Budget:
    """At most `intensity` restarts within `period_s` seconds."""

    intensity: int
    period_s: float


_DEFAULT = RestartSettings()


@dataclass(frozen=True)
class PolicySpec:
    # Defaults are the config's (supervisor/settings.py, RestartSettings): written once, there.
    strategy: Strategy = _DEFAULT.strategy
    restart_type: RestartType = _DEFAULT.restart_type
    runtime: Budget = Budget(_DEFAULT.intensity, _DEFAULT.period_s)
    startup: Budget = Budget(_DEFAULT.startup_intensity, _DEFAULT.startup_period_s)
    backoff_initial_s: float = _DEFAULT.backoff_initial_s
    backoff_factor: float = _DEFAULT.backoff_factor
    backoff_max_s: float = _DEFAULT.backoff_max_s

    @classmethod
    def from_settings(cls, s: RestartSettings) -> PolicySpec:
        spec = cls(
            strategy=_parse(Strategy, "strategy", s.strategy),
            restart_type=_parse(RestartType, "restart_type", s.restart_type),
            runtime=Budget(s.intensity, s.period_s),
            startup=Budget(s.startup_intensity, s.startup_period_s),
            backoff_initial_s=s.backoff_initial_s,
            backoff_factor=s.backoff_factor,
            backoff_max_s=s.backoff_max_s,
        )
        spec._validate()
        return spec

    def _validate(self) -> None:
        checks = [
            ("intensity", self.runtime.intensity >= 0, self.runtime.intensity),
            ("period_s", self.runtime.period_s > 0, self.runtime.period_s),
            ("startup_intensity", self.startup.intensity >= 0, self.startup.intensity),
            ("startup_period_s", self.startup.period_s > 0, self.startup.period_s),
            ("backoff_initial_s", self.backoff_initial_s >= 0, self.backoff_initial_s),
            ("backoff_factor", self.backoff_factor >= 1, self.backoff_factor),  # a shrinking backoff is a typo
            ("backoff_max_s", self.backoff_max_s >= 0, self.backoff_max_s),
        ]
        for key, ok, value in checks:
            if not ok:
                raise ValueError(f"restart.{key}: invalid value {value!r}")

    def budget(self, phase: Phase) -> Budget:
        return self.startup if phase is Phase.STARTUP else self.runtime

    def backoff(self, k: int) -> float:
        """The k-th step of the backoff (k >= 1; 0 for k < 1)."""
        if k < 1:
            return 0.0
        delay = self.backoff_initial_s
        for _ in range(k - 1):
            if delay >= self.backoff_max_s:
                break  # already capped; stopping here also keeps factor**k from overflowing a float
            delay *= self.backoff_factor
        return min(delay, self.backoff_max_s)


@dataclass(frozen=True)
class ChildExit:
    child: int  # dp group index
    time: float  # when the exit was observed (informational; the window uses `now`)
    phase: Phase
    clean: bool  # exit code 0; everything else (code != 0, signal, hung, start-up failure) is abnormal
    reason: str  # "exit code 3", "SIGKILL", "hung", ...


@dataclass(frozen=True)
class Decision:
    action: Action
    restart: tuple[int, ...] = ()  # groups to stop (if still running) and start again, in start order
    remove: tuple[int, ...] = ()  # groups to drop from the live children
    delay_s: float = 0.0  # wait this long before restarting (abandon the wait if stopping begins)
    reason: str = ""  # one line, for logs and the give-up message
    restarts_in_window: int = 0  # RESTART: k including this one; GIVE_UP: restarts already made (the maximum)
    phase: Phase = Phase.RUNTIME  # the budget charged (RESTART) or exceeded (GIVE_UP)
    finished: bool = False  # no live children remain: the supervisor finishes


@dataclass(frozen=True)
class PolicyState:
    """Timestamps of earlier RESTART decisions, per budget, oldest first."""

    runtime: tuple[float, ...] = ()
    startup: tuple[float, ...] = ()

    def restarts(self, phase: Phase) -> tuple[float, ...]:
        return self.startup if phase is Phase.STARTUP else self.runtime

    def record(self, decision: Decision, now: float) -> PolicyState:
        """The state after acting on `decision` (which `decide_many` computed from this state at `now`)."""
        if decision.action is not Action.RESTART:
            return self
        # The decision already counted the restarts still in the window; keeping only those bounds the state.
        earlier = self.restarts(decision.phase)
        kept = earlier[len(earlier) - (decision.restarts_in_window - 1):] + (now,)
        if decision.phase is Phase.STARTUP:
            return PolicyState(self.runtime, kept)
        return PolicyState(kept, self.startup)


def decide(spec: PolicySpec, children: Sequence[int], history: PolicyState, exit: ChildExit, now: float,
           stopping: bool = False) -> Decision:
    """The decision for one exit; see `decide_many`."""
    return decide_many(spec, children, history, (exit,), now, stopping)


def decide_many(spec: PolicySpec, children: Sequence[int], history: PolicyState, exits: Sequence[ChildExit],
                now: float, stopping: bool = False) -> Decision:
    """One coherent decision for exits observed together (`children`: live groups in start order)."""
    if stopping:
        return Decision(Action.IGNORE, reason="stopping: nothing restarts")
    failed = _merge(exits, children)
    if not failed:
        return Decision(Action.IGNORE, reason="exit of a group that is no longer live")
    needy = [e for e in failed if _needs_restart(spec.restart_type, e)]
    removed = tuple(e.child for e in failed if not _needs_restart(spec.restart_type, e))
    if spec.strategy is Strategy.NEVER:
        return _never(children, failed, needy, removed)
    if not needy:
        return _remove(children, failed, removed)
    return _restart(spec, children, history, needy, removed, now)


def _merge(exits: Sequence[ChildExit], children: Sequence[int]) -> list[ChildExit]:
    """One exit per live child, in start order; an abnormal report wins over a clean one for the same child."""
    by_child: dict[int, ChildExit] = {}
    for e in exits:
        if e.child in children and (e.child not in by_child or by_child[e.child].clean):
            by_child[e.child] = e
    return [by_child[c] for c in children if c in by_child]


def _needs_restart(restart_type: RestartType, e: ChildExit) -> bool:
    if restart_type is RestartType.PERMANENT:
        return True
    return restart_type is RestartType.TRANSIENT and not e.clean


def _never(children: Sequence[int], failed: list[ChildExit], needy: list[ChildExit],
           removed: tuple[int, ...]) -> Decision:
    # Fail-stop: an abnormal exit ends the run even for a temporary child; so does a child that must be restarted.
    fatal = [e for e in failed if not e.clean] or needy
    if not fatal:
        return _remove(children, failed, removed)
    return Decision(Action.GIVE_UP, phase=_phase(fatal),
                    reason=f"{_describe(fatal)}: strategy never restarts")


def _remove(children: Sequence[int], failed: list[ChildExit], removed: tuple[int, ...]) -> Decision:
    finished = len(removed) == len(children)
    tail = ": no group left, finishing" if finished else ""
    return Decision(Action.REMOVE, remove=removed, finished=finished,
                    reason=f"{_describe(failed)}: not restarted ({_plural(removed)} removed){tail}")


def _restart(spec: PolicySpec, children: Sequence[int], history: PolicyState, needy: list[ChildExit],
             removed: tuple[int, ...], now: float) -> Decision:
    phase = _phase(needy)
    budget = spec.budget(phase)
    k = 1 + sum(1 for t in history.restarts(phase) if now - t < budget.period_s)
    what = _describe(needy)
    if k > budget.intensity:
        return Decision(Action.GIVE_UP, restarts_in_window=k - 1, phase=phase,
                        reason=f"{what}: {k} {_budget_name(phase)} restarts {_within(budget)} "
                               f"would exceed intensity {budget.intensity}")
    targets = _targets(spec.strategy, children, [e.child for e in needy], removed)
    delay = spec.backoff(k if phase is Phase.STARTUP else k - 1)
    return Decision(Action.RESTART, restart=targets, remove=removed, delay_s=delay, restarts_in_window=k,
                    phase=phase,
                    reason=f"{what}: {spec.strategy.value} restarts {_plural(targets)} in {delay} s "
                           f"({_budget_name(phase)} restart {k}/{budget.intensity} {_within(budget)})")


def _targets(strategy: Strategy, children: Sequence[int], needy: list[int],
             removed: tuple[int, ...]) -> tuple[int, ...]:
    if strategy is Strategy.ONE_FOR_ONE:
        chosen = list(needy)
    elif strategy is Strategy.ONE_FOR_ALL:
        chosen = list(children)
    else:  # REST_FOR_ONE: groups started after the first failure may depend on it
        chosen = list(children[list(children).index(needy[0]):])
    return tuple(c for c in chosen if c not in removed)


def _phase(exits: list[ChildExit]) -> Phase:
    # A batch is a start-up failure only if all of it is: a run-time crash must not hide in the start-up budget.
    return Phase.STARTUP if all(e.phase is Phase.STARTUP for e in exits) else Phase.RUNTIME


def _within(budget: Budget) -> str:
    """"in 10.0 s"; "in all" for a budget without a window (period_s=inf: rankvisor-run's --max-restarts)."""
    return f"in {budget.period_s} s" if math.isfinite(budget.period_s) else "in all"


def _budget_name(phase: Phase) -> str:
    return "start-up" if phase is Phase.STARTUP else "run-time"


def _plural(groups: Sequence[int]) -> str:
    return ("group " if len(groups) == 1 else "groups ") + ",".join(map(str, groups))


def _describe(exits: list[ChildExit]) -> str:
    """'group 1 failed (SIGKILL)' or 'groups 0,2 failed (0: exit code 3; 2: hung)'."""
    verb = "exited" if all(e.clean for e in exits) else "failed"
    if len(exits) == 1:
        return f"group {exits[0].child} {verb} ({exits[0].reason})"
    details = "; ".join(f"{e.child}: {e.reason}" for e in exits)
    return f"{_plural([e.child for e in exits])} {verb} ({details})"
