"""Rounds of nodes, through torch's own rendezvous (torch.distributed.elastic), and what a round needs on top of it.

::

    c10d    DynamicRendezvousHandler + C10dRendezvousBackend on a TCPStore (hosted by the node whose address the
            endpoint names, torch's rule): join / wait list / keep-alive / num_nodes_waiting / close are torch's
    static  a fixed set of nodes (--node-rank) on the master's TCPStore: round k is the k-th round of every node
       │
       ▼  next_round() -> Round
    every node's description is exchanged in the round (torch's store_util.synchronize): its address, ranks,
    standby store; global rank 0's node picks the ranks' MASTER_ADDR / MASTER_PORT (torch's
    RendezvousStoreInfo.build); the job's restart count is read from the store (one count for the job)

A TCPStore client blocks without limit on a server that stopped answering (a frozen host, a cut network): each
thread that must stay responsive has a client of its own (``JobStore.client``), and whoever waits on a store call
does so through ``bounded`` (keepalive.py tells when the store went silent). The handlers of a lost store are kept
referenced for good: torch's keep-alive timer joins its thread when collected, and that thread may be blocked on
the dead store.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from supervisor.errors import first_line
from supervisor.launch.jobspec import JobSpec, this_host

KEY_ROOT = "rankvisor"
_ABANDONED: list[Any] = []  # handlers and stores of lost stores: never collected (see the module's docstring)


class RendezvousFailed(Exception):
    """The job cannot form a round: closed, timed out, or the store is unreachable. One line."""


@dataclass(frozen=True)
class NodeInfo:
    """One node of a round, as it described itself."""

    group_rank: int
    key: str  # unique for the launcher's life: names its keep-alive counter
    name: str  # host:pid, what messages call it
    addr: str  # where the other nodes reach it
    nproc: int
    standby: str  # "host:port" of its idle standby store, "" when it has none
    hosts_store: bool

    def label(self) -> str:
        return f"node {self.group_rank} ({self.name})"

    def standby_at(self) -> tuple[str, int]:
        """Where its standby store listens (host, port); only for a node that has one."""
        host, _, port = self.standby.rpartition(":")
        return host, int(port)


@dataclass(frozen=True)
class Round:
    index: int  # this node's rounds, counted from 0
    id: str  # the same on every node of the round: names the round's keys in the store
    me: NodeInfo
    nodes: tuple[NodeInfo, ...]  # by group rank
    master_addr: str
    master_port: int
    restart_count: int  # the job's, when the round started

    @property
    def world_size(self) -> int:
        return sum(n.nproc for n in self.nodes)

    @property
    def rank_offset(self) -> int:
        return sum(n.nproc for n in self.nodes[:self.me.group_rank])

    @property
    def global_ranks(self) -> str:
        """This node's global ranks, as messages name them: "2..3"."""
        return f"{self.rank_offset}..{self.rank_offset + self.me.nproc - 1}"

    def peers(self) -> tuple[NodeInfo, ...]:
        return tuple(n for n in self.nodes if n.group_rank != self.me.group_rank)

    def key(self, name: str) -> str:
        return f"round/{self.id}/{name}"


class JobStore:
    """Where the job's store is; a fresh client connection for each caller that needs one of its own."""

    def __init__(self, spec: JobSpec, host: str, port: int) -> None:
        self.spec, self.host, self.port = spec, host, port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, connect_s: float | None = None):
        """The job's keys (``rankvisor/<run id>/``) through a new connection."""
        import torch.distributed as dist

        timeout = timedelta(seconds=connect_s if connect_s is not None else self.spec.timings.read_timeout_s)
        raw = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout, wait_for_workers=False)
        return dist.PrefixStore(f"{KEY_ROOT}/{self.spec.run_id}/", raw)


def host_store(spec: JobSpec, host: str, port: int, is_host: bool | None, timeout_s: float):
    """torch's c10d rule for who serves the store: this node when asked (is_host) or when the endpoint names this
    machine and the port is free; otherwise a client. Returns (TCPStore, hosting)."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    want = is_host if is_host is not None else _matches_machine_hostname(host)
    for server in ([True, False] if want else [False]):
        try:
            store = dist.TCPStore(host, port, is_master=server, multi_tenant=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=timeout_s))
            return store, server
        except (RuntimeError, ValueError, TimeoutError) as exc:
            if not server or is_host is not None:
                raise RendezvousFailed(f"the rendezvous store at {host}:{port}: {first_line(exc)}") from None
    raise AssertionError("unreachable")


def start_standby(addr: str):
    """An idle TCPStore server on a free port of this node: the job's store if the store's host is lost."""
    import torch.distributed as dist

    store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    return store, f"{addr}:{store.port}"


class Rendezvous:
    """One node's side of the job's rounds (subclasses: c10d, static)."""

    def __init__(self, spec: JobSpec, store, hosting: bool, job: JobStore, standby: str) -> None:
        self.spec, self.store, self.hosting, self.job, self.standby = spec, store, hosting, job, standby
        self.addr = spec.local_addr or this_host()
        self.key = f"{self.addr}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.rounds = 0

    def next_round(self) -> Round:
        """The next round of the job (blocks until it forms); RendezvousFailed, one line, when it cannot."""
        try:
            return self._next_round()
        except RendezvousFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - torch's rendezvous and store errors, said in one line
            raise RendezvousFailed(self._why(exc)) from None

    def _why(self, exc: BaseException) -> str:
        from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousTimeoutError

        t = self.spec.timings
        if isinstance(exc, RendezvousClosedError):
            return (f"the job's rendezvous at {self.job.endpoint} is closed: the job has ended (it finished, failed, "
                    "or a node was stopped)")
        if isinstance(exc, RendezvousTimeoutError) or "timeout" in type(exc).__name__.lower():
            return (f"no round formed within join_timeout={t.join_s} s: fewer than {self.spec.min_nodes} node(s) "
                    f"came to {self.job.endpoint} (--nnodes={self.spec.min_nodes}:{self.spec.max_nodes})")
        return f"the rendezvous at {self.job.endpoint} failed: {first_line(exc)}"

    def _next_round(self) -> Round:
        store, rank, world, master = self._join()
        me = NodeInfo(rank, self.key, f"{self.addr}:{os.getpid()}", self.addr, self.spec.nproc, self.standby,
                      self.hosting)
        nodes, round_id = _exchange(store, me, world, self.spec.timings.join_s)
        count = int(self.job.client().compare_set("restarts", "", "0"))
        index, self.rounds = self.rounds, self.rounds + 1
        return Round(index, round_id, me, nodes, master[0], master[1], count)

    def num_nodes_waiting(self) -> int:
        return 0

    def close(self) -> None:
        """Late nodes are turned away (c10d); nothing to do for a fixed set of nodes."""

    def _join(self):
        raise NotImplementedError


class C10dRendezvous(Rendezvous):
    """torch's DynamicRendezvousHandler on the c10d backend (torchrun --rdzv-backend=c10d)."""

    def __init__(self, spec: JobSpec, store, hosting: bool, job: JobStore, standby: str) -> None:
        super().__init__(spec, store, hosting, job, standby)
        self.handler = _handler(spec, store, job.endpoint, self.addr)

    def _join(self):
        info = self.handler.next_rendezvous()
        boot = info.bootstrap_store_info
        return info.store, info.rank, info.world_size, (boot.master_addr, boot.master_port)

    def num_nodes_waiting(self) -> int:
        return self.handler.num_nodes_waiting()

    def close(self) -> None:
        self.handler.set_closed()

    def abandon(self) -> None:
        """The store is lost: stop torch's keep-alive timer there (on a thread: it joins its own, which may be
        blocked on the dead store for good) and keep the handler referenced (see the module's docstring)."""
        _ABANDONED.extend([self.handler, self.store])
        stop = getattr(self.handler, "_stop_heartbeats", None)  # torch's own, not public: skipped if it moves
        if stop is not None:
            threading.Thread(target=stop, name="rankvisor-old-keepalive", daemon=True).start()


class StaticRendezvous(Rendezvous):
    """A fixed set of nodes (torchrun's default --rdzv-backend=static): GROUP_RANK is --node-rank; round k of the job
    is every node's k-th round (the same nodes go through the same rounds)."""

    def _join(self):
        from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo
        import torch.distributed as dist

        store = dist.PrefixStore(f"{KEY_ROOT}/{self.spec.run_id}/static/{self.rounds}/", self.store)
        rank, world = self.spec.node_rank, self.spec.max_nodes
        boot = RendezvousStoreInfo.build(rank, store, local_addr=self.addr)
        return store, rank, world, (boot.master_addr, boot.master_port)


def quiet_torch() -> None:
    """Import torch.distributed with its C++ store warnings off, and its rendezvous's Python log into ours (at
    DEBUG, in supervisor.log): a lost store makes both repeat a stack trace every second, and what they say is
    said here once, in one line. The ranks keep the environment the user gave (TORCH_CPP_LOG_LEVEL is read once,
    at import, in this process only)."""
    if "torch" not in sys.modules:
        user = os.environ.get("TORCH_CPP_LOG_LEVEL")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        import torch.distributed  # noqa: F401

        if user is None:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
    log = logging.getLogger("torch.distributed.elastic")
    log.handlers[:] = [_ToLoguru()]
    log.propagate = False


class _ToLoguru(logging.Handler):
    def emit(self, record) -> None:
        from loguru import logger

        logger.debug(f"torch: {record.getMessage()}")


def _handler(spec: JobSpec, store, endpoint: str, addr: str):
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    # The ranks' store is global rank 0's own (TORCHELASTIC_USE_AGENT_STORE=False), on a port its node picks per
    # round (torch's RendezvousStoreInfo.build), not a second server in this launcher shared across rounds.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    t = spec.timings
    params = RendezvousParameters("c10d", endpoint, spec.run_id, spec.min_nodes, spec.max_nodes, addr,
                                  join_timeout=t.join_s, last_call_timeout=t.last_call_s, close_timeout=t.close_s,
                                  heartbeat=t.heartbeat_s, keep_alive_interval=t.keep_alive_interval_s,
                                  keep_alive_max_attempt=t.keep_alive_max_attempt)
    return create_handler(store, C10dRendezvousBackend(store, spec.run_id), params)


def open_rendezvous(spec: JobSpec) -> Rendezvous:
    """Host or reach the job's store and stand ready for rounds (a standby store beside it, c10d)."""
    connect_s = spec.timings.join_s  # nodes start in any order: a client waits for the host to come up
    store, hosting = host_store(spec, spec.host, spec.port, spec.is_host, connect_s)
    addr = spec.local_addr or this_host()
    standby = ""
    if spec.standby:
        standby_store, standby = start_standby(addr)
        _ABANDONED.append(standby_store)  # serves for the launcher's life
    job = JobStore(spec, spec.host, spec.port)
    cls = StaticRendezvous if spec.backend == "static" else C10dRendezvous
    return cls(spec, store, hosting, job, standby)


def take_over(old: Rendezvous, host: str, port: int, hosting: bool) -> Rendezvous:
    """The same job on another store (the standby that took over): a new torch handler on it."""
    import torch.distributed as dist

    if isinstance(old, C10dRendezvous):
        old.abandon()
    store = dist.TCPStore(host, port, is_master=False, multi_tenant=True, wait_for_workers=False,
                          timeout=timedelta(seconds=old.spec.timings.read_timeout_s))
    new = type(old)(old.spec, store, hosting, JobStore(old.spec, host, port), old.standby)
    new.key, new.rounds = old.key, old.rounds
    return new


def _exchange(store, me: NodeInfo, world: int, timeout_s: float) -> tuple[tuple[NodeInfo, ...], str]:
    """Every node's description, by group rank (torch's store_util.synchronize), and the round's id: group rank 0's
    proposal (the same for every node of the round, new for every round)."""
    from torch.distributed.elastic.utils.store import synchronize

    data = json.dumps({**me.__dict__, "proposal": uuid.uuid4().hex[:12]}).encode()
    got = [json.loads(b) for b in synchronize(store, data, me.group_rank, world, "rankvisor/node/", timeout_s)]
    nodes = tuple(NodeInfo(**{k: v for k, v in d.items() if k != "proposal"}) for d in got)
    return nodes, got[0]["proposal"]


def bounded(fn: Callable[[], Any], give_up: Callable[[], BaseException | None], tick_s: float) -> Any:
    """``fn()`` on a thread of its own; returns its result or raises what it raised, unless ``give_up()`` returns
    an exception first (checked every tick), which is raised then (the thread is left to its blocked call: daemon,
    its objects kept)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="rankvisor-rdzv", daemon=True).start()
    while not done.wait(tick_s):
        why = give_up()
        if why is not None:
            raise why
    if "error" in box:
        raise box["error"]
    return box["value"]


class Interrupted(Exception):
    """A bounded store call was given up on."""


class StoreLost(Interrupted):
    """... because the store went silent, or its port refused."""


class Stopped(Interrupted):
    """... because a signal asked this node to stop."""


class Overdue(Interrupted):
    """... because its own deadline passed."""


