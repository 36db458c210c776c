"""Helpers for real-process tests: configs from Hydra overrides, and a supervisor in a child process."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from supervisor.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ECHO = ("worker=echo",)
FAULTY = ("worker.cls=worker.faults:FaultyWorker",)


def config(*overrides: str, method: str = "forkserver"):
    return load_config([f"runtime.start_method={method}", "logging.events=false", "logging.level=WARNING",
                        *overrides])


def fault_env(kind: str, rank: int | None = None, attempts: str = "", arg: str = "") -> tuple[str, ...]:
    out = [*FAULTY, f"+runtime.env.RV_FAULT={kind}"]
    if rank is not None:
        out.append(f"+runtime.env.RV_FAULT_RANK={rank}")
    if attempts:
        out.append(f"+runtime.env.RV_FAULT_ATTEMPTS={attempts}")
    if arg:
        out.append(f"+runtime.env.RV_FAULT_ARG={arg}")
    return tuple(out)


def greedy_tokens(sup, prompts: list[list[int]], new_tokens: int, timeout: float = 60) -> list[list[int]]:
    """workload=llm: ``new_tokens`` greedy tokens per prompt, one execute_model step at a time (prefill, decodes)."""
    out = [[t] for t in sup.execute_model({"op": "prefill", "prompts": prompts, "max_new_tokens": new_tokens},
                                          timeout=timeout)]
    for _ in range(new_tokens - 1):
        for row, t in zip(out, sup.execute_model({"op": "decode", "tokens": [r[-1] for r in out]}, timeout=timeout)):
            row.append(t)
    return out


def gone_within(pids, timeout: float) -> list[int]:
    """The pids still alive (and not zombies) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def reap_adopted(procs, timeout: float = 10.0) -> None:
    """Wait for a child interpreter's helpers (its forkserver, slow to exit with torch loaded) to go, reaping the
    ones this process adopted: once it has run a supervisor it is a child subreaper, so when that child dies its
    orphans become our children, and unreaped they would count as leaked zombies."""
    psutil.wait_procs(list(procs), timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TreeInChild:
    """`python tests/integration/serve_tree.py overrides...` in its own process: it prints one JSON line with the
    worker pids (and grandchildren) once READY, then serves until signalled."""

    def __init__(self, *overrides: str, calls: bool = False) -> None:
        args = [sys.executable, os.path.join(REPO, "tests", "integration", "serve_tree.py"), *overrides]
        if calls:
            args.append("--calls")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            self.proc.wait(5)
            raise RuntimeError(f"tree did not start: {err[-3000:]}")
        self.info = json.loads(line)
        self._tree = psutil.Process(self.proc.pid).children(recursive=True)  # for reap_adopted, after it dies

    @property
    def pids(self) -> list[int]:
        return self.info["pids"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        reap_adopted(getattr(self, "_tree", ()))
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


def tiny_checkpoint_with_tokenizer(folder, seed: int, eos_token_id: int | None = None) -> str:
    """The tiny preset's seeded random checkpoint in ``folder``, with a word-level tokenizer built in-process
    (``w0`` .. ``w511`` are ids 0 .. 511; no network) and, if given, generation_config.json's end-of-sequence id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from worker.llm.checkpoint import ensure_random_checkpoint
    from worker.llm.shape import preset

    ensure_random_checkpoint(folder, preset("tiny"), seed=seed, dtype="float32")
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(512)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(str(folder))
    if eos_token_id is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos_token_id}, f)
    return str(folder)


def smi_used_mib(gpu: str = "0") -> int:
    """Memory in use on one GPU (MiB) as nvidia-smi reports it: the fault matrix's witness for "GPU memory back",
    independent of our own NVML reading. ``gpu``: an index or UUID, as nvidia-smi -i takes it."""
    out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return int(out.split()[0])


def smi_pids(gpu: str = "0") -> set[int]:
    """The processes nvidia-smi shows on one GPU."""
    out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-compute-apps=pid", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {int(p) for p in out.split() if p.isdigit()}


@contextlib.contextmanager
def limited_memory_cgroup(limit_bytes: int):
    """A fresh memory cgroup under this process's own (cgroup v1's memory controller, or v2), limited to
    ``limit_bytes`` with no swap; yields its folder, or None where none can be made here (no writable cgroup fs, no
    memory controller delegated). Removed afterwards, once the processes put in it are gone."""
    from supervisor.backends.local.oomkill import counter_files, parse_mountinfo

    with open("/proc/self/mountinfo") as f, open("/proc/self/cgroup") as g:
        files = counter_files(g.read(), parse_mountinfo(f.read()))
    path = None
    for counters in files:
        candidate = os.path.join(os.path.dirname(counters), f"rv-oom-{os.getpid()}")
        try:
            _make_limited(candidate, limit_bytes, v2=counters.endswith("memory.events"))
            path = candidate
            break
        except OSError:
            _remove_cgroup(candidate)
    try:
        yield path
    finally:
        _remove_cgroup(path)


def _make_limited(path: str, limit: int, v2: bool) -> None:
    os.mkdir(path)
    hard, no_swap = ("memory.max", "memory.swap.max") if v2 else ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
    with open(os.path.join(path, hard), "w") as f:
        f.write(str(limit))
    if os.path.exists(os.path.join(path, no_swap)):  # absent where the kernel accounts no swap
        with open(os.path.join(path, no_swap), "w") as f:
            f.write(str(0 if v2 else limit))


def _remove_cgroup(path: str | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path and os.path.isdir(path):
        try:
            os.rmdir(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # a killed process is still leaving it
