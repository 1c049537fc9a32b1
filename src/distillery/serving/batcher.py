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
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]  # [N, ...] -> [N, K]
OnPass = Callable[[int, int, float], None]  # (requests, images, seconds) of one forward pass
EWMA = 0.2  # weight of the newest forward pass in the smoothed cost per image


class Answer(NamedTuple):
    logits: torch.Tensor  # [N, K]: this request's rows
    together: int         # how many requests shared the forward pass
    by: str               # the name of the batcher (the model) that answered
    queued_s: float = 0.0   # from joining the batcher to the start of its forward pass
    forward_s: float = 0.0  # the forward pass it was part of


class Waiting(NamedTuple):
    x: torch.Tensor
    future: asyncio.Future
    movable: bool  # may be handed to another batcher (`hand_over`) before it runs
    since: float   # perf_counter when it joined


class Batcher:
    def __init__(self, forward: Forward, max_batch: int, wait_s: float, name: str = "",
                 on_pass: OnPass | None = None):
        self.forward, self.max_batch, self.wait_s, self.name = forward, max_batch, wait_s, name
        self.on_pass = on_pass  # told of every forward pass (the replica's metrics)
        self.queue: list[Waiting] = []
        self.arriving = 0            # requests admitted, not yet submitted
        self.busy = False            # a drain task is running
        self._changed = asyncio.Event()
        self._drainer: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks
        self.ms_per_image: float | None = None     # forward time per image, smoothed (`EWMA`)

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

    async def __call__(self, x: torch.Tensor, movable: bool = False) -> Answer:
        """x [N, ...] -> its answer. A `movable` request may be answered by another batcher, if
        `hand_over` moves it there before its forward pass starts (`Answer.by` says which)."""
        since = time.perf_counter()
        if len(x) >= self.max_batch:   # already a full batch: run it alone
            await _let_arrivals_in()
            return self._alone_answer(x, since)
        waiting = Waiting(x, asyncio.get_running_loop().create_future(), movable, since)
        if self.busy or self.queue or self.arriving:
            self._enqueue(waiting)
        elif await self._alone(waiting):
            # Nothing to share a pass with: run it now, here. Through the drain task a lone
            # request paid ~0.1 ms more (the task, the loop turns to it and back, cat, split).
            return self._alone_answer(x, since)
        return await waiting.future

    def _alone_answer(self, x: torch.Tensor, since: float) -> Answer:
        start = time.perf_counter()
        logits, seconds = self._timed(x, 1)
        return Answer(logits, 1, self.name, start - since, seconds)

    async def _alone(self, waiting: Waiting) -> bool:
        """Queue `waiting` at an idle batcher and let arrivals in (`_let_arrivals_in`). True,
        and out of the queue again, if nothing else came and it was not handed over; else the
        pass for what is queued starts here (a handed-over `waiting` is run by its new batcher)."""
        self.queue.append(waiting)
        self.busy = True  # those arriving meanwhile queue behind it, with no drain task yet
        try:
            await _let_arrivals_in()
        finally:  # cancelled too: what queued behind it must not be left without a pass
            self.busy = False
            alone = len(self.queue) == 1 and self.queue[0] is waiting and not self.arriving
            if alone:
                self.queue.clear()
            elif self.queue:
                self._start_drain()
        return alone

    def hand_over(self, to: Batcher) -> int:
        """Move every movable request still waiting here to `to` (`auto` stepping down to a
        faster model: what queued at the slower one is answered by the faster one instead of
        draining at the pace that built the queue). Returns how many moved."""
        moving = [w for w in self.queue if w.movable]
        self.queue = [w for w in self.queue if not w.movable]
        for w in moving:
            to._enqueue(w)
        return len(moving)

    def _enqueue(self, waiting: Waiting) -> None:
        self.queue.append(waiting)
        self._changed.set()
        if not self.busy:
            self._start_drain()

    def _start_drain(self) -> None:
        self.busy = True
        self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.queue:
                await _let_arrivals_in()
                await self._gather()
                batch = self._take()
                if batch:  # else every waiting request was handed over meanwhile
                    self._run(batch)
        finally:
            self.busy = False

    def _timed(self, x: torch.Tensor, requests: int) -> tuple[torch.Tensor, float]:
        """One forward pass and its seconds, its cost per image folded into `ms_per_image`."""
        start = time.perf_counter()
        logits = self.forward(x)
        seconds = time.perf_counter() - start
        ms = 1e3 * seconds / len(x)
        self.ms_per_image = ms if self.ms_per_image is None else (1 - EWMA) * self.ms_per_image + EWMA * ms
        if self.on_pass is not None:
            self.on_pass(requests, len(x), seconds)
        return logits, seconds

    def _run(self, batch: list[Waiting]) -> None:
        """One forward pass for `batch`; each request gets its rows, or the error (none hangs)."""
        start = time.perf_counter()
        try:
            logits, seconds = self._timed(torch.cat([w.x for w in batch]), len(batch))
        except Exception as e:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
            return
        for w, part in zip(batch, logits.split([len(w.x) for w in batch])):
            if not w.future.done():
                w.future.set_result(Answer(part, len(batch), self.name, start - w.since, seconds))

    def waiting_ms(self) -> float:
        """The forward-pass time of the requests waiting here, at the measured cost per image
        (0 before the first pass): how long a request joining the queue now would wait."""
        return self._images() * (self.ms_per_image or 0.0)

    async def _gather(self) -> None:
        """Wait (at most `wait_s`) while admitted requests may still join a batch with room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.arriving and self._images() < self.max_batch and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())

    def _images(self) -> int:
        return sum(len(w.x) for w in self.queue)

    def _take(self) -> list[Waiting]:
        """The oldest requests that fit in `max_batch` images (at least one)."""
        n, total = 0, 0
        while n < len(self.queue) and (n == 0 or total + len(self.queue[n].x) <= self.max_batch):
            total += len(self.queue[n].x)
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
