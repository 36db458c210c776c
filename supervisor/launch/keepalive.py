"""Keep-alives through the job's store: this node's pulse, the store's health, and a round's view of the others.

::

    Pulse (whole job)      add(alive/<node key>, 1) every tick -> last success: the store answers
                           an op fails and a connect is refused  -> the store's server is gone (CLOSED)
                           no success for lost_after             -> the store is SILENT (frozen host, cut network)
    RoundWatch (a round)   each peer's counter: not moving for lost_after -> that node is lost
                           the round's stop key (another node ended the round), the count of finished nodes,
                           nodes waiting to join (torch's num_nodes_waiting)

A counter, not a timestamp: each node judges by its own monotonic clock whether a peer's counter moved, so the
nodes' clocks need not agree. Every loop has its own store connection (a call to a silent store never returns), and
what it learns is read by the caller (``health``, ``RoundWatch.seen``): nothing here blocks the job's loop.
"""
from __future__ import annotations

import enum
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from loguru import logger

from supervisor.errors import first_line
from supervisor.launch.rendezvous import JobStore, Round

TICKS_PER_LOST = 12  # keep-alives (and reads of them) within lost_after: a lost node is noticed within ~1/12 of it
WAITING_EVERY_S = 1.0  # torch's num_nodes_waiting syncs the whole rendezvous state: not every tick


class StoreHealth(enum.Enum):
    OK = "ok"
    SILENT = "silent"  # no answer for lost_after: its host froze, died with its machine, or the network is cut
    CLOSED = "closed"  # its host refuses connections: the server's process is gone (its machine is up)


class Pulse:
    """This node's keep-alive counter in the job's store, bumped for the whole job, and the store's health."""

    def __init__(self, job: JobStore, key: str, lost_after_s: float) -> None:
        self.key, self.lost_after_s = key, lost_after_s
        self.tick_s = lost_after_s / TICKS_PER_LOST
        self._stop = threading.Event()
        self._start(job)

    def _start(self, job: JobStore) -> None:
        self.job = job
        self.pending: float | None = None  # when the beat in flight was sent (None: none in flight)
        self.trouble: float | None = None  # when the current run of failed beats began
        self.closed = False
        self._bad_since: float | None = None
        self.first = threading.Event()
        generation = self.generation = object()
        self.thread = threading.Thread(target=self._beat, args=(job, generation), name="rankvisor-pulse", daemon=True)
        self.thread.start()

    def repoint(self, job: JobStore) -> bool:
        """Beat on another store (the standby that took over); True once the first beat landed there."""
        self._start(job)
        return self.first.wait(self.lost_after_s)

    def health(self) -> StoreHealth:
        """From the beats themselves: one unanswered, or failing, for lost_after. A process that was frozen (no beat
        in flight) is not a silent store: its next beat says."""
        if self.closed:
            return StoreHealth.CLOSED
        since = self.trouble if self.trouble is not None else self.pending
        if since is not None and time.monotonic() - since > self.lost_after_s:
            return StoreHealth.SILENT
        return StoreHealth.OK

    def lost(self) -> StoreHealth | None:
        """The store's loss once it holds over a tick (the job's loop asks each tick): a beat that was in flight
        while this very process was frozen lands within a tick after it runs again."""
        health = self.health()
        if health is StoreHealth.OK:
            self._bad_since = None
            return None
        now = time.monotonic()
        if health is StoreHealth.SILENT and (self._bad_since is None or now - self._bad_since < self.tick_s):
            self._bad_since = self._bad_since or now
            return None
        return health

    def stop(self) -> None:
        self._stop.set()

    def _beat(self, job: JobStore, generation: object) -> None:
        client = None
        while not self._stop.is_set() and generation is self.generation:
            sent = self.pending = time.monotonic()
            try:
                if client is None and self.trouble is not None and self._refused(job, "no connection"):
                    return
                client = client or job.client(connect_s=self.tick_s * 4)
                client.add(f"alive/{self.key}", 1)
            except Exception as exc:  # noqa: BLE001 - any failure of the store is judged by what a connect says
                client = None
                if generation is not self.generation:
                    return
                self.trouble = self.trouble or sent
                if self._refused(job, first_line(exc)):
                    return
            else:
                if generation is not self.generation:
                    return
                self.trouble = None
                self.first.set()
            self.pending = None
            self._stop.wait(self.tick_s)

    def _refused(self, job: JobStore, why: str) -> bool:
        """A failed beat: the server's process is gone if its port refuses connections. (Asked again at each beat
        while in trouble: a killed host's connections may close a moment before its listening port does.)"""
        if not refused(job.host, job.port, self.tick_s * 4):
            return False
        self.closed = True
        logger.debug(f"store {job.endpoint}: {why}; its port refuses connections")
        return True


def refused(host: str, port: int, timeout_s: float) -> bool:
    """True when the host answers that nothing listens on the port (the store's process is gone)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:  # timed out, unreachable: silence, not a refusal
        return False


@dataclass
class Seen:
    """What a RoundWatch has read so far (written by its thread, read by the job's loop)."""

    lost: tuple[int, ...] = ()  # group ranks whose keep-alive stopped
    stop: bytes | None = None  # the round's stop key, once some node ended the round
    done: int = 0  # nodes whose ranks all exited 0
    waiting: int = 0  # nodes waiting to join (c10d)
    changed: threading.Event = field(default_factory=threading.Event)


class RoundWatch:
    """One round's view of the other nodes, refreshed every tick on a thread of its own."""

    def __init__(self, job: JobStore, rnd: Round, lost_after_s: float, waiting: Callable[[], int]) -> None:
        self.job, self.round, self.lost_after_s, self._waiting = job, rnd, lost_after_s, waiting
        self.tick_s = lost_after_s / TICKS_PER_LOST
        self.seen = Seen()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="rankvisor-round-watch", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            client = self.job.client(connect_s=self.lost_after_s)
        except Exception:  # noqa: BLE001 - the pulse reports the store's health; nothing to watch without it
            return
        counters = {p.group_rank: (None, time.monotonic()) for p in self.round.peers()}
        next_waiting = time.monotonic() + WAITING_EVERY_S
        while not self._stop.is_set():
            try:
                self._read(client, counters)
                if time.monotonic() >= next_waiting:
                    next_waiting = time.monotonic() + WAITING_EVERY_S
                    self.seen.waiting = self._waiting()
            except Exception as exc:  # noqa: BLE001 - a failing store is the pulse's to report
                logger.debug(f"round watch: {first_line(exc)}")
                return
            self._stop.wait(self.tick_s)

    def _read(self, client, counters: dict) -> None:
        now = time.monotonic()
        for p in self.round.peers():
            value = int(client.add(f"alive/{p.key}", 0))
            last, since = counters[p.group_rank]
            counters[p.group_rank] = (value, now) if value != last else (last, since)
        seen = self.seen
        before = (seen.lost, seen.stop, seen.done, seen.waiting)
        seen.lost = tuple(g for g, (_, since) in counters.items() if now - since > self.lost_after_s)
        seen.done = int(client.add(self.round.key("done"), 0))
        if seen.stop is None and client.check([self.round.key("stop")]):
            seen.stop = client.get(self.round.key("stop"))
        if (seen.lost, seen.stop, seen.done, seen.waiting) != before:
            seen.changed.set()
