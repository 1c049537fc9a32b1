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
        answer = await batcher(_x(1))
        return time.perf_counter() - start, answer.logits, answer.together

    elapsed, out, together = asyncio.run(one())
    assert together == 1 and forward.batches == [1]
    assert elapsed < batcher.wait_s / 2  # it did not wait for the 5 s batch window
    assert out.tolist() == [[4.0, 4.0, 4.0]]


def test_a_lone_request_runs_in_its_own_handler_and_its_cost_is_recorded():
    forward = Recorder()
    batcher = Batcher(forward, max_batch=64, wait_s=0.0)
    answer = asyncio.run(batcher(_x(2)))
    assert batcher._drainer is None and not batcher.busy and not batcher.queue  # no drain task was needed
    assert answer.together == 1 and forward.batches == [2] and batcher.ms_per_image is not None


def test_a_lone_request_cancelled_while_arrivals_come_in_leaves_them_a_pass():
    forward = Recorder()
    batcher = Batcher(forward, max_batch=64, wait_s=0.0)

    async def scenario():
        lone = asyncio.ensure_future(batcher(_x(1, 1.0)))
        await asyncio.sleep(0)  # it is queued and letting arrivals in
        behind = asyncio.ensure_future(batcher(_x(1, 2.0)))
        await asyncio.sleep(0)  # queued behind it
        lone.cancel()
        return await asyncio.wait_for(behind, 1.0)

    assert asyncio.run(scenario()).logits[0, 0].item() == 8.0
    assert sum(forward.batches) <= 2 and not batcher.queue


def test_requests_arriving_during_a_forward_pass_share_the_next_one():
    forward = Recorder(seconds=0.05)
    batcher = Batcher(forward, max_batch=64, wait_s=0.0)

    async def many():
        first = asyncio.ensure_future(batcher(_x(1, 0.0)))
        await asyncio.sleep(0.01)  # meanwhile the first forward pass starts and blocks the loop
        rest = [asyncio.ensure_future(batcher(_x(1, float(i)))) for i in range(1, 6)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(many())
    assert forward.batches == [1, 5] and first.together == 1
    # each request gets its own rows back, in order
    assert [a.logits[0, 0].item() for a in rest] == [4.0 * i for i in range(1, 6)]
    assert all(a.together == 5 for a in rest)


def test_requests_submitted_together_share_one_forward_pass():
    forward = Recorder()
    batcher = Batcher(forward, max_batch=64, wait_s=0.0)

    async def together():
        return await asyncio.gather(*(batcher(_x(1)) for _ in range(4)))

    assert [a.together for a in asyncio.run(together())] == [4] * 4 and forward.batches == [4]


def test_a_batch_never_holds_more_than_max_batch_images():
    forward = Recorder(seconds=0.01)
    batcher = Batcher(forward, max_batch=8, wait_s=0.0)

    async def many():
        return await asyncio.gather(*(batcher(_x(3)) for _ in range(6)), batcher(_x(20)))

    results = asyncio.run(many())
    assert all(len(a.logits) == len(x) for a, x in zip(results, [_x(3)] * 6 + [_x(20)]))
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
        return (await batcher(_x(2))).logits

    assert asyncio.run(scenario()).shape == (2, 2)


def test_hand_over_moves_only_the_movable_waiting_requests_and_they_are_answered_by_the_receiver():
    slow, fast = Recorder(seconds=0.05), Recorder()
    upper = Batcher(slow, max_batch=64, wait_s=0.0, name="slow")
    lower = Batcher(fast, max_batch=64, wait_s=0.0, name="fast")

    async def scenario():
        first = asyncio.ensure_future(upper(_x(1, 1.0), movable=True))
        await asyncio.sleep(0.01)  # its forward pass has started: it is no longer waiting
        movable = [asyncio.ensure_future(upper(_x(1, float(v)), movable=True)) for v in (2, 3)]
        pinned = asyncio.ensure_future(upper(_x(1, 4.0)))
        await asyncio.sleep(0)  # all three are queued behind the running pass
        moved = upper.hand_over(lower)
        return moved, await first, await asyncio.gather(*movable), await pinned

    moved, first, movable, pinned = asyncio.run(scenario())
    assert moved == 2
    assert first.by == "slow" and pinned.by == "slow" and [a.by for a in movable] == ["fast", "fast"]
    assert [a.logits[0, 0].item() for a in movable] == [8.0, 12.0]  # each its own rows, from the receiver
    assert fast.batches == [2] and slow.batches == [1, 1]


def test_a_batcher_emptied_by_a_hand_over_goes_idle_and_serves_the_next_request():
    upper, lower = Batcher(Recorder(seconds=0.02), 64, 0.0, "slow"), Batcher(Recorder(), 64, 0.0, "fast")

    async def scenario():
        first = asyncio.ensure_future(upper(_x(1), movable=True))
        await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(upper(_x(1), movable=True))
        await asyncio.sleep(0)
        upper.hand_over(lower)
        results = [await first, await waiting]
        return results, await asyncio.wait_for(upper(_x(2)), 1.0)

    (first, waiting), later = asyncio.run(scenario())
    assert (first.by, waiting.by, later.by) == ("slow", "fast", "slow") and later.together == 1


def test_every_pass_is_reported_and_each_answer_says_how_long_it_queued():
    """What a replica's metrics read: one `on_pass` call per forward pass (requests, images,
    seconds), and per answer its time in the queue and its pass's time."""
    passes = []
    batcher = Batcher(Recorder(seconds=0.02), max_batch=4, wait_s=0.0, on_pass=lambda *p: passes.append(p))

    async def burst():
        return await asyncio.gather(*(batcher(_x(2)) for _ in range(5)))  # 2 + 2 + 1 requests a pass

    answers = sorted(asyncio.run(burst()), key=lambda a: a.queued_s)
    assert [p[:2] for p in passes] == [(2, 4), (2, 4), (1, 2)] and all(p[2] >= 0.02 for p in passes)
    assert all(a.forward_s >= 0.02 for a in answers)
    queued = [a.queued_s for a in answers]
    assert max(queued[:2]) < 0.01 and min(queued[2:]) >= 0.02  # the first pass ran at once, the rest waited
