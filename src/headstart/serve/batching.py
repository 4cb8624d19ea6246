"""Micro-batching: concurrent requests to one specialist share one forward pass.

A request's inputs join a queue; the first input to arrive starts a short timer (`max_wait_s`, 5 ms by
default) and the queue is run when the timer fires or when `max_batch` inputs wait, whichever comes
first. The timer runs only while traffic is concurrent (the last batch held more than one input): a lone
client pays no wait (measured at concurrency 1: 10.7 ms per request instead of 17). One batch runs at a time: what arrives meanwhile waits and goes as the next batch the moment the
running one ends (its requests have waited a whole model call already). Sending it off sooner would only
queue a half-full batch on the base's lock: measured at concurrency 32, batches of ~16 instead of 32. The
model call runs in a worker thread (`asyncio.to_thread`) so the event loop keeps accepting requests
meanwhile; each request gets back exactly the rows of its own inputs, in order.

A batch mixes requests (and specialists): when it fails, each request's inputs are run again alone, so a
bad input fails only the request that sent it and the others still get their answers.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence


class MicroBatcher:
    """Group the inputs of concurrent `submit` calls into batches for `run_batch`.

    run_batch: a blocking function, inputs -> one result per input (same order); called in a thread.

    >>> batcher = MicroBatcher(lambda xs: [len(x) for x in xs])
    >>> await batcher.submit(["a", "bcd"])
    [1, 3]
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32,
                 max_wait_s: float = 0.005):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches_run = 0
        """How many model calls were made (tests and the benchmark read the batching gain off it)."""
        self._waiting: list[tuple[Any, asyncio.Future, object]] = []
        """(input, its future, the request it came with) in arrival order."""
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        """A batch is in the model now: the next one waits for it."""
        self._last_size = 0

    async def submit(self, inputs: Sequence[Any]) -> list[Any]:
        """The results of `inputs`, computed in batches shared with other concurrent calls."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (a test client per request): nothing can be pending
            self._loop, self._waiting, self._timer, self._running = loop, [], None, False
        futures, request = [], object()
        for item in inputs:
            future = loop.create_future()
            self._waiting.append((item, future, request))
            futures.append(future)
            if len(self._waiting) >= self.max_batch:
                self._flush()
        if self._waiting and self._timer is None:
            self._timer = loop.call_later(self.max_wait_s if self._last_size > 1 else 0, self._flush)
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        """Take up to `max_batch` waiting inputs and run them, unless a batch is running: then they go when
        it ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running:
            return
        self._waiting = [waiting for waiting in self._waiting if not waiting[1].cancelled()]  # timed-out requests
        batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        if batch:
            self._running, self._last_size = True, len(batch)
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future, object]]) -> None:
        try:
            await self._answer(batch)
        finally:
            self._running = False
            if self._waiting:
                self._flush()

    async def _answer(self, batch: list[tuple[Any, asyncio.Future, object]]) -> None:
        try:
            results = await self._call([item for item, _, _ in batch])
        except Exception as e:
            requests = list(dict.fromkeys(request for _, _, request in batch))
            if len(requests) == 1:
                return _settle(batch, error=e)
            for request in requests:  # one bad input must not fail the others: each request alone
                own = [waiting for waiting in batch if waiting[2] is request]
                try:
                    _settle(own, await self._call([item for item, _, _ in own]))
                except Exception as alone:  # this request's own inputs fail: it gets the error (the app answers)
                    _settle(own, error=alone)
            return
        _settle(batch, results)

    async def _call(self, items: list[Any]) -> Sequence[Any]:
        self.batches_run += 1
        return await asyncio.to_thread(self.run_batch, items)


def _settle(batch: list[tuple[Any, asyncio.Future, object]], results: Sequence[Any] = (),
            error: Exception | None = None) -> None:
    """Give each still-waiting future its result, or `error`."""
    for i, (_, future, _) in enumerate(batch):
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(results[i])
