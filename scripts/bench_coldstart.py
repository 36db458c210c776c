#!/usr/bin/env python
"""Command -> first token, cold (a fresh process, the checkpoint in the page cache), for workload=llm against
transformers' from_pretrained + generate on the same device, side by side (A B A B ...), in parts.

    ours   a fresh interpreter builds a tree (as configured: the weight keeper loads the shard, the rank maps it) and
           asks for one prompt's first token. Parts, from the process's start: imports and config; the keeper
           (process, CUDA init, load); the rank (process, CUDA init, torch.distributed, mapping the weights); READY
           -> the first token (prefill, and on CUDA the first decode step's graph is captured at the next step).
    hf     a fresh interpreter imports torch and transformers, LlamaForCausalLM.from_pretrained(device, dtype),
           generate(max_new_tokens=1).

    python scripts/bench_coldstart.py --device cuda --preset llama-3.1-8b --dtype bfloat16 --rounds 2
    python scripts/bench_coldstart.py                                  # CPU, the tiny preset

Progress goes to stderr; the table (medians) is printed last, on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402

CHILD_TIMEOUT_S = 600.0
PROMPT = [[(7 * i + 3) % 500 + 1 for i in range(32)]]


def since_start() -> float:
    """Seconds since this process was created (its fork/exec included), from /proc."""
    from worker.llm.worker import process_created_wall

    return time.time() - process_created_wall()


def ours(args) -> dict:
    t_import0 = since_start()
    C.quiet_loguru()
    from supervisor.api import Supervisor

    cfg = C.supervisor_config("workload=llm", f"device={args.device}", f"llm.preset={args.preset}",
                              f"llm.dtype={args.dtype}", "llm.batch=1", "llm.prompt_len=32", "llm.max_new_tokens=2",
                              "restart=one_for_one", "runtime.startup_timeout_s=600")
    t_config = since_start()
    with Supervisor(cfg) as sup:
        t_ready = since_start()
        sup.execute_model({"op": "prefill", "prompts": PROMPT, "max_new_tokens": 2}, timeout=300)
        t_token = since_start()
        ph = sup.collective_rpc("phase_timings", timeout=60)[0]
        keeper = sup.reserve_status()["keeper"]
    return {"import_s": t_import0, "config_s": t_config - t_import0, "ready_s": t_ready, "token_s": t_token,
            "keeper_load_s": keeper["load_s"] if keeper else float("nan"),
            "rank_process_start_s": ph["process_start_s"], "rank_cuda_init_s": ph.get("cuda_init_s", float("nan")),
            "rank_dist_init_s": ph.get("dist_init_s", float("nan")), "rank_weights_s": ph["weight_load_s"],
            "first_token_s": t_token - t_ready,
            "boot_s": t_ready - t_config - (keeper["load_s"] if keeper else 0.0) - ph["process_start_s"]
            - ph.get("cuda_init_s", 0.0) - ph.get("dist_init_s", 0.0) - ph["weight_load_s"]}


def hf(args) -> dict:
    t0 = since_start()
    import torch
    from transformers import LlamaForCausalLM

    from worker.llm.checkpoint import resolve

    t_import = since_start()
    path = resolve("", args.preset, "", 0, args.dtype)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)
    t_cuda = since_start()
    model = LlamaForCausalLM.from_pretrained(str(path), torch_dtype=getattr(torch, args.dtype)).to(dev).eval()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_load = since_start()
    with torch.no_grad():
        model.generate(torch.tensor(PROMPT, device=dev), max_new_tokens=1, do_sample=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_token = since_start()
    return {"process_s": t0, "import_s": t_import - t0, "cuda_init_s": t_cuda - t_import, "load_s": t_load - t_cuda,
            "first_token_s": t_token - t_load, "token_s": t_token}


ROWS = [  # (label, peer, key)
    ("process created -> main (interpreter start)", "ours", "import_s"),
    ("  imports + config (supervisor)", "ours", "config_s"),
    ("  the forkserver's import of torch, the keeper's start (the rest of command -> READY)", "ours", "boot_s"),
    ("  the keeper's load (CUDA init, read, copy)", "ours", "keeper_load_s"),
    ("  the rank: process start", "ours", "rank_process_start_s"),
    ("  the rank: CUDA init", "ours", "rank_cuda_init_s"),
    ("  the rank: torch.distributed init", "ours", "rank_dist_init_s"),
    ("  the rank: weights mapped from the keeper, KV cache", "ours", "rank_weights_s"),
    ("command -> READY", "ours", "ready_s"),
    ("READY -> first token (prefill)", "ours", "first_token_s"),
    ("command -> first token: ours", "ours", "token_s"),
    ("hf: interpreter start", "hf", "process_s"),
    ("hf: import torch + transformers", "hf", "import_s"),
    ("hf: CUDA init", "hf", "cuda_init_s"),
    ("hf: from_pretrained + .to(device)", "hf", "load_s"),
    ("hf: generate(max_new_tokens=1)", "hf", "first_token_s"),
    ("command -> first token: transformers", "hf", "token_s"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps((ours if args.child == "ours" else hf)(args)), flush=True)
        return 0
    got: dict[str, list[dict]] = {"ours": [], "hf": []}
    for r in range(args.rounds):
        for peer in C.rotate(["ours", "hf"], r):
            C.log(f"round {r}: {peer}")
            cmd = [C.PY, os.path.abspath(__file__), "--child", peer, "--device", args.device, "--preset",
                   args.preset, "--dtype", args.dtype]
            done = C.run_command(cmd, CHILD_TIMEOUT_S, cwd=C.ROOT, env=C.child_env())
            if done.rc != 0:
                raise RuntimeError(f"{peer}: exit {done.rc}: {done.err.strip()[-1500:]}")
            got[peer].append(json.loads(done.out.strip().splitlines()[-1]))
    rows = [[label, C.f_ms(C.median([rec[key] for rec in got[peer]]), 0)] for label, peer, key in ROWS]
    ratio = C.ratio(C.median([r["token_s"] for r in got["ours"]]), C.median([r["token_s"] for r in got["hf"]]))
    rows.append(["ours / transformers", C.f_x(ratio)])
    print(C.format_table(f"command -> first token, cold: {args.preset} {args.dtype} on {args.device} (medians of "
                         f"{args.rounds})", ["part", "median"], rows, []), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
