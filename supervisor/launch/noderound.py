"""One round of this node's ranks: the single-node launcher's supervised tree (restart=never: restarts are the job's
to decide), started with the round's place in the job's world, ended by whatever ends the round first.

::

    start the tree (Supervisor, workload=script, NodePlace) ─▶ join on every rank (non-blocking)
    wait for the first of
        this node's ranks all exited 0   -> count this node done; the round is done when every node is
        a rank here failed                -> claim the round's end: RANK_FAILED
        a peer's keep-alive stopped       -> claim NODE_LOST
        nodes wait to join, room up to MAX -> claim NODES_JOINING
        another node claimed the end      -> the stop key says what (one decision for every node)
        the store went silent or closed   -> STORE_LOST (nothing to claim: each node finds out by itself)
        a signal                          -> claim STOPPED
    stop the tree: every rank gone (graceful, SIGKILL at the grace), none left inside a collective
    a rank failed somewhere           -> every node's own first failure, gathered: the round's end names the root

The claim is the round's stop key, set once (compare_set): whoever sets it first decides for everyone, and writes
the job's restart count after this end into it. Who claims first is a race, though, when a rank's death breaks its
peers' collectives on other nodes: their exits may be seen (and claimed) before the death itself, on a node slow to
notice. So once its ranks are down, each node writes the first failure of its own into the round's keys, and every
node names the same root cause from them: the earliest signal death (a rank killed or crashed: a broken collective
only ever raises), else the earliest failure.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from loguru import logger

from supervisor.errors import first_line
from supervisor.launch.budget import End, RoundEnd, ending
from supervisor.launch.keepalive import Pulse, RoundWatch, StoreHealth, refused
from supervisor.launch.rendezvous import Interrupted, Rendezvous, Round, StoreLost, bounded
from supervisor.launch.rootcause import failures
from worker.spec import NodePlace

JOIN = "join"  # worker.script.ScriptWorker.join
PEER_FIRST_S = 0.2  # a local rank failure is claimed this late: the node whose rank failed first names the end
CAUSE_WAIT_S = 1.0  # how long a node waits for the others' own failures once a rank failed (a dead node never tells)
PROBE_S = 0.1  # how often a node that has not told is looked at (its launcher gone?) meanwhile


@dataclass
class RoundResult:
    end: RoundEnd
    local_failure: bool = False  # this node's ranks failed: its events hold the root cause
    events: list = dataclasses.field(default_factory=list)  # the round tree's events (for the root cause)


def place(cfg, rnd: Round, max_restarts: int):
    """The round's configuration for this node's tree."""
    node = NodePlace(group_rank=rnd.me.group_rank, group_world_size=len(rnd.nodes), rank_offset=rnd.rank_offset,
                     world_size=rnd.world_size, restart_count=rnd.restart_count, max_restarts=max_restarts,
                     master_addr=rnd.master_addr, master_port=rnd.master_port, round=rnd.index)
    return dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, node=node))


class NodeRound:
    def __init__(self, cfg, rnd: Round, rdzv: Rendezvous, pulse: Pulse, signals, watch: RoundWatch, run_id: str,
                 job_status: Callable[[], dict]) -> None:
        self.cfg, self.round, self.rdzv, self.pulse, self.signals = cfg, rnd, rdzv, pulse, signals
        self.watch, self.run_id, self.job_status = watch, run_id, job_status
        self.tick_s = pulse.tick_s
        self.client = None  # this thread's store connection (claims, the done count)

    def run(self) -> RoundResult:
        from supervisor import observe
        from supervisor.api import Supervisor
        from supervisor.cli import command_start
        from supervisor.core.events import EventLog

        # READY counts from the command's start in the first round (as for one node), from the round's after
        t0 = command_start() if self.round.index == 0 else time.monotonic()
        sup = Supervisor(self.cfg, events=EventLog(self.cfg.logging.run_dir, run_id=self.run_id), start=False)
        if not self.signals.attach(sup):
            return RoundResult(self._stopped())
        ui = observe.watch(sup, t0, job=self.job_status)
        try:
            result = self._supervise(sup, self.watch, t0, ui)
        finally:
            sup.shutdown()  # the ranks stop now: none is left inside a collective whose peers are gone
            ui.release()
            self.signals.supervisor = None
        result.events = list(sup.events.recent)
        if result.end.kind is End.RANK_FAILED:
            result.end = self._root_cause(result.end, result.events)
        return result

    # -- the wait --------------------------------------------------------------------------------------------
    def _supervise(self, sup, watch: RoundWatch, t0: float, ui) -> RoundResult:
        started = _start(sup)
        joined: concurrent.futures.Future | None = None
        marked = False
        while True:
            end = self._outside(watch)
            if end is not None:
                return RoundResult(end)
            if started.done() and joined is None:
                if started.exception() is not None:
                    return RoundResult(self._local_failure(started.exception()), True)
                ui.ready(time.monotonic() - t0)
                joined = sup.collective_rpc(JOIN, non_block=True)
                joined.add_done_callback(lambda _f: watch.seen.changed.set())
            if joined is not None and joined.done():
                if joined.exception() is not None:
                    return RoundResult(self._local_failure(joined.exception()), True)
                if not marked and self._store(lambda c: c.add(self.round.key("done"), 1)) is not None:
                    marked = True  # counted once; a store lost meanwhile is the pulse's to report
                    logger.info(f"every rank of {self.round.me.label()} exited 0; waiting for the other nodes")
            watch.seen.changed.wait(self.tick_s)
            watch.seen.changed.clear()

    def _outside(self, watch: RoundWatch) -> RoundEnd | None:
        """An end that comes from outside this node's ranks, or None."""
        rnd, seen = self.round, watch.seen
        if self.signals.stop.is_set():
            return self._stopped()
        health = self.pulse.lost()
        if health is not None:
            what = "refuses connections (its host's launcher is gone)" if health is StoreHealth.CLOSED \
                else f"stopped answering for {self.pulse.lost_after_s:g} s"
            return ending(End.STORE_LOST, f"the rendezvous store at {self.rdzv.job.endpoint} {what}",
                          rnd.restart_count)
        if seen.stop is not None:
            return RoundEnd.decode(seen.stop)
        if seen.done >= len(rnd.nodes):
            return self._claim(ending(End.DONE, "every node's ranks exited 0", rnd.restart_count))
        if seen.lost:
            return self._claim(ending(End.NODE_LOST, lost_detail(rnd, seen.lost, self.pulse.lost_after_s),
                                      rnd.restart_count, seen.lost))
        if seen.waiting and len(rnd.nodes) < self.rdzv.spec.max_nodes:
            return self._claim(ending(End.NODES_JOINING, f"{seen.waiting} node(s) waiting to join",
                                      rnd.restart_count))
        return None

    def _local_failure(self, exc: BaseException) -> RoundEnd:
        """A rank here failed. When a peer on another node died first, this rank's collective broke a moment after
        it: the peer's node names the round's end if its claim lands within PEER_FIRST_S (compare_set keeps it)."""
        time.sleep(PEER_FIRST_S)
        return self._claim(ending(End.RANK_FAILED, f"{_here(self.round)}: {first_line(exc)}",
                                  self.round.restart_count, (self.round.me.group_rank,)))

    def _stopped(self) -> RoundEnd:
        import signal

        name = signal.Signals(self.signals.signum).name if self.signals.signum else "a signal"
        return self._claim(ending(End.STOPPED, f"{self.round.me.label()} was stopped by {name}",
                                  self.round.restart_count, (self.round.me.group_rank,)))

    # -- the root cause -----------------------------------------------------------------------------------------
    def _root_cause(self, end: RoundEnd, events: list[dict]) -> RoundEnd:
        """The round's end, naming the root cause among every node's own first failure (the module's docstring).
        The claimed end stands where the root is on the node that claimed (its words are the ranks' own), where no
        node failed by itself, or without the store."""
        rnd = self.round
        keys = {n.group_rank: rnd.key(f"cause/{n.group_rank}") for n in rnd.nodes}
        mine = json.dumps(own_failure(events, rnd))
        if not self._store(lambda c: c.set(keys[rnd.me.group_rank], mine) or True):
            return end
        self._await_causes({g: k for g, k in keys.items() if g not in self.watch.seen.lost})
        told = self._store(lambda c: [json.loads(c.get(k)) for k in keys.values() if c.check([k])]) or []
        causes = [c for c in told if c]
        if not causes:
            return end
        root = min(causes, key=lambda c: (not c["signal"], c["time"], c["node"]))
        if end.nodes == (root["node"],):
            return end
        return RoundEnd(End.RANK_FAILED, root["detail"], (root["node"],), end.restarts)

    def _await_causes(self, waited: dict[int, str]) -> None:
        """Until every node of ``waited`` (group rank -> its key) has told, one found gone, or CAUSE_WAIT_S."""
        deadline = time.monotonic() + CAUSE_WAIT_S
        next_probe = time.monotonic() + PROBE_S
        while waited and time.monotonic() < deadline:
            told = self._store(lambda c: {g for g, k in waited.items() if c.check([k])}) or set()
            for g in told:
                del waited[g]
            if waited and time.monotonic() >= next_probe:  # the silent ones, now and then (not at once: slow ≠ gone)
                next_probe += PROBE_S
                for g in [g for g in waited if _gone(self.round.nodes[g], self.tick_s)]:
                    del waited[g]  # its launcher is gone (killed with its ranks): it will never tell
            time.sleep(0.02)

    # -- the stop key ------------------------------------------------------------------------------------------
    def _claim(self, end: RoundEnd) -> RoundEnd:
        """Set the round's stop key unless a node did first; the end every node agrees on. Without a store (it went
        silent meanwhile) this node's own view stands, and the job's loop finds the store lost."""
        got = self._store(lambda c: c.compare_set(self.round.key("stop"), "", end.encode()))
        return RoundEnd.decode(got) if got else end

    def _store(self, op: Callable[[Any], Any]) -> Any:
        """``op(client)`` on this thread's connection, bounded by the store's health; None if it went silent."""
        def call():
            self.client = self.client or self.rdzv.job.client(connect_s=self.pulse.lost_after_s)
            return op(self.client)

        def give_up():
            return None if self.pulse.lost() is None else StoreLost("the store is lost")
        try:
            return bounded(call, give_up, self.tick_s)
        except Interrupted:
            self.client = None
            return None
        except Exception as exc:  # noqa: BLE001 - a store error: the pulse will say which kind
            logger.debug(f"store call failed: {first_line(exc)}")
            self.client = None
            return None


def own_failure(events: list[dict], rnd: Round) -> dict | None:
    """This node's root-cause candidate from its tree's events: its earliest signal death, else its earliest
    failure (launch/rootcause.py: an end of the rank's own, not the stop's); None if every rank ended cleanly."""
    from supervisor.core.exits import ExitInfo

    found = failures(events, "", rank_offset=rnd.rank_offset)
    if not found:
        return None
    f = min(found, key=lambda f: (f.exitcode >= 0, f.time))
    detail = f"{_here(rnd)}: rank {f.rank} (pid {f.pid}) {ExitInfo(f.exitcode, script=True).reason}"
    return {"node": rnd.me.group_rank, "signal": f.exitcode < 0, "time": f.time, "detail": detail}


def _here(rnd: Round) -> str:
    """This node and its ranks, as a round's end names them: "node 1 (host:pid) (global ranks 2..3)"."""
    return f"{rnd.me.label()} (global ranks {rnd.global_ranks})"


def _gone(node, timeout_s: float) -> bool:
    """The node's launcher is gone: its standby store's port refuses connections (a machine that is up answers for
    a dead process at once). Unknown (False) for a node without a standby store."""
    if not node.standby:
        return False
    return refused(*node.standby_at(), timeout_s)


def lost_detail(rnd: Round, lost: tuple[int, ...], lost_after_s: float) -> str:
    return f"lost {', '.join(rnd.nodes[g].label() for g in lost)}: no keep-alive for {lost_after_s:g} s"


def _start(sup) -> concurrent.futures.Future:
    """``sup.start()`` on a short-lived thread (the manager thread spawns, so PDEATHSIG stays tied to it): the
    round's end may come while the ranks start, and request_shutdown then abandons the start-up."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            sup.start()
            done.set_result(None)
        except BaseException as exc:  # the caller reads it
            done.set_exception(exc)
    threading.Thread(target=run, name="rankvisor-round-start", daemon=True).start()
    return done
