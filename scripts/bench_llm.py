#!/usr/bin/env python
"""The Llama decoder (workload=llm) against transformers' own generate, side by side in one run.

CPU (default): the tiny preset at tp = 1, 2, 4 in float32 (gloo). Peer: LlamaForCausalLM.generate in this process
on the same checkpoint and prompts. Rounds interleave the peers (HF, tp1, tp2, tp4, HF, tp1, ...); medians and p99.
GPU (--device cuda): the llama-3.2-1b and llama-3.1-8b shapes (seeded random bf16 weights) at tp=1, batch 1 and 32,
32-token prompts, 128 new tokens, CUDA-graph decode. Peer: transformers.generate on the same GPU in this process.
Load time is from a warm page cache (the checkpoint was just written or read). Both modes end with kill -9 of the
rank -> serving again, the time split into its parts from the new worker's own phase timings.

    python scripts/bench_llm.py [--rounds 3]
    python scripts/bench_llm.py --device cuda [--presets llama-3.2-1b,llama-3.1-8b] [--batches 1,32] [--rounds 2]

Columns: load = the slowest rank's weight load; TTFT = the prefill call (HF: generate of one token); tok/s = decode
tokens per second over the batch (HF: (generate(n) - generate(1)) / (n - 1) steps); ITL = one decode call through the
tree (HF: the mean step); same = greedy tokens identical to HF's (all rows, all tokens; bf16: leading tokens that
agree in every row). Progress goes to stderr; the tables are printed last, on stdout.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)

WATCHDOG_S = 3000.0
STARTUP_TIMEOUT_S = 600.0  # an 8B shape loads in seconds from a warm page cache; a cold disk can take minutes
RESTART_TIMEOUT_S = 300.0
HBM_BYTES_S = 4.8e12  # H200 memory bandwidth (datasheet): a decode step cannot read the weights faster
MODES = {  # device -> defaults
    "cpu": dict(presets="tiny", tps="1,2,4", batches="4", prompt_len=32, new_tokens=32, dtype="float32"),
    "cuda": dict(presets="llama-3.2-1b,llama-3.1-8b", tps="1", batches="1,32", prompt_len=32, new_tokens=128,
                 dtype="bfloat16"),
}


@dataclass
class Sample:
    ttft: float
    tok_s: float
    itl: list[float]
    tokens: list[list[int]]


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    same: list[str] = field(default_factory=list)

    def col(self, name: str) -> list[float]:
        return [getattr(s, name) for s in self.samples]


# -- the peers --------------------------------------------------------------------------------------------------
class Tree:
    """A supervised tree running the decoder, in this process."""

    def __init__(self, args: argparse.Namespace, preset: str, tp: int, batch: int, restartable: bool = False) -> None:
        from supervisor.api import Supervisor

        overrides = ["workload=llm", f"device={args.device}", f"parallel.tp={tp}", f"llm.preset={preset}",
                     f"llm.dtype={args.dtype}", f"llm.batch={batch}", f"llm.prompt_len={args.prompt_len}",
                     f"llm.max_new_tokens={args.new_tokens}", f"runtime.startup_timeout_s={STARTUP_TIMEOUT_S}",
                     f"llm.cuda_graphs={str(not args.no_graphs).lower()}"]
        if args.cache_dir:
            overrides.append(f"llm.cache_dir={args.cache_dir}")
        if restartable:
            overrides += ["restart=one_for_one", "restart.intensity=100", "restart.period_s=1"]
        self.cfg = C.supervisor_config(*overrides)
        t0 = time.perf_counter()
        self.sup = Supervisor(self.cfg, start=False)
        try:
            self.sup.start()
        except BaseException:
            self.close()
            raise
        self.ready_s = time.perf_counter() - t0
        C.REAPER.track(*[p for p in self.sup.pids() if p])
        self.phases = self.sup.collective_rpc("phase_timings", timeout=60)
        self.load_s = max(p["weight_load_s"] for p in self.phases)
        self.write_s = max(p["checkpoint_write_s"] for p in self.phases)
        self.checkpoint = self.sup.collective_rpc("model_info", timeout=60)[0]["checkpoint"]

    def run(self, prompts: list[list[int]], n: int) -> Sample:
        from supervisor.llm_workload import generate

        rows, ttft, itl = generate(self.sup, prompts, n)
        return Sample(ttft, len(prompts) * len(itl) / sum(itl), itl, rows)

    def close(self) -> None:
        pids = [p for p in self.sup.pids() if p]
        try:
            self.sup.shutdown()
        finally:
            C.REAPER.kill(pids)


class HF:
    """transformers' LlamaForCausalLM.generate on the same checkpoint, in this process."""

    def __init__(self, checkpoint: str, dtype: str, device: str) -> None:
        from worker.llm.reference import load_hf

        t0 = time.perf_counter()
        self.model = load_hf(checkpoint, dtype, device)
        self.load_s = time.perf_counter() - t0

    def run(self, prompts: list[list[int]], n: int) -> Sample:
        from worker.llm.reference import hf_generate

        t0 = time.perf_counter()
        hf_generate(self.model, prompts, 1)  # .tolist() inside: the GPU is synchronised
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        rows = hf_generate(self.model, prompts, n)
        step = max(1e-9, (time.perf_counter() - t1 - ttft) / (n - 1))
        return Sample(ttft, len(prompts) / step, [step], rows)

    def close(self) -> None:
        import torch

        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- measurements -------------------------------------------------------------------------------------------------
def prompts_for(preset: str, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    import random

    from worker.llm.shape import preset as shape_of

    rng = random.Random(seed)
    return [[rng.randrange(1, shape_of(preset).vocab_size) for _ in range(prompt_len)] for _ in range(batch)]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> str:
    """"yes" when every token of every row is identical; else how many rows are, and the shortest identical
    prefix over the rows (bf16: an exact tie of two bf16 logits is common, and which one wins depends on rounding)."""
    from supervisor.llm_workload import agreement as lead

    n = len(ref[0])
    prefixes = [lead([a], [b]) for a, b in zip(ours, ref)]
    if min(prefixes) == n:
        return "yes"
    return f"{sum(p == n for p in prefixes)}/{len(ref)} rows, >={min(prefixes)}"


def compare(args: argparse.Namespace, preset: str) -> tuple[list[list[Any]], dict[str, Any]]:
    """One preset: trees at every tp (the largest batch's KV cache), HF, interleaved rounds at every batch."""
    batches = [int(b) for b in args.batches.split(",")]
    trees = {}
    for tp in [int(t) for t in args.tps.split(",")]:
        C.log(f"{preset}: starting tp={tp}")
        trees[tp] = Tree(args, preset, tp, max(batches))
    first = next(iter(trees.values()))
    C.log(f"{preset}: loading transformers' model")
    hf = HF(first.checkpoint, args.dtype, args.device)
    rows = []
    try:
        for batch in batches:
            prompts = prompts_for(preset, batch, args.prompt_len)
            series = {name: Series() for name in ["hf", *trees]}
            for tree in trees.values():
                tree.run(prompts, min(args.new_tokens, 4))  # warm-up: first prefill, graph capture for this batch
            hf.run(prompts, 2)
            for r in range(args.rounds):
                C.log(f"{preset}: batch {batch} round {r + 1}/{args.rounds}")
                ref = hf.run(prompts, args.new_tokens)
                series["hf"].samples.append(ref)
                for tp, tree in trees.items():
                    s = tree.run(prompts, args.new_tokens)
                    series[tp].samples.append(s)
                    series[tp].same.append(agreement(s.tokens, ref.tokens))
            rows += _rows(preset, batch, series, trees, hf)
    finally:
        hf.close()
        for tree in trees.values():
            tree.close()
    return rows, {"write_s": first.write_s, "hf_load_s": hf.load_s}


def _rows(preset: str, batch: int, series: dict[Any, Series], trees: dict[int, Tree], hf: HF) -> list[list[Any]]:
    hf_tok = series["hf"].col("tok_s")
    out = []
    for name, s in series.items():
        itl = [x for smp in s.samples for x in smp.itl]
        tok = s.col("tok_s")
        out.append([preset, batch, "transformers" if name == "hf" else f"ours tp={name}",
                    C.f_s(hf.load_s if name == "hf" else trees[name].load_s),
                    C.f_ms(C.median(s.col("ttft")), 1), C.f_ms(C.pct(s.col("ttft"), .99), 1),
                    f"{C.median(tok):.1f}", C.f_ms(C.median(itl)), C.f_ms(C.pct(itl, .99)),
                    C.f_x(C.paired_ratio(tok, hf_tok)), "-" if name == "hf" else ",".join(sorted(set(s.same)))])
    return out


def recovery(args: argparse.Namespace, preset: str) -> list[list[Any]]:
    """kill -9 of the (only) rank of a tp=1 tree under one_for_one -> the first tokens served again."""
    from supervisor.errors import SupervisorError

    tree = Tree(args, preset, 1, 1, restartable=True)
    prompts = prompts_for(preset, 1, args.prompt_len)
    try:
        tree.run(prompts, 2)
        pid = tree.sup.pids()[0]
        C.log(f"{preset}: kill -9 {pid}")
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ph = tree.sup.collective_rpc("phase_timings", timeout=RESTART_TIMEOUT_S)[0]
                if ph["created_at"] > t_kill:
                    break
            except SupervisorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        t_serving = time.time()
        C.REAPER.track(*[p for p in tree.sup.pids() if p])
        tree.run(prompts, 2)
        t_tokens = time.time()
        ph = tree.sup.collective_rpc("phase_timings", timeout=60)[0]
    finally:
        tree.close()
    booted = ph["created_at"] + ph["process_start_s"] + ph["cuda_init_s"] + ph["dist_init_s"] + ph["weight_load_s"]
    parts = [
        ("kill -> replacement process created (detect, policy, spawn)", ph["created_at"] - t_kill),
        ("process start (interpreter / fork, imports)", ph["process_start_s"]),
        ("CUDA init" if args.device == "cuda" else "CUDA init (none on CPU)", ph["cuda_init_s"]),
        ("torch.distributed init", ph["dist_init_s"]),
        ("weight load (warm page cache)", ph["weight_load_s"]),
        ("READY handshake -> first call answered", t_serving - booted),
        ("first step: prefill", ph["first_prefill_s"]),
        ("first step: first decode (CUDA graph capture on GPU)", ph["first_decode_s"]),
        ("total: kill -> two tokens served", t_tokens - t_kill),
    ]
    return [[preset, name, C.f_s(v)] for name, v in parts]


def _bandwidth_notes(preset: str, rows: list[list[Any]], dtype: str) -> list[str]:
    """Each decode step reads every weight once: steps/s x weight bytes against the HBM bandwidth (the floor)."""
    from worker.llm.shape import DTYPE_BYTES
    from worker.llm.shape import preset as shape_of

    weight_bytes = shape_of(preset).total_params() * DTYPE_BYTES[dtype]
    out = []
    for row in rows:
        if row[2].startswith("ours"):
            steps = float(row[6]) / row[1]
            out.append(f"{preset} batch {row[1]}: {steps:.0f} steps/s x {weight_bytes / 1e9:.1f} GB of weights = "
                       f"{steps * weight_bytes / 1e12:.2f} TB/s ({steps * weight_bytes / HBM_BYTES_S:.0%} of "
                       f"{HBM_BYTES_S / 1e12:.1f} TB/s; floor at batch 1: {HBM_BYTES_S / weight_bytes:.0f} tok/s)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=list(MODES), default="cpu")
    ap.add_argument("--presets")
    ap.add_argument("--tps")
    ap.add_argument("--batches")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode on CUDA (to measure what graphs buy)")
    ap.add_argument("--no-recovery", action="store_true")
    args = ap.parse_args()
    for key, value in MODES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)  # the HF peer gets what each rank gets: one thread
    with C.Watchdog(WATCHDOG_S):
        try:
            return _run(args)
        finally:
            C.REAPER.kill_all()


def _run(args: argparse.Namespace) -> int:
    rows, notes, rec = [], [], []
    for preset in args.presets.split(","):
        got, info = compare(args, preset)
        rows += got
        notes.append(f"{preset}: random checkpoint written in {info['write_s']:.1f} s (0 = already cached); "
                     f"transformers load {info['hf_load_s']:.1f} s")
        if args.device == "cuda":
            notes += _bandwidth_notes(preset, got, args.dtype)
        if not args.no_recovery:
            rec += recovery(args, preset)
    header = ["shape", "batch", "peer", "load", "TTFT p50", "TTFT p99", "tok/s p50", "ITL p50", "ITL p99",
              "tok/s vs HF", "same tokens"]
    title = (f"llm decode, device={args.device} {args.dtype}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
             f"{args.rounds} interleaved rounds")
    print(C.format_table(title, header, rows, notes), flush=True)
    if rec:
        print(C.format_table(f"kill -9 of the rank -> serving again (tp=1, {args.device})", ["shape", "part", "time"],
                             rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
