"""How a worker ended, in words a user can act on (loky-style: say what to suspect)."""
from __future__ import annotations

import signal
from dataclasses import dataclass

from worker.protocol import EXIT_MEANINGS

_HINTS = {
    signal.SIGSEGV: "segmentation fault: a native extension or driver crashed",
    signal.SIGABRT: "aborted: a native assertion or std::terminate, see the worker's stderr",
    signal.SIGKILL: "killed: by us, by another process, or by the kernel's OOM killer",
    signal.SIGBUS: "bus error: often /dev/shm is full or a mapped file shrank",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupted",
    signal.SIGFPE: "floating-point exception",
}
OOM_KILLED = "killed by the kernel's OOM killer"
# A rank that runs a torchrun-style script (rankvisor-run, workload=script) leaves with the script's own exit code
# (worker/script.py): 1 is the script failing, not shutdown() raising. Our protocol's other codes keep their words.
_SCRIPT_FAILED = "the script failed: an uncaught exception or exit(1); see the rank's log"


@dataclass(frozen=True)
class ExitInfo:
    exitcode: int | None  # multiprocessing's convention: negative = killed by that signal
    hung: bool = False
    hung_why: str = ""  # what declared it hung: "missed its heartbeat deadline", "missed the call deadline of 5 s"
    detail: str = ""  # what the backend knows beyond the code (e.g. Ray's actor-death cause)
    oom: str = ""  # a SIGKILL was the kernel's OOM killer's: the kernel's record that says so (local backend)
    cause: str = ""  # what the worker said of its end before it left (a fatal device error: the CUDA error)
    script: bool = False  # the rank ran a torchrun-style script: a non-zero code is the script's own
    by_stop: bool | None = None  # the supervisor's stop signalled it while it ran (a SIGTERM/SIGKILL end is then the
    # stop's, else the rank's own); None where the backend does not tell

    @property
    def signal(self) -> signal.Signals | None:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode)
            except ValueError:
                return None
        return None

    @property
    def clean(self) -> bool:
        return self.exitcode == 0 and not self.hung

    @property
    def reason(self) -> str:
        """"exit code 3", "SIGSEGV (segmentation fault: ...)", "hung"."""
        if self.hung:
            return f"hung ({self.hung_why or 'declared hung by the supervisor'})"
        if self.detail:
            return self.detail
        if self.oom:
            return f"SIGKILL ({OOM_KILLED}: {self.oom})"
        sig = self.signal
        if sig is not None:
            hint = _HINTS.get(sig)
            return f"{sig.name} ({hint})" if hint else sig.name
        if self.exitcode is None:
            return "still running"
        hint = "; ".join(words for words in (self._code_words() if self.exitcode else "", self.cause) if words)
        return f"exit code {self.exitcode}" + (f" ({hint})" if hint else "")

    def _code_words(self) -> str:
        """What our exit code means ("" for a code that is not ours)."""
        if self.script and self.exitcode == 1:
            return _SCRIPT_FAILED
        if self.script and self.exitcode not in EXIT_MEANINGS:
            return "the script's own exit code"
        return EXIT_MEANINGS.get(self.exitcode, "")

    @property
    def meaning(self) -> str:
        """Words for events and logs: the signal's or our exit code's meaning ("" for another code)."""
        if self.hung:
            return "hung: declared so by the supervisor, its stacks dumped into its rank log, then killed"
        if self.oom:
            return f"{OOM_KILLED}: the machine or the rank's memory cgroup ran out of memory ({self.oom})"
        sig = self.signal
        if sig is not None:
            return _HINTS.get(sig, sig.name)
        words = self._code_words() if self.exitcode is not None else ""
        return f"{words} ({self.cause})" if self.cause else words

    @property
    def short(self) -> str:
        """For events and tables: "exit 3", "SIGKILL", "hung"."""
        if self.hung:
            return "hung"
        if self.oom:
            return "SIGKILL (OOM killer)"
        sig = self.signal
        return sig.name if sig is not None else f"exit {self.exitcode}"
