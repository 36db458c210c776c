"""The weight keeper: one process of the tree that loads every rank's weights once and holds them, so that a rank's
death does not take its weights with it. Every incarnation of a rank, and its warm standby, maps the keeper's copy
(worker/weights.py) instead of reading the checkpoint again.

::

    supervisor ──KeepRequest(specs)──▶ keeper: for each distinct weights_key (threads: one shard per GPU at once)
                                         Plan (dry run: the bytes) -> allocate -> build_weights(fill) -> export
               ◀──Kept(handles by rank) / KeepFailed(rank, traceback)──
    death pipe EOF ──▶ exit at once (nothing to flush: the kernel and the driver free the memory)

One keeper per tree rather than one per rank: a rank's shard is keyed by what it holds (checkpoint, dtype, TP
slice, stage, device), so dp replicas on one host (CPU) or one card map a single copy, and the supervisor watches one
more process, not one per rank. It lives in its own session like a worker and dies with the supervisor (death pipe,
PR_SET_PDEATHSIG). Why a process of its own and not the supervisor: the supervisor never initialises CUDA (a rank
must be able to fork-start, and a driver fault must not take the supervisor down).
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from worker import lifeline, output, proc_environ, session, weights
from worker.protocol import EXIT_ORPHANED

MAX_LOAD_THREADS = 8  # shards loaded at once (one per GPU); fastload reads with threads of its own besides


@dataclass(frozen=True)
class KeepRequest:
    """Keep the weights of these ranks (their WorkerSpecs); answer with one handle per rank."""

    call_id: int
    specs: tuple


@dataclass(frozen=True)
class Kept:
    call_id: int
    handles: dict  # global rank -> KeptWeights, or None where the worker class keeps nothing
    held_bytes: dict = field(default_factory=dict)  # device -> bytes the keeper holds there
    load_s: float = 0.0  # seconds this request spent loading (0 when every shard was held already)


@dataclass(frozen=True)
class KeepFailed:
    call_id: int
    rank: int  # the global rank whose shard failed to load
    exc_type: str
    message: str
    traceback: str


@dataclass
class _Shard:
    alloc: weights.Allocation
    handle: weights.KeptWeights


def entry(death_conn: Any, status_conn: Any, cmd_conn: Any, env: tuple, output_conns: tuple = ()) -> None:
    """multiprocessing target of the keeper process."""
    from worker.main import StatusChannel

    if output_conns:
        output.attach(*output_conns)
    session.leave_group()  # own session; what the caller's group was sent while we started is not ours
    proc_environ.apply(env)  # the tree marker, for anything this process forks; before any thread starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    session.release()
    watch = lifeline.DeathWatch(death_conn, 0.0, lambda: _leave(0 if watch.deliberate else EXIT_ORPHANED),
                                EXIT_ORPHANED, 0)
    watch.start()
    lifeline.arm_parent_death_signal(signal.SIGKILL)  # nothing to stop gracefully: the memory goes with us
    if not weights.legacy_ipc():
        # VMM-backed memory: a rank's import holds its own reference, so the weights outlive this process
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _with_expandable(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    _title("rankvisor-keeper")
    serve(cmd_conn, StatusChannel(status_conn))


def serve(cmd_conn: Any, status: Any) -> None:
    shards: dict[tuple, _Shard] = {}
    while True:
        try:
            req = cmd_conn.recv()
        except (EOFError, OSError):
            _leave(0)
        status.send(_answer(req, shards))


def _leave(code: int) -> None:
    """Exit at once: the memory goes with the process (the driver's and the kernel's to free); the names CUDA IPC
    made in /dev/shm do not, so they are removed first (the supervisor does it when we are killed)."""
    weights.remove_ipc_leftovers(os.getpid())
    lifeline.exit_now(code)


def _answer(req: KeepRequest, shards: dict[tuple, _Shard]) -> Kept | KeepFailed:
    from worker.main import load_class

    t0 = time.perf_counter()
    wanted: dict[int, tuple[Any, Any, tuple | None]] = {}  # global rank -> (class, spec, key)
    try:
        for spec in req.specs:
            cls = load_class(spec.worker.cls)
            wanted[spec.topology.global_rank] = (cls, spec, cls.weights_key(spec))
        missing = {key: (rank, cls, spec) for rank, (cls, spec, key) in wanted.items()
                   if key is not None and key not in shards}
        loaded = bool(missing)
        _load_all(missing, shards)
    except _ShardFailed as exc:
        return KeepFailed(req.call_id, exc.rank, type(exc.cause).__name__, str(exc.cause), exc.trace)
    except BaseException as exc:  # a worker class that cannot even say what it keeps
        return KeepFailed(req.call_id, -1, type(exc).__name__, str(exc), traceback.format_exc())
    handles = {rank: (shards[key].handle if key is not None else None) for rank, (_, _, key) in wanted.items()}
    return Kept(req.call_id, handles, _held(shards), time.perf_counter() - t0 if loaded else 0.0)


class _ShardFailed(Exception):
    def __init__(self, rank: int, cause: BaseException, trace: str) -> None:
        super().__init__(str(cause))
        self.rank, self.cause, self.trace = rank, cause, trace


def _load_all(missing: dict[tuple, tuple[int, Any, Any]], shards: dict[tuple, _Shard]) -> None:
    if not missing:
        return
    with ThreadPoolExecutor(min(MAX_LOAD_THREADS, len(missing)), thread_name_prefix="keeper-load") as pool:
        futures = {key: pool.submit(_load_one, *job, key) for key, job in missing.items()}
        for key, fut in futures.items():
            shards[key] = fut.result()  # the first failure raises _ShardFailed, naming its rank


def _load_one(rank: int, cls: Any, spec: Any, key: tuple) -> _Shard:
    try:
        device = "cpu" if spec.device == "cpu" else f"cuda:{spec.local_rank}"
        if device != "cpu":
            import torch

            torch.cuda.set_device(spec.local_rank)  # per thread: this shard's allocations land on its GPU
        plan = weights.Plan()
        cls.build_weights(spec, plan, fill=False)
        alloc = weights.allocate(plan.nbytes, device)
        arena = weights.Arena(alloc.buffer, tuple(plan.slots))
        cls.build_weights(spec, arena, fill=True)
        arena.check_complete()
        if device != "cpu":
            torch.cuda.synchronize()
        return _Shard(alloc, weights.export(key, alloc, arena.slots, device))
    except BaseException as exc:
        raise _ShardFailed(rank, exc, traceback.format_exc()) from None


def _held(shards: dict[tuple, _Shard]) -> dict[str, int]:
    out: dict[str, int] = {}
    for shard in shards.values():
        out[shard.handle.device] = out.get(shard.handle.device, 0) + shard.handle.nbytes
    return out


def _with_expandable(conf: str) -> str:
    parts = [p for p in conf.split(",") if p and not p.startswith("expandable_segments")]
    return ",".join([*parts, "expandable_segments:True"])


def _title(name: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(name)
    except ImportError:
        pass


