"""Dynamic batching that never makes a lone request wait.

Ray Serve's `@serve.batch` waits `batch_wait_timeout_s` after the first request of every
batch, even when no other request exists: at concurrency 1 that wait was most of a request's
time (5 of 6.5 ms). Here a request that finds the model idle runs at once; requests that
arrive while a forward pass runs queue up and go together in the next one (up to
`max_batch` images). The only wait is for requests already admitted by this replica and
still being read or decoded (`arriving`), bounded by `wait_s`: they are known to be coming.

Plain asyncio, no Ray: a Serve replica, the tests and the benchmark use the same class.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]  # [N, ...] -> [N, K]


class Batcher:
    def __init__(self, forward: Forward, max_batch: int, wait_s: float):
        self.forward, self.max_batch, self.wait_s = forward, max_batch, wait_s
        self.queue: list[tuple[torch.Tensor, asyncio.Future]] = []
        self.arriving = 0            # requests admitted, not yet submitted
        self.busy = False            # a drain task is running
        self._changed = asyncio.Event()
        self._drainer: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Wrap the reading and decoding of one request: while it runs, a batch being formed
        may wait (up to `wait_s`) for it to join."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._changed.set()

    async def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x [N, ...] -> (logits [N, K], how many requests shared the forward pass)."""
        if len(x) >= self.max_batch:   # already a full batch: run it alone
            await _let_arrivals_in()
            return self.forward(x), 1
        future = asyncio.get_running_loop().create_future()
        self.queue.append((x, future))
        self._changed.set()
        if not self.busy:
            self.busy = True
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.queue:
                await _let_arrivals_in()
                await self._gather()
                batch = self._take()
                try:
                    logits = self.forward(torch.cat([x for x, _ in batch]))
                except Exception as e:  # every waiting request gets the error, none hangs
                    for _, f in batch:
                        f.done() or f.set_exception(e)
                    continue
                for (x, f), part in zip(batch, logits.split([len(x) for x, _ in batch])):
                    f.done() or f.set_result((part, len(batch)))
        finally:
            self.busy = False

    async def _gather(self) -> None:
        """Wait (at most `wait_s`) while admitted requests may still join a batch with room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.arriving and self._images() < self.max_batch and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())

    def _images(self) -> int:
        return sum(len(x) for x, _ in self.queue)

    def _take(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        """The oldest requests that fit in `max_batch` images (at least one)."""
        n, total = 0, 0
        while n < len(self.queue) and (n == 0 or total + len(self.queue[n][0]) <= self.max_batch):
            total += len(self.queue[n][0])
            n += 1
        batch, self.queue = self.queue[:n], self.queue[n:]
        return batch


async def _let_arrivals_in() -> None:
    """Two turns of the event loop before a forward pass: requests whose bytes have arrived are
    read and admitted (one turn reads the socket, the next starts their handlers), so they join
    the batch, and Serve counts them as ongoing. Without this, with user code on the replica's
    own loop, they waited unread in the socket and the autoscaler saw ~0 ongoing requests under
    any load."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
