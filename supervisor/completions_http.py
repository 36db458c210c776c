"""POST /v1/completions on the tree's loopback HTTP server (supervisor/observe/http.py routes it here): OpenAI's
Completions API, the part a greedy decoder can honour, so ``curl``, the ``openai`` client or a load generator
work unchanged.

Request (JSON): ``prompt`` (a string, a list of strings, a list of token ids, or a list of such lists: one
completion each, all in one request on one dp group), ``max_tokens`` (default 16, as OpenAI's), ``ignore_eos``
(vLLM's extension: run to max_tokens), ``model`` (any; the answer names the checkpoint). Sampling settings are
accepted at their greedy values only (``temperature`` 0, ``top_p`` 1, ``n`` 1, no ``stream``, ``stop``, ``echo``,
``logprobs`` or penalties); anything else is a 400 naming the field, never a silently different answer.

Response: ``{"id", "object": "text_completion", "created", "model", "choices": [{"index", "text", "token_ids",
"finish_reason": "stop" | "length", "logprobs": null}], "usage"}``; ``text`` is null when the checkpoint has no
tokenizer. Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 404 no model
in this tree, 503 not serving (starting, stopping, the restart budget spent), 504 past
``workload.request_timeout_s``, 500 the model raised.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from supervisor.completions import Completer, Completion, PromptError
from supervisor.llm_checks import runs_llm
from supervisor.errors import RemoteError, ShutdownInProgress, WorkerFailed, first_line

PATH = "/v1/completions"
JSON = "application/json"
MAX_BODY_BYTES = 1 << 20  # a prompt batch is far smaller; a larger body is refused before it is read
MAX_PROMPTS = 64  # one request is one batch on one dp group: its KV cache grows with the rows
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
# Sampling fields and the one value each may take here (greedy decoding), or None where only its absence is greedy.
GREEDY = {"temperature": 0, "top_p": 1, "n": 1, "best_of": 1, "stream": False, "echo": False, "stop": None,
          "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None}
PASSIVE = ("model", "user", "seed")  # accepted and without effect: one checkpoint; greedy needs no seed


class RequestError(ValueError):
    """A request this endpoint refuses; ``param`` names the field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Request:
    prompts: list[Any]  # each a string or a list of token ids
    max_tokens: int = DEFAULT_MAX_TOKENS
    ignore_eos: bool = False


def parse(body: Any) -> Request:
    """A Request from the decoded JSON body; RequestError naming the first field it cannot honour."""
    if not isinstance(body, dict):
        raise RequestError(None, "the body must be a JSON object")
    for key, value in body.items():
        if key in GREEDY and value is not None and value != GREEDY[key]:
            raise RequestError(key, f"{key}={value!r}: only greedy decoding is served here "
                                    f"({key} {GREEDY[key]!r} or absent)")
        if key not in GREEDY and key not in PASSIVE and key not in ("prompt", "max_tokens", "ignore_eos"):
            raise RequestError(key, f"{key}: unknown field")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens", f"max_tokens must be a positive integer, got {max_tokens!r}")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos", f"ignore_eos must be true or false, got {ignore_eos!r}")
    return Request(_prompts(body.get("prompt")), max_tokens, ignore_eos)


def _prompts(prompt: Any) -> list[Any]:
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise RequestError("prompt", f"{len(prompt)} prompts in one request; at most {MAX_PROMPTS}")
        return prompt
    raise RequestError("prompt", "prompt must be a string, a list of token ids, or a non-empty list of those")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value)


def response(completer: Completer, done: list[Completion]) -> dict[str, Any]:
    used = sum(len(c.prompt_ids) for c in done), sum(len(c.token_ids) for c in done)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": completer.model,
            "choices": [{"index": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                         "logprobs": None} for i, c in enumerate(done)],
            "usage": {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)}}


# -- the route ------------------------------------------------------------------------------------------------------
def answer(sup: Any, body: bytes) -> tuple[int, str, bytes]:
    """(status, content type, body) for one POST /v1/completions."""
    completer = Completer.of(sup)
    if completer is None:
        if not runs_llm(sup.cfg):
            return _error(404, f"no language model in this tree (worker.cls={sup.cfg.worker.cls}): "
                               "run workload=serve worker=llm", "not_found")
        return _error(503, "the model is not serving completions (starting, or the tree is stopping)",
                      "unavailable")
    try:
        req = parse(decode(body))
        done = completer.complete(req.prompts, req.max_tokens, req.ignore_eos,
                                  timeout=sup.cfg.workload.request_timeout_s, source="http")
    except RequestError as exc:
        return _error(400, str(exc), "invalid_request_error", exc.param)
    except PromptError as exc:
        return _error(400, str(exc), "invalid_request_error", str(exc).split(":", 1)[0])
    except TimeoutError as exc:  # the caller's wait (CallTimeout) or a lease that never came
        return _error(504, first_line(exc), "timeout")
    except (ShutdownInProgress, WorkerFailed) as exc:
        return _error(503, first_line(exc), "unavailable")
    except RemoteError as exc:
        return _error(500, first_line(exc), "server_error")
    return 200, JSON, json.dumps(response(completer, done)).encode()


def decode(body: bytes | str) -> Any:
    """The JSON value of a request body (or a stdin line); RequestError if it is not JSON."""
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError too
        raise RequestError(None, f"not JSON ({exc})") from None


def _error(status: int, message: str, kind: str, param: str | None = None) -> tuple[int, str, bytes]:
    return status, JSON, json.dumps({"error": {"message": message, "type": kind, "param": param,
                                               "code": status}}).encode()
