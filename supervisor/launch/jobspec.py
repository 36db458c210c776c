"""A multi-node job as rankvisor-run's flags describe it, in torchrun's spelling: how many nodes, where the rendezvous
store is, how fast a lost node is noticed. Parsed and checked once, before anything starts; each problem is one
``UsageError`` line naming the flag.

    --nnodes=N | MIN:MAX        --rdzv-backend=static (torchrun's default) | c10d
    --node-rank (static)        --rdzv-endpoint=HOST:PORT (c10d: default localhost:29400; static: the master's)
    --rdzv-id (the job's id)    --rdzv-conf=key=value,...     --master-addr / --master-port (static's store)
    --local-addr (this node's address, as the others reach it; default: its host name)

The --rdzv-conf keys are torch's (``torch.distributed.elastic.rendezvous.dynamic_rendezvous.create_handler`` and the
c10d backend's), with two defaults changed so that a round re-forms in seconds, not half a minute:
``keep_alive_interval`` 1 s (torch: 5) and ``last_call_timeout`` 1 s (torch: 30). Ours besides: ``standby``
(true: every node hosts an idle standby store, which takes over when the store's host is lost).
"""
from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass

from supervisor.errors import first_line

BACKENDS = ("static", "c10d")
C10D_DEFAULT_PORT = 29400  # torch's c10d default (rendezvous/c10d_rendezvous_backend.py)


class UsageError(Exception):
    """One line naming the flag and what is wrong with it."""


@dataclass(frozen=True)
class Timings:
    """The rendezvous's clocks, from --rdzv-conf (seconds; torch takes whole seconds for most)."""

    join_s: int = 600  # join_timeout: the first round waits this long for MIN nodes (torch's default)
    last_call_s: int = 1  # last_call_timeout: once MIN nodes joined, wait this long for more, up to MAX (torch: 30)
    close_s: int = 30  # close_timeout
    heartbeat_s: int = 5  # heartbeat: a keep-alive write may take this long
    keep_alive_interval_s: int = 1  # keep_alive_interval (torch: 5)
    keep_alive_max_attempt: int = 3  # keep_alive_max_attempt: missed keep-alives before a node counts as dead
    read_timeout_s: int = 60  # read_timeout of the store's clients

    @property
    def lost_after_s(self) -> float:
        """A node (or the store) silent this long is lost: torch's own rule for dropping a node from a round."""
        return float(self.keep_alive_interval_s * self.keep_alive_max_attempt)


@dataclass(frozen=True)
class JobSpec:
    min_nodes: int
    max_nodes: int
    nproc: int  # this node's ranks (LOCAL_WORLD_SIZE); nodes may differ
    backend: str  # static | c10d
    host: str  # the rendezvous store
    port: int
    run_id: str
    node_rank: int  # static: this node's GROUP_RANK; c10d: ignored (the rendezvous assigns it), as in torchrun
    local_addr: str  # this node as the others reach it (its ranks' MASTER_ADDR when it is group rank 0)
    is_host: bool | None  # host the store here; None: when the endpoint names this machine (torch's rule)
    standby: bool  # host an idle standby store (c10d), for when the store's host is lost
    max_restarts: int  # one budget for the whole job
    timings: Timings = Timings()

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.max_nodes

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def is_multi_node(nnodes: str) -> bool:
    lo, _, hi = nnodes.partition(":")
    return not (lo == "1" and hi in ("", "1"))


def parse(ns, nproc: int) -> JobSpec:
    """JobSpec from rankvisor-run's parsed flags (``ns``); UsageError for the first bad one."""
    lo, hi = _nnodes(ns.nnodes)
    if ns.standalone:
        raise UsageError(f"--standalone: a standalone run is one node; it cannot be combined with --nnodes={ns.nnodes}")
    if ns.rdzv_backend not in BACKENDS:
        raise UsageError(f"--rdzv-backend={ns.rdzv_backend}: rankvisor-run rendezvous through torch's "
                         f"{' or '.join(BACKENDS)} backends")
    conf = _conf(ns.rdzv_conf)
    static = ns.rdzv_backend == "static"
    endpoint = ns.rdzv_endpoint or (f"{ns.master_addr}:{ns.master_port or 29500}" if static else "")
    host, port = _endpoint(endpoint, 29500 if static else C10D_DEFAULT_PORT)
    if port == 0:
        raise UsageError(f"--rdzv-endpoint={endpoint}: needs a port every node knows, not 0")
    if static and lo != hi:
        raise UsageError(f"--nnodes={ns.nnodes}: --rdzv-backend=static runs a fixed number of nodes; "
                         "use --rdzv-backend=c10d for MIN:MAX")
    if static and not 0 <= ns.node_rank < hi:
        raise UsageError(f"--node-rank={ns.node_rank}: must be in [0, {hi}) with --nnodes={ns.nnodes}")
    is_host = conf.pop("is_host", None)
    return JobSpec(min_nodes=lo, max_nodes=hi, nproc=nproc, backend=ns.rdzv_backend, host=host, port=port,
                   run_id=ns.run_id or ns.rdzv_id, node_rank=ns.node_rank if static else 0,
                   local_addr=ns.local_addr or "", is_host=(ns.node_rank == 0) if static else is_host,
                   standby=conf.pop("standby", True) and not static, max_restarts=ns.max_restarts,
                   timings=dataclasses.replace(Timings(), **conf))


def _nnodes(value: str) -> tuple[int, int]:
    parts = value.split(":")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise UsageError(f"--nnodes={value}: must be N or MIN:MAX (whole numbers)")
    lo, hi = int(parts[0]), int(parts[-1])
    if not 0 < lo <= hi:
        raise UsageError(f"--nnodes={value}: needs 0 < MIN <= MAX")
    return lo, hi


def _endpoint(value: str, default_port: int) -> tuple[str, int]:
    """HOST[:PORT] read by torch's own parse_rendezvous_endpoint ("" = localhost, [v6]:port)."""
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        return parse_rendezvous_endpoint(value, default_port)
    except ValueError as exc:
        raise UsageError(f"--rdzv-endpoint={value}: {first_line(exc)}") from None


# --rdzv-conf key -> (Timings field or our own key, parser)
_CONF_KEYS = {
    "join_timeout": "join_s", "last_call_timeout": "last_call_s", "close_timeout": "close_s",
    "heartbeat": "heartbeat_s", "keep_alive_interval": "keep_alive_interval_s",
    "keep_alive_max_attempt": "keep_alive_max_attempt", "read_timeout": "read_timeout_s",
    "is_host": "is_host", "standby": "standby", "store_type": "store_type",
}
_BOOLS = {"1": True, "true": True, "t": True, "yes": True, "y": True,
          "0": False, "false": False, "f": False, "no": False, "n": False}


def _conf(value: str) -> dict:
    """--rdzv-conf=key=value,... into Timings fields (positive integers) and our booleans."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in _CONF_KEYS:
            raise UsageError(f"--rdzv-conf: unknown key {key!r} (known: {', '.join(_CONF_KEYS)})")
        raw = raw.strip()
        if key in ("is_host", "standby"):
            if raw.lower() not in _BOOLS:
                raise UsageError(f"--rdzv-conf: {key}={raw} is not a boolean (true/false)")
            out[key] = _BOOLS[raw.lower()]
        elif key == "store_type":
            if raw.lower() != "tcp":
                raise UsageError(f"--rdzv-conf: store_type={raw}: only tcp (a TCPStore) reaches other machines")
        elif not (sep and raw.isdigit() and int(raw) > 0):
            raise UsageError(f"--rdzv-conf: {key}={raw} must be a positive whole number of seconds")
        else:
            out[_CONF_KEYS[key]] = int(raw)
    return out


def this_host() -> str:
    """This node's name as torch's rendezvous names it (socket.getfqdn), when --local-addr is not given."""
    return socket.getfqdn()
