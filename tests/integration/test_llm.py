"""The Llama decoder on real trees (CPU, gloo): greedy tokens identical to transformers at tp = 2, 4 and pp = 2
(tp = 1: the CLI run below, and tests/unit/test_llama.py in one process); the CLI's summary and check, with text
prompts; bad input -> one line, exit 2, before anything is spawned."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("transformers")

from supervisor.api import Supervisor  # noqa: E402
from supervisor.llm_workload import generate, make_prompts  # noqa: E402
from tests.integration.helpers import (REPO, config, gone_within, reap_adopted,  # noqa: E402
                                     tiny_checkpoint_with_tokenizer, wait_for)
from worker.llm.checkpoint import preset_dir  # noqa: E402
from worker.llm.reference import hf_generate, load_hf  # noqa: E402
from worker.llm.shape import preset  # noqa: E402

NEW_TOKENS = 16
SEED = 5
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("llm-cache"))


def _overrides(cache_dir: str, *extra: str) -> list[str]:
    return ["workload=llm", "device=cpu", f"llm.cache_dir={cache_dir}", f"llm.seed={SEED}", "llm.batch=3",
            "llm.prompt_len=9", f"llm.max_new_tokens={NEW_TOKENS}", *extra]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("tp", "pp", "dp"), [(2, 1, 1), (4, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)])
def test_greedy_tokens_identical_to_transformers(cache_dir: str, tp: int, pp: int, dp: int) -> None:
    cfg = config(*_overrides(cache_dir, f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}"))
    with Supervisor(cfg) as sup:
        # The tree wrote the preset checkpoint (once, whichever rank took the lock first) and loaded it from there.
        path = preset_dir(cache_dir, "tiny", SEED, "float32")
        prompts = make_prompts(cfg.llm, preset("tiny"), str(path))
        replicas = [generate(sup, prompts, NEW_TOKENS, group=g) for g in range(dp)]
        phases = sup.collective_rpc("phase_timings", timeout=30)
        assert sup.collective_rpc("model_info", timeout=30)[0]["checkpoint"] == str(path)
    ref = hf_generate(load_hf(str(path)), prompts, NEW_TOKENS)
    assert all(rows == ref for rows, _, _ in replicas)
    assert all(len(itl) == NEW_TOKENS - 1 for _, _, itl in replicas) and len(phases) == tp * pp * dp
    assert all(p["weight_load_s"] > 0 and "first_decode_s" in p for p in phases)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("retry", ["auto", "never"])
def test_the_cli_drivers_generation_survives_a_rank_killed_mid_request(cache_dir: str, monkeypatch, retry) -> None:
    """workload=llm's own driver (llm_workload.generate) goes through serving.Generator: a rank of group 0
    SIGKILLed at the third decode step, the request continues on group 1 with the same tokens; with retries off,
    the same kill fails the request."""
    from supervisor import serving
    from supervisor.errors import WorkerFailed

    cfg = config(*_overrides(cache_dir, "parallel.tp=2", "parallel.dp=2", "restart=one_for_one",
                             f"rpc.retry_execute_model={retry}"))
    real_step = serving.Generator._step
    decodes = {"n": 0}

    def step(self, group, payload, deadline, on_step=None):
        if payload["op"] == "decode" and group == 0:
            decodes["n"] += 1
            if decodes["n"] == 3:
                victim = next(w for g in self.sup.groups() if g.index == 0 for w in g.workers if w.rank == 1)
                os.kill(victim.pid, signal.SIGKILL)
        return real_step(self, group, payload, deadline, on_step)

    with Supervisor(cfg) as sup:
        path = preset_dir(cache_dir, "tiny", SEED, "float32")
        prompts = make_prompts(cfg.llm, preset("tiny"), str(path))
        clean, _, _ = generate(sup, prompts, NEW_TOKENS, group=1)
        monkeypatch.setattr(serving.Generator, "_step", step)
        if retry == "never":  # the group's failure, naming the killed rank (never rank 0's broken collective)
            with pytest.raises(WorkerFailed, match=r"rank 1 \(") as err:
                generate(sup, prompts, NEW_TOKENS, group=0)
            assert 1 in err.value.ranks
            return
        rows, ttft, itl = generate(sup, prompts, NEW_TOKENS, group=0)
        assert decodes["n"] >= 3 and sup.retry_stats.total() == 1
        retries = sup.events.of_kind("retry")
        assert [(e["from_group"], e["to_group"], e["method"]) for e in retries] == [(0, 1, "generate")]
        assert 0 < retries[0]["tokens_done"] < NEW_TOKENS
    assert rows == clean  # continued from the tokens so far: greedy decoding gives the same answer
    assert ttft > 0 and len(itl) == NEW_TOKENS - 1 - 1  # the retry's prefill replaced one decode step


class Cli:
    """``python -m supervisor ...`` in a child; its descendants are remembered, so the ones this process adopts
    when the CLI exits (its forkserver, slow to go with torch loaded) are reaped and never count as leaks."""

    def __init__(self, cwd: Path, *overrides: str, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "logging.level=WARNING", *overrides],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seen: dict[int, psutil.Process] = {}

    def _look(self) -> None:
        try:
            self.seen.update((p.pid, p) for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass

    def wait_for_child(self, command: str, timeout: float = CLI_TIMEOUT_S) -> psutil.Process:
        """The first descendant whose command line holds ``command``, once it runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self._look()
            for p in self.seen.values():
                try:
                    if command in " ".join(p.cmdline()):
                        return p
                except psutil.Error:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"no {command!r} below the CLI: {self.proc.communicate(timeout=10)}")

    def run(self, timeout: float = CLI_TIMEOUT_S) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                self._look()
                time.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.kill()
            out, err = self.proc.communicate(timeout=10)
        finally:
            reap_adopted(self.seen.values())
        return self.proc.returncode, out, err


def _not_llama(tmp_path: Path) -> str:
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return f"llm.checkpoint={tmp_path / 'gpt'}"


def _no_weights(tmp_path: Path) -> str:
    (tmp_path / "shape-only").mkdir()
    (tmp_path / "shape-only" / "config.json").write_text(json.dumps(preset("tiny").to_hf_config("float32")))
    return f"llm.checkpoint={tmp_path / 'shape-only'}"


def _huge(tmp_path: Path) -> str:
    cfg = {**preset("tiny").to_hf_config("float32"), "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
           "num_hidden_layers": 512}  # ~ 100 TB of weights: larger than any host
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "config.json").write_text(json.dumps(cfg))
    return f"llm.checkpoint={tmp_path / 'huge'}"


BAD_INPUTS = [
    pytest.param(lambda p: "parallel.tp=3", "parallel.tp: num_attention_heads=8 is not divisible by tp=3", id="heads"),
    pytest.param(lambda p: "parallel.tp=8", "parallel.tp: num_key_value_heads=4 is not divisible by tp=8",
                 id="kv-heads"),
    pytest.param(lambda p: "parallel.pp=5", "parallel.pp: 4 layers cannot fill pp=5 stages", id="layers<pp"),
    pytest.param(_not_llama, "llm.checkpoint: model_type 'gpt2' is not Llama-family", id="not-llama"),
    pytest.param(_huge, "do not fit in", id="too-large"),
    pytest.param(_no_weights, "llm.checkpoint: no *.safetensors in", id="no-safetensors"),  # failed in rank 0's load
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("bad", "says"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, bad, says: str) -> None:
    code, out, err = Cli(tmp_path, "workload=llm", "device=cpu", bad(tmp_path)).run()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not (tmp_path / "outputs").exists()  # refused before a run directory or a worker existed


def test_max_seq_len_is_checked_against_the_text_prompts_real_length(tmp_path: Path) -> None:
    """With llm.max_seq_len given, text prompts are tokenized by the check: its error quotes their length, and a
    max_seq_len that holds them passes. It quoted the 256 tokens planned for unseen text (256 + 32 = 288) and
    refused 36 for a 4-token prompt. A plain string is one prompt."""
    from supervisor.errors import ConfigError

    folder = tiny_checkpoint_with_tokenizer(tmp_path / "with-tokenizer", SEED)
    text = ("workload=llm", "device=cpu", f"llm.checkpoint={folder}", "llm.prompt_text=w5 w9 w400 w3")
    with pytest.raises(ConfigError) as refused:
        config(*text, "llm.max_seq_len=10")
    assert str(refused.value) == ("llm.max_seq_len: 10 is shorter than the longest prompt (4 tokens) plus "
                                  "llm.max_new_tokens (32): 36")
    assert config(*text, "llm.max_seq_len=36").llm.prompt_text == ("w5 w9 w400 w3",)


@pytest.mark.timeout(180)
def test_cli_summary_check_and_each_completion_with_text_prompts_through_the_tokenizer(tmp_path: Path) -> None:
    """The summary and the check; each prompt with its completion, decoded, on the console and in the run folder's
    completions.jsonl, identical to transformers' generate on the same checkpoint."""
    from transformers import AutoTokenizer

    folder = tiny_checkpoint_with_tokenizer(tmp_path / "with-tokenizer", SEED)
    texts = ["w5 w9 w400 w3", "w17 w2", "w5 w9 w400 w3"]  # llm.prompt_text cycled over the batch of 3
    code, out, err = Cli(tmp_path, "workload=llm", "device=cpu", f"llm.checkpoint={folder}", "llm.batch=3",
                         "llm.prompt_text=[w5 w9 w400 w3,w17 w2]", f"llm.max_new_tokens={NEW_TOKENS}").run()
    assert code == 0, err[-3000:]
    for line in ("load time", "time to first token", "decode tokens/s", "inter-token latency p50 / p99"):
        assert line in out, out
    assert "batch 3 x 4 tokens" in out  # "w5 w9 w400 w3" is 4 tokens; the 2-token prompt is left-padded
    assert "PASS: greedy tokens identical (3 rows x 16 tokens)" in out
    tok = AutoTokenizer.from_pretrained(folder)
    ref = hf_generate(load_hf(folder), [tok(t)["input_ids"] for t in texts], NEW_TOKENS)
    said = [tok.decode(row, skip_special_tokens=True) for row in ref]
    assert "prompts: 2 llm.prompt_text, tokenized, over 3 rows" in out
    for i, (text, answer) in enumerate(zip(texts, said)):
        assert f"  [{i}] {text!r} -> {answer!r}" in out, out
    written = [json.loads(line) for line in next((tmp_path / "outputs").glob("*/*/completions.jsonl")).open()]
    assert [(r["prompt"], r["token_ids"], r["text"], r["finish_reason"]) for r in written] == \
        [(t, row, a, "length") for t, row, a in zip(texts, ref, said)]
    assert "completions.jsonl" in out.split("llm summary")[1]  # the summary says where they are


@pytest.mark.timeout(120)
def test_random_prompts_are_said_to_be_random_and_each_completion_is_shown(cache_dir: str, capfd) -> None:
    import threading

    from supervisor.workloads import run

    cfg = config(*_overrides(cache_dir, "llm.check=false", "llm.batch=2"))
    with Supervisor(cfg) as sup:
        report = run(sup, threading.Event())
    out = capfd.readouterr().out
    says = "2 rows of 9 random token ids (seeded: llm.seed=5), since neither llm.prompt_text nor llm.prompt_ids is set"
    assert report.ok and ("prompts", says) in report.lines and f"prompts: {says}" in out
    prompts = make_prompts(cfg.llm, preset("tiny"), "")
    shown = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(shown) == 2 and all(line.startswith(f"  [{i}] ids {p} -> ids [") for i, (line, p) in
                                   enumerate(zip(shown, prompts))), out
    assert "token ids: the checkpoint has no tokenizer" in out


@pytest.mark.timeout(180)
def test_cli_rides_through_a_restart_its_policy_allows(cache_dir: str, tmp_path: Path) -> None:
    """restart=one_for_all, dp=1: rank 1 SIGKILLs itself on its 4th step (the first decode after the warm-up,
    worker/faults.py); the request continues on the group's next incarnation, the tokens still match transformers,
    and the summary counts the restart."""
    kill = ("worker.cls=worker.faults:FaultyLLMWorker", "+runtime.env.RV_FAULT=kill_at_call",
            "+runtime.env.RV_FAULT_ARG=4", "+runtime.env.RV_FAULT_RANK=1", "+runtime.env.RV_FAULT_ATTEMPTS=0")
    code, out, err = Cli(tmp_path, *_overrides(cache_dir, "parallel.tp=2", "restart=one_for_all", *kill)).run()
    assert code == 0, err[-3000:]
    assert any(ln.split() == ["restarts", "1;", "calls", "sent", "again:", "1"] for ln in out.splitlines()), out
    assert "PASS: greedy tokens identical" in out, out


REFERENCE = "worker.llm.reference"  # the transformers check's process


@pytest.mark.timeout(180)
def test_sigterm_stops_the_transformers_check_at_once(tmp_path: Path, cache_dir: str) -> None:
    """The check runs in a process of its own; a SIGTERM to the supervisor then kills it rather than waiting for
    it to finish. (Frozen with SIGSTOP, it could never finish by itself: before, the command waited for it.)"""
    cli = Cli(tmp_path, *_overrides(cache_dir))
    ref = cli.wait_for_child(REFERENCE)
    try:
        ref.suspend()
        cli.proc.send_signal(signal.SIGTERM)
        code, out, err = cli.run()
        assert code == 128 + signal.SIGTERM, err[-3000:]
        assert re.search(r"check vs transformers +skipped \(stopped\)", out), out
        assert not ref.is_running()  # killed and reaped by the supervisor
    finally:
        _kill(ref)


@pytest.mark.timeout(180)
def test_the_transformers_check_dies_with_a_sigkilled_supervisor_and_leaves_no_file(tmp_path: Path,
                                                                                  cache_dir: str) -> None:
    """kill -9 of the supervisor while the check runs: the check goes too (PR_SET_PDEATHSIG reaches it even
    frozen, so it cannot finish and exit by itself) and no request file is left in the temporary folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cli = Cli(tmp_path, *_overrides(cache_dir), env={"TMPDIR": str(tmp)})
    ref = cli.wait_for_child(REFERENCE)
    try:
        wait_for(lambda: ref.num_threads() > 1, 30, "its death watch (started once PR_SET_PDEATHSIG is armed)")
        ref.suspend()
        cli.proc.kill()
        cli.run()
        assert gone_within([ref.pid], 10.0) == []
        assert list(tmp.glob("*.json")) == []
    finally:
        _kill(ref)
        reap_adopted([ref])


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass
