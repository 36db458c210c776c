"""``rankvisor-run --nnodes``: this node's side of a multi-node job, round after round.

::

    open the rendezvous: host the store or reach it (torch's rule), a standby store beside it ─▶ the pulse starts
    loop
        next round: torch's rendezvous (bounded by the store's health and by signals) ─▶ Round
        run the round (noderound.py) ─▶ the RoundEnd every node agreed on (or STORE_LOST, seen here)
        STORE_LOST: the first standby that answers takes over; the nodes that come are counted
        the job's restart count after the end, written the same by every node (compare_set)
        budget.decide ─▶ next round | done: exit 0 | fail: one line, exit 1      (a signal here: 128+N)
    the end: acknowledged in the store; the store's host waits (bounded) until every node has read it

Each node runs its own supervised tree per round, so what a single node promises (no orphans, per-rank logs, error
files, status from another shell, events) holds on every node.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from loguru import logger

from supervisor.errors import first_line
from supervisor.launch.budget import End, Next, RoundEnd, Standing, Verdict, decide, ending
from supervisor.launch.jobspec import JobSpec
from supervisor.launch.keepalive import TICKS_PER_LOST, Pulse, RoundWatch, StoreHealth
from supervisor.launch.noderound import NodeRound, RoundResult, lost_detail as _lost_detail, place
from supervisor.launch.rendezvous import (JobStore, Overdue, Rendezvous, RendezvousFailed, Round,
                                          Stopped, StoreLost, bounded, open_rendezvous, take_over)

EXIT_OK, EXIT_FAILED = 0, 1
FAILOVER_WAIT_LOSTS = 2  # how long survivors wait for each other at the standby, in lost_after units
EXIT_BARRIER_LOSTS = 2  # how long the store's host waits for every node to read the end, in lost_after units


class Job:
    def __init__(self, cfg, spec: JobSpec, signals, run_dir: str) -> None:
        from supervisor.core.events import EventLog

        self.cfg, self.spec, self.signals, self.run_dir = cfg, spec, signals, run_dir
        self.events = EventLog(run_dir)
        self.rdzv: Rendezvous | None = None
        self.pulse: Pulse | None = None
        self.round: Round | None = None
        self.rounds: list[tuple[Round, RoundResult]] = []
        self.watch: RoundWatch | None = None  # the current round's, kept until the next round forms
        self.noted_lost: set[str] = set()  # keys of the nodes told lost (node_lost), told once each

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.rdzv = self._bounded(lambda: open_rendezvous(self.spec), "opening the rendezvous")
            self.pulse = Pulse(self.rdzv.job, self.rdzv.key, self.spec.timings.lost_after_s)
            logger.info(f"multi-node job {self.spec.run_id}: {self._where()}")
            self.events.emit("job_started", run_id=self.spec.run_id, backend=self.spec.backend,
                             store=self.rdzv.job.endpoint, hosting=self.rdzv.hosting, standby=self.rdzv.standby,
                             nnodes=f"{self.spec.min_nodes}:{self.spec.max_nodes}", nproc=self.spec.nproc,
                             max_restarts=self.spec.max_restarts, launcher_pid=os.getpid())
            return self._rounds()
        except Stopped:
            return self._leave_on_signal()
        except RendezvousFailed as exc:
            return self._fail(str(exc))
        finally:
            self._close_watch()
            if self.pulse is not None:
                self.pulse.stop()
            self.events.close()

    def _rounds(self) -> int:
        while True:
            self.round = rnd = self._join()
            self._started(rnd)
            result = NodeRound(place(self.cfg, rnd, self.spec.max_restarts), rnd, self.rdzv, self.pulse,
                               self.signals, self.watch, self.events.run_id, self.status).run()
            self.rounds.append((rnd, result))
            if self.signals.stop.is_set():
                return self._leave_on_signal()
            (logger.info if result.end.kind is End.DONE else logger.warning)(
                f"round {rnd.index} ended: {result.end.detail}")
            end, standing = result.end, self._standing(rnd, result.end)
            step = decide(end, standing, self.spec.min_nodes, self.spec.max_restarts)
            self.events.emit("round_ended", round=rnd.index, end=end.kind.value, detail=end.detail,
                             nodes=list(end.nodes), restarts=end.restarts, verdict=step.verdict.value)
            if step.verdict is not Verdict.NEXT_ROUND:
                return self._finish(step, end, standing.survivors)
            self._count(end)

    def _started(self, rnd: Round) -> None:
        """The round formed: the last round's watch is done, this round's begins (it outlives the round, until the
        next one forms: a node lost while the others join again is noticed through it)."""
        self._close_watch()
        self._note_absent(rnd)
        self.watch = RoundWatch(self.rdzv.job, rnd, self.spec.timings.lost_after_s, self.rdzv.num_nodes_waiting)
        self.events.emit("round_started", round=rnd.index, id=rnd.id, node=rnd.me.group_rank,
                         nodes=[n.label() for n in rnd.nodes], world_size=rnd.world_size, rank_offset=rnd.rank_offset,
                         restart_count=rnd.restart_count, master=f"{rnd.master_addr}:{rnd.master_port}")
        logger.info(f"round {rnd.index}: {rnd.me.label()} is group rank {rnd.me.group_rank} of {len(rnd.nodes)}, "
                    f"global ranks {rnd.global_ranks} of {rnd.world_size}, "
                    f"restart count {rnd.restart_count}")

    def _join(self) -> Round:
        """The next round. The store lost meanwhile: the standby takes over and the join starts again there. A node
        of the last round lost meanwhile (its ranks' peers failed before its keep-alive could tell): the join goes
        on only if the job can go on without it (budget.decide), else one line naming it."""
        while True:
            try:
                return self._bounded(self.rdzv.next_round, "joining the next round", peers=True)
            except StoreLost:
                if self.round is None:
                    raise RendezvousFailed(f"the rendezvous store at {self.rdzv.job.endpoint} was lost before the "
                                           "first round") from None
                end = ending(End.STORE_LOST, f"the rendezvous store at {self.rdzv.job.endpoint} was lost",
                             self.round.restart_count)
                step = decide(end, self._fail_over(self.round, self.pulse.health()), self.spec.min_nodes,
                              self.spec.max_restarts)
                if step.verdict is Verdict.FAIL:
                    raise RendezvousFailed(step.why) from None

    def _lost_peers(self) -> RendezvousFailed | None:
        """The last round's nodes lost while joining again, when the job cannot go on without them."""
        watch = self.watch
        if watch is None or not watch.seen.lost:
            return None
        rnd, lost = watch.round, watch.seen.lost
        end = ending(End.NODE_LOST, _lost_detail(rnd, lost, self.spec.timings.lost_after_s), rnd.restart_count,
                     lost)
        n = len(rnd.nodes)
        step = decide(end, Standing(n - len(lost), n, True), self.spec.min_nodes, max_restarts=end.restarts)
        if step.verdict is Verdict.FAIL:
            return RendezvousFailed(step.why)
        # told once: the ranks' failure came first, the node's loss is why
        self._note_lost(rnd, lost, f"{end.detail}: the next round goes on without it")
        return None

    def _note_absent(self, rnd: Round) -> None:
        """The last round's nodes that this round formed without: lost, even when no keep-alive told it yet (a
        launcher killed a moment before the others formed the round, its lease not yet run out)."""
        if not self.rounds:
            return
        last = self.rounds[-1][0]
        here = {n.key for n in rnd.nodes}
        absent = tuple(n.group_rank for n in last.nodes if n.key not in here)
        if absent:
            names = ", ".join(n.label() for n in last.nodes if n.group_rank in absent)
            self._note_lost(last, absent, f"{names} of round {last.index} did not come to round {rnd.index}")

    def _note_lost(self, rnd: Round, lost: tuple[int, ...], detail: str) -> None:
        """One node_lost event for the nodes of ``rnd`` (group ranks ``lost``) not told before."""
        keys = {n.key: n.group_rank for n in rnd.nodes if n.group_rank in lost}
        new = sorted(g for k, g in keys.items() if k not in self.noted_lost)
        if not new:
            return
        self.noted_lost.update(keys)
        logger.warning(detail)
        self.events.emit("node_lost", round=rnd.index, nodes=new, detail=detail)

    def _standing(self, rnd: Round, end: RoundEnd) -> Standing:
        """Where the job stands after ``end``: the survivors, and whether a tie may go on (budget.py)."""
        n = len(rnd.nodes)
        if end.kind is End.STORE_LOST:
            return self._fail_over(rnd, self.pulse.health())
        if end.kind is End.NODE_LOST and rnd.me.group_rank in end.nodes:
            logger.warning(f"the other nodes lost {rnd.me.label()} (its keep-alive stopped): joining again")
            return Standing(n, n, True)
        lost = len(end.nodes) if end.kind in (End.NODE_LOST, End.STOPPED) else 0
        return Standing(n - lost, n, True)  # the store answers here: it is on this side

    def _count(self, end: RoundEnd) -> None:
        """The job's restart count after ``end``: every node writes the same value (a no-op after the first). A store
        lost meanwhile is left to the next join (the standby is seeded with the count)."""
        before = self.round.restart_count
        if end.restarts == before:
            return
        try:
            self._bounded(lambda: self.rdzv.job.client().compare_set("restarts", str(before), str(end.restarts)),
                          "counting the restart")
        except StoreLost:
            pass

    def _close_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    # -- the store's host lost -----------------------------------------------------------------------------------
    def _fail_over(self, rnd: Round, health: StoreHealth) -> Standing:
        """The first standby store (by group rank) that answers becomes the job's store; the nodes that come to it
        within FAILOVER_WAIT_LOSTS are the survivors."""
        if not self.spec.standby:
            raise RendezvousFailed(f"the rendezvous store at {self.rdzv.job.endpoint} is lost and there is no "
                                   "standby store (--rdzv-backend=static, or --rdzv-conf standby=false)")
        lost_after = self.spec.timings.lost_after_s
        for node in rnd.nodes:
            if node.hosts_store or not node.standby:
                continue
            host, port = node.standby_at()
            job = JobStore(self.spec, host, port)
            try:
                survivors = self._bounded(lambda: _gather(job, rnd, lost_after), "reaching a standby store",
                                          deadline=time.monotonic() + lost_after * (FAILOVER_WAIT_LOSTS + 1))
            except Exception as exc:  # noqa: BLE001 - that standby is gone too: try the next
                logger.warning(f"standby store of {node.label()} at {node.standby}: {first_line(exc)}")
                continue
            self._close_watch()  # it reads the lost store
            self.pulse.repoint(job)
            self.rdzv = take_over(self.rdzv, host, int(port), hosting=node.key == rnd.me.key)
            self.events.emit("store_failover", lost=f"{self.spec.host}:{self.spec.port}", to=node.standby,
                             host=node.label(), survivors=survivors, closed=health is StoreHealth.CLOSED)
            logger.warning(f"the standby store of {node.label()} at {node.standby} took over; "
                           f"{survivors} of {len(rnd.nodes)} nodes came")
            return Standing(survivors, len(rnd.nodes), health is StoreHealth.CLOSED)
        raise RendezvousFailed(f"the rendezvous store at {self.rdzv.job.endpoint} is lost and no standby store "
                               "answered")

    # -- the end -------------------------------------------------------------------------------------------------
    def _finish(self, step: Next, end: RoundEnd, survivors: int) -> int:
        self._acknowledge(survivors)
        code = EXIT_OK if step.verdict is Verdict.DONE else EXIT_FAILED
        self.events.emit("job_ended", verdict=step.verdict.value, why=step.why, restarts=end.restarts)
        if code == EXIT_OK:
            logger.info(f"job done: every node's ranks exited 0 ({len(self.rounds)} round(s), "
                        f"{end.restarts} restart(s))")
            print(self._summary(end, "done"), flush=True)
            return code
        self._root_cause()
        print(self._summary(end, "failed"), flush=True)
        print(f"error: {step.why}", file=sys.stderr, flush=True)
        return code

    def _acknowledge(self, survivors: int) -> None:
        """Every node still there reads the end before the store's host leaves with the store (torchrun's exit
        barrier), bounded: a node lost meanwhile is not waited for long."""
        rnd = self.round
        key = rnd.key("left")
        try:
            client = self._bounded(self.rdzv.job.client, "acknowledging the end")
            self._bounded(lambda: client.add(key, 1), "acknowledging the end")
            if self.rdzv.hosting:
                deadline = time.monotonic() + self.spec.timings.lost_after_s * EXIT_BARRIER_LOSTS
                self._bounded(lambda: _wait_count(client, key, survivors, deadline), "the exit barrier",
                              deadline=deadline + 1)
            self._bounded(self.rdzv.close, "closing the rendezvous", deadline=time.monotonic() + 5)
        except Exception as exc:  # noqa: BLE001 - the end stands; a lost store only skips the wait
            logger.debug(f"end of the job: {first_line(exc)}")

    def _leave_on_signal(self) -> int:
        logger.warning(f"stopped by a signal; exit {self.signals.code}")
        if self.rdzv is not None:
            try:  # torchrun's rule: a node stopped by a signal closes the rendezvous, the job ends everywhere
                self._bounded(self.rdzv.close, "closing the rendezvous", deadline=time.monotonic() + 5,
                              mind_signals=False)
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        return self.signals.code or EXIT_FAILED

    def _fail(self, why: str) -> int:
        self.events.emit("job_ended", verdict=Verdict.FAIL.value, why=why)
        print(f"error: {why}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    def _root_cause(self) -> None:
        """torchrun's failure summary, on the node whose ranks failed in the last round."""
        from supervisor.launch.rootcause import failures, format_failures

        rnd, result = self.rounds[-1]
        if not result.local_failure:
            return
        log_dir = os.path.abspath(self.cfg.launch.log_dir or self.run_dir)
        found = failures(result.events, log_dir, attempt=rnd.index, rank_offset=rnd.rank_offset)
        s = self.cfg.launch
        if found:
            print(format_failures(s.script if s.module else os.path.basename(s.script), found), file=sys.stderr,
                  flush=True)

    # -- views ---------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The job as this node sees it, for `python -m supervisor status` and the live page."""
        rnd, spec = self.round, self.spec
        return {"node": rnd.me.label(), "group_rank": rnd.me.group_rank, "nodes": [n.label() for n in rnd.nodes],
                "round": rnd.index, "round_id": rnd.id, "restart_count": rnd.restart_count,
                "max_restarts": spec.max_restarts, "rank_offset": rnd.rank_offset, "local_ranks": rnd.me.nproc,
                "world_size": rnd.world_size,
                "nnodes": f"{spec.min_nodes}:{spec.max_nodes}", "store": self.rdzv.job.endpoint,
                "store_here": self.rdzv.hosting, "store_health": self.pulse.health().value}

    def _where(self) -> str:
        role = "hosting" if self.rdzv.hosting else "reaching"
        standby = f", standby store at {self.rdzv.standby}" if self.rdzv.standby else ""
        return (f"{self.spec.backend} rendezvous, {role} the store at {self.rdzv.job.endpoint}{standby}; "
                f"--nnodes={self.spec.min_nodes}:{self.spec.max_nodes}, {self.spec.nproc} rank(s) here")

    def _summary(self, end: RoundEnd, outcome: str) -> str:
        from supervisor.workloads import format_report

        rnd = self.round
        items = [("outcome", outcome), ("this node", f"{rnd.me.label()}, group rank {rnd.me.group_rank}"),
                 ("nodes in the last round", len(rnd.nodes)), ("world size", rnd.world_size),
                 ("rounds on this node", len(self.rounds)),
                 ("restarts (the job's)", f"{end.restarts} of --max-restarts={self.spec.max_restarts}")]
        return "script summary (multi-node)\n" + format_report([(k, str(v)) for k, v in items])

    def _bounded(self, fn, what: str, deadline: float | None = None, mind_signals: bool = True,
                 peers: bool = False):
        """``fn()`` given up when a signal came (Stopped), the store went silent or closed (StoreLost; not with a
        ``deadline``: then Overdue once it passed), or (``peers``) the last round's nodes were lost so that the job
        cannot go on (RendezvousFailed)."""
        def give_up() -> Exception | None:
            if mind_signals and self.signals.stop.is_set():
                return Stopped(f"{what}: stopped by a signal")
            if deadline is not None:
                return Overdue(f"{what}: no answer in time") if time.monotonic() > deadline else None
            if self.pulse is not None and self.pulse.lost() is not None:
                return StoreLost(f"{what}: the store is lost")
            return self._lost_peers() if peers else None
        return bounded(fn, give_up, self.spec.timings.lost_after_s / TICKS_PER_LOST)


def _gather(job: JobStore, rnd: Round, lost_after: float) -> int:
    """At the standby: count in, wait for the round's other survivors (the store's host excepted), seed the job's
    restart count (the store's loss counts: every survivor writes the same value)."""
    client = job.client(connect_s=lost_after / 3)
    key = f"failover/{rnd.id}"
    client.add(key, 1)
    expected = sum(not n.hosts_store for n in rnd.nodes)
    deadline = time.monotonic() + lost_after * FAILOVER_WAIT_LOSTS
    arrived = _wait_count(client, key, expected, deadline)
    client.compare_set("restarts", "", str(rnd.restart_count + 1))
    return arrived


def _wait_count(client, key: str, want: int, deadline: float) -> int:
    while True:
        got = int(client.add(key, 0))
        if got >= want or time.monotonic() >= deadline:
            return got
        time.sleep(0.05)


def run_job(cfg, spec: JobSpec, signals) -> int:
    """The launcher's multi-node path: a run folder, logging, then the job's rounds; the exit code."""
    from supervisor.cli import setup_logging
    from supervisor.config import make_run_dir

    run_dir = os.path.abspath(make_run_dir())
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=run_dir))
    setup_logging(cfg, run_dir)
    return Job(cfg, spec, signals, run_dir).run()
