"""The CLI's signal handling, in-process (supervisor/signals.py): one signal delivered twice is one signal; a
person's second one forces the stop; the exit code is final once the command exits. No process is started: the
forced stop is replaced by a recorder, the supervisor by a stub."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from supervisor import signals as sigmod
from supervisor.signals import SignalState


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(sigmod.time, "monotonic", clock)
    s = SignalState()
    s.forced = []
    monkeypatch.setattr(s, "_force_exit", lambda: s.forced.append(clock.now))
    stops = []
    sup = SimpleNamespace(cfg=SimpleNamespace(shutdown=SimpleNamespace(signal_window_s=0.5)),
                          request_shutdown=lambda drain: stops.append(drain))
    assert s.attach(sup)
    return s, clock, stops


def test_the_same_signal_twice_within_the_window_is_one_signal(state):
    """timeout(1) signals the command, then its whole group: microseconds apart."""
    s, clock, stops = state
    s._graceful(signal.SIGTERM, None)
    clock.now += 0.001
    s._graceful(signal.SIGTERM, None)
    assert s.forced == [] and stops == [True] and s.code == 143


def test_a_second_ctrl_c_seconds_later_forces_the_stop(state):
    s, clock, stops = state
    s._graceful(signal.SIGINT, None)
    clock.now += 0.001
    s._graceful(signal.SIGINT, None)  # the group's copy: ignored
    clock.now += 1.5
    s._graceful(signal.SIGINT, None)  # the person again
    assert s.forced == [clock.now] and s.code == 130


def test_another_signal_within_the_window_still_forces(state):
    s, clock, _ = state
    s._graceful(signal.SIGTERM, None)
    clock.now += 0.01
    s._graceful(signal.SIGINT, None)
    assert len(s.forced) == 1 and s.code == 143  # the first signal's code


def test_a_window_of_zero_counts_every_signal(state):
    s, clock, _ = state
    s.window_s = 0.0
    s._graceful(signal.SIGINT, None)
    s._graceful(signal.SIGINT, None)
    assert len(s.forced) == 1


def test_the_exit_code_is_final_on_exit(monkeypatch):
    installed = {}
    monkeypatch.setattr(sigmod.signal, "signal", lambda sig, handler: installed.__setitem__(sig, handler))
    s = SignalState()
    assert s.exiting(0) == 0 and installed[signal.SIGINT] == signal.SIG_IGN  # a late Ctrl-C changes nothing now
    s.signum = signal.SIGTERM  # one came before, at whatever instant
    assert s.exiting(0) == 143 and s.exiting(1) == 1  # a failure keeps its own code
