"""The completions front ends without a tree: what POST /v1/completions accepts and refuses (and with which status),
where a sequence ends, and the stdin reader's lines, answers and one-line refusals."""
from __future__ import annotations

import json
import os
import threading
from types import SimpleNamespace

import pytest

from supervisor import completions_http as api
from supervisor.completions import Completer, Completion, cut_at_stop, eos_ids
from supervisor.completions_stdin import answer_lines, lines
from supervisor.config import load_config


@pytest.mark.parametrize(("body", "prompts", "max_tokens", "ignore_eos"), [
    ({"prompt": "hi"}, ["hi"], 16, False),
    ({"prompt": ["a", "b"], "max_tokens": 3}, ["a", "b"], 3, False),
    ({"prompt": [1, 2, 3], "ignore_eos": True}, [[1, 2, 3]], 16, True),
    ({"prompt": [[1], "x"], "temperature": 0, "top_p": 1.0, "n": 1, "stream": False, "stop": None, "model": "m",
      "seed": 3, "user": "u", "logprobs": None}, [[1], "x"], 16, False),
])
def test_requests_at_greedy_values_are_taken(body, prompts, max_tokens, ignore_eos):
    assert api.parse(body) == api.Request(prompts, max_tokens, ignore_eos)


@pytest.mark.parametrize(("body", "param"), [
    ([], None),
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": ["x"] * (api.MAX_PROMPTS + 1)}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": 0.7}, "temperature"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "stop": ["\n"]}, "stop"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "max_new_tokens": 3}, "max_new_tokens"),
])
def test_what_greedy_decoding_cannot_honour_is_refused_naming_the_field(body, param):
    with pytest.raises(api.RequestError) as exc:
        api.parse(body)
    assert exc.value.param == param


class FakeCompleter:
    """Answers every prompt with its own ids reversed (or raises what it is told to)."""

    def __init__(self, cfg, fail: Exception | None = None) -> None:
        self.sup, self.fail, self.calls = SimpleNamespace(cfg=cfg), fail, []
        self.model = "ck"

    def complete(self, prompts, max_tokens, ignore_eos=False, timeout=None, source=""):
        if self.fail is not None:
            raise self.fail
        self.calls.append((prompts, max_tokens, ignore_eos, source))
        return [Completion([1], [int(t) for t in str(p)][::-1] if isinstance(p, str) else p[::-1], "length",
                           p if isinstance(p, str) else None) for p in prompts]


@pytest.fixture
def serve_cfg():
    return load_config(["workload=serve", "worker=llm"])


class FakeSupervisor:  # weakly referable, as the Completer's registry needs
    def __init__(self, cfg) -> None:
        self.cfg = cfg


def test_the_route_answers_with_openais_statuses(serve_cfg, monkeypatch):
    from supervisor.errors import CallTimeout, RemoteError, ShutdownInProgress, WorkerFailed

    mlp = FakeSupervisor(load_config(["workload=serve"]))
    llm = FakeSupervisor(serve_cfg)
    assert api.answer(mlp, b"{}")[0] == 404 and api.answer(llm, b"{}")[0] == 503  # no model; not open yet
    cases = [(None, 200), (CallTimeout("late"), 504), (ShutdownInProgress("stopping"), 503),
             (WorkerFailed("gone"), 503), (RemoteError(0, "ValueError", "bad", ""), 500)]
    for fail, status in cases:
        fake = FakeCompleter(serve_cfg, fail)
        monkeypatch.setattr(Completer, "of", classmethod(lambda cls, sup, fake=fake: fake))
        code, ctype, body = api.answer(llm, b'{"prompt": [3, 4], "max_tokens": 2}')
        assert (code, ctype) == (status, api.JSON), body
        if status == 200:
            out = json.loads(body)
            assert out["choices"][0]["token_ids"] == [4, 3] and out["object"] == "text_completion"
            assert out["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        else:
            assert json.loads(body)["error"]["code"] == status
    assert json.loads(api.answer(llm, b"\xff")[2])["error"]["type"] == "invalid_request_error"


def test_a_sequence_ends_after_its_first_end_of_sequence_id(tmp_path):
    assert cut_at_stop([5, 2, 7, 2], frozenset({2})) == ([5, 2], "stop")
    assert cut_at_stop([5, 7], frozenset({2})) == ([5, 7], "length")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert eos_ids(str(tmp_path), None) == {128001, 128009}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))  # generate reads this first
    assert eos_ids(str(tmp_path), None) == {7}


def _pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def test_stdin_lines_are_answered_in_order_and_a_bad_line_is_one_error(serve_cfg, tmp_path, capfd):
    fd = _pipe_with(b'12\n\n{"prompt": [7, 8, 9], "max_tokens": 5}\n{"prompt": 1}\n{oops\n34')  # no final newline
    fake = FakeCompleter(serve_cfg)
    with open(tmp_path / "out.jsonl", "w") as out:
        try:
            assert answer_lines(fake, threading.Event(), fd, out) == (3, 2)
        finally:
            os.close(fd)
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["token_ids"] for a in answers] == [[2, 1], [9, 8, 7], [4, 3]]
    assert [c[1:] for c in fake.calls] == [(32, False, "stdin"), (5, False, "stdin"), (32, False, "stdin")]
    err = capfd.readouterr().err.splitlines()
    assert err[0].startswith("error: line 4: prompt must be") and err[1].startswith("error: line 5: not JSON")


def test_the_stdin_reader_stops_at_a_stop_while_waiting_for_input():
    r, w = os.pipe()
    stop = threading.Event()
    try:
        timer = threading.Timer(0.2, stop.set)
        timer.start()
        assert list(lines(r, stop)) == []  # no input ever came: the stop ends the wait
        timer.join()
    finally:
        os.close(r)
        os.close(w)


def test_the_http_server_refuses_a_body_too_large_unread_and_other_post_paths(serve_cfg):
    import http.client

    from supervisor.observe.http import HttpServer, Routes

    server = HttpServer(0, Routes(FakeSupervisor(serve_cfg), None, dict, ""))
    try:
        for path, length, status in (("/v1/completions", api.MAX_BODY_BYTES + 1, 413), ("/v1/chat", 2, 404),
                                     ("/v1/completions", 2, 503)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.putrequest("POST", path)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if length == 2:
                conn.send(b"{}")
            assert conn.getresponse().status == status
            conn.close()
    finally:
        server.close()
