#!/usr/bin/env python
"""kill -9 of a rank -> first tokens served again, for workload=llm, split into its parts; variants side by side.

One tree per run: tp=1 ``workload=llm`` (worker.restart_probe:ProbedLLMWorker, which splits the weight load into the
read out of the safetensors files and the copy to the device), one_for_one with a budget that never runs out. After a
warm-up generation the rank is SIGKILLed ``--kills`` times; each time, from the tree's events: kill -> the "exited"
event (detect), -> the "restarting" decision (the broken group stopped, the policy asked, its backoff waited),
-> the group serving again (a warm standby promoted, or a process spawned: its own phases are listed below it),
and the first step (a prefill and one decode) answered.

Variants, each in a child process of its own (the forkserver and its preload are per process), interleaved
A B C, B C A, ... over ``--rounds``:
    as configured     the defaults (workload=llm under a restart policy: the weight keeper and a warm standby)
    keeper only       recovery.standby=off: a fresh process maps the keeper's weights
    no keeper         recovery.keeper=off recovery.standby=off: the restart path of before the keeper (reads and
                      copies the weights, captures the graph); the code before also waited 0.1 s of backoff
                      before a first restart (scripts/gpu_recovery.sh runs that code itself, side by side)
    no gc.freeze      the worker does not freeze what it inherits from the forkserver (the code before the cut)
    eager NCCL        device=cuda, tp=1: NCCL initialised at start-up although a world of one never uses it (before)
    backoff 0         restart.backoff_initial_s=0: the restart policy's delay before the first restart
    plain load        the weights copied slice by slice from pageable CPU tensors, not through fastload's pinned,
                      overlapped staging (the code before the cut)
    preload llm       runtime.preload adds the llm worker's modules (and safetensors) to the forkserver's, so a
                      restarted rank does not import them

    python scripts/bench_restart.py                                   # CPU, the tiny preset
    python scripts/bench_restart.py --device cuda --presets llama-3.2-1b,llama-3.1-8b --dtype bfloat16

Progress goes to stderr; the table (medians over every kill of a variant) is printed last, on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)

CHILD_TIMEOUT_S = 600.0
PERIOD_S = 1.0  # the restart window: kills are spaced further apart, so each is the first restart of its window
RESTART_TIMEOUT_S = 300.0
LLM_MODULES = ("worker.restart_probe", "worker.llm.worker", "worker.llm.model", "worker.llm.engine",
               "worker.llm.checkpoint", "safetensors.torch")
VARIANTS = {
    "as configured": (),
    "keeper only": ("recovery.standby=off",),
    "no keeper": ("recovery.keeper=off", "recovery.standby=off"),
    "no gc.freeze": ("+runtime.env.RV_NO_GC_FREEZE=1",),
    "eager NCCL": ("+runtime.env.RV_EAGER_NCCL=1",),
    "plain load": ("+runtime.env.RV_SLOW_LOAD=1",),
    "backoff 0": ("restart.backoff_initial_s=0",),
    "preload llm": (f"runtime.preload=[torch,{','.join(LLM_MODULES)}]",),
}
PARTS = [  # (row label, key in a kill's record)
    ("kill -> exited event (detect)", "detect_s"),
    ("exited -> restart decided (stop, policy, backoff)", "decide_s"),
    ("decided -> serving (standby promoted, or spawn ... READY)", "start_s"),
    ("  of which a warm standby was promoted (share of kills)", "promoted"),
    ("  kill -> new process created (spawned ones)", "spawn_s"),
    ("  process start (fork/exec, imports)", "process_start_s"),
    ("  CUDA init", "cuda_init_s"),
    ("  torch.distributed init (NCCL / gloo)", "dist_init_s"),
    ("  weight read (safetensors -> CPU tensors)", "weight_read_s"),
    ("  host -> device copy (+ allocation)", "weight_copy_s"),
    ("    of which pinning the staging buffers (fastload)", "weight_stage_s"),
    ("  weights mapped from the keeper (1) or loaded (0)", "weights_kept"),
    ("  model modules imported in load_model, READY, gate open", "ready_gap_s"),
    ("first step: prefill + 1 decode", "first_step_s"),
    ("total: kill -> first tokens served again", "total_s"),
]


def child(args) -> int:
    """One tree, ``--kills`` kills; prints one JSON line: the records, and how long the first start took."""
    C.quiet_loguru()
    from supervisor.api import Supervisor

    overrides = ["workload=llm", "worker.cls=worker.restart_probe:ProbedLLMWorker", "parallel.tp=1",
                 "restart=one_for_one", "restart.intensity=100000", f"restart.period_s={PERIOD_S}",
                 f"device={args.device}",
                 f"llm.preset={args.preset}", f"llm.dtype={args.dtype}", "llm.batch=1", "llm.max_new_tokens=8",
                 "llm.prompt_len=32",
                 "runtime.startup_timeout_s=600", *VARIANTS[args.variant]]
    t0 = time.time()
    with Supervisor(C.supervisor_config(*overrides)) as sup:
        first_start = time.time() - t0
        prompt = [[(7 * i + 3) % 500 + 1 for i in range(32)]]
        generate(sup, prompt)
        records = [kill_once(sup, prompt) for _ in range(args.kills)]
        write_s = sup.collective_rpc("phase_timings", timeout=60)[0].get("checkpoint_write_s", 0.0)
    print(json.dumps({"records": records, "first_start_s": first_start, "write_s": write_s}), flush=True)
    return 0


def generate(sup, prompt) -> None:
    sup.execute_model({"op": "prefill", "prompts": prompt, "max_new_tokens": 2}, timeout=RESTART_TIMEOUT_S)
    sup.execute_model({"op": "decode", "tokens": [1]}, timeout=RESTART_TIMEOUT_S)


def kill_once(sup, prompt) -> dict:
    pid = sup.pids()[0]
    settle_standby(sup)
    last = max((e["time"] for e in sup.events.of_kind("restarting")), default=0.0)
    time.sleep(max(0.0, last + PERIOD_S * 1.1 - time.time()))  # each kill the first restart of its window
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    C.wait_until(lambda: not sup.serving(0), 30, 0.001)
    if not sup.wait_until_serving(0, timeout=RESTART_TIMEOUT_S):
        raise RuntimeError("the group did not serve again")
    generate(sup, prompt)
    t_tokens = time.time()
    ph = sup.collective_rpc("phase_timings", timeout=60)[0]
    nan = float("nan")
    exited = first_after(sup, "exited", t_kill, pid=pid)
    decided = first_after(sup, "restarting", t_kill)
    serving = first_after(sup, "group_ready", t_kill)
    promoted = not math.isnan(first_after(sup, "standby_promoted", t_kill))
    rec = {"detect_s": exited - t_kill, "decide_s": decided - exited, "start_s": serving - decided,
           "promoted": float(promoted), "first_step_s": t_tokens - serving, "total_s": t_tokens - t_kill,
           "weights_kept": ph.get("weights_kept", 0.0)}
    fresh = ph["created_at"] > t_kill  # a process spawned after the kill; a promoted standby was made before it
    keys = ("process_start_s", "cuda_init_s", "dist_init_s", "weight_read_s", "weight_copy_s", "weight_stage_s")
    rec.update({k: (ph.get(k, nan) if fresh else nan) for k in keys})
    rec["spawn_s"] = ph["created_at"] - t_kill if fresh else nan
    booted = ph["created_at"] + sum(ph.get(k, 0.0) for k in ("process_start_s", "cuda_init_s", "dist_init_s",
                                                             "weight_load_s"))
    rec["ready_gap_s"] = serving - booted if fresh else nan
    return rec


def first_after(sup, kind: str, t: float, **match) -> float:
    """When the first event of ``kind`` after ``t`` (matching ``match``) was emitted; NaN if none was."""
    times = [e["time"] for e in sup.events.of_kind(kind)
             if e["time"] >= t and all(e.get(k) == v for k, v in match.items())]
    return min(times) if times else float("nan")


def settle_standby(sup, timeout_s: float = 120.0) -> None:
    """Before a kill, wait until the group's next standby (if the tree makes one) is ready: a kill during its
    warm-up measures a standby still warming up (and would charge its own start to the measurement)."""
    if not any("standby" in e["kind"] for e in sup.events.recent):
        return  # this tree makes none
    C.wait_until(lambda: (st := sup.reserve_status()["standbys"]) and all(s["ready"] for s in st.values()),
                 timeout_s, 0.01)


def run_child(args, preset: str, variant: str) -> dict:
    cmd = [C.PY, os.path.abspath(__file__), "--child", "--preset", preset, "--variant", variant,
           "--device", args.device, "--dtype", args.dtype, "--kills", str(args.kills)]
    env = C.child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = C.run_command(cmd, CHILD_TIMEOUT_S, cwd=C.ROOT, env=env)  # own session; its tree killed on timeout
    if done.rc != 0:
        raise RuntimeError(f"{preset} / {variant}: child exit {done.rc}: {done.err.strip()[-1500:]}")
    return json.loads(done.out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default="as configured,keeper only,no keeper")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kills", type=int, default=3, help="kills per child (tree)")
    ap.add_argument("--budget-s", type=float, default=3000.0, help="hard limit for the whole run (watchdog)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    with C.Watchdog(args.budget_s):
        try:
            return run(args)
        finally:
            C.REAPER.kill_all()


def cell(key: str, values: list[float]) -> str:
    """A median in ms; the two share-like rows as plain fractions; '-' where nothing was measured."""
    finite = [v for v in values if v == v]
    if not finite:
        return "-"
    if key in ("promoted", "weights_kept"):
        return f"{sum(finite) / len(finite):.2f}"
    return C.f_ms(C.median(finite), 0)


def run(args) -> int:
    """Each preset's table is printed as soon as it is measured (a budget that runs out still leaves the first)."""
    variants = args.variants.split(",")
    load0 = os.getloadavg()
    for preset in args.presets.split(","):
        got: dict[str, list[dict]] = {v: [] for v in variants}
        notes = []
        for r in range(args.rounds):
            for v in C.rotate(variants, r):
                C.log(f"{preset}: round {r}, {v}")
                out = run_child(args, preset, v)
                got[v] += out["records"]
                if r == 0:
                    notes.append(f"{v}: first start {out['first_start_s']:.1f} s (checkpoint written in "
                                 f"{out['write_s']:.1f} s, 0 = cached)")
        base = C.median([rec["total_s"] for rec in got[variants[0]]])
        rows = [[label, *(cell(key, [rec[key] for rec in got[v]]) for v in variants)] for label, key in PARTS]
        rows.append(["total p99 (worst of few)", *(C.f_ms(C.pct([rec["total_s"] for rec in got[v]], 0.99), 0)
                                                  for v in variants)])
        rows.append([f"total vs {variants[0]}",
                     *(C.f_x(C.ratio(C.median([rec["total_s"] for rec in got[v]]), base)) for v in variants)])
        rows.append(["kills (medians over)", *(len(got[v]) for v in variants)])
        print(C.format_table(f"kill -9 -> serving again: workload=llm {preset}, tp=1, {args.device}, "
                             f"dtype {args.dtype} (medians)", ["part", *variants], rows, notes) + "\n", flush=True)
    print(f"\nload average (1 min) at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
