"""Worker output: every rank's stdout/stderr pipe, read by one thread, written out as whole prefixed lines.

::

    rank N  fd 1 ─pipe─┐                        ┌─> our stdout / stderr: "[rankN]: line" (one write per batch)
            fd 2 ─pipe─┤                        │
          stacks ─pipe─┼─> RankOutput thread ───┤
    rank M  ...   ─────┘   (epoll, whole lines) └─> RUN_DIR/ranks/rankN.log: the line as written, every stream

Why here and not in the worker (worker/output.py says more): a pipe per stream catches what bypasses Python
(faulthandler's stack dumps, native libraries, a crash's last words), and cutting lines on our side means two ranks
can never share a line. A rank's log file stays open across its restarts; each incarnation starts with a header
line naming the pid and attempt. Lines longer than ``MAX_LINE_BYTES`` are cut so a rank that never writes a newline
cannot grow our memory. The thread, its descriptors and the files exist only once a worker has been added.

The stacks pipe carries what faulthandler writes when we ask a rank for its Python stacks (a hang, SIGUSR1): a
hundred lines per rank, for the log only; the console gets one line saying where (supervisor/signals.py, the
lifecycle's hang report). Without a run folder there is no log, and they come out on our stderr like the rest.
A line that already starts with the rank's own ``[rankN]:`` (torch.distributed's excepthook and its C++ logger put
it there) is not prefixed twice.
"""
from __future__ import annotations

import os
import selectors
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.events import iso_time

MAX_LINE_BYTES = 64 * 1024  # a longer line is written out in pieces of this size
READ_BYTES = 64 * 1024  # one pipe's capacity: one read usually takes all that is there
_STREAMS = ("stdout", "stderr", "stacks")


def _label(rank: int | str, sep: str = "") -> str:
    return f"rank{sep}{rank}" if isinstance(rank, int) else rank


@dataclass
class _Source:
    rank: int | str
    stream: str  # "stdout" | "stderr" | "stacks"
    conn: Any  # the parent's read end (multiprocessing Connection); closed at EOF
    buf: bytes = field(default=b"")

    @property
    def fd(self) -> int:
        return self.conn.fileno()


class RankOutput:
    def __init__(self, run_dir: str = "") -> None:
        self.log_dir = os.path.join(run_dir, "ranks") if run_dir else ""
        self._lock = threading.Lock()
        self._new: list[_Source] = []
        self._logs: dict[int | str, Any] = {}  # global rank -> its log file (binary, appended)
        self._sel: selectors.BaseSelector | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._open = 0  # sources registered and not at EOF yet (the pump thread's count)
        self._close_by: float | None = None  # monotonic deadline once close() was asked for

    def log_path(self, rank: int | str) -> str:
        """Where rank ``rank``'s output goes ("" when there is no run folder). A str names a helper process of the
        tree instead of a rank (the weight keeper: "keeper")."""
        return os.path.join(self.log_dir, f"{_label(rank)}.log") if self.log_dir else ""

    # -- adding workers (any thread) -------------------------------------------------------------------------
    def add(self, rank: int | str, pid: int, attempt: int | str, stdout_conn: Any, stderr_conn: Any,
            stacks_conn: Any = None) -> None:
        """Take over the read ends of a new worker's pipes (they are closed here at EOF)."""
        conns = (stdout_conn, stderr_conn, stacks_conn)
        with self._lock:
            self._start_locked()
            self._note_locked(rank, f"{_label(rank, ' ')} pid {pid} attempt {attempt} started")
            self._new += [_Source(rank, s, c) for s, c in zip(_STREAMS, conns) if c is not None]
        self._poke()

    def note(self, rank: int | str, what: str) -> None:
        """A header line in the rank's log (e.g. a warm standby promoted into the rank's place)."""
        with self._lock:
            self._note_locked(rank, what)

    def _note_locked(self, rank: int | str, what: str) -> None:
        self._write_log(rank, f"==> {what} {iso_time(time.time())} <==\n".encode())

    def _start_locked(self) -> None:
        if self._thread is not None:
            return
        self._close_by = None  # (re)opened after a close(): serve until the next one
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        self._sel = selectors.DefaultSelector()
        self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake[0], selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="supervisor-output", daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        if self._wake is not None:
            try:
                os.write(self._wake[1], b"x")
            except OSError:
                pass  # full: the thread is awake anyway

    # -- the thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._sel is not None
        while True:
            self._register_new()
            deadline = self._close_by
            if deadline is not None and (self._open == 0 or time.monotonic() >= deadline):
                break
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._read(key.data)

    def _register_new(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for src in new:
            self._sel.register(src.fd, selectors.EVENT_READ, src)
            self._open += 1

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake[0], 4096):
                pass
        except OSError:
            pass

    def _read(self, src: _Source) -> None:
        try:
            data = os.read(src.fd, READ_BYTES)
        except OSError:
            data = b""
        if not data:
            self._finish(src)
            return
        lines = (src.buf + data).split(b"\n")
        src.buf = lines.pop()
        while len(src.buf) >= MAX_LINE_BYTES:
            lines.append(src.buf[:MAX_LINE_BYTES])
            src.buf = src.buf[MAX_LINE_BYTES:]
        self._emit(src, lines)

    def _finish(self, src: _Source) -> None:
        if src.buf:
            self._emit(src, [src.buf])  # a last line without its newline (a crash's last words)
            src.buf = b""
        self._sel.unregister(src.fd)
        src.conn.close()
        self._open -= 1

    def _emit(self, src: _Source, lines: list[bytes]) -> None:
        if not lines:
            return
        with self._lock:
            self._write_log(src.rank, b"".join(line + b"\n" for line in lines))
        if src.stream == "stacks" and self.log_dir:
            return  # in the rank's log; the console is told where by whoever asked for them
        prefix = f"[{_label(src.rank)}]: "
        text = "".join(_prefixed(prefix, line.decode("utf-8", "replace")) for line in lines)
        stream = sys.stdout if src.stream == "stdout" else sys.stderr  # looked up now: a live display swaps them
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # our own stream is gone (closed terminal): the rank log still has it

    def _write_log(self, rank: int | str, data: bytes) -> None:
        if not self.log_dir:
            return
        f = self._logs.get(rank)
        if f is None:
            f = self._logs[rank] = open(self.log_path(rank), "ab")
        f.write(data)
        f.flush()

    # -- closing ---------------------------------------------------------------------------------------------
    def close(self, timeout_s: float = 1.0) -> None:
        """Once the workers are gone: read what their pipes still hold (until EOF, at most ``timeout_s``), then
        release the thread, the descriptors and the files. Idempotent."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._close_by = time.monotonic() + timeout_s
        self._poke()
        if thread is not threading.current_thread():
            thread.join(timeout_s + 1.0)
        with self._lock:
            self._thread = None
            self._release_locked()

    def _release_locked(self) -> None:
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                key.data.conn.close()
        for src in self._new:
            src.conn.close()
        self._new = []
        self._sel.close()
        for fd in self._wake:
            os.close(fd)
        self._wake = None
        for f in self._logs.values():
            f.close()
        self._logs = {}


def _prefixed(prefix: str, line: str) -> str:
    """``[rankN]: line``; a line that already carries this rank's prefix keeps the one it has."""
    return (line if line.startswith(prefix.rstrip()) else prefix + line) + "\n"
