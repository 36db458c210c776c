"""How a worker ended, in words a user can act on (loky-style: say what to suspect)."""
from __future__ import annotations

import signal
from dataclasses import dataclass

_HINTS = {
    signal.SIGSEGV: "segmentation fault: a native extension or driver crashed",
    signal.SIGABRT: "aborted: a native assertion or std::terminate, see the worker's stderr",
    signal.SIGKILL: "killed: by us, by another process, or by the kernel's OOM killer",
    signal.SIGBUS: "bus error: often /dev/shm is full or a mapped file shrank",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupted",
    signal.SIGFPE: "floating-point exception",
}
_CODES = {70: "its supervisor vanished", 71: "start-up failed", 72: "did not finish stopping within the grace",
          73: "a fatal device error (e.g. a device-side assert): its CUDA context was unusable"}


@dataclass(frozen=True)
class ExitInfo:
    exitcode: int | None  # multiprocessing's convention: negative = killed by that signal
    hung: bool = False
    detail: str = ""  # what the backend knows beyond the code (e.g. Ray's actor-death cause)

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
            return "hung (missed its heartbeat deadline)"
        if self.detail:
            return self.detail
        sig = self.signal
        if sig is not None:
            hint = _HINTS.get(sig)
            return f"{sig.name} ({hint})" if hint else sig.name
        if self.exitcode is None:
            return "still running"
        hint = _CODES.get(self.exitcode)
        return f"exit code {self.exitcode}" + (f" ({hint})" if hint else "")

    @property
    def short(self) -> str:
        """For events and tables: "exit 3", "SIGKILL", "hung"."""
        if self.hung:
            return "hung"
        sig = self.signal
        return sig.name if sig is not None else f"exit {self.exitcode}"
