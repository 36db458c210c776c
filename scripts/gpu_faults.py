"""Each GPU row of the fault matrix (/work/shared/FAULTS.md 48-51, and a segfault mid-call) once, against one tp=1
CUDA tree, timed; a table last (also after a row failed, or on Ctrl-C). Well under 3 minutes on an H100.

    python scripts/gpu_faults.py [--rows 48-assert,49-oom,...] [--bound-s 1.0] [--budget-s 150]

Columns: the fault; detect s (the call sent -> the caller's error); the error the caller saw (its first line);
serving s (the error -> a call answered again: by the replacement where the rank was replaced); GPU memory in use
before the fault and after (nvidia-smi, not our NVML reading); back s (the error -> the old process gone from
nvidia-smi and the memory in use back within 256 MiB of its level before); within the bound (--bound-s, 1 s: the
row-50 bound of the fault matrix, applied to every row). Rows not begun within --budget-s are listed as not run.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.integration.helpers import limited_memory_cgroup, smi_pids, smi_used_mib  # noqa: E402
from worker import faults  # noqa: E402

GIB = 1 << 30
TOLERANCE_MIB = 256
CGROUP_LIMIT = 256 << 20
CALL_TIMEOUT_S = 60.0
HANG_DEADLINE_S = 3.0
POLL_S = 0.02


@dataclass
class Row:
    name: str
    call: Callable[[Any], Any]  # sup -> raises what the caller sees
    replaced: bool  # the rank is replaced (else the same process serves on)


@dataclass
class Result:
    fault: str
    detect_s: float | None = None
    error: str = ""
    serving_s: float | None = None
    before_mib: int | None = None
    after_mib: int | None = None
    back_s: float | None = None
    note: str = ""


# -- the faults, as callables sent to the rank ------------------------------------------------------------------------
def _hold_then(kind: str) -> Callable[[Any], Any]:
    def fn(w):
        import torch

        w._ballast = torch.empty(GIB, dtype=torch.uint8, device=w.device)  # the dead process's memory to free
        torch.cuda.synchronize()
        {"assert": faults.device_error, "illegal": faults.illegal_address, "spin": faults.spin_forever,
         "segv": lambda _d: faults.segfault()}[kind](w.device)
        return "the fault did not strike"
    return fn


def _oom(w):
    import torch

    held = torch.empty(2 * GIB, dtype=torch.uint8, device=w.device)  # cached by torch unless handed back
    torch.empty(1 << 40, dtype=torch.uint8, device=w.device)
    return held.numel()


def _oom_killer_row(sup) -> Any:
    """The rank joins a 256 MiB memory cgroup and grows past it: the kernel's OOM killer ends it."""
    with limited_memory_cgroup(CGROUP_LIMIT) as path:
        if path is None:
            raise _Skip("no memory cgroup can be made here")
        sup.collective_rpc(lambda w, p: faults.join_cgroup(p), args=(path,), timeout=CALL_TIMEOUT_S)
        return sup.collective_rpc(lambda w, n: faults.grow_memory(n), args=(4 * CGROUP_LIMIT,), timeout=CALL_TIMEOUT_S)


class _Skip(Exception):
    pass


ROWS = [
    Row("48-assert", lambda sup: sup.collective_rpc(_hold_then("assert"), timeout=CALL_TIMEOUT_S), True),
    Row("48-illegal", lambda sup: sup.collective_rpc(_hold_then("illegal"), timeout=CALL_TIMEOUT_S), True),
    Row("49-oom", lambda sup: sup.collective_rpc(_oom, timeout=CALL_TIMEOUT_S), False),
    Row("50-hang", lambda sup: sup.collective_rpc(_hold_then("spin"), timeout=CALL_TIMEOUT_S,
                                                  deadline=HANG_DEADLINE_S), True),
    Row("segv", lambda sup: sup.collective_rpc(_hold_then("segv"), timeout=CALL_TIMEOUT_S), True),
    Row("51-oom-killer", _oom_killer_row, True),
]


# -- measuring one row -------------------------------------------------------------------------------------------------
def run_row(sup, gpu: str, row: Row) -> Result:
    res = Result(row.name)
    _warm(sup)
    res.before_mib, old = smi_used_mib(gpu), sup.pids()
    t0 = time.monotonic()
    try:
        row.call(sup)
        res.error = "(no error: the fault did not strike)"
    except _Skip as exc:
        res.note = f"skipped: {exc}"
        return res
    except Exception as exc:  # noqa: BLE001 -- what the caller saw is the measurement
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    t_err = time.monotonic()
    res.detect_s = t_err - t0
    res.back_s = _memory_back(gpu, res.before_mib, old if row.replaced else [], t_err)
    res.serving_s = _serving_again(sup, old if row.replaced else [], t_err)
    res.after_mib = smi_used_mib(gpu)
    if not row.replaced and sup.pids() != old:
        res.note = "the rank was replaced (expected: the same process)"
    return res


def _warm(sup) -> None:
    from worker.tp_mlp import make_input

    sup.execute_model(make_input(sup.cfg.workload, 0), timeout=CALL_TIMEOUT_S)


def _memory_back(gpu: str, before: int, old: list[int], since: float, timeout: float = 10.0) -> float | None:
    while time.monotonic() - since < timeout:
        if not set(old) & smi_pids(gpu) and smi_used_mib(gpu) <= before + TOLERANCE_MIB:
            return time.monotonic() - since
        time.sleep(POLL_S)
    return None


def _serving_again(sup, old: list[int], since: float, timeout: float = 45.0) -> float | None:
    while time.monotonic() - since < timeout:
        if sup.serving() and not set(old) & set(sup.pids()):
            try:
                sup.collective_rpc("ping", timeout=CALL_TIMEOUT_S)
                return time.monotonic() - since
            except Exception:  # noqa: BLE001 -- restarted meanwhile: look again
                pass
        time.sleep(POLL_S)
    return None


# -- the run --------------------------------------------------------------------------------------------------------
def _tree():
    from supervisor.api import Supervisor
    from supervisor.config import load_config

    return Supervisor(load_config(["device=cuda", "parallel.tp=1", "restart=one_for_one", "restart.intensity=50",
                                   "logging.events=false", "logging.level=WARNING"]))


def main() -> int:
    ap = argparse.ArgumentParser(description="Each GPU row of the fault matrix once, against a tp=1 CUDA tree, "
                                 "timed; a table last.")
    ap.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows to run")
    ap.add_argument("--bound-s", type=float, default=1.0, help="'back' within this many seconds of the error")
    ap.add_argument("--budget-s", type=float, default=150.0, help="begin no row after this many seconds")
    args = ap.parse_args()
    wanted = [r for r in ROWS if r.name in args.rows.split(",")]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM still prints the table
    from supervisor.gpu import usable_gpus

    gpu = (usable_gpus() or ("0",))[0]
    results: list[Result] = []
    sup = None
    t_start = time.monotonic()
    try:
        for row in wanted:
            if time.monotonic() - t_start > args.budget_s:
                results.append(Result(row.name, note=f"not run: past --budget-s {args.budget_s:g}"))
                continue
            try:
                if sup is None or sup.gave_up or not sup.serving():
                    sup = _restart_tree(sup)  # the first, or a fresh one after a row that broke it
                results.append(run_row(sup, gpu, row))
            except Exception as exc:  # noqa: BLE001 -- a failed row is reported; the others still run
                results.append(Result(row.name, note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0]}"))
            print(f"[gpu_faults] {_line(results[-1], args.bound_s)}", flush=True)
    except KeyboardInterrupt:
        print("[gpu_faults] interrupted: the rows so far", flush=True)
    finally:
        if sup is not None:
            sup.shutdown()
        _table(results, args.bound_s)
    return 0 if results and all(_ok(r, args.bound_s) or r.note.startswith("skipped") for r in results) else 1


def _restart_tree(sup):
    if sup is not None:
        sup.shutdown()
    return _tree()  # a start-up failure raises: that row reports it


def _ok(r: Result, bound: float) -> bool:
    return not r.note and r.back_s is not None and r.back_s <= bound and r.serving_s is not None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _line(r: Result, bound: float) -> str:
    within = "yes" if _ok(r, bound) else "no"
    return (f"{r.fault:<14} {_fmt(r.detect_s):>8} {_fmt(r.serving_s):>8} {str(r.before_mib or '-'):>7} "
            f"{str(r.after_mib or '-'):>7} {_fmt(r.back_s):>7} {within:>6}  {r.note or r.error[:110]}")


def _table(results: list[Result], bound: float) -> None:
    print(f"\n=== gpu_faults: tp=1 CUDA tree; 'back' = old process gone and memory within {TOLERANCE_MIB} MiB of "
          f"its level (nvidia-smi), bound {bound:g} s ===")
    print(f"{'fault':<14} {'detect s':>8} {'serve s':>8} {'MiB bef':>7} {'MiB aft':>7} {'back s':>7} {'within':>6}  "
          "error the caller saw (first line) / note")
    for r in results:
        print(_line(r, bound))


if __name__ == "__main__":
    sys.exit(main())
