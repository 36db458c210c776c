"""The asyncio face of the API, for serving code that lives in an event loop.

    async with AsyncSupervisor(cfg) as sup:                 # starts the tree off the loop (a thread)
        out = await sup.execute_model(batch)               # the loop never blocks on a reply
        pings = await asyncio.gather(*(sup.collective_rpc("ping") for _ in range(8)))
        one = await sup.collective_rpc("echo", args=(x,), unique_reply_rank=1, timeout=2.0)
        step = await sup.execute_model(batch, non_block=True)  # sent; an asyncio Future of the output
        out = await step

Calls are the synchronous API's non-blocking ones (their Futures complete by themselves, from the channel's reply
reader) awaited through ``asyncio.wrap_future``: no thread per call. ``timeout`` is the caller's wait, as in the
synchronous API: CallTimeout after it, the ranks left alone and the late answer dropped; ``deadline`` is the call
deadline that declares silent ranks hung. Cancelling the awaiting task stops the wait, not the call (a sent call
runs; its answer is then dropped). Starting, health checks and shutdown block, so they run in a thread.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from supervisor.api import Supervisor
from supervisor.core.rpc import CallFuture
from supervisor.errors import CallTimeout
from supervisor.settings import Config


class AsyncSupervisor:
    def __init__(self, cfg: Config | None = None, **kwargs: Any) -> None:
        self._cfg, self._kwargs = cfg, kwargs
        self.sync: Supervisor | None = None  # the synchronous Supervisor, once started

    async def start(self) -> "AsyncSupervisor":
        self.sync = await asyncio.to_thread(Supervisor, self._cfg, **self._kwargs)
        return self

    async def shutdown(self) -> None:
        if self.sync is not None:
            await asyncio.to_thread(self.sync.shutdown)

    async def __aenter__(self) -> "AsyncSupervisor":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    async def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None, unique_reply_rank: int | None = None,
                             group: int | None = None, deadline: float | None = None, non_block: bool = False) -> Any:
        """The results; with ``non_block``, an asyncio Future of them, returned once the call is sent (calls sent
        one after the other keep their order; await each Future when its answer is needed)."""
        future = self._started().collective_rpc(method, timeout, args, kwargs, non_block=True,
                                                unique_reply_rank=unique_reply_rank, group=group, deadline=deadline)
        waiting = _wait(future, timeout)
        return asyncio.ensure_future(waiting) if non_block else await waiting

    async def execute_model(self, *args: Any, timeout: float | None = None, group: int | None = None,
                            non_block: bool = False, **kwargs: Any) -> Any:
        """One step on a serving group (round-robin unless ``group``), under ``worker.call_deadline_s``.
        ``non_block`` (vLLM V1's ``execute_model(scheduler_output, non_block=False)``): an asyncio Future of the
        output, returned as soon as the step is sent, so the caller can prepare the next step meanwhile."""
        sup = self._started()
        gi = group if group is not None else sup._pick_group()
        output_rank = gi * sup.world + (sup.cfg.parallel.pp - 1) * sup.cfg.parallel.tp
        return await self.collective_rpc("execute_model", timeout, args, kwargs, unique_reply_rank=output_rank,
                                         deadline=sup.cfg.worker.call_deadline_s or None, non_block=non_block)

    async def check_health(self, timeout: float | None = 10.0) -> list[Any]:
        return await asyncio.to_thread(self._started().check_health, timeout)

    def status(self) -> list[dict[str, Any]]:
        return self._started().status()

    def _started(self) -> Supervisor:
        if self.sync is None:
            raise RuntimeError("AsyncSupervisor: await start() (or use `async with`) first")
        return self.sync


async def _wait(future: CallFuture, timeout: float | None) -> Any:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        future.abandon()
        raise CallTimeout(f"no answer within the caller's timeout of {timeout:.3g} s (the ranks are left alone)") \
            from None
