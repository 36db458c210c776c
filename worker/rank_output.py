"""A script's output, the way torchrun lays it out: per-stream log files per rank and attempt, and the console
as torchrun's --redirects / --tee / --local-ranks-filter say.

::

    script stdout ─pipe─▶ LinePump ─┬─▶ console fd 1  "<prefix><line>"   (unless redirected or filtered out)
                                    └─▶ <dir>/stdout.log  "<line>"        (always)
    script stderr ─pipe─▶ LinePump ─┬─▶ console fd 2
                                    └─▶ <dir>/stderr.log

A console write is one ``os.write`` of one whole line, so lines of different ranks never interleave mid-line (a
pipe or terminal write up to PIPE_BUF bytes is atomic). Knows nothing about scripts: any process's output pipes
can be pumped (RPC workers too).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import BinaryIO

_READ_CHUNK = 65536
STDOUT, STDERR = 1, 2  # torchrun's --redirects / --tee bits: 1 stdout, 2 stderr, 3 both


@dataclass(frozen=True)
class OutputPlan:
    """Where one rank's two streams go."""

    prefix: bytes  # b"[rank3]:"
    log_dir: str  # stdout.log / stderr.log are written here ("" = no files)
    console: int  # bitmask of the streams that reach the console (STDOUT | STDERR)

    @classmethod
    def torchrun(cls, log_dir: str, redirects: int, tee: int, shown: bool, prefix: bytes = b"") -> "OutputPlan":
        """torchrun's meaning: a redirected stream goes to its file only, unless it is also tee'd; a rank not in
        --local-ranks-filter shows nothing on the console. No prefix by default: under the local backend a rank's
        descriptors 1 and 2 already lead to the supervisor, which prefixes ``[rankN]:`` (backends/local/output.py)."""
        console = ((STDOUT | STDERR) & ~redirects | tee) if shown else 0
        return cls(prefix, log_dir, console)


class LinePump(threading.Thread):
    """Copies one pipe, line by line, to a console descriptor (prefixed) and to a log file (raw)."""

    def __init__(self, source_fd: int, console_fd: int | None, prefix: bytes, log_path: str) -> None:
        super().__init__(name=f"output-{console_fd}", daemon=True)
        self.source = os.fdopen(source_fd, "rb", buffering=0)
        self.console_fd, self.prefix = console_fd, prefix
        self.log: BinaryIO | None = open(log_path, "ab", buffering=0) if log_path else None

    def run(self) -> None:
        pending = b""
        try:
            while True:
                chunk = self.source.read(_READ_CHUNK)
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                self._emit(lines)
            if pending:
                self._emit([pending])
        except (OSError, ValueError):  # the pipe was closed under us: the rank is leaving
            pass
        finally:
            self._close()

    def _emit(self, lines: list[bytes]) -> None:
        if self.log is not None:
            self.log.write(b"".join(line + b"\n" for line in lines))
        if self.console_fd is not None:
            for line in lines:
                _write_all(self.console_fd, self.prefix + line + b"\n")

    def _close(self) -> None:
        for f in (self.source, self.log):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the console went away (launcher's terminal closed): the log file still has it
        pass


def start_pumps(plan: OutputPlan, stdout_r: int, stderr_r: int, console: tuple[int, int] = (1, 2)) -> list[LinePump]:
    """One pump per stream; ``console`` are the descriptors the prefixed lines go to."""
    if plan.log_dir:
        os.makedirs(plan.log_dir, exist_ok=True)
    pumps = []
    for bit, fd, out, name in ((STDOUT, stdout_r, console[0], "stdout.log"), (STDERR, stderr_r, console[1], "stderr.log")):
        log = os.path.join(plan.log_dir, name) if plan.log_dir else ""
        pumps.append(LinePump(fd, out if plan.console & bit else None, plan.prefix, log))
    for p in pumps:
        p.start()
    return pumps
