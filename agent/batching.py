"""Dynamic batching for coroutines: many trajectories submit single requests, a worker runs them in
batches, so the engine stays busy while other trajectories wait for search (and vice versa)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class AsyncBatcher(Generic[T, R]):
    """Run ``fn(items) -> results`` over whatever requests are pending, one batch at a time.

    ``fn`` runs in a worker thread; requests that arrive while it runs form the next batch. Two
    batchers (generation, search) therefore overlap: a trajectory waiting for search results never
    holds up the generation batch of the others.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int, name: str = "batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn, self.max_batch, self.name = fn, max_batch, name
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # size of every batch run, for accounting and tests
        self.isolated_failures = 0  # batches that failed and were rerun request by request

    async def submit(self, item: T) -> R:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            pending = [await self._queue.get()]
            await asyncio.sleep(0)  # let coroutines that are ready right now enqueue too
            while len(pending) < self.max_batch and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            items = [item for item, _ in pending]
            self.batches.append(len(items))
            try:
                results = await asyncio.to_thread(self.fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: {len(items)} requests but {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - isolate the failing request(s)
                if len(items) == 1:
                    if not pending[0][1].done():
                        pending[0][1].set_exception(exc)
                    continue
                # one bad request must not fail the batch: rerun each alone, so only the failing ones fail
                self.isolated_failures += 1
                for item, fut in pending:
                    try:
                        (res,) = await asyncio.to_thread(self.fn, [item])
                    except Exception as one_exc:  # noqa: BLE001 - delivered to that request only
                        if not fut.done():
                            fut.set_exception(one_exc)
                    else:
                        if not fut.done():
                            fut.set_result(res)
                continue
            for (_, fut), res in zip(pending, results):
                if not fut.done():
                    fut.set_result(res)
