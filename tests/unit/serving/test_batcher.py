"""The dynamic batcher: a lone request runs at once, requests that arrive during a forward
pass share the next one, nothing waits past its limit, errors reach every waiter. No Ray."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from distillery.serving.batcher import Batcher


class Recorder:
    """A forward pass that records each batch it got and takes `seconds`."""

    def __init__(self, seconds: float = 0.0):
        self.batches: list[int] = []
        self.seconds = seconds

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        time.sleep(self.seconds)
        return x.sum(dim=(1, 2, 3)).unsqueeze(1) * torch.ones(1, 3)


def _x(n: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), value)


def test_a_lone_request_does_not_wait_for_the_batch_timeout():
    forward = Recorder()
    batcher = Batcher(forward, max_batch=64, wait_s=5.0)  # a wait that would show

    async def one():
        start = time.perf_counter()
        out, together = await batcher(_x(1))
        return time.perf_counter() - start, out, together

    elapsed, out, together = asyncio.run(one())
    assert together == 1 and forward.batches == [1]
    assert elapsed < batcher.wait_s / 2  # it did not wait for the 5 s batch window
    assert out.tolist() == [[4.0, 4.0, 4.0]]


def test_requests_arriving_during_a_forward_pass_share_the_next_one():
    forward = Recorder(seconds=0.05)
    batcher = Batcher(forward, max_batch=64, wait_s=0.0)

    async def many():
        first = asyncio.ensure_future(batcher(_x(1, 0.0)))
        await asyncio.sleep(0.01)  # meanwhile the first forward pass starts and blocks the loop
        rest = [asyncio.ensure_future(batcher(_x(1, float(i)))) for i in range(1, 6)]
        return await first, await asyncio.gather(*rest)

    (out0, together0), rest = asyncio.run(many())
    assert forward.batches == [1, 5] and together0 == 1
    # each request gets its own rows back, in order
    assert [out[0, 0].item() for out, _ in rest] == [4.0 * i for i in range(1, 6)]
    assert all(together == 5 for _, together in rest)


def test_requests_submitted_together_share_one_forward_pass():
    forward = Recorder()
    batcher = Batcher(forward, max_batch=64, wait_s=0.0)

    async def together():
        return await asyncio.gather(*(batcher(_x(1)) for _ in range(4)))

    assert [n for _, n in asyncio.run(together())] == [4] * 4 and forward.batches == [4]


def test_a_batch_never_holds_more_than_max_batch_images():
    forward = Recorder(seconds=0.01)
    batcher = Batcher(forward, max_batch=8, wait_s=0.0)

    async def many():
        return await asyncio.gather(*(batcher(_x(3)) for _ in range(6)), batcher(_x(20)))

    results = asyncio.run(many())
    assert all(len(out) == len(x) for (out, _), x in zip(results, [_x(3)] * 6 + [_x(20)]))
    assert max(forward.batches) == 20 and forward.batches.count(20) == 1  # a full request runs alone
    assert all(b <= 8 for b in forward.batches if b != 20), forward.batches


def test_a_batch_waits_for_admitted_requests_but_not_past_the_limit():
    forward = Recorder()
    batcher = Batcher(forward, max_batch=64, wait_s=0.2)

    async def scenario():
        async def slow_reader(delay: float):
            with batcher.admitted():
                await asyncio.sleep(delay)  # reading and decoding its body
            return await batcher(_x(1))

        early = asyncio.ensure_future(slow_reader(0.02))  # joins in time
        late = asyncio.ensure_future(slow_reader(1.0))    # past the 0.2 s limit
        await asyncio.sleep(0)
        start = time.perf_counter()
        first = await batcher(_x(1))
        waited = time.perf_counter() - start
        return first, await early, await late, waited

    first, early, late, waited = asyncio.run(scenario())
    assert first[1] == 2 and early[1] == 2 and late[1] == 1
    assert 0.01 < waited < 0.5
    assert forward.batches == [2, 1]


def test_a_failing_forward_pass_fails_every_request_of_its_batch_and_the_next_ones_run():
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return torch.zeros(len(x), 2)

    batcher = Batcher(forward, max_batch=64, wait_s=0.0)

    async def scenario():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher(_x(1))
        out, _ = await batcher(_x(2))
        return out

    assert asyncio.run(scenario()).shape == (2, 2)
