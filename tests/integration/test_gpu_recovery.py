"""The weight keeper and the warm standby on a real GPU (marked `cuda`; skipped where no GPU is visible): the ranks'
weights are the keeper's (held once on the card, standby included), a standby takes a dead rank's place with the same
tokens, the keeper's death takes nothing from the ranks (row 52), kill -9 of the supervisor frees the card (row 53).
nvidia-smi is the witness for the card's memory, not our own NVML reading."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from supervisor import gpu
from supervisor.api import Supervisor
from supervisor.core.topology import visible_gpus
from tests.integration.helpers import TreeInChild, config, gone_within, greedy_tokens

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(300)]
NEW_TOKENS = 8
PROMPTS = [[3, 14, 15, 92, 65, 35], [2, 71, 82, 81]]
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _need_gpu():
    if visible_gpus() == 0:
        pytest.skip("no NVIDIA GPU visible")
    gpu.memory_by_pid()  # NVML's descriptors: opened before any test's leak baseline


def _smi_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return int(out[0])


def _llm(cache, *extra: str):
    # the 1B shape: large enough (2.5 GB of bf16 weights) that a second copy would show on nvidia-smi. The preset
    # is written once into the default cache (~/.cache/rankvisor/llm), which the GPU benchmarks share.
    return config("workload=llm", "device=cuda", *([f"llm.cache_dir={cache}"] if cache else []),
                  "llm.preset=llama-3.2-1b",
                  "llm.dtype=bfloat16", "llm.batch=2", f"llm.max_new_tokens={NEW_TOKENS}", "llm.prompt_len=6",
                  "restart=one_for_one", "runtime.startup_timeout_s=300", *extra)


def _generate(sup) -> list[list[int]]:
    return greedy_tokens(sup, PROMPTS, NEW_TOKENS, timeout=120)


def _ready_standby(sup, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = sup.reserve_status()["standbys"]
        if st and all(s["ready"] for s in st.values()):
            return st[0]["pids"]
        time.sleep(0.02)
    raise AssertionError(f"no ready standby: {sup.reserve_status()}")


def _serving_as(sup, pids: list[int] | None, before: list[int], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = sup.pids()
        if sup.serving() and now != before and (pids is None or now == pids):
            return
        time.sleep(0.01)
    raise AssertionError(f"not serving again: {sup.pids()} (expected {pids})")


@pytest.fixture(scope="module")
def plain_tokens():
    """The tokens of a tree that loads its own weights (no keeper, no standby): what every other run must give."""
    cache = ""
    with Supervisor(_llm(cache, "recovery.keeper=off", "recovery.standby=off")) as sup:
        assert sup.collective_rpc("model_info", timeout=60)[0]["weights"] == "loaded"
        return cache, _generate(sup)


def test_standby_takes_the_dead_ranks_place_with_the_weights_held_once(plain_tokens):
    cache, want = plain_tokens
    base = _smi_used_mib()
    with Supervisor(_llm(cache)) as sup:
        assert sup.collective_rpc("model_info", timeout=60)[0]["weights"] == "kept"
        assert _generate(sup) == want
        spare = _ready_standby(sup)
        held = sup.reserve_status()["keeper"]["held_bytes"]["cuda:0"]
        used = _smi_used_mib() - base
        # keeper + rank + standby: the weights once, plus three contexts and the rank's and standby's KV caches
        assert held > 2000 * MIB and used < held / MIB + 3 * 1024, (held, used)
        for _ in range(2):
            before = sup.pids()
            os.kill(before[0], signal.SIGKILL)
            _serving_as(sup, spare, before)
            assert _generate(sup) == want
            spare = _ready_standby(sup)
        assert len(sup.events.of_kind("standby_promoted")) == 2


def test_keeper_killed_ranks_keep_reading_their_weights(plain_tokens):
    """Row 52 on the GPU: the ranks' mappings hold the memory (VMM handles), so they never read freed memory."""
    cache, want = plain_tokens
    with Supervisor(_llm(cache)) as sup:
        _ready_standby(sup)
        keeper = sup.reserve_status()["keeper"]["pid"]
        os.kill(keeper, signal.SIGKILL)
        assert gone_within([keeper], 5) == []
        # churn the card's memory, so that freed pages would be handed out again and overwritten
        ballast = sup.collective_rpc(lambda w: __import__("torch").full((1 << 30,), 7, dtype=__import__("torch")
                                                                      .uint8, device=w.device).sum().item(),
                                     timeout=60)
        assert ballast == [7 << 30]
        assert _generate(sup) == want
        before = sup.pids()
        os.kill(before[0], signal.SIGKILL)  # the standby, mapping the dead keeper's memory, takes over
        _serving_as(sup, None, before)
        assert _generate(sup) == want
        _ready_standby(sup)  # the next standby needed a new keeper, which loaded again
        assert sup.reserve_status()["keeper"]["pid"] != keeper
        assert _generate(sup) == want


def test_supervisor_kill9_with_keeper_and_standby_frees_the_card(plain_tokens):
    """Row 53: every process gone and the card's memory back within 0.5 s of their exit (nvidia-smi)."""
    base = _smi_used_mib()
    tree = TreeInChild("workload=llm", "device=cuda", "llm.preset=llama-3.2-1b",
                       "llm.dtype=bfloat16", "llm.batch=2", "restart=one_for_one", "--reserve")
    try:
        everyone = tree.pids + tree.info["reserve"]
        assert len(everyone) == 3 and _smi_used_mib() - base > 2000
        t0 = time.monotonic()
        tree.kill(signal.SIGKILL)
        assert gone_within(everyone, 1.0) == []
        gone = time.monotonic() - t0
        while _smi_used_mib() - base > 64 and time.monotonic() - t0 < gone + 0.5:
            time.sleep(0.02)
        assert _smi_used_mib() - base <= 64, f"{_smi_used_mib() - base} MiB still used {gone + 0.5:.2f} s later"
    finally:
        tree.close()
