"""The pulse (supervisor/launch/keepalive.py) judges the store from its own beats: a fake store client, real threads."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from supervisor.launch.keepalive import Pulse, StoreHealth

LOST_AFTER_S = 0.6


class FakeStore:
    """A JobStore whose client's add() answers, blocks (a frozen host) or raises (a closed connection)."""

    def __init__(self, port: int) -> None:
        self.host, self.port, self.endpoint = "127.0.0.1", port, f"127.0.0.1:{port}"
        self.mode = "answer"
        self.release = threading.Event()

    def client(self, connect_s: float | None = None):
        return self

    def add(self, key: str, n: int) -> int:
        if self.mode == "block":
            self.release.wait(30)
        elif self.mode == "raise":
            raise RuntimeError("Connection was likely closed")
        return 1


@pytest.fixture
def port():
    """A port of this host: listening (connects succeed, the server says nothing) or bound only (refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s


def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.01)
    return None


def _pulse(store: FakeStore) -> Pulse:
    pulse = Pulse(store, "me", LOST_AFTER_S)
    assert pulse.first.wait(10) and pulse.health() is StoreHealth.OK
    return pulse


def _stop(pulse: Pulse, store: FakeStore) -> None:
    pulse.stop()
    store.release.set()
    pulse.thread.join(10)
    assert not pulse.thread.is_alive()


@pytest.mark.parametrize(("listening", "mode", "judged"), [
    pytest.param(True, "block", StoreHealth.SILENT, id="a beat that never returns: silent"),
    pytest.param(False, "raise", StoreHealth.CLOSED, id="failing beats, the port refuses: closed"),
    pytest.param(True, "raise", StoreHealth.SILENT, id="failing beats, the port answers: silent, not closed"),
])
def test_how_a_lost_store_is_judged(port, listening, mode, judged):
    if listening:
        port.listen()  # else bound, not listening: connections are refused
    store = FakeStore(port.getsockname()[1])
    pulse = _pulse(store)
    try:
        store.mode = mode
        assert _until(pulse.lost) is judged
        if mode == "raise" and listening:
            store.mode = "answer"  # the store answers again: healthy at the next beat
            assert _until(lambda: pulse.health() is StoreHealth.OK)
    finally:
        _stop(pulse, store)


def test_a_process_that_was_frozen_between_beats_is_not_a_silent_store(port):
    """A SIGSTOPped launcher's threads all stand still: no beat in flight, the last one long ago. That is this
    process's pause, not the store's silence (its next beat will say)."""
    port.listen()
    store = FakeStore(port.getsockname()[1])
    pulse = _pulse(store)
    _stop(pulse, store)  # the beats stop between two of them, as a freeze would stop them
    time.sleep(LOST_AFTER_S * 2)
    assert pulse.health() is StoreHealth.OK and pulse.lost() is None
