"""What a multi-node job does when a round ends: the decisions, apart from the mechanism (job.py). Pure functions.

    | the round ended because               | restarts | then                                                     |
    |---------------------------------------|----------|----------------------------------------------------------|
    | every node's ranks exited 0           |    -     | done, exit 0 everywhere                                  |
    | a rank failed on some node            |    +1    | a new round, unless the budget (--max-restarts) is spent |
    | a node stopped answering (lost)       |    +1    | a new round without it, if MIN and a quorum remain       |
    | the store stopped answering           |    +1    | the standby takes over, if MIN and a quorum remain       |
    | nodes wait to join (room up to MAX)   |    -     | a new round with them (torchrun's rule: membership      |
    |                                       |          | changes are not retries)                                 |
    | a node was stopped by a signal        |    -     | the job stops everywhere (torchrun's rule)               |

One count for the whole job: the node that ends a round writes the count after it into the round's stop key, and
every node reads it from there (the same value in every node's TORCHELASTIC_RESTART_COUNT, status and events).

Quorum: a group of nodes cut off from the others must not go on while the others do, or two halves of the job
would train and write checkpoints apart. Nodes that lose some of the last round's nodes go on only with more than
half of them, or with exactly half when the other half holds no live store: the store is on this side (its host
reaches us), or its server is known dead (its host refused the connection: the process is gone, not cut off).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass


class End(enum.Enum):
    DONE = "done"
    RANK_FAILED = "rank_failed"
    NODE_LOST = "node_lost"
    STORE_LOST = "store_lost"
    NODES_JOINING = "nodes_joining"
    STOPPED = "stopped"


COUNTED = frozenset({End.RANK_FAILED, End.NODE_LOST, End.STORE_LOST})


@dataclass(frozen=True)
class RoundEnd:
    kind: End
    detail: str  # one line: who, what
    nodes: tuple[int, ...] = ()  # group ranks it concerns: the failed node, the lost ones, the stopped one
    restarts: int = 0  # the job's restart count after this end

    def encode(self) -> str:
        return json.dumps({"kind": self.kind.value, "detail": self.detail, "nodes": list(self.nodes),
                           "restarts": self.restarts})

    @staticmethod
    def decode(raw: bytes | str) -> "RoundEnd":
        d = json.loads(raw)
        return RoundEnd(End(d["kind"]), d["detail"], tuple(d["nodes"]), int(d["restarts"]))


def ending(kind: End, detail: str, restart_count: int, nodes: tuple[int, ...] = ()) -> RoundEnd:
    """The end of a round whose restart count was ``restart_count``, with the job's count after it."""
    return RoundEnd(kind, detail, nodes, restart_count + (kind in COUNTED))


class Verdict(enum.Enum):
    NEXT_ROUND = "next_round"
    DONE = "done"
    FAIL = "fail"


@dataclass(frozen=True)
class Next:
    verdict: Verdict
    why: str = ""


@dataclass(frozen=True)
class Standing:
    """What is left after the round, as this node sees it."""

    survivors: int  # nodes that go on (this one included)
    round_nodes: int  # nodes of the round that ended
    tie_ok: bool  # at exactly half: the other half holds no live store (see the module's docstring)


def decide(end: RoundEnd, standing: Standing, min_nodes: int, max_restarts: int) -> Next:
    if end.kind is End.DONE:
        return Next(Verdict.DONE)
    if end.kind is End.STOPPED:
        return Next(Verdict.FAIL, f"the job was stopped: {end.detail}")
    if end.restarts > max_restarts:
        return Next(Verdict.FAIL, f"{end.detail}; the restart budget is spent ({max_restarts} restart(s) in all, "
                                  "--max-restarts)")
    if standing.survivors < min_nodes:
        return Next(Verdict.FAIL, f"{end.detail}; {standing.survivors} node(s) left, --nnodes needs at least "
                                  f"{min_nodes}")
    if not quorum(standing):
        return Next(Verdict.FAIL, f"{end.detail}; {standing.survivors} of {standing.round_nodes} nodes left here, "
                                  "not a majority: the others may go on without this side, so it stops (two halves "
                                  "of a job must never train apart)")
    return Next(Verdict.NEXT_ROUND)


def quorum(s: Standing) -> bool:
    return 2 * s.survivors > s.round_nodes or (2 * s.survivors == s.round_nodes and s.tie_ok)
