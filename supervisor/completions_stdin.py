"""Prompts read line by line from stdin (``workload=serve worker=llm workload.stdin=true``), each answered on stdout.

A line is a prompt's text, or a JSON object with POST /v1/completions' fields (``{"prompt": [1, 2, 3],
"max_tokens": 8}``: token ids without a tokenizer, a length per prompt). Plain lines get ``llm.max_new_tokens``
tokens. The answer goes to stdout as the completion's text on a terminal, as one JSON object per line otherwise
(the record completions.jsonl keeps), in the order of the lines; a line that cannot be answered is one
``error: line N: ...`` on stderr and the next line is read. End of input ends the run, as for any filter.

Opt-in, not "whenever stdin is not a terminal": a server's stdin is whatever its launcher left (systemd and
``docker run`` give /dev/null, a CI runner a pipe nobody writes to), and a tree must not stop, nor read, because of it.

Reading waits in ``select`` in slices, so a stop signal ends it between lines and during a wait alike.
"""
from __future__ import annotations

import json
import os
import select
import sys
import threading
from typing import Iterator, TextIO

from supervisor.completions import Completer, Completion, PromptError
from supervisor.completions_http import Request, RequestError, decode, parse
from supervisor.errors import SupervisorError, first_line

_WAIT_SLICE_S = 0.2  # how often a wait for input looks at the stop event
_READ_BYTES = 1 << 16


def lines(fd: int, stop: threading.Event) -> Iterator[str]:
    """Lines of ``fd`` (decoded, without the newline) until end of input or ``stop``."""
    pending = b""
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], _WAIT_SLICE_S)
        if not ready:
            continue
        chunk = os.read(fd, _READ_BYTES)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")
    if pending and not stop.is_set():
        yield pending.decode("utf-8", errors="replace")  # a last line without its newline


def request(line: str, max_tokens: int) -> Request | None:
    """The request one line asks for; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("{"):
        return parse(decode(text))
    return Request([line], max_tokens)


def answer_lines(completer: Completer, stop: threading.Event, fd: int = 0, out: TextIO | None = None,
                 timeout: float | None = None) -> tuple[int, int]:
    """Answer every line of ``fd`` until end of input or ``stop``: (answered, refused)."""
    out = out or sys.stdout
    plain = out.isatty()
    answered = refused = 0
    for number, line in enumerate(lines(fd, stop), 1):
        try:
            req = request(line, completer.sup.cfg.llm.max_new_tokens)
            if req is None:
                continue
            done = completer.complete(req.prompts, req.max_tokens, req.ignore_eos, timeout, source="stdin")
        except (RequestError, PromptError, SupervisorError, TimeoutError) as exc:
            refused += 1
            print(f"error: line {number}: {first_line(exc)}", file=sys.stderr,
                  flush=True)
            continue
        answered += 1
        for c in done:
            print(_plain(c) if plain else json.dumps(c.record()), file=out, flush=True)
    return answered, refused


def _plain(c: Completion) -> str:
    return c.text if c.text is not None else " ".join(map(str, c.token_ids))

