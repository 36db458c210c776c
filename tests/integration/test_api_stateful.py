"""Every call ends (fault row 38), as a state machine: hypothesis drives calls with no timeout (blocking, in a
thread, and non-blocking Futures), rank deaths, remote errors and shutdowns in random orders under random restart
policies, and checks that every call returned or raised within a bound of being made — through starting,
restarting, giving up, stopping and stopped. Real processes (the echo worker), so the examples are few."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from supervisor.api import Supervisor
from tests.integration.helpers import ECHO, config

pytestmark = pytest.mark.timeout(240)
BOUND_S = 20.0  # a call ends within this of being made: restarts here take well under a second
POLICIES = ["restart=never", "restart=one_for_one", "restart=one_for_all"]


class Call:
    def __init__(self, what: str) -> None:
        self.what, self.t0, self.t1, self.outcome = what, time.monotonic(), None, None

    def end(self, outcome) -> None:
        self.outcome, self.t1 = outcome, time.monotonic()


class EveryCallEnds(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sup: Supervisor | None = None
        self.calls: list[Call] = []
        self.threads: list[threading.Thread] = []

    @initialize(policy=st.sampled_from(POLICIES))
    def start(self, policy: str) -> None:
        self.sup = Supervisor(config(*ECHO, "parallel.dp=2", policy, "restart.backoff_initial_s=0.05"))

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3]), group=st.sampled_from([None, 0, 1]))
    def blocking_call(self, seconds: float, group) -> None:
        call = Call(f"sleep({seconds}) group={group}")
        self.calls.append(call)
        t = threading.Thread(target=lambda: call.end(_outcome(
            lambda: self.sup.collective_rpc("sleep", args=(seconds,), group=group))), daemon=True)
        self.threads.append(t)
        t.start()

    @rule(seconds=st.sampled_from([0.0, 0.2]))
    def future_call(self, seconds: float) -> None:
        call = Call(f"future sleep({seconds})")
        self.calls.append(call)
        try:
            fut = self.sup.collective_rpc("sleep", args=(seconds,), non_block=True)
        except Exception as exc:  # refused at once (stopping, gave up): that is an end too
            call.end(exc)
            return
        fut.add_done_callback(lambda f: call.end(f.exception() or f.result()))

    @rule()
    def remote_error(self) -> None:
        call = Call("raise")
        self.calls.append(call)
        call.end(_outcome(lambda: self.sup.collective_rpc(_raise, timeout=BOUND_S)))

    @rule(rank=st.sampled_from([0, 1]), sig=st.sampled_from([signal.SIGKILL, signal.SIGTERM]))
    def kill_rank(self, rank: int, sig: int) -> None:
        pids = [r["pid"] for r in self.sup.status() if r["rank"] == rank and r["state"] == "running"]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    @rule(rank=st.sampled_from([0, 1]), group=st.sampled_from([None, 0, 1]))
    def kill_then_call(self, rank: int, group) -> None:
        """The race of issue 12 item 2: a call made just after the death is seen, before the policy has acted."""
        self.kill_rank(rank, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.sup.serving(rank) and time.monotonic() < deadline:
            time.sleep(0.002)
        self.blocking_call(0.0, group)

    @rule(wait=st.booleans())
    def shutdown(self, wait: bool) -> None:
        if wait:
            self.sup.shutdown()
        else:
            self.sup.request_shutdown()

    @rule()
    def pause(self) -> None:
        time.sleep(0.1)

    @invariant()
    def no_call_waits_past_the_bound(self) -> None:
        now = time.monotonic()
        late = [c.what for c in self.calls if c.t1 is None and now - c.t0 > BOUND_S]
        assert not late, f"calls still waiting after {BOUND_S} s: {late}"

    def teardown(self) -> None:
        if self.sup is None:
            return
        self.sup.shutdown()
        for t in self.threads:
            t.join(BOUND_S)
        deadline = time.monotonic() + BOUND_S
        while any(c.t1 is None for c in self.calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        open_calls = [c.what for c in self.calls if c.t1 is None]
        assert not open_calls, f"calls that never ended: {open_calls}"
        slow = [(c.what, round(c.t1 - c.t0, 2)) for c in self.calls if c.t1 - c.t0 > BOUND_S]
        assert not slow, f"calls that ended only past the bound: {slow}"


def _raise(w):
    raise ValueError(f"on purpose on rank {w.rank}")


def _outcome(fn):
    try:
        return fn()
    except BaseException as exc:
        return exc


TestEveryCallEnds = EveryCallEnds.TestCase
# No shrinking: a failing example holds calls that wait out the bound, and shrinking would replay it many times.
TestEveryCallEnds.settings = settings(max_examples=8, stateful_step_count=10, deadline=None, phases=[Phase.generate],
                                      suppress_health_check=list(HealthCheck))
