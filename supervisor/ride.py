"""How the built-in drivers' calls ride through a restart their policy allows (workloads.py, llm_workload.py).

::

    driver ── Ride.execute_model / collective_rpc / generate ──> the call, retryable (retry=True)
                   ▲                                              │ WorkerFailed, the group restarting
                   └── made again (within the call's timeout) ◀───┘ (its retries ran out during restarts)

The drivers' calls are always retryable, whatever ``rpc.retry*`` say: those are the API's defaults for calls the
supervisor cannot know are safe to repeat; a driver's own calls are (a tp_mlp step and an echo are pure, a
generation is greedy: supervisor/serving.py continues it).

Under a restart policy (``restart`` other than never) a rank killed mid-run restarts its group, and the call that
failed with it is sent again once the group serves again (supervisor/core/retry.py: a surviving rank's broken
collective counts as its group's failure, not as the method's error). A call that ran out
of retry attempts while its group was still restarting is made again for as long as the tree restarts: the
policy's budget bounds that (once spent, the tree gives up and the call raises why). Under ``restart=never``
nothing is sent again, but the calls are still retryable: a call that failed with its group waits for the tree's
verdict (a fail-stop tree gives up) and raises it, naming the rank that died -- not the surviving rank whose
collective broke under it, which often answers first.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from supervisor.errors import WorkerFailed
from supervisor.settings import Strategy


class Ride:
    """A driver's calls to ``sup``, retried through the restarts its policy allows."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.restarts = sup.cfg.restart.strategy is not Strategy.never

    def execute_model(self, *args: Any, timeout: float | None = None) -> Any:
        return self._again(lambda left: self.sup.execute_model(*args, timeout=left, retry=True), timeout)

    def collective_rpc(self, method: str, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._again(lambda left: self.sup.collective_rpc(method, left, retry=True, **kwargs), timeout)

    def generate(self, generate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``generate(sup, *args, retry=True, **kwargs)`` (llm_workload.generate): a request continued on a serving
        group when its own fails (supervisor/serving.py), made again if it still fails while its group restarts."""
        return self._again(lambda _left: generate(self.sup, *args, retry=True, **kwargs), None)

    def _again(self, call: Callable[[float | None], Any], timeout: float | None) -> Any:
        """``call(seconds left)``, made again while it fails because its group is restarting, within ``timeout``."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return call(None if until is None else max(0.0, until - time.monotonic()))
            except WorkerFailed as exc:
                if not (self.restarts and exc.restarting) or (until is not None and time.monotonic() >= until):
                    raise
