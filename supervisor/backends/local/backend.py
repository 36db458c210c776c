"""The local backend: worker processes are children of this supervisor on this host (the default)."""
from __future__ import annotations

import itertools
import os

from supervisor.backends.local import escalation
from supervisor.backends.local import startmethod
from supervisor.backends.local.group import WorkerGroup
from supervisor.backends.local.monitor import Monitor
from supervisor.backends.local.oomkill import OomWitness
from supervisor.backends.local.output import RankOutput
from supervisor.backends.local.process import settle_lingering
from supervisor.backends.local.reserve import Reserve
from supervisor.core import recovery
from supervisor.settings import Config


_SERIAL = itertools.count()  # supervisors started by this process: each tree's marker is its own


class LocalBackend:
    name = "local"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        preflight_shm(cfg)  # before any process starts: a layout /dev/shm cannot hold is a config error
        # Every process of this tree carries the marker in its environment (TREE_ENV): the supervisor's pid (what
        # outside tools look for) and which of this process's supervisors it belongs to.
        self.tree_marker = f"{os.getpid()}:{next(_SERIAL)}"
        self.reaper = escalation.Reaper(self.tree_marker)
        self.start_method = startmethod.resolve(cfg.runtime.start_method)
        self.ctx = startmethod.context(self.start_method, cfg.runtime.preload)
        # Orphaned grandchildren (their worker died first) come back to us, so they can be found and reaped;
        # only processes carrying our tree marker are touched (escalation.reap_orphans).
        escalation.become_subreaper()
        # Every worker's stdout/stderr, prefixed [rankN]: and copied into RUN_DIR/ranks/rankN.log
        self.output = RankOutput(cfg.logging.run_dir)
        keeper = recovery.keeper_wanted(cfg.recovery, keeps_weights(cfg.worker.cls), cfg.restart.strategy,
                                        cfg.backend)
        # The weight keeper and the warm standbys (backends/local/reserve.py); the groups' workers by group
        self.reserve = Reserve(self.ctx, self.output, self.reaper, keeper=keeper,
                               standby=recovery.standby_wanted(cfg.recovery, keeper, cfg.backend),
                               warm_up_timeout_s=cfg.runtime.startup_timeout_s,
                               delay_s=cfg.recovery.standby_delay_s, backoff_s=cfg.recovery.standby_backoff_s,
                               stop_s=(cfg.shutdown.grace_s, cfg.shutdown.reap_s))
        self.reserve.on_weights_lost = self._weights_lost
        self._groups: dict[int, WorkerGroup] = {}
        # Tells a worker the kernel's OOM killer SIGKILLed from one killed otherwise (its exit reason says which)
        self.oom = OomWitness()

    def attach_events(self, emit) -> None:
        """The lifecycle's EventLog.emit: the reserve's keeper and standbys report through it."""
        self.reserve.emit = emit

    def describe(self) -> str:
        r = self.reserve
        extra = (", weight keeper" if r.keeper_on else "") + (", warm standby" if r.standby_on else "")
        return f"start method {self.start_method}{extra}"

    def rendezvous(self, tmp_dir: str, group: int, attempt: int) -> str:
        """A private file per group attempt: no port to pick, nothing listening."""
        return "file://" + os.path.join(tmp_dir, f"g{group}-a{attempt}")

    def new_group(self, index: int, specs) -> WorkerGroup:
        c = self.cfg
        group = WorkerGroup(index, specs, self.ctx, c.transport, c.shutdown.grace_s, c.shutdown.reap_s, self.reaper,
                            self.output, self.reserve, self.oom)
        self._groups[index] = group
        return group

    def _weights_lost(self, keeper_pid: int) -> None:
        """The keeper died and the ranks' mappings died with it (core/recovery.py): kill every rank that maps its
        memory before it runs another call; the monitor reports the deaths and the restart policy acts."""
        for group in list(self._groups.values()):
            for w in group.workers:
                if w.spec.weights is not None and w.spec.weights.owner_pid == keeper_pid and w.is_alive():
                    w.killed_why = f"killed: its weight keeper (pid {keeper_pid}) died, and its weights with it"
                    w.kill()

    def new_monitor(self, on_exit, on_hung) -> Monitor:
        return Monitor(on_exit, on_hung, self.cfg.worker.heartbeat_timeout_s)

    def stop_workers(self, workers, grace_s: float, reap_s: float) -> None:
        escalation.stop(workers, grace_s, reap_s, self.reaper)

    def rank_log(self, rank: int) -> str:
        """Where global rank ``rank``'s output (and its stacks, when dumped) goes; "" without a run folder."""
        return self.output.log_path(rank)

    def close(self) -> None:
        self.reserve.close()  # the standbys, then the keeper: the last of the tree to go
        settle_lingering(self.cfg.shutdown.reap_s)  # workers whose end was read before their teardown finished
        # A last sweep, every process of the tree now gone: descendants handed to us after their group's stop swept
        # (a worker killed as the stop began is still being torn down when its status is read) go now too.
        escalation.reap_orphans(self.reaper, self.cfg.shutdown.reap_s)
        self.output.close()  # the workers are gone: what their pipes still hold is written out first
        self.oom.close()


def keeps_weights(cls_path: str) -> bool:
    """Does the worker class keep weights (define weights_key)? It was imported by the config check already."""
    from worker.base import Worker
    from worker.main import load_class

    try:
        cls = load_class(cls_path)
    except Exception:  # refused by the config check with one line; nothing to keep here
        return False
    return getattr(cls.weights_key, "__func__", None) is not Worker.weights_key.__func__


def preflight_shm(cfg: Config) -> None:
    """ConfigError (exit 2 from the CLI) if the rings of every group cannot fit in /dev/shm, or are malformed."""
    from supervisor.errors import ConfigError
    from transport.budget import Geometry, preflight

    t, par = cfg.transport, cfg.parallel
    rings = [Geometry(par.dp, par.group_world, t.slots, t.slot_bytes, ("transport.slots", "transport.slot_bytes")),
             Geometry(par.total, 1, t.reply_slots, t.reply_slot_bytes,
                      ("transport.reply_slots", "transport.reply_slot_bytes"))]
    try:
        problem = preflight(rings)
    except ValueError as exc:
        key, _, why = str(exc).partition(": ")
        raise ConfigError(key, why) from None
    if problem is not None:
        raise ConfigError("transport", problem)
