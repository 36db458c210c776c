"""The Python API, with the names vLLM users know from its multiprocessing executor.

    with Supervisor(cfg) as sup:
        out = sup.execute_model(x)                       # output of the first TP rank of the last PP stage
        ranks = sup.collective_rpc("ping")                # every rank's answer, ordered by global rank
        fut = sup.collective_rpc(fn, non_block=True)      # a callable receives the worker as first argument
        sup.register_failure_callback(lambda: ...)
        sup.check_health(); sup.status()
    # shutdown() on exit; idempotent

Global rank = dp_rank * (tp * pp) + pp_rank * tp + tp_rank.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import threading
import time
import weakref
from typing import Any, Callable

import psutil

from supervisor.errors import GpuUnhealthy, ShutdownInProgress, WorkerFailed
from supervisor.gpu_health import GpuHealth, GpuReading, RankPlace, rank_place
from supervisor.core.events import EventLog
from supervisor.core.gate import Closed
from supervisor.backends.base import Group as WorkerGroup
from supervisor.core.states import GroupState
from supervisor.backends import make_backend
from supervisor.core.lifecycle import Lifecycle, Outcome, Planned, RollingRestart
from supervisor.core.retry import LifecycleView, RetryingCall, RetryPolicy, RetryStats
from supervisor.core.states import SupervisorState
from supervisor.core.views import GroupView, PolicyWindow, group_view
from supervisor.observe.calls import CallStats
from supervisor.core.rpc import _PICKLE_ERRORS, CallFuture, PendingCall, any_from_main, by_value
from supervisor.settings import Config

_POLL_S = 0.05  # rolling_restart() checks this often whether the tree stopped while it waits
# Process-wide on purpose, as interpreter exit is: at exit every supervisor still running is stopped, and the
# trees of supervisors collected without shutdown() are waited for (weak sets: they keep nothing alive).
_LIVE: "weakref.WeakSet[Supervisor]" = weakref.WeakSet()
_ABANDONED: "weakref.WeakSet[Lifecycle]" = weakref.WeakSet()  # trees of collected supervisors, still stopping


class Supervisor:
    def __init__(self, cfg: Config | None = None, *, events: EventLog | None = None, start: bool = True,
                 endpoints: bool = True) -> None:
        """``endpoints``: serve control.sock and HTTP as the command does when ``http.when`` asks for HTTP
        (supervisor/observe/embedded.py); the command serves its own and passes False."""
        self.cfg = cfg or Config()
        self._serve_endpoints = endpoints
        self._embedded: Any = None  # observe.embedded.Embedded while the endpoints are up
        self.events = events or EventLog(self.cfg.logging.run_dir if self.cfg.logging.events else "")
        self._life = Lifecycle(self.cfg, self.events, make_backend(self.cfg))
        self._rr = itertools.count()
        self._cpu_samples: dict[tuple[int, float], tuple[float, float]] = {}  # status(): (pid, start) -> (cpu s, t)
        self.calls = CallStats()  # calls in flight and done, for status views and metrics (supervisor/observe)
        self._shutdown_lock = threading.Lock()
        self.world = self.cfg.parallel.group_world
        self.retry_stats = RetryStats()  # retried calls, per group they moved away from (status: "retried")
        # The tree as retries and request serving see it: live(), serving(g), incarnation(g), final_error(name)
        self.serving_view = LifecycleView(self._life, lambda: self.gave_up)
        # Multi-call requests (a generation) admitted per group: a rolling restart or a drain waits for them
        # (supervisor/core/requests.py); supervisor/serving.py admits each request it runs.
        self.requests = self._life.requests
        # GPU health from NVML (ECC errors, retired pages, remapped rows, throttle reasons): check_health, status()
        self.gpu_health = GpuHealth(self.cfg.gpu.health, self.cfg.gpu.health_ttl_s)
        _LIVE.add(self)
        # Garbage collection without shutdown() must not leave the tree running; interpreter exit is _LIVE's job.
        weakref.finalize(self, _abandoned, self._life).atexit = False
        if start:
            self.start()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every group; raises StartupError (naming the rank, with its remote traceback) on failure."""
        try:
            if self._serve_endpoints and self._embedded is None:  # up during start-up too, as the command's
                from supervisor.observe.embedded import embed

                self._embedded = embed(self)
            self._life.start()
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self, drain: bool | float | None = None) -> None:
        """Stop every worker and its descendants (graceful, then SIGKILL at the grace deadline). Idempotent.

        ``drain``: True (up to ``shutdown.drain_s``) or a number of seconds: new calls are refused at once with
        ShutdownInProgress and calls in flight may finish first; False/0 cuts a drain under way short; None (the
        default) asks for none, but lets one already under way (a first SIGTERM) finish."""
        with self._shutdown_lock:
            life = self._life
            if not life.thread.is_alive() and not life.started.is_set():
                life.monitor.stop()
                self._close_endpoints()
                return
            life.request_shutdown(self._drain_seconds(drain))
            if threading.current_thread() is life.thread:
                return  # called from a failure callback: the manager stops right after it
            life.finished.wait(timeout=life.teardown_bound_s() + life.drain_s)
            self._close_endpoints()
            self.events.close()

    def _close_endpoints(self) -> None:
        if self._embedded is not None:
            self._embedded.close()
            self._embedded = None

    @property
    def endpoints(self) -> Any:
        """What other processes reach this tree through (control.sock, HTTP: ``.run_dir``, ``.url``), when
        ``http.when`` asks for them; None otherwise, and after shutdown()."""
        return self._embedded.endpoints if self._embedded is not None else None

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- lifecycle views --------------------------------------------------------------------------------------
    @property
    def state(self) -> SupervisorState:
        return self._life.state

    @property
    def outcome(self) -> Outcome:
        """How the run ended (``Ending.RUNNING`` while it has not): ending, the error if it gave up, restarts."""
        return self._life.outcome

    @property
    def error(self) -> BaseException | None:
        """Why the supervisor gave up (None while healthy or after a clean stop)."""
        return self.outcome.error

    @property
    def gave_up(self) -> bool:
        return self.outcome.gave_up

    @property
    def stopping(self) -> bool:
        """A stop was asked for (or the tree gave up): no new call will be accepted."""
        return self._life.stop_requested.is_set() or self._life.state is not SupervisorState.RUNNING \
            and self._life.started.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the supervisor has stopped (by shutdown or by giving up). False on timeout."""
        return self._life.finished.wait(timeout)

    @property
    def finished(self) -> threading.Event:
        """Set once the tree has stopped. It holds no reference to the Supervisor: it can still be waited on
        after the Supervisor itself was dropped (its tree is then stopped for it)."""
        return self._life.finished

    @property
    def device(self) -> str:
        """The device the workers use, as resolved ("cpu" or "cuda")."""
        return self._life.device

    def describe_backend(self) -> str:
        """The backend's name and what it runs on, e.g. "local backend, start method forkserver"."""
        backend = self._life.backend
        return f"{backend.name} backend, {backend.describe()}"

    @property
    def live_groups(self) -> list[int]:
        """The dp groups the restart policy still supervises (a temporary child that ended is removed)."""
        return list(self._life.live)

    def groups(self) -> list[GroupView]:
        """A snapshot of every dp group: state, serving, attempts, restarts, and its workers."""
        return [group_view(self._life, i) for i in range(self.cfg.parallel.dp)]

    def serving(self, group: int | None = None) -> bool:
        """Whether ``group`` (default: every live group) accepts calls now."""
        life = self._life
        if life.state is not SupervisorState.RUNNING or life.stop_requested.is_set():
            return False
        return all(life.gates[i].is_open for i in ([group] if group is not None else life.live))

    def wait_until_serving(self, group: int | None = None, timeout: float | None = None) -> bool:
        """Block until ``group`` (default: every live group) serves again, e.g. after a restart. False when the
        timeout passed, or the group or the tree stopped for good (it will never serve again)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        life = self._life
        for i in ([group] if group is not None else list(life.live)):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not life.gates[i].wait_open(remaining):
                return False
        return self.serving(group)

    def policy_window(self) -> PolicyWindow:
        """Failures the restart policy currently counts against its budget (start-up and run-time apart)."""
        return PolicyWindow(len(self._life.pstate.startup), len(self._life.pstate.runtime))

    @property
    def rendezvous_dir(self) -> str:
        """The private folder (mode 0700) holding the groups' torch.distributed rendezvous files."""
        return self._life._tmp  # "" until start()

    def transport_handles(self, group: int) -> list[Any]:
        """The handles of ``group``'s rings (broadcast first, then each rank's reply ring), for diagnostics."""
        channel = self._life.groups[group].channel
        return [channel.bcast.export_handle(), *(q.export_handle() for q in channel.replies)]

    def request_shutdown(self, drain: bool | float | None = None) -> None:
        """Begin a graceful stop and return at once (e.g. from a signal handler); ``wait()`` for its end.
        ``drain`` as for shutdown()."""
        self._life.request_shutdown(self._drain_seconds(drain))

    def _drain_seconds(self, drain: bool | float | None) -> float | None:
        if drain is None:
            return None
        if drain is True:
            return self.cfg.shutdown.drain_s
        if drain is False:
            return 0.0
        if not float(drain) >= 0:  # NaN and negatives
            raise ValueError(f"shutdown: drain must be True, False or seconds >= 0, got {drain!r}")
        return float(drain)

    def restart_group(self, group: int) -> None:
        """Restart dp group ``group`` between calls, losing none: a rolling restart of that one group (told and
        counted as ``rolling_restart``); returns at once: ``wait_until_serving(group)`` once
        ``groups()[group].attempts`` has moved."""
        if group not in self._life.live:
            raise ValueError(f"group: {group!r} is not a live group (live: {list(self._life.live)})")
        self._life.request_recycle(group, Planned.ROLLING)

    def rolling_restart(self, timeout: float | None = None, wait: bool = True) -> dict[int, float]:
        """Restart every dp group, one at a time, losing no call: each group's gate closes (calls go to the other
        replicas, or wait for it under calls_during_restart=wait), its calls in flight finish, it stops and starts
        again, then the next. Returns seconds per group (closed -> serving again); with wait=False returns {} at
        once (e.g. from a signal handler). TimeoutError if it has not finished within ``timeout``."""
        msg = RollingRestart()
        self._life.request_rolling_restart(msg)
        if not wait:
            return {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while not msg.done.wait(_POLL_S):
            if self._life.finished.is_set():
                raise ShutdownInProgress("rolling_restart: the supervisor stopped")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"rolling_restart: not finished within {timeout} s (done: {sorted(msg.seconds)})")
        return dict(msg.seconds)

    def force_stop(self) -> None:
        """SIGKILL every worker now (a second Ctrl-C); the stop then completes without the grace period."""
        self._life.force_stop()

    def register_failure_callback(self, callback: Callable[..., Any]) -> None:
        """Called from the supervisor's manager thread whenever a group fails (before the policy acts). It may take
        no argument (vLLM style) or one: the list of ChildExit records. Exceptions it raises are logged."""
        self._life.callbacks.append(callback)

    # -- calls -----------------------------------------------------------------------------------------------
    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None, non_block: bool = False,
                       unique_reply_rank: int | None = None, group: int | None = None,
                       retry: bool | None = None, deadline: float | None = None) -> Any:
        """Call ``method`` (a public method's name, or a callable that gets the worker first) on every rank (or
        every rank of dp group ``group``). Returns the list of results by global rank, or the single result of
        ``unique_reply_rank``; with non_block, a Future of that (it completes by itself: callbacks,
        ``concurrent.futures.wait``, ``asyncio.wrap_future``; ``cancel()`` returns False: a sent call runs).
        ``timeout`` is the caller's wait: at most this long (CallTimeout), the ranks left alone and a late answer
        dropped; a Future's ``result()`` without a timeout waits at most this long from the call.
        ``deadline`` is the call deadline: ranks that have not answered by then are declared hung (RpcTimeout
        "missed the call deadline of N s"; stacks dumped, killed, the restart policy acts). None = no deadline.
        ``retry`` (default ``rpc.retry``): if a group fails before it answered, send its part again once the group
        serves again, up to ``rpc.retry_attempts`` within the deadline (the method then runs twice: mark only calls
        that are safe to repeat)."""
        name, payload = _method_payload(method)
        _check_seconds("timeout", timeout)
        _check_seconds("deadline", deadline)
        until = None if timeout is None else time.monotonic() + timeout
        targets = self._targets(unique_reply_rank, group)
        if self.cfg.rpc.retry if retry is None else retry:
            return self._retrying(name, payload, args, kwargs, targets, until, non_block,
                                  unique_reply_rank is not None, movable=False, call_deadline=deadline)
        sent = self._send_all(targets, payload, args, kwargs, until, name, deadline, non_block)
        if non_block:
            return self._future(sent, unique_reply_rank is not None, until)
        out: list[Any] = []
        for i, (g, call) in enumerate(sent):
            try:
                out.extend(self._wait(g, call, until))
            except BaseException:
                for g2, later in sent[i + 1:]:
                    g2.channel.abandon(later)  # the caller gets one error; the other parts' answers are dropped
                raise
        return out[0] if unique_reply_rank is not None else out

    def _targets(self, unique_reply_rank: int | None, group: int | None) -> list[tuple[int, int | None]]:
        """(group, local rank or None for all) per part; ValueError naming the world for a rank or group outside it."""
        if group is not None:
            _check_index("group", group, self.cfg.parallel.dp, f"dp={self.cfg.parallel.dp} groups")
        if unique_reply_rank is None:
            return [(gi, None) for gi in ([group] if group is not None else list(self._life.live))]
        p = self.cfg.parallel
        _check_index("unique_reply_rank", unique_reply_rank, p.total,
                     f"{p.total} ranks: dp={p.dp} groups of tp={p.tp} x pp={p.pp}")
        gi, local = divmod(unique_reply_rank, self.world)
        if group is not None and group != gi:
            raise ValueError(f"unique_reply_rank={unique_reply_rank} is in group {gi}, not group={group}")
        return [(gi, local)]

    def _send_all(self, targets, payload, args, kwargs, until, name, deadline, detached) -> list:
        sent: list[tuple[WorkerGroup, PendingCall]] = []
        try:
            for gi, local in targets:
                sent.append(self._send(gi, payload, args, kwargs, local, until, name, deadline, detached))
        except BaseException:
            for g, call in sent:
                g.channel.abandon(call)
            raise
        return sent

    def _future(self, sent: list, single: bool, until: float | None) -> CallFuture:
        future = CallFuture([call for _, call in sent], single, until)
        for g, call in sent:
            call.add_done_callback(lambda _c, g=g: self._after_call(g))
        return future

    def execute_model(self, *args: Any, timeout: float | None = None, group: int | None = None,
                      retry: bool | None = None, non_block: bool = False, **kwargs: Any) -> Any:
        """Run one step on a group (round-robin over serving replicas unless ``group`` is given); returns the
        output of its first TP rank of the last PP stage. ``non_block`` (vLLM V1's ``execute_model(scheduler_output,
        non_block=False)``): return a Future of that output as soon as the step is sent, so the next step can be
        prepared while this one runs. ``retry`` (default: ``rpc.retry_execute_model`` is "always"): if the group
        fails before it answered, the step goes to another serving replica at once (or to ``group`` once it serves
        again). Only for steps that hold no state in the group: a decode step needs its group's KV cache, so
        generation is retried a request at a time (supervisor/serving.py)."""
        gi = group if group is not None else self._pick_group()
        local = (self.cfg.parallel.pp - 1) * self.cfg.parallel.tp
        if self.cfg.rpc.retry_execute_model == "always" if retry is None else retry:
            deadline = None if timeout is None else time.monotonic() + timeout
            return self._retrying("execute_model", "execute_model", args, kwargs, [(gi, local)], deadline,
                                  non_block, True, movable=group is None,
                                  call_deadline=self.cfg.worker.call_deadline_s or None)
        return self.collective_rpc("execute_model", timeout, args, kwargs, non_block=non_block,
                                   unique_reply_rank=gi * self.world + local,
                                   deadline=self.cfg.worker.call_deadline_s or None)

    def check_health(self, timeout: float | None = 10.0) -> list[Any]:
        """Raise if the tree is not healthy (a group down, a GPU of its ranks reporting uncorrectable memory errors
        or a pending row remap: GpuUnhealthy, a rank failing its check); else the ranks' reports."""
        life = self._life
        if life.state is not SupervisorState.RUNNING:
            raise WorkerFailed(f"supervisor is {life.state.value}")
        down = [i for i in life.live if not life.gates[i].is_open]
        if down:
            raise WorkerFailed(f"groups {down} are not serving ({life.gates[down[0]].closed_reason})")
        places = self._rank_places()
        problems = self.gpu_health.unhealthy(places)
        if problems:
            raise GpuUnhealthy(problems, tuple(sorted(self.gpu_health.of_ranks(places))))
        return self.collective_rpc("check_health", timeout=timeout)

    def gpus(self) -> list[GpuReading]:
        """The GPUs the tree's ranks run on, with their health counters (none on CPU, or without nvidia-ml-py)."""
        on = {g.index: g for g in self.gpu_health.of_ranks(self._rank_places()).values()}
        return [on[i] for i in sorted(on)]

    def _rank_places(self) -> list[RankPlace]:
        """Where each live rank runs; only for ranks on this host (the local backend): NVML sees this host's GPUs."""
        life = self._life
        if life.backend.name != "local":
            return []
        return [rank_place(g.rank_offset + w.rank, w.pid, w.spec, life.device)
                for g in list(life.groups.values()) for w in list(g.workers) if w.is_alive()]

    def _pick_group(self) -> int:
        live = list(self._life.live)
        if not live:
            raise ShutdownInProgress("no group is serving")
        for _ in range(len(live)):
            gi = live[next(self._rr) % len(live)]
            if self._life.gates[gi].is_open:
                return gi
        return live[next(self._rr) % len(live)]  # none open: wait on one (or fail) as configured

    def _retrying(self, name: str, payload: Any, args: tuple, kwargs: dict | None, targets: list, until,
                  non_block: bool, unique: bool, movable: bool, call_deadline: float | None = None) -> Any:
        """The retryable form of a call: one RetryingCall per target group (supervisor/core/retry.py), each sent
        now and re-sent while its group fails, within ``until`` (the caller's limit). Non-blocking: a Future that
        completes by itself, the retries run on a thread of its own (only retryable calls pay for it)."""
        policy = RetryPolicy(self.cfg.rpc.retry_attempts)

        def sender(local):
            return lambda gi, d: self._send(gi, payload, args, kwargs, local, d, name, call_deadline)

        calls = [RetryingCall(name, gi, movable=movable, policy=policy, deadline=until, send=sender(local),
                              wait=self._wait, view=self.serving_view, emit=self.events.emit,
                              stats=self.retry_stats).start() for gi, local in targets]

        def resolve() -> Any:
            out = [r for c in calls for r in c.result(until)]
            return out[0] if unique else out

        if not non_block:
            return resolve()
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # sent: cannot be cancelled

        def run() -> None:
            try:
                future.set_result(resolve())
            except BaseException as exc:  # noqa: BLE001 -- the caller gets it from the Future
                future.set_exception(exc)

        threading.Thread(target=run, name=f"retry-{name}", daemon=True).start()
        return future

    def _send(self, gi: int, payload, args, kwargs, local, deadline, name, call_deadline: float | None = None,
              detached: bool = False) -> tuple[WorkerGroup, PendingCall]:
        """Pass group ``gi``'s gate and send. ``deadline`` is the caller's limit (a monotonic time) for the wait at
        the gate and for the request to be taken; ``call_deadline`` (seconds) the call deadline."""
        life = self._life
        if self.gave_up:  # checked first: after giving up the tree is stopped too, but nobody asked for that
            raise WorkerFailed(f"{name}: the supervisor gave up: {life.error}")
        if not life.started.is_set() and not life.thread.is_alive():  # Supervisor(start=False), never started
            raise ShutdownInProgress(f"{name}: the supervisor is not started (call start() first)")
        stopping = life.stop_requested.is_set() and not life.requests.carries(gi)  # a request in flight may finish
        if stopping or life.state in (SupervisorState.STOPPING, SupervisorState.STOPPED):
            raise ShutdownInProgress(f"{name}: the supervisor {life.stop_words()}")
        gate = life.gates[gi]
        wait = self.cfg.restart.calls_during_restart == "wait"
        if not gate.enter(deadline, wait):
            if self.gave_up:
                raise WorkerFailed(f"{name}: the supervisor gave up: {life.error}")
            if life.stop_requested.is_set():
                raise ShutdownInProgress(f"{name}: the supervisor {life.stop_words()}")
            failure = getattr(life.groups.get(gi), "channel", None) and life.groups[gi].channel.failure
            if str(gate.closed_reason) == "failed" and failure is not None:
                raise WorkerFailed(f"{name}: group {gi} failed and will not restart: {failure}", failure.ranks)
            raise WorkerFailed(f"{name}: group {gi} is {gate.closed_reason}", restarting=gate.closed_reason is Closed.RESTARTING)
        try:
            group = life.groups[gi]
            started = time.monotonic()  # before the broadcast: a rank may begin (and time) the call at once
            remaining = None if deadline is None else max(0.0, deadline - started)
            call = _channel_send(group.channel, payload, args, kwargs, local, remaining, name, call_deadline, detached)
            self.calls.sent(gi, call, started)  # the status table's "call in progress", latency and failure metrics
            return group, call
        finally:
            gate.leave()

    def _wait(self, group: WorkerGroup, call: PendingCall, deadline: float | None) -> list[Any]:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return group.channel.wait(call, remaining)  # a missed call deadline is the lifecycle's (on_deadline)
        finally:
            self._after_call(group)

    def _after_call(self, group: WorkerGroup) -> None:
        """A worker said it crossed max_rss / max_calls: recycle its group between calls."""
        if group.channel.over_budget and self._life.gates[group.index].is_open:
                group.channel.over_budget = False
                self._life.request_recycle(group.index)

    # -- views -----------------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """One row per worker: group, rank, pid, state, restarts, RSS (MiB), CPU%, GPU MiB and the health of its GPU
        ("ok", "ECC 2", "reset pending", a throttle reason such as "hw_thermal"; None off a GPU)."""
        rows = []
        life = self._life
        gpu_mem = {}
        if life.device == "cuda":
            from supervisor import gpu

            gpu_mem = gpu.memory_by_pid()
        health = self.gpu_health.of_ranks(self._rank_places())
        for gi in sorted(life.groups):
            g = life.groups[gi]
            for w in g.workers:
                rss, cpu = None, None
                p = w.psutil_process() if w.is_alive() else None
                if p is not None:
                    try:
                        with p.oneshot():
                            rss = round(p.memory_info().rss / 2**20, 1)
                            cpu = self._cpu_percent(p)
                    except psutil.Error:
                        pass
                rows.append({"group": gi, "rank": g.rank_offset + w.rank, "name": w.spec.topology.name, "pid": w.pid,
                             "state": w.state.value, "restarts": life.restarts[gi], "rss_mib": rss, "cpu_pct": cpu,
                             "retried": self.retry_stats.away_from[gi],
                             "gpu_mib": round(gpu_mem[w.pid] / 2**20, 1) if w.pid in gpu_mem else None,
                             "gpu_health": _gpu_short(health.get(g.rank_offset + w.rank)),
                             **_liveness(w, self.calls.in_progress(gi, w.rank))})
        return rows

    def _cpu_percent(self, p: psutil.Process) -> float:
        """CPU% of one worker since the previous status() (since it started, the first time): a fresh
        psutil.Process per call would always say 0.0."""
        times, now = p.cpu_times(), time.time()
        key, used = (p.pid, p.create_time()), times.user + times.system
        last_used, last_t = self._cpu_samples.pop(key, (0.0, key[1]))
        if len(self._cpu_samples) > 4 * self.cfg.parallel.total:  # workers long gone (restarts): drop the oldest
            self._cpu_samples.pop(next(iter(self._cpu_samples)))
        self._cpu_samples[key] = (used, now)
        return round(100.0 * (used - last_used) / max(now - last_t, 1e-6), 1)

    def reserve_status(self) -> dict[str, Any]:
        """The weight keeper and the warm standbys: ``{"keeper": {pid, alive, held_bytes (by device), load_s} or
        None, "standbys": {group: {pids, ready}}}`` (both empty where the backend keeps none)."""
        reserve = getattr(self._life.backend, "reserve", None)
        return reserve.status() if reserve is not None else {"keeper": None, "standbys": {}}

    def pids(self) -> list[int]:
        return [row["pid"] for row in self.status()]


def _gpu_short(reading: GpuReading | None) -> str | None:
    return reading.short if reading is not None else None


def _liveness(w: Any, call: tuple[str, float] | None) -> dict[str, Any]:
    """Heartbeat age (local backend) and the call the rank is on, for status rows."""
    beat = getattr(w, "last_beat", None)
    age = round(time.monotonic() - beat, 3) if beat is not None and w.is_alive() else None
    return {"heartbeat_age_s": age, "call": call[0] if call else None, "call_s": round(call[1], 3) if call else None}


def _method_payload(method: str | Callable[..., Any]) -> tuple[str, Any]:
    if isinstance(method, str):
        if method.startswith("_") or not method.isidentifier():
            raise ValueError(f"collective_rpc: {method!r} is not a public method name (only public methods are "
                             "callable by name; send a callable to reach anything else)")
        return method, method
    if not callable(method):
        raise TypeError(f"collective_rpc: method must be a method name or a callable, got {type(method).__name__}")
    import cloudpickle

    return getattr(method, "__name__", "callable"), cloudpickle.dumps(method)


def _channel_send(channel, payload, args, kwargs, local, remaining, name, call_deadline, detached) -> PendingCall:
    """Send; arguments plain pickle refuses, or defined in the user's __main__, travel cloudpickled (as callables
    do), or fail naming the argument."""
    if any_from_main(args, kwargs):
        args, kwargs = by_value(name, args, kwargs)
    try:
        return channel.send(payload, args, kwargs, local, remaining, name, call_deadline, detached)
    except _PICKLE_ERRORS:
        args, kwargs = by_value(name, args, kwargs)
        return channel.send(payload, args, kwargs, local, remaining, name, call_deadline, detached)


def _check_seconds(what: str, value: float | None) -> None:
    """A timeout or deadline is None or a finite number of seconds >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{what}={value!r}: must be None or a finite number of seconds >= 0")


def _check_index(what: str, value: Any, size: int, world: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{what}={value!r} is outside the world: 0..{size - 1} ({world})")


def _abandoned(life: Lifecycle) -> None:
    """A Supervisor was garbage-collected without shutdown(): stop its tree. Only a request (this may run in any
    thread, the manager's own included); the manager thread does the stopping, and interpreter exit waits for it."""
    if not life.finished.is_set():
        _ABANDONED.add(life)
        life.request_shutdown()


@atexit.register
def _shutdown_all() -> None:
    """A supervisor left running at interpreter exit is stopped, not orphaned."""
    for sup in list(_LIVE):
        try:
            sup.shutdown()
        except Exception:
            pass
    for life in list(_ABANDONED):
        life.finished.wait(timeout=life.teardown_bound_s())
