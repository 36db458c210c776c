"""What `python -m supervisor` runs once the tree is up: the built-in workloads, each a short driver.

tp_mlp / bench: the tensor-parallel MLP, first step checked against a single-process reference, then timed steps.
echo: RPC round trips through every rank. serve: keep the tree up, print a status table, until a signal.
Each returns a Report; the CLI prints it and derives the exit code.
"""
from __future__ import annotations

import importlib
import threading
import time
from typing import Any, Callable

from loguru import logger

from supervisor.api import Supervisor
from supervisor.completions_serve import check as check_stdin, serve as serve_completions
from supervisor.errors import ShutdownInProgress, first_line
from supervisor.llm_checks import runs_llm
from supervisor.llm_workload import run_llm
from supervisor.report import Report, p50_p99
from supervisor.ride import Ride


def _timed(fn: Callable[[], Any], n: int, stop: threading.Event) -> list[float]:
    lat = []
    for _ in range(n):
        if stop.is_set():
            break
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return lat


def _latency_lines(report: Report, lat: list[float], what: str) -> None:
    total = sum(lat)
    report.add(f"{what}/s", f"{len(lat) / total:.1f}" if total else "n/a")
    report.add(f"{what} p50 / p99", p50_p99(lat, 3))


def run_tp_mlp(sup: Supervisor, stop: threading.Event) -> Report:
    from worker.tp_mlp import make_input, reference_forward  # imports torch: after READY, off the start-up path

    w, ride = sup.cfg.workload, Ride(sup)  # its calls ride through restarts the policy allows
    report = Report()
    x0 = make_input(w, 0)
    out = ride.execute_model(x0, timeout=60)
    err = float((out - reference_forward(w, x0)).abs().max())
    report.ok = err <= w.check_tolerance
    report.add("check vs reference", f"{'PASS' if report.ok else 'FAIL'} (max abs error {err:.2e}, "
                                     f"tolerance {w.check_tolerance:g})")
    if not report.ok:
        report.failure = f"output differs from the single-process reference by {err:.3e}"
    inputs = [make_input(w, s % 8 + 1) for s in range(8)]
    steps = iter(range(w.steps))
    lat = _timed(lambda: ride.execute_model(inputs[next(steps) % 8], timeout=60), w.steps, stop)
    _latency_lines(report, lat, "steps")
    rpc = _timed(lambda: ride.collective_rpc("check_health", timeout=30), min(200, max(20, w.steps)), stop)
    report.add("rpc (check_health, all ranks) p50 / p99", p50_p99(rpc, 3))
    return report


def run_echo(sup: Supervisor, stop: threading.Event) -> Report:
    report, ride = Report(), Ride(sup)  # its calls ride through restarts the policy allows
    payload = {"ids": list(range(16)), "lens": [7] * 16}
    got = ride.collective_rpc("echo", args=(payload,), timeout=30)
    report.ok = all(g == payload for g in got)
    report.add("echo check", "PASS" if report.ok else "FAIL")
    lat = _timed(lambda: ride.collective_rpc("echo", args=(payload,), timeout=30), sup.cfg.workload.steps, stop)
    _latency_lines(report, lat, "calls")
    return report


def run_serve(sup: Supervisor, stop: threading.Event) -> Report:
    """Keep serving until a signal (or the policy gives up), printing a status table every few seconds. With the
    Llama decoder (worker=llm) the tree also answers prompts: POST /v1/completions, and stdin when asked
    (supervisor/completions_serve.py)."""
    if runs_llm(sup.cfg):
        return serve_completions(sup, stop, _print_status)
    return _print_status(sup, stop)


def _print_status(sup: Supervisor, stop: threading.Event) -> Report:
    interval = sup.cfg.workload.status_interval_s
    while not stop.wait(interval):
        if sup.wait(timeout=0):
            break
        print(format_status(sup.status()), flush=True)
    report = Report()
    report.add("served until", "signal" if stop.is_set() else "the tree stopped")
    return report



def run_script(sup: Supervisor, stop: threading.Event) -> Report:
    from supervisor.launch.run import drive  # the launcher's loop: joins, restarts, the root cause on failure

    return drive(sup, stop)

WORKLOADS: dict[str, Callable[[Supervisor, threading.Event], Report]] = {
    "tp_mlp": run_tp_mlp,
    "bench": run_tp_mlp,
    "echo": run_echo,
    "serve": run_serve,
    "script": lambda sup, stop: run_script(sup, stop),  # a torchrun-style script on every rank
    "llm": run_llm,  # supervisor/llm_workload.py: the Llama decoder, checked against transformers
}


# The built-in drivers that only make sense with their own worker: (what the worker must be, how to say it).
_NEEDS = {"tp_mlp": ("worker.tp_mlp:TPMLPWorker", "the tensor-parallel MLP"),
          "bench": ("worker.tp_mlp:TPMLPWorker", "the tensor-parallel MLP"),
          "echo": ("worker.tp_mlp:EchoWorker", "the echo worker")}


def check(cfg) -> str | None:
    """One line if the workload cannot drive ``worker.cls`` (tp_mlp and echo check their own worker's answers),
    else None. The CLI asks before starting anything; ``run`` asks again."""
    w = cfg.workload
    problem = check_stdin(cfg)
    if problem:
        return problem
    if w.driver:
        return _check_driver(w.driver)
    need = _NEEDS.get(w.name)
    if need is None or cfg.worker.cls == need[0]:
        return None  # the workload's own worker: nothing to import (the parent stays torch-free until READY)
    from worker.main import load_class

    try:
        ok = issubclass(load_class(cfg.worker.cls), load_class(need[0]))
    except Exception as exc:  # the class cannot be imported here: start-up will name the failure
        return f"worker.cls: cannot import {cfg.worker.cls!r} ({type(exc).__name__}: {exc})"
    if ok:
        return None
    return (f"worker.cls: workload={w.name} drives {need[1]} ({need[0]}), not {cfg.worker.cls}: use workload=serve "
            "to keep your worker up, or workload.driver=module:function to drive it")


def _check_driver(spec: str) -> str | None:
    """The driver is imported now, as worker.cls is (run_driver imports it anyway): a typo fails before anything
    starts, in one line."""
    module, _, name = spec.partition(":")
    if not module or not name.isidentifier():
        return f"workload.driver: expected 'module:function', got {spec!r}"
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as exc:  # any error while importing user code means "cannot use this driver"
        return f"workload.driver: cannot import {module!r}: {type(exc).__name__}: {exc}"
    return None if callable(fn) else f"workload.driver: no function {name!r} in module {module!r}"


def run_driver(sup: Supervisor, stop: threading.Event) -> Report:
    """``workload.driver=module:function``: the user's own driver, ``fn(sup, stop)``. It may return a Report, a
    mapping of lines for the summary, or anything else (shown as its result); raising fails the run."""
    module, _, name = sup.cfg.workload.driver.partition(":")
    out = getattr(importlib.import_module(module), name)(sup, stop)
    if isinstance(out, Report):
        return out
    report = Report()
    items = out.items() if isinstance(out, dict) else ([("result", out)] if out is not None else [])
    for key, value in items:
        report.add(str(key), value)
    return report


def run(sup: Supervisor, stop: threading.Event) -> Report:
    problem = check(sup.cfg)
    if problem:
        return Report(ok=False, failure=problem)
    try:
        return (run_driver if sup.cfg.workload.driver else WORKLOADS[sup.cfg.workload.name])(sup, stop)
    except ShutdownInProgress:
        return Report(ok=True, lines=[("stopped", "by signal")])
    except Exception as exc:
        first = first_line(exc)
        if stop.is_set():  # the stop cut a call short: that is the stop, not a failure of the workload
            logger.debug(f"workload stopped by a signal mid-call: {first}")
            return Report(ok=True, lines=[("stopped", f"by signal (mid-call: {first})")])
        logger.error(f"workload failed: {exc}")
        return Report(ok=False, failure=first)


def format_status(rows: list[dict[str, Any]]) -> str:
    head = (f"{'group':>5} {'rank':>4} {'name':<16} {'pid':>7} {'state':<9} {'restarts':>8} {'rss MiB':>8} "
            f"{'cpu%':>6} {'gpu MiB':>8}")
    out = [head]
    for r in rows:
        out.append(f"{r['group']:>5} {r['rank']:>4} {r['name']:<16} {r['pid']:>7} {r['state']:<9} "
                   f"{r['restarts']:>8} {str(r['rss_mib']):>8} {str(r['cpu_pct']):>6} {str(r.get('gpu_mib') or '-'):>8}")
    return "\n".join(out)


def format_report(items: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items)
