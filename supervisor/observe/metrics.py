"""Prometheus metrics of one supervisor (prometheus_client, its own registry: two supervisors in one process, or a
test after a test, never share counters).

Counted as they happen (events and calls)::

    rankvisor_restarts_total{group,cause}        cause: what ended the group's last incarnation — a signal name
                                                 (SIGKILL), "exit 3", "hung", "startup" (it never became READY),
                                                 "sibling" (restarted with a failed group: one_for_all,
                                                 rest_for_one), "recycle" (a worker over max_rss / max_calls),
                                                 "rolling_restart" (asked for: SIGUSR2, status --restart,
                                                 rolling_restart(), restart_group())
    rankvisor_give_ups_total                     the policy's budget spent
    rankvisor_worker_exits_total{reason}         every worker exit, by ExitInfo.short
    rankvisor_rpc_latency_seconds{method}        histogram, send -> every expected reply
    rankvisor_rpc_failures_total{method,kind}    kind: the exception's class (WorkerFailed, RemoteError, ...)

Read at scrape time from Supervisor.status() / groups()::

    rankvisor_workers{state}                     workers by state (every state listed, 0 included)
    rankvisor_group_serving{group}               1 while the group's gate is open
    rankvisor_worker_heartbeat_age_seconds{group,rank}
    rankvisor_worker_rss_bytes{group,rank}, rankvisor_worker_cpu_percent{group,rank},
    rankvisor_worker_gpu_memory_bytes{group,rank} (device=cuda)

Read at scrape time from Supervisor.gpus(), the GPUs the ranks run on (NVML through nvidia-ml-py; none without it)::

    rankvisor_gpu_healthy{gpu,uuid}                   1 unless uncorrectable errors or a pending retirement / remap
    rankvisor_gpu_ecc_uncorrectable_total{gpu,counter}   counter: volatile (since the driver loaded), aggregate
    rankvisor_gpu_retired_pages{gpu,cause}            cause: multiple_single_bit, double_bit (GPUs before Ampere)
    rankvisor_gpu_retired_pages_pending{gpu}
    rankvisor_gpu_remapped_rows{gpu,kind}             kind: correctable, uncorrectable (Ampere and later)
    rankvisor_gpu_row_remap_pending{gpu}, rankvisor_gpu_row_remap_failed{gpu}
    rankvisor_gpu_throttle_reasons{gpu,reason}        1 for each active clocks-event reason (hw_thermal, sw_power_cap...)

A counter the GPU does not report is left out, not shown as 0.
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from supervisor.core.states import WorkerState
from supervisor.gpu_health import THROTTLE_REASONS

PREFIX = "rankvisor"
# RPC latency buckets: the rings answer in tens of microseconds; a model step takes milliseconds to seconds.
LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
_MIB = 1 << 20
_PLANNED = {"recycled": "recycle", "rolling_restart": "rolling_restart"}  # planned restarts' events -> their cause


class Metrics:
    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.restarts = Counter(f"{PREFIX}_restarts", "Group restarts, by group and by what ended it",
                                ["group", "cause"], registry=r)
        self.give_ups = Counter(f"{PREFIX}_give_ups", "Times the restart policy gave up", registry=r)
        self.exits = Counter(f"{PREFIX}_worker_exits", "Worker process exits, by how they ended", ["reason"],
                             registry=r)
        self.latency = Histogram(f"{PREFIX}_rpc_latency_seconds", "collective_rpc latency, send to last reply",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.failures = Counter(f"{PREFIX}_rpc_failures", "Failed calls, by method and error kind",
                                ["method", "kind"], registry=r)
        self.give_ups.inc(0)
        r.register(_TreeCollector(sup))
        self._lock = threading.Lock()
        self._last_exit: dict[int, str] = {}  # group -> what ended its last incarnation
        self._ready: set[int] = set()  # groups whose current incarnation became READY

    # -- feeds -----------------------------------------------------------------------------------------------
    def on_event(self, e: dict[str, Any]) -> None:
        """An EventLog subscriber."""
        kind = e["kind"]
        if kind == "exited":
            self.exits.labels(e["reason"]).inc()
            if e.get("code") != 0:
                with self._lock:
                    self._last_exit.setdefault(e["group"], e["reason"])
        elif kind == "restarting":
            self.restarts.labels(str(e["group"]), self._cause(e["group"])).inc()
        elif kind in _PLANNED:
            self.restarts.labels(str(e["group"]), _PLANNED[kind]).inc()
        elif kind == "gave_up":
            self.give_ups.inc()
        elif kind == "group_ready":
            with self._lock:
                self._last_exit.pop(e["group"], None)
                self._ready.add(e["group"])

    def _cause(self, group: int) -> str:
        """Its own last exit; else it was serving and restarts with another group (one_for_all, rest_for_one);
        else it never became READY."""
        with self._lock:
            cause = self._last_exit.pop(group, None) or ("sibling" if group in self._ready else "startup")
            self._ready.discard(group)
        return cause

    def on_call(self, method: str, seconds: float, kind: str | None) -> None:
        """A CallStats sink."""
        self.latency.labels(method).observe(seconds)
        if kind is not None:
            self.failures.labels(method, kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _TreeCollector:
    """Gauges computed at scrape time from the live tree."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup

    def describe(self):
        return []  # computed per scrape: no fixed description (and no scrape at registration)

    def collect(self):
        rows = self.sup.status()
        yield self._by_state(rows)
        serving = GaugeMetricFamily(f"{PREFIX}_group_serving", "1 while the group accepts calls", labels=["group"])
        for g in self.sup.groups():
            serving.add_metric([str(g.index)], 1.0 if g.serving else 0.0)
        yield serving
        yield from self._per_worker(rows)
        yield from gpu_families(self.sup.gpus())

    @staticmethod
    def _by_state(rows: list[dict]) -> GaugeMetricFamily:
        fam = GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes by state", labels=["state"])
        for state in WorkerState:
            fam.add_metric([state.value], float(sum(1 for r in rows if r["state"] == state.value)))
        return fam

    @staticmethod
    def _per_worker(rows: list[dict]):
        specs = [("heartbeat_age_seconds", "Seconds since the worker's last heartbeat", "heartbeat_age_s", 1.0),
                 ("rss_bytes", "Resident memory of the worker process", "rss_mib", _MIB),
                 ("cpu_percent", "CPU use of the worker process since the last scrape", "cpu_pct", 1.0),
                 ("gpu_memory_bytes", "GPU memory the worker process holds", "gpu_mib", _MIB)]
        for name, doc, key, scale in specs:
            fam = GaugeMetricFamily(f"{PREFIX}_worker_{name}", doc, labels=["group", "rank"])
            for r in rows:
                if r.get(key) is not None:
                    fam.add_metric([str(r["group"]), str(r["rank"])], float(r[key]) * scale)
            yield fam


def gpu_families(gpus: list[Any]) -> list[Any]:
    """The GPU health gauges of supervisor/gpu_health.py's readings (see the module docstring)."""
    healthy = GaugeMetricFamily(f"{PREFIX}_gpu_healthy", "1 unless the GPU reports uncorrectable memory errors since "
                                "the driver loaded or a pending page retirement / row remap", labels=["gpu", "uuid"])
    ecc = CounterMetricFamily(f"{PREFIX}_gpu_ecc_uncorrectable", "Uncorrectable ECC errors (volatile: since the "
                              "driver loaded; aggregate: the GPU's life)", labels=["gpu", "counter"])
    retired = GaugeMetricFamily(f"{PREFIX}_gpu_retired_pages", "Pages retired, by cause", labels=["gpu", "cause"])
    remapped = GaugeMetricFamily(f"{PREFIX}_gpu_remapped_rows", "Rows remapped, by kind", labels=["gpu", "kind"])
    flags = {name: GaugeMetricFamily(f"{PREFIX}_gpu_{name}", doc, labels=["gpu"]) for name, doc in (
        ("retired_pages_pending", "1 while a page retirement waits for a GPU reset"),
        ("row_remap_pending", "1 while a row remap waits for a GPU reset"),
        ("row_remap_failed", "1 if a row remap failed"))}
    throttle = GaugeMetricFamily(f"{PREFIX}_gpu_throttle_reasons", "1 for each active clocks-event (throttle) reason",
                                 labels=["gpu", "reason"])
    for g in gpus:
        i = str(g.index)
        healthy.add_metric([i, g.uuid], 0.0 if g.problems() else 1.0)
        for counter, value in (("volatile", g.ecc_volatile), ("aggregate", g.ecc_aggregate)):
            if value is not None:
                ecc.add_metric([i, counter], float(value))
        for cause, n in (g.retired_pages or {}).items():
            retired.add_metric([i, cause], float(n))
        for kind, n in (g.remapped_rows or {}).items():
            remapped.add_metric([i, kind], float(n))
        for name, value in (("retired_pages_pending", g.retirement_pending), ("row_remap_pending", g.remap_pending),
                            ("row_remap_failed", g.remap_failed)):
            if value is not None:
                flags[name].add_metric([i], float(value))
        for _bit, reason in THROTTLE_REASONS:
            throttle.add_metric([i, reason], 1.0 if reason in g.throttle else 0.0)
    return [healthy, ecc, retired, remapped, *flags.values(), throttle]
