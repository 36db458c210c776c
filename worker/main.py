"""Entry point of a worker process: set-up, the READY handshake, the busy loop, and the way out.

::

    entry() -> fds 1 and 2 onto the supervisor's output pipes ([rankN]: prefixes, RUN_DIR/ranks; worker/output.py)
            -> own session, death watch, PDEATHSIG, env, title, logs, signals
            -> Worker(spec).init_device(), load_model()          (failure: StartupFailed on the status pipe, exit 71)
               each phase announced on the status pipe as it begins (PhaseReached: imported, init_device, load_model)
            -> reply queue created, broadcast queue attached
            -> Ready(reply handle) on the status pipe; heartbeats from now on
            -> loop: Request from the broadcast queue -> call -> Reply on the reply queue
            -> SIGTERM / STOP request / death-pipe EOF: GracefulStop -> worker.shutdown() -> exit 0

A warm standby (spec.standby) enters the same way with no broadcast queue yet: Worker(spec).warm_up() (phases
WARM_UP, STANDBY), then it waits for a Promotion on its death pipe (the failed rank's spec and the new group's
broadcast handle) and carries on from init_device() as above.

The order of the handshake is fixed by the data flow itself: the supervisor can only attach to the reply queue
once it holds the handle that READY carries, and the worker only serves after its reply queue has a reader.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any

from worker import device_faults, lifeline, output, proc_environ, session
from worker.protocol import (EXIT_DEVICE_ERROR, EXIT_ORPHANED, EXIT_SHUTDOWN_RAISED, EXIT_STARTUP_FAILED,
                             EXIT_STOP_OVERDUE, STOP_METHOD, DeviceLost, PhaseReached, Promotion, Ready,
                             RemoteFailure, Reply, Request, StartupFailed, StartupPhase)
from worker.spec import WorkerSpec


NO_GC_FREEZE_ENV = "RV_NO_GC_FREEZE"  # set (runtime.env) to measure a restart without gc.freeze(), for comparison


class GracefulStop(BaseException):
    """Raised in the main thread to stop serving (SIGTERM, a STOP request, or the death pipe closing)."""


class StatusChannel:
    """The worker -> supervisor pipe: framed pickles, and empty frames as heartbeats. Thread-safe."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, obj: Any) -> None:
        self._send(pickle.dumps(obj))

    def beat(self) -> None:
        self._send(b"")

    def _send(self, payload: bytes) -> None:
        with self._lock:
            try:
                self.conn.send_bytes(payload)
            except OSError:  # the supervisor is gone: the death watch takes care of us
                pass


class Heartbeat(threading.Thread):
    def __init__(self, status: StatusChannel, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.status, self.interval_s = status, interval_s
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.status.beat()


_stopping = threading.Event()


def _request_stop(*_: Any) -> None:
    """SIGTERM handler: stop once; a second SIGTERM while stopping is ignored (the supervisor escalates)."""
    if not _stopping.is_set():
        _stopping.set()
        raise GracefulStop()


def entry(spec: WorkerSpec, bcast_handle: Any, death_conn: Any, status_conn: Any, close_fds: tuple = (),
          output_conns: tuple = ()) -> None:
    """multiprocessing target. Never returns normally before the worker is told to stop. ``output_conns``: the
    (stdout, stderr, stacks) pipe ends the supervisor reads (worker/output.py); empty = inherit the parent's."""
    t0 = time.monotonic()
    if not dict(spec.env).get(NO_GC_FREEZE_ENV):
        # Everything inherited from the forkserver (torch, preloaded) goes to the permanent generation: our first
        # full collection would otherwise walk that whole heap and copy-on-write fault its pages -- ~150 ms of every
        # restart, measured by scripts/bench_restart.py. The move itself touches no object.
        gc.freeze()
    if output_conns:
        output.attach(*output_conns)
    _detach(close_fds)
    _apply_environment(spec)  # before any thread starts (proc_environ.publish needs it so)
    status = StatusChannel(status_conn)
    main_ident = threading.get_ident()
    watch = lifeline.DeathWatch(death_conn, spec.worker.orphan_grace_s,
                                lambda: signal.pthread_kill(main_ident, signal.SIGTERM), EXIT_ORPHANED,
                                EXIT_STOP_OVERDUE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    try:
        signal.signal(signal.SIGTERM, _request_stop)  # from here on a SIGTERM is a graceful stop, at any point
        session.release()  # the signals held since the supervisor started us (worker/session.py)
        _plain_python_children()
        watch.start()
        lifeline.arm_parent_death_signal(signal.SIGTERM)
        _setup_environment(spec)
        report = _phase_reporter(status, spec.topology.rank, t0)
        worker = None
        if spec.standby:
            worker, promotion = _stand_by(spec, watch, report)
            spec, bcast_handle = promotion.spec, promotion.bcast_handle
        worker, bcast, reply = _start(spec, bcast_handle, report, worker)
    except GracefulStop:
        _leave(0, outsider=not watch.told())
    except BaseException as exc:
        status.send(StartupFailed(spec.topology.rank, type(exc).__name__, str(exc), traceback.format_exc()))
        status_conn.close()
        os._exit(EXIT_STARTUP_FAILED)
    try:
        status.send(Ready(spec.topology.rank, os.getpid(), reply.export_handle(), str(worker.device),
                          time.monotonic() - t0))
        Heartbeat(status, spec.worker.heartbeat_interval_s).start()
    except GracefulStop:
        pass  # stopped the moment READY was out (a group stopped right after it started): _serve stops at once
    _serve(spec, worker, bcast, reply, status, watch)


def _detach(close_fds: tuple) -> None:
    """Own session (so the supervisor can signal our whole tree, and a terminal's Ctrl-C does not reach us); what
    was sent to the supervisor's process group before we left it is dropped (worker/session.py)."""
    for fd in close_fds:  # fork start method only: descriptors of the parent that must not stay open here
        try:
            os.close(fd)
        except OSError:
            pass
    session.leave_group()
    # the supervisor asks for our stacks on a hang (and on its own SIGUSR1): into our log, not onto the console
    faulthandler.register(signal.SIGUSR1, file=output.stacks(), all_threads=True)


def _plain_python_children() -> None:
    """Processes the user's code starts from a rank are made as under plain Python or torchrun. multiprocessing's
    default start method is Python's own (fork on Linux before 3.14): a process started by a context keeps that
    context as its default, so a rank defaulted to our forkserver (or spawn), and a DataLoader over a Dataset
    defined in a function failed to pickle it. How the supervisor starts ranks (runtime.start_method) is apart.
    And a process the rank forks gets the default SIGTERM back (_plain_sigterm)."""
    import multiprocessing

    multiprocessing.set_start_method(None, force=True)  # None: back to the platform's default
    os.register_at_fork(after_in_child=_plain_sigterm)


def _plain_sigterm() -> None:
    """In a process the worker forks (a multiprocessing child, a DataLoader worker): SIGTERM ends it, as in a
    child of plain Python. Our handler would raise GracefulStop there, a traceback from a process that is not us."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: Python sets no handlers there
        pass


def _apply_environment(spec: WorkerSpec) -> None:
    """The spec's variables (the tree marker among them) into os.environ, and into what /proc shows of our
    environment, so that every process we fork carries the marker too, not only those that exec."""
    proc_environ.apply(spec.env)


def _setup_environment(spec: WorkerSpec) -> None:
    """Environment before torch is imported (spawn) or re-applied where it was preloaded (forkserver)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        import setproctitle

        setproctitle.setproctitle(spec.topology.name)
    except ImportError:
        pass
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=spec.log_level,
               format="{time:HH:mm:ss.SSS} | {level: <7} | " + spec.topology.name + " | {message}")


def _phase_reporter(status: StatusChannel, rank: int, t0: float):
    return lambda phase: status.send(PhaseReached(rank, phase.value, time.monotonic() - t0))


def _stand_by(spec: WorkerSpec, watch: lifeline.DeathWatch, report) -> tuple[Any, Promotion]:
    """A warm standby: prepare what needs no world, then wait to be promoted into one."""
    cls = load_class(spec.worker.cls)
    report(StartupPhase.IMPORTED)
    worker = cls(spec)
    report(StartupPhase.WARM_UP)
    worker.warm_up()
    report(StartupPhase.STANDBY)
    promotion = watch.wait_promotion()
    worker.adopt(promotion.spec)
    return worker, promotion


def _start(spec: WorkerSpec, bcast_handle: Any, report=lambda phase: None, worker: Any = None):
    from transport import MessageQueue

    if worker is None:
        cls = load_class(spec.worker.cls)
        report(StartupPhase.IMPORTED)
        worker = cls(spec)
    report(StartupPhase.INIT_DEVICE)
    worker.init_device()
    report(StartupPhase.LOAD_MODEL)
    worker.load_model()
    t = spec.transport
    reply = MessageQueue(1, t.reply_slot_bytes, t.reply_slots, t.spin_us, t.max_message_bytes, spin_yield=t.spin_yield)
    bcast = MessageQueue.create_from_handle(bcast_handle, spec.topology.rank)
    return worker, bcast, reply


def load_class(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(spec: WorkerSpec, worker: Any, bcast: Any, reply: Any, status: StatusChannel,
           watch: lifeline.DeathWatch) -> None:
    from loguru import logger

    from transport import QueueClosed, PeerDied

    code, by_signal = 0, False
    try:
        if _stopping.is_set():
            raise GracefulStop()  # SIGTERM arrived before we got here
        reply.wait_until_ready(timeout=spec.worker.heartbeat_timeout_s * 4)
        calls = 0
        while True:
            req = bcast.dequeue()
            if req.method == STOP_METHOD:
                break
            calls += 1
            out = _call(worker, req, spec)
            if req.reply_rank is None or req.reply_rank == spec.topology.rank:
                _send_reply(reply, req.call_id, out, _over_budget(spec, calls), spec.topology.rank)
            if not out[0] and out[1].fatal:
                _leave_for_device(status, out[1])
    except GracefulStop:
        by_signal = True
    except (QueueClosed, PeerDied) as exc:
        logger.info(f"request queue ended ({exc}); stopping")
    _stopping.set()
    try:
        worker.shutdown()
    except GracefulStop:
        pass
    except BaseException as exc:  # a failing shutdown must not hide that we were asked to stop
        logger.warning(f"shutdown raised {type(exc).__name__}: {exc}")
        code = EXIT_SHUTDOWN_RAISED
    outsider = by_signal and not watch.told()
    if not outsider:  # a reader's close ends the queue for every rank: what the group does is the supervisor's call
        bcast.close()
    reply.close()
    _leave(code, outsider)


def _leave(code: int, outsider: bool) -> None:
    """Exit after a stop. Asked by the supervisor (a STOP request, a stop message or EOF on the death pipe), a clean
    stop is exit 0. A SIGTERM from anyone else (``kill PID``, systemd stopping every process of the unit) ends us
    by SIGTERM, so that the supervisor reads the true cause rather than a clean stop it never asked for."""
    if code == 0 and outsider:
        lifeline.die_like(-signal.SIGTERM)
    lifeline.kill_descendants()
    os._exit(code)


def _leave_for_device(status: StatusChannel, failure: RemoteFailure) -> None:
    """Every later call here would fail too, and a graceful shutdown may hang on the broken context: say why on the
    status pipe (the exit reason names it) and leave now -- the reply, marked fatal, is already out -- so the
    supervisor's policy replaces this rank."""
    status.send(DeviceLost(failure.rank, failure.exc_type, failure.cause))
    lifeline.exit_now(EXIT_DEVICE_ERROR)


def _call(worker: Any, req: Request, spec: WorkerSpec) -> tuple[bool, Any]:
    return dispatch(worker, req.method, req.args, req.kwargs, spec.topology.rank, spec.worker.empty_cache_on_oom)


def dispatch(worker: Any, method: Any, args: tuple, kwargs: dict | None, rank: int,
             release_on_oom: bool = True) -> tuple[bool, Any]:
    """Run one call on the worker: (True, result) or (False, RemoteFailure with the traceback). The failure is
    ``fatal`` when it left the device unusable (worker/device_faults.py). After CUDA ran out of memory, with
    ``release_on_oom``, the blocks the failed call had allocated go back to the driver, so the device's memory is
    back at its level before the call and the same process serves the next one."""
    try:
        if isinstance(method, str):
            return True, getattr(worker, method)(*args, **(kwargs or {}))
        import cloudpickle

        return True, cloudpickle.loads(method)(worker, *args, **(kwargs or {}))
    except GracefulStop:
        raise
    except BaseException as exc:
        failure = RemoteFailure(rank, type(exc).__name__, str(exc), traceback.format_exc(),
                                device_faults.is_fatal(exc))
        out_of_memory = device_faults.is_out_of_memory(exc)
    if out_of_memory and release_on_oom:  # out of the except block: the failed call's frames (and tensors) are gone
        device_faults.release_cached_memory()
    return False, failure


def _send_reply(reply: Any, call_id: int, out: tuple[bool, Any], over: bool, rank: int) -> None:
    try:
        reply.enqueue(Reply(call_id, out[0], out[1], over))
    except GracefulStop:
        raise
    except Exception as exc:  # an unpicklable result: the call fails, the worker keeps serving
        failure = RemoteFailure(rank, type(exc).__name__, f"cannot send the result back: {exc}", traceback.format_exc())
        reply.enqueue(Reply(call_id, False, failure, over))


def _over_budget(spec: WorkerSpec, calls: int) -> bool:
    w = spec.worker
    if w.max_calls and calls >= w.max_calls:
        return True
    if w.max_rss_mb:
        import psutil

        return psutil.Process().memory_info().rss > w.max_rss_mb * (1 << 20)
    return False
