"""A tree of the Llama decoder answering prompts (workload=serve worker=llm): POST /v1/completions on the loopback
HTTP server and prompt lines on stdin give transformers' own greedy answer (stopping at the checkpoint's
end-of-sequence id as generate does), a rank killed mid-request costs the client nothing (the request continues on
the other dp group), and every completion is written to the run folder's completions.jsonl."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytest.importorskip("transformers")

from supervisor.api import Supervisor  # noqa: E402
from supervisor.completions import Completer  # noqa: E402
from supervisor.observe.http import HttpServer, Routes  # noqa: E402
from tests.integration.helpers import REPO, config, reap_adopted, tiny_checkpoint_with_tokenizer  # noqa: E402
from worker.llm.reference import hf_generate, load_hf  # noqa: E402

SEED = 7
PROMPT = "w5 w9 w400 w3"
NEW_TOKENS = 12
EOS_AT = 6  # the checkpoint's end-of-sequence id is the token greedy decoding of PROMPT produces at this index


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """The checkpoint (with a tokenizer, and an end-of-sequence id its greedy answer to PROMPT reaches) and what
    transformers says: ``answer`` (generate stopping at that id), ``full`` (eos off), ``eos``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("serve-llm") / "ck"
    tiny_checkpoint_with_tokenizer(folder, SEED)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(PROMPT)["input_ids"]
    full = hf_generate(load_hf(str(folder)), [ids], NEW_TOKENS)[0]
    eos = full[EOS_AT]
    tiny_checkpoint_with_tokenizer(folder, SEED, eos_token_id=eos)  # generation_config.json: what generate reads
    import torch

    hf = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    answer = out[0, len(ids):].tolist()
    assert answer[-1] == eos and len(answer) <= EOS_AT + 1  # transformers stopped at the end-of-sequence id
    assert len(answer) > 3, "the kill below comes at the third decode step: pick another EOS_AT or SEED"
    return {"path": str(folder), "ids": ids, "answer": answer, "text": tok.decode(answer, skip_special_tokens=True),
            "full": full, "eos": eos}


def post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- in process: the endpoint through serving.Generator, a rank killed mid-request ---------------------------------
@pytest.mark.timeout(180)
def test_http_completion_is_transformers_answer_and_survives_a_rank_killed_mid_request(model, tmp_path, monkeypatch):
    import signal

    from supervisor import serving

    cfg = config("workload=serve", "worker=llm", "device=cpu", f"llm.checkpoint={model['path']}", "parallel.dp=2",
                 "restart=one_for_one", f"logging.run_dir={tmp_path}")
    real_step = serving.Generator._step
    steps: list[tuple[str, int]] = []
    kill_at = {"decode": 0}  # kill the rank at this decode step of a request (0: never)

    def step(self, group, payload, deadline, on_step=None):
        steps.append((payload["op"], group))
        if payload["op"] == "decode" and sum(op == "decode" for op, _ in steps) == kill_at["decode"]:
            os.kill(next(w.pid for g in self.sup.groups() if g.index == group for w in g.workers), signal.SIGKILL)
        return real_step(self, group, payload, deadline, on_step)

    monkeypatch.setattr(serving.Generator, "_step", step)
    with Supervisor(cfg) as sup:
        routes = Routes(sup, None, dict, "")
        server = HttpServer(0, routes)
        try:
            assert post(server.port, {"prompt": PROMPT})[0] == 503  # the tree serves, the completer is not open yet
            completer = Completer.open(sup)
            code, clean = post(server.port, {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "model": "anything"})
            decodes = sum(op == "decode" for op, _ in steps)
            steps.clear()
            kill_at["decode"] = 3
            code2, faulted = post(server.port, {"prompt": PROMPT, "max_tokens": NEW_TOKENS})
            retries = sup.events.of_kind("retry")
            code3, ids = post(server.port, {"prompt": [model["ids"], model["ids"][:2]], "max_tokens": NEW_TOKENS,
                                            "ignore_eos": True})
            bad = post(server.port, {"prompt": PROMPT, "temperature": 0.8})
            completer.close()
            closed = post(server.port, {"prompt": PROMPT})[0]
        finally:
            server.close()
    assert code == code2 == code3 == 200, (clean, faulted, ids)
    choice = clean["choices"][0]
    assert (choice["token_ids"], choice["text"], choice["finish_reason"]) == (model["answer"], model["text"], "stop")
    assert decodes == len(model["answer"]) - 1  # generation stopped at the end-of-sequence id, not after it
    assert clean["usage"] == {"prompt_tokens": 4, "completion_tokens": len(model["answer"]),
                              "total_tokens": 4 + len(model["answer"])} and clean["model"] == "ck"
    assert faulted["choices"] == clean["choices"]  # continued on the other group: the same answer
    assert [r["method"] for r in retries] == ["generate"] and retries[0]["from_group"] != retries[0]["to_group"]
    assert ids["choices"][0]["token_ids"] == model["full"] and ids["choices"][0]["finish_reason"] == "length"
    assert bad[0] == 400 and bad[1]["error"]["param"] == "temperature" and closed == 503
    written = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [(r["source"], r["token_ids"]) for r in written] == [("http", model["answer"])] * 2 + \
        [("http", model["full"]), ("http", ids["choices"][1]["token_ids"])]
    assert written[1]["group"] == retries[0]["to_group"]  # the record names the group that answered


@pytest.mark.timeout(180)
def test_concurrent_http_requests_share_the_groups_and_each_gets_its_answer(model, tmp_path):
    cfg = config("workload=serve", "worker=llm", "device=cpu", f"llm.checkpoint={model['path']}", "parallel.dp=2")
    answers: list = []
    with Supervisor(cfg) as sup:
        server = HttpServer(0, Routes(sup, None, dict, ""))
        completer = Completer.open(sup)
        try:
            threads = [threading.Thread(target=lambda: answers.append(post(server.port, {
                "prompt": PROMPT, "max_tokens": NEW_TOKENS}))) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            completer.close()
            server.close()
    assert [(code, a["choices"][0]["token_ids"]) for code, a in answers] == [(200, model["answer"])] * 6


# -- the command: prompts on stdin, the endpoint beside them --------------------------------------------------------
class ServeLlm:
    """`python -m supervisor workload=serve worker=llm workload.stdin=true ...` with a pipe on its stdin."""

    def __init__(self, cwd: Path, *overrides: str) -> None:
        env = {**os.environ, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "workload=serve", "worker=llm",
                                      "device=cpu", "workload.stdin=true", *overrides], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.cwd = cwd

    def ask(self, line: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no answer on stdout"
        return json.loads(self.proc.stdout.readline())

    def http_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(self.cwd.glob("outputs/*/*/http.json"))
            if found:
                return json.loads(found[0].read_text())["port"]
            time.sleep(0.05)
        raise AssertionError("no http.json")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        tree = psutil.Process(self.proc.pid).children(recursive=True)
        try:
            out, err = self.proc.communicate(timeout=timeout)  # closes stdin: the end of input
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
            reap_adopted(tree)
        return self.proc.returncode, out, err


@pytest.mark.timeout(180)
def test_serve_cli_answers_stdin_lines_and_http_and_writes_every_completion(model, tmp_path):
    cli = ServeLlm(tmp_path, f"llm.checkpoint={model['path']}", f"llm.max_new_tokens={NEW_TOKENS}")
    try:
        text = cli.ask(PROMPT)  # a prompt's text: llm.max_new_tokens, stopping at end-of-sequence
        ids = cli.ask(json.dumps({"prompt": model["ids"], "max_tokens": NEW_TOKENS, "ignore_eos": True}))
        code, http = post(cli.http_port(), {"prompt": PROMPT, "max_tokens": NEW_TOKENS})
    finally:
        rc, out, err = cli.finish()
    assert rc == 0, err[-3000:]
    assert (text["prompt"], text["text"], text["token_ids"], text["finish_reason"], text["source"]) == \
        (PROMPT, model["text"], model["answer"], "stop", "stdin")
    assert ids["token_ids"] == model["full"] and ids["finish_reason"] == "length"
    assert code == 200 and http["choices"][0]["token_ids"] == model["answer"]
    assert out == "", out  # stdout carried the answers only (read above); the summary went to stderr
    assert "served until" in err and "the end of stdin" in err and "2 answered, 0 refused" in err
    written = [json.loads(line) for line in next(tmp_path.glob("outputs/*/*/completions.jsonl")).open()]
    assert sorted((r["source"], r["token_ids"]) for r in written) == sorted(
        [("stdin", model["answer"]), ("stdin", model["full"]), ("http", model["answer"])])
