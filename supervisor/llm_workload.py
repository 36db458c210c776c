"""``workload=llm``: drive the Llama decoder the vLLM way and check it against transformers.

::

    check_config (supervisor/llm_checks.py; parent, before anything is spawned): shape of the checkpoint or
        preset -> Llama-family? heads / kv-heads / MLP columns divisible by tp? layers >= pp? weights + KV cache fit?
    run_llm (after READY):
        prompts ─▶ execute_model(prefill) ──▶ first tokens          (TTFT)
                ─▶ execute_model(decode) × (max_new_tokens - 1)      (inter-token latency, decode tokens/s)
                ─▶ python -m worker.llm.reference (transformers.generate, same checkpoint, own process) ─▶ the check

Each step is one broadcast to every rank; the answer comes from the first TP rank of the last PP stage.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from supervisor.completions import Completer, load_tokenizer
from supervisor.core.topology import resolve_device
from worker.llm.shape import LlamaShape, read_shape

if TYPE_CHECKING:
    from supervisor.api import Supervisor
    from supervisor.report import Report

REFERENCE_TIMEOUT_S = 900.0  # transformers: import, load the checkpoint, generate
CONSOLE_ROWS = 8  # completions shown on the console; every row is in completions.jsonl
STOP_POLL_S = 0.05  # a stop (SIGTERM) ends the reference run this fast
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the run ---------------------------------------------------------------------------------------------------
def make_prompts(llm: Any, shape: LlamaShape, checkpoint: str, tokenizer: Any = None) -> list[list[int]]:
    """The batch's prompts: the given ids (every row), the given texts (tokenized, cycled), or seeded random ids.
    ``tokenizer``: the checkpoint's, if already loaded."""
    if llm.prompt_ids:
        return [list(llm.prompt_ids) for _ in range(llm.batch)]
    if llm.prompt_text:
        tok = tokenizer or load_tokenizer(checkpoint)
        if tok is None:  # the config check saw the tokenizer's files: transformers is what is missing
            raise RuntimeError("llm.prompt_text needs transformers to tokenize (pip install -e '.[llm]')")
        texts = prompt_texts(llm)
        ids = {text: tok(text)["input_ids"] for text in set(texts)}  # each text once
        return [list(ids[text]) for text in texts]
    rng = random.Random(llm.seed)
    return [[rng.randrange(1, shape.vocab_size) for _ in range(llm.prompt_len)] for _ in range(llm.batch)]


def prompt_texts(llm: Any) -> list[str | None]:
    """Each row's prompt text (``llm.prompt_text`` cycled over the batch), or None for rows given as ids."""
    return [llm.prompt_text[i % len(llm.prompt_text)] if llm.prompt_text else None for i in range(llm.batch)]


def describe_prompts(llm: Any) -> str:
    """Where the prompts came from, in words: random ones are said to be random."""
    if llm.prompt_ids:
        return f"llm.prompt_ids ({len(llm.prompt_ids)} tokens) in each of {llm.batch} rows"
    if llm.prompt_text:
        return f"{len(llm.prompt_text)} llm.prompt_text, tokenized, over {llm.batch} rows"
    return (f"{llm.batch} rows of {llm.prompt_len} random token ids (seeded: llm.seed={llm.seed}), since neither "
            "llm.prompt_text nor llm.prompt_ids is set")


def generate(sup: "Supervisor", prompts: list[list[int]], max_new_tokens: int,
             stop: threading.Event | None = None, group: int = 0,
             retry: bool | None = None) -> tuple[list[list[int]], float, list[float]]:
    """Greedy generation, starting on dp group ``group``: (tokens per row, TTFT seconds, inter-token latencies).
    A request whose group fails part-way is continued on another serving group, or on its own once it serves again
    (supervisor/serving.py's Generator; ``retry=False``, or by default ``rpc.retry_execute_model=never``, turns that
    off): the tokens are the same.
    TTFT is the first prefill; a retry's prefill is counted in neither figure."""
    from supervisor.serving import Generator

    prefills: list[float] = []
    itl: list[float] = []

    def seen(op: str, _group: int, seconds: float) -> None:
        (prefills if op == "prefill" else itl).append(seconds)

    rows = Generator(sup, retry).generate(prompts, max_new_tokens, group=group, on_step=seen, stop=stop)
    return rows, prefills[0], itl


def run_llm(sup: "Supervisor", stop: threading.Event) -> "Report":
    from supervisor.report import Report, p50_p99

    from supervisor.ride import Ride

    llm, par, ride = sup.cfg.llm, sup.cfg.parallel, Ride(sup)  # calls ride through restarts the policy allows
    output_rank = (par.pp - 1) * par.tp
    info = ride.collective_rpc("model_info", timeout=30, unique_reply_rank=output_rank)
    phases = ride.collective_rpc("phase_timings", timeout=30)
    shape = read_shape(info["checkpoint"])
    completer = Completer(sup, info["checkpoint"], load_tokenizer(info["checkpoint"]), shape.vocab_size,
                          shape.max_position_embeddings)
    prompts = make_prompts(llm, shape, info["checkpoint"], completer.tokenizer)
    retried_before = sup.retry_stats.total()
    ride.generate(generate, prompts, min(2, llm.max_new_tokens), stop)  # warm-up: kernels, allocator, CUDA graphs
    rows, ttft, itl = ride.generate(generate, prompts, llm.max_new_tokens, stop)  # the figures: dp group 0
    # Other dp replicas generate too, and every replica's tokens go to the check.
    replicas = [rows] + [ride.generate(generate, prompts, llm.max_new_tokens, stop, group=g)[0]
                         for g in range(1, par.dp)]
    retried = sup.retry_stats.total() - retried_before
    report = Report()
    report.add("model", f"{llm.checkpoint or llm.preset} ({_count(shape.total_params())} parameters, "
                        f"{info['dtype']}, CUDA graphs {'on' if info['cuda_graphs'] else 'off'})")
    write = max(p.get("checkpoint_write_s", 0.0) for p in phases)
    report.add("load time (weights, slowest rank)", f"{max(p['weight_load_s'] for p in phases):.3f} s"
               + (f" (+ {write:.1f} s writing the random checkpoint once)" if write > 0.5 else ""))
    report.add("time to first token", f"{ttft * 1e3:.1f} ms (prefill, batch {len(prompts)} x "
                                      f"{max(map(len, prompts))} tokens, after one warm-up run)")
    total = sum(itl)
    report.add("decode tokens/s", f"{len(prompts) * len(itl) / total:.1f} (batch {len(prompts)})" if total else "n/a")
    report.add("inter-token latency p50 / p99", p50_p99(itl, 2))
    if retried:
        report.add("requests continued on another group", f"{retried} (a group failed mid-request; events.jsonl: retry)")
    _check(report, llm, resolve_device(sup.cfg.device), info, prompts, replicas, stop)
    _show_completions(report, completer, prompt_texts(llm), prompts, rows)
    return report


def _show_completions(report: "Report", completer: Completer, texts: list[str | None], prompts: list[list[int]],
                      rows: list[list[int]]) -> None:
    """Each prompt and what the model said (decoded when the checkpoint has a tokenizer): on the console, and in
    RUN_DIR/completions.jsonl. All of max_new_tokens, as generated and checked (no stop at end-of-sequence)."""
    done = [completer.completion(text if text is not None else ids, ids, row, frozenset(), {"source": "llm"})
            for text, ids, row in zip(texts, prompts, rows)]
    completer.log.write(done)
    where = completer.log.path or "not written: no run folder"
    said = describe_prompts(completer.sup.cfg.llm)
    ids = "" if completer.tokenizer is not None else ", token ids: the checkpoint has no tokenizer"
    print(f"\nprompts: {said}\ncompletions (greedy, {len(rows[0])} tokens each{ids}; {where}):", flush=True)
    for i, c in enumerate(done[:CONSOLE_ROWS]):
        print(f"  [{i}] {c.show()}", flush=True)
    if len(done) > CONSOLE_ROWS:
        print(f"  ... {len(done) - CONSOLE_ROWS} more rows in {where}", flush=True)
    report.add("prompts", said)
    report.add("completions", where)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _check(report: "Report", llm: Any, device: str, info: dict, prompts: list[list[int]],
           replicas: list[list[list[int]]], stop: threading.Event) -> None:
    key = "check vs transformers"
    if not llm.check or stop.is_set():
        report.add(key, "skipped (llm.check=false)" if not llm.check else "skipped (stopped)")
        return
    if importlib.util.find_spec("transformers") is None:
        report.add(key, "skipped: transformers is not installed (pip install -e '.[llm]')")
        return
    n = len(replicas[0][0])
    ref = run_reference(info["checkpoint"], prompts, n, info["dtype"], device, stop)
    if ref is None:
        report.add(key, "skipped (stopped)")
        return
    agree = min(agreement(rows, ref) for rows in replicas)
    groups = f", {len(replicas)} dp replicas" if len(replicas) > 1 else ""
    if agree == n:
        report.add(key, f"PASS: greedy tokens identical ({len(prompts)} rows x {n} tokens{groups})")
    elif info["dtype"] == "float32":
        report.ok = False
        report.failure = f"greedy tokens differ from transformers after {agree} of {n} tokens"
        report.add(key, f"FAIL: {report.failure}")
    else:  # bf16/fp16: other kernels round differently (fused QKV GEMM, SDPA backend, batch-dependent GEMM
        # algorithms); bf16 logits keep 8 bits, so two of them are often equal or one step apart, and the winner flips
        report.add(key, f"{agree} of {n} tokens identical in every row ({info['dtype']}: rounding differs from "
                        "transformers' kernels; a near-tie of two bf16 logits then flips a token)")


def agreement(ours: list[list[int]], ref: list[list[int]]) -> int:
    """How many leading tokens are identical in every row."""
    n = 0
    for cols in zip(*(zip(a, b) for a, b in zip(ours, ref))):
        if any(a != b for a, b in cols):
            break
        n += 1
    return n


def run_reference(checkpoint: str, prompts: list[list[int]], max_new_tokens: int, dtype: str, device: str,
                  stop: threading.Event | None = None) -> list[list[int]] | None:
    """transformers' greedy tokens, from ``python -m worker.llm.reference`` in a process of its own; None if
    ``stop`` is set first (a SIGTERM): the process is then killed at once, not waited for. It dies with us even
    by SIGKILL: it holds the read end of a death pipe whose only write end is ours, and arms PR_SET_PDEATHSIG
    (like a worker). The request travels on its stdin: nothing is left on disk, whatever happens."""
    request = json.dumps({"checkpoint": checkpoint, "prompts": prompts, "max_new_tokens": max_new_tokens,
                          "dtype": dtype, "device": device})
    death_r, death_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "worker.llm.reference", str(death_r)], cwd=REPO,
                                pass_fds=(death_r,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(death_r)
    try:
        done = _communicate(proc, request, stop or threading.Event())
    finally:
        os.close(death_w)
        proc.kill()  # nothing if it has exited; reaped here either way
        proc.wait()
    if done is None:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"transformers reference failed: {(done[1].strip().splitlines() or ['?'])[-1]}")
    return json.loads(done[0].strip().splitlines()[-1])["tokens"]


def _communicate(proc: subprocess.Popen, request: str, stop: threading.Event) -> tuple[str, str] | None:
    """(stdout, stderr) once ``proc`` has exited, or None as soon as ``stop`` is set."""
    deadline = time.monotonic() + REFERENCE_TIMEOUT_S
    send: str | None = request  # communicate() takes the input on its first call only
    while not stop.is_set():
        try:
            return proc.communicate(send, timeout=max(0.0, min(STOP_POLL_S, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"transformers reference: no answer within {REFERENCE_TIMEOUT_S:.0f} s") from None
        send = None
    return None
