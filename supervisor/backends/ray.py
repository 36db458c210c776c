"""The Ray backend: one Ray actor per rank, placed through a placement group, behind the same API, configuration,
restart policy and events as the local process tree.

::

    supervisor ── placement group (one bundle per rank, +1 GPU each with device=cuda; PACK keeps a TP group on a node)
       │            └─ RankActor(rank r): worker.init_device() with tcp:// rendezvous on rank 0's node, load_model()
       ├─ RayChannel: collective_rpc -> actor.call.remote(...) for every rank, results gathered with ray.wait
       └─ RayMonitor: one never-returning `watch` call per actor; it resolves with RayActorError when the actor
                      (or its node) dies -> the same on_exit -> policy path as a local worker's sentinel

Ray's own actor restarts are off (max_restarts=0): our policy decides. A stopped or given-up group's placement group
is removed. Differences from the local backend: requests travel through Ray's object store, not the shared-memory
rings; hang detection relies on per-call deadlines (no heartbeat pipe); escalation is ray.kill, Ray reaps.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import os
import socket
import threading
import time
from typing import Any

from loguru import logger

from supervisor.errors import CallTimeout, RemoteError, RpcTimeout, StartupError, WorkerFailed
from supervisor.core.exits import ExitInfo
from supervisor.settings import Config
from supervisor.core.states import GroupState, WorkerState
from worker.protocol import RemoteFailure

_POLL_S = 0.05  # ray.wait slices: a failure or a shutdown is noticed this fast


def _ray():
    import ray

    return ray


class RankActor:
    """Runs inside a Ray worker process: one rank of one group (wrapped with ray.remote by RayBackend)."""

    def __init__(self, spec) -> None:
        for key, value in spec.env:
            os.environ[key] = value
        self.spec = spec
        self.worker = None

    def address(self) -> tuple[str, int]:
        """This node's address and a free port for the group's torch.distributed rendezvous (rank 0 only)."""
        ip = _ray().util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def start(self, rendezvous: str) -> int:
        from worker.main import load_class

        spec = dataclasses.replace(self.spec, rendezvous=rendezvous)
        self.worker = load_class(spec.worker.cls)(spec)
        self.worker.init_device()
        self.worker.load_model()
        return os.getpid()

    def call(self, method: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        from worker.main import dispatch

        return dispatch(self.worker, method, args, kwargs, self.spec.topology.rank)

    def watch(self) -> None:
        threading.Event().wait()  # never returns: resolves with RayActorError when this actor dies

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


class Death(enum.Enum):
    """How an actor ended, as far as the supervisor can know it."""

    STOPPED = "stopped"  # we asked it to stop and it did (or was killed after the grace): a clean end
    KILLED = "killed by the supervisor"
    DIED = "died"  # Ray reported the actor (or its node) dead: the cause is kept beside it


class RayWorker:
    """The handle of one rank's actor (the WorkerHandle contract of supervisor/backends/base.py)."""

    def __init__(self, spec, actor) -> None:
        self.spec, self.actor = spec, actor
        self.rank = spec.topology.rank
        self.pid = 0
        self.state = WorkerState.STARTING
        self.hung = False
        self._death: Death | None = None
        self._cause = ""

    def transition(self, new: WorkerState) -> None:
        self.state = self.state.to(new, f"rank {self.rank}")

    def settle(self) -> None:
        self.state = self.state.settle(self.exit_info().clean, f"rank {self.rank}")

    def mark_dead(self, death: Death, cause: str = "") -> None:
        if self._death is None:
            self._death, self._cause = death, cause or death.value

    def is_alive(self) -> bool:
        return self._death is None

    def exit_info(self) -> ExitInfo:
        if self._death is None:
            return ExitInfo(None)
        if self._death is Death.STOPPED:
            return ExitInfo(0, hung=self.hung)
        return ExitInfo(-9, hung=self.hung, detail=self._cause)

    def kill(self) -> None:
        try:
            _ray().kill(self.actor, no_restart=True)
        except Exception:
            pass
        self.mark_dead(Death.KILLED)

    def dump_stack(self) -> None:
        """Remote stacks: see `ray stack` on the actor's node; nothing to signal from here."""

    def psutil_process(self):
        return None  # possibly on another node


class RayCall(concurrent.futures.Future):
    """One call to one group's actors, as the Future Ray completes (``ObjectRef.future()`` callbacks): the values
    by rank, or the error. Same face as the local PendingCall: ``drive(timeout)`` / ``result(timeout)`` raise
    CallTimeout when the caller's wait runs out; a sent call runs, so ``cancel()`` returns False."""

    def __init__(self, channel: "RayChannel", refs, expected, method_name, deadline_s: float | None) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self.channel, self.refs, self.expected, self.method_name = channel, refs, expected, method_name
        self.deadline_s = deadline_s
        self.expires_at = None if deadline_s is None else time.monotonic() + deadline_s
        self._left = set(expected)
        self._lock = threading.Lock()

    def watch(self) -> None:
        for r in self.expected:
            self.refs[r].future().add_done_callback(lambda _f, r=r: self._answered(r))

    def _answered(self, r: int) -> None:
        with self._lock:
            self._left.discard(r)
            last = not self._left
        if last:
            self.channel.complete(self)

    def missing(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._left))

    @property
    def outcome(self) -> tuple[bool, Any] | None:
        """(ok, value or error) once decided, as the local PendingCall has it (CallFuture reads parts this way)."""
        if not self.done():
            return None
        error = super().exception(0)
        return (True, super().result(0)) if error is None else (False, error)

    def result(self, timeout: float | None = None) -> Any:
        self.drive(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.drive(timeout)
        return super().exception(0)

    def drive(self, timeout: float | None) -> None:
        if not concurrent.futures.wait([self], timeout).done:
            missing = self.channel.global_ranks(self.missing())
            raise CallTimeout(f"{self.method_name}: no answer within the caller's timeout of {timeout:.3g} s "
                              f"(ranks {list(missing)} still working; they are left alone)", missing)

    def settle_outcome(self, ok: bool, value: Any) -> None:
        try:
            self.set_result(value) if ok else self.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # decided already (a failure or a deadline came first)


class RayChannel:
    """The Channel contract of supervisor/backends/base.py over Ray actor calls. Calls complete from Ray's own
    callback threads; call deadlines are watched by one thread that exists while calls with one are in flight."""

    def __init__(self, workers: list[RayWorker], rank_offset: int) -> None:
        self.workers = workers
        self.rank_offset = rank_offset
        self.on_deadline = None  # (global ranks, why): the lifecycle declares them hung
        self.failure: WorkerFailed | None = None
        self.over_budget = False
        self._inflight: dict[int, RayCall] = {}  # sent, not decided: settle() and fail() look here
        self._cond = threading.Condition()
        self._watcher: threading.Thread | None = None

    def send(self, method, args, kwargs, reply_rank, timeout, method_name, deadline_s: float | None = None,
             detached: bool = False) -> RayCall:
        if self.failure is not None:
            raise self.failure
        refs = [w.actor.call.remote(method, args, kwargs or {}) for w in self.workers]  # a collective: all ranks
        expected = tuple(range(len(refs))) if reply_rank is None else (reply_rank,)
        call = RayCall(self, refs, expected, method_name, deadline_s)
        with self._cond:
            self._inflight[id(call)] = call
            if call.expires_at is not None and self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_deadlines, name="ray-deadlines", daemon=True)
                self._watcher.start()
            self._cond.notify_all()
        call.watch()
        return call

    def wait(self, call: RayCall, timeout: float | None) -> list[Any]:
        try:
            return call.result(timeout)
        except CallTimeout:
            self.abandon(call)
            raise

    def abandon(self, call: RayCall) -> None:
        """The caller stopped waiting: a call with a deadline stays watched; its result is dropped either way."""
        if call.expires_at is None:
            with self._cond:
                self._inflight.pop(id(call), None)

    def settle(self, timeout: float) -> bool:
        """Results of finished calls live in the object store, owned by us: stopping the actors loses none once
        every call in flight has finished. Wait for that."""
        with self._cond:
            calls = list(self._inflight.values())
        return not concurrent.futures.wait(calls, timeout).not_done

    def complete(self, call: RayCall) -> None:
        """Every expected rank answered (Ray's callback thread): decide the call."""
        with self._cond:
            self._inflight.pop(id(call), None)
        try:
            call.settle_outcome(True, [self._unwrap(call, r) for r in call.expected])
        except BaseException as exc:
            call.settle_outcome(False, exc)

    def _unwrap(self, call: RayCall, r: int) -> Any:
        ray = _ray()
        try:
            ok, value = ray.get(call.refs[r])
        except ray.exceptions.RayActorError as exc:
            raise self.failure or WorkerFailed(f"rank {self.rank_offset + r}: actor died during {call.method_name}: "
                                               f"{str(exc).splitlines()[0]}", (self.rank_offset + r,)) from None
        if not ok:
            f: RemoteFailure = value
            raise RemoteError(self.rank_offset + f.rank, f.exc_type, f.message, f.traceback)  # f.rank: group-local
        return value

    def _watch_deadlines(self) -> None:
        """Fail calls whose deadline passed, naming the ranks that did not answer, and hand those to on_deadline."""
        while True:
            with self._cond:
                times = [c.expires_at for c in self._inflight.values() if c.expires_at is not None]
                if not times or self.failure is not None:
                    self._watcher = None
                    return
                now = time.monotonic()
                due = [c for c in self._inflight.values() if c.expires_at is not None and c.expires_at <= now]
                for c in due:
                    self._inflight.pop(id(c), None)
                if not due:
                    self._cond.wait(min(times) - now)
                    continue
            for call in due:
                missing = self.global_ranks(call.missing())
                why = f"missed the call deadline of {call.deadline_s:g} s ({call.method_name})"
                call.settle_outcome(False, RpcTimeout(f"{call.method_name}: ranks {list(missing)} {why}; "
                                                      "declared hung", missing))
                if missing and self.on_deadline is not None:
                    self.on_deadline(missing, why)

    def global_ranks(self, ranks) -> tuple[int, ...]:
        return tuple(self.rank_offset + r for r in ranks)

    def send_stop(self) -> None:
        pass  # stop_workers asks every actor to stop, then kills it

    def fail(self, error: WorkerFailed) -> None:
        if self.failure is None:
            self.failure = error
        with self._cond:
            calls = list(self._inflight.values())
            self._inflight.clear()
            self._cond.notify_all()
        for call in calls:
            call.settle_outcome(False, self.failure)

    def close(self) -> None:
        self.fail(self.failure or WorkerFailed("the group stopped before answering"))


class RayGroup:
    """One TP×PP world of actors in one placement group."""

    def __init__(self, backend: "RayBackend", index: int, specs) -> None:
        self.backend, self.index, self.specs = backend, index, list(specs)
        self.world = len(self.specs)
        self.rank_offset = index * self.world
        self.state = GroupState.STARTING
        self.workers: list[RayWorker] = []
        self.channel: RayChannel | None = None
        self.pg = None
        self.ready_at: float | None = None

    def transition(self, new: GroupState) -> None:
        self.state = self.state.to(new, f"group {self.index}")

    def start(self, timeout_s: float, abort: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            self._place(deadline, abort)
            first = self.workers[0].actor.address.remote()
            ip, port = self._get(first, 0, deadline, abort)
            refs = [w.actor.start.remote(f"tcp://{ip}:{port}") for w in self.workers]
            for r, ref in enumerate(refs):
                self.workers[r].pid = self._get(ref, r, deadline, abort)
        except BaseException:
            self.backend.stop_workers(self.workers, 0.0, 0.0)
            self.finish_stop()
            raise
        self.channel = RayChannel(self.workers, self.rank_offset)
        for w in self.workers:
            w.transition(WorkerState.READY)
        self.ready_at = time.monotonic()
        self.transition(GroupState.READY)

    def _place(self, deadline: float, abort) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.backend.cfg
        bundle = {"CPU": cfg.ray.cpus_per_rank}
        if self.specs[0].device == "cuda":
            bundle["GPU"] = 1
        self.pg = placement_group([dict(bundle) for _ in self.specs], strategy=cfg.ray.placement_strategy)
        self._get(self.pg.ready(), None, deadline, abort, what="placement group")
        for i, spec in enumerate(self.specs):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)
            actor = self.backend.actor_cls.options(
                num_cpus=cfg.ray.cpus_per_rank, num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy,
                max_restarts=0, runtime_env=self.backend.runtime_env,
                name=f"rankvisor-{os.getpid()}-g{self.index}-a{spec.attempt}-r{spec.topology.rank}",
            ).remote(spec)
            self.workers.append(RayWorker(spec, actor))

    def _get(self, ref, rank: int | None, deadline: float, abort, what: str = "start-up") -> Any:
        ray = _ray()
        while True:
            if abort is not None and abort.is_set():
                raise StartupError("start-up aborted: the supervisor is shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                who = f"rank {self.rank_offset + rank}" if rank is not None else what
                raise StartupError(f"{who} did not become READY within the start-up timeout "
                                   "(runtime.startup_timeout_s)", None if rank is None else self.rank_offset + rank)
            ready, _ = ray.wait([ref], timeout=min(remaining, _POLL_S))
            if ready:
                return self._result(ref, rank)

    def _result(self, ref, rank: int | None) -> Any:
        ray = _ray()
        g = None if rank is None else self.rank_offset + rank
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise StartupError(f"rank {g} failed during start-up: {type(cause).__name__}: {cause}", g,
                               str(exc)) from None
        except ray.exceptions.RayActorError as exc:
            raise StartupError(f"rank {g} died during start-up: {str(exc).splitlines()[0]}", g) from None

    def stop(self, graceful: bool = True) -> None:
        if self.state is GroupState.STOPPED:
            return
        self.state = self.state.towards(GroupState.STOPPING, f"group {self.index}")
        c = self.backend.cfg.shutdown
        self.backend.stop_workers(self.workers, c.grace_s if graceful else 0.0, c.reap_s)
        self.finish_stop()

    def finish_stop(self) -> None:
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        for w in self.workers:
            w.settle()
        self.state = self.state.towards(GroupState.STOPPED, f"group {self.index}")


class RayMonitor(threading.Thread):
    """Actor death through Ray: each actor has one `watch` call in flight, which only ever fails."""

    def __init__(self, on_exit, on_hung) -> None:
        super().__init__(name="supervisor-ray-monitor", daemon=True)
        self.on_exit, self.on_hung = on_exit, on_hung
        self._lock = threading.Lock()
        self._refs: dict[Any, tuple[Any, RayWorker]] = {}
        self._stopped = threading.Event()

    def watch(self, group, workers) -> None:
        with self._lock:
            for w in workers:
                self._refs[w.actor.watch.options(concurrency_group="watch").remote()] = (group, w)

    def unwatch(self, workers) -> None:
        gone = {id(w) for w in workers}
        with self._lock:
            for ref in [r for r, (_, w) in self._refs.items() if id(w) in gone]:
                del self._refs[ref]

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)

    def run(self) -> None:
        ray = _ray()
        while not self._stopped.is_set():
            with self._lock:
                refs = list(self._refs)
            if not refs:
                self._stopped.wait(_POLL_S)
                continue
            try:
                ready, _ = ray.wait(refs, num_returns=1, timeout=_POLL_S)
            except Exception:  # Ray shutting down under us
                self._stopped.wait(_POLL_S)
                continue
            self._report([r for r in ready])

    def _report(self, ready) -> None:
        ray = _ray()
        by_group: dict[int, tuple[Any, list[RayWorker]]] = {}
        with self._lock:
            entries = [self._refs.pop(r) for r in ready if r in self._refs]
        for ref, (group, w) in zip(ready, entries):
            try:
                ray.get(ref)
                cause = "actor returned from watch"
            except Exception as exc:
                cause = f"actor died ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            w.mark_dead(Death.DIED, cause)
            by_group.setdefault(id(group), (group, []))[1].append(w)
        for group, workers in by_group.values():
            self.on_exit(group, workers)


class RayBackend:
    name = "ray"
    tree_marker = ""  # Ray's processes are Ray's to reap: nothing of ours to mark

    def __init__(self, cfg: Config) -> None:
        ray = _ray()
        self.cfg = cfg
        self._description: str | None = None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=cfg.ray.address or None, include_dashboard=False, log_to_driver=True,
                     logging_level="WARNING")
        # Workers import our packages: put this checkout on their path (on a real cluster, install rankvisor on
        # every node; the path is then harmless).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        self.runtime_env = {"env_vars": {"PYTHONPATH": path}}
        # Calls run one at a time (collectives must keep their order); `watch` sits in a group of its own.
        self.actor_cls = ray.remote(concurrency_groups={"watch": 1}, max_concurrency=1)(RankActor)

    def describe(self) -> str:
        if self._description is None:  # kept: it is also asked for after Ray was shut down
            nodes = [n for n in _ray().nodes() if n.get("Alive")]
            self._description = f"{len(nodes)} Ray node(s), placement {self.cfg.ray.placement_strategy}"
        return self._description

    def rendezvous(self, tmp_dir: str, group: int, attempt: int) -> str:
        return ""  # chosen at start: rank 0's node address and a free port there

    def new_group(self, index: int, specs) -> RayGroup:
        return RayGroup(self, index, specs)

    def new_monitor(self, on_exit, on_hung) -> RayMonitor:
        return RayMonitor(on_exit, on_hung)

    def stop_workers(self, workers, grace_s: float, reap_s: float) -> None:
        """Ask every live actor to stop (bounded by grace), then kill them all; Ray reaps the processes."""
        ray = _ray()
        live = [w for w in workers if w.is_alive()]
        if grace_s > 0 and live:
            refs = [w.actor.stop.remote() for w in live]
            ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        for w in workers:
            stopped = w.is_alive()
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:
                pass
            if stopped:
                w.mark_dead(Death.STOPPED)

    def close(self) -> None:
        self.describe()
        if self._owns_ray:
            try:
                _ray().shutdown()
            except Exception as exc:
                logger.warning(f"ray.shutdown failed: {exc}")
