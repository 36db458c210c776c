"""Errors the supervisor raises to its callers. Each message names the rank and what happened to it."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what one-line reports show."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class SupervisorError(Exception):
    """Base class."""


class StartupError(SupervisorError):
    """A group failed to become READY. ``rank`` is the first rank that failed (or timed out)."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "") -> None:
        super().__init__(message + (f"\n--- remote traceback (rank {rank}) ---\n{remote_traceback}" if remote_traceback else ""))
        self.rank = rank
        self.remote_traceback = remote_traceback


class WorkerFailed(SupervisorError):
    """A worker died (or was declared hung) while calls were pending or being made."""

    def __init__(self, message: str, ranks: tuple[int, ...] = (), restarting: bool = False) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.restarting = restarting


class DeviceFailed(WorkerFailed):
    """A call left a rank's device unusable (a sticky CUDA error: a device-side assert, an illegal address): the
    process exits right after answering and never answers again; the restart policy replaces it. Every call on that
    group still waiting gets this same error, in one line naming the rank and the cause; the remote traceback is in
    ``remote_traceback``. A retryable call is sent again, to the replacement (or another replica)."""

    def __init__(self, rank: int, exc_type: str, cause: str, method: str, remote_traceback: str = "") -> None:
        super().__init__(f"rank {rank} hit a fatal device error in {method}: {cause} ({exc_type}); its CUDA context "
                         "is unusable, so the process exits for the restart policy to replace", (rank,))
        self.rank = rank
        self.exc_type = exc_type
        self.cause = cause
        self.remote_traceback = remote_traceback


class GpuUnhealthy(WorkerFailed):
    """check_health: a GPU under the tree reports uncorrectable memory errors, or a page retirement or row remap
    waiting for a reset (supervisor/gpu_health.py). The message names each GPU, its ranks and the counter."""

    def __init__(self, problems: list[str], ranks: tuple[int, ...]) -> None:
        super().__init__("unhealthy GPU: " + " | ".join(problems), ranks)
        self.problems = problems


class CallTimeout(SupervisorError, TimeoutError):
    """The caller's own wait ran out (``timeout=``, ``Future.result(timeout)``): "wait at most", as everywhere in
    Python. The ranks are left alone; ``ranks`` had not answered yet. (TimeoutError is also what
    concurrent.futures and asyncio raise, so ``except TimeoutError`` catches both kinds.)"""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


class RpcTimeout(SupervisorError, TimeoutError):
    """A call missed its call deadline (``deadline=``, ``worker.call_deadline_s``): ``ranks`` did not answer in
    time and were declared hung (stacks dumped, killed, handed to the restart policy)."""

    def __init__(self, message: str, ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.ranks = ranks


class RemoteError(SupervisorError):
    """The called method raised inside a worker. Carries the rank and the remote traceback."""

    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"rank {rank} raised {exc_type}: {message}\n--- remote traceback (rank {rank}) ---\n{remote_traceback}")
        self.rank = rank
        self.exc_type = exc_type
        self.remote_message = message
        self.remote_traceback = remote_traceback


class GaveUp(SupervisorError):
    """The restart policy's budget is spent: the tree was stopped."""


class ShutdownInProgress(SupervisorError):
    """A call was made during or after shutdown."""


class ConfigError(Exception):
    """A bad configuration. ``str()`` is one line: ``<key>: <problem>``."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = " ".join(problem.split())  # one line, whatever Hydra's message looked like
        super().__init__(f"{key}: {self.problem}")
