#!/usr/bin/env python
"""kill -9 of a rank -> serving again, for workload=llm, split into its parts; variants side by side.

One tree per run: tp=1 ``workload=llm`` (worker.restart_probe:ProbedLLMWorker, which splits the weight load into the
read out of the safetensors files and the copy to the device), one_for_one with a budget that never runs out. After a
warm-up generation the rank is SIGKILLed ``--kills`` times; each time: kill -> the "exited" event, -> the new
process created (detect, policy, backoff, fork), its own phases (process start, CUDA init, torch.distributed init
(NCCL on CUDA, gloo on CPU), weight read, host->device copy), READY -> serving, and the first step (a prefill and
one decode) answered.

Variants, each in a child process of its own (the forkserver and its preload are per process), interleaved
A B C, B C A, ... over ``--rounds``:
    as configured     the defaults
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
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)

CHILD_TIMEOUT_S = 600.0
RESTART_TIMEOUT_S = 300.0
LLM_MODULES = ("worker.restart_probe", "worker.llm.worker", "worker.llm.model", "worker.llm.engine",
               "worker.llm.checkpoint", "safetensors.torch")
VARIANTS = {
    "as configured": (),
    "no gc.freeze": ("+runtime.env.RV_NO_GC_FREEZE=1",),
    "eager NCCL": ("+runtime.env.RV_EAGER_NCCL=1",),
    "plain load": ("+runtime.env.RV_SLOW_LOAD=1",),
    "backoff 0": ("restart.backoff_initial_s=0",),
    "preload llm": (f"runtime.preload=[torch,{','.join(LLM_MODULES)}]",),
}
PARTS = [  # (row label, key in a kill's record)
    ("kill -> exited event (detect)", "detect_s"),
    ("kill -> new process created (detect, policy, backoff, fork)", "spawn_s"),
    ("process start (fork/exec, imports)", "process_start_s"),
    ("CUDA init", "cuda_init_s"),
    ("torch.distributed init (NCCL / gloo)", "dist_init_s"),
    ("weight read (safetensors -> CPU tensors)", "weight_read_s"),
    ("host -> device copy (+ allocation)", "weight_copy_s"),
    ("  of which pinning the staging buffers (fastload)", "weight_stage_s"),
    ("model modules imported in load_model, READY, gate open", "ready_gap_s"),
    ("first step: prefill + 1 decode", "first_step_s"),
    ("total: kill -> first tokens served again", "total_s"),
]


def child(args) -> int:
    """One tree, ``--kills`` kills; prints one JSON line: the records, and how long the first start took."""
    C.quiet_loguru()
    from supervisor.api import Supervisor

    overrides = ["workload=llm", "worker.cls=worker.restart_probe:ProbedLLMWorker", "parallel.tp=1",
                 "restart=one_for_one", "restart.intensity=100000", "restart.period_s=1", f"device={args.device}",
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
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    C.wait_until(lambda: not sup.serving(0), 30, 0.001)
    if not sup.wait_until_serving(0, timeout=RESTART_TIMEOUT_S):
        raise RuntimeError("the group did not serve again")
    t_serving = time.time()
    generate(sup, prompt)
    t_tokens = time.time()
    ph = sup.collective_rpc("phase_timings", timeout=60)[0]
    exited = [e["time"] for e in sup.events.of_kind("exited") if e.get("pid") == pid]
    booted = ph["created_at"] + ph["process_start_s"] + ph["cuda_init_s"] + ph["dist_init_s"] + ph["weight_load_s"]
    return {"detect_s": exited[0] - t_kill if exited else float("nan"), "spawn_s": ph["created_at"] - t_kill,
            "process_start_s": ph["process_start_s"], "cuda_init_s": ph["cuda_init_s"],
            "dist_init_s": ph["dist_init_s"], "weight_read_s": ph.get("weight_read_s", float("nan")),
            "weight_copy_s": ph.get("weight_copy_s", float("nan")),
            "weight_stage_s": ph.get("weight_stage_s", float("nan")), "ready_gap_s": t_serving - booted,
            "first_step_s": t_tokens - t_serving, "total_s": t_tokens - t_kill}


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
    ap.add_argument("--variants", default="as configured,no gc.freeze,backoff 0")
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
        rows = [[label, *(C.f_ms(C.median([rec[key] for rec in got[v]]), 0) for v in variants)]
                for label, key in PARTS]
        rows.append([f"total vs {variants[0]}",
                     *(C.f_x(C.ratio(C.median([rec["total_s"] for rec in got[v]]), base)) for v in variants)])
        rows.append(["kills (medians over)", *(len(got[v]) for v in variants)])
        print(C.format_table(f"kill -9 -> serving again: workload=llm {preset}, tp=1, {args.device}, "
                             f"dtype {args.dtype} (medians)", ["part", *variants], rows, notes) + "\n", flush=True)
    print(f"\nload average (1 min) at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
